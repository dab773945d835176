"""FP16 conversion for strongly typed TensorRT (`vitdeploy.export.fp16.to_fp16`).

The real-model tests convert the tiny timm ViT fixture, both its plain FP32 export and its QDQ
INT8 export (built once per module through the pipeline), and check the result is valid ONNX,
runs in ONNX Runtime, keeps LayerNorm in FP32, lints clean for ``desktop`` and reproduces the
FP32 logits. The hand-built tests pin down the corner cases one at a time.
"""
from __future__ import annotations

import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.bundle import calib_amax_from_qdq
from vitdeploy.errors import ExportError
from vitdeploy.export.fp16 import FP16_MAX, QDQ_FP16_OPSET, to_fp16
from vitdeploy.lint import format_report, lint_errors, lint_model

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
MIN_COSINE = 0.999


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tiny_vit, calib_npz, tmp_path_factory):
    """The tiny ViT built by the pipeline: FP32 and QDQ INT8 ONNX, their FP16 versions, inputs."""
    from vitdeploy.pipeline import BuildConfig, build

    out = tmp_path_factory.mktemp("fp16_build") / "tiny"
    # jetson-orin: the weakly typed TensorRT-style QDQ graph, which to_fp16 turns into desktop's
    # strongly typed one (a cpu build is placed for ONNX Runtime: uint8 activations, not for TensorRT).
    build(BuildConfig(model=tiny_vit.state_dict, calib=calib_npz, arch=tiny_vit.arch, target="jetson-orin",
                      model_kwargs=tiny_vit.kwargs, out=out, calib_size=16, verify_images=16))
    fp32 = onnx.load(str(out / "model.fp32.onnx"))
    int8 = onnx.load(str(out / "model.int8.onnx"))
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    return types.SimpleNamespace(folder=out, fp32=fp32, int8=int8, fp16=to_fp16(fp32),
                                 int8_fp16=to_fp16(int8), x=x)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Q/DQ evaluated in float: what TensorRT computes, the same on every host CPU."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def _types(model: onnx.ModelProto) -> dict:
    """``{tensor name: elem_type}`` after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    found = {t.name: t.data_type for t in g.initializer}
    for info in list(g.input) + list(g.output) + list(g.value_info):
        found[info.name] = info.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            found[node.output[0]] = node.attribute[0].t.data_type
    return found


def _inits(model: onnx.ModelProto) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "fp16_test", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


# ---------------------------------------------------------------------------------------------
# The tiny timm ViT, FP32 and QDQ INT8
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["fp16", "int8_fp16"])
def test_real_model_is_valid_onnx_and_lints_clean(built, tag):
    model = getattr(built, tag)
    _valid(model)
    violations = lint_model(model, "desktop")
    assert not lint_errors(violations), format_report(violations)


@pytest.mark.parametrize("source,converted", [("fp32", "fp16"), ("int8", "int8_fp16")])
def test_real_model_matches_fp32_logits(built, source, converted):
    reference = _run(getattr(built, source), built.x)
    half = _run(getattr(built, converted), built.x)
    assert half.dtype == np.float32  # keep_io_fp32: same arrays in and out as the FP32 model
    assert _cosine(reference, half) > MIN_COSINE
    assert np.array_equal(reference.argmax(1), half.argmax(1))


@pytest.mark.parametrize("tag", ["fp16", "int8_fp16"])
def test_io_stays_fp32_and_everything_else_is_fp16(built, tag):
    model = getattr(built, tag)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [FLOAT]
    assert model.graph.node[0].op_type == "Cast"  # input → float16 first
    assert model.graph.node[-1].op_type == "Cast"  # float16 → float32 output last
    norm_params = {name for n in model.graph.node if n.op_type == "LayerNormalization"
                   for name in n.input[1:]}
    fp32_inits = {t.name for t in model.graph.initializer if t.data_type == FLOAT}
    # Only LayerNorm's gamma/beta may stay float32. Not all of them do here: the untrained model's
    # LayerNorm beta (zeros) is one tensor with the Linear biases, so it is converted and cast back.
    assert fp32_inits and fp32_inits <= norm_params
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        assert all(a.t.data_type != FLOAT for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)


@pytest.mark.parametrize("tag", ["fp16", "int8_fp16"])
def test_layernorm_runs_in_fp32(built, tag):
    model = getattr(built, tag)
    dtypes = _types(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 5
    for norm in norms:
        assert all(dtypes[name] == FLOAT for name in norm.input)
        assert producers[norm.input[0]].op_type == "Cast"
        assert dtypes[norm.output[0]] == FLOAT
        (cast,) = consumers[norm.output[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == FLOAT16


def test_qdq_scales_fp16_zero_points_and_weights_untouched(built):
    before, after = _inits(built.int8), _inits(built.int8_fp16)
    opset = next(o.version for o in built.int8_fp16.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= QDQ_FP16_OPSET
    qdq = [n for n in built.int8_fp16.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        assert after[node.input[1]].data_type == FLOAT16
        assert after[node.input[2]].data_type == TensorProto.INT8
        np.testing.assert_allclose(numpy_helper.to_array(after[node.input[1]]).astype(np.float32),
                                   numpy_helper.to_array(before[node.input[1]]), rtol=2 ** -11)
        if node.input[0] in before:  # an INT8 weight: bit-identical
            assert numpy_helper.to_array(after[node.input[0]]).tobytes() == \
                numpy_helper.to_array(before[node.input[0]]).tobytes()
    dtypes = _types(built.int8_fp16)
    for node in qdq:
        if node.op_type == "QuantizeLinear":  # strongly typed: scale type == input type
            assert dtypes[node.input[0]] == FLOAT16
        else:
            assert dtypes[node.output[0]] == FLOAT16


def test_calibration_ranges_survive_conversion(built):
    """Activation Q names stay the same (bar the graph input, now read through its Cast)."""
    before, after = calib_amax_from_qdq(built.int8), calib_amax_from_qdq(built.int8_fp16)
    input_name = built.int8.graph.input[0].name
    renamed = {name: name for name in before}
    if input_name in before:
        renamed[input_name] = next(n for n in after if n not in before)
    assert set(after) == set(renamed.values())
    for name, amax in before.items():
        assert after[renamed[name]] == pytest.approx(amax, rel=2 ** -10)


def test_fp16_file_is_about_half_the_fp32_file(built, tmp_path):
    onnx.save(built.fp32, str(tmp_path / "fp32.onnx"))
    onnx.save(built.fp16, str(tmp_path / "fp16.onnx"))
    weights32 = sum(numpy_helper.to_array(t).nbytes for t in built.fp32.graph.initializer)
    weights16 = sum(numpy_helper.to_array(t).nbytes for t in built.fp16.graph.initializer)
    assert 0.45 < weights16 / weights32 < 0.55
    # The tiny model's graph is a large share of its file; real ViTs come out closer to 0.5.
    ratio = (tmp_path / "fp16.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert 0.4 < ratio < 0.7


def test_input_model_is_not_modified(built):
    copy = onnx.ModelProto()
    copy.CopyFrom(built.int8)
    to_fp16(built.int8)
    assert copy.SerializeToString() == built.int8.SerializeToString()


def test_fp16_io_when_asked(built):
    model = to_fp16(built.fp32, keep_io_fp32=False)
    _valid(model)
    assert model.graph.input[0].type.tensor_type.elem_type == FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == FLOAT16
    half = _run(model, built.x.astype(np.float16))
    assert half.dtype == np.float16
    assert _cosine(_run(built.fp32, built.x), half) > MIN_COSINE


def test_keeping_nothing_in_fp32_still_valid(built):
    model = to_fp16(built.fp32, keep_fp32_ops=())
    _valid(model)
    assert all(t.data_type != FLOAT for t in model.graph.initializer)
    assert sum(n.op_type == "Cast" for n in model.graph.node) == 2  # only the I/O casts


# ---------------------------------------------------------------------------------------------
# Hand-built corner cases
# ---------------------------------------------------------------------------------------------


def test_constants_casts_and_huge_values():
    """Constant value_float / value tensor, Cast(to=FLOAT), finfo(float32).min clipped to -65504."""
    x = helper.make_tensor_value_info("x", FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2])
    mask = numpy_helper.from_array(np.array([0, np.finfo(np.float32).min, 0, 0], np.float32), "mask")
    nodes = [
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2, 4], np.int64))),
        helper.make_node("Shape", ["x"], ["idx"]),
        helper.make_node("Mul", ["x", "half"], ["a"]),
        helper.make_node("Add", ["a", "mask"], ["b"]),
        helper.make_node("Cast", ["b"], ["c"], to=FLOAT),
        helper.make_node("Reshape", ["c", "shape"], ["y"]),
    ]
    model = _model(nodes, [x], [y, idx], [mask])
    half = to_fp16(model)
    _valid(half)
    dtypes = _types(half)
    assert dtypes["half"] == dtypes["a"] == dtypes["c"] == FLOAT16
    assert dtypes["shape"] == dtypes["idx"] == TensorProto.INT64  # integer tensors left alone
    assert numpy_helper.to_array(_inits(half)["mask"])[1] == -FP16_MAX
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    out, shape = ort.InferenceSession(half.SerializeToString()).run(None, {"x": data})
    np.testing.assert_allclose(out, data * 0.5 + np.array([0, -FP16_MAX, 0, 0]), rtol=1e-3)
    assert shape.tolist() == [2, 4]


def test_layernorm_on_graph_input_reads_the_fp32_input_directly():
    """No float32 → float16 → float32 round trip when LayerNorm reads a float32 tensor."""
    x = helper.make_tensor_value_info("x", FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 8])
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "g"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("Relu", ["n"], ["y"])]
    half = to_fp16(_model(nodes, [x], [y], inits))
    _valid(half)
    norm = next(n for n in half.graph.node if n.op_type == "LayerNormalization")
    assert list(norm.input) == ["x", "g", "b"]
    assert all(t.data_type == FLOAT for t in half.graph.initializer)  # read by LayerNorm only
    data = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32) * 1000
    out = ort.InferenceSession(half.SerializeToString()).run(None, {"x": data})[0]
    expected = np.maximum((data - data.mean(1, keepdims=True)) / data.std(1, keepdims=True), 0)
    np.testing.assert_allclose(out, expected, atol=1e-2)


def _qdq_matmul(weight_scale: np.ndarray, reduce_mean: bool = False) -> onnx.ModelProto:
    """x → Q/DQ → MatMul(DQ(int8 W)) [→ ReduceMean] → y, per-channel weight scales (axis 1)."""
    x = helper.make_tensor_value_info("x", FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 1] if reduce_mean else [2, 3])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (4, 3)).astype(np.int8), "w_q"),
             numpy_helper.from_array(weight_scale.astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(3, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
             numpy_helper.from_array(np.array(0, np.int8), "x_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w"], ["mm"] if reduce_mean else ["y"])]
    if reduce_mean:
        nodes.append(helper.make_node("ReduceMean", ["mm"], ["y"], axes=[1], keepdims=1))
    return _model(nodes, [x], [y], inits)


def test_qdq_model_is_upgraded_to_opset_19_including_reduce_mean():
    """ReduceMean's axes move from attribute to input in opset 18: the converter handles it."""
    model = _qdq_matmul(np.full(3, 0.01), reduce_mean=True)
    half = to_fp16(model)
    _valid(half)
    assert half.opset_import[0].version == QDQ_FP16_OPSET
    reduce = next(n for n in half.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 2 and not any(a.name == "axes" for a in reduce.attribute)
    data = np.random.default_rng(1).uniform(-1, 1, (2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(half, data), _run(model, data), rtol=2e-3, atol=2e-3)


def test_tiny_weight_scale_is_raised_and_weights_requantized():
    """A scale below float16's normal range would lose its precision: raise it, requantize W."""
    scales = np.array([0.01, 1e-7, 1e-9])
    model = _qdq_matmul(scales)
    half = to_fp16(model)
    _valid(half)
    after = _inits(half)
    s16 = numpy_helper.to_array(after["w_s"]).astype(np.float64)
    assert np.all(s16 >= np.finfo(np.float16).tiny)
    w_before = numpy_helper.to_array(_inits(model)["w_q"]) * scales
    w_after = numpy_helper.to_array(after["w_q"]) * s16
    assert np.all(np.abs(w_after - w_before) <= s16 / 2 + 1e-12)  # within half a step
    np.testing.assert_array_equal(numpy_helper.to_array(after["w_q"])[:, 0],
                                  numpy_helper.to_array(_inits(model)["w_q"])[:, 0])


def test_scale_too_large_for_fp16_is_refused():
    with pytest.raises(ExportError, match="float16 maximum"):
        to_fp16(_qdq_matmul(np.array([0.01, 1e6, 0.01])))


def test_subgraphs_are_refused():
    x = helper.make_tensor_value_info("x", FLOAT, [1])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    model = _model([node], [cond, x], [helper.make_tensor_value_info("y", FLOAT, [1])])
    with pytest.raises(ExportError, match="subgraph"):
        to_fp16(model)
