"""PyTorch → FP32 ONNX, opset 17, dynamic batch, LayerNorm as one LayerNormalization node.

The TorchScript-based exporter is used on purpose: it names nodes after module paths
(``/blocks/blocks.0/attn/qkv/MatMul``), keeps LayerNormalization whole at opset ≥ 17 and is stable
across torch releases; the Q/DQ pass finds layers by their weights, not by these names.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx

from ..artifacts import ModelSpec
from ..errors import ExportError

DEFAULT_OPSET = 17


def export_fp32(model, spec: ModelSpec, path: Path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    import torch

    dummy = torch.zeros(2, *spec.input_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python code
            torch.onnx.export(
                model, (dummy,), buffer, opset_version=opset, dynamo=False, do_constant_folding=True,
                input_names=[spec.input_name], output_names=[spec.output_name],
                dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "vitdeploy"
    save_model(proto, path)
    return proto


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """Check, then write to a temporary name and rename."""
    check_model(proto, str(path))
    from ..outputs import atomic_write

    atomic_write(Path(path), lambda f: f.write(proto.SerializeToString()))


def check_model(proto: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"{what} fails onnx.checker: {str(exc).strip().splitlines()[0]}") from exc
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        raise ExportError(f"{what}: opset {opset} < 17 (LayerNormalization needs 17)")
    ops = {n.op_type for n in proto.graph.node}
    if "Pow" in ops and "ReduceMean" in ops and "LayerNormalization" not in ops:
        raise ExportError(f"{what}: LayerNorm was decomposed into Pow/ReduceMean (overflows in FP16)")
