"""What block reconstruction learns, as drop-in replacements of a layer's quantizers, and how it folds back.

* `LearnedWeight` replaces a layer's per-channel ``weight_quantizer``: AdaRound's soft rounding
  (each weight rounds down or up, ``h(V)`` in [0, 1] learned, Nagel et al. 2020) of ``W + B·A``,
  where ``B·A`` is AIQViT's low-rank compensation (rank r, zero at the start, in units of the step). The scale stays the
  calibrated one (below 8 bits possibly its MSE clip, `use_scale`), so `fold` writes an ordinary weight
  that lies exactly on the INT8 grid:
  ``W' = s·clamp(floor((W + B·A)/s) + [h >= 0.5])`` -- the exported graph is the same graph with
  other numbers in its initializers.
* `LearnedStep` replaces a per-tensor symmetric activation quantizer: its step size is learned
  (LSQ: the rounding is passed straight through, the clamp is not) and folds into its amax.

Both start exactly where post-training calibration left the layer (``hard`` rounding with V from
the weights' own fractional parts is round-to-nearest), so a unit whose learning does not help can
be put back as it was.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..quantize.quantizer import TensorQuantizer, int_range

# AdaRound's rectified sigmoid stretch: h = clamp(sigmoid(V)·(ζ - γ) + γ, 0, 1) reaches 0 and 1 exactly.
ZETA, GAMMA = 1.1, -0.1


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


class LearnedWeight(nn.Module):
    """Soft-rounded per-channel weight quantizer with an optional low-rank term ``B·A``."""

    def __init__(self, quantizer: TensorQuantizer, weight: torch.Tensor, rank: int = 0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.original = quantizer
        self.qmin, self.qmax = int_range(quantizer.num_bits)
        shape = [-1] + [1] * (weight.dim() - 1)
        self.register_buffer("scale", quantizer.scale.detach().reshape(shape).clone())
        frac = (weight.detach() / self.scale) - torch.floor(weight.detach() / self.scale)
        # V with h(V) = frac: the soft weight starts at the FP32 weight, the hard one at round-to-nearest.
        ratio = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.log(ratio / (1 - ratio)))
        self.rank = 0
        self.a = self.b = None
        if rank > 0:
            self.set_rank(rank, weight, generator)
        self.hard = False
        self.rescaled = False
        self.enabled = quantizer.enabled

    @property
    def num_bits(self) -> int:
        return self.original.num_bits

    def set_rank(self, rank: int, weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        out_f, in_f = weight.shape[0], weight[0].numel()
        rank = min(rank, out_f, in_f)
        self.rank = rank
        # B = 0, A small and random (LoRA's initialisation): the term starts at zero but gets gradients.
        a = torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f)
        self.a = nn.Parameter(a.to(weight.device))
        self.b = nn.Parameter(torch.zeros(out_f, rank, device=weight.device))

    @torch.no_grad()
    def use_scale(self, scale: torch.Tensor, weight: torch.Tensor) -> None:
        """Quantize on another per-channel grid (a clipped one), starting again at round-to-nearest
        there; `fold` then writes that grid's amax into the original quantizer."""
        self.scale.copy_(scale.reshape(self.scale.shape).to(self.scale))
        frac = (weight.detach() / self.scale) - torch.floor(weight.detach() / self.scale)
        ratio = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v.copy_(torch.log(ratio / (1 - ratio)))
        self.rescaled = True

    def rounding(self) -> torch.Tensor:
        if self.hard:
            return (self.v >= 0).to(self.v.dtype)
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's push of every h towards 0 or 1 (zero when all are)."""
        h = (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def compensated(self, weight: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return weight
        # In units of each channel's quantization step: one learning rate fits every layer's scale.
        return weight + self.scale * (self.b @ self.a).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        u = self.compensated(weight) / self.scale
        # floor passed straight through, so the low-rank term learns; V learns through h.
        return torch.clamp(_floor_ste(u) + self.rounding(), self.qmin, self.qmax) * self.scale

    @torch.no_grad()
    def folded(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight to store: hard-rounded, on the grid of the calibrated scale."""
        hard, self.hard = self.hard, True
        try:
            u = self.compensated(weight) / self.scale
            return torch.clamp(torch.floor(u) + self.rounding(), self.qmin, self.qmax) * self.scale
        finally:
            self.hard = hard


class LearnedStep(nn.Module):
    """Per-tensor symmetric activation quantizer with a learned step (LSQ), initialised from calibration."""

    def __init__(self, quantizer: TensorQuantizer):
        super().__init__()
        self.original = quantizer
        self.qmin, self.qmax = int_range(quantizer.num_bits)
        self.log_scale = nn.Parameter(torch.log(quantizer.scale.detach().reshape(())).clone())
        self.enabled = quantizer.enabled

    @property
    def num_bits(self) -> int:
        return self.original.num_bits

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale
        return torch.clamp(_round_ste(x / s), self.qmin, self.qmax) * s


def learnable_activation(quantizer) -> bool:
    """Symmetric per-tensor quantizers learn their step; uint8 ones (cpu only) keep their calibrated range."""
    return isinstance(quantizer, TensorQuantizer) and quantizer.axis is None and not quantizer.unsigned \
        and quantizer.amax is not None and not quantizer.per_token
