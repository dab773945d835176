"""FP32 (or QDQ INT8) ONNX → FP16 ONNX for TensorRT strongly typed networks (target ``desktop``).

A strongly typed TensorRT network runs every tensor in the type the ONNX gives it: builder flags
such as ``--fp16`` are not allowed, so the FP16 has to be written into the graph itself. This pass:

* converts float32 initializers, ``Constant`` values, ``Cast(to=FLOAT)`` and ``value_info`` to
  float16; integer tensors (shapes, indices, INT8 weights, zero points) are left alone;
* reads initializers directly where torch aliased them with ``Identity`` (equal parameters);
* keeps the graph's input and output float32 (``keep_io_fp32``) behind a Cast, so callers feed
  and read the same arrays as with the FP32 model;
* keeps the ops in ``keep_fp32_ops`` in float32 (LayerNormalization by default: its variance,
  a mean of squares, overflows FP16's 65504 on real ViT activations) with a Cast to float32 on
  each float input and a Cast back to float16 on each output;
* converts Q/DQ scales to float16: QuantizeLinear needs a scale of its input's type and
  DequantizeLinear outputs its scale's type, and float16 scales only exist from opset 19, so a
  model with Q/DQ is upgraded to opset 19.

Scope: the top-level graph only; a model with subgraphs (If/Loop/Scan) or local functions is
refused rather than half converted.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError
from .graph import GraphIndex
from .graph import attr as _attr

__all__ = ["to_fp16", "FP16_MAX", "QDQ_FP16_OPSET"]

#: Largest finite float16; float32 constants beyond it (e.g. ``finfo(float32).min`` masks) are
#: clipped to it rather than becoming ±inf, which would turn ``0 * mask`` into NaN.
FP16_MAX = float(np.finfo(np.float16).max)

#: Smallest normal float16. A Q/DQ scale below it would be a subnormal (few significant bits) or
#: zero, so scales are raised to it (and the INT8 weights behind them requantized).
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)

#: First opset where QuantizeLinear/DequantizeLinear accept float16 scales.
QDQ_FP16_OPSET = 19

_FLOAT, _FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

# Inputs the ONNX spec types as float32 only, whatever the data's type: they stay float32.
_FP32_ONLY_INPUTS: Mapping[str, Tuple[int, ...]] = {"Resize": (2,), "Upsample": (1,)}

# Ops whose output type is set by a ``dtype`` attribute.
_DTYPE_ATTR_OPS = frozenset({"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                             "RandomUniformLike", "Bernoulli"})

# A weight scale that moved by more than this when rounded to float16 was clamped to
# FP16_MIN_NORMAL (plain rounding moves it by at most 2**-11): its INT8 weights are requantized.
_CLAMP_TOLERANCE = 2.0 ** -10


def to_fp16(model: onnx.ModelProto, keep_fp32_ops: Iterable[str] = ("LayerNormalization",),
            keep_io_fp32: bool = True) -> onnx.ModelProto:
    """A float16 copy of `model` (see the module docstring); `model` itself is not modified.

    Raises ExportError for graphs this pass cannot convert faithfully (subgraphs, local
    functions, a Q/DQ scale too large for float16).
    """
    model = _copy(model)
    _check_supported(model)
    if any(n.op_type in _QDQ_OPS for n in model.graph.node):
        model = _upgrade_opset(model, QDQ_FP16_OPSET)
    graph = model.graph
    _bypass_initializer_aliases(graph)
    types = _elem_types(model)
    keep_ops = frozenset(keep_fp32_ops)
    fp32_slots = _fp32_slots(graph, keep_ops, types)
    pinned = _convert_initializers(graph, fp32_slots)
    for node in graph.node:
        _convert_node_attributes(node)
    _rebuild_nodes(graph, keep_ops, fp32_slots, types, keep_io_fp32)
    _convert_value_info(graph, keep_io_fp32, pinned)
    return model


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _check_supported(model: onnx.ModelProto) -> None:
    """Refuse what the pass would convert only partly: float tensors inside subgraphs/functions."""
    if model.functions:
        raise ExportError("FP16 conversion: models with local functions are not supported")
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise ExportError(f"FP16 conversion: node {node.name or node.op_type!r} has a subgraph "
                              "(If/Loop/Scan), which is not supported")


def _upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the default-domain opset to `opset` with ONNX's version converter.

    The converter rewrites ops whose signature changed on the way (ReduceMean's axes moved from
    an attribute to an input in opset 18), which bumping the number alone would break.
    """
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, opset)
    except Exception as exc:  # noqa: BLE001 -- the converter raises assorted types
        raise ExportError(f"FP16 conversion: cannot upgrade opset {current} to {opset} "
                          f"(needed for float16 Q/DQ scales): {exc}") from exc
    # IR 9 is the IR version that goes with opset 19.
    upgraded.ir_version = max(upgraded.ir_version, 9)
    return upgraded


