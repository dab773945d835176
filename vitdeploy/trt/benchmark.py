#!/usr/bin/env python3
"""Benchmark the TensorRT engines of a deploy bundle side by side, on the device that built them.

    python3 benchmark.py [BUNDLE_DIR | ENGINE ...] [--batch 1,8] [--warmup 20] [--runs 200]
        [--data eval.npz] [--json benchmark.json] [--no-tegrastats] [--tegrastats-interval 100]

It runs every ``*.engine`` in the folders it is given (``model.fp32.engine``, ``model.fp16.engine``,
``model.int8.engine``, the bundle's ``model.engine`` / ``model.dla.engine``) and the engine files
named, and builds none (build_engine.py does).
Each engine runs in Polygraphy's TrtRunner. Per engine and batch size: warm-up, then timed runs
(host->device copy, execution, device->host copy), median / p90 / p99 latency and throughput;
on the bundle's ``eval.npz`` (``x`` images, ``y`` labels) or ``--data``: top-1, and the engine
compared with ONNX Runtime (Q/DQ evaluated in float, the semantics TensorRT implements) on the
same images through Polygraphy's Comparator -- top-1 agreement and the largest logit difference;
engine file size; device memory (the engine's own and the measured ``cudaMemGetInfo`` drop); and
on a Jetson the RAM and power of ``tegrastats`` sampled while each engine runs.

It prints a Markdown table on stdout and writes the same rows as JSON (``benchmark.json`` in the
bundle unless ``--json`` says otherwise), in the shape ``vitdeploy bench`` uses::

    {"device": ..., "trt_version": ..., "rows": [{"precision", "batch", "top1", "size_mb",
      "latency_ms": {"median", "p90", "p99"}, "throughput_ips", "memory_mb",
      "speedup_vs_fp32", "size_ratio_vs_fp32"}], "engines": [{..., "versus_onnxruntime"}], ...}

Standalone: the standard library, NumPy, TensorRT, Polygraphy and ONNX Runtime (``jetson/setup.sh``
installs the last two), plus its sibling ``build_engine.py`` -- no vitdeploy, no torch. Python >= 3.8.

Sizes and memory are in MB = 10^6 bytes (as in vitdeploy's reports).

Exit codes: 0 measured; 2 a problem with the arguments or the machine (no engines, no TensorRT
or Polygraphy), in one line; 1 an engine failed to load or run (the others are still measured).
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time


def _import_standalone(module, *paths):
    """vitdeploy's ``module`` when this runs inside the package (``vitdeploy.trt.benchmark``), else the first of
    ``paths`` (relative to this file) that exists: this script also runs as ``python3 benchmark.py`` in a
    bundle and by path from jetson/, where neither sys.path nor a relative import finds it."""
    if __package__ and __package__ in sys.modules:
        return importlib.import_module(module)
    here = os.path.dirname(os.path.realpath(__file__))
    found = [p for p in (os.path.join(here, p) for p in paths) if os.path.isfile(p)]
    if not found:
        message = "{} needs {} next to it (deploy bundles carry it)".format(__file__, paths[0])
        if __name__ == "__main__":  # run as a script: one line and exit 2, like any other missing piece
            sys.stderr.write("error: " + message + "\n")
            sys.exit(2)
        raise ImportError(message)
    spec = importlib.util.spec_from_file_location("vitdeploy_standalone_" + module.rsplit(".", 1)[-1], found[0])
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


_engine_tools = _import_standalone("vitdeploy.trt.build_engine", "build_engine.py")  # the device-side basics
#: Timing, statistics, rows and tables: vitdeploy's one measurement module (``bench`` uses it too).
core = _import_standalone("vitdeploy.measure.core", "measure_core.py", os.path.join(os.pardir, "measure", "core.py"))
UsageError = _engine_tools.UsageError  # a problem with the arguments, files or machine, in one line (exit 2)
_warn = _engine_tools.warn

__all__ = [
    "REPORT_SCHEMA",
    "ENGINE_PATTERNS",
    "UsageError",
    "BenchmarkFailed",
    "discover",
    "parse_tegrastats",
    "summarize_tegrastats",
    "TegrastatsSampler",
    "parse_l4t_release",
    "jetpack_for_l4t",
    "make_report",
    "format_table",
    "format_tegrastats_table",
    "prepare_eval_inputs",
    "build_arg_parser",
    "parse_args",
    "main",
]

#: Identifies the layout of benchmark.json.
REPORT_SCHEMA = "vitdeploy.bench/1"

#: What a bundle folder contributes: every engine in it (build_engine.py writes ``model.engine``,
#: ``model.dla.engine`` and, for the side-by-side table, ``model.{fp32,fp16,int8}.engine``).
ENGINE_PATTERNS = ("*.engine",)

#: Labelled data looked for in a bundle folder.
EVAL_FILES = ("eval.npz",)

#: Default JSON output name, written into the bundle folder.
DEFAULT_JSON = "benchmark.json"

MB = core.MB
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class BenchmarkFailed(_engine_tools.BuildFailed):
    """An engine could not be loaded or run (exit 1)."""


def _note(message, quiet=False):
    if not quiet:
        sys.stderr.write(message + "\n")


# ---------------------------------------------------------------------------------------------
# Arguments and bundle discovery (pure: file names only, nothing is opened as an engine)
# ---------------------------------------------------------------------------------------------


def _dla_core_from_meta(meta):
    precision = (meta or {}).get("precision")
    if isinstance(precision, dict) and isinstance(precision.get("dla_core"), int):
        return precision["dla_core"]
    return None


def _label(entry):
    base = entry["precision"] or entry["file"]
    if entry["dla_core"] is not None:
        base += " DLA{}".format(entry["dla_core"])
    return base


def _assign_labels(entries):
    """Unique row labels: the precision; when two engines share one, the engine named for it
    (``model.int8.engine``) keeps it and the others become ``precision (file)``."""
    labels = [_label(e) for e in entries]
    for entry, label in zip(entries, labels):
        canonical = entry["file"] == "model.{}.engine".format(label)
        entry["label"] = label if labels.count(label) == 1 or canonical else "{} ({})".format(label, entry["file"])
    return entries


def discover(paths, data=None):
    """Engines and labelled data to benchmark, from bundle folders and/or engine files.

    Returns ``{"folder", "engines": [entry], "data": path or None}``; each entry is vitdeploy's
    artifact entry (`core.discover`: ``path``, ``file``, ``size_bytes``, ``meta``, ``precision`` from
    the name, else from ``<engine>.json``) plus ``precision_built``, ``dla_core`` and a unique
    ``label``. A folder contributes its engines and its ``eval.npz`` unless ``data`` is given.
    Nothing is loaded: the engines may be empty placeholder files here. UsageError when a path
    does not exist or holds no engine.
    """
    paths = list(paths) or ["."]
    engines, folders = core.discover(paths, ENGINE_PATTERNS, (".engine",), UsageError, empty=(
        "no engines in {folder} (looked for {patterns}): build them on this device with build_engine.py, "
        "see jetson/README.md"))
    for entry in engines:
        entry["precision_built"] = core.engine_precision(entry["meta"])
        entry["dla_core"] = _dla_core_from_meta(entry["meta"])
    folder = folders[0] if folders else os.path.dirname(os.path.abspath(engines[0]["path"]))
    found_data = next((os.path.join(f, n) for f in folders for n in EVAL_FILES if os.path.isfile(os.path.join(f, n))),
                      None)
    if data is not None:
        if not os.path.isfile(data):
            raise UsageError("--data not found: {}".format(data))
        found_data = data
    return {"folder": folder, "engines": _assign_labels(engines), "data": found_data}


# ---------------------------------------------------------------------------------------------
# tegrastats (pure parsing + a small sampler)
# ---------------------------------------------------------------------------------------------

_TIMESTAMP_RE = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_UNIT_MB = {"k": 1.0 / 1024, "K": 1.0 / 1024, "M": 1.0, "G": 1024.0}
_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)([kKMG])B(?:\s*\(lfb (\d+)x(\d+)([kKMG])B\))?")
_SWAP_RE = re.compile(r"\bSWAP (\d+)/(\d+)([kKMG])B(?:\s*\(cached (\d+)([kKMG])B\))?")
_CPU_RE = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE_RE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC_RE = re.compile(r"\bEMC_FREQ (?:(\d+)%)?(?:@(\d+))?")
_GR3D_RE = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@\[?([\d,]+)\]?)?")
# name@12.5C / tj@-256C; the name starts with a letter so CPU loads (2%@345) never match
_TEMP_RE = re.compile(r"(?<![\w.@])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
# VDD_GPU_SOC 1540mW/1540mW (JetPack 5+), VDD_SYS_GPU 153/158 (JetPack 4), GPU 463/463 (Xavier JP4)
_POWER_RE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
# everything else shaped "NAME value": APE 150, VIC_FREQ 115, NVENC 79%@166, NVDEC off, ...
_ENGINE_RE = re.compile(r"\b([A-Z][A-Z0-9_]*) (off|\d+%@\[?[\d,]+\]?|\d+%|@\[?[\d,]+\]?|\d+)(?=\s|$)")
_MTS_RE = re.compile(r"\bMTS fg (\d+)% bg (\d+)%")
_PARSED_NAMES = ("RAM", "SWAP", "IRAM", "CPU", "EMC_FREQ", "GR3D_FREQ", "MTS")
#: Memory fields look like rails (``RAM 2203/7851MB``) but carry a unit the rail pattern refuses;
#: "CPU" stays a possible rail: AGX Xavier on JetPack 4 prints ``CPU 618/618``.
_NOT_RAILS = ("RAM", "SWAP", "IRAM")
#: tegrastats prints -256C for a thermal zone without a reading (CV0@-256C on Orin).
_NO_READING_C = -256.0


def _mb(value, unit):
    return float(value) * _UNIT_MB.get(unit, 1.0)


def _int_list(text):
    return [int(v) for v in text.split(",") if v.strip().isdigit()]


def _parse_cpus(match):
    """``[2%@345,off,...]`` (or the old ``[2%,3%]@345``) -> per-core ``{load_pct, freq_mhz}``."""
    shared_freq = int(match.group(2)) if match.group(2) else None
    cores = []
    for item in match.group(1).split(","):
        item = item.strip()
        core = _CORE_RE.match(item)
        if core:
            freq = int(core.group(2)) if core.group(2) else shared_freq
            cores.append({"load_pct": int(core.group(1)), "freq_mhz": freq, "online": True})
        elif item:
            cores.append({"load_pct": None, "freq_mhz": None, "online": False})  # "off"
    return cores


def parse_tegrastats(line):
    """One line of ``tegrastats`` output as a dict; unknown fields never break it.

    Handles the Jetson generations' formats: TX2 / JetPack 4 (``RAM ... CPU [2%@345,off,...]
    EMC_FREQ 0% GR3D_FREQ 0% PLL@36C ... VDD_SYS_GPU 153/158``), Xavier (JetPack 4 rails without
    units, ``GPU 463/463``; JetPack 5 ``GR3D_FREQ 0%@[1377]`` and ``mW`` rails) and Orin /
    JetPack 6 (a timestamp first, ``GR3D_FREQ 0%@[305,305]``, ``tj@47.5C``,
    ``VDD_GPU_SOC 3171mW/3171mW``). Keys (None / empty when the line has no such field):

    * ``timestamp`` (``"11-23-2026 10:00:00"``), ``ram_used_mb``, ``ram_total_mb``,
      ``ram_lfb`` (``{"blocks", "block_mb"}``), ``swap_used_mb``, ``swap_total_mb``,
      ``swap_cached_mb``;
    * ``cpu``: ``[{"load_pct", "freq_mhz", "online"}]`` (offline cores: None, None, False) and
      ``cpu_loads``: the loads alone (None for offline cores);
    * ``emc_load_pct``, ``emc_freq_mhz``; ``gpu_load_pct``, ``gpu_freq_mhz`` (a list: one value
      per GPC on Orin);
    * ``temperatures_c``: ``{zone: degrees}`` (None where tegrastats prints -256C, no reading);
    * ``power_mw``: ``{rail: {"current", "average"}}`` (a rail name seen twice, such as Orin's
      ``NC``, gets ``#2``);
    * ``engines``: every other ``NAME value`` field as text (``APE``, ``VIC_FREQ``, ``NVENC``...);
    * ``mts``: ``{"fg_pct", "bg_pct"}`` where printed.
    """
    line = line.strip()
    out = {
        "timestamp": None, "ram_used_mb": None, "ram_total_mb": None, "ram_lfb": None,
        "swap_used_mb": None, "swap_total_mb": None, "swap_cached_mb": None,
        "cpu": [], "cpu_loads": [], "emc_load_pct": None, "emc_freq_mhz": None,
        "gpu_load_pct": None, "gpu_freq_mhz": [], "temperatures_c": {}, "power_mw": {},
        "engines": {}, "mts": None,
    }
    match = _TIMESTAMP_RE.match(line)
    if match:
        out["timestamp"] = match.group(1)
        line = line[match.end():]
    match = _RAM_RE.search(line)
    if match:
        out["ram_used_mb"] = _mb(match.group(1), match.group(3))
        out["ram_total_mb"] = _mb(match.group(2), match.group(3))
        if match.group(4):
            out["ram_lfb"] = {"blocks": int(match.group(4)), "block_mb": _mb(match.group(5), match.group(6))}
    match = _SWAP_RE.search(line)
    if match:
        out["swap_used_mb"] = _mb(match.group(1), match.group(3))
        out["swap_total_mb"] = _mb(match.group(2), match.group(3))
        if match.group(4):
            out["swap_cached_mb"] = _mb(match.group(4), match.group(5))
    match = _CPU_RE.search(line)
    if match:
        out["cpu"] = _parse_cpus(match)
        out["cpu_loads"] = [c["load_pct"] for c in out["cpu"]]
    match = _EMC_RE.search(line)
    if match:
        out["emc_load_pct"] = int(match.group(1)) if match.group(1) else None
        out["emc_freq_mhz"] = int(match.group(2)) if match.group(2) else None
    match = _GR3D_RE.search(line)
    if match:
        out["gpu_load_pct"] = int(match.group(1)) if match.group(1) else None
        out["gpu_freq_mhz"] = _int_list(match.group(2)) if match.group(2) else []
    match = _MTS_RE.search(line)
    if match:
        out["mts"] = {"fg_pct": int(match.group(1)), "bg_pct": int(match.group(2))}
    for name, value in _TEMP_RE.findall(line):
        degrees = float(value)
        out["temperatures_c"][name] = None if degrees <= _NO_READING_C else degrees
    for name, current, average in _POWER_RE.findall(line):
        if name in _NOT_RAILS:
            continue
        key, n = name, 2
        while key in out["power_mw"]:
            key = "{}#{}".format(name, n)
            n += 1
        out["power_mw"][key] = {"current": int(current), "average": int(average)}
    for name, value in _ENGINE_RE.findall(line):
        if name not in _PARSED_NAMES and name not in out["power_mw"]:
            out["engines"].setdefault(name, value)
    return out


def _median(values):
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return None
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def summarize_tegrastats(samples):
    """What a benchmark row needs from parsed tegrastats samples (pure).

    ``{"samples", "ram_used_mb_start", "ram_used_mb_max", "ram_used_mb_median", "ram_delta_mb",
    "ram_total_mb", "gpu_load_pct_median", "gpu_load_pct_max", "power_mw_mean": {rail: mean of
    the current readings}, "temperature_c_max": {zone: max}}``; None when there is no sample with
    a RAM figure.
    """
    samples = [s for s in samples if s and s.get("ram_used_mb") is not None]
    if not samples:
        return None
    ram = [s["ram_used_mb"] for s in samples]
    gpu = [s["gpu_load_pct"] for s in samples if s.get("gpu_load_pct") is not None]
    power, temps = {}, {}
    for sample in samples:
        for rail, reading in (sample.get("power_mw") or {}).items():
            power.setdefault(rail, []).append(reading["current"])
        for zone, degrees in (sample.get("temperatures_c") or {}).items():
            if degrees is not None:
                temps[zone] = max(degrees, temps.get(zone, degrees))
    return {
        "samples": len(samples),
        "ram_used_mb_start": ram[0],
        "ram_used_mb_max": max(ram),
        "ram_used_mb_median": _median(ram),
        "ram_delta_mb": max(ram) - ram[0],
        "ram_total_mb": samples[-1].get("ram_total_mb"),
        "gpu_load_pct_median": _median(gpu),
        "gpu_load_pct_max": max(gpu) if gpu else None,
        "power_mw_mean": {rail: sum(v) / float(len(v)) for rail, v in power.items()},
        "temperature_c_max": temps,
    }


class TegrastatsSampler(object):
    """Runs ``tegrastats --interval MS`` in the background and keeps the parsed lines.

    ``start()`` returns False (and the sampler stays empty) where there is no tegrastats, i.e.
    anywhere but a Jetson. ``stop()`` ends the process and returns `summarize_tegrastats`.
    tegrastats block-buffers its output into a pipe, so it is started under ``stdbuf -oL``
    when available, and `stop` waits briefly for a first sample.
    """

    def __init__(self, interval_ms=100, executable=None):
        self.interval_ms = int(interval_ms)
        self.executable = executable or shutil.which("tegrastats")
        self.samples = []
        self._proc = None
        self._thread = None
        self._lock = threading.Lock()

    @property
    def available(self):
        return bool(self.executable)

    def start(self):
        if not self.available:
            return False
        if not os.access(self.executable, os.X_OK):
            _warn("cannot run {}: no RAM figures".format(self.executable))
            return False
        command = [self.executable, "--interval", str(self.interval_ms)]
        stdbuf = shutil.which("stdbuf")
        if stdbuf:
            command = [stdbuf, "-oL"] + command
        try:
            self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          universal_newlines=True, bufsize=1)
        except OSError as exc:
            _warn("cannot start tegrastats ({}): no RAM figures".format(exc))
            self._proc = None
            return False
        self._thread = threading.Thread(target=self._read, name="tegrastats")
        self._thread.daemon = True
        self._thread.start()
        return True

    def _read(self):
        for line in self._proc.stdout:
            sample = parse_tegrastats(line)
            if sample["ram_used_mb"] is not None:
                with self._lock:
                    self.samples.append(sample)

    def stop(self, wait_for_sample_s=1.0):
        if self._proc is None:
            return None
        deadline = time.time() + wait_for_sample_s
        while not self.samples and time.time() < deadline and self._proc.poll() is None:
            time.sleep(0.02)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._proc = None
        with self._lock:
            return summarize_tegrastats(list(self.samples))


# ---------------------------------------------------------------------------------------------
# Jetson / L4T facts
# ---------------------------------------------------------------------------------------------

_L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")

#: L4T release -> JetPack release (NVIDIA's Jetson archive); unknown revisions get "<major>.x".
_JETPACK = {
    "32.4.3": "4.4", "32.4.4": "4.4.1", "32.5.0": "4.5", "32.5.1": "4.5.1", "32.5.2": "4.5.1",
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "32.7.6": "4.6.6",
    "34.1.0": "5.0 DP", "34.1.1": "5.0.1 DP", "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1",
    "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4", "35.6.1": "5.1.5",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}
_JETPACK_MAJOR = {"32": "4", "34": "5", "35": "5", "36": "6", "38": "7"}


def parse_l4t_release(text):
    """``/etc/nv_tegra_release`` -> ``"32.7.1"`` (None when the text is not an L4T release line)."""
    match = _L4T_RE.search(text or "")
    if not match:
        return None
    revision = match.group(2).split(".")
    while len(revision) < 2:
        revision.append("0")
    return "{}.{}".format(match.group(1), ".".join(revision[:2]))


def jetpack_for_l4t(l4t):
    """``"32.7.1"`` -> ``"4.6.1"``; ``"35.9.9"`` -> ``"5.x"``; None for an unknown major."""
    if not l4t:
        return None
    if l4t in _JETPACK:
        return _JETPACK[l4t]
    major = _JETPACK_MAJOR.get(l4t.split(".")[0])
    return major + ".x" if major else None


def _read_text(path):
    try:
        with open(path, "r") as f:
            return f.read()
    except (OSError, IOError, UnicodeDecodeError):
        return None


def jetson_facts(root="/"):
    """``{"model", "l4t", "jetpack", "power_mode"}`` on a Jetson, None elsewhere."""
    release = _read_text(os.path.join(root, "etc", "nv_tegra_release"))
    l4t = parse_l4t_release(release)
    if l4t is None:
        return None
    model = _read_text(os.path.join(root, "proc", "device-tree", "model"))
    facts = {"model": model.strip("\0\n ") if model else None, "l4t": l4t, "jetpack": jetpack_for_l4t(l4t),
             "power_mode": None}
    nvpmodel = shutil.which("nvpmodel")
    if nvpmodel and root == "/":
        try:
            text = subprocess.check_output([nvpmodel, "-q"], stderr=subprocess.STDOUT, universal_newlines=True,
                                           timeout=10)
            match = re.search(r"NV Power Mode:\s*(\S+)", text)
            facts["power_mode"] = match.group(1) if match else text.strip().splitlines()[0] if text.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return facts


# ---------------------------------------------------------------------------------------------
# Numbers and tables (pure)
# ---------------------------------------------------------------------------------------------


def make_report(device, trt_version, rows, **extra):
    """The benchmark.json record: ``device``, ``trt_version``, ``rows`` (relative columns
    recomputed) and any ``extra`` keys (``jetson``, ``engines``, ``data``, ``settings``)."""
    report = {"schema": REPORT_SCHEMA, "device": device, "trt_version": trt_version,
              "rows": core.add_ratios([dict(r, latency_ms=dict(r.get("latency_ms") or {})) for r in rows])}
    report.update(extra)
    return report


def _fmt(value, digits=2, suffix=""):
    return core.fmt(value, digits, suffix, core.missing_mark())


TABLE_HEADERS = ("precision", "batch", "top-1 %", "size (MB)", "latency median (ms)", "p90 (ms)", "p99 (ms)",
                 "throughput (img/s)", "memory (MB)", "speed-up", "size ratio")


def format_table(report):
    """The Markdown table of a report's rows (one per engine and batch size)."""
    body = []
    for row in report.get("rows", []):
        latency = row.get("latency_ms") or {}
        body.append([
            str(row.get("precision")).upper() if row.get("precision") in ("fp32", "fp16", "int8")
            else str(row.get("precision")),
            row.get("batch"), _fmt(row.get("top1")), _fmt(row.get("size_mb")),
            _fmt(latency.get("median"), 3), _fmt(latency.get("p90"), 3), _fmt(latency.get("p99"), 3),
            _fmt(row.get("throughput_ips"), 1), _fmt(row.get("memory_mb"), 1),
            _fmt(row.get("speedup_vs_fp32"), 2, "x"), _fmt(row.get("size_ratio_vs_fp32"), 2, "x"),
        ])
    return core.markdown_table(TABLE_HEADERS, body, core.missing_mark())


def _main_rail(power):
    """The board-input rail of a tegrastats power dict (VDD_IN, VIN_SYS_5V0, POM_5V_IN, SYS5V)."""
    for name in ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN", "SYS5V"):
        if name in power:
            return name
    return None


def format_tegrastats_table(report):
    """Per-engine tegrastats figures as a Markdown table, or "" when none were sampled."""
    body = []
    for engine in report.get("engines", []):
        stats = engine.get("tegrastats")
        if not stats:
            continue
        rail = _main_rail(stats.get("power_mw_mean") or {})
        body.append([engine.get("label"), stats.get("samples"), _fmt(stats.get("ram_used_mb_max"), 0),
                     _fmt(stats.get("ram_delta_mb"), 0), _fmt(stats.get("gpu_load_pct_median"), 0),
                     "{} {}".format(_fmt(stats["power_mw_mean"][rail], 0), rail) if rail else None])
    if not body:
        return ""
    return core.markdown_table(("engine", "samples", "RAM peak (MB)", "RAM rise (MB)", "GPU load median %",
                           "mean power (mW)"), body)


# ---------------------------------------------------------------------------------------------
# Labelled data
# ---------------------------------------------------------------------------------------------


def load_eval_data(path):
    """``x`` and ``y`` (None when absent) of an .npz, without pickles."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise UsageError("{} has no 'x' array (found {})".format(path, archive.files))
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except (OSError, IOError, ValueError) as exc:
        raise UsageError("cannot read {}: {}".format(path, exc))
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise UsageError("{}: 'y' must hold one label per image ({} images, y shape {})".format(
            path, len(x), list(y.shape)))
    return x, y


def prepare_eval_inputs(x, sample_shape, preprocessing=None):
    """Images for the engine: float N x C x H x W as given, or uint8 N x H x W x C normalized
    with the metadata's ``mean``/``std`` (``(x/255 - mean)/std``, as vitdeploy does). No resizing:
    UsageError when the size does not match the engine's input ``sample_shape`` (C, H, W)."""
    import numpy as np

    x = np.asarray(x)
    want = tuple(int(d) for d in sample_shape)
    if x.ndim == 4 and x.dtype == np.uint8:
        if tuple(x.shape[3:] + x.shape[1:3]) != want:
            raise UsageError("eval images are {} (N x H x W x C); the engine takes C x H x W {}: resize them on the "
                             "host first".format(list(x.shape), list(want)))
        if not preprocessing or "mean" not in preprocessing or "std" not in preprocessing:
            raise UsageError("eval images are uint8 pixels and the engine metadata has no preprocessing (mean/std): "
                             "save preprocessed float32 N x C x H x W as 'x' instead")
        mean = np.asarray(preprocessing["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(preprocessing["std"], np.float32).reshape(1, -1, 1, 1)
        return ((x.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)) - mean) / std
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or tuple(x.shape[1:]) != want:
        raise UsageError("eval images must be float32 N x C x H x W {} (or uint8 N x H x W x C), got {} {}".format(
            list(want), x.dtype, list(x.shape)))
    return x


# ---------------------------------------------------------------------------------------------
# Engines, through Polygraphy's TrtRunner; the reference, through its OnnxrtRunner
# ---------------------------------------------------------------------------------------------


def engine_runner(trt, pg, entry):
    """A Polygraphy TrtRunner for one engine file (on its DLA core when it was built for one)."""
    return pg.TrtRunner(_engine_tools.engine_loader(trt, pg, entry["path"], entry.get("dla_core")), name=entry["label"])


def batch_range(trt, runner):
    """``(name, sample shape, min batch, max batch)`` of the engine's one image input (profile 0)."""
    engine = runner.engine
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise BenchmarkFailed("{}: {} inputs; vitdeploy engines take one image batch".format(runner.name, len(inputs)))
    name = inputs[0]
    shape = [int(d) for d in engine.get_tensor_shape(name)]
    if shape[0] >= 0:
        return name, shape[1:], shape[0], shape[0]
    low, _opt, high = engine.get_tensor_profile_shape(name, 0)
    return name, shape[1:], int(low[0]), int(high[0])


def eval_batches(x, name, batch, low):
    """``{name: chunk}`` batches over ``x``; the last is padded up to the engine's smallest batch."""
    import numpy as np

    for begin in range(0, len(x), batch):
        chunk = np.ascontiguousarray(x[begin:begin + batch], dtype=np.float32)
        if len(chunk) < low:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - len(chunk), axis=0)])
        yield {name: chunk}


