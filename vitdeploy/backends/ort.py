"""ONNX Runtime on the CPU: the executable reference for every exported model and the cpu target."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..errors import InputError
from .base import Runner, TensorSpec

_ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32),
              "tensor(uint8)": np.dtype(np.uint8), "tensor(int8)": np.dtype(np.int8)}


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: Optional[int] = None):
        super().__init__()
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputError(f"ONNX model not found: {self.model_path}")
        self.threads = threads
        self.session = None

    def activate_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"ONNX Runtime cannot load {self.model_path}: {str(exc).strip().splitlines()[0]}") from exc

    def deactivate_impl(self) -> None:
        self.session = None

    def input_spec_impl(self) -> Dict[str, TensorSpec]:
        return {i.name: TensorSpec(tuple(d if isinstance(d, int) else None for d in i.shape),
                                   _ORT_TYPES.get(i.type, np.dtype(np.float32)))
                for i in self.session.get_inputs()}

    def output_names(self):
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names(), outputs))
