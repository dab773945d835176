"""``vitdeploy bench``: precision inference, row assembly and ratios, table / JSON / PNG, and real runs
of the command on a tiny cpu build (engines are skipped with one line where TensorRT is absent)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.cli import main
from vitdeploy.errors import InputError
from vitdeploy.measure import bench
from vitdeploy.measure.core import add_ratios
from vitdeploy.measure.bench import (Artifact, Measurement, assemble_rows, bench_json, discover,
                                     infer_precision, markdown_table, parse_batches, plot_latency,
                                     precision_from_name, precision_from_onnx)

JSON_ROW_KEYS = {"artifact", "backend", "precision", "batch", "top1", "size_mb", "latency_ms", "throughput_ips",
                 "memory_mb", "speedup_vs_fp32", "size_ratio_vs_fp32"}


# --------------------------------------------------------------------------------------------- helpers

def _tiny_graph(kind: str) -> onnx.ModelProto:
    """y = x·W as fp32, fp16 (FP16 weights, Cast) or int8 (Q/DQ) ONNX."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    if kind == "fp32":
        nodes, inits = [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")]
    elif kind == "fp16":
        nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(w.astype(np.float16), "w16")]
    else:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("MatMul", ["xd", "w"], ["y"])]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.int8), "z")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _artifact(name: str, precision: str, size_mb: float, backend: str = "onnxruntime") -> Artifact:
    return Artifact(path=Path("/b") / name, backend=backend, precision=precision, size_bytes=int(size_mb * 1e6),
                    label=name)


def _measurement(name, precision, size_mb, batch, median, backend="onnxruntime", memory=100.0, top1=None):
    times = [median * f for f in (0.9, 1.0, 1.0, 1.1, 1.0)]
    return Measurement(_artifact(name, precision, size_mb, backend), batch, times, memory_mb=memory, top1=top1)


# --------------------------------------------------------------------------------------------- pure functions

def test_parse_batches():
    assert parse_batches("1") == [1]
    assert parse_batches("8, 1,8") == [1, 8]
    for bad in ("", "0", "1,x", "-2"):
        with pytest.raises(InputError):
            parse_batches(bad)


@pytest.mark.parametrize("name, precision", [
    ("model.fp32.onnx", "fp32"), ("model.int8.onnx", "int8"), ("model.fp16.onnx", "fp16"),
    ("model.int8.engine", "int8"), ("vit_fp16.engine", "fp16"), ("model.int8-ort.onnx", "int8"),
    ("model.onnx", None), ("model.engine", None), ("fp320.onnx", None)])
def test_precision_from_name(name, precision):
    assert precision_from_name(name) == precision


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_precision_from_graph(kind, tmp_path):
    model = _tiny_graph(kind)
    assert precision_from_onnx(model) == kind
    path = tmp_path / "model.onnx"            # no precision in the name: the graph decides
    onnx.save(model, str(path))
    assert infer_precision(path) == kind
    named = tmp_path / "model.fp32.onnx"      # the name wins
    onnx.save(model, str(named))
    assert infer_precision(named) == "fp32"


