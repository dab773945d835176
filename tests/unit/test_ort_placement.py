"""`place_for_onnxruntime`: TensorRT-style Q/DQ → ONNX Runtime's placement, without changing the numbers.

Synthetic graphs pin the rules down (signed → unsigned is exact over the whole INT8 range,
duplicate quantizers merge, everything that is not a symmetric activation pair is left alone);
the tiny timm ViT built by ``vitdeploy build`` and, when ../shared is present, the trained
CIFAR-10 ViT check that the rewritten model agrees with the QDQ model it came from.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.cli import main
from vitdeploy.export.ort_placement import PlacementStats, place_for_onnxruntime, placement_stats

MIN_AGREEMENT = 99.0
MIN_COSINE = 0.999


# --------------------------------------------------------------------------------------------- helpers

def _model(nodes, inits, inputs=(("x", [None, 4]),), outputs=(("y", [None, 3]),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feeds: dict, optimize: bool = True, float_qdq: bool = False) -> list:
    """ONNX Runtime: fused integer kernels (default), no graph optimisation at all, or Q/DQ in float."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if float_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _qdq(src: str, tag: str, scale: str = "s", zp: str = "z"):
    return [helper.make_node("QuantizeLinear", [src, scale, zp], [f"{tag}_q"], name=f"{tag}/Q"),
            helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zp], [f"{tag}_dq"], name=f"{tag}/DQ")]


def _zero_points(model: onnx.ModelProto) -> dict:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}


def _compare(a: np.ndarray, b: np.ndarray):
    agreement = float((a.argmax(1) == b.argmax(1)).mean() * 100)
    cosine = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).min())
    return agreement, cosine


# --------------------------------------------------------------------------------------------- rules

def test_signed_to_unsigned_is_exact_over_the_whole_range():
    scale = np.float32(0.05)
    model = _model(_qdq("x", "a") + [helper.make_node("Identity", ["a_dq"], ["y"])],
                   {"s": scale, "z": np.int8(0)}, inputs=(("x", [None]),), outputs=(("y", [None]),))
    stats = PlacementStats()
    placed = place_for_onnxruntime(model, stats)
    assert stats.activations_to_uint8 == 1 and placement_stats(placed) == {"int8": 0, "uint8": 1}
    zp = _zero_points(placed)
    assert all(v.dtype == np.uint8 and int(v) == 128 for v in zp.values())
    k = np.arange(-140, 141, dtype=np.float32)                 # every level, ties, and saturation both ways
    x = np.concatenate([k * scale, (k + 0.5) * scale, (k - 0.5) * scale, [1e6, -1e6, 0.0, -0.0]]).astype(np.float32)
    for optimize in (False, True):
        before, after = _run(model, {"x": x}, optimize)[0], _run(placed, {"x": x}, optimize)[0]
        np.testing.assert_array_equal(before, after)
    assert before.min() == pytest.approx(-128 * scale) and before.max() == pytest.approx(127 * scale)


# Synthetic weights stay within ±63, the codes the cpu target writes: full-range INT8 weights are
# not summed exactly by ONNX Runtime's x86 AVX2 kernels (vitdeploy/cpu_isa.py), and these tests
# compare fused kernels with each other, which must not depend on the host.
W_CODES = (-63, 64)


def _two_layer_model(scale_b: float = 0.1):
    rng = np.random.default_rng(0)
    w1 = rng.integers(*W_CODES, size=(4, 3)).astype(np.int8)
    w2 = rng.integers(*W_CODES, size=(4, 3)).astype(np.int8)
    nodes = (_qdq("x", "a", "s_a", "z_a") + _qdq("x", "b", "s_b", "z_b") + [
        helper.make_node("DequantizeLinear", ["w1", "ws", "wz"], ["w1_dq"], axis=1),
        helper.make_node("DequantizeLinear", ["w2", "ws", "wz"], ["w2_dq"], axis=1),
        helper.make_node("MatMul", ["a_dq", "w1_dq"], ["m1"]), helper.make_node("MatMul", ["b_dq", "w2_dq"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["y"])])
    inits = {"s_a": np.float32(0.1), "z_a": np.int8(0), "s_b": np.float32(scale_b), "z_b": np.int8(0),
             "w1": w1, "w2": w2, "ws": np.full(3, 0.02, np.float32), "wz": np.zeros(3, np.int8)}
    return _model(nodes, inits)


def test_quantizers_of_one_tensor_are_merged():
    model = _two_layer_model()
    stats = PlacementStats()
    placed = place_for_onnxruntime(model, stats)
    ops = [n.op_type for n in placed.graph.node]
    assert stats.quantizers_merged == 1 and ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 4
    inits = {i.name: i for i in placed.graph.initializer}
    assert inits["wz"].data_type == TensorProto.INT8 and inits["w1"].data_type == TensorProto.INT8  # weights stay S8
    onnx.checker.check_model(placed, full_check=True)
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32) * 5
    np.testing.assert_allclose(_run(placed, {"x": x})[0], _run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)
    # different scales: two quantizers stay
    stats = PlacementStats()
    place_for_onnxruntime(_two_layer_model(scale_b=0.2), stats)
    assert stats.quantizers_merged == 0 and stats.activations_to_uint8 == 2


