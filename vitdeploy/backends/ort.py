"""ONNX Runtime on the CPU: the executable reference for every exported model and the cpu target.

Two ways to run a QDQ file (``qdq``):

- ``"fused"`` (the default, what a user's app gets): ONNX Runtime fuses Q/DQ pairs into its integer
  kernels, whose arithmetic depends on the host CPU (`vitdeploy.cpu_isa`). Opening a file that this
  CPU does not compute exactly logs a one-line warning.
- ``"float"``: Q/DQ evaluated as the ONNX operators define them, in float
  (``session.disable_quant_qdq``). That is what TensorRT computes (it sums INT8 products in int32),
  on any host: the reference for TensorRT targets and for checking the fused kernels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..errors import InputError
from ..log import get_logger
from .base import Runner, TensorSpec

log = get_logger(__name__)
QDQ_MODES = ("fused", "float")

_ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32),
              "tensor(uint8)": np.dtype(np.uint8), "tensor(int8)": np.dtype(np.int8)}


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: Optional[int] = None, qdq: str = "fused",
                 warn_inexact: bool = True):
        super().__init__()
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputError(f"ONNX model not found: {self.model_path}")
        if qdq not in QDQ_MODES:
            raise ValueError(f"qdq must be one of {QDQ_MODES}, got {qdq!r}")
        self.threads = threads
        self.qdq = qdq
        self.warn_inexact = warn_inexact
        self.session = None

    def activate_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 4  # a failing run raises; its one-line message is ours to print
        if self.qdq == "float":
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        elif self.warn_inexact:
            from ..cpu_isa import inexact_reason

            reason = inexact_reason(self.model_path)
            if reason:
                log.warning("%s", reason)
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"ONNX Runtime cannot load {self.model_path}: {str(exc).strip().splitlines()[0]}") from exc

    def deactivate_impl(self) -> None:
        self.session = None

    def input_spec_impl(self) -> Dict[str, TensorSpec]:
        # A static batch of 1 takes any batch: `infer_impl` runs it one image at a time.
        return {i.name: TensorSpec(tuple(d if isinstance(d, int) and not (axis == 0 and d == 1) else None
                                         for axis, d in enumerate(i.shape)),
                                   _ORT_TYPES.get(i.type, np.dtype(np.float32)))
                for i in self.session.get_inputs()}

    def output_names(self):
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        static = self.session.get_inputs()[0].shape[0]
        batch = len(next(iter(feeds.values())))
        if static == 1 and batch > 1:
            # A file exported for batch 1 (a model that would not export batch-dynamic): image by image.
            pieces = [self.session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(batch)]
            outputs = [np.concatenate(parts) for parts in zip(*pieces)]
        else:
            outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names(), outputs))
