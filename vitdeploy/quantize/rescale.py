"""Channel rescaling before LayerNorm-fed Linears (SmoothQuant / RepQ-ViT reparameterization).

A LayerNorm's output has a few channels with much larger ranges than the rest (γ and β differ
a lot between channels), so one per-tensor INT8 scale is too coarse for the small channels. With
per-channel factors s > 0 folded into the LayerNorm's affine parameters and into the columns of
every Linear that reads its output,

    LN'(x) = LN(x) / s        (γ' = γ / s, β' = β / s)
    W'     = W · diag(s)      so   W'·LN'(x) = W·LN(x)   exactly (up to float rounding),

the quantized activation is LN(x)/s and its channels can be made comparable, while the weights
(quantized per output channel) absorb the factors column by column. SmoothQuant chooses

    s_j = max|X_j|^α / max|W_:,j|^(1-α)

which splits the difficulty between activations and weights (α = 0.5 in SmoothQuant; α = 1 is
RepQ-ViT's full equalisation of the activation channels; techniques.DEFAULT_ALPHA says which
this project uses and why). With the shift technique on, the
channel's half-range (max_j - min_j)/2 stands in for max|X_j|, since the quantizer then sees the
channel centred (Outlier Suppression+ does the same: shift first, then scale).

Pairs are found structurally, not by names: one forward pass with hooks records which
LayerNorm output tensor object each nn.Linear receives as input. A LayerNorm (nn.LayerNorm or a
subclass such as timm's, which computes the same) is folded only when
it runs once per forward, has an affine weight, and every Linear reading it reads nothing else;
afterwards each fold is checked on the calibration images (the model's output must not move by
more than 1e-4 relative) and undone if some other consumer of the LayerNorm output (a residual,
a functional op) made it inexact.

This is a pure pre-pass on the FP32 PyTorch model, before quantization.

Why only LayerNorm → Linear: two other folds are exact too and were measured (benchmarks/ablation.py
settings, all three techniques on, torch 2.14.1) -- factors through a ReLU MLP (fc1 rows and bias
÷ s, fc2 columns × s; ReLU commutes with s > 0; not GELU) and through attention (the v rows of
qkv ÷ s, the output projection's columns × s; softmax mixes tokens, not channels). Neither
helped: mnist_vit (both folds) INT8 agreement 99.96 → 99.94 %, KL ×1e3 0.082 → 0.075, W4A4
97.98 → 98.02 %; cifar10_vit (v fold; its MLP is GELU) INT8 99.14 → 99.06 %, W4A4 85.12 → 85.04 %.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional, Set

import torch
from torch import nn

from .stats import ChannelStats

#: A fold whose output differs from the original's by more than this (relative L2) is undone.
FOLD_TOLERANCE = 1e-4

#: Factors are kept within [1/CLAMP, CLAMP]: a channel that is all zeros (or a zero weight
#: column) must not produce an infinite or zero factor.
CLAMP = 1e4


def find_norm_linear_groups(model: nn.Module, run: Callable[[nn.Module], None]) -> Dict[str, List[str]]:
    """``{LayerNorm path: [paths of the nn.Linear layers that read its output tensor]}``.

    ``run(model)`` runs one forward pass. Only LayerNorms with an affine weight that run once,
    and Linears that run once and always read that LayerNorm's output, are returned.
    """
    names = {m: n for n, m in model.named_modules()}
    outputs: Dict[int, tuple] = {}
    norm_calls: Counter = Counter()
    linear_calls: Counter = Counter()
    consumers: Dict[str, Set[str]] = defaultdict(set)
    matched: Counter = Counter()

    def norm_hook(module, inputs, output):
        norm_calls[names[module]] += 1
        outputs[id(output)] = (names[module], output)

    def linear_hook(module, inputs):
        name = names[module]
        linear_calls[name] += 1
        hit = outputs.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            consumers[hit[0]].add(name)
            matched[name] += 1

    handles = [m.register_forward_hook(norm_hook) for m in model.modules()
               if isinstance(m, nn.LayerNorm) and m.weight is not None]
    handles += [m.register_forward_pre_hook(linear_hook) for m in model.modules() if type(m) is nn.Linear]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    groups = {}
    for norm, linears in consumers.items():
        if norm_calls[norm] != 1:
            continue
        if all(linear_calls[n] == 1 and matched[n] == 1 for n in linears):
            groups[norm] = sorted(linears, key=list(names.values()).index)
    return groups


def smoothquant_factors(act_range: torch.Tensor, weight_max: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = A_j^α / B_j^(1-α), clamped to [1/CLAMP, CLAMP]; 1 where either statistic is 0."""
    a = act_range.to(torch.float64)
    b = weight_max.to(torch.float64)
    s = a.clamp(min=1e-30) ** alpha / b.clamp(min=1e-30) ** (1 - alpha)
    s = torch.where((a > 0) & (b > 0), s, torch.ones_like(s))
    return s.clamp(1 / CLAMP, CLAMP).to(torch.float32)