def test_what_is_not_a_symmetric_activation_pair_is_left_alone():
    nodes = (_qdq("x", "asym", "s", "z7") + _qdq("x", "out", "s", "z") +
             [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["raw_q"], name="raw/Q"),
              helper.make_node("Cast", ["raw_q"], ["raw_f"], to=TensorProto.FLOAT),
              helper.make_node("QuantizeLinear", ["x", "s", "z"], ["mismatch_q"], name="mismatch/Q"),
              helper.make_node("DequantizeLinear", ["mismatch_q", "s2", "z"], ["mismatch_dq"], name="mismatch/DQ"),
              helper.make_node("Add", ["asym_dq", "raw_f"], ["t"]),
              helper.make_node("Add", ["t", "mismatch_dq"], ["y"])])
    inits = {"s": np.float32(0.1), "s2": np.float32(0.2), "z": np.int8(0), "z7": np.int8(7)}
    model = _model(nodes, inits, inputs=(("x", [None, 3]),), outputs=(("y", [None, 3]), ("out_dq", [None, 3])))
    # "out" is a proper pair whose DQ output is a graph output: converting it is still exact
    stats = PlacementStats()
    placed = place_for_onnxruntime(model, stats)
    zp = _zero_points(placed)
    assert zp["asym/Q"].dtype == np.int8 and int(zp["asym/Q"]) == 7          # non-zero zero point
    assert zp["raw/Q"].dtype == np.int8                                         # Q read by a non-DQ
    assert zp["mismatch/Q"].dtype == np.int8 and zp["mismatch/DQ"].dtype == np.int8  # DQ with another scale
    assert zp["out/Q"].dtype == np.uint8 and stats.activations_to_uint8 == 1
    assert stats.left_signed == 1
    x = np.random.default_rng(2).standard_normal((16, 3)).astype(np.float32) * 3
    for a, b in zip(_run(model, {"x": x}, optimize=False), _run(placed, {"x": x}, optimize=False)):
        np.testing.assert_array_equal(a, b)


def test_pure_and_idempotent():
    model = _two_layer_model()
    before = model.SerializeToString()
    once = place_for_onnxruntime(model)
    assert model.SerializeToString() == before                    # the input is not modified
    stats = PlacementStats()
    twice = place_for_onnxruntime(once, stats)
    assert stats == PlacementStats() and twice.graph == once.graph
    assert {p.key: p.value for p in once.metadata_props}["vitdeploy.placement"] == "onnxruntime"


def _gemm_model(beta: float = 1.0, trans_a: int = 0):
    rng = np.random.default_rng(0)
    nodes = _qdq("x", "a") + [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["w_dq"], axis=0),
                              helper.make_node("Gemm", ["a_dq", "w_dq", "b"], ["y"], transB=1, beta=beta,
                                               transA=trans_a)]
    inits = {"s": np.float32(0.05), "z": np.int8(0), "w": rng.integers(*W_CODES, size=(3, 4)).astype(np.int8),
             "ws": np.array([0.01, 0.02, 0.03], np.float32), "wz": np.zeros(3, np.int8),
             "b": np.array([0.5, -1.0, 2.0], np.float32)}
    shape = [4, None] if trans_a else [None, 4]
    return _model(nodes, inits, inputs=(("x", shape),))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gemm_bias_moves_out_so_onnxruntime_fuses_qgemm(beta, tmp_path):
    model = _gemm_model(beta)
    stats = PlacementStats()
    placed = place_for_onnxruntime(model, stats)
    onnx.checker.check_model(placed, full_check=True)
    assert stats.gemm_bias_moved == 1
    gemm = next(n for n in placed.graph.node if n.op_type == "Gemm")
    assert len(gemm.input) == 2 and not any(a.name == "beta" for a in gemm.attribute)
    x = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32) * 3
    np.testing.assert_allclose(_run(placed, {"x": x})[0], _run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_run(placed, {"x": x}, optimize=False)[0], _run(model, {"x": x}, optimize=False)[0])
    assert "QGemm" in _optimized_ops(placed, tmp_path) and "QGemm" not in _optimized_ops(model, tmp_path)


