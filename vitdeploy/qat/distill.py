"""Distillation from the FP32 teacher: logits (KL at a temperature) and Q-ViT's distribution-guided
distillation (DGD) of the attention's q and k.

DGD matches, per attention and head, the similarity matrices ``q·qᵀ`` and ``k·kᵀ`` (tokens × tokens)
of student and teacher after normalising each row to unit length: the loss is the mean squared
distance of the rows. Row-normalised, the match is indifferent to the overall scale of q and k --
what the quantizers and the rectification change -- and looks at how tokens relate, which is what
the attention scores are made of.

`QkTaps` records what enters the q·kᵀ matmul on both sides: the output of each attention's q and k
quantizer (the student's quantized q and k; in the teacher, a copy of the FP32 model whose
attentions are the quantized twins with every quantizer off, the FP32 q and k themselves).
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize.attention import convert_attention


class QkTaps:
    """Forward hooks on the q and k quantizers of the named attentions; ``take()`` returns and clears."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.values: List[torch.Tensor] = []
        modules = dict(model.named_modules())
        self._handles = [getattr(modules[p], attr).register_forward_hook(self._hook)
                         for p in paths for attr in ("q_quantizer", "k_quantizer")]

    def _hook(self, _module, _inputs, output):
        self.values.append(output)

    def take(self) -> List[torch.Tensor]:
        out, self.values = self.values, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def tapped_teacher(fp32: nn.Module, paths: Sequence[str]) -> nn.Module:
    """A copy of ``fp32`` whose named attentions compute through their twins (quantizers off): same
    outputs (the twins are checked to reproduce the module, attention.py), q and k visible to hooks."""
    teacher = copy.deepcopy(fp32).eval()
    modules = dict(teacher.named_modules())
    for p in paths:
        if not hasattr(modules[p], "q_quantizer"):
            convert_attention(modules[p])
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher


def similarity(t: torch.Tensor) -> torch.Tensor:
    """Row-normalised ``t·tᵀ`` over the tokens, per head: (B, H, N, D) → (B, H, N, N), in FP32."""
    t = t.float()
    return F.normalize(t @ t.transpose(-2, -1), dim=-1)


def dgd_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over taps, images, heads and rows of ‖row_s - row_t‖² of the normalised similarities."""
    if not student:
        return torch.zeros(())
    losses = [(similarity(s) - similarity(t.detach())).pow(2).sum(-1).mean() for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened distributions, times T² (Hinton et al.) so that its
    gradient keeps its size whatever the temperature."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t
