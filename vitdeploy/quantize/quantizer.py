"""The fake-quantizer module: symmetric INT8 with explicit modes and its amax in a buffer.

Modes (ModelOpt's TensorQuantizer has the same switches): ``calibrating`` collects statistics and
passes values through; ``enabled`` with an amax fake-quantizes; ``enabled = False`` is identity (a
layer the plan keeps in floating point).
Rounding is half-to-even and the integer range is [-128, 127], exactly as ONNX QuantizeLinear does,
so the PyTorch model and the exported QDQ graph compute the same numbers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .calibrators import make_calibrator


def int_range(num_bits: int):
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, num_bits: int = 8, axis: Optional[int] = None) -> torch.Tensor:
    qmin, qmax = int_range(num_bits)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


class TensorQuantizer(nn.Module):
    """Symmetric quantizer: per-tensor (``axis=None``) or per-channel along ``axis``."""

    def __init__(self, num_bits: int = 8, axis: Optional[int] = None, calib_method: str = "max", **calib_kwargs):
        super().__init__()
        self.num_bits = num_bits
        self.axis = axis
        self.calib_method = calib_method
        self.calib_kwargs = dict(calib_kwargs)
        self.enabled = True
        self.calibrating = False
        self.register_buffer("amax", None)
        self._calibrator = None

    # -- modes ---------------------------------------------------------------------------------
    def enable_calib(self) -> None:
        self._calibrator = make_calibrator(self.calib_method, axis=self.axis, **self.calib_kwargs)
        self.calibrating = True

    def load_calib_amax(self) -> None:
        """Finish calibration: amax from the collected statistics, then quantize from now on."""
        if self._calibrator is None:
            raise RuntimeError("load_calib_amax() called before enable_calib()")
        self.set_amax(self._calibrator.compute_amax())
        self._calibrator = None
        self.calibrating = False

    def set_amax(self, amax) -> None:
        amax = torch.as_tensor(amax, dtype=torch.float32).detach().clone()
        # A dead channel (all zeros) gets a tiny amax: scales must stay > 0 for ONNX and TensorRT.
        self.amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny * 2 ** 24)

    # -- values --------------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return int_range(self.num_bits)[1]

    @property
    def scale(self) -> torch.Tensor:
        """amax / qmax in float32: the exact value written into the ONNX scale initializer."""
        if self.amax is None:
            raise RuntimeError("quantizer has no amax: calibrate first")
        return (self.amax / self.qmax).to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._calibrator.collect(x.detach())
            return x
        if not self.enabled or self.amax is None:
            return x
        return fake_quantize(x, self.scale, self.num_bits, self.axis)

    def extra_repr(self) -> str:
        state = "calib" if self.calibrating else ("on" if self.enabled else "off")
        amax = "none" if self.amax is None else (f"{float(self.amax):.4g}" if self.amax.numel() == 1
                                                  else f"[{self.amax.numel()} channels]")
        axis = "per-tensor" if self.axis is None else f"axis={self.axis}"
        return f"int{self.num_bits} {axis} {self.calib_method} amax={amax} {state}"
