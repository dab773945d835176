"""Quantized twins of Linear and Conv2d, registered by type (ModelOpt's QuantModuleRegistry idea).

Each twin shares its parameters with the original and adds an ``input_quantizer`` (per-tensor)
and a ``weight_quantizer`` (per output channel), so module paths such as ``blocks.0.attn.qkv``
stay unchanged and the plan can name them.

A QuantLinear may also carry an ``input_shift`` z (a per-channel or per-tensor constant): it then
quantizes ``x - z`` symmetrically and adds ``W_q·z`` back through its bias,
``y = W_q·q(x - z) + (b + W_q·z)``, which is exactly what the exported graph computes (a ``Sub``
before the QuantizeLinear and a folded bias initializer). That is asymmetric quantization in a
form TensorRT accepts: its Q/DQ zero points stay 0.
"""
from __future__ import annotations

from typing import Dict, Type

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import TensorQuantizer


class _QuantMixin:
    def _add_quantizers(self, calib_method: str, calib_kwargs: dict, unsigned: bool = False) -> None:
        self.input_quantizer = TensorQuantizer(axis=None, calib_method=calib_method, unsigned=unsigned, **calib_kwargs)
        self.weight_quantizer = TensorQuantizer(axis=0, calib_method="max")
        # Weights are known now: per-channel max of |W| needs no data.
        dims = tuple(range(1, self.weight.dim()))
        self.weight_quantizer.set_amax(self.weight.detach().abs().amax(dim=dims))


class QuantLinear(_QuantMixin, nn.Linear):
    #: How the input is shifted before its quantizer: None, "tensor" (one z) or "channel" (one z per
    #: input feature). The values come from calibration (``input_shift``).
    shift_mode = None

    @classmethod
    def from_float(cls, layer: nn.Linear, calib_method: str = "max", calib_kwargs: dict | None = None,
                   unsigned: bool = False, shift_mode: str | None = None):
        if shift_mode not in (None, "tensor", "channel"):
            raise ValueError(f"shift_mode must be None, 'tensor' or 'channel', got {shift_mode!r}")
        q = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        q.weight, q.bias = layer.weight, layer.bias
        q._add_quantizers(calib_method, calib_kwargs or {}, unsigned=unsigned)
        q.shift_mode = shift_mode
        q.register_buffer("input_shift", None)
        return q

    def folded_bias(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The bias the layer (and its ONNX node) adds: b + W_q·z with a shift, else b."""
        shift = getattr(self, "input_shift", None)
        if shift is None:
            return self.bias
        fold = weight @ shift.expand(self.in_features).to(weight.dtype)
        return fold if self.bias is None else self.bias + fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight)
        shift = getattr(self, "input_shift", None)
        if shift is None:
            return F.linear(self.input_quantizer(x), weight, self.bias)
        # While exporting, the bias is already folded (export/qdq.py): one initializer, not W_q·z in the graph.
        bias = self.bias if getattr(self, "bias_is_folded", False) else self.folded_bias(weight)
        return F.linear(self.input_quantizer(x - shift), weight, bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, layer: nn.Conv2d, calib_method: str = "max", calib_kwargs: dict | None = None,
                   unsigned: bool = False):
        q = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
        q.weight, q.bias = layer.weight, layer.bias
        q._add_quantizers(calib_method, calib_kwargs or {}, unsigned=unsigned)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANT_MODULES: Dict[Type[nn.Module], Type[nn.Module]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def quant_class_for(module: nn.Module):
    """The quantized twin for ``module``, or None. Exact types only: a subclass may change forward."""
    return QUANT_MODULES.get(type(module))
