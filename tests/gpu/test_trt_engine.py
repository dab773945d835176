"""Real TensorRT: the whole device path on a tiny model -- build (explicit Q/DQ, FP32, strongly typed,
implicit entropy calibration), run, compare with ONNX Runtime, benchmark.

Needs TensorRT, Polygraphy and a CUDA GPU; skipped, with the reason, anywhere else (CI and the
development machines have none). On the device: ``pytest -m trt tests/gpu``.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.trt

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed: engines are built and run on the device")

from vitdeploy.backends.ort import OrtRunner  # noqa: E402
from vitdeploy.measure.core import image_input  # noqa: E402
from vitdeploy.errors import BuildError  # noqa: E402
from vitdeploy.runtime import TrtRunner, check_engine_compatible, load_engine_metadata  # noqa: E402
from vitdeploy.trt import benchmark as bench  # noqa: E402
from vitdeploy.trt import build_engine as be  # noqa: E402

SHAPE, CLASSES, MAX_BATCH = (1, 4, 4), 8, 8
FEATURES = int(np.prod(SHAPE))


@pytest.fixture(scope="module")
def gpu():
    device = be.cuda_device()
    if device["compute_capability"] is None:
        pytest.skip("no CUDA device visible to libcudart")
    return device


def _qdq(tensor, tag, scale, nodes, inits):
    """QuantizeLinear -> DequantizeLinear, symmetric INT8 as TensorRT requires."""
    inits += [numpy_helper.from_array(np.asarray(scale, np.float32), f"{tag}_scale"),
              numpy_helper.from_array(np.asarray(0, np.int8), f"{tag}_zp")]
    nodes += [helper.make_node("QuantizeLinear", [tensor, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"]),
              helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"])]
    return f"{tag}_dq"


def _model(folder, name, qdq):
    """``logits = flatten(image) @ W`` with a dynamic batch, with or without Q/DQ on both operands."""
    weight = np.random.default_rng(0).uniform(-1, 1, size=(FEATURES, CLASSES)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1)]
    inits = [numpy_helper.from_array(weight, "W")]
    x, w = ("flat", "W") if not qdq else (_qdq("flat", "act", 2.0 / 127, nodes, inits),
                                          _qdq("W", "weight", 1.0 / 127, nodes, inits))
    nodes.append(helper.make_node("MatMul", [x, w], ["logits"], name="/head/MatMul"))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def bundle(tmp_path):
    """A bundle-like folder: both ONNX files, calib.npy and a labelled eval.npz."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "calib.npy", rng.uniform(-1, 1, size=(64, *SHAPE)).astype(np.float32))
    x = rng.uniform(-1, 1, size=(40, *SHAPE)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=rng.integers(0, CLASSES, size=40))
    return {"folder": tmp_path, "int8": _model(tmp_path, "model.int8", True),
            "fp32": _model(tmp_path, "model.fp32", False)}


def _build(onnx_path, engine, *extra):
    code = be.main([str(onnx_path), "--out", str(engine), "--min-batch", "1", "--opt-batch", "2",
                    "--max-batch", str(MAX_BATCH), *extra])
    assert code == 0
    return load_engine_metadata(str(engine) + ".json")


def _modes():
    caps = be.detect_api(trt)
    modes = [] if caps["strongly_typed_only"] else [("int8", "int8", ["--precision", "int8"]),
                                                     ("fp32", "fp32", ["--precision", "fp32"])]
    if caps["strongly_typed_available"]:
        modes.append(("strongly-typed", "int8", ["--strongly-typed"]))
    return modes


