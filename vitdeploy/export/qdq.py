"""Insert Q/DQ into an FP32 ONNX graph from a calibrated PyTorch model.

Each quantized layer is found in the graph by its weights (the initializer equal to W, or to Wᵀ
for MatMul), not by node names, so the pass works whatever the exporter called things.
Weights become INT8 initializers with a per-output-channel DequantizeLinear (axis 0 for Conv and
Gemm(transB=1), the last axis for MatMul's K×N); the layer's activation input gets a per-tensor
QuantizeLinear → DequantizeLinear pair. Zero points are 0: symmetric, as TensorRT requires.

Asymmetric inputs come in two forms. For ONNX Runtime (target cpu): a uint8 Q/DQ pair with a
non-zero zero point. For TensorRT, which only runs symmetric int8: a ``Sub`` of a constant z (one
value, or one per input channel) before the QuantizeLinear, and ``W_q·z`` folded into the layer's
bias initializer (the MatMul's bias Add, Gemm's C, Conv's B; an Add is inserted when the layer has
no bias), so the zero points stay 0. A layer whose bias changed for other reasons (bias
correction) gets its new bias the same way. A shifted softmax output (attention.py) is the same
idea where there is no bias to fold into: ``Sub(P, z)`` before its QuantizeLinear, v centred
over the tokens before its own, and ``v̄ + z·ReduceSum(Q(d))`` added after the MatMul.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .graph import GraphIndex, drop_unused_initializers


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What the ONNX pass needs from one quantized layer."""

    weight: np.ndarray          # float32, PyTorch layout [out, in(, kh, kw)]
    weight_scale: np.ndarray    # float32 [out]
    input_scale: float          # float32 per-tensor
    input_zero_point: int = 0   # non-zero only with input_unsigned
    input_unsigned: bool = False                # uint8 Q/DQ (ONNX Runtime's asymmetric form)
    input_shift: Optional[np.ndarray] = None    # float32 z, scalar or [in]: Sub(x, z) before the Q
    bias: Optional[np.ndarray] = None           # float32 [out]: replaces the layer's bias in the graph


def layer_quant_from_module(module) -> LayerQuant:
    import torch

    quantizer = module.input_quantizer
    if getattr(quantizer, "per_token", False):
        raise ExportError("per-token activation scales are a simulation: TensorRT and ONNX QDQ take one per tensor")
    shift = getattr(module, "input_shift", None)
    bias = None
    if shift is not None or getattr(module, "bias_corrected", False) or getattr(module, "bias_learned", False):
        with torch.no_grad():  # the very expression the fake-quant forward adds
            weight_q = module.weight_quantizer(module.weight)
            folded = module.folded_bias(weight_q) if hasattr(module, "folded_bias") else module.bias
        if folded is not None:
            bias = folded.detach().cpu().numpy().astype(np.float32)
    return LayerQuant(
        weight=module.weight.detach().cpu().numpy().astype(np.float32),
        weight_scale=module.weight_quantizer.scale.detach().cpu().numpy().astype(np.float32).reshape(-1),
        input_scale=np.float32(quantizer.scale.detach().cpu().reshape(-1)[0]),
        input_zero_point=int(quantizer.zero_point) if getattr(quantizer, "unsigned", False) else 0,
        input_unsigned=bool(getattr(quantizer, "unsigned", False)),
        input_shift=None if shift is None else shift.detach().cpu().numpy().astype(np.float32),
        bias=bias,
    )