def _bypass_initializer_aliases(graph: onnx.GraphProto) -> None:
    """Read initializers directly instead of through ``Identity`` nodes.

    torch's exporter stores equal parameters once and aliases the copies with Identity (all
    LayerNorms of an untrained model share gamma = 1). Through an alias a LayerNorm would read
    a converted tensor and need a Cast back; bypassed, its parameters simply stay float32.
    """
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    stale = [v for v in graph.value_info if v.name in alias]
    for info in stale:
        graph.value_info.remove(info)


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    """``{tensor name: elem_type}`` of the FP32 model, from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 -- inference failures come in several types
        raise ExportError(f"FP16 conversion: shape inference failed on the input model: {exc}") from exc
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.HasField("tensor_type"):
            types.setdefault(info.name, info.type.tensor_type.elem_type)
    return types


def _fp32_slots(graph: onnx.GraphProto, keep_ops: frozenset,
                types: Mapping[str, int]) -> Dict[int, List[int]]:
    """``{node index: [input indices that must read float32]}``.

    Every float input of a kept op, and the float32-only inputs of the ops in _FP32_ONLY_INPUTS.
    """
    slots = {}
    for index, node in enumerate(graph.node):
        if node.op_type in keep_ops:
            wanted = range(len(node.input))
        else:
            wanted = _FP32_ONLY_INPUTS.get(node.op_type, ())
        chosen = [i for i in wanted
                  if i < len(node.input) and node.input[i] and types.get(node.input[i]) == _FLOAT]
        if chosen:
            slots[index] = chosen
    return slots


# --------------------------------------------------------------------------------------------
# Initializers and constants
# --------------------------------------------------------------------------------------------


def _convert_initializers(graph: onnx.GraphProto, fp32_slots: Mapping[int, List[int]]) -> Set[str]:
    """Convert float32 initializers to float16; returns the names left float32.

    An initializer read only by float32 slots (LayerNorm's gamma and beta) stays float32 so
    that it is neither rounded nor cast back at run time. Q/DQ scales go through `_scale_to_fp16`.
    """
    fp32_uses, other_uses = _initializer_uses(graph, fp32_slots)
    scales = {n.input[1] for n in graph.node if n.op_type in _QDQ_OPS and len(n.input) > 1}
    pinned = set()
    clamped: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}  # scale name → (float32, float16)
    for init in graph.initializer:
        if init.data_type != _FLOAT:
            continue
        if init.name in fp32_uses and init.name not in other_uses:
            pinned.add(init.name)
            continue
        values = numpy_helper.to_array(init)
        if init.name in scales:
            converted = _scale_to_fp16(values, init.name)
            if _was_clamped(values, converted):
                clamped[init.name] = (values, converted)
        else:
            converted = _values_to_fp16(values)
        init.CopyFrom(numpy_helper.from_array(converted, init.name))
    if clamped:
        _requantize_weights(graph, clamped)
    return pinned


def _initializer_uses(graph: onnx.GraphProto,
                      fp32_slots: Mapping[int, List[int]]) -> Tuple[Set[str], Set[str]]:
    """Names read by float32 slots, and names read anywhere else (graph outputs included)."""
    fp32_uses, other_uses = set(), {o.name for o in graph.output}
    for index, node in enumerate(graph.node):
        pinned_inputs = fp32_slots.get(index, ())
        for i, name in enumerate(node.input):
            (fp32_uses if i in pinned_inputs else other_uses).add(name)
    return fp32_uses, other_uses


def _values_to_fp16(values: np.ndarray) -> np.ndarray:
    """float32 → float16, clipping finite values to ±FP16_MAX (infinities and NaN pass through)."""
    finite = np.isfinite(values)
    clipped = np.where(finite, np.clip(values, -FP16_MAX, FP16_MAX), values)
    return clipped.astype(np.float16)


def _scale_to_fp16(values: np.ndarray, name: str) -> np.ndarray:
    """A Q/DQ scale in float16: positive scales are kept >= FP16_MIN_NORMAL, never rounded to 0.

    Invalid scales (<= 0, NaN) are converted as they are, for the linter to report.
    """
    values = values.astype(np.float32)
    if np.any(np.isfinite(values) & (values > FP16_MAX)):
        raise ExportError(f"FP16 conversion: Q/DQ scale {name!r} has values above the float16 "
                          f"maximum {FP16_MAX:g}; this tensor cannot be quantized in FP16")
    positive = np.isfinite(values) & (values > 0)
    raised = np.where(positive, np.maximum(values, FP16_MIN_NORMAL), values)
    return raised.astype(np.float16)


def _was_clamped(before: np.ndarray, after: np.ndarray) -> bool:
    """True when float16 rounding moved some value by more than rounding can (it was clamped)."""
    before = before.astype(np.float64)
    ok = np.isfinite(before) & (before > 0)
    if not np.any(ok):
        return False
    change = np.abs(after.astype(np.float64)[ok] / before[ok] - 1.0)
    return bool(np.any(change > _CLAMP_TOLERANCE))


def _requantize_weights(graph: onnx.GraphProto,
                        clamped: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> None:
    """Requantize the INT8 weights whose DQ scale was raised to FP16_MIN_NORMAL.

    q' = round(q * s_fp32 / s_fp16) keeps the dequantized weight q' * s_fp16 within half a step
    of the original; s_fp16 >= s_fp32 there, so |q'| <= |q| and nothing saturates. Weights with
    normal-range scales are left untouched: rounding moves such a scale by < 2**-11, too little
    to change any |q| <= 128 once rounded again.
    """
    inits = {i.name: i for i in graph.initializer}
    done: Dict[str, str] = {}  # weight name → the scale it was requantized for
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[1] not in clamped:
            continue
        weight = inits.get(node.input[0])
        if weight is None or weight.data_type != TensorProto.INT8:
            continue  # an activation DQ: nothing stored to requantize
        if weight.name in done:
            if done[weight.name] != node.input[1]:
                raise ExportError(f"FP16 conversion: INT8 weight {weight.name!r} is shared by "
                                  "DequantizeLinears with different scales; cannot requantize it")
            continue
        before, after = clamped[node.input[1]]
        q = numpy_helper.to_array(weight).astype(np.float64)
        ratio = before.astype(np.float64) / after.astype(np.float64)
        ratio = _broadcast_scale(ratio, q.ndim, _axis(node, q.ndim))
        requantized = np.clip(np.rint(q * ratio), -128, 127).astype(np.int8)
        weight.CopyFrom(numpy_helper.from_array(requantized, weight.name))
        done[weight.name] = node.input[1]


def _axis(node: onnx.NodeProto, rank: int) -> int:
    """A DequantizeLinear's ``axis`` attribute (default 1), made non-negative."""
    return int(_attr(node, "axis", 1)) % rank


def _broadcast_scale(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-tensor or per-axis scale reshaped to broadcast against a rank-`rank` weight."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _convert_node_attributes(node: onnx.NodeProto) -> None:
    """float32 → float16 in the attributes that carry a float type or value."""
    if node.op_type == "Constant":
        _convert_constant(node)
    elif node.op_type == "ConstantOfShape":
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == _FLOAT:
                attr.t.CopyFrom(_tensor_to_fp16(attr.t))
    elif node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == _FLOAT:
                attr.i = _FLOAT16
    elif node.op_type in _DTYPE_ATTR_OPS:
        for attr in node.attribute:
            if attr.name == "dtype" and attr.i == _FLOAT:
                attr.i = _FLOAT16


def _convert_constant(node: onnx.NodeProto) -> None:
    """A float32 Constant becomes a float16 ``value`` tensor (``value_float(s)`` included)."""
    for index, attr in enumerate(node.attribute):
        if attr.name == "value" and attr.t.data_type == _FLOAT:
            attr.t.CopyFrom(_tensor_to_fp16(attr.t))
        elif attr.name in ("value_float", "value_floats"):
            values = np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
            tensor = numpy_helper.from_array(_values_to_fp16(values))
            node.attribute[index].CopyFrom(helper.make_attribute("value", tensor))


def _tensor_to_fp16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A float16 copy of a float32 TensorProto, same name."""
    return numpy_helper.from_array(_values_to_fp16(numpy_helper.to_array(tensor)), tensor.name)


# --------------------------------------------------------------------------------------------
# Casts around the graph's I/O and the float32 ops
# --------------------------------------------------------------------------------------------


def _cast(names: GraphIndex, source: str, target: str, to: int, label: str) -> onnx.NodeProto:
    kind = "Fp16" if to == _FLOAT16 else "Fp32"
    return helper.make_node("Cast", [source], [target], to=to, name=names.fresh(f"{label}/CastTo{kind}"))


def _rebuild_nodes(graph: onnx.GraphProto, keep_ops: frozenset, fp32_slots: Mapping[int, List[int]],
                   types: Mapping[str, int], keep_io_fp32: bool) -> None:
    """The node list with every Cast inserted, in an order that stays topologically sorted."""
    names = GraphIndex(graph)
    real_inputs = _real_inputs(graph)
    fp32_pinned = {i.name for i in graph.initializer if i.data_type == _FLOAT}
    fp16_tensors = _float_tensors_now_fp16(graph, types, keep_io_fp32)
    # fp16 tensor → the float32 tensor it was cast from: a float32 reader uses the source directly
    # instead of casting back (no extra node, no round trip through float16).
    fp32_of: Dict[str, str] = {}
    nodes: List[onnx.NodeProto] = []
    renamed: Dict[str, str] = {}
    if keep_io_fp32:
        for name in real_inputs:
            fp16 = names.fresh(f"{name}_fp16")
            nodes.append(_cast(names, name, fp16, _FLOAT16, name))
            renamed[name] = fp16
            fp32_of[fp16] = name
    for index, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for i in fp32_slots.get(index, ()):
            source = node.input[i]
            if source not in fp16_tensors and source not in fp32_of:
                continue  # already float32 (a pinned initializer)
            if source not in fp32_of:
                fp32 = names.fresh(f"{source}_fp32")
                nodes.append(_cast(names, source, fp32, _FLOAT, source))
                fp32_of[source] = fp32
            node.input[i] = fp32_of[source]
        nodes.append(node)
        if node.op_type in keep_ops:
            nodes.extend(_cast_outputs_back(node, types, names, fp32_of))
    nodes.extend(_cast_graph_outputs(graph, nodes, names, keep_io_fp32))
    del graph.node[:]
    graph.node.extend(nodes)
    if not keep_io_fp32:
        for info in list(graph.input) + list(graph.output):
            if info.name in real_inputs or info.name not in fp32_pinned:
                _retype(info)


def _real_inputs(graph: onnx.GraphProto) -> List[str]:
    """Names of the float32 graph inputs that are fed at run time (not initializers).

    Old IR versions also list initializers as inputs: their declared type is made to follow
    the converted initializer.
    """
    inits = {i.name: i.data_type for i in graph.initializer}
    for info in graph.input:
        if inits.get(info.name) == _FLOAT16:
            _retype(info)
    return [i.name for i in graph.input
            if i.name not in inits and i.type.tensor_type.elem_type == _FLOAT]


def _float_tensors_now_fp16(graph: onnx.GraphProto, types: Mapping[str, int],
                            keep_io_fp32: bool) -> Set[str]:
    """Tensors that were float32 and are float16 once converted (before any Cast is added)."""
    fp32 = {i.name for i in graph.initializer if i.data_type == _FLOAT}
    if keep_io_fp32:
        fp32.update(i.name for i in graph.input)
    return {name for name, t in types.items() if t == _FLOAT and name not in fp32}


def _cast_outputs_back(node: onnx.NodeProto, types: Mapping[str, int], names: GraphIndex,
                       fp32_of: Dict[str, str]) -> List[onnx.NodeProto]:
    """Rename a float32 op's float outputs and cast them back to float16 under the old names."""
    casts = []
    for i, out in enumerate(node.output):
        if not out or types.get(out) != _FLOAT:
            continue
        fp32 = names.fresh(f"{out}_fp32")
        node.output[i] = fp32
        casts.append(_cast(names, fp32, out, _FLOAT16, out))
        fp32_of[out] = fp32
    return casts


def _cast_graph_outputs(graph: onnx.GraphProto, nodes: List[onnx.NodeProto], names: GraphIndex,
                        keep_io_fp32: bool) -> List[onnx.NodeProto]:
    """With keep_io_fp32, each float output is computed under a new name and cast to float32."""
    if not keep_io_fp32:
        return []
    producers = {out: node for node in nodes for out in node.output}
    casts = []
    for info in graph.output:
        producer = producers.get(info.name)
        if info.type.tensor_type.elem_type != _FLOAT or producer is None:
            continue  # not float, or a graph input passed straight through (still float32)
        fp16 = names.fresh(f"{info.name}_fp16")
        producer.output[list(producer.output).index(info.name)] = fp16
        for node in nodes:
            for i, name in enumerate(node.input):
                if name == info.name:
                    node.input[i] = fp16
        casts.append(_cast(names, fp16, info.name, _FLOAT, info.name))
    return casts


def _retype(info: onnx.ValueInfoProto) -> None:
    if info.type.tensor_type.elem_type == _FLOAT:
        info.type.tensor_type.elem_type = _FLOAT16


def _convert_value_info(graph: onnx.GraphProto, keep_io_fp32: bool, pinned: Set[str]) -> None:
    """value_info of float32 tensors → float16, except those that really stay float32."""
    stay = set(pinned)
    if keep_io_fp32:
        stay.update(i.name for i in graph.input)
        stay.update(o.name for o in graph.output)
    for info in graph.value_info:
        if info.name not in stay:
            _retype(info)
