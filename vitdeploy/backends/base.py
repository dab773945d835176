"""The one interface every backend implements (a trimmed Polygraphy runner).

    with OrtRunner("model.onnx") as runner:
        logits = runner.infer({"input": batch})["logits"]
        runner.last_latency_ms

The base class owns the lifecycle and checks feeds against ``input_spec()``; subclasses fill in
``activate_impl``/``infer_impl``/``deactivate_impl`` and ``input_spec_impl``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[Optional[int], ...]   # None for a dynamic dimension
    dtype: np.dtype


class Runner:
    name = "runner"

    def __init__(self):
        self.is_active = False
        self.last_latency_ms: Optional[float] = None

    # lifecycle -------------------------------------------------------------------------------
    def __enter__(self):
        self.activate_impl()
        self.is_active = True
        return self

    def __exit__(self, *exc):
        self.deactivate_impl()
        self.is_active = False

    # inference -------------------------------------------------------------------------------
    def input_spec(self) -> Dict[str, TensorSpec]:
        return self.input_spec_impl()

    def infer(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: use the runner inside a 'with' block")
        self._check_feeds(feeds)
        # An implementation with a better clock (CUDA events) sets last_latency_ms itself.
        self.last_latency_ms = None
        start = time.perf_counter()
        outputs = self.infer_impl(feeds)
        if self.last_latency_ms is None:
            self.last_latency_ms = (time.perf_counter() - start) * 1e3
        return outputs

    def _check_feeds(self, feeds: Dict[str, np.ndarray]) -> None:
        spec = self.input_spec()
        missing = set(spec) - set(feeds)
        extra = set(feeds) - set(spec)
        if missing or extra:
            raise InputError(f"{self.name}: inputs {sorted(feeds)} do not match the model's {sorted(spec)}")
        for name, tensor_spec in spec.items():
            array = feeds[name]
            if array.dtype != tensor_spec.dtype:
                raise InputError(f"{self.name}: input '{name}' must be {tensor_spec.dtype}, got {array.dtype}")
            if len(array.shape) != len(tensor_spec.shape) or any(
                    want is not None and want != got for want, got in zip(tensor_spec.shape, array.shape)):
                raise InputError(f"{self.name}: input '{name}' has shape {list(array.shape)}, "
                                 f"the model expects {list(tensor_spec.shape)}")

    # to implement ----------------------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def input_spec_impl(self) -> Dict[str, TensorSpec]:
        raise NotImplementedError

    def infer_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError
