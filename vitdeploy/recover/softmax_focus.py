"""The focused softmax quantizer (AIQViT's DFQ, in a form TensorRT runs): the post-softmax interval, searched.

Softmax outputs lie in [0, a] with almost all of their mass near 0; max calibration sets a to the
largest probability seen, so the many small ones share a handful of codes. Per attention layer the
top of the interval is chosen from a geometric ladder below the calibrated one by the error it
leaves at the unit's output (the probabilities above it saturate). It deploys as a plain scale
(and, with the shifted softmax, its shift): the graph does not change.
"""
from __future__ import annotations

from typing import Callable, List

import torch

# a / a_max tried: 1 down to 1/16 in steps of 2^(-1/2).
LADDER = tuple(2.0 ** (-k / 2) for k in range(9))


def softmax_top(module) -> float:
    """The top a of the interval [0, a] the softmax quantizer of ``module`` covers today."""
    q = module.softmax_quantizer
    if q.unsigned:
        return float(q.range_max)
    if module.softmax_shift_enabled and module.softmax_shift is not None:
        return 2 * float(q.amax)
    return float(q.amax)


def set_softmax_top(module, top: float) -> None:
    """Cover [0, top]: amax = top (symmetric), the range (uint8), or amax = z = top/2 (shifted softmax)."""
    q = module.softmax_quantizer
    if q.unsigned:
        q.set_range(0.0, top)
    elif module.softmax_shift_enabled and module.softmax_shift is not None:
        q.set_amax(top / 2)
        module.softmax_shift = (torch.round(torch.tensor(top / 2) / q.scale) * q.scale).to(torch.float32)
    else:
        q.set_amax(top)


def focus_softmax(modules: List, loss: Callable[[], float]) -> List[dict]:
    """For each attention module (softmax quantizer on), the ladder step with the least ``loss()``."""
    chosen = []
    for module in modules:
        if not (module.softmax_quantizer.enabled and module.softmax_quantizer.amax is not None):
            continue
        start = softmax_top(module)
        trials = []
        for factor in LADDER:
            set_softmax_top(module, start * factor)
            trials.append((loss(), factor))
        best_loss, best = min(trials, key=lambda t: (t[0], -t[1]))   # ties: the larger interval
        set_softmax_top(module, start * best)
        chosen.append({"calibrated": start, "chosen": start * best, "loss_calibrated": trials[0][0],
                       "loss_chosen": best_loss})
    return chosen
