"""The on-device kit: benchmark.py (standalone), jetson/setup.sh, the launchers and the Dockerfiles.

Nothing here needs TensorRT, CUDA or a Jetson: tegrastats parsing runs on lines recorded on real
devices (sources cited at each fixture), bundle discovery on placeholder files that are never
loaded as engines, setup.sh on fake L4T release files (VITDEPLOY_ROOT) with a Python that sees
no site-packages, and the scripts are checked to parse as Python 3.8 (JetPack 5, Polygraphy's floor).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "vitdeploy" / "trt" / "benchmark.py"
BUILD_ENGINE = ROOT / "vitdeploy" / "trt" / "build_engine.py"
LAUNCHERS = [ROOT / "jetson" / "benchmark.py", ROOT / "jetson" / "build_engine.py"]
SETUP_SH = ROOT / "jetson" / "setup.sh"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load(BENCHMARK, "vitdeploy_benchmark_under_test")


# ---------------------------------------------------------------------------------------------
# tegrastats: real recorded lines
# ---------------------------------------------------------------------------------------------

# Jetson TX2, JetPack 4.x. DataDog/datadog-agent,
# pkg/collector/corechecks/nvidia/jetson/jetson_test.go (tx2Sample).
TX2_DATADOG = ("RAM 2344/7852MB (lfb 1154x4MB) SWAP 0/3926MB (cached 0MB) CPU [1%@345,off,off,1%@345,0%@345,2%@345] "
               "EMC_FREQ 4%@1600 GR3D_FREQ 0%@624 APE 150 PLL@37.5C MCPU@37.5C PMIC@100C Tboard@32C GPU@35C "
               "BCPU@37.5C thermal@36.5C Tdiode@34.25C VDD_SYS_GPU 152/152 VDD_SYS_SOC 687/687 VDD_4V0_WIFI 0/0 "
               "VDD_IN 3056/3056 VDD_SYS_CPU 152/152 VDD_SYS_DDR 883/883")
# Jetson TX2 (no SWAP field, EMC/GR3D without frequency). https://github.com/FindHao/tx-utils/issues/3
TX2_TX_UTILS = ("RAM 2020/7852MB (lfb 1164x4MB) CPU [9%@345,21%@345,25%@345,3%@345,1%@345,1%@345] EMC_FREQ 0% "
                "GR3D_FREQ 0% PLL@42.5C MCPU@42.5C PMIC@100C Tboard@40C GPU@41C BCPU@42.5C thermal@41.9C "
                "Tdiode@41.25C VDD_SYS_GPU 153/158 VDD_SYS_SOC 536/547 VDD_4V0_WIFI 633/527 VDD_IN 3140/3208 "
                "VDD_SYS_CPU 536/590 VDD_SYS_DDR 557/601")
# Jetson TX2 under load, pre-JetPack 5 (MTS field). https://github.com/henrygd/beszel/pull/1631
TX2_BESZEL = ("RAM 3276/7859MB (lfb 5x4MB) SWAP 1626/12122MB (cached 181MB) CPU [44%@1421,49%@2031,67%@2034,17%@1420,"
              "25%@1419,8%@1420] EMC_FREQ 1%@1866 GR3D_FREQ 0%@114 APE 150 MTS fg 1% bg 1% PLL@42.5C MCPU@42.5C "
              "PMIC@50C Tboard@38C GPU@39.5C BCPU@42.5C thermal@41.3C Tdiode@39.25C VDD_SYS_GPU 182/182 "
              "VDD_SYS_SOC 730/730 VDD_4V0_WIFI 0/0 VDD_IN 5297/5297 VDD_SYS_CPU 1917/1917 VDD_SYS_DDR 1241/1241")

# AGX Xavier, JetPack 4.2: rails named GPU/CPU/SOC/... without units.
# https://github.com/martinkersner/gtop/pull/7 (comment of 2019-06-17)
XAVIER_GTOP = ("RAM 14700/15692MB (lfb 3x2MB) SWAP 898/8192MB (cached 23MB) CPU [0%@1190,0%@1190,0%@1190,0%@1190,"
               "0%@1190,0%@1190,0%@1190,0%@1190] EMC_FREQ 0% GR3D_FREQ 0% AO@30C GPU@30.5C Tboard@31C Tdiode@32C "
               "AUX@30.5C CPU@31.5C thermal@30.8C PMIC@100C GPU 463/463 CPU 618/618 SOC 2936/2936 CV 0/0 "
               "VDDRQ 309/309 SYS5V 3306/3306")
# AGX Xavier, JetPack 4.x, four cores offline. DataDog/datadog-agent,
# pkg/collector/corechecks/nvidia/jetson/jetson_test.go (agXSample).
XAVIER_DATADOG = ("RAM 721/31927MB (lfb 7291x4MB) SWAP 0/15963MB (cached 0MB) CPU [2%@1190,0%@1190,0%@1190,0%@1190,"
                  "off,off,off,off] EMC_FREQ 0%@665 GR3D_FREQ 0%@318 APE 150 MTS fg 0% bg 0% AO@37.5C GPU@37.5C "
                  "Tdiode@40C PMIC@100C AUX@36C CPU@37.5C thermal@36.9C Tboard@37C GPU 0/0 CPU 311/311 SOC 932/932 "
                  "CV 0/0 VDDRQ 621/621 SYS5V 1482/1482")
# Xavier NX, JetPack 5.1.2: timestamp, GR3D_FREQ 0%@[114], mW rails.
# waggle-sensor/jetson-exporter, tegrastats_test.go (TestParseTegraStatsXavierNXJetPack512).
XAVIER_NX_JP5 = ("07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) "
                 "CPU [23%@1397,17%@1192,16%@1190,13%@1190,23%@1190,10%@1190] EMC_FREQ 2%@204 GR3D_FREQ 0%@[114] "
                 "VIC_FREQ 115 APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C PMIC@50C "
                 "VDD_IN 2763mW/2846mW VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW")
# Xavier NX, JetPack 4.4.1 (MTS, no mW). Same file (TestParseTegraStatsXavierNXJetPack411).
XAVIER_NX_JP4 = ("RAM 5246/7771MB (lfb 7x4MB) SWAP 983/20269MB (cached 280MB) CPU [47%@1420,23%@1420,32%@1420,22%@1420,"
                 "31%@1420,96%@1420] EMC_FREQ 2%@1600 GR3D_FREQ 0%@1109 APE 150 MTS fg 1% bg 9% AO@29C GPU@31.5C "
                 "PMIC@100C AUX@30C CPU@33.5C thermal@31.35C VDD_IN 6140/5510 VDD_CPU_GPU_CV 2706/2119 VDD_SOC 1074/1051")

# AGX Orin 64 GB, JetPack 6.2.1 (L4T R36.4.4): timestamp, two GPCs, NVENC/NVDLA fields.
# lesomnus/tegra-exporter, stats/parse_test.go (the "5.15.148" cases).
ORIN_1 = ("05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) CPU [14%@2188,5%@2112,"
          "8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,6%@1036,10%@1036] EMC_FREQ 3%@2133 "
          "GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off NVJPG off NVJPG1 off VIC 36%@115 OFA off NVDLA0 off NVDLA1 off "
          "PVA0_FREQ off APE 174 cpu@52.562C soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C "
          "VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW")
ORIN_2 = ("05-09-2026 18:42:07 RAM 18202/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) CPU [16%@1949,6%@1761,"
          "4%@1222,4%@2201,4%@1036,33%@1036,0%@1036,40%@1036,3%@1190,46%@1190,6%@1190,2%@1190] EMC_FREQ 3%@2133 "
          "GR3D_FREQ 0%@[0,0] NVENC 78%@166 NVDEC off NVJPG off NVJPG1 off VIC 32%@115 OFA off NVDLA0 off NVDLA1 off "
          "PVA0_FREQ off APE 174 cpu@52.343C soc2@48.343C soc0@49.062C tj@52.343C soc1@49.531C "
          "VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4607mW/4657mW")
# Jetson Thor, L4T R38.4 (a newer generation: GR3D_FREQ without a load, *_FREQ @0 engines) --
# for robustness to fields this parser was not written for. Same file (the "6.8.12" case).
THOR = ("05-17-2026 10:00:32 RAM 4208/125773MB (lfb 31x4MB) SWAP 0/2048MB (cached 0MB) CPU [1%@972,0%@972,0%@972,"
        "0%@972,1%@972,0%@972,1%@972,1%@972,0%@972,0%@972,3%@972,0%@972,0%@972,1%@972] EMC_FREQ 0%@665 "
        "GR3D_FREQ @[0,0,0] NVENC0_FREQ @0 NVENC1_FREQ @0 NVDEC0_FREQ @0 NVDEC1_FREQ @0 NVJPG0_FREQ @0 VIC off "
        "OFA_FREQ @0 PVA0_FREQ off APE 300 cpu@34.468C tj@34.5C soc012@33.781C soc345@34.5C VDD_GPU 0mW/0mW "
        "VDD_CPU_SOC_MSS 4165mW/4165mW VIN_SYS_5V0 4126mW/4126mW")

ALL_LINES = [TX2_DATADOG, TX2_TX_UTILS, TX2_BESZEL, XAVIER_GTOP, XAVIER_DATADOG, XAVIER_NX_JP5, XAVIER_NX_JP4,
             ORIN_1, ORIN_2, THOR]


def test_tx2_jetpack4():
    s = bench.parse_tegrastats(TX2_DATADOG)
    assert s["timestamp"] is None
    assert (s["ram_used_mb"], s["ram_total_mb"]) == (2344, 7852)
    assert s["ram_lfb"] == {"blocks": 1154, "block_mb": 4.0}
    assert (s["swap_used_mb"], s["swap_total_mb"], s["swap_cached_mb"]) == (0, 3926, 0)
    assert s["cpu_loads"] == [1, None, None, 1, 0, 2]
    assert [c["online"] for c in s["cpu"]] == [True, False, False, True, True, True]
    assert s["cpu"][0]["freq_mhz"] == 345
    assert (s["emc_load_pct"], s["emc_freq_mhz"]) == (4, 1600)
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"]) == (0, [624])
    assert s["temperatures_c"] == {"PLL": 37.5, "MCPU": 37.5, "PMIC": 100.0, "Tboard": 32.0, "GPU": 35.0,
                                   "BCPU": 37.5, "thermal": 36.5, "Tdiode": 34.25}
    assert s["power_mw"]["VDD_IN"] == {"current": 3056, "average": 3056}
    assert set(s["power_mw"]) == {"VDD_SYS_GPU", "VDD_SYS_SOC", "VDD_4V0_WIFI", "VDD_IN", "VDD_SYS_CPU", "VDD_SYS_DDR"}
    assert s["engines"] == {"APE": "150"}


def test_tx2_without_swap_and_frequencies():
    s = bench.parse_tegrastats(TX2_TX_UTILS)
    assert s["ram_used_mb"] == 2020 and s["swap_used_mb"] is None
    assert (s["emc_load_pct"], s["emc_freq_mhz"]) == (0, None)
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"]) == (0, [])
    assert s["power_mw"]["VDD_4V0_WIFI"] == {"current": 633, "average": 527}
    s = bench.parse_tegrastats(TX2_BESZEL)
    assert s["swap_cached_mb"] == 181 and s["mts"] == {"fg_pct": 1, "bg_pct": 1}
    assert s["cpu_loads"] == [44, 49, 67, 17, 25, 8] and s["gpu_freq_mhz"] == [114]


def test_xavier_jetpack4_rails_without_units():
    s = bench.parse_tegrastats(XAVIER_GTOP)
    assert (s["ram_used_mb"], s["ram_lfb"]) == (14700, {"blocks": 3, "block_mb": 2.0})
    assert len(s["cpu"]) == 8 and all(c["freq_mhz"] == 1190 for c in s["cpu"])
    # "GPU@30.5C" is a temperature, "GPU 463/463" a rail, "CPU [...]" the loads, "CPU 618/618" a rail
    assert s["temperatures_c"]["GPU"] == 30.5 and s["temperatures_c"]["CPU"] == 31.5
    assert s["power_mw"] == {"GPU": {"current": 463, "average": 463}, "CPU": {"current": 618, "average": 618},
                             "SOC": {"current": 2936, "average": 2936}, "CV": {"current": 0, "average": 0},
                             "VDDRQ": {"current": 309, "average": 309}, "SYS5V": {"current": 3306, "average": 3306}}
    s = bench.parse_tegrastats(XAVIER_DATADOG)
    assert s["cpu_loads"] == [2, 0, 0, 0, None, None, None, None]
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"], s["emc_freq_mhz"]) == (0, [318], 665)
    assert s["power_mw"]["SYS5V"] == {"current": 1482, "average": 1482}


def test_xavier_jetpack5_timestamp_and_milliwatts():
    s = bench.parse_tegrastats(XAVIER_NX_JP5)
    assert s["timestamp"] == "07-09-2024 13:31:31"
    assert (s["ram_used_mb"], s["ram_total_mb"]) == (3168, 6851)
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"]) == (0, [114])
    assert s["power_mw"] == {"VDD_IN": {"current": 2763, "average": 2846},
                             "VDD_CPU_GPU_CV": {"current": 650, "average": 670},
                             "VDD_SOC": {"current": 650, "average": 711}}
    assert s["engines"] == {"VIC_FREQ": "115", "APE": "150"}
    s = bench.parse_tegrastats(XAVIER_NX_JP4)
    assert s["power_mw"]["VDD_IN"] == {"current": 6140, "average": 5510} and s["mts"] == {"fg_pct": 1, "bg_pct": 9}


def test_orin_jetpack6():
    s = bench.parse_tegrastats(ORIN_1)
    assert s["timestamp"] == "05-09-2026 18:42:06"
    assert (s["ram_used_mb"], s["ram_total_mb"], s["swap_used_mb"]) == (18207, 62841, 86)
    assert len(s["cpu"]) == 12 and s["cpu"][0] == {"load_pct": 14, "freq_mhz": 2188, "online": True}
    assert (s["emc_load_pct"], s["emc_freq_mhz"]) == (3, 2133)
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"]) == (0, [0, 0])
    assert s["temperatures_c"] == {"cpu": 52.562, "soc2": 48.437, "soc0": 49.093, "tj": 52.562, "soc1": 49.656}
    assert s["power_mw"] == {"VDD_GPU_SOC": {"current": 2412, "average": 2412},
                             "VDD_CPU_CV": {"current": 1607, "average": 1607},
                             "VIN_SYS_5V0": {"current": 4707, "average": 4707}}
    assert s["engines"]["NVENC"] == "79%@166" and s["engines"]["NVDLA0"] == "off" and s["engines"]["APE"] == "174"
    assert bench.parse_tegrastats(ORIN_2)["power_mw"]["VIN_SYS_5V0"] == {"current": 4607, "average": 4657}


def test_unknown_generation_and_fields_do_not_break_parsing():
    s = bench.parse_tegrastats(THOR)
    assert (s["ram_used_mb"], s["ram_total_mb"]) == (4208, 125773)
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"]) == (None, [0, 0, 0])
    assert s["engines"]["NVENC0_FREQ"] == "@0" and s["engines"]["VIC"] == "off"
    assert set(s["power_mw"]) == {"VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0"}
    # Invented fields anywhere, a -256C "no reading" zone and a repeated rail name.
    s = bench.parse_tegrastats("FOO_BAR 12%@[3] " + ORIN_1 + " CV0@-256C NC 0mW/0mW NC 5mW/5mW WEIRD[1,2] x@y")
    assert s["ram_used_mb"] == 18207 and s["temperatures_c"]["CV0"] is None
    assert s["power_mw"]["NC"]["current"] == 0 and s["power_mw"]["NC#2"]["current"] == 5
    assert s["engines"]["FOO_BAR"] == "12%@[3]"
    for junk in ("", "   ", "tegrastats: not supported on this board", "RAM garbage SWAP ?"):
        s = bench.parse_tegrastats(junk)
        assert s["ram_used_mb"] is None and s["cpu"] == [] and s["power_mw"] == {}


@pytest.mark.parametrize("line", ALL_LINES)
def test_every_recorded_line_gives_ram_and_cpus(line):
    s = bench.parse_tegrastats(line + "\n")
    assert s["ram_used_mb"] > 0 and s["ram_total_mb"] > s["ram_used_mb"]
    assert s["cpu"] and s["temperatures_c"] and s["power_mw"]
    json.dumps(s)  # plain data, ready for benchmark.json


def test_summarize_tegrastats():
    samples = [bench.parse_tegrastats(line) for line in (ORIN_1, ORIN_2)]
    summary = bench.summarize_tegrastats(samples + [bench.parse_tegrastats("noise")])
    assert summary["samples"] == 2
    assert summary["ram_used_mb_start"] == 18207 and summary["ram_used_mb_max"] == 18207
    assert summary["ram_delta_mb"] == 0 and summary["ram_total_mb"] == 62841
    assert summary["power_mw_mean"]["VIN_SYS_5V0"] == pytest.approx((4707 + 4607) / 2)
    assert summary["temperature_c_max"]["tj"] == 52.562
    assert bench.summarize_tegrastats([]) is None


def test_tegrastats_sampler_with_a_fake_tegrastats(tmp_path):
    """The sampler end to end (subprocess, reader thread, stop) against a script printing real lines."""
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --interval ] || exit 3\nwhile true; do\n  echo '{}'\n  echo '{}'\n"
                    "  sleep 0.02\ndone\n".format(ORIN_1, ORIN_2))
    fake.chmod(0o755)
    sampler = bench.TegrastatsSampler(interval_ms=20, executable=str(fake))
    assert sampler.start()
    summary = sampler.stop(wait_for_sample_s=5.0)
    assert summary["samples"] >= 1 and summary["ram_used_mb_max"] == 18207
    broken = bench.TegrastatsSampler(executable=str(tmp_path / "no-such-tegrastats"))
    assert broken.start() is False and broken.stop() is None  # a warning, no crash, no figures


# ---------------------------------------------------------------------------------------------
# L4T / JetPack
# ---------------------------------------------------------------------------------------------

RELEASES = {
    "r32": ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, DATE: Sat Feb 19 "
            "17:05:08 UTC 2022", "32.7.1", "4.6.1"),
    "r35": ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 "
            "19:57:35 UTC 2023", "35.4.1", "5.1.2"),
    "r36": ("# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64, DATE: Mon Jun 16 "
            "16:07:13 UTC 2025", "36.4.4", "6.2.1"),
}


@pytest.mark.parametrize("key", sorted(RELEASES))
def test_l4t_release_and_jetpack(key, tmp_path):
    text, l4t, jetpack = RELEASES[key]
    assert bench.parse_l4t_release(text) == l4t
    assert bench.jetpack_for_l4t(l4t) == jetpack
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(text + "\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson test module\0")
    facts = bench.jetson_facts(str(tmp_path))
    assert facts["l4t"] == l4t and facts["jetpack"] == jetpack and facts["model"] == "NVIDIA Jetson test module"


def test_l4t_edge_cases(tmp_path):
    assert bench.parse_l4t_release("# R35 (release), REVISION: 9.9") == "35.9.9"
    assert bench.jetpack_for_l4t("35.9.9") == "5.x" and bench.jetpack_for_l4t("99.1.0") is None
    assert bench.parse_l4t_release("# R32 (release), REVISION: 4") == "32.4.0"
    assert bench.parse_l4t_release("Ubuntu 22.04") is None
    assert bench.jetson_facts(str(tmp_path)) is None  # no release file: not a Jetson


# ---------------------------------------------------------------------------------------------
# Bundle discovery (placeholder files: nothing is loaded)
# ---------------------------------------------------------------------------------------------


def _meta(built, dla=None):
    return json.dumps({"schema": "vitdeploy.engine/1", "precision": {"built": built, "dla_core": dla}})


@pytest.fixture()
def fake_bundle(tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    for name, size in (("model.int8.engine", 3), ("model.fp32.engine", 12), ("model.fp16.engine", 6),
                       ("model.engine", 4), ("model.dla.engine", 5), ("model.int8.onnx", 1), ("calib.npy", 1)):
        (folder / name).write_bytes(b"\0" * size)
    (folder / "model.engine.json").write_text(_meta("int8"))
    (folder / "model.dla.engine.json").write_text(_meta("fp16", dla=0))
    np.savez(folder / "eval.npz", x=np.zeros((2, 3, 4, 4), np.float32), y=np.arange(2))
    return folder


def test_discover_engines_and_data(fake_bundle):
    found = bench.discover([str(fake_bundle)])
    labels = [e["label"] for e in found["engines"]]
    # precision order; model.engine (int8 per its metadata) collides with model.int8.engine
    assert labels == ["fp32", "fp16", "fp16 DLA0", "int8", "int8 (model.engine)"]
    by_label = {e["label"]: e for e in found["engines"]}
    assert by_label["fp32"]["size_bytes"] == 12 and by_label["int8"]["file"] == "model.int8.engine"
    assert by_label["int8 (model.engine)"]["precision_built"] == "int8"
    assert by_label["fp16 DLA0"]["dla_core"] == 0
    assert found["data"] == str(fake_bundle / "eval.npz") and found["folder"] == str(fake_bundle)


def test_discover_engine_files_and_explicit_data(fake_bundle, tmp_path):
    data = tmp_path / "other.npz"
    np.savez(data, x=np.zeros((1, 3, 4, 4), np.float32))
    found = bench.discover([str(fake_bundle / "model.fp16.engine"), str(fake_bundle / "model.engine"),
                            str(fake_bundle / "model.fp16.engine")], data=str(data))
    assert [e["label"] for e in found["engines"]] == ["fp16", "int8"]  # deduplicated, labelled from metadata
    assert found["data"] == str(data)
    (fake_bundle / "model.engine.json").write_text("{not json")
    assert bench.discover([str(fake_bundle / "model.engine")])["engines"][0]["label"] == "model.engine"


def test_discover_errors(tmp_path):
    with pytest.raises(bench.UsageError, match="no engines in .*build_engine.py"):
        bench.discover([str(tmp_path)])
    with pytest.raises(bench.UsageError, match="not found"):
        bench.discover([str(tmp_path / "missing")])
    (tmp_path / "model.fp16.engine").write_bytes(b"\0")
    with pytest.raises(bench.UsageError, match="--data not found"):
        bench.discover([str(tmp_path)], data=str(tmp_path / "none.npz"))


def test_benchmark_uses_vitdeploys_measurement_module():
    """Loaded by path (as in a bundle or from jetson/), benchmark.py finds ../measure/core.py: one definition."""
    assert Path(bench.core.__file__).resolve() == ROOT / "vitdeploy" / "measure" / "core.py"
    assert bench.core.parse_batches("8,1, 8", bench.UsageError) == [1, 8]
    with pytest.raises(bench.UsageError):
        bench.core.parse_batches("0", bench.UsageError)


def test_eval_data_and_preprocessing(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "e.npz", x=x, y=np.array([0, 1, 2]))
    loaded_x, loaded_y = bench.load_eval_data(str(tmp_path / "e.npz"))
    assert np.array_equal(loaded_x, x) and list(loaded_y) == [0, 1, 2]
    assert bench.prepare_eval_inputs(x, (3, 4, 4)) is not None
    pixels = np.full((2, 4, 4, 3), 255, np.uint8)
    out = bench.prepare_eval_inputs(pixels, (3, 4, 4), {"mean": [0.5] * 3, "std": [0.25] * 3})
    assert out.shape == (2, 3, 4, 4) and np.allclose(out, 2.0)
    with pytest.raises(bench.UsageError, match="no preprocessing"):
        bench.prepare_eval_inputs(pixels, (3, 4, 4))
    with pytest.raises(bench.UsageError, match="resize"):
        bench.prepare_eval_inputs(pixels, (3, 8, 8), {"mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(bench.UsageError, match="float32 N x C x H x W"):
        bench.prepare_eval_inputs(x, (3, 8, 8))
    np.savez(tmp_path / "bad.npz", x=x, y=np.array([0]))
    with pytest.raises(bench.UsageError, match="one label per image"):
        bench.load_eval_data(str(tmp_path / "bad.npz"))


# ---------------------------------------------------------------------------------------------
# Numbers, table and JSON (pure)
# ---------------------------------------------------------------------------------------------


def _rows():
    times = lambda m: [m, m, m, m * 1.1, m * 1.3]  # noqa: E731 - median m, p90 1.22 m, p99 1.292 m
    return [
        bench.core.make_row("fp32", 1, 12.0, times(4.0), top1=81.5, memory_mb=40.0),
        bench.core.make_row("fp16", 1, 6.0, times(2.0), top1=81.4, memory_mb=25.0),
        bench.core.make_row("int8", 1, 3.0, times(1.6), top1=80.9, memory_mb=18.0),
        bench.core.make_row("fp32", 8, 12.0, times(16.0), top1=81.5, memory_mb=60.0),
        bench.core.make_row("int8", 8, 3.0, times(4.0), top1=80.9, memory_mb=30.0),
    ]


def test_report_relative_columns_and_json_shape():
    report = bench.make_report("Orin (sm_87)", "10.3.0", _rows(), jetson={"l4t": "36.4.4"})
    rows = report["rows"]
    assert [r["speedup_vs_fp32"] for r in rows] == pytest.approx([1.0, 2.0, 2.5, 1.0, 4.0])
    assert [r["size_ratio_vs_fp32"] for r in rows] == pytest.approx([1.0, 2.0, 4.0, 1.0, 4.0])
    back = json.loads(json.dumps(report))
    assert set(back) >= {"device", "trt_version", "rows", "jetson"}
    assert set(back["rows"][0]) == {"precision", "batch", "top1", "size_mb", "latency_ms", "throughput_ips",
                                    "memory_mb", "speedup_vs_fp32", "size_ratio_vs_fp32"}
    assert set(back["rows"][0]["latency_ms"]) == {"median", "p90", "p99"}
    no_fp32 = bench.make_report("d", "8.2.1", [r for r in _rows() if r["precision"] != "fp32"])
    assert all(r["speedup_vs_fp32"] is None and r["size_ratio_vs_fp32"] is None for r in no_fp32["rows"])


def test_format_table():
    report = bench.make_report("d", "10.3.0", _rows() + [bench.core.make_row("int8 DLA0", 1, 3.5, [2.0, 2.0, 2.2])])
    lines = bench.format_table(report).splitlines()
    assert lines[0].startswith("| precision | batch | top-1 % | size (MB) | latency median (ms) |")
    assert re.match(r"^\|-+\|(-+:\|)+$", lines[1])
    assert len(lines) == 2 + 6 and len({len(line) for line in lines}) == 1  # aligned
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert cells == ["INT8", "1", "80.90", "3.00", "1.600", "1.952", "2.067", "625.0", "18.0", "2.50x", "4.00x"]
    dla = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert dla[0] == "int8 DLA0" and dla[2] == bench.core.missing_mark() == dla[8]


def test_format_tegrastats_table():
    summary = bench.summarize_tegrastats([bench.parse_tegrastats(ORIN_1), bench.parse_tegrastats(ORIN_2)])
    report = bench.make_report("d", "10.3.0", [], engines=[{"label": "int8", "tegrastats": summary},
                                                           {"label": "fp16", "tegrastats": None}])
    text = bench.format_tegrastats_table(report)
    assert "RAM peak (MB)" in text and "| int8 " in text and "4657 VIN_SYS_5V0" in text and "fp16" not in text
    assert bench.format_tegrastats_table(bench.make_report("d", "x", [])) == ""


# ---------------------------------------------------------------------------------------------
# The command line, in a subprocess (no TensorRT here)
# ---------------------------------------------------------------------------------------------


def _run(args, cwd=None, env=None, timeout=60):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", [BENCHMARK, LAUNCHERS[0]], ids=["benchmark.py", "jetson/benchmark.py"])
def test_help_runs_without_tensorrt(script, tmp_path):
    result = _run([sys.executable, str(script), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--batch", "--warmup", "--runs", "--data", "--json", "--no-tegrastats"):
        assert option in result.stdout


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
@pytest.mark.parametrize("script", [BENCHMARK, LAUNCHERS[0]], ids=["benchmark.py", "jetson/benchmark.py"])
def test_without_tensorrt_exits_2_with_one_line(script, fake_bundle):
    result = _run([sys.executable, str(script), str(fake_bundle), "--batch", "1,8"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: TensorRT not found"), result.stderr
    assert result.stdout == ""
    assert not (fake_bundle / "benchmark.json").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "no engines in"),
    (["--batch", "0"], "--batch takes comma-separated positive integers"),
    (["--runs", "0"], "--runs >= 1"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    result = _run([sys.executable, str(BENCHMARK), str(tmp_path / "empty")] + argv)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_launcher_finds_the_real_script():
    launcher = _load(LAUNCHERS[0], "jetson_benchmark_launcher")
    assert Path(launcher.find_script()) == BENCHMARK.resolve()
    assert launcher.load_script(launcher.find_script()).REPORT_SCHEMA == bench.REPORT_SCHEMA


# ---------------------------------------------------------------------------------------------
# What runs on the device: Python 3.8 (JetPack 5's, Polygraphy's floor), no vitdeploy, no torch
# ---------------------------------------------------------------------------------------------

DEVICE_SCRIPTS = [BENCHMARK, BUILD_ENGINE] + LAUNCHERS


@pytest.mark.parametrize("path", DEVICE_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_device_scripts_are_python38_and_standalone(path):
    source = path.read_text(encoding="utf-8")
    ast.parse(source, filename=str(path), feature_version=(3, 8))  # rejects match, except*, 3.9+ syntax
    assert "import torch" not in source and "from vitdeploy" not in source and "import vitdeploy" not in source


# ---------------------------------------------------------------------------------------------
# setup.sh --dry-run on fake L4T releases
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def bare_python(tmp_path):
    """A python3 that sees no site-packages: no numpy, no Polygraphy, no TensorRT, no pip."""
    wrapper = tmp_path / "bare-python3"
    wrapper.write_text('#!/bin/sh\nexec "{}" -I -S "$@"\n'.format(sys.executable))
    wrapper.chmod(0o755)
    return wrapper


def _fake_root(tmp_path, key, cuda_version_json=None, cuda_version_txt=None):
    root = tmp_path / ("root_" + key)
    (root / "etc").mkdir(parents=True)
    if key in RELEASES:
        (root / "etc" / "nv_tegra_release").write_text(RELEASES[key][0] + "\n")
    cuda = root / "usr" / "local" / "cuda"
    cuda.mkdir(parents=True)
    if cuda_version_json:
        (cuda / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": cuda_version_json},
                                                      "cuda_cudart": {"version": "0.0.1"}}, indent=3))
    if cuda_version_txt:
        (cuda / "version.txt").write_text("CUDA Version {}\n".format(cuda_version_txt))
    return root


def _setup(root, python, *args):
    env = dict(os.environ, VITDEPLOY_ROOT=str(root), PYTHON=str(python))
    env.pop("VIRTUAL_ENV", None)
    env.pop("CUDA_PYTHON_SPEC", None)
    return _run(["bash", str(SETUP_SH), *args], env=env)


def _would_run(stdout):
    return [line[len("would run: "):] for line in stdout.splitlines() if line.startswith("would run: ")]


def test_setup_sh_r32_jetpack46_is_trtexec_only(tmp_path, bare_python):
    result = _setup(_fake_root(tmp_path, "r32", cuda_version_txt="10.2.300"), bare_python, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "L4T R32.7.1, JetPack 4.6.1" in out and "TensorRT 8.2" in out and "CUDA: 10.2.300" in out
    assert "no fast INT8" in out  # TX2's generation
    assert "build and time with trtexec" in out
    commands = _would_run(out)
    assert not any("pip install" in c for c in commands)  # Polygraphy cannot run on TensorRT 8.2
    assert not any("jetson_clocks" in c or "nvpmodel -m" in c for c in commands)
    assert "missing: tensorrt" in out


@pytest.mark.parametrize("key, cuda", [("r35", "11.4.19"), ("r36", "12.6.68"), ("desktop", "12.4.1")])
def test_setup_sh_installs_polygraphy_and_onnxruntime(tmp_path, bare_python, key, cuda):
    result = _setup(_fake_root(tmp_path, key, cuda_version_json=cuda), bare_python, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"CUDA: {cuda}" in result.stdout
    commands = _would_run(result.stdout)
    for requirement in ("numpy", "polygraphy\\>=0.49.9\\,\\<0.54", "onnxruntime"):
        assert any(c.endswith(f"-m pip install --user {requirement}") for c in commands), (requirement, commands)
    assert not any("cuda-python" in c or "pycuda" in c for c in commands)


def test_setup_sh_clocks_only_when_asked_and_reporting_modes(tmp_path, bare_python):
    root = _fake_root(tmp_path, "r36", cuda_version_json="12.6.68")
    result = _setup(root, bare_python, "--dry-run")
    assert "L4T R36.4.4, JetPack 6.2.1" in result.stdout and "10.3" in result.stdout
    assert not any("jetson_clocks" in c for c in _would_run(result.stdout))
    assert "sudo jetson_clocks" in result.stdout  # the advice is printed ...
    with_clocks = _would_run(_setup(root, bare_python, "--dry-run", "--max-clocks").stdout)
    assert "sudo jetson_clocks" in with_clocks  # ... and run only with --max-clocks
    assert not any("nvpmodel -m" in c for c in with_clocks)  # the power mode is never changed
    desktop = _fake_root(tmp_path, "desktop", cuda_version_json="12.4.1")
    assert "not a Jetson" in _setup(desktop, bare_python, "--dry-run").stdout
    report_only = _setup(desktop, bare_python, "--no-install")
    assert report_only.returncode == 0 and not _would_run(report_only.stdout)
    assert "missing: numpy polygraphy onnxruntime tensorrt" in report_only.stdout


def test_setup_sh_arguments(tmp_path, bare_python):
    root = _fake_root(tmp_path, "r36")
    bad = _setup(root, bare_python, "--frobnicate")
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    usage = _setup(root, bare_python, "--help")
    assert usage.returncode == 0 and "--dry-run" in usage.stdout and "--max-clocks" in usage.stdout
    assert "set -euo pipefail" in SETUP_SH.read_text()
    no_python = _setup(root, tmp_path / "no-such-python", "--dry-run")
    assert no_python.returncode == 1 and "not found" in no_python.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles (cannot be built here: static sanity only)
# ---------------------------------------------------------------------------------------------


def _dockerfile(path):
    """(ARG defaults, FROM images with ARGs substituted, RUN text, COPY sources) of a Dockerfile."""
    text = path.read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    args, froms, runs, copies = {}, [], [], []
    for line in logical.splitlines():
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
        elif word == "FROM":
            image = rest.split()[0]
            froms.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
        elif word == "RUN":
            runs.append(rest)
        elif word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copies.extend(parts[:-1])
    return args, froms, " ".join(runs), copies


def test_dockerfile_desktop():
    args, froms, runs, copies = _dockerfile(ROOT / "Dockerfile")
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/tensorrt:2\d\.\d\d-py3", froms[0]), froms
    assert 'pip install -e ".[dev]"' in runs  # the README's install (Polygraphy is a dependency)
    assert "import tensorrt" in runs
    for source in copies:
        assert (ROOT / source).exists(), source


def test_dockerfile_jetson():
    path = ROOT / "docker" / "Dockerfile.jetson"
    args, froms, runs, copies = _dockerfile(path)
    assert froms == ["nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime"]
    assert "nvcr.io/nvidia/l4t-tensorrt:r8.5.2-runtime" in path.read_text()  # the JetPack 5 variant is documented
    assert re.search(r"pip install numpy \"\$\{POLYGRAPHY\}\" onnxruntime", runs)
    assert args["POLYGRAPHY"] == "polygraphy>=0.49.9,<0.54"
    assert "torch" not in runs and "pip install -e" not in runs  # bundle tools only
    assert {"vitdeploy/trt/build_engine.py", "vitdeploy/trt/benchmark.py", "jetson/setup.sh"} <= set(copies)
    for source in copies:
        assert (ROOT / source).exists(), source
