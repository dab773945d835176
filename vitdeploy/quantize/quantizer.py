"""The fake-quantizer module: symmetric INT8 (or asymmetric UINT8) with explicit modes, its range in buffers.

Modes (ModelOpt's TensorQuantizer has the same switches): ``calibrating`` collects statistics and
passes values through; ``enabled`` with an amax fake-quantizes; ``enabled = False`` is identity (a
layer the plan keeps in floating point).
Rounding is half-to-even and the integer range is [-128, 127], exactly as ONNX QuantizeLinear does,
so the PyTorch model and the exported QDQ graph compute the same numbers.

``unsigned=True`` is asymmetric quantization (ONNX Runtime only; TensorRT takes none): codes
[0, 2^bits - 1] with a zero point, calibrated with the running min and max of the data. The
range always contains 0, so a zero stays exactly zero, as ONNX Runtime's own quantizer does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .calibrators import MinMaxCalibrator, make_calibrator


#: Set by `exporting`: quantizers then compute through ops the ONNX exporters write as
#: QuantizeLinear/DequantizeLinear -- torch's fake-quantize ops for the TorchScript exporter, PT2E's
#: quantized_decomposed ops for torch.export (which has no fake-tensor kernel for the former). A flag
#: of our own: torch.export traces before the ONNX export starts, so torch.onnx.is_in_onnx_export()
#: would not say so there.
_EXPORTING: Optional[str] = None   # None, or the exporter's name (export/onnx_export.py: "torch.export", ...)


@contextlib.contextmanager
def exporting(model: nn.Module, exporter: str = "torchscript") -> Iterator[None]:
    """The quantizers of ``model`` as exportable Q/DQ while the block runs (export/qdq.py), for
    ``exporter`` "torch.export" (strict) or, for any other name, the TorchScript exporter. Per-tensor
    scales and zero points become Python numbers first: read from a buffer inside the trace, torch.export
    would take them for data-dependent values."""
    global _EXPORTING
    if exporter == "torch.export":
        import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the quantized_decomposed ops
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    for q in quantizers:
        q._export_qparams = (float(q.scale), int(q.zero_point)) if q.axis is None and q.amax is not None else None
    before, _EXPORTING = _EXPORTING, exporter
    try:
        yield
    finally:
        _EXPORTING = before
        for q in quantizers:
            q._export_qparams = None


def int_range(num_bits: int):
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def uint_range(num_bits: int):
    return 0, 2 ** num_bits - 1


def fake_quantize_unsigned(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, num_bits: int = 8):
    """QuantizeLinear → DequantizeLinear with a uint zero point: ((clamp(round(x/s) + z, 0, 2^b-1)) - z)·s."""
    qmin, qmax = uint_range(num_bits)
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, num_bits: int = 8, axis: Optional[int] = None) -> torch.Tensor:
    qmin, qmax = int_range(num_bits)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


class TensorQuantizer(nn.Module):
    """Symmetric quantizer: per-tensor (``axis=None``) or per-channel along ``axis``.

    With ``unsigned=True`` (per-tensor only): asymmetric, codes [0, 2^bits - 1] and a zero point.
    """

    def __init__(self, num_bits: int = 8, axis: Optional[int] = None, calib_method: str = "max",
                 unsigned: bool = False, **calib_kwargs):
        super().__init__()
        if unsigned and axis is not None:
            raise ValueError("asymmetric (unsigned) quantization is per-tensor only")
        self.num_bits = num_bits
        self.axis = axis
        self.calib_method = calib_method
        self.calib_kwargs = dict(calib_kwargs)
        self.unsigned = unsigned
        self.enabled = True
        self.calibrating = False
        #: Simulation only (the thesis's W8A8 setting): one dynamic scale per token, max |x| over the
        #: last dimension at run time. TensorRT takes per-tensor activation scales, so nothing exports it.
        self.per_token = False
        self.register_buffer("amax", None)
        self.register_buffer("range_min", None)   # unsigned mode: the calibrated [min, max]
        self.register_buffer("range_max", None)
        self._calibrator = None

    # -- modes ---------------------------------------------------------------------------------
    def enable_calib(self) -> None:
        if self.unsigned:
            self._calibrator = MinMaxCalibrator(axis=None)  # a zero point needs both ends of the range
        else:
            self._calibrator = make_calibrator(self.calib_method, axis=self.axis, **self.calib_kwargs)
        self.calibrating = True

    def load_calib_amax(self) -> None:
        """Finish calibration: amax (or min/max) from the collected statistics, then quantize from now on."""
        if self._calibrator is None:
            raise RuntimeError("load_calib_amax() called before enable_calib()")
        if self.unsigned:
            self.set_range(*self._calibrator.compute_range())
        else:
            self.set_amax(self._calibrator.compute_amax())
        self._calibrator = None
        self.calibrating = False

    def set_range(self, lo, hi) -> None:
        """Unsigned mode: the range [lo, hi] (widened to contain 0) the codes 0 .. 2^bits - 1 cover."""
        if not self.unsigned:
            raise RuntimeError("set_range() is for unsigned (asymmetric) quantizers; use set_amax()")
        lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32).detach().clone(), max=0.0)
        hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32).detach().clone(), min=0.0)
        hi = torch.maximum(hi, lo + torch.finfo(torch.float32).tiny * 2 ** 24 * self.qmax)  # scale > 0
        self.range_min, self.range_max = lo, hi
        self.amax = torch.maximum(lo.abs(), hi.abs())  # for records: the symmetric amax of the same range

    def set_amax(self, amax) -> None:
        if self.unsigned:  # an unsigned quantizer given only an amax covers [-amax, amax]
            amax = torch.as_tensor(amax, dtype=torch.float32)
            self.set_range(-amax, amax)
            return
        amax = torch.as_tensor(amax, dtype=torch.float32).detach().clone()
        # A dead channel (all zeros) gets a tiny amax: scales must stay > 0 for ONNX and TensorRT.
        self.amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny * 2 ** 24)

    # -- values --------------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return (uint_range if self.unsigned else int_range)(self.num_bits)[1]

    @property
    def scale(self) -> torch.Tensor:
        """amax / qmax (unsigned: (max - min) / qmax) in float32: the value written into the ONNX scale."""
        if self.amax is None:
            raise RuntimeError("quantizer has no amax: calibrate first")
        if self.unsigned:
            return ((self.range_max - self.range_min) / self.qmax).to(torch.float32)
        return (self.amax / self.qmax).to(torch.float32)

    @property
    def zero_point(self) -> int:
        """The integer zero point: 0 when symmetric; round(-min / scale) when unsigned."""
        if not self.unsigned:
            return 0
        scale = self.scale
        return int(torch.clamp(torch.round(-self.range_min / scale), 0, self.qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._calibrator.collect(x.detach())
            return x
        if self.enabled and self.per_token:
            if _EXPORTING:
                raise RuntimeError("per-token activation scales are a simulation: TensorRT and ONNX QDQ take "
                                   "one per tensor")
            scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / self.qmax
            return fake_quantize(x, scale, self.num_bits)
        if not self.enabled or self.amax is None:
            return x
        if _EXPORTING:
            return self._exported(x)
        if self.unsigned:
            return fake_quantize_unsigned(x, self.scale, torch.tensor(float(self.zero_point)), self.num_bits)
        return fake_quantize(x, self.scale, self.num_bits, self.axis)

    def _exported(self, x: torch.Tensor) -> torch.Tensor:
        """The same numbers through ops the exporter in use writes as QuantizeLinear → DequantizeLinear
        with this scale and zero point (see `_EXPORTING`). ONNX codes are int8 or uint8:
        a narrower range (7-bit weights, exact on AVX2; 2-7 bit simulations) clips x to it first, in
        the graph (constant, so the Q/DQ fold computes it for weights), and keeps the 8-bit codes."""
        lo, hi = (uint_range if self.unsigned else int_range)(self.num_bits)
        scale = self.scale
        per_channel = self.axis is not None
        if per_channel:
            scale = scale.reshape(-1)
        if self.num_bits < 8 and self.unsigned:   # codes [0, 2^b-1] around zero point z: x in [-z·s, (qmax-z)·s]
            step, zero = self._export_qparams   # Python numbers (see `exporting`)
            x = torch.clamp(x, step * (lo - zero), step * (hi - zero))
            lo, hi = uint_range(8)
        elif self.num_bits < 8:
            step = (scale.reshape([-1 if d == self.axis % x.dim() else 1 for d in range(x.dim())]) if per_channel
                    else scale)
            x = torch.minimum(torch.maximum(x, step * lo), step * hi)
            lo, hi = int_range(8)
        if _EXPORTING == "torch.export":
            ops, dtype = torch.ops.quantized_decomposed, torch.uint8 if lo == 0 else torch.int8
            if per_channel:
                zero = torch.zeros(scale.numel(), dtype=torch.int64)
                q = ops.quantize_per_channel.default(x, scale, zero, self.axis, lo, hi, dtype)
                return ops.dequantize_per_channel.default(q, scale, zero, self.axis, lo, hi, dtype)
            scale, zero = self._export_qparams
            q = ops.quantize_per_tensor.default(x, scale, zero, lo, hi, dtype)
            return ops.dequantize_per_tensor.default(q, scale, zero, lo, hi, dtype)
        if per_channel:
            zero = torch.zeros(scale.numel(), dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(x, scale, zero, self.axis, lo, hi)
        scale, zero = self._export_qparams
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)

    def extra_repr(self) -> str:
        state = "calib" if self.calibrating else ("on" if self.enabled else "off")
        amax = "none" if self.amax is None else (f"{float(self.amax):.4g}" if self.amax.numel() == 1
                                                  else f"[{self.amax.numel()} channels]")
        axis = "per-tensor" if self.axis is None else f"axis={self.axis}"
        if self.unsigned and self.range_min is not None:
            return (f"uint{self.num_bits} {axis} minmax range=[{float(self.range_min):.4g}, "
                    f"{float(self.range_max):.4g}] zero_point={self.zero_point} {state}")
        return f"int{self.num_bits} {axis} {self.calib_method} amax={amax} {state}"
