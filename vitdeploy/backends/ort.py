"""ONNX Runtime on the CPU, as a Polygraphy runner: the reference for every exported model and the cpu target.

    with OrtRunner("model.int8.onnx", qdq="float") as runner:
        logits = runner.infer({"input": batch})["logits"]
        runner.last_inference_time()

Two ways to run a QDQ file (``qdq``):

- ``"fused"`` (the default, what a user's app gets): ONNX Runtime fuses Q/DQ pairs into its integer
  kernels, whose arithmetic depends on the host CPU (`vitdeploy.cpu_isa`). Opening a file that this
  CPU does not compute exactly logs a one-line warning.
- ``"float"``: Q/DQ evaluated as the ONNX operators define them, in float
  (``session.disable_quant_qdq``). That is what TensorRT computes (it sums INT8 products in int32),
  on any host: the reference for TensorRT targets and for checking the fused kernels.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from ..errors import InputError
from ..log import get_logger

log = get_logger(__name__)
QDQ_MODES = ("fused", "float")


class OrtRunner(OnnxrtRunner):
    """Polygraphy's OnnxrtRunner on a session vitdeploy configures (threads, Q/DQ mode, one-line load
    errors), that also runs a file exported for batch 1 on any batch, image by image."""

    def __init__(self, model_path: str | Path, threads: Optional[int] = None, qdq: str = "fused",
                 warn_inexact: bool = True):
        if qdq not in QDQ_MODES:
            raise ValueError(f"qdq must be one of {QDQ_MODES}, got {qdq!r}")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputError(f"ONNX model not found: {self.model_path}")
        self.threads, self.qdq, self.warn_inexact = threads, qdq, warn_inexact
        super().__init__(self._session, name=f"onnxruntime ({self.model_path.name})")

    def _session(self):
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
            return ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"ONNX Runtime cannot load {self.model_path}: {str(exc).strip().splitlines()[0]}") from exc

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for node in self.sess.get_inputs():  # a static batch of 1 takes any batch (see infer_impl)
            shape = [None if i == 0 and d == 1 else d for i, d in enumerate(node.shape)]
            meta.add(node.name, DataType.from_dtype(node.type, "onnxruntime"), shape)
        return meta

    def infer_impl(self, feed_dict):
        # Not OnnxrtRunner's: it checks for torch tensors, which imports torch (~500 MB) into a process
        # whose memory `bench` measures.
        start = time.perf_counter()
        names = [o.name for o in self.sess.get_outputs()]
        batch = len(next(iter(feed_dict.values())))
        if self.sess.get_inputs()[0].shape[0] != 1 or batch == 1:
            outputs = self.sess.run(names, feed_dict)
        else:  # a file exported for batch 1 (a model that would not export batch-dynamic): image by image
            pieces = [self.sess.run(names, {k: v[i:i + 1] for k, v in feed_dict.items()}) for i in range(batch)]
            outputs = [np.concatenate(parts) for parts in zip(*pieces)]
        self.inference_time = time.perf_counter() - start
        return dict(zip(names, outputs))