def test_gemm_with_trans_a_is_left_alone():
    stats = PlacementStats()
    place_for_onnxruntime(_gemm_model(trans_a=1), stats)
    assert stats.gemm_bias_moved == 0


def _conv_model(stride: int = 4, pads=(0, 0, 0, 0), bias: bool = True):
    rng = np.random.default_rng(0)
    nodes = _qdq("x", "a") + [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["w_dq"], axis=0),
                              helper.make_node("Conv", ["a_dq", "w_dq"] + (["b"] if bias else []), ["y"],
                                               kernel_shape=[4, 4], strides=[stride, stride], pads=list(pads))]
    inits = {"s": np.float32(0.05), "z": np.int8(0), "w": rng.integers(*W_CODES, size=(6, 3, 4, 4)).astype(np.int8),
             "ws": np.linspace(0.01, 0.02, 6).astype(np.float32), "wz": np.zeros(6, np.int8)}
    if bias:
        inits["b"] = np.linspace(-1, 1, 6).astype(np.float32)
    return _model(nodes, inits, inputs=(("x", [None, 3, 16, 12]),), outputs=(("y", [None, 6, None, None]),))


@pytest.mark.parametrize("bias", [True, False])
def test_patch_conv_becomes_an_integer_matmul(bias, tmp_path):
    model = _conv_model(bias=bias)
    stats = PlacementStats()
    placed = place_for_onnxruntime(model, stats)
    onnx.checker.check_model(placed, full_check=True)
    assert stats.conv_to_matmul == 1 and "Conv" not in [n.op_type for n in placed.graph.node]
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 12)).astype(np.float32) * 3
    before, after = _run(model, {"x": x})[0], _run(placed, {"x": x})[0]
    assert after.shape == before.shape == (5, 6, 4, 3)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    np.testing.assert_array_equal(_run(placed, {"x": x}, optimize=False)[0], _run(model, {"x": x}, optimize=False)[0])
    ops = _optimized_ops(placed, tmp_path)
    assert "MatMulIntegerToFloat" in ops and "Conv" not in ops


@pytest.mark.parametrize("stride, pads", [(2, (0, 0, 0, 0)), (4, (1, 1, 1, 1))])
def test_overlapping_or_padded_conv_is_left_alone(stride, pads):
    stats = PlacementStats()
    placed = place_for_onnxruntime(_conv_model(stride, pads), stats)
    assert stats.conv_to_matmul == 0 and "Conv" in [n.op_type for n in placed.graph.node]


def _optimized_ops(model: onnx.ModelProto, folder) -> list:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(folder / "optimized.onnx")).graph.node]


# --------------------------------------------------------------------------------------------- a real build