@pytest.mark.parametrize("precision, onnx_kind, extra", _modes(), ids=[m[0] for m in _modes()])
def test_build_run_and_match_onnxruntime(gpu, bundle, precision, onnx_kind, extra):
    engine = bundle["folder"] / "model.engine"
    meta = _build(bundle[onnx_kind], engine, *extra)
    assert meta["precision"]["built"] in (precision, "fp16")  # fp16: a GPU without fast INT8
    assert meta["batch_profile"] == {"min": 1, "opt": 2, "max": MAX_BATCH}
    assert [t["name"] for t in meta["inputs"]] == ["input"] and meta["outputs"][0]["shape"] == [-1, CLASSES]
    assert meta["device"] == gpu and check_engine_compatible(meta, gpu["name"], gpu["compute_capability"],
                                                             trt.__version__).ok
    rng = np.random.default_rng(2)
    with TrtRunner(engine) as runner, OrtRunner(bundle[onnx_kind], qdq="float") as reference:
        assert image_input(runner)[1] == (None, *SHAPE)
        for batch in (1, 5, MAX_BATCH):
            x = rng.uniform(-1, 1, size=(batch, *SHAPE)).astype(np.float32)
            got, want = runner.infer({"input": x})["logits"], reference.infer({"input": x})["logits"]
            assert got.shape == (batch, CLASSES) and runner.last_inference_time() > 0
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)  # INT8 GEMM / TF32 vs float Q/DQ


def test_implicit_entropy_calibration_runs_and_reuses_only_when_asked(gpu, bundle):
    caps = be.detect_api(trt)
    if not caps["implicit_int8"]:
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8")
    folder, cache = bundle["folder"], bundle["folder"] / "entropy.cache"
    cache.write_bytes(b"TRT-0-EntropyCalibration2\nflat: 3c000000\n")  # stale ranges that must NOT be used
    entropy = ["--trt-calibrator", "entropy", "--calib", str(folder / "calib.npy"), "--calib-cache", str(cache)]
    meta = _build(bundle["fp32"], folder / "model.engine", *entropy)
    assert meta["precision"]["calibrator"] == "entropy"
    text = cache.read_text(errors="replace")
    assert "EntropyCalibration2" in text and "TRT-0-" not in text  # TensorRT calibrated and wrote its own cache
    meta = _build(bundle["fp32"], folder / "model.reused.engine", "--trt-calibrator", "entropy",
                  "--calib-cache", str(cache), "--reuse-calib-cache")
    assert meta["precision"]["calibrator"].startswith("entropy (cache")
    assert not list(folder.glob("*.calib.tmp"))


def test_benchmark_compares_with_onnxruntime(gpu, bundle, capsys):
    folder = bundle["folder"]
    _build(bundle["int8"], folder / "model.int8.engine", "--precision", "int8")
    _build(bundle["fp32"], folder / "model.fp32.engine", "--precision", "fp32")
    assert bench.main([str(folder), "--batch", "1,4", "--warmup", "2", "--runs", "10", "--no-tegrastats"]) == 0
    report = json.loads((folder / "benchmark.json").read_text())
    assert {(r["precision"], r["batch"]) for r in report["rows"]} == {("fp32", 1), ("fp32", 4), ("int8", 1),
                                                                       ("int8", 4)}
    for engine in report["engines"]:
        versus = engine["versus_onnxruntime"]
        assert versus["images"] == 40 and versus["top1_agreement"] >= 95.0 and versus["max_abs_diff"] < 0.1
        assert engine["top1"] is not None
    assert "| INT8" in capsys.readouterr().out


def test_metadata_refuses_an_engine_from_another_gpu(gpu, bundle):
    engine = bundle["folder"] / "model.engine"
    _build(bundle["fp32"], engine, "--precision", "fp32")
    meta_path = bundle["folder"] / "model.engine.json"
    meta = json.loads(meta_path.read_text())
    meta["device"] = {"name": "Some Other GPU", "compute_capability": [1, 0]}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BuildError, match="sm_10"):
        with TrtRunner(engine):
            pass


def test_parser_errors_exit_1_and_write_nothing(gpu, tmp_path):
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="broken_node", domain="vitdeploy.test")], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("vitdeploy.test", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(bad, str(path))
    assert be.main([str(path), "--out", str(tmp_path / "bad.engine"), "--precision", "fp32"]) == be.EXIT_BUILD_FAILED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
