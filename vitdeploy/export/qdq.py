"""The INT8 ONNX, exported from the fake-quant model itself.

Every enabled quantizer exports as QuantizeLinear → DequantizeLinear (`TensorQuantizer._exported`:
torch's fake-quantize ops, which both exporters know), with the scale and zero point it computes
with, at the place in the graph where the PyTorch model quantizes -- so the graph is the model's,
with nothing to find again and nothing to insert by hand. Activations get per-tensor pairs (int8
with zero point 0; uint8 with a zero point for the cpu target's asymmetric inputs); weights get
per-output-channel pairs, and `fold_weight_quantizers` turns them into what TensorRT and ONNX
Runtime take: an INT8 initializer behind a DequantizeLinear.

What the model computes around a quantizer exports too: the shift technique's ``Sub(x, z)`` before
a layer's QuantizeLinear with ``b + W_q·z`` as its bias (folded before export, so it is one
initializer), the shifted softmax's ``Sub(P, z)``, v's centring and the sum that undoes the shift
(quantize/attention.py). Zero points stay 0 wherever TensorRT reads the file.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..artifacts import ModelSpec
from .graph import GraphIndex, attr, drop_unused_initializers
from .onnx_export import DEFAULT_OPSET, export_like, exporter_of

_QDQ = ("QuantizeLinear", "DequantizeLinear")
# What a weight quantizer exports between the FP32 weight and its QuantizeLinear (a narrow range's
# clip), and the zero point's cast: all constant, computed here.
_WEIGHT_CHAIN = frozenset({"Cast", "Min", "Max", "Mul", "Neg", "Clip"}) | frozenset(_QDQ)


def export_int8(qmodel, spec: ModelSpec, reference: onnx.ModelProto, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The fake-quant model as QDQ ONNX, exported like the FP32 file ``reference``, weights folded to INT8."""
    from ..quantize.quantizer import exporting

    with _folded_shift_biases(qmodel), exporting(qmodel, exporter_of(reference)):
        proto = export_like(qmodel, spec, reference, opset)
    # torch.export's file types its intermediate tensors; the passes after this one change types (int8
    # activations to uint8 for ONNX Runtime, FP16), and shape inference gives them back anyway.
    del proto.graph.value_info[:]
    return fold_weight_quantizers(proto)


@contextlib.contextmanager
def _folded_shift_biases(qmodel) -> Iterator[None]:
    """While exporting, a shifted layer's bias is ``b + W_q·z`` as a parameter: one bias initializer in the
    file. Computed in the graph it would be a MatMul of the quantized weight that no exporter folds."""
    import torch
    from torch import nn

    from ..quantize.layers import QuantLinear

    saved = []
    with torch.no_grad():   # the eager quantizers: exactly what the fake-quant model adds
        for m in qmodel.modules():
            if isinstance(m, QuantLinear) and getattr(m, "input_shift", None) is not None:
                saved.append((m, m.bias))
                folded = m.folded_bias(m.weight_quantizer(m.weight))
                m.bias = nn.Parameter(folded.detach().clone(), requires_grad=False)
                m.bias_is_folded = True
    try:
        yield
    finally:
        for m, bias in saved:
            m.bias = bias
            m.bias_is_folded = False


