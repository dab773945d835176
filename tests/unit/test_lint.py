"""The TensorRT contract linter, rule by rule, on tiny hand-built ONNX models.

Each rule gets a clean model (valid per the full ONNX checker, runnable in ONNX Runtime) and the
same model with exactly one planted defect; the defect must be reported under the right rule id
and node name, and the clean model must lint with zero errors for jetson-orin and desktop.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.errors import InputError
from vitdeploy.lint import RULES, Violation, format_report, lint_errors, lint_model

CLEAN_TARGETS = ["jetson-orin", "desktop"]
FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits=(), opset=17):
    """Wrap nodes into a model; IR 8 so any ONNX Runtime of the last years loads it."""
    graph = helper.make_graph(nodes, "lint_test", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, FLOAT, shape)


def _act_qdq(x, tag, scale=0.05, zp=0, zp_dtype=np.int8, axis=None):
    """Q -> DQ on activation `x` (nodes ``q_<tag>`` / ``dq_<tag>``); returns nodes, inits, output."""
    scale = np.asarray(scale, np.float32)
    zp = np.full(scale.shape, zp, zp_dtype)
    inits = [numpy_helper.from_array(scale, f"{tag}_scale"), numpy_helper.from_array(zp, f"{tag}_zp")]
    kwargs = {} if axis is None else {"axis": axis}
    io = [f"{tag}_scale", f"{tag}_zp"]
    nodes = [helper.make_node("QuantizeLinear", [x] + io, [f"{tag}_q"], name=f"q_{tag}", **kwargs),
             helper.make_node("DequantizeLinear", [f"{tag}_q"] + io, [f"{tag}_dq"], name=f"dq_{tag}",
                              **kwargs)]
    return nodes, inits, f"{tag}_dq"


def _weight_dq(tag, shape, axis, scale=None, seed=0):
    """DQ (``dq_<tag>``) of an int8 weight initializer, per-channel along `axis`."""
    rng = np.random.default_rng(seed)
    weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
    channels = shape[axis]
    scale = np.full(channels, 0.01, np.float32) if scale is None else np.asarray(scale, np.float32)
    inits = [numpy_helper.from_array(weight, f"{tag}_w"),
             numpy_helper.from_array(scale, f"{tag}_scale"),
             numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tag}_zp")]
    node = helper.make_node("DequantizeLinear", [f"{tag}_w", f"{tag}_scale", f"{tag}_zp"],
                            [f"{tag}_dq"], name=f"dq_{tag}", axis=axis)
    return node, inits, f"{tag}_dq"


def matmul_model(act_scale=0.05, act_zp=0, act_zp_dtype=np.int8, act_axis=None, w_axis=1,
                 w_scale=None, opset=17):
    """X[1,4,8] -> Q/DQ -> MatMul(., DQ(W int8 [8,16])) -> Y[1,4,16]."""
    act_nodes, inits, x = _act_qdq("X", "x", act_scale, act_zp, act_zp_dtype, act_axis)
    w_shape = (8, 16)
    w_node, w_inits, w = _weight_dq("w", w_shape, w_axis, w_scale)
    matmul = helper.make_node("MatMul", [x, w], ["Y"], name="matmul")
    return _model(act_nodes + [w_node, matmul], [_vi("X", [1, 4, 8])], [_vi("Y", [1, 4, 16])],
                  inits + w_inits, opset)


def conv_model(w_axis=0):
    """X[1,3,8,8] -> Q/DQ -> Conv(DQ(W int8 [4,3,3,3])) -> Y[1,4,6,6]."""
    act_nodes, inits, x = _act_qdq("X", "x")
    w_node, w_inits, w = _weight_dq("w", (4, 3, 3, 3), w_axis)
    conv = helper.make_node("Conv", [x, w], ["Y"], name="conv")
    return _model(act_nodes + [w_node, conv], [_vi("X", [1, 3, 8, 8])], [_vi("Y", [1, 4, 6, 6])],
                  inits + w_inits)


def gemm_model(w_axis=0):
    """X[2,8] -> Q/DQ -> Gemm(transB=1, DQ(W int8 [16,8])) -> Y[2,16]."""
    act_nodes, inits, x = _act_qdq("X", "x")
    w_node, w_inits, w = _weight_dq("w", (16, 8), w_axis)
    gemm = helper.make_node("Gemm", [x, w], ["Y"], name="gemm", transB=1)
    return _model(act_nodes + [w_node, gemm], [_vi("X", [2, 8])], [_vi("Y", [2, 16])],
                  inits + w_inits)


def transposed_weight_model(w_axis=0):
    """DQ(W int8 [16,8]) -> Transpose -> MatMul B [8,16]: the channel axis is 0 before the Transpose."""
    act_nodes, inits, x = _act_qdq("X", "x")
    w_node, w_inits, w = _weight_dq("w", (16, 8), w_axis)
    transpose = helper.make_node("Transpose", [w], ["w_t"], name="w_transpose", perm=[1, 0])
    matmul = helper.make_node("MatMul", [x, "w_t"], ["Y"], name="matmul")
    return _model(act_nodes + [w_node, transpose, matmul], [_vi("X", [1, 4, 8])],
                  [_vi("Y", [1, 4, 16])], inits + w_inits)


def layernorm_model(decomposed=False, square="pow"):
    """X[1,4,8] -> LayerNorm over the last axis, fused or as the 7-node opset<17 decomposition."""
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    if not decomposed:
        nodes = [helper.make_node("LayerNormalization", ["X", "gamma", "beta"], ["Y"],
                                  name="layernorm", axis=-1, epsilon=1e-5)]
        return _model(nodes, [_vi("X", [1, 4, 8])], [_vi("Y", [1, 4, 8])], inits)
    inits += [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    square_node = (helper.make_node("Pow", ["d", "two"], ["d2"], name="ln_square")
                   if square == "pow" else helper.make_node("Mul", ["d", "d"], ["d2"], name="ln_square"))
    nodes = [
        helper.make_node("ReduceMean", ["X"], ["mean"], name="ln_mean", axes=[-1]),
        helper.make_node("Sub", ["X", "mean"], ["d"], name="ln_sub"),
        square_node,
        helper.make_node("ReduceMean", ["d2"], ["var"], name="ln_var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_add"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["d", "std"], ["norm"], name="ln_div"),
        helper.make_node("Mul", ["norm", "gamma"], ["scaled"], name="ln_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["Y"], name="ln_beta"),
    ]
    return _model(nodes, [_vi("X", [1, 4, 8])], [_vi("Y", [1, 4, 8])], inits)


ALL_ROLES = ("q", "k", "softmax", "v")


def attention_model(heads=2, tokens=8, head=16, qdq=ALL_ROLES, scale_before=False, softmax_shift=False):
    """q/k/v [1, heads, tokens, head] -> MatMul(q, k^T) -> Mul scale -> Softmax -> MatMul(., v).

    `qdq` names the operands that get a Q/DQ pair; `scale_before` moves the scale Mul onto q
    (the other layout exporters produce); `softmax_shift` puts vitdeploy's shifted softmax in
    (``Sub(P, z)`` before its Q/DQ; v's centring is left out, it does not touch the rule).
    """
    shape = [1, heads, tokens, head]
    nodes, inits = [], [numpy_helper.from_array(np.array(head ** -0.5, np.float32), "attn_scale")]

    def maybe_qdq(x, role):
        if role not in qdq:
            return x
        new_nodes, new_inits, out = _act_qdq(x, role)
        nodes.extend(new_nodes)
        inits.extend(new_inits)
        return out

    q, k, v = maybe_qdq("q", "q"), maybe_qdq("k", "k"), maybe_qdq("v", "v")
    if scale_before:
        nodes.append(helper.make_node("Mul", [q, "attn_scale"], ["q_scaled"], name="q_scale"))
        q = "q_scaled"
    nodes.append(helper.make_node("Transpose", [k], ["k_t"], name="k_transpose", perm=[0, 1, 3, 2]))
    nodes.append(helper.make_node("MatMul", [q, "k_t"], ["scores"], name="attn_scores"))
    logits = "scores"
    if not scale_before:
        nodes.append(helper.make_node("Mul", ["scores", "attn_scale"], ["logits"], name="scores_scale"))
        logits = "logits"
    nodes.append(helper.make_node("Softmax", [logits], ["probs"], name="attn_softmax", axis=-1))
    probs = "probs"
    if softmax_shift:
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "z"))
        nodes.append(helper.make_node("Sub", ["probs", "z"], ["probs_shifted"], name="softmax_shift"))
        probs = "probs_shifted"
    probs = maybe_qdq(probs, "softmax")
    nodes.append(helper.make_node("MatMul", [probs, v], ["out"], name="attn_context"))
    inputs = [_vi(name, shape) for name in ("q", "k", "v")]
    return _model(nodes, inputs, [_vi("out", shape)], inits)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _run(model):
    """Run the model once in ONNX Runtime: proof the hand-built graph is a real model."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
             .astype(np.float32) for i in model.graph.input}
    return session.run(None, feeds)


