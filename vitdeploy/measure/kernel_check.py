"""Does this host's ONNX Runtime compute a QDQ file's integer products exactly? Each layer, at its worst input.

An end-to-end comparison of fused kernels with Q/DQ in float cannot tell saturation from rounding:
ONNX Runtime's integer kernels scale their int32 sums in another order than float Q/DQ does, an
activation then lands on the neighbouring INT8 code now and then, and a sensitive model amplifies
those flips (on the real ViT-Tiny's default plan, logit cosine 0.988 with exact kernels). So each
quantized MatMul / Gemm is run alone, fused and with Q/DQ in float, on the input that drives
every pair of integer products to its extreme: for output column n, one row whose kernel-side
activation byte is 255 where ``w[k, n] > 0`` and 0 elsewhere, and one row the other way round
(``vpmaddubsw`` sees u8 bytes; a signed activation is moved there by +128 first). Whatever the
kernel's pairing, no input gives a larger pair sum, so a layer that is exact here is exact for
every input. An attention matmul (both operands activations) gets all-extreme operands.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np

__all__ = ["KernelCheck", "check_integer_kernels", "RTOL"]

#: Largest relative difference (to the layer's largest output) counted as exact: float rounding.
RTOL = 1e-5


@dataclasses.dataclass
class KernelCheck:
    layers: int = 0
    skipped: int = 0                 # Conv (checked statically by cpu_isa.exact_on instead)
    max_rel_error: float = 0.0
    worst: Optional[str] = None
    failed: List[str] = dataclasses.field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"layers": self.layers, "skipped": self.skipped, "max_rel_error": self.max_rel_error,
                "worst": self.worst, "failed": list(self.failed), "exact": self.exact, "rtol": RTOL}


def _params(node, array):
    scale = array(node.input[1])
    zp = array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return scale, zp, axis


def _code_range(dtype) -> tuple:
    return (0, 255) if np.dtype(dtype) == np.uint8 else (-128, 127)


def _mini_model(a_scale, a_zp, b_part, k: int, n: int):
    """x[M, K] → Q/DQ → MatMul with B (a constant DQ'd weight or a second Q/DQ'd input)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(a_scale, np.float32).reshape(()), "as"),
             numpy_helper.from_array(np.asarray(a_zp).reshape(()), "az")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])]
    kind, values, scale, zp, axis = b_part
    if kind == "weight":
        inits += [numpy_helper.from_array(values, "w"), numpy_helper.from_array(np.asarray(scale, np.float32), "ws"),
                  numpy_helper.from_array(np.asarray(zp), "wz")]
        nodes.append(helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=axis))
    else:
        inits += [numpy_helper.from_array(np.asarray(scale, np.float32).reshape(()), "bs"),
                  numpy_helper.from_array(np.asarray(zp).reshape(()), "bz")]
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n]))
        nodes += [helper.make_node("QuantizeLinear", ["b", "bs", "bz"], ["bq"]),
                  helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["wd"])]
    nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
    graph = helper.make_graph(nodes, "kernel_check", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_both(model, feeds: Dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    outputs = []
    for disable in (False, True):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        if disable:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds)[0].astype(np.float64))
    fused, reference = outputs
    return float(np.abs(fused - reference).max() / max(np.abs(reference).max(), 1e-30))


def _activation_values(kernel_bytes: np.ndarray, scale, zp) -> np.ndarray:
    """Float inputs whose QuantizeLinear codes put ``kernel_bytes`` (0..255) into a u8×s8 kernel."""
    zp_value = int(np.asarray(zp).reshape(-1)[0])
    codes = kernel_bytes.astype(np.int32) - (128 if np.asarray(zp).dtype == np.int8 else 0)
    return ((codes - zp_value) * np.float32(np.asarray(scale).reshape(-1)[0])).astype(np.float32)


def check_integer_kernels(model) -> KernelCheck:
    """Every quantized MatMul/Gemm of ``model`` (an ONNX ModelProto) alone, fused vs float Q/DQ."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    array = lambda name: numpy_helper.to_array(inits[name])
    producer = {out: n for n in graph.node for out in n.output}
    result = KernelCheck()
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        a_dq, b_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if a_dq is None or b_dq is None or a_dq.op_type != "DequantizeLinear" or b_dq.op_type != "DequantizeLinear":
            continue
        a_q = producer.get(a_dq.input[0])
        if node.op_type == "Conv" or a_q is None or a_q.op_type != "QuantizeLinear" \
                or any(name not in inits for name in a_dq.input[1:]):
            result.skipped += 1
            continue
        a_scale, a_zp, _ = _params(a_dq, array)
        if b_dq.input[0] in inits:  # a weight
            w = array(b_dq.input[0])
            w_scale, w_zp, axis = _params(b_dq, array)
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            if w.ndim != 2 or np.asarray(w_scale).size not in (1, w.shape[0] if trans_b else w.shape[1]):
                result.skipped += 1
                continue
            if trans_b:
                w, axis = np.ascontiguousarray(w.T), 1
            k, n = w.shape
            signed = w.astype(np.int32) - np.asarray(w_zp, np.int32).reshape(1, -1 if np.asarray(w_zp).size > 1 else 1)
            kernel_bytes = np.concatenate([(signed > 0).T, (signed < 0).T]).astype(np.int32) * 255  # [2N, K]
            model_b = _mini_model(a_scale, a_zp, ("weight", w, w_scale, w_zp, axis), k, n)
            feeds = {"x": _activation_values(kernel_bytes, a_scale, a_zp)}
        else:  # both operands are activations (attention)
            b_q = producer.get(b_dq.input[0])
            if b_q is None or any(name not in inits for name in b_dq.input[1:]):
                result.skipped += 1
                continue
            b_scale, b_zp, _ = _params(b_dq, array)
            k, n = 256, 2
            lo, hi = _code_range(np.asarray(b_zp).dtype)
            b_zp_value = int(np.asarray(b_zp).reshape(-1)[0])
            b_codes = np.stack([np.full(k, hi), np.full(k, lo)], axis=1)
            model_b = _mini_model(a_scale, a_zp, ("activation", None, b_scale, b_zp, None), k, n)
            feeds = {"x": _activation_values(np.full((2, k), 255), a_scale, a_zp),
                     "b": ((b_codes - b_zp_value) * np.float32(np.asarray(b_scale).reshape(-1)[0])).astype(np.float32)}
        error = _run_both(model_b, feeds)
        result.layers += 1
        if result.worst is None or error > result.max_rel_error:
            result.max_rel_error, result.worst = error, node.name
        if error > RTOL:
            result.failed.append(node.name)
    return result