def ort_reference(onnx_path):
    """ONNX Runtime (CPU) with Q/DQ evaluated in float: the ONNX semantics TensorRT implements, not ONNX
    Runtime's integer kernels (host-dependent on x86). A Polygraphy OnnxrtRunner."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return OnnxrtRunner(lambda: ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"]),
                        name="onnxruntime (float Q/DQ)")


def compare_with_ort(runner, onnx_path, x, name, batch, low):
    """Engine vs ONNX Runtime on the same images, as ``polygraphy run --trt --onnxrt`` does: Polygraphy's
    Comparator runs both, and its default comparison (atol 1e-5, rtol 1e-5) says pass/fail per batch;
    ours adds what decides a classifier -- top-1 agreement -- and the largest logit difference."""
    import numpy as np
    from polygraphy.comparator import Comparator

    feeds = list(eval_batches(x, name, batch, low))
    results = Comparator.run([runner, ort_reference(onnx_path)], data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results)
    (_, ours), (_, theirs) = results
    agree = diff = 0.0
    for feed, a, b in zip(feeds, ours, theirs):
        used = min(len(x), len(feed[name]))
        la, lb = (np.asarray(next(iter(r.values())), np.float32).reshape(len(feed[name]), -1)[:used] for r in (a, b))
        agree += float((la.argmax(1) == lb.argmax(1)).sum())
        diff = max(diff, float(np.abs(la - lb).max()))
    return {"onnx": os.path.basename(onnx_path), "reference": "ONNX Runtime, Q/DQ in float", "images": len(x),
            "top1_agreement": 100.0 * agree / len(x), "max_abs_diff": diff,
            "polygraphy_pass_rate": 100.0 * accuracy.percentage() if accuracy else None}


def evaluate_top1(runner, x, y, name, batch, low):
    import numpy as np

    correct = 0
    for begin, feed in zip(range(0, len(x), batch), eval_batches(x, name, batch, low)):
        size = min(batch, len(x) - begin)
        logits = np.asarray(next(iter(runner.infer(feed).values()))).reshape(len(feed[name]), -1)[:size]
        correct += int((logits.argmax(axis=1) == np.asarray(y[begin:begin + size])).sum())
    return 100.0 * correct / len(x)


def bench_engine(trt, pg, entry, batches, warmup, runs, data=None, sampler=None, quiet=False, folder=None):
    """Measure one engine; returns ``(rows, details)``. See the module docstring for what."""
    import numpy as np

    free_before = _engine_tools.cuda_free_bytes()
    sampling = sampler.start() if sampler is not None else False
    try:
        with engine_runner(trt, pg, entry) as runner:
            name, sample, low, high = batch_range(trt, runner)
            fits = [b for b in batches if low <= b <= high]
            skipped = [b for b in batches if b not in fits]
            if skipped:
                _warn("{}: batch {} skipped: {}".format(entry["file"], ",".join(map(str, skipped)),
                                                       "the engine has a static batch of {}".format(low) if low == high
                                                       else "outside the engine's profile {}-{}".format(low, high)))
            timings, free = {}, [f for f in [_engine_tools.cuda_free_bytes()] if f is not None]
            for batch in fits:
                feed = {name: np.random.default_rng(0).standard_normal([batch] + sample).astype(np.float32)}
                timings[batch] = times = core.time_runner(runner, feed, warmup, runs)
                free += [f for f in [_engine_tools.cuda_free_bytes()] if f is not None]
                _note("  {} batch {}: median {:.3f} ms".format(entry["label"], batch, core.latency_stats(times)["median"]),
                      quiet)
            top1 = comparison = None
            size = max(fits) if fits else high
            if data is not None:
                x = prepare_eval_inputs(data[0], sample, (entry.get("meta") or {}).get("preprocessing"))
                if data[1] is not None:
                    top1 = evaluate_top1(runner, x, data[1], name, size, low)
                onnx = (entry.get("meta") or {}).get("onnx")
                reference = os.path.join(folder or os.path.dirname(entry["path"]), onnx) if onnx else None
                if reference and os.path.isfile(reference):
                    comparison = compare_with_ort(runner, reference, x, name, size, low)
                    _note("  {} vs {}: top-1 agreement {:.2f} %".format(entry["label"], onnx,
                                                                      comparison["top1_agreement"]), quiet)
            device_memory = getattr(runner.engine, "device_memory_size_v2", None) or getattr(
                runner.engine, "device_memory_size", None)
    except (RuntimeError, OSError) as exc:  # Polygraphy's critical errors are PolygraphyException(RuntimeError)
        raise BenchmarkFailed("{}: {}".format(entry["file"], str(exc).strip().splitlines()[-1] if str(exc).strip()
                                              else type(exc).__name__))
    finally:
        stats = sampler.stop() if sampling else None
    memory = max(0, free_before - min(free)) / MB if free_before is not None and free else None
    rows = [core.make_row(entry["label"], b, entry["size_bytes"] / MB, timings[b], top1=top1, memory_mb=memory)
            for b in fits]
    details = {
        "label": entry["label"], "file": entry["file"], "precision_built": entry.get("precision_built"),
        "size_bytes": entry["size_bytes"], "device_memory_mb": device_memory / MB if device_memory else None,
        "memory_delta_mb": memory, "top1": top1, "versus_onnxruntime": comparison, "skipped_batches": skipped,
        "tegrastats": stats, "engine_trt_version": (entry.get("meta") or {}).get("tensorrt_version"),
    }
    return rows, details


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_arg_parser():
    """The CLI (no TensorRT, NumPy or CUDA needed to build it, so ``--help`` always works)."""
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Benchmark the TensorRT engines of a deploy bundle side by side (model.fp32/fp16/int8.engine "
                    "and model.engine): latency, throughput, top-1, size and memory, as a Markdown table and "
                    "JSON. Builds nothing: build the engines with build_engine.py first.")
    p.add_argument("paths", nargs="*", default=["."], metavar="BUNDLE_OR_ENGINE",
                   help="bundle folder(s) and/or .engine files (default: the current folder)")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma separated (default 1,8)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs per engine and batch (default 20)")
    p.add_argument("--runs", type=int, default=200, help="timed runs per engine and batch (default 200)")
    p.add_argument("--data", help="labelled .npz (x: float32 N x C x H x W preprocessed, y: labels) for top-1; "
                                  "default: the bundle's eval.npz when present")
    p.add_argument("--limit", type=int, help="evaluate top-1 on the first N images only")
    p.add_argument("--json", dest="json_out", metavar="FILE",
                   help="where to write the JSON report (default: benchmark.json in the bundle; '-' for stdout "
                        "instead of the table)")
    p.add_argument("--no-tegrastats", action="store_true", help="do not sample tegrastats (Jetson RAM, power)")
    p.add_argument("--tegrastats-interval", type=int, default=100, metavar="MS",
                   help="tegrastats sampling interval in ms (default 100)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def parse_args(argv=None):
    args = build_arg_parser().parse_args(argv)
    if args.warmup < 0 or args.runs < 1:
        raise UsageError("--warmup must be >= 0 and --runs >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.tegrastats_interval < 1:
        raise UsageError("--tegrastats-interval must be >= 1 ms")
    return args


def run(args):
    """Discover, measure, report; returns the report dict (raises UsageError / BenchmarkFailed)."""
    batches = core.parse_batches(args.batch, UsageError)
    found = discover(args.paths, args.data)
    trt, pg = _engine_tools.import_backend()
    data = None
    if found["data"]:
        data = load_eval_data(found["data"])
        if args.limit:
            data = (data[0][:args.limit], None if data[1] is None else data[1][:args.limit])
        if data[1] is None:
            _warn("{} has no labels ('y'): no top-1".format(found["data"]))
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if args.verbose else G_LOGGER.WARNING  # stdout is the table
    gpu = _engine_tools.cuda_device()
    jetson = jetson_facts()
    cc = gpu["compute_capability"]
    device = (gpu["name"] or "unknown GPU") + (" (sm_{}{})".format(*cc) if cc else "")
    if jetson and jetson.get("model"):
        device = "{} / {}".format(jetson["model"], device)
    rows, engines = [], []
    for entry in found["engines"]:
        _note("{} ({}, {:.1f} MB)".format(entry["label"], entry["file"], entry["size_bytes"] / MB), args.quiet)
        sampler = None if args.no_tegrastats else TegrastatsSampler(args.tegrastats_interval)
        try:
            engine_rows, details = bench_engine(trt, pg, entry, batches, args.warmup, args.runs, data, sampler,
                                                args.quiet, found["folder"])
        except BenchmarkFailed as exc:
            # One stale engine (built by another TensorRT or GPU) must not hide the others' numbers.
            sys.stderr.write("error: {}\n".format(exc))
            engines.append({"label": entry["label"], "file": entry["file"], "error": str(exc)})
            continue
        rows.extend(engine_rows)
        engines.append(details)
    return make_report(device, trt.__version__, rows, jetson=jetson, engines=engines,
                       data={"file": found["data"], "images": len(data[0]) if data else None},
                       settings={"batches": batches, "warmup": args.warmup, "runs": args.runs,
                                 "timing": "Polygraphy TrtRunner.infer: host->device copy, execution, "
                                           "device->host copy, synchronised"})


def main(argv=None):
    """CLI entry point; returns the exit code (0 measured, 1 an engine failed, 2 usage/machine)."""
    try:
        args = parse_args(argv)
        report = run(args)
    except (UsageError, BenchmarkFailed) as exc:
        return _engine_tools.report_error(exc)
    failed = [e for e in report["engines"] if e.get("error")]
    code = EXIT_FAILED if failed else EXIT_OK
    text = json.dumps(report, indent=2) + "\n"
    if args.json_out == "-":
        sys.stdout.write(text)
        return code
    out = args.json_out or os.path.join(report_folder(args), DEFAULT_JSON)
    _engine_tools.write_atomic(out, text)
    print(format_table(report))
    extra = format_tegrastats_table(report)
    if extra:
        print("\n" + extra)
    print("\n{} with TensorRT {}; JSON in {}".format(report["device"], report["trt_version"], out))
    if failed:
        print("not measured (see the errors above): " + ", ".join(e["file"] for e in failed))
    return code


def report_folder(args):
    """Where the default benchmark.json goes: the first folder argument, else the first engine's folder."""
    for path in args.paths:
        if os.path.isdir(path):
            return path
    return os.path.dirname(os.path.abspath(args.paths[0]))


if __name__ == "__main__":
    sys.exit(main())
