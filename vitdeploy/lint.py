"""Check a QDQ ONNX model against what TensorRT (or ONNX Runtime) will actually accept.

TensorRT rejects some Q/DQ layouts outright (non-zero zero points, per-channel activations),
silently builds slow or inaccurate engines for others (decomposed LayerNorm under FP16, attention
blocks its INT8 MHA fusion cannot match), and each of those costs a 10-minute engine build on a
Jetson to discover. The linter finds them in milliseconds from the ONNX alone.

Scope: only the top-level graph is inspected (subgraphs of If/Loop are not); constants are
initializers and ``Constant`` nodes. Rule ids are stable and listed in `RULES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from vitdeploy.errors import InputError
from vitdeploy.export.graph import GraphIndex, Shape
from vitdeploy.export.graph import attr as _attr
from vitdeploy.targets import Target, get_target

__all__ = ["RULES", "Violation", "lint_model", "lint_errors", "format_report"]

#: Every rule id the linter can report, with a one-line description.
RULES: Mapping[str, str] = MappingProxyType({
    "zero-point": "Q/DQ zero point must be a constant INT8 zero for TensorRT",
    "scale-positive": "Q/DQ scale must be finite and > 0",
    "activation-per-channel": "activation Q/DQ must be per-tensor (one scale) for TensorRT",
    "weight-axis": "per-channel weight DQ must quantize along the consumer's output channels",
    "opset": "default-domain opset must be >= 17 (LayerNormalization)",
    "layernorm-decomposed": "LayerNorm exported as ReduceMean/Sub/Pow/... overflows in FP16",
    "int8-on-tx2": "the target has no INT8: the model must not contain Q/DQ nodes",
    "attention-qdq-missing": "INT8 MHA fusion needs Q/DQ on q, k, softmax output and v",
    "attention-head-size": "INT8 MHA fusion needs a head size of 16, 32 or 64",
    "attention-tokens": "INT8 MHA fusion needs a sequence length <= 512",
    "attention-softmax-shift": "a Sub between Softmax and its Q/DQ (shifted softmax) is not in the MHA pattern",
    "cpu-saturating-operand": "cpu: an s8 operand beyond ±64 saturates ONNX Runtime's x86 AVX2 / AVX-512 kernels",
})

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_ERROR, _WARNING = "error", "warning"
_MHA_HEAD_SIZES = (16, 32, 64)
_MHA_MAX_TOKENS = 512
# How far the graph walks go. Attention blocks and Q/DQ placements are local patterns; a bound
# keeps a pathological graph from turning the linter quadratic.
_MAX_WALK = 8

# Ops that only move or reinterpret data: a DequantizeLinear before them still counts as
# "on the input path" because TensorRT commutes Q/DQ across them.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten",
                         "Gather", "Slice", "Split"})
# Between the first attention MatMul and the Softmax: scaling, masking, casts, optional Q/DQ.
_SCORE_OPS = frozenset({"Mul", "Div", "Add", "Where", "Cast", "Identity"}) | _QDQ_OPS
# Between the Softmax and the second MatMul: its Q/DQ, casts, (inference-time no-op) dropout and
# the Sub of a shifted softmax (vitdeploy's --shift), which `attention-softmax-shift` reports.
_PROB_OPS = frozenset({"Cast", "Identity", "Dropout", "Sub"}) | _QDQ_OPS

ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node (or tensor) of the graph."""

    rule: str
    node: str
    message: str
    severity: str = _ERROR

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


# --------------------------------------------------------------------------------------------
# Graph index
# --------------------------------------------------------------------------------------------


def _label(node: onnx.NodeProto) -> str:
    """A node's name, or something recognisable when the exporter left it empty."""
    if node.name:
        return node.name
    first_output = node.output[0] if node.output else "?"
    return f"{node.op_type}({first_output})"


def _optional_input(node: onnx.NodeProto, index: int) -> Optional[str]:
    """Name of an optional input, or None when omitted (absent or empty name)."""
    if len(node.input) > index and node.input[index]:
        return node.input[index]
    return None


def _qdq_nodes(g: GraphIndex) -> list[onnx.NodeProto]:
    """Every QuantizeLinear/DequantizeLinear, in graph order (any domain)."""
    return [n for n in g.nodes if n.op_type in _QDQ_OPS]