def fold_factors(norm: nn.LayerNorm, linears: List[nn.Linear], s: torch.Tensor) -> None:
    """γ ← γ/s, β ← β/s and W ← W·diag(s) for each Linear, in place."""
    with torch.no_grad():
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)
        for linear in linears:
            linear.weight.mul_(s)


def rescale_norm_linears(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                         targets: Optional[Set[str]] = None, alpha: float = 0.5,
                         centered: bool = False) -> dict:
    """Fold SmoothQuant factors into every LayerNorm → Linear group of ``model`` (in place).

    ``forward_loop(model)`` runs the calibration data; its first forward call also finds the
    groups. ``targets``: only groups with at least one of these Linears (the quantized ones)
    are rescaled. ``centered``: use each channel's half-range instead of max |x| (the shift
    technique centres the channels). Returns ``{"alpha", "groups": {norm: [linears]}, "skipped": {...}}``.
    """
    modules = dict(model.named_modules())
    state = {"first": None, "groups": None}
    stats: Dict[str, ChannelStats] = {}
    handles = []

    def capture(_model, inputs):
        if state["first"] is None:
            state["first"] = inputs[0][:16].detach().clone()

    def collect_for(name):
        def hook(_m, _inputs, output):
            stats.setdefault(name, ChannelStats(axis=-1, track_mean=False)).collect(output)
        return hook

    handles.append(model.register_forward_pre_hook(capture))
    handles += [m.register_forward_hook(collect_for(n)) for n, m in modules.items()
                if isinstance(m, nn.LayerNorm) and m.weight is not None]
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    if state["first"] is None:
        return {"alpha": alpha, "groups": {}, "skipped": {}}
    example = state["first"]
    groups = find_norm_linear_groups(model, lambda m: m(example))
    if targets is not None:
        groups = {n: ls for n, ls in groups.items() if any(l in targets for l in ls)}
    with torch.no_grad():
        reference = model(example)
    done, skipped = {}, {}
    for norm_name, linear_names in groups.items():
        if norm_name not in stats:
            continue
        lo, hi = stats[norm_name].range()
        act = (hi - lo) / 2 if centered else torch.maximum(lo.abs(), hi.abs())
        linears = [modules[n] for n in linear_names]
        weight_max = torch.stack([l.weight.detach().abs().amax(dim=0) for l in linears]).amax(dim=0)
        s = smoothquant_factors(act, weight_max, alpha)
        norm = modules[norm_name]
        saved = [t.detach().clone() for t in [norm.weight, norm.bias] + [l.weight for l in linears] if t is not None]
        fold_factors(norm, linears, s)
        with torch.no_grad():
            out = model(example)
        error = float((out - reference).norm() / reference.norm().clamp(min=1e-30))
        if not error <= FOLD_TOLERANCE:
            with torch.no_grad():  # undo: another op reads the LayerNorm output
                for t, old in zip([t for t in [norm.weight, norm.bias] + [l.weight for l in linears] if t is not None],
                                  saved):
                    t.copy_(old)
            skipped[norm_name] = f"fold not exact (relative error {error:.2e}): its output has other consumers"
            continue
        done[norm_name] = list(linear_names)
    return {"alpha": alpha, "centered": centered, "groups": done, "skipped": skipped}
