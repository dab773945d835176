"""Learned step-size quantizers (LSQ, Esser et al. 2020) in place of a calibrated model's quantizers.

`LsqQuantizer` wraps one `TensorQuantizer` that calibration left with an amax: a learnable step per
output channel for weights, one per tensor for activations, starting at the calibrated
``amax / qmax``. Forward is the quantizer's own arithmetic, ``clamp(round(x / s), qmin, qmax) · s``,
with the rounding passed straight through (clamped first, as LSQ differentiates it) and LSQ's gradient scale ``1 / sqrt(N · qmax)`` on the
step (N: the elements one step quantizes), which keeps the step's updates in proportion to the
weights' whatever the layer size. The learned weight stays a latent FP32 weight.

`fold` writes ``amax = s · qmax`` back into the wrapped quantizer and puts it back in place: the
calibrated model then computes exactly what the trained one did (the same function of the same
numbers), so export, lint and verification are those of every build. Symmetric only (zero points
0), so an 8-bit result deploys on TensorRT unchanged.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from ..quantize.low_bit import QUANTIZER_ATTRS as ATTRS, clippable
from ..quantize.quantizer import TensorQuantizer, int_range


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass, its gradient times ``factor`` in the backward pass."""
    return x * factor + (x - x * factor).detach()


class LsqQuantizer(nn.Module):
    """A symmetric quantizer whose step is learned; wraps (and folds back into) a TensorQuantizer."""

    def __init__(self, original: TensorQuantizer):
        super().__init__()
        if original.unsigned or original.amax is None or original.per_token:
            raise ValueError("LSQ wraps calibrated symmetric per-tensor or per-channel quantizers")
        self.original = original
        self.axis = original.axis
        self.qmin, self.qmax = int_range(original.num_bits)
        self.step = nn.Parameter(original.scale.detach().clone().reshape(-1))
        self.enabled = original.enabled

    @property
    def num_bits(self) -> int:
        return self.original.num_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        dtype = x.dtype
        x = x.float()  # under autocast: the quantizer's arithmetic stays in FP32
        if self.axis is None:
            n = x[0].numel() if x.dim() > 1 else x.numel()   # features per sample
            step = self.step.reshape(())
        else:
            n = x.numel() // x.shape[self.axis]
            shape = [1] * x.dim()
            shape[self.axis] = -1
            step = self.step.reshape(shape)
        # A step never reaches 0 (ONNX and TensorRT need scales > 0): clamp, gradient passed through.
        step = _grad_scale(step, 1.0 / math.sqrt(n * self.qmax))
        step = step + (step.clamp_min(1e-8) - step).detach()
        # clamp, then round: the same values as round-then-clamp, and LSQ's gradient at the range's ends
        return (_round_ste(torch.clamp(x / step, self.qmin, self.qmax)) * step).to(dtype)

    @torch.no_grad()
    def fold(self) -> TensorQuantizer:
        """The wrapped quantizer with amax = |step| · qmax: it quantizes exactly as this one does."""
        self.original.set_amax(self.step.detach().abs().clamp_min(1e-8).cpu() * self.qmax)
        self.original.enabled = self.enabled
        return self.original




def learnable(q) -> bool:
    """What LSQ takes: an enabled, calibrated, symmetric quantizer (uint8 ones, cpu only, keep their range)."""
    return clippable(q)


def install_lsq(qmodel: nn.Module) -> List[LsqQuantizer]:
    """Replace every learnable quantizer of ``qmodel`` by an LsqQuantizer around it, in place."""
    installed = []
    for module in list(qmodel.modules()):
        for attr in ATTRS + ("quantizer",):   # "quantizer": inside an IRM rectifier (irm.py)
            q = getattr(module, attr, None)
            if learnable(q):
                lsq = LsqQuantizer(q)
                setattr(module, attr, lsq)
                installed.append(lsq)
    return installed


def fold_lsq(qmodel: nn.Module) -> Dict[str, int]:
    """Every LsqQuantizer (also inside a rectifier) back to its TensorQuantizer with the learned amax."""
    folded = 0
    for module in list(qmodel.modules()):
        for attr in ATTRS + ("quantizer",):
            q = getattr(module, attr, None)
            if isinstance(q, LsqQuantizer):
                setattr(module, attr, q.fold())
                folded += 1
    return {"quantizers": folded}