def test_engine_precision_from_metadata(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    assert infer_precision(engine) == "fp32"  # nothing to go on
    (tmp_path / "model.engine.json").write_text(json.dumps({"precision": {"built": "fp16"}}))
    assert infer_precision(engine) == "fp16"


def test_rows_ratios_against_fp32_of_same_backend_and_batch():
    rows = assemble_rows([
        _measurement("model.fp32.onnx", "fp32", 4.0, 1, 10.0),
        _measurement("model.int8.onnx", "int8", 1.0, 1, 4.0, top1=51.5),
        _measurement("model.fp32.onnx", "fp32", 4.0, 8, 40.0),
        _measurement("model.int8.onnx", "int8", 1.0, 8, 20.0),
        _measurement("model.int8.engine", "int8", 2.0, 1, 1.0, backend="tensorrt"),  # no TensorRT FP32 row
    ])
    by = {(r["artifact"], r["batch"]): r for r in rows}
    fp32_1, int8_1 = by[("/b/model.fp32.onnx", 1)], by[("/b/model.int8.onnx", 1)]
    assert fp32_1["speedup_vs_fp32"] == pytest.approx(1.0) and fp32_1["size_ratio_vs_fp32"] == pytest.approx(1.0)
    assert int8_1["speedup_vs_fp32"] == pytest.approx(2.5) and int8_1["size_ratio_vs_fp32"] == pytest.approx(4.0)
    assert by[("/b/model.int8.onnx", 8)]["speedup_vs_fp32"] == pytest.approx(2.0)
    engine = by[("/b/model.int8.engine", 1)]
    assert engine["speedup_vs_fp32"] is None and engine["size_ratio_vs_fp32"] is None
    assert int8_1["latency_ms"]["median"] == pytest.approx(4.0)
    assert int8_1["latency_ms"]["p90"] >= int8_1["latency_ms"]["median"]
    assert int8_1["latency_ms"]["p99"] >= int8_1["latency_ms"]["p90"]
    assert int8_1["throughput_ips"] == pytest.approx(250.0)
    assert by[("/b/model.int8.onnx", 8)]["throughput_ips"] == pytest.approx(400.0)
    assert int8_1["top1"] == 51.5 and int8_1["memory_mb"] == 100.0


def test_first_fp32_row_is_the_reference():
    rows = [{"precision": "fp32", "backend": "onnxruntime", "batch": 1, "size_mb": 2.0, "latency_ms": {"median": 6.0}},
            {"precision": "fp32", "backend": "onnxruntime", "batch": 1, "size_mb": 3.0, "latency_ms": {"median": 3.0}}]
    add_ratios(rows)
    assert rows[1]["speedup_vs_fp32"] == pytest.approx(2.0) and rows[1]["size_ratio_vs_fp32"] == pytest.approx(2 / 3)


def test_markdown_table_and_json():
    rows = assemble_rows([_measurement("model.fp32.onnx", "fp32", 4.0, 1, 10.0),
                          _measurement("model.int8.onnx", "int8", 1.0, 1, 4.0)])
    text = markdown_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| artifact") and set(lines[1]) <= set("|-:")
    for header in ("top-1 %", "size (MB)", "median (ms)", "p90 (ms)", "p99 (ms)", "throughput (img/s)",
                   "memory (MB)", "speed-up", "size ratio"):
        assert header in lines[0]
    assert "INT8" in lines[3] and "2.50x" in lines[3] and "4.00x" in lines[3] and "—" in lines[3]  # no top-1
    obj = json.loads(json.dumps(bench_json(rows, threads=2, device="CPU test")))
    assert obj["threads"] == 2 and obj["device"] == "CPU test"
    assert [set(r) for r in obj["rows"]] == [JSON_ROW_KEYS] * 2
    assert set(obj["rows"][1]["latency_ms"]) == {"median", "p90", "p99"}
    assert obj["rows"][1]["speedup_vs_fp32"] == pytest.approx(2.5)


def test_png_written(tmp_path):
    rows = assemble_rows([_measurement("model.fp32.onnx", "fp32", 4.0, b, 10.0 * b) for b in (1, 8)] +
                         [_measurement("model.int8.onnx", "int8", 1.0, b, 4.0 * b) for b in (1, 8)])
    path = plot_latency(rows, tmp_path / "sub" / "chart.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_discover_folder_files_and_errors(tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    onnx.save(_tiny_graph("int8"), str(folder / "model.int8.onnx"))
    onnx.save(_tiny_graph("fp32"), str(folder / "model.fp32.onnx"))
    (folder / "build.json").write_text("{}")
    artifacts, folders = discover([folder])
    assert [a.path.name for a in artifacts] == ["model.fp32.onnx", "model.int8.onnx"]  # FP32 first
    assert [a.precision for a in artifacts] == ["fp32", "int8"] and folders == [folder]
    assert all(a.size_bytes == a.path.stat().st_size for a in artifacts)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "model.fp32.onnx", other / "model.fp32.onnx")
    labels = [a.name for a in discover([folder / "model.fp32.onnx", other / "model.fp32.onnx"])[0]]
    assert labels == ["build/model.fp32.onnx", "other/model.fp32.onnx"]  # same names told apart
    with pytest.raises(InputError, match="not found"):
        discover([tmp_path / "missing.onnx"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no model"):
        discover([empty])
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(InputError, match="expected .onnx / .engine"):
        discover([tmp_path / "weights.pt"])


# --------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def cpu_build(tiny_vit, calib_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    assert main(["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--calib-size", "16", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def labelled_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "labelled.npz"
    rng = np.random.default_rng(3)
    np.savez(path, x=rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 5, size=20))
    return path


def test_bench_build_folder(cpu_build, labelled_npz, capsys):
    rc = main(["bench", str(cpu_build), "--runs", "5", "--warmup", "2", "--threads", "1", "--batch", "1,2",
               "--data", str(labelled_npz), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4                          # header, separator, {fp32, int8} × {1, 2}
    assert "FP32" in table[2] and "INT8" in table[3] and "1.00x" in table[2]
    png = cpu_build / "bench.png"                       # default chart inside the build folder
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert f"chart: {png}" in out


def test_bench_json(cpu_build, labelled_npz, capsys, tmp_path):
    png = tmp_path / "chart.png"
    rc = main(["bench", str(cpu_build / "model.fp32.onnx"), str(cpu_build / "model.int8.onnx"), "--runs", "5",
               "--warmup", "1", "--threads", "1", "--json", "--png", str(png), "--data", str(labelled_npz), "--quiet"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["threads"] == 1 and "CPU" in obj["device"] and obj["skipped"] == []
    assert [r["precision"] for r in obj["rows"]] == ["fp32", "int8"]
    for row in obj["rows"]:
        assert JSON_ROW_KEYS <= set(row)
        assert row["backend"] == "onnxruntime" and row["batch"] == 1
        assert 0 < row["latency_ms"]["median"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert row["throughput_ips"] == pytest.approx(1e3 / row["latency_ms"]["median"])
        # peak RSS of the model's own process: not this (torch-laden) process's, which Linux's
        # ru_maxrss would carry over into a spawned child
        assert 20 < row["memory_mb"] < 250 < bench._peak_rss_mb()
        assert 0 <= row["top1"] <= 100
    fp32, int8 = obj["rows"]
    assert fp32["speedup_vs_fp32"] == pytest.approx(1.0)
    assert int8["size_ratio_vs_fp32"] == pytest.approx(fp32["size_mb"] / int8["size_mb"])
    assert int8["size_ratio_vs_fp32"] > 1
    assert png.is_file()


@pytest.mark.skipif(bench.tensorrt_available(), reason="TensorRT is installed: engines would run")
def test_engines_skipped_without_tensorrt(cpu_build, tmp_path, capsys):
    folder = tmp_path / "with_engine"
    shutil.copytree(cpu_build, folder)
    (folder / "model.int8.engine").write_bytes(b"not really an engine")
    rc = main(["bench", str(folder), "--runs", "2", "--warmup", "0", "--threads", "1", "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0
    skip_lines = [line for line in captured.err.splitlines() if "model.int8.engine" in line]
    assert len(skip_lines) == 1 and "TensorRT is not installed" in skip_lines[0] and "Traceback" not in captured.err
    obj = json.loads(captured.out)
    assert {r["backend"] for r in obj["rows"]} == {"onnxruntime"} and len(obj["skipped"]) == 1
    rc = main(["bench", str(folder / "model.int8.engine"), "--quiet"])   # only an engine: a skip, not a crash
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == "" and len(captured.err.splitlines()) == 1


def test_bench_errors_are_one_line(tmp_path, capsys, cpu_build):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitdeploy: error:") and len(err.splitlines()) == 1
    assert main(["bench", str(cpu_build), "--batch", "one"]) == 2
    assert "--batch" in capsys.readouterr().err
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(cpu_build / "model.fp32.onnx", lonely)
    assert main(["bench", str(lonely), "--data", str(tmp_path / "x.npz")]) == 2   # data missing
    assert "not found" in capsys.readouterr().err
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((2, 16, 16, 3), np.uint8), y=np.zeros(2, np.int64))
    assert main(["bench", str(lonely), "--data", str(data)]) == 2                 # no build.json: no preprocessing
    assert "build.json" in capsys.readouterr().err
