"""Below 8 bits, a max-calibrated range wastes most codes on rare outliers: start from the MSE clip.

A 4-bit step over the real ViT's post-GELU fc2 input (max 217) is 31, so every value under 15
reads 0. `mse_clip_below_8_bits` moves each sub-8-bit symmetric quantizer's amax to the clip of
it that minimises the squared quantization error. Both learning stages start from it: `vitdeploy
qat` (its LSQ steps) and `--recover` (its learned steps, which move by about e^±1 in a unit's
100 gradient steps -- far less than the 8 to 30 times such a step must shrink).
"""
from __future__ import annotations

import torch
from torch import nn

from .apply import run_with_hooks
from .quantizer import TensorQuantizer, int_range

#: Quantizer attributes of quantized layers (layers.py) and attentions (attention_base.py).
QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer", "q_quantizer", "k_quantizer", "v_quantizer",
                   "softmax_quantizer")


def clippable(q) -> bool:
    """An enabled, calibrated, symmetric quantizer (uint8 ones, cpu only, keep their range)."""
    return isinstance(q, TensorQuantizer) and q.enabled and q.amax is not None and not q.unsigned \
        and not q.per_token


@torch.no_grad()
def mse_clip_below_8_bits(qmodel: nn.Module, images: torch.Tensor, batch: int = 32, max_values: int = 1 << 20) -> int:
    """Below 8 bits, the calibrated max range wastes most codes on rare outliers (a 4-bit step over the
    real ViT's fc2 input, max 217, is 31): every sub-8-bit quantizer starts instead at the clip of its
    max that minimises the mean squared quantization error -- per channel for weights, on a sample of
    the quantizer's own inputs over ``images`` for activations. Returns the quantizers changed."""
    changed = 0
    quantizers = {id(q): q for m in qmodel.modules() for attr in QUANTIZER_ATTRS
                  for q in [getattr(m, attr, None)] if clippable(q) and q.num_bits < 8}
    for m in qmodel.modules():   # weights: no data needed
        q = getattr(m, "weight_quantizer", None)
        if id(q) in quantizers and q.axis is not None:
            w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
            q.set_amax(best_clip(w, q.amax.reshape(-1, 1), q.num_bits).reshape(q.amax.shape))
            changed += 1
    activations = [q for q in quantizers.values() if q.axis is None]
    samples = {id(q): [] for q in activations}
    gen = torch.Generator().manual_seed(0)

    def hook(module, inputs):
        x = inputs[0].detach().float().reshape(-1).cpu()
        if x.numel() > max_values // 8:
            x = x[torch.randint(0, x.numel(), (max_values // 8,), generator=gen)]
        samples[id(module)].append(x)

    handles = [q.register_forward_pre_hook(hook) for q in activations]
    run_with_hooks(qmodel, handles, images, batch)
    for q in activations:
        x = torch.cat(samples[id(q)])
        if x.numel() > max_values:
            x = x[torch.randint(0, x.numel(), (max_values,), generator=gen)]
        q.set_amax(best_clip(x.reshape(1, -1), q.amax.reshape(1, 1).cpu(), q.num_bits).reshape(()))
        changed += 1
    return changed


def best_clip(values: torch.Tensor, amax: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Per row of ``values``: the amax among amax·2^(-k/4), k = 0..32, with the least squared error."""
    qmin, qmax = int_range(num_bits)
    best, best_err = amax.clone(), None
    for k in range(33):
        candidate = amax * 2.0 ** (-k / 4)
        s = (candidate / qmax).clamp_min(1e-12)
        err = (torch.clamp(torch.round(values / s), qmin, qmax) * s - values).pow(2).sum(1, keepdim=True)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best = torch.where(better, candidate, best)
            best_err = torch.where(better, err, best_err)
    return best