def _rules(violations, rule):
    return [v for v in violations if v.rule == rule]


def _assert_clean(model, targets=CLEAN_TARGETS):
    for target in targets:
        violations = lint_model(model, target)
        assert lint_errors(violations) == [], (target, format_report(violations))


CLEAN_BUILDERS = {
    "matmul": matmul_model,
    "conv": conv_model,
    "gemm": gemm_model,
    "transposed_weight": transposed_weight_model,
    "layernorm": layernorm_model,
    "attention": attention_model,
    "attention_scale_before": lambda: attention_model(scale_before=True),
}


# ---------------------------------------------------------------------------------------------
# Clean models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", CLEAN_BUILDERS.values(), ids=CLEAN_BUILDERS.keys())
def test_clean_models_are_valid_runnable_and_lint_clean(builder):
    model = builder()
    onnx.checker.check_model(model, full_check=True)
    outputs = _run(model)
    assert all(np.all(np.isfinite(o)) for o in outputs)
    _assert_clean(model)
    # Not even a warning: a clean model must not teach users to ignore the linter.
    for target in CLEAN_TARGETS:
        assert lint_model(model, target) == []


# ---------------------------------------------------------------------------------------------
# zero-point
# ---------------------------------------------------------------------------------------------


def test_nonzero_zero_point_is_an_error_for_tensorrt():
    model = matmul_model(act_zp=3)
    for target in CLEAN_TARGETS + ["jetson-xavier"]:
        found = _rules(lint_model(model, target), "zero-point")
        assert {v.node for v in found} == {"q_x", "dq_x"}
        assert all(v.severity == "error" and "non-zero" in v.message for v in found)


