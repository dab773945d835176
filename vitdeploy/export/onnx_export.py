"""PyTorch → FP32 ONNX, opset 17, dynamic batch (checked), LayerNorm as one LayerNormalization node.

The TorchScript-based exporter is used on purpose: it names nodes after module paths
(``/blocks/blocks.0/attn/qkv/MatMul``), keeps LayerNormalization whole at opset ≥ 17 and is stable
across torch releases. The INT8 file is the fake-quant model's own export (`export_like`): its
quantizers export as QuantizeLinear/DequantizeLinear themselves (export/qdq.py).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Optional

import onnx

from ..artifacts import ModelSpec
from ..errors import ExportError, first_line
from ..log import get_logger

log = get_logger(__name__)

DEFAULT_OPSET = 17
#: Metadata naming how a file was exported, so the INT8 file is exported the same way as the FP32 one.
EXPORTER_KEY = "vitdeploy.exporter"
TORCHSCRIPT, STRICT, BATCH_ONE = "torchscript", "torch.export", "torchscript, batch 1"


def export_fp32(model, spec: ModelSpec, path: Path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The FP32 ONNX with a dynamic batch, checked at two batch sizes against PyTorch.

    The TorchScript exporter traces: user code that reads the batch as a Python int (``len(x)``,
    ``x.size(0)`` passed through int()) gets the export batch baked in, and the file fails, or
    silently computes wrong, at any other batch. Then strict ``torch.export`` (which follows
    ``len(x)`` symbolically) is tried, through the dynamo exporter; if that fails too, the file is
    exported at batch 1 with a one-line warning, and everything downstream runs it one image at a time.
    `export_like` exports the quantized model the same way.
    """
    proto, exporter = _export_torchscript(model, spec, opset, batch=2, dynamic=True), TORCHSCRIPT
    problem = batch_problem(proto, model, spec)
    if problem:
        try:
            candidate = _export_strict(model, spec, opset)
            second = batch_problem(candidate, model, spec)
        except ExportError as exc:
            second = str(exc)
        if not second:
            log.info("the TorchScript export baked the batch in (%s): exported with torch.export instead", problem)
            proto, exporter = candidate, STRICT
        else:
            log.warning("%s cannot be exported with a dynamic batch (%s; torch.export: %s): it is exported for batch "
                        "1 and run one image at a time", spec.name, problem, second)
            proto, exporter = _export_torchscript(model, spec, opset, batch=1, dynamic=False), BATCH_ONE
    proto.producer_name = "vitdeploy"
    onnx.helper.set_model_props(proto, {EXPORTER_KEY: exporter})
    save_model(proto, path)
    return proto


def export_like(model, spec: ModelSpec, reference: onnx.ModelProto, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """``model`` (the fake-quant twin) exported the way `export_fp32` exported ``reference`` (its
    ``vitdeploy.exporter`` metadata): TorchScript with a dynamic batch, strict torch.export, or batch 1."""
    exporter = exporter_of(reference)
    if exporter == STRICT:
        proto = _export_strict(model, spec, opset)
    else:
        proto = _export_torchscript(model, spec, opset, batch=1 if exporter == BATCH_ONE else 2,
                                    dynamic=exporter != BATCH_ONE)
    proto.producer_name = "vitdeploy"
    onnx.helper.set_model_props(proto, {EXPORTER_KEY: exporter})
    return proto


def exporter_of(proto: onnx.ModelProto) -> str:
    """How `export_fp32` exported ``proto``: TORCHSCRIPT (also for files without the record), STRICT or BATCH_ONE."""
    return {p.key: p.value for p in proto.metadata_props}.get(EXPORTER_KEY, TORCHSCRIPT)


def fixed_batch(proto: onnx.ModelProto) -> Optional[int]:
    """The input's static batch size, or None when the batch is dynamic."""
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def batch_problem(proto: onnx.ModelProto, model, spec: ModelSpec, batches=(1, 3)) -> str:
    """"" when ONNX Runtime runs ``proto`` at each of ``batches`` and matches PyTorch, else what went wrong."""
    import numpy as np
    import onnxruntime as ort
    import torch

    if fixed_batch(proto) is not None:
        return f"its input has a fixed batch of {fixed_batch(proto)}"
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions, in one line
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"ONNX Runtime cannot load it: {first_line(exc, 160)}"
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        x = torch.randn(batch, *spec.input_size, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        try:
            (got,) = session.run([spec.output_name], {spec.input_name: x.numpy()})
        except Exception as exc:
            return f"at batch {batch} ONNX Runtime fails: {first_line(exc, 160)}"
        if got.shape != expected.shape:
            return f"at batch {batch} the output is {list(got.shape)}, not {list(expected.shape)}"
        error = float(np.abs(got - expected).max())
        if error > 1e-3 * max(1.0, float(np.abs(expected).max())):
            return f"at batch {batch} the output differs from PyTorch by {error:.3g}"
    return ""


def _export_torchscript(model, spec: ModelSpec, opset: int, batch: int, dynamic: bool) -> onnx.ModelProto:
    import torch

    dummy = torch.zeros(batch, *spec.input_size)
    buffer = io.BytesIO()
    axes = {spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}} if dynamic else None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python code
            torch.onnx.export(
                model, (dummy,), buffer, opset_version=opset, dynamo=False, do_constant_folding=True,
                input_names=[spec.input_name], output_names=[spec.output_name], dynamic_axes=axes,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {first_line(exc, 160)}") from exc
    return onnx.load_from_string(buffer.getvalue())


def _export_strict(model, spec: ModelSpec, opset: int) -> onnx.ModelProto:
    """Strict torch.export with a symbolic batch, then the dynamo ONNX exporter (opset ≥ 18)."""
    import torch

    dummy = torch.zeros(2, *spec.input_size)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (dummy,), strict=True,
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
            onnx_program = torch.onnx.export(program, (dummy,), dynamo=True, opset_version=max(opset, 18),
                                             input_names=[spec.input_name], output_names=[spec.output_name])
            buffer = io.BytesIO()
            onnx.save(onnx_program.model_proto, buffer)
    except Exception as exc:
        raise ExportError(f"{type(exc).__name__}: {first_line(exc, 160)}") from exc
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def _quiet_logging():
    """torch.export logs its failures (guards, constraint violations) as ERROR records with
    tracebacks; the exception says the same, and the build reports it in one line."""
    import logging

    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


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
