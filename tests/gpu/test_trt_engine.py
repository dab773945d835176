"""Real TensorRT: build engines from a tiny QDQ ONNX with build_engine.py and run them with TrtRunner.

Needs TensorRT, cuda-python (or PyCUDA) and a CUDA GPU; skipped, with the reason, anywhere else
(CI and development machines have none). Run on the device: ``pytest -m trt tests/gpu``.
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
from vitdeploy.errors import InputError  # noqa: E402
from vitdeploy.runtime import TrtRunner, check_engine_compatible, load_engine_metadata  # noqa: E402
from vitdeploy.trt import build_engine as be  # noqa: E402

FEATURES, CLASSES, MAX_BATCH = 16, 8, 8


@pytest.fixture(scope="module")
def gpu():
    """(name, compute capability) of the CUDA device, or skip."""
    name, cc = be.query_device()
    if name is None:
        pytest.skip("no CUDA device visible to cuda-python/PyCUDA")
    return name, cc


def _qdq(tensor, tag, scale, nodes, inits):
    """Append QuantizeLinear -> DequantizeLinear (symmetric INT8, as TensorRT requires)."""
    inits += [numpy_helper.from_array(np.asarray(scale, np.float32), f"{tag}_scale"),
              numpy_helper.from_array(np.asarray(0, np.int8), f"{tag}_zp")]
    nodes += [helper.make_node("QuantizeLinear", [tensor, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"], name=f"q_{tag}"),
              helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"],
                               name=f"dq_{tag}")]
    return f"{tag}_dq"


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory):
    """``logits = DQ(Q(input)) @ DQ(Q(W))`` with a dynamic batch; opset 13, per-tensor scales."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, size=(FEATURES, CLASSES)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(weight, "W")]
    x = _qdq("input", "act", 2.0 / 127, nodes, inits)
    w = _qdq("W", "weight", 1.0 / 127, nodes, inits)
    nodes.append(helper.make_node("MatMul", [x, w], ["logits"], name="/head/MatMul"))
    graph = helper.make_graph(nodes, "tiny_qdq",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("onnx") / "tiny_qdq.onnx"
    onnx.save(model, str(path))
    return path


def _build(onnx_path, out_dir, *extra):
    engine = out_dir / "model.engine"
    code = be.main([str(onnx_path), "--out", str(engine), "--min-batch", "1", "--opt-batch", "2",
                    "--max-batch", str(MAX_BATCH), *extra])
    assert code == 0
    return engine


def _modes():
    modes = [("int8", ["--precision", "int8"]), ("fp32", ["--precision", "fp32"])]
    if be.detect_api(trt)["strongly_typed_available"]:
        modes.append(("strongly-typed", ["--strongly-typed"]))
    return modes


@pytest.mark.parametrize("expected_precision, extra", _modes(), ids=[m[0] for m in _modes()])
def test_build_and_run_matches_onnxruntime(gpu, qdq_onnx, tmp_path, expected_precision, extra):
    caps = be.detect_api(trt)
    if caps["strongly_typed_only"] and expected_precision != "strongly-typed":
        pytest.skip(f"TensorRT {trt.__version__} builds strongly typed networks only")
    engine = _build(qdq_onnx, tmp_path, *extra)

    meta = load_engine_metadata(str(engine) + ".json")
    assert meta["precision"]["built"] in (expected_precision, "fp16")  # fp16: a GPU without fast INT8
    assert meta["batch_profile"] == {"min": 1, "opt": 2, "max": MAX_BATCH}
    assert [t["name"] for t in meta["inputs"]] == ["input"] and meta["outputs"][0]["shape"] == [-1, CLASSES]
    assert meta["device"]["name"] == gpu[0] and tuple(meta["device"]["compute_capability"]) == tuple(gpu[1])
    assert check_engine_compatible(meta, gpu[0], gpu[1], trt.__version__).ok

    rng = np.random.default_rng(1)
    with TrtRunner(engine) as runner, OrtRunner(qdq_onnx) as reference:
        assert runner.input_spec()["input"].shape == (None, FEATURES)
        for batch in (1, 5, MAX_BATCH):
            x = rng.uniform(-1, 1, size=(batch, FEATURES)).astype(np.float32)
            got = runner.infer({"input": x})["logits"]
            want = reference.infer({"input": x})["logits"]
            assert got.shape == (batch, CLASSES)
            # INT8 GEMM vs ONNX Runtime's simulation; TF32/FP16 for the other builds.
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
            assert runner.last_latency_ms > 0 and 0 < runner.last_compute_ms <= runner.last_latency_ms
        with pytest.raises(InputError, match="profile"):
            runner.infer({"input": np.zeros((MAX_BATCH + 1, FEATURES), np.float32)})


def test_metadata_refuses_an_engine_from_another_gpu(gpu, qdq_onnx, tmp_path):
    engine = _build(qdq_onnx, tmp_path, "--precision", "fp32")
    meta_path = tmp_path / "model.engine.json"
    meta = json.loads(meta_path.read_text())
    meta["device"] = {"name": "Some Other GPU", "compute_capability": [1, 0]}
    meta_path.write_text(json.dumps(meta))
    from vitdeploy.errors import BuildError

    with pytest.raises(BuildError, match="sm_10"):
        with TrtRunner(engine):
            pass


def test_parser_errors_name_the_node(gpu, tmp_path, capsys):
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="broken_node", domain="vitdeploy.test")], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("vitdeploy.test", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(bad, str(path))
    assert be.main([str(path), "--out", str(tmp_path / "bad.engine"), "--precision", "fp32"]) == be.EXIT_BUILD_FAILED
    assert "node 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.engine").exists()
