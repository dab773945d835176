"""export/qdq.py: the fake-quant model exports its own Q/DQ; the fold leaves INT8 weights behind DequantizeLinear."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from vitdeploy.artifacts import ModelSpec
from vitdeploy.errors import ExportError
from vitdeploy.export.onnx_export import EXPORTER_KEY, STRICT
from vitdeploy.export.qdq import export_int8
from vitdeploy.quantize.layers import QuantLinear

TOKENS, K, N = 5, 12, 6
SPEC = ModelSpec(name="fc", input_size=(TOKENS, K), mean=(0.0,), std=(1.0,), num_classes=N)


class Tokens(nn.Module):
    """One Linear over a batch of tokens."""

    def __init__(self, fc):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return self.fc(x)


class LenTokens(Tokens):
    """The same, reading the batch with len(x) as user code does for a class token (TorchScript bakes it in)."""

    def forward(self, x):
        return self.fc(x) + torch.zeros(len(x), 1, 1)


def _layer(shift=False, weight_bits=8, cls=Tokens):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(K, N), shift_mode="channel" if shift else None)
    q.input_quantizer.set_amax(2.0)
    if shift:
        q.input_shift = torch.linspace(-0.5, 0.5, K)
    if weight_bits != 8:
        q.weight_quantizer.num_bits = weight_bits
    return cls(q).eval()


def _float_qdq(proto, x):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("shift", [False, True])
def test_weights_fold_to_int8_and_the_file_computes_the_fake_quant_model(shift):
    model = _layer(shift)
    proto = export_int8(model, SPEC, onnx.ModelProto())
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2 and ops["Transpose"] == 0
    assert ops["Sub"] == int(shift) and ops["MatMul"] == 1
    inits = {t.name: t for t in proto.graph.initializer}
    weight_dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    codes = numpy_helper.to_array(inits[weight_dq.input[0]])
    assert codes.dtype == np.int8 and codes.shape == (K, N)        # MatMul's K x N, per output channel:
    assert [a.i for a in weight_dq.attribute if a.name == "axis"] == [1]
    assert np.abs(codes).max() == 127
    assert not any(n.op_type == "Constant" and any(r.op_type in ("QuantizeLinear", "DequantizeLinear")
                                                   for r in proto.graph.node if n.output[0] in r.input)
                   for n in proto.graph.node)                     # scales and zero points are initializers
    x = np.random.default_rng(0).uniform(-2, 2, size=(3, TOKENS, K)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_float_qdq(proto, x), expected, rtol=1e-5, atol=1e-5)
    assert not getattr(model.fc, "bias_is_folded", False) and model.fc.bias.requires_grad   # left as it was


def test_narrow_weights_keep_their_range():
    proto = export_int8(_layer(weight_bits=7), SPEC, onnx.ModelProto())
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    codes = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 2]
    assert len(codes) == 1 and codes[0].min() >= -64 and codes[0].max() == 63
    assert {n.op_type for n in proto.graph.node} >= {"QuantizeLinear"} and "Min" not in {n.op_type for n in proto.graph.node}


def test_strict_export_carries_the_quantizers_too():
    """torch.export traces before the ONNX export starts: the quantizers must know they are exported."""
    reference = onnx.ModelProto()
    onnx.helper.set_model_props(reference, {EXPORTER_KEY: STRICT})
    model = _layer(cls=LenTokens)
    proto = export_int8(model, SPEC, reference)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2 and not {"Round", "Clip"} & set(ops)
    x = np.random.default_rng(1).uniform(-2, 2, size=(4, TOKENS, K)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_float_qdq(proto, x), expected, rtol=1e-5, atol=1e-5)


def test_per_token_scales_do_not_export():
    model = _layer()
    model.fc.input_quantizer.per_token = True
    with pytest.raises(ExportError, match="per-token"):
        export_int8(model, SPEC, onnx.ModelProto())


@pytest.mark.parametrize("exporter", ["torchscript", STRICT])
def test_unsigned_inputs_export_uint8(exporter):
    """The cpu target's asymmetric inputs: uint8 Q/DQ with the zero point, with either exporter."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(K, N), unsigned=True)
    q.input_quantizer.set_range(-1.0, 3.0)
    model = LenTokens(q).eval() if exporter == STRICT else Tokens(q).eval()
    reference = onnx.ModelProto()
    onnx.helper.set_model_props(reference, {EXPORTER_KEY: exporter})
    proto = export_int8(model, SPEC, reference)
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    activation_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert inits[activation_q.input[2]].dtype == np.uint8 and int(inits[activation_q.input[2]]) == q.input_quantizer.zero_point
    x = np.random.default_rng(2).uniform(-1, 3, size=(2, TOKENS, K)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_float_qdq(proto, x), expected, rtol=1e-5, atol=1e-5)