def _is_weight(g: GraphIndex, name: str) -> bool:
    """A Q/DQ input is a weight when it is a constant, or a QuantizeLinear of a constant."""
    if g.is_constant(name):
        return True
    node = g.producer(name)
    return node is not None and node.op_type == "QuantizeLinear" and g.is_constant(node.input[0])


def _weight_shape(g: GraphIndex, name: str) -> Optional[Shape]:
    """Shape of the constant behind a (possibly Q'd) weight tensor."""
    shape = g.shape(name)
    if shape is None:
        node = g.producer(name)
        if node is not None and node.op_type == "QuantizeLinear":
            shape = g.shape(node.input[0])
    return shape


# --------------------------------------------------------------------------------------------
# Rules that look at each Q/DQ node on its own
# --------------------------------------------------------------------------------------------


def _check_opset(model: onnx.ModelProto, target: Target) -> Iterator[Violation]:
    """`opset`: LayerNormalization (one fused, FP32-pinnable node) only exists from opset 17."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions or versions[0] >= target.min_opset:
        return
    severity = _ERROR if target.is_tensorrt else _WARNING
    yield Violation(
        "opset", "<model>",
        f"default-domain opset is {versions[0]}, {target.name} needs >= {target.min_opset}: below "
        "17 LayerNorm is exported decomposed and overflows in FP16; re-export with opset 17",
        severity)


def _check_zero_point(g: GraphIndex, target: Target) -> Iterator[Violation]:
    """`zero-point`: TensorRT only implements symmetric signed INT8 (zero point 0, int8)."""
    if not target.is_tensorrt:
        return  # ONNX Runtime handles asymmetric and uint8 quantization
    for node in _qdq_nodes(g):
        zp_name = _optional_input(node, 2)
        if zp_name is None:
            continue  # omitted zero point means 0
        zp = g.const(zp_name)
        if zp is None:
            if not g.is_constant(zp_name):
                yield Violation("zero-point", _label(node),
                                f"zero point {zp_name!r} is computed at run time; TensorRT needs a "
                                "constant zero point of 0", _ERROR)
            continue
        problems = []
        if zp.dtype == np.uint8:
            problems.append("it is uint8 (TensorRT only takes signed int8 Q/DQ)")
        if np.any(zp != 0):
            problems.append(f"it is non-zero (e.g. {zp.flat[int(np.argmax(zp != 0))]})")
        if problems:
            yield Violation("zero-point", _label(node),
                            f"zero point {zp_name!r}: " + " and ".join(problems) +
                            "; quantize symmetrically to int8 with zero point 0", _ERROR)


def _check_scale(g: GraphIndex) -> Iterator[Violation]:
    """`scale-positive`: a zero, negative or non-finite scale produces garbage on every runtime."""
    for node in _qdq_nodes(g):
        scale = g.const(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            continue
        values = scale.astype(np.float64)
        bad = ~np.isfinite(values) | (values <= 0)
        if np.any(bad):
            example = values.flat[int(np.argmax(bad))]
            yield Violation("scale-positive", _label(node),
                            f"scale {node.input[1]!r} has {int(bad.sum())} of {values.size} "
                            f"value(s) that are not finite and > 0 (e.g. {example}); "
                            "recalibrate this tensor", _ERROR)


def _check_activation_per_channel(g: GraphIndex, target: Target) -> Iterator[Violation]:
    """`activation-per-channel`: TensorRT only takes per-tensor scales for activations."""
    if not target.is_tensorrt:
        return
    for node in _qdq_nodes(g):
        if _is_weight(g, node.input[0]):
            continue
        scale = g.const(node.input[1])
        size = scale.size if scale is not None else _static_size(g.shape(node.input[1]))
        if size is not None and size > 1:
            yield Violation("activation-per-channel", _label(node),
                            f"activation {node.input[0]!r} is quantized with {size} scales; "
                            "TensorRT needs a single per-tensor scale for activations", _ERROR)


def _static_size(shape: Optional[Shape]) -> Optional[int]:
    """Element count of a fully known shape, else None."""
    if shape is None or any(d is None for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# weight-axis
# --------------------------------------------------------------------------------------------


def _follow_transposes(g: GraphIndex, name: str) -> Iterator[Tuple[onnx.NodeProto, int, list]]:
    """Consumers of `name`, looking through Transposes: ``(node, input_index, perms so far)``."""
    stack = [(name, [])]
    while stack:
        tensor, perms = stack.pop()
        for node, index in g.consumers(tensor):
            if node.op_type == "Transpose" and len(perms) < _MAX_WALK:
                stack.append((node.output[0], perms + [_attr(node, "perm")]))
            else:
                yield node, index, perms


def _output_channel_axis(node: onnx.NodeProto, index: int, rank: int) -> Optional[int]:
    """The axis of input `index` of `node` that indexes the node's output channels.

    Conv weight [O, I/g, k...]: 0. ConvTranspose weight [I, O/g, k...]: 1. MatMul: B [.., K, N] ->
    last axis, A [.., M, K] -> second to last. Gemm: as MatMul but swapped by transA/transB.
    None when the op is not one whose weight channels we know.
    """
    op = node.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "MatMul":
        return rank - 1 if index == 1 else rank - 2
    if op == "Gemm" and index in (0, 1):
        transposed = bool(_attr(node, "transB" if index == 1 else "transA", 0))
        if index == 1:
            return 0 if transposed else 1
        return 1 if transposed else 0
    return None


def _axis_before_transposes(axis: int, perms: list, rank: int) -> int:
    """Map an axis of the tensor after a chain of Transposes back to the tensor before them.

    Transpose output dim i is input dim perm[i], so walk the chain from the consumer backwards.
    """
    for perm in reversed(perms):
        perm = list(perm) if perm else list(range(rank - 1, -1, -1))  # default: reverse dims
        axis = perm[axis]
    return axis


def _check_weight_axis(g: GraphIndex, target: Target) -> Iterator[Violation]:
    """`weight-axis`: per-channel weight scales must run along the consumer's output channels.

    TensorRT refuses other axes for Conv/MatMul weights; ONNX Runtime computes them correctly
    but cannot fuse them into an integer kernel, hence a warning there.
    """
    wrong = _ERROR if target.is_tensorrt else _WARNING
    for node in g.nodes:
        if node.op_type != "DequantizeLinear" or not _is_weight(g, node.input[0]):
            continue
        scale = g.const(node.input[1])
        shape = _weight_shape(g, node.input[0])
        if scale is None or scale.ndim != 1 or scale.size <= 1 or shape is None or len(shape) < 2:
            continue  # per-tensor, blocked, or a 1-D bias: no axis to get wrong
        rank = len(shape)
        axis = int(_attr(node, "axis", 1)) % rank
        yield from _weight_axis_uses(g, node, axis, rank, wrong)


def _weight_axis_uses(g: GraphIndex, dq: onnx.NodeProto, axis: int, rank: int,
                      severity: str) -> Iterator[Violation]:
    """Compare `axis` of one per-channel weight DQ with every consumer it feeds."""
    for consumer, index, perms in _follow_transposes(g, dq.output[0]):
        needed = _output_channel_axis(consumer, index, rank)
        if needed is None:
            yield Violation("weight-axis", _label(dq),
                            f"per-channel weight (axis {axis}) feeds {consumer.op_type} "
                            f"{_label(consumer)!r}; cannot tell its output-channel axis",
                            _WARNING)
            continue
        needed = _axis_before_transposes(needed, perms, rank)
        if axis != needed:
            via = " through Transpose" if perms else ""
            yield Violation("weight-axis", _label(dq),
                            f"per-channel weight is quantized along axis {axis}, but "
                            f"{consumer.op_type} {_label(consumer)!r}{via} needs the output-channel "
                            f"axis {needed}", severity)


# --------------------------------------------------------------------------------------------
# layernorm-decomposed and int8-on-tx2
# --------------------------------------------------------------------------------------------


def _squared_base(g: GraphIndex, node: onnx.NodeProto) -> Optional[str]:
    """The tensor `node` squares (``Pow(x, 2)`` or ``Mul(x, x)``), else None."""
    if node.op_type == "Pow" and len(node.input) == 2:
        exponent = g.const(node.input[1])
        if exponent is not None and exponent.size == 1 and float(exponent.flat[0]) == 2.0:
            return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    return None


def _check_layernorm(g: GraphIndex, target: Target) -> Iterator[Violation]:
    """`layernorm-decomposed`: detect the variance term ``(x - ReduceMean(x))**2``.

    The pattern is keyed on its core -- a square (Pow 2 or Mul(d, d)) of ``Sub(x, ReduceMean(x))``
    with the same x on both sides -- rather than on the whole seven-node chain, because exporters
    vary in the tail (Add eps / Sqrt / Div vs Reciprocal / Mul) but all compute this square, and
    the square is exactly what overflows in FP16. Off FP16 (the CPU target) it only costs speed.
    """
    severity = _ERROR if target.fp16 else _WARNING
    for node in g.nodes:
        base = _squared_base(g, node)
        sub = g.producer(base) if base else None
        if sub is None or sub.op_type != "Sub":
            continue
        mean = g.producer(sub.input[1])
        if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
            continue
        yield Violation("layernorm-decomposed", _label(node),
                        f"decomposed LayerNorm (ReduceMean {_label(mean)!r} -> Sub -> "
                        f"{node.op_type} -> ReduceMean -> Add -> Sqrt -> Div): the squared "
                        "deviation overflows in FP16 (top-1 fell to 19 % in the field); export "
                        "with opset >= 17 so it becomes one LayerNormalization node", severity)


def _check_int8_target(g: GraphIndex, target: Target) -> Iterator[Violation]:
    """`int8-on-tx2`: one violation for the whole model, naming the first Q/DQ node."""
    nodes = _qdq_nodes(g)
    if nodes:
        yield Violation("int8-on-tx2", _label(nodes[0]),
                        f"the model has {len(nodes)} QuantizeLinear/DequantizeLinear node(s) but "
                        f"{target.name} ({target.sm or 'this device'}) has no INT8; export FP32 "
                        "ONNX and build an FP16 engine", _ERROR)


# --------------------------------------------------------------------------------------------
# Fused attention
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attention:
    """``MatMul(q, k^T) -> [scale/mask] -> Softmax -> MatMul(probs, v)``."""

    scores: onnx.NodeProto   # first MatMul: q @ k^T
    softmax: onnx.NodeProto
    context: onnx.NodeProto  # second MatMul: probs @ v

    def operands(self) -> list[Tuple[str, onnx.NodeProto, int]]:
        """``(role, matmul, input_index)`` for the four tensors the INT8 MHA fusion needs Q/DQ on."""
        return [("q", self.scores, 0), ("k", self.scores, 1),
                ("softmax", self.context, 0), ("v", self.context, 1)]


def _find_upstream(g: GraphIndex, name: str, op_type: str, through: frozenset,
                   depth: int = _MAX_WALK) -> Optional[onnx.NodeProto]:
    """First `op_type` node reached walking producers of `name` through `through` ops.

    Constant inputs (the attention scale, a mask constant) are never followed.
    """
    node = g.producer(name)
    if node is None or depth <= 0:
        return None
    if node.op_type == op_type:
        return node
    if node.op_type not in through:
        return None
    for inp in node.input:
        if inp and not g.is_constant(inp):
            found = _find_upstream(g, inp, op_type, through, depth - 1)
            if found is not None:
                return found
    return None


def _find_downstream_matmul(g: GraphIndex, name: str, depth: int = _MAX_WALK
                            ) -> Optional[onnx.NodeProto]:
    """The MatMul that reads `name` (through `_PROB_OPS`) as its left operand."""
    if depth <= 0:
        return None
    for node, index in g.consumers(name):
        if node.op_type == "MatMul" and index == 0:
            return node
        if node.op_type in _PROB_OPS and node.output:
            found = _find_downstream_matmul(g, node.output[0], depth - 1)
            if found is not None:
                return found
    return None


def _attention_blocks(g: GraphIndex) -> Iterator[_Attention]:
    """Every Softmax that sits between two MatMuls in the attention pattern."""
    for node in g.nodes:
        if node.op_type != "Softmax":
            continue
        scores = _find_upstream(g, node.input[0], "MatMul", _SCORE_OPS)
        context = _find_downstream_matmul(g, node.output[0])
        if scores is not None and context is not None and scores is not context:
            yield _Attention(scores, node, context)


def _has_dq(g: GraphIndex, name: str) -> bool:
    """True when a DequantizeLinear feeds `name`, possibly through layout ops or a scale Mul/Div."""
    return _find_upstream(g, name, "DequantizeLinear", _LAYOUT_OPS | {"Mul", "Div"}) is not None


def _shape_from_reshape(g: GraphIndex, name: str) -> Optional[Shape]:
    """Shape of `name` read off a constant Reshape target, through a chain of Transposes.

    The fallback when shape inference could not follow the graph (custom ops upstream); 0 and -1
    entries of the Reshape constant come back as unknown dims.
    """
    perms = []
    node = g.producer(name)
    while node is not None and node.op_type == "Transpose" and len(perms) < _MAX_WALK:
        perms.append(_attr(node, "perm"))
        node = g.producer(node.input[0])
    if node is None or node.op_type != "Reshape":
        return None
    target_shape = g.const(node.input[1])
    if target_shape is None:
        return None
    dims = [int(d) if d > 0 else None for d in target_shape.reshape(-1)]
    for perm in reversed(perms):  # producers were collected from the consumer backwards
        perm = list(perm) if perm else list(range(len(dims) - 1, -1, -1))
        dims = [dims[p] for p in perm]
    return tuple(dims)


def _q_shape(g: GraphIndex, block: _Attention) -> Optional[Shape]:
    """Shape of q (``[..., tokens, head]``), from inference or from Reshape constants."""
    q = block.scores.input[0]
    shape = g.shape(q)
    if shape is None or len(shape) < 2 or shape[-1] is None:
        fallback = _shape_from_reshape(g, q)
        if fallback is not None and len(fallback) >= 2:
            shape = fallback
    return shape if shape is not None and len(shape) >= 2 else None


def _check_attention(g: GraphIndex, target: Target) -> Iterator[Violation]:
    """`attention-*`: what TensorRT's fused INT8 MHA kernel needs, for INT8 attention blocks.

    Blocks with no Q/DQ at all are meant to run in FP16 and are left alone. All three are
    warnings: an unfused block is slower, not wrong.
    """
    if not target.is_tensorrt:
        return
    for block in _attention_blocks(g):
        has = {role: _has_dq(g, mm.input[i]) for role, mm, i in block.operands()}
        if not any(has.values()):
            continue
        yield from _attention_qdq(block, has)
        yield from _attention_shape(g, block)
        yield from _attention_softmax_shift(g, block)


def _attention_softmax_shift(g: GraphIndex, block: _Attention) -> Iterator[Violation]:
    """`attention-softmax-shift`: a Sub on the path from the Softmax to the second MatMul."""
    name = block.context.input[0]
    for _ in range(_MAX_WALK):
        node = g.producer(name)
        if node is None or node is block.softmax:
            return
        if node.op_type == "Sub":
            yield Violation("attention-softmax-shift", _label(node),
                            "the softmax output is shifted before its QuantizeLinear (the shift "
                            "technique): more resolution for INT8 attention, but TensorRT's fused "
                            "MHA pattern has nothing between Softmax and Q/DQ, so this block may "
                            "run unfused; check the engine's layers (trtexec --dumpLayerInfo)", _WARNING)
            return
        name = node.input[0]


def _attention_qdq(block: _Attention, has: Mapping[str, bool]) -> Iterator[Violation]:
    """One `attention-qdq-missing` per operand without a DequantizeLinear, at its MatMul."""
    present = ", ".join(role for role, ok in has.items() if ok)
    for role, matmul, index in block.operands():
        if not has[role]:
            yield Violation("attention-qdq-missing", _label(matmul),
                            f"{role} (input {index} of MatMul {_label(matmul)!r}) has no "
                            f"DequantizeLinear on its input path while {present} do; TensorRT's "
                            "fused INT8 attention needs Q/DQ on q, k, softmax and v, so this block "
                            "runs unfused", _WARNING)


def _attention_shape(g: GraphIndex, block: _Attention) -> Iterator[Violation]:
    """`attention-head-size` / `attention-tokens` from q's shape; silent where it is unknown."""
    shape = _q_shape(g, block)
    if shape is None:
        return
    head, tokens = shape[-1], shape[-2]
    if tokens is None:  # q's token dim unknown: try the key axis of the scores
        scores = g.shape(block.softmax.input[0])
        tokens = scores[-1] if scores else None
    where = _label(block.scores)
    if head is not None and head not in _MHA_HEAD_SIZES:
        yield Violation("attention-head-size", where,
                        f"head size {head} is not one of {_MHA_HEAD_SIZES}; TensorRT's fused "
                        "INT8 attention will not match this block", _WARNING)
    if tokens is not None and tokens > _MHA_MAX_TOKENS:
        yield Violation("attention-tokens", where,
                        f"sequence length {tokens} > {_MHA_MAX_TOKENS}; TensorRT's fused INT8 "
                        "attention will not match this block (use a smaller input size or "
                        "larger patches)", _WARNING)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _load(model: ModelLike) -> Tuple[onnx.ModelProto, Optional[Path]]:
    """The ModelProto and the folder its external data lives in (None for an in-memory model).

    External data is not loaded: the rules only need small constants (scales, zero points,
    shapes), read lazily, so a multi-GB model lints without being held in memory.
    """
    if isinstance(model, onnx.ModelProto):
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"expected an ONNX model or a path, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise InputError(f"cannot read ONNX model {str(path)!r}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf raises several unrelated types
        raise InputError(f"cannot read ONNX model {str(path)!r}: {exc}") from exc
    if not proto.HasField("graph") or not proto.graph.node:
        raise InputError(f"cannot read ONNX model {str(path)!r}: not an ONNX model (no graph)")
    return proto, path.parent


