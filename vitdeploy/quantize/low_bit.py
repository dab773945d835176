"""Below 8 bits, a max-calibrated range wastes most codes on rare outliers: start from the MSE clip.

A 4-bit step over the real ViT's post-GELU fc2 input (max 217) is 31, so every value under 15
reads 0. `mse_clips` finds, for each sub-8-bit symmetric quantizer, the clip of its range with the
least squared quantization error. `vitdeploy qat` starts its LSQ steps there
(`mse_clip_below_8_bits`); `--recover` tries each clip inside its unit and keeps it where the
unit's loss falls (recover/reconstruct.py): the clip best for a tensor can cut the one massive
token its block carries.
"""
from __future__ import annotations

from typing import Dict

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
def mse_clips(qmodel: nn.Module, images: torch.Tensor, batch: int = 32, max_values: int = 1 << 20,
              weights: bool = True, activations: bool = True) -> Dict[int, torch.Tensor]:
    """{id(quantizer): its MSE clip} for every sub-8-bit symmetric quantizer of ``qmodel``, which is left
    as it is: per channel for weights, on a sample of the quantizer's own inputs over ``images`` for
    activations (inputs as ``qmodel`` computes them now)."""
    quantizers = {id(q): q for m in qmodel.modules() for attr in QUANTIZER_ATTRS
                  for q in [getattr(m, attr, None)] if clippable(q) and q.num_bits < 8}
    clips = {}
    for m in qmodel.modules() if weights else ():   # weights: no data needed
        q = getattr(m, "weight_quantizer", None)
        if id(q) in quantizers and q.axis is not None:
            w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
            clips[id(q)] = best_clip(w, q.amax.reshape(-1, 1).to(w.device), q.num_bits).reshape(q.amax.shape)
    activations = [q for q in quantizers.values() if q.axis is None] if activations else []
    if not activations:   # nothing to sample (INT8: nothing at all): no forward pass
        return clips
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
        clips[id(q)] = best_clip(x.reshape(1, -1), q.amax.reshape(1, 1).cpu(), q.num_bits).reshape(())
    return clips


@torch.no_grad()
def mse_clip_below_8_bits(qmodel: nn.Module, images: torch.Tensor, batch: int = 32) -> int:
    """Every sub-8-bit symmetric quantizer of ``qmodel`` set to its MSE clip (`mse_clips`): the weights
    first, then the activations measured with the clipped weights. Returns the quantizers changed."""
    changed = 0
    for weights in (True, False):
        clips = mse_clips(qmodel, images, batch, weights=weights, activations=not weights)
        for m in qmodel.modules():
            for attr in QUANTIZER_ATTRS:
                q = getattr(m, attr, None)
                if id(q) in clips:
                    q.set_amax(clips.pop(id(q)))
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
