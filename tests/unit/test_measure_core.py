"""vitdeploy/measure/core.py: the one measurement module of `bench`, the demo, reports and the device benchmark."""
from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch

from vitdeploy.backends.ort import OrtRunner
from vitdeploy.backends.torch_runner import TorchRunner
from vitdeploy.errors import InputError
from vitdeploy.measure import core

# The tiny test graphs come from the TorchScript exporter (what vitdeploy uses), which torch marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_parse_batches_raises_the_callers_error():
    assert core.parse_batches("8,1, 8") == [1, 8]
    for bad in ("0", "a", "", "1,-2", "1.5", ","):
        with pytest.raises(InputError, match="positive integers"):
            core.parse_batches(bad, InputError)


def test_latency_stats_are_numpys_percentiles():
    times = list(np.random.default_rng(1).gamma(4.0, 0.5, size=201))
    stats = core.latency_stats(times)
    assert stats == pytest.approx({"median": np.median(times), "p90": np.percentile(times, 90),
                                   "p99": np.percentile(times, 99)})
    with pytest.raises(ValueError):
        core.latency_stats([])


def test_rows_and_ratios_per_backend_and_batch():
    rows = core.add_ratios([
        core.make_row("fp32", 1, 12.0, [4.0], backend="onnxruntime"),
        core.make_row("int8", 1, 3.0, [2.0], backend="onnxruntime"),
        core.make_row("int8", 1, 3.0, [1.0], backend="tensorrt"),   # no TensorRT FP32 row: no ratio
        core.make_row("int8", 8, 3.0, [8.0], backend="onnxruntime"),  # no FP32 row at batch 8
    ])
    assert rows[1]["throughput_ips"] == pytest.approx(500.0)
    assert [r["speedup_vs_fp32"] for r in rows] == [1.0, 2.0, None, None]
    assert [r["size_ratio_vs_fp32"] for r in rows] == [1.0, 4.0, None, None]


def test_markdown_table_layout_and_escaping():
    text = core.markdown_table(["model", "max |Δlogit|", "top-1 %"], [["a|b", 0.05, None], ["c", 12, 81.234]])
    lines = text.splitlines()
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 4 for line in lines)  # "|" in cells escaped
    assert "max \\|Δlogit\\|" in text and "a\\|b" in text
    assert re.match(r"^\|-+\|-+:\|-+:\|$", lines[1]) and len({len(line) for line in lines}) == 1
    assert [c.strip() for c in re.split(r"(?<!\\)\|", lines[2])[1:-1]] == ["a\\|b", "0.05", "—"]
    assert "| c  " in lines[3] and lines[3].rstrip().endswith("81.23 |")
    assert core.markdown_table(["x"], [[None]], missing="-").splitlines()[2] == "| - |"


class _Ascii:
    encoding = "ascii"


def test_missing_mark_follows_the_stream_encoding():
    assert core.missing_mark(_Ascii()) == "-"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "tiny.onnx"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    torch.onnx.export(model, torch.zeros(2, 3, 2, 2), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return model, path


def test_runners_time_and_agree(tiny_onnx):
    """OrtRunner and TorchRunner are Polygraphy runners: the same input metadata, feed, timing and outputs."""
    model, path = tiny_onnx
    with OrtRunner(path) as ort, TorchRunner(model, "input", "logits", (3, 2, 2)) as ref:
        for runner in (ort, ref):
            assert core.image_input(runner) == ("input", (None, 3, 2, 2), np.dtype(np.float32))
            times = core.time_runner(runner, core.random_feed(runner, 4), warmup=1, runs=3)
            assert len(times) == 3 and all(t > 0 for t in times)
        feed = core.random_feed(ort, 4, seed=3)
        np.testing.assert_allclose(ort.infer(feed)["logits"], ref.infer(feed)["logits"], rtol=1e-5, atol=1e-6)


def test_random_feed_refuses_what_it_cannot_time(tiny_onnx, tmp_path):
    model, _ = tiny_onnx
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, torch.zeros(2, 3, 2, 2), path, input_names=["input"], output_names=["logits"],
                      dynamo=False)
    with OrtRunner(path) as runner, pytest.raises(ValueError, match="fixed batch of 2"):
        core.random_feed(runner, 4)


def test_batch_one_file_runs_any_batch(tiny_onnx, tmp_path):
    """A file exported for batch 1 (a model that would not export batch-dynamic) runs image by image."""
    model, _ = tiny_onnx
    path = tmp_path / "one.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 2, 2), path, input_names=["input"], output_names=["logits"],
                      dynamo=False)
    x = np.random.default_rng(0).standard_normal((5, 3, 2, 2)).astype(np.float32)
    with OrtRunner(path) as runner:
        assert core.image_input(runner)[1][0] is None
        got = runner.infer({"input": x})["logits"]
        assert runner.last_inference_time() > 0
    np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_core_is_standalone_python38():
    """The bundle carries it to the device: standard library (numpy, polygraphy lazily), Python 3.8 syntax."""
    source = open(core.__file__).read()
    tree = ast.parse(source, feature_version=(3, 8))
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"glob", "json", "os", "re", "sys"} and not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def test_discover_orders_by_precision_and_names_each_file_once(tmp_path):
    """One discovery for `bench` (build folders) and the device benchmark (bundles)."""
    for name in ("model.int8.engine", "model.engine", "model.fp32.engine", "model.fp16.onnx", "notes.txt"):
        (tmp_path / name).write_bytes(b"\0" * 3)
    (tmp_path / "model.engine.json").write_text('{"precision": {"built": "fp16"}}')
    entries, folders = core.discover([tmp_path, tmp_path / "model.int8.engine"], ("*.engine",), (".engine",))
    assert [e["file"] for e in entries] == ["model.fp32.engine", "model.engine", "model.int8.engine"]
    assert [e["precision"] for e in entries] == ["fp32", "fp16", "int8"] and folders == [str(tmp_path)]
    assert entries[1]["meta"] == {"precision": {"built": "fp16"}} and entries[0]["size_bytes"] == 3
    with pytest.raises(InputError, match="expected .engine"):
        core.discover([tmp_path / "notes.txt"], ("*.engine",), (".engine",), InputError)
    with pytest.raises(InputError, match="holds none of"):
        core.discover([tmp_path], ("*.plan",), (".plan",), InputError)
    with pytest.raises(InputError, match="not found"):
        core.discover([tmp_path / "missing"], ("*.engine",), (".engine",), InputError)