def fold_weight_quantizers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Q/DQ of constant weights → INT8 initializer + DequantizeLinear, in place (also returned):

    - Q/DQ scales and zero points that the exporter wrote as Constant nodes become initializers;
    - the constant chain before a weight's QuantizeLinear (a narrow range's clip, a zero point's
      cast) is computed, and the QuantizeLinear with it: its codes, as ONNX rounds (half to even);
    - ``Transpose(DQ(W))`` of a MatMul weight becomes ``DQ(Wᵀ)`` with the axis moved along,
      the K×N layout TensorRT and ONNX Runtime take for MatMul weights;
    - torch.export's full-range ``Clip`` of the codes between an activation's Q and DQ goes.
    """
    origin: dict = {}   # folded tensor -> the weight it was computed from, to name the INT8 codes after it
    while True:
        g = GraphIndex(model)
        done = {id(node) for node in g.nodes if _fold(g, node, origin)}
        if not done:
            break
        keep = [n for n in model.graph.node if id(n) not in done]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    drop_unused_initializers(model.graph, [t.name for t in model.graph.initializer])
    return model


def _fold(g: GraphIndex, node: onnx.NodeProto, origin: dict) -> bool:
    """Fold one node into initializers (see `fold_weight_quantizers`); True when it is gone."""
    readers = g.readers(node.output[0]) if node.output else []
    if node.op_type == "Constant":
        if readers and all(r.op_type in _QDQ for r in readers) and g.const(node.output[0]) is not None:
            g.add_initializer(node.output[0], g.const(node.output[0]))
            return True
        return False
    if node.op_type in _WEIGHT_CHAIN and node.op_type != "DequantizeLinear":
        values = [g.const(name) for name in node.input]
        if not node.input or any(v is None for v in values) or not all(r.op_type in _WEIGHT_CHAIN for r in readers):
            return False
        source = origin.get(node.input[0], node.input[0])
        codes = any(r.op_type == "DequantizeLinear" and i == 0 for r, i in g.consumers(node.output[0]))
        if codes and source in g.inits and not source.startswith("/"):   # the INT8 codes of 'fc.weight'
            _rename(g, node.output[0], g.fresh(f"{source}_quantized"))
        origin[node.output[0]] = source
        g.add_initializer(node.output[0], _evaluate(node, values))
        return True
    if node.op_type == "Transpose":
        return _fold_weight_transpose(g, node)
    if node.op_type == "Clip":
        return _drop_full_range_clip(g, node)
    return False


def _drop_full_range_clip(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """torch.export clamps an activation's codes to quant_min..quant_max between Q and DQ: with int8's or
    uint8's whole range that is a no-op, and it would break the Q → DQ pair TensorRT fuses."""
    q = g.producer(node.input[0])
    bounds = [g.const(name) if name else None for name in list(node.input[1:3])]
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or len(bounds) < 2 or any(b is None for b in bounds):
        return False
    zero = g.const(q.input[2])
    info = np.iinfo(zero.dtype) if zero is not None else None
    if info is None or int(bounds[0]) > info.min or int(bounds[1]) < info.max:
        return False
    for reader, index in g.consumers(node.output[0]):
        reader.input[index] = node.input[0]
    return True


def _rename(g: GraphIndex, tensor: str, name: str) -> None:
    """Give a node output a new name, its readers too (before it becomes an initializer)."""
    for reader, index in g.consumers(tensor):
        reader.input[index] = name
    g.producer(tensor).output[0] = name


def _evaluate(node: onnx.NodeProto, values) -> np.ndarray:
    import functools

    if node.op_type == "QuantizeLinear":
        x, scale, zero = (np.asarray(v) for v in values)
        axis = attr(node, "axis", 1) % max(x.ndim, 1)
        shape = [-1 if d == axis else 1 for d in range(x.ndim)] if scale.size > 1 else []
        codes = np.rint(x.astype(np.float32) / scale.reshape(shape)) + zero.astype(np.int32).reshape(shape)
        info = np.iinfo(zero.dtype)
        return np.clip(codes, info.min, info.max).astype(zero.dtype)
    if node.op_type == "Cast":
        return np.asarray(values[0]).astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))
    if node.op_type == "Neg":
        return -np.asarray(values[0])
    if node.op_type == "Clip":   # torch.export's clamp of the codes to quant_min..quant_max
        low, high = (values[i] if len(values) > i else None for i in (1, 2))
        return np.clip(values[0], low, high).astype(np.asarray(values[0]).dtype)
    op = {"Min": np.minimum, "Max": np.maximum, "Mul": np.multiply}[node.op_type]
    return np.asarray(functools.reduce(op, values), dtype=np.asarray(values[0]).dtype)


def _fold_weight_transpose(g: GraphIndex, node: onnx.NodeProto) -> bool:
    dq: Optional[onnx.NodeProto] = g.producer(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or len(g.readers(dq.output[0])) != 1 \
            or not all(name in g.inits for name in dq.input):
        return False
    codes = g.array(dq.input[0])
    perm = list(attr(node, "perm", reversed(range(codes.ndim))))
    axis = attr(dq, "axis", 1) % codes.ndim
    transposed = np.ascontiguousarray(codes.transpose(perm))
    if sum(dq.input[0] in n.input for n in g.graph.node) == 1:   # its own codes: transposed in place, same name
        g.inits[dq.input[0]].CopyFrom(numpy_helper.from_array(transposed, dq.input[0]))
    else:
        dq.input[0] = g.add_initializer(g.fresh(f"{dq.input[0]}_transposed"), transposed)
    if g.array(dq.input[1]).size > 1:
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", perm.index(axis)))
    dq.output[0] = node.output[0]
    return True