def test_nonzero_zero_point_is_fine_on_cpu():
    model = matmul_model(act_zp=128, act_zp_dtype=np.uint8)
    _run(model)
    assert _rules(lint_model(model, "cpu"), "zero-point") == []


def test_uint8_zero_point_is_an_error_for_tensorrt():
    found = _rules(lint_model(matmul_model(act_zp_dtype=np.uint8), "jetson-orin"), "zero-point")
    assert {v.node for v in found} == {"q_x", "dq_x"}
    assert all("uint8" in v.message for v in found)


def test_zero_point_from_constant_node_is_read():
    model = matmul_model()
    graph = model.graph
    # Replace the zero-point initializer with a Constant node holding a non-zero value.
    zp = next(t for t in graph.initializer if t.name == "x_zp")
    graph.initializer.remove(zp)
    graph.node.insert(0, helper.make_node(
        "Constant", [], ["x_zp"], name="zp_const",
        value=numpy_helper.from_array(np.array(5, np.int8))))
    onnx.checker.check_model(model, full_check=True)
    found = _rules(lint_model(model, "desktop"), "zero-point")
    assert {v.node for v in found} == {"q_x", "dq_x"}


# ---------------------------------------------------------------------------------------------
# scale-positive
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_bad_weight_scale_is_an_error_everywhere(bad):
    scale = np.full(16, 0.01, np.float32)
    scale[3] = bad
    model = matmul_model(w_scale=scale)
    for target in CLEAN_TARGETS + ["cpu"]:
        found = _rules(lint_model(model, target), "scale-positive")
        assert [(v.node, v.severity) for v in found] == [("dq_w", "error")]