def lint_model(model: ModelLike, target: Union[Target, str]) -> list[Violation]:
    """Check `model` against the contract of `target`; returns every `Violation` found.

    `model` is a ModelProto or a path to a ``.onnx`` file (an unreadable path raises InputError);
    `target` is a Target or a name accepted by `get_target`. An empty list means clean.
    Violations come grouped by rule, in graph order within a rule.
    """
    target = get_target(target)
    proto, base_dir = _load(model)
    g = GraphIndex(proto, base_dir)
    found = list(_check_opset(proto, target))
    found += _check_layernorm(g, target)
    found += _check_scale(g)
    if not target.int8:
        # Nothing else about Q/DQ matters when there must be none at all.
        found += _check_int8_target(g, target)
        return found
    found += _check_zero_point(g, target)
    found += _check_activation_per_channel(g, target)
    found += _check_weight_axis(g, target)
    found += _check_attention(g, target)
    found += _check_cpu_operands(proto, target)
    return found


def _check_cpu_operands(model: onnx.ModelProto, target: Target) -> Iterator[Violation]:
    """`cpu-saturating-operand`: a cpu file must compute the same on every CPU (vitdeploy/cpu_isa.py)."""
    if target.is_tensorrt:
        return  # TensorRT sums INT8 products in int32
    from vitdeploy.cpu_isa import SAFE_S8_CODE, int8_operands

    try:
        operands = list(int8_operands(model))
    except Exception:  # noqa: BLE001 -- external or unreadable weights: nothing to check here
        return
    for node, code, kind in operands:
        if code is not None and code > SAFE_S8_CODE:
            yield Violation("cpu-saturating-operand", node or "?",
                            f"its int8 {kind} operand reaches |code| {code}: on x86 AVX2 / AVX-512 without VNNI ONNX "
                            f"Runtime sums u8 x s8 pairs in saturating int16, exact only within ±{SAFE_S8_CODE}; use "
                            f"7-bit weights (or uint8 for an activation)", _ERROR)


def lint_errors(violations: Iterable[Violation]) -> list[Violation]:
    """Only the violations with severity ``"error"`` (those that should fail a build)."""
    return [v for v in violations if v.severity == _ERROR]


def format_report(violations: Sequence[Violation]) -> str:
    """Human-readable report: errors first, one per line, then a count line."""
    if not violations:
        return "lint: no problems found"
    ordered = sorted(violations, key=lambda v: v.severity != _ERROR)  # stable: keeps rule order
    errors = len(lint_errors(violations))
    warnings = len(violations) - errors
    lines = [f"{v.severity}: {v}" for v in ordered]
    lines.append(f"lint: {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)