@pytest.fixture(scope="module")
def tiny_build(tiny_vit, calib_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("placement") / "tiny"
    plan = out.parent / "plan.json"   # INT8 attention too (TensorRT targets keep it FP16 by default)
    plan.write_text('{"default": "int8", "layers": {"patch_embed.proj": "fp16", "head": "fp16"}}')
    assert main(["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--calib-size", "16", "--out", str(out), "--quiet", "--plan", str(plan),
                 "--target", "jetson-orin"]) == 0   # the TensorRT-style graph the pass starts from
    return out


def _images(calib_npz, n_random: int = 256) -> np.ndarray:
    pixels = np.load(calib_npz)["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    real = (pixels - 0.5) / 0.5                                  # timm's mean = std = 0.5 for this ViT
    rand = np.random.default_rng(7).standard_normal((n_random,) + real.shape[1:]).astype(np.float32)
    return np.concatenate([real, rand])


def test_tiny_vit_placed_graph_agrees_with_the_qdq_graph(tiny_build, calib_npz):
    from vitdeploy.lint import lint_errors, lint_model

    qdq = onnx.load(str(tiny_build / "model.int8.onnx"))
    stats = PlacementStats()
    placed = place_for_onnxruntime(qdq, stats)
    onnx.checker.check_model(placed, full_check=True)
    assert placement_stats(qdq)["uint8"] == 0
    assert placement_stats(placed) == {"int8": 0, "uint8": placement_stats(qdq)["int8"]}
    assert stats.activations_to_uint8 == placement_stats(qdq)["int8"] > 0
    inits = {i.name: i for i in placed.graph.initializer}
    weight_dq = [n for n in placed.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weight_dq)
    # Only the 8-bit weights of a TensorRT build keep the placed file from being a cpu file.
    assert {e.rule for e in lint_errors(lint_model(placed, "cpu"))} == {"cpu-saturating-operand"}
    # The same numbers as the ONNX semantics define them (fused kernels: test_cpu_exactness.py).
    x = _images(calib_npz)
    a, b = _run(qdq, {"input": x}, float_qdq=True)[0], _run(placed, {"input": x}, float_qdq=True)[0]
    agreement, cosine = _compare(a, b)
    assert agreement >= MIN_AGREEMENT and cosine >= MIN_COSINE
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())   # float rounding at most


def test_onnxruntime_still_runs_integer_kernels(tiny_build, tmp_path):
    placed = place_for_onnxruntime(onnx.load(str(tiny_build / "model.int8.onnx")))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(placed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    integer = [op for op in ops if op in ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul")]
    assert len(integer) >= 2 * 4              # 2 blocks × (qkv, proj, fc1, fc2) at least
    assert "MatMul" not in ops                # every quantized matrix product was fused


def test_tiny_vit_with_int8_patch_embed_and_head(tiny_vit, calib_npz, tmp_path):
    """A plan that quantizes everything: ONNX Runtime runs the TensorRT-style patch-embed Conv and
    head Gemm in float; after placement both are integer kernels, with the same predictions."""
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "vitdeploy-plan/1", "default": "int8", "layers": {}}))
    out = tmp_path / "all_int8"
    assert main(["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--calib-size", "16", "--out", str(out), "--plan", str(plan),
                 "--quiet", "--target", "jetson-orin"]) == 0
    qdq = onnx.load(str(out / "model.int8.onnx"))
    stats = PlacementStats()
    placed = place_for_onnxruntime(qdq, stats)
    assert stats.conv_to_matmul == 1 and stats.gemm_bias_moved == 1
    before_ops, after_ops = _optimized_ops(qdq, tmp_path), _optimized_ops(placed, tmp_path)
    assert "Conv" in before_ops and "Gemm" in before_ops            # float kernels on dequantized weights
    assert "Conv" not in after_ops and "Gemm" not in after_ops and "QGemm" in after_ops
    x = _images(calib_npz)
    a, b = _run(qdq, {"input": x}, float_qdq=True)[0], _run(placed, {"input": x}, float_qdq=True)[0]
    agreement, cosine = _compare(a, b)
    assert agreement >= MIN_AGREEMENT and cosine >= MIN_COSINE
    # without ONNX Runtime's fusions both graphs compute exactly the same thing
    np.testing.assert_array_equal(_run(qdq, {"input": x}, optimize=False)[0],
                                  _run(placed, {"input": x}, optimize=False)[0])


def test_real_cifar10_vit(tmp_path):
    """The trained CIFAR-10 ViT (../shared): the placed model predicts what the QDQ model predicts."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.integration.shared_data import import_model_file, shared_path

    folder = shared_path("cifar10_vit")
    data = np.load(shared_path("cifar10", "test.npz"))
    module = import_model_file(folder / "model.py", "cifar10_vit_model_placement")
    torch.save(module.build(), tmp_path / "cifar10_vit.pt")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.load(shared_path("cifar10", "train_10k.npz"))["x"][:64])
    out = tmp_path / "build"
    assert main(["build", str(tmp_path / "cifar10_vit.pt"), "--trust-pickle", "--mean", "0.5", "--std", "0.5",
                 "--calib", str(calib), "--calib-size", "64", "--out", str(out), "--quiet",
                 "--target", "jetson-orin"]) == 0
    qdq = onnx.load(str(out / "model.int8.onnx"))
    placed = place_for_onnxruntime(qdq)
    x = ((data["x"][:500].astype(np.float32).transpose(0, 3, 1, 2) / 255.0) - 0.5) / 0.5
    a, b = _run(qdq, {"input": x}, float_qdq=True)[0], _run(placed, {"input": x}, float_qdq=True)[0]
    agreement, cosine = _compare(a, b)
    assert agreement >= MIN_AGREEMENT and cosine >= MIN_COSINE
    top1 = lambda logits: float((logits.argmax(1) == data["y"][:500]).mean() * 100)
    assert abs(top1(a) - top1(b)) <= 1.0
