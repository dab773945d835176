"""Information rectification of q and k (Q-ViT's IRM), as an affine map that folds into the qkv Linear.

Q-ViT observes that low-bit q and k lose the spread of their distributions, and so the information
the attention scores carry; it normalises each before its quantizer with learnable statistics. Here
`Rectifier` sits in front of an attention's q (or k) quantizer and computes, per head and channel,

    r(x) = exp(ρ)·(x - μ) + μ + σ·b          (μ, σ: calibration statistics; ρ, b: learned, 0 at the start)

so training starts exactly at the calibrated model, and the learned terms are dimensionless (one
learning rate fits every layer). It is an affine map a·x + c with a > 0, so `fold_irm` writes it
into the rows of the qkv weight and bias that produce q (or k) -- and into those rows' per-channel
weight amax, which is what keeps the fold exact for a quantized qkv: ``Q_{a·s}(a·W) = a·Q_s(W)``.
After the fold the graph is the ordinary one (a test checks the outputs are the same).

Attentions it applies to: timm's (q is scaled before its quantizer, so the shift is divided by the
scale in the fold) and the vit-pytorch layout, with no q/k norm between qkv and the quantizers.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..quantize.apply import quantized_attentions, run_with_hooks


class Rectifier(nn.Module):
    """``quantizer(exp(ρ)·(x - μ) + μ + σ·b)`` per head and channel of a (B, heads, tokens, head_dim) input."""

    def __init__(self, quantizer: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.quantizer = quantizer
        heads, dim = mean.shape
        self.register_buffer("mu", mean.reshape(1, heads, 1, dim).clone().float())
        self.register_buffer("sigma", std.reshape(1, heads, 1, dim).clamp_min(1e-6).clone().float())
        self.rho = nn.Parameter(torch.zeros(1, heads, 1, dim))
        self.b = nn.Parameter(torch.zeros(1, heads, 1, dim))

    @property
    def enabled(self) -> bool:
        return getattr(self.quantizer, "enabled", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.rho.exp() * (x - self.mu) + self.mu + self.sigma * self.b)

    def affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(a, c) with r(x) = a·x + c, each flattened to heads·head_dim (the qkv row order)."""
        a = self.rho.detach().exp()
        c = self.mu + self.sigma * self.b.detach() - a * self.mu
        return a.reshape(-1), c.reshape(-1)


def _layout(attn: nn.Module) -> Optional[Tuple[nn.Module, int, float]]:
    """(qkv Linear, width of q, factor q is scaled by before its quantizer), or None where IRM cannot fold."""
    if hasattr(attn, "qkv") and hasattr(attn, "num_heads"):  # timm
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            return None
        return attn.qkv, attn.num_heads * attn.head_dim, float(attn.scale)
    if hasattr(attn, "to_qkv"):  # vit-pytorch layout: the product is scaled after the matmul
        return attn.to_qkv, attn.to_qkv.out_features // 3, 1.0
    return None


@torch.no_grad()
def install_irm(qmodel: nn.Module, images: torch.Tensor, batch: int = 32) -> List[str]:
    """A Rectifier before the q and k quantizer of every attention whose q·kᵀ is quantized; μ, σ per
    head and channel measured on ``images``. Returns the attention paths rectified."""
    targets = {path: attn for path, attn in quantized_attentions(qmodel).items()
               if getattr(attn.q_quantizer, "enabled", False) and _layout(attn) is not None}
    sums: Dict[Tuple[str, str], List[torch.Tensor]] = {}

    def hook(key):
        def fn(_module, inputs):
            x = inputs[0].detach().float()              # (B, H, N, D)
            s = sums.setdefault(key, [torch.zeros(()), 0.0, 0.0])
            s[0] = s[0] + x.shape[0] * x.shape[2]
            s[1] = s[1] + x.sum(dim=(0, 2))
            s[2] = s[2] + x.pow(2).sum(dim=(0, 2))
        return fn

    handles = [getattr(attn, attr).register_forward_pre_hook(hook((path, attr)))
               for path, attn in targets.items() for attr in ("q_quantizer", "k_quantizer")]
    run_with_hooks(qmodel, handles, images, batch)
    for path, attn in targets.items():
        for attr in ("q_quantizer", "k_quantizer"):
            n, total, squares = sums[(path, attr)]
            mean = total / n
            std = (squares / n - mean.pow(2)).clamp_min(0).sqrt()
            setattr(attn, attr, Rectifier(getattr(attn, attr), mean, std).to(next(qmodel.parameters()).device))
    return list(targets)


@torch.no_grad()
def fold_irm(qmodel: nn.Module) -> List[str]:
    """Each Rectifier into its qkv rows (weight, bias, per-channel weight amax); the quantizer back in place.
    Call after `lsq.fold_lsq` (the weight amax must be the final one)."""
    folded = []
    for path, attn in quantized_attentions_any(qmodel).items():
        layout = _layout(attn)
        for index, attr in enumerate(("q_quantizer", "k_quantizer")):
            r = getattr(attn, attr)
            if not isinstance(r, Rectifier):
                continue
            qkv, width, prescale = layout
            a, c = r.affine()
            if index == 0:
                c = c / prescale   # the quantizer sees prescale·q: r(prescale·q) = prescale·(a·q + c/prescale)
            rows = slice(index * width, (index + 1) * width)
            a, c = a.to(qkv.weight.device), c.to(qkv.weight.device)
            qkv.weight.data[rows] *= a.reshape(-1, *([1] * (qkv.weight.dim() - 1)))
            if qkv.bias is None:
                qkv.bias = nn.Parameter(torch.zeros(qkv.out_features, device=qkv.weight.device), requires_grad=False)
            qkv.bias.data[rows] = a * qkv.bias.data[rows] + c
            wq = getattr(qkv, "weight_quantizer", None)
            if wq is not None and getattr(wq, "amax", None) is not None and wq.amax.numel() == qkv.out_features:
                amax = wq.amax.clone()
                amax[rows] *= a.to(amax.device, amax.dtype)
                wq.set_amax(amax)
            setattr(attn, attr, r.quantizer)
            folded.append(f"{path}.{attr[0]}")
    return folded


def quantized_attentions_any(model: nn.Module) -> Dict[str, nn.Module]:
    """Attentions whose q quantizer is a quantizer or a Rectifier around one."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "q_quantizer", None), nn.Module)
            and hasattr(m, "k_quantizer")}
