"""Insert Q/DQ into an FP32 ONNX graph from a calibrated PyTorch model.

Each quantized layer is found in the graph by its weights (the initializer equal to W, or to Wᵀ
for MatMul), not by node names, so the pass works whatever the exporter called things.
Weights become INT8 initializers with a per-output-channel DequantizeLinear (axis 0 for Conv and
Gemm(transB=1), the last axis for MatMul's K×N); the layer's activation input gets a per-tensor
QuantizeLinear → DequantizeLinear pair. Zero points are 0: symmetric, as TensorRT requires.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What the ONNX pass needs from one quantized layer."""

    weight: np.ndarray          # float32, PyTorch layout [out, in(, kh, kw)]
    weight_scale: np.ndarray    # float32 [out]
    input_scale: float          # float32 per-tensor


def layer_quant_from_module(module) -> LayerQuant:
    return LayerQuant(
        weight=module.weight.detach().cpu().numpy().astype(np.float32),
        weight_scale=module.weight_quantizer.scale.detach().cpu().numpy().astype(np.float32).reshape(-1),
        input_scale=np.float32(module.input_quantizer.scale.detach().cpu().reshape(-1)[0]),
    )


def quantize_weight(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """Same arithmetic as QuantizeLinear (and the PyTorch fake quantizer): round half to even."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.rint(weight / scale.reshape(shape)), -128, 127).astype(np.int8)


def insert_qdq(model: onnx.ModelProto, layers: Dict[str, LayerQuant]) -> onnx.ModelProto:
    """A new model with Q/DQ for every layer in ``layers``; raises ExportError if one is not found."""
    model = _copy(model)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    by_fingerprint = _fingerprints(graph)
    new_nodes: Dict[int, List[onnx.NodeProto]] = {}  # index of consumer → nodes to insert before it
    removed = set()
    for name, lq in layers.items():
        matches = _find_consumers(graph, by_fingerprint, lq.weight)
        if not matches:
            raise ExportError(f"layer {name}: its weights were not found in the exported graph")
        for index, node, weight_input, layout in matches:
            axis = {"oi": 0, "io": 1}[layout]
            w = numpy_helper.to_array(inits[node.input[weight_input]]).astype(np.float32)
            base = name
            q_name, s_name, z_name = f"{base}.weight_quantized", f"{base}.weight_scale", f"{base}.weight_zero_point"
            if q_name not in inits:
                q_init = numpy_helper.from_array(quantize_weight(w, lq.weight_scale, axis), q_name)
                s_init = numpy_helper.from_array(lq.weight_scale.astype(np.float32), s_name)
                z_init = numpy_helper.from_array(np.zeros_like(lq.weight_scale, dtype=np.int8), z_name)
                graph.initializer.extend([q_init, s_init, z_init])
                inits.update({q_name: q_init, s_name: s_init, z_name: z_init})
            removed.add(node.input[weight_input])
            dq_w = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [f"{base}.weight_dq"],
                                    name=f"{base}/weight_quantizer/DequantizeLinear", axis=axis)
            act = node.input[0]
            a_s, a_z = f"{base}.input_scale", f"{base}.input_zero_point"
            if a_s not in inits:
                s_init = numpy_helper.from_array(np.array(lq.input_scale, dtype=np.float32), a_s)
                z_init = numpy_helper.from_array(np.array(0, dtype=np.int8), a_z)
                graph.initializer.extend([s_init, z_init])
                inits.update({a_s: s_init, a_z: z_init})
            q_act = helper.make_node("QuantizeLinear", [act, a_s, a_z], [f"{base}.input_q"],
                                     name=f"{base}/input_quantizer/QuantizeLinear")
            dq_act = helper.make_node("DequantizeLinear", [f"{base}.input_q", a_s, a_z], [f"{base}.input_dq"],
                                      name=f"{base}/input_quantizer/DequantizeLinear")
            node.input[0] = f"{base}.input_dq"
            node.input[weight_input] = f"{base}.weight_dq"
            new_nodes.setdefault(index, []).extend([q_act, dq_act, dq_w])
    _rebuild_node_list(graph, new_nodes)
    _drop_unused_initializers(graph, removed)
    return model


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


def _rebuild_node_list(graph, new_nodes: Dict[int, List[onnx.NodeProto]]) -> None:
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(new_nodes.get(i, []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused_initializers(graph, candidates) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name not in candidates or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