def test_negative_activation_scale_reported_on_q_and_dq():
    found = _rules(lint_model(matmul_model(act_scale=-0.05), "jetson-orin"), "scale-positive")
    assert {v.node for v in found} == {"q_x", "dq_x"}


# ---------------------------------------------------------------------------------------------
# activation-per-channel
# ---------------------------------------------------------------------------------------------


def test_per_channel_activation_is_an_error_for_tensorrt():
    model = matmul_model(act_scale=np.full(8, 0.05), act_axis=2)
    onnx.checker.check_model(model, full_check=True)
    _run(model)
    found = _rules(lint_model(model, "jetson-orin"), "activation-per-channel")
    assert {v.node for v in found} == {"q_x", "dq_x"}
    assert all(v.severity == "error" for v in found)
    # The per-channel *weight* of the same model is not an activation.
    assert "dq_w" not in {v.node for v in found}
    assert _rules(lint_model(model, "cpu"), "activation-per-channel") == []


# ---------------------------------------------------------------------------------------------
# weight-axis
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder, bad_axis", [
    (matmul_model, 0),               # MatMul B [K, N]: channels are axis 1
    (conv_model, 1),                 # Conv W [O, I, kh, kw]: channels are axis 0
    (gemm_model, 1),                 # Gemm transB=1, B [N, K]: channels are axis 0
    (transposed_weight_model, 1),    # [N, K] -> Transpose -> [K, N]: axis 0 before the Transpose
], ids=["matmul", "conv", "gemm_transB", "through_transpose"])
def test_wrong_weight_axis_is_reported(builder, bad_axis):
    model = builder(w_axis=bad_axis)
    onnx.checker.check_model(model, full_check=True)
    violations = lint_model(model, "jetson-orin")
    found = _rules(violations, "weight-axis")
    assert [(v.node, v.severity) for v in found] == [("dq_w", "error")]
    assert f"axis {bad_axis}" in found[0].message
    assert len(lint_errors(violations)) == 1  # exactly the planted defect
    assert [v.severity for v in _rules(lint_model(model, "cpu"), "weight-axis")] == ["warning"]


def test_weight_axis_unknown_consumer_is_a_warning():
    act_nodes, inits, x = _act_qdq("X", "x")
    w_node, w_inits, w = _weight_dq("w", (4, 8), 0)
    add = helper.make_node("Add", [x, w], ["Y"], name="add")
    model = _model(act_nodes + [w_node, add], [_vi("X", [1, 4, 8])], [_vi("Y", [1, 4, 8])],
                   inits + w_inits)
    found = _rules(lint_model(model, "jetson-orin"), "weight-axis")
    assert [(v.node, v.severity) for v in found] == [("dq_w", "warning")]
    assert "cannot tell" in found[0].message


# ---------------------------------------------------------------------------------------------
# opset
# ---------------------------------------------------------------------------------------------


def test_old_opset_is_an_error_for_tensorrt_and_a_warning_on_cpu():
    model = matmul_model(opset=13)
    onnx.checker.check_model(model, full_check=True)
    for target in CLEAN_TARGETS:
        violations = lint_model(model, target)
        assert [(v.rule, v.severity) for v in violations] == [("opset", "error")]
        assert "13" in violations[0].message
    assert [v.severity for v in _rules(lint_model(model, "cpu"), "opset")] == ["warning"]