def quantize_weight(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """Same arithmetic as QuantizeLinear (and the PyTorch fake quantizer): round half to even."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.rint(weight / scale.reshape(shape)), -128, 127).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class AttentionQuant:
    """Scales for one attention block; None for a matmul the plan keeps in floating point."""

    qk: Optional[Tuple[float, float]]       # (q scale, k scale)
    av: Optional[Tuple[float, float]]       # (softmax-output scale, v scale)
    softmax_zero_point: Optional[int] = None  # uint8 softmax output with this zero point (cpu only)
    softmax_shift: Optional[float] = None     # Q/DQ on P - z and on v - v̄, v̄ added back (attention.py)


def attention_quant_from_module(module) -> AttentionQuant:
    def scales(*quantizers):
        if not all(q.enabled and q.amax is not None for q in quantizers):
            return None
        return tuple(float(q.scale) for q in quantizers)

    softmax = module.softmax_quantizer
    av = scales(module.softmax_quantizer, module.v_quantizer)
    shift = getattr(module, "softmax_shift", None)
    return AttentionQuant(qk=scales(module.q_quantizer, module.k_quantizer), av=av,
                          softmax_zero_point=softmax.zero_point if getattr(softmax, "unsigned", False) else None,
                          softmax_shift=float(shift) if shift is not None and av else None)


def insert_qdq(model: onnx.ModelProto, layers: Dict[str, LayerQuant],
               attentions: Optional[Dict[str, AttentionQuant]] = None) -> onnx.ModelProto:
    """A new model with Q/DQ for every layer and attention matmul given; ExportError if one is not found."""
    editor = _Editor(_copy(model))
    for name, lq in layers.items():
        matches = _find_consumers(editor.graph, editor.fingerprints, lq.weight)
        if not matches:
            raise ExportError(f"layer {name}: its weights were not found in the exported graph")
        if lq.bias is not None and len(matches) > 1:
            raise ExportError(f"layer {name}: its weights are shared by {len(matches)} nodes; "
                              "cannot give it its own bias")
        for index, node, weight_input, layout in matches:
            editor.quantize_weight(index, node, weight_input, {"oi": 0, "io": 1}[layout], lq.weight_scale, name)
            editor.quantize_input(index, node, 0, lq.input_scale, f"{name}.input", zero_point=lq.input_zero_point,
                                  unsigned=lq.input_unsigned, shift=lq.input_shift)
            if lq.bias is not None:
                editor.set_bias(index, node, lq.bias, name)
    attentions = {k: v for k, v in (attentions or {}).items() if v.qk or v.av}
    if attentions:
        patterns = _patterns_of(editor.graph, find_attention_patterns(editor.graph), list(attentions))
        for (mm1, mm2), (name, aq) in zip(patterns, attentions.items()):
            nodes = editor.graph.node
            if aq.qk:
                editor.quantize_input(mm1, nodes[mm1], 0, aq.qk[0], f"{name}.q")
                editor.quantize_input(mm1, nodes[mm1], 1, aq.qk[1], f"{name}.k")
            if aq.av:
                unsigned = aq.softmax_zero_point is not None
                shift = None if aq.softmax_shift is None else np.float32(aq.softmax_shift)
                editor.quantize_input(mm2, nodes[mm2], 0, aq.av[0], f"{name}.softmax",
                                      zero_point=aq.softmax_zero_point or 0, unsigned=unsigned, shift=shift)
                mean = editor.center_tokens(mm2, nodes[mm2], f"{name}.v") if shift is not None else None
                editor.quantize_input(mm2, nodes[mm2], 1, aq.av[1], f"{name}.v")
                if shift is not None:
                    editor.undo_softmax_shift(mm2, nodes[mm2], shift, mean, f"{name}.v")
    return editor.finish()


def _patterns_of(graph: onnx.GraphProto, patterns: List[Tuple[int, int]], names: List[str]) -> List[Tuple[int, int]]:
    """The attention blocks of the quantized attention modules ``names``, in the same order.

    As many blocks as modules: they pair up in execution order. More blocks (an attention that has
    no quantized twin, such as timm's attention-pooling head ``attn_pool``): keep the blocks whose
    node-name scope (``/blocks/blocks.0/attn/MatMul`` → ``blocks.0.attn``) ends one of the names.
    """
    if len(patterns) != len(names):
        ours = [p for p in patterns if any(n == scope or n.endswith("." + scope)
                                           for scope in [_scope(graph.node[p[1]].name)] if scope for n in names)]
        if len(ours) != len(names):
            raise ExportError(f"found {len(patterns)} attention blocks (MatMul → Softmax → MatMul) in the graph "
                              f"but the model has {len(names)} quantized attention modules, and their node names "
                              f"do not say which is which")
        patterns = ours
    return patterns


def _scope(node_name: str) -> str:
    """Module path from a TorchScript-exporter node name: '/blocks/blocks.0/attn/MatMul_1' → 'blocks.0.attn'."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if path and part.startswith(path + ".") else (f"{path}.{part}" if path else part)
    return path


def find_attention_patterns(graph: onnx.GraphProto) -> List[Tuple[int, int]]:
    """(index of q·kᵀ MatMul, index of softmax·v MatMul) per attention block, in graph order.

    Between the first MatMul and the Softmax only elementwise ops (scale Mul/Div, mask Add) may
    stand; between the Softmax and the second MatMul only Cast/Dropout/Identity.
    """
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output}
    consumers: Dict[str, List[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    init_names = {i.name for i in graph.initializer}
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Softmax":
            continue
        mm1 = _walk_up(graph, producer, init_names, node.input[0])
        mm2 = _walk_down(graph, consumers, node.output[0])
        if mm1 is not None and mm2 is not None:
            found.append((mm1, mm2))
    return found


def _walk_up(graph, producer, init_names, tensor: str) -> Optional[int]:
    for _ in range(6):
        idx = producer.get(tensor)
        if idx is None:
            return None
        node = graph.node[idx]
        if node.op_type == "MatMul":
            return idx
        if node.op_type not in ("Add", "Mul", "Div", "Where", "Cast"):
            return None
        dynamic = [t for t in node.input if t not in init_names and t in producer
                   and graph.node[producer[t]].op_type != "Constant"]
        if not dynamic:
            return None
        tensor = dynamic[-1] if node.op_type == "Where" else dynamic[0]
    return None


def _walk_down(graph, consumers, tensor: str) -> Optional[int]:
    for _ in range(4):
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return None
        node = graph.node[users[0]]
        if node.op_type == "MatMul" and node.input[0] == tensor:
            return users[0]
        if node.op_type not in ("Cast", "Dropout", "Identity"):
            return None
        tensor = node.output[0]
    return None


class _Editor:
    """Collects new initializers and nodes; nodes are inserted right before their consumer."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.index = GraphIndex(model)
        self._constant = self.index.add_initializer
        self.fingerprints = _fingerprints(self.graph)
        self.before: Dict[int, List[onnx.NodeProto]] = {}
        self.after: Dict[int, List[onnx.NodeProto]] = {}
        self.replaced: set = set()

    def quantize_weight(self, index: int, node, input_index: int, axis: int, scale: np.ndarray, base: str) -> None:
        w = self.index.array(node.input[input_index]).astype(np.float32)
        q = self._constant(f"{base}.weight_quantized", quantize_weight(w, scale, axis))
        s = self._constant(f"{base}.weight_scale", scale.astype(np.float32))
        z = self._constant(f"{base}.weight_zero_point", np.zeros_like(scale, dtype=np.int8))
        self.replaced.add(node.input[input_index])
        out = f"{base}.weight_dq"
        self.before.setdefault(index, []).append(helper.make_node(
            "DequantizeLinear", [q, s, z], [out], name=f"{base}/weight_quantizer/DequantizeLinear", axis=axis))
        node.input[input_index] = out

    def quantize_input(self, index: int, node, input_index: int, scale: float, base: str, zero_point: int = 0,
                       unsigned: bool = False, shift: Optional[np.ndarray] = None) -> None:
        """Per-tensor Q → DQ on one input of one node: int8 with zero point 0, or uint8 with ``zero_point``.

        With ``shift``: ``Sub(x, shift)`` first (the caller folds the shift into the bias).
        """
        if not unsigned and zero_point != 0:
            raise ExportError(f"{base}: a non-zero zero point needs uint8 (asymmetric) quantization")
        s = self._constant(f"{base}_scale", np.array(scale, dtype=np.float32))
        z = self._constant(f"{base}_zero_point", np.array(zero_point, dtype=np.uint8 if unsigned else np.int8))
        source = node.input[input_index]
        if shift is not None:
            shift_name = self._constant(f"{base}_shift", np.asarray(shift, dtype=np.float32))
            self.before.setdefault(index, []).append(helper.make_node(
                "Sub", [source, shift_name], [f"{base}_shifted"], name=f"{base}_shift/Sub"))
            source = f"{base}_shifted"
        self.before.setdefault(index, []).extend([
            helper.make_node("QuantizeLinear", [source, s, z], [f"{base}_q"], name=f"{base}_quantizer/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{base}_q", s, z], [f"{base}_dq"],
                             name=f"{base}_quantizer/DequantizeLinear"),
        ])
        node.input[input_index] = f"{base}_dq"

    def set_bias(self, index: int, node, bias: np.ndarray, base: str) -> None:
        """Make ``bias`` the bias of the layer computed by ``node`` (MatMul [+ Add], Gemm or Conv)."""
        name = self._constant(f"{base}.bias_folded", np.asarray(bias, dtype=np.float32).reshape(-1))
        if node.op_type in ("Gemm", "Conv"):
            if len(node.input) > 2 and node.input[2]:
                self.replaced.add(node.input[2])
                node.input[2] = name
            else:
                while len(node.input) < 2:
                    node.input.append("")
                node.input.append(name)
            return
        users = [n for n in self.graph.node if node.output[0] in n.input]
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = [i for i, t in enumerate(add.input) if t != node.output[0]]
            old_name = self._initializer_behind(add.input[other[0]]) if len(other) == 1 else None
            if old_name is not None:
                old = self.index.array(old_name)
                if old.size == bias.size:  # the Linear's own bias Add
                    self.replaced.add(old_name)
                    add.input[other[0]] = name
                    return
        # No bias Add after the MatMul (a Linear without bias): add one.
        out = node.output[0]
        node.output[0] = f"{base}/MatMul_output"
        self.after.setdefault(index, []).append(helper.make_node(
            "Add", [node.output[0], name], [out], name=f"{base}/bias/Add"))

    def _initializer_behind(self, tensor: str) -> Optional[str]:
        """The initializer a tensor is, directly or through Identity nodes, else None.

        The TorchScript exporter deduplicates equal initializers: two Linears whose biases are equal
        (cloned encoder layers, zero-initialised biases) share one, the second behind an Identity.
        Missing that once added the folded bias *beside* the old one (nn.TransformerEncoder, shift on).
        """
        while tensor not in self.index.inits:
            node = self.index.producer(tensor)  # Identity outputs are never renamed by the edits
            if node is None or node.op_type != "Identity":
                return None
            tensor = node.input[0]
        return tensor

    def center_tokens(self, index: int, node, base: str) -> str:
        """v → ``d = v - mean_tokens(v)`` as the MatMul's second input; returns the mean's name.

        Call it before v's quantize_input, so the Q/DQ quantizes d. ReduceMean takes its axes as
        an attribute up to opset 17 and as an input from opset 18.
        """
        v, mean, centred = node.input[1], f"{base}_token_mean", f"{base}_centred"
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        if opset >= 18:
            axes = self._constant(f"{base}_token_axis", np.array([-2], dtype=np.int64))
            reduce = helper.make_node("ReduceMean", [v, axes], [mean], name=f"{base}_token_mean/ReduceMean", keepdims=1)
        else:
            reduce = helper.make_node("ReduceMean", [v], [mean], name=f"{base}_token_mean/ReduceMean",
                                      axes=[-2], keepdims=1)
        self.before.setdefault(index, []).extend([
            reduce, helper.make_node("Sub", [v, mean], [centred], name=f"{base}_centre/Sub")])
        node.input[1] = centred
        return mean

    def undo_softmax_shift(self, index: int, node, shift: np.float32, mean: str, base: str) -> None:
        """After ``MatMul(Q(P - z), Q(d))``: add ``v̄ + z·ReduceSum(Q(d), tokens)``, giving P·Q(d) + v̄.

        Call it after v's quantize_input: the sum is over the dequantized d the MatMul reads
        (attention.py explains why both terms are needed). ReduceSum takes axes as an input from
        opset 13 on (we export ≥ 17).
        """
        axes = self._constant(f"{base}_token_axis_sum", np.array([-2], dtype=np.int64))
        z = self._constant(f"{base}_softmax_shift_back", np.asarray(shift, dtype=np.float32))
        out = node.output[0]
        node.output[0] = f"{base}/MatMul_output"
        self.after.setdefault(index, []).extend([
            helper.make_node("ReduceSum", [node.input[1], axes], [f"{base}_token_sum"],
                             name=f"{base}_token_sum/ReduceSum", keepdims=1),
            helper.make_node("Mul", [f"{base}_token_sum", z], [f"{base}_shift_back"], name=f"{base}_shift_back/Mul"),
            helper.make_node("Add", [mean, f"{base}_shift_back"], [f"{base}_restore"], name=f"{base}_restore/Add"),
            helper.make_node("Add", [node.output[0], f"{base}_restore"], [out], name=f"{base}_restore/Add_output"),
        ])

    def finish(self) -> onnx.ModelProto:
        _rebuild_node_list(self.graph, self.before, self.after)
        drop_unused_initializers(self.graph, self.replaced)
        return self.model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _key(array: np.ndarray) -> Tuple[Tuple[int, ...], str]:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def _fingerprints(graph: onnx.GraphProto) -> Dict[Tuple, str]:
    return {_key(numpy_helper.to_array(i)): i.name for i in graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}


def _find_consumers(graph, by_fingerprint, weight: np.ndarray):
    """(node position, node, index of its weight input, layout) for every MatMul/Gemm/Conv using this weight."""
    found = []
    as_is = by_fingerprint.get(_key(weight))
    transposed = by_fingerprint.get(_key(weight.T)) if weight.ndim == 2 else None
    for index, node in enumerate(graph.node):
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] == as_is:
            found.append((index, node, 1, "oi"))
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] == transposed:
            found.append((index, node, 1, "io"))
        elif node.op_type == "Gemm" and len(node.input) > 1:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                continue
            if attrs.get("transB", 0) and node.input[1] == as_is:
                found.append((index, node, 1, "oi"))
            elif not attrs.get("transB", 0) and node.input[1] == transposed:
                found.append((index, node, 1, "io"))
    return found


def _rebuild_node_list(graph, new_nodes: Dict[int, List[onnx.NodeProto]],
                       after: Optional[Dict[int, List[onnx.NodeProto]]] = None) -> None:
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(new_nodes.get(i, []))
        nodes.append(node)
        nodes.extend((after or {}).get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