# ---------------------------------------------------------------------------------------------
# layernorm-decomposed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("square", ["pow", "mul"])
def test_decomposed_layernorm_is_an_error(square):
    model = layernorm_model(decomposed=True, square=square)
    onnx.checker.check_model(model, full_check=True)
    decomposed, fused = _run(model)[0], _run(layernorm_model())[0]
    np.testing.assert_allclose(decomposed, fused, atol=1e-4)  # same maths, different graph
    for target in CLEAN_TARGETS:
        violations = lint_model(model, target)
        assert [(v.rule, v.node, v.severity) for v in violations] == [
            ("layernorm-decomposed", "ln_square", "error")]
    assert _rules(lint_model(model, "cpu"), "layernorm-decomposed")[0].severity == "warning"


def test_squaring_something_else_is_not_layernorm():
    # x - mean(y) with a different y is not a variance: no report.
    model = layernorm_model(decomposed=True)
    sub = next(n for n in model.graph.node if n.name == "ln_sub")
    model.graph.input.append(_vi("Z", [1, 4, 8]))
    sub.input[0] = "Z"
    assert _rules(lint_model(model, "jetson-orin"), "layernorm-decomposed") == []


# ---------------------------------------------------------------------------------------------
# int8-on-tx2
# ---------------------------------------------------------------------------------------------


def test_qdq_model_on_tx2_is_one_error():
    violations = lint_model(matmul_model(), "jetson-tx2")
    assert [(v.rule, v.node, v.severity) for v in violations] == [("int8-on-tx2", "q_x", "error")]
    assert "3 QuantizeLinear/DequantizeLinear" in violations[0].message


def test_fp32_model_on_tx2_is_clean():
    assert lint_model(layernorm_model(), "jetson-tx2") == []


# ---------------------------------------------------------------------------------------------
# attention-*
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing, node", [
    ("q", "attn_scores"), ("k", "attn_scores"), ("softmax", "attn_context"), ("v", "attn_context"),
])
def test_attention_operand_without_qdq_is_named(missing, node):
    model = attention_model(qdq=[r for r in ALL_ROLES if r != missing])
    onnx.checker.check_model(model, full_check=True)
    for target in CLEAN_TARGETS:
        violations = lint_model(model, target)
        assert [(v.rule, v.node, v.severity) for v in violations] == [
            ("attention-qdq-missing", node, "warning")]
        assert violations[0].message.startswith(f"{missing} ")


def test_attention_qdq_missing_with_scale_before_matmul():
    model = attention_model(qdq=("q", "k", "softmax"), scale_before=True)
    found = _rules(lint_model(model, "jetson-orin"), "attention-qdq-missing")
    assert [(v.node, v.message.split()[0]) for v in found] == [("attn_context", "v")]


def test_shifted_softmax_is_reported_once_and_still_a_complete_int8_block():
    model = attention_model(softmax_shift=True)
    onnx.checker.check_model(model, full_check=True)
    _run(model)
    for target in CLEAN_TARGETS:
        violations = lint_model(model, target)
        assert [(v.rule, v.node, v.severity) for v in violations] == [
            ("attention-softmax-shift", "softmax_shift", "warning")]
    assert lint_model(attention_model(), "jetson-orin") == []     # no shift, no warning
    missing_v = lint_model(attention_model(softmax_shift=True, qdq=("q", "k", "softmax")), "jetson-orin")
    assert {v.rule for v in missing_v} == {"attention-softmax-shift", "attention-qdq-missing"}


def test_fp16_attention_without_any_qdq_is_left_alone():
    model = attention_model(qdq=(), head=48, tokens=600, heads=1)
    assert lint_model(model, "jetson-orin") == []


def test_attention_head_size_outside_fused_kernels():
    model = attention_model(head=48)
    onnx.checker.check_model(model, full_check=True)
    violations = lint_model(model, "desktop")
    assert [(v.rule, v.node, v.severity) for v in violations] == [
        ("attention-head-size", "attn_scores", "warning")]
    assert "48" in violations[0].message


def test_attention_too_many_tokens():
    model = attention_model(heads=1, tokens=520, head=16)
    violations = lint_model(model, "jetson-orin")
    assert [(v.rule, v.node, v.severity) for v in violations] == [
        ("attention-tokens", "attn_scores", "warning")]
    assert "520" in violations[0].message


def _fail_inference(model, *args, **kwargs):
    raise onnx.shape_inference.InferenceError("simulated: custom op stops shape inference")


def _attention_with_reshaped_q(head):
    """attention_model whose q is ``Reshape([1, tokens, heads, head]) -> Transpose``."""
    model = attention_model(head=head)
    graph = model.graph
    dq_q = next(n for n in graph.node if n.name == "dq_q")
    dq_q.output[0] = "q_raw"
    graph.initializer.append(
        numpy_helper.from_array(np.array([1, 8, 2, head], np.int64), "q_shape"))
    new_nodes = [
        helper.make_node("Reshape", ["q_raw", "q_shape"], ["q_split"], name="q_reshape"),
        helper.make_node("Transpose", ["q_split"], ["q_dq"], name="q_heads", perm=[0, 2, 1, 3]),
    ]
    index = list(graph.node).index(dq_q) + 1
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)
    return model


def test_attention_head_size_from_reshape_when_inference_fails(monkeypatch):
    model = _attention_with_reshaped_q(head=48)
    onnx.checker.check_model(model, full_check=True)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", _fail_inference)
    found = _rules(lint_model(model, "jetson-orin"), "attention-head-size")
    assert [v.node for v in found] == ["attn_scores"]
    assert lint_model(_attention_with_reshaped_q(head=64), "jetson-orin") == []


def test_attention_shape_rules_skipped_when_shape_unknown(monkeypatch):
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", _fail_inference)
    model = attention_model(head=48, qdq=("q", "k", "softmax"))
    # Without shapes only the shape-free rule can speak.
    assert {v.rule for v in lint_model(model, "jetson-orin")} == {"attention-qdq-missing"}


def test_attention_rules_skip_cpu():
    model = attention_model(qdq=("q", "k"), head=48)
    assert lint_model(model, "cpu") == []


# ---------------------------------------------------------------------------------------------
# Loading, reporting
# ---------------------------------------------------------------------------------------------


def test_lint_from_path(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(matmul_model(act_zp=3), str(path))
    assert _rules(lint_model(path, "jetson"), "zero-point")
    assert _rules(lint_model(str(path), "jetson"), "zero-point")


def test_missing_path_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        lint_model(tmp_path / "nope.onnx", "jetson-orin")


def test_garbage_file_raises_input_error(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\xff\xfe this is not protobuf \x00\x01")
    with pytest.raises(InputError, match="cannot read ONNX model"):
        lint_model(path, "jetson-orin")


def test_unknown_target_raises_input_error():
    with pytest.raises(InputError, match="valid targets"):
        lint_model(matmul_model(), "pdp-11")


def test_violation_str_and_report():
    error = Violation("zero-point", "q_x", "zero point is 3")
    warning = Violation("attention-tokens", "attn", "too long", "warning")
    assert str(error) == "[zero-point] q_x: zero point is 3"
    report = format_report([warning, error])
    lines = report.splitlines()
    assert lines[0] == "error: [zero-point] q_x: zero point is 3"
    assert lines[1] == "warning: [attention-tokens] attn: too long"
    assert lines[-1] == "lint: 1 error(s), 1 warning(s)"
    assert lint_errors([warning, error]) == [error]
    assert "no problems" in format_report([])


def test_every_reported_rule_is_documented():
    models = [matmul_model(act_zp=3, opset=13), layernorm_model(decomposed=True),
              attention_model(qdq=("q",), head=48, tokens=520, heads=1)]
    for model in models:
        for target in ("jetson-tx2", "jetson-orin", "cpu"):
            assert {v.rule for v in lint_model(model, target)} <= set(RULES)
