"""The default plan, from measurement: which few layers INT8 cannot afford.

Each layer the base plan quantizes is measured alone in INT8 on a subset of the calibration
images (`analyse.measure_layers`: the KL of the output distribution to FP32's, one forward pass
per layer). A layer is kept in FP16 when it *dominates* the loss -- its KL alone is at least
`DOMINANT_SHARE` of all layers' KL summed, `DOMINANT_RATIO` times the median layer's and at least
`MIN_KL` -- as long as
the INT8 share of Linear/Conv MACs stays at or above ``--int8-budget``. Where the loss is spread
evenly, no layer dominates and the plan stays the role defaults.

Why these thresholds, measured (64 calibration images, max calibration, each layer alone):
- timm ViT-Tiny, ImageNet weights: ``blocks.7.mlp.fc2`` (post-GELU input up to 217.5, the other
  fc2 inputs below 20: a "massive activation") has KL 0.094, 68 % of the sum and about 300× the
  median; the next layer has 3.7 % of the sum. Keeping it FP16 took agreement with FP32 on the 488
  held-out sample images from 82.6 % to 89.8 % (jetson-orin, Q/DQ as TensorRT computes it) for
  2.8 % of the Linear MACs; keeping 4 or 8 more of the next-ranked layers in FP16 moved it by less
  than one image in a hundred.
- The amax of each layer's input is recorded next to the reason: a massive-activation tensor shows
  there as an amax far above its role's median.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .log import get_logger
from .plan import QUANTIZED, PrecisionPlan, int8_mac_share

log = get_logger(__name__)

DOMINANT_SHARE = 0.10
DOMINANT_RATIO = 10.0
# ...and only when its loss matters at all: the small test models' INT8 builds have a KL of 4e-4
# (cifar10_vit) and 2e-4 (mnist_vit) with *every* layer quantized, so nothing there is moved.
MIN_KL = 1e-3
DEFAULT_INT8_BUDGET = 90.0      # % of Linear/Conv MACs kept INT8
DEFAULT_SENSITIVITY_IMAGES = 64


def measured_plan(model, layers: List, base: PrecisionPlan, images, calib_method: str, int8_budget: float,
                  batch_size: int = 64) -> PrecisionPlan:
    """``base`` with the dominant layers moved to FP16 (within the MAC budget); meta says why for each."""
    from .analyse import measure_images

    precision = base.resolve(layer.name for layer in layers)
    measured = [layer for layer in layers if precision[layer.name] in QUANTIZED]
    if not measured:
        return base
    kl, agree, amax = measure_images(model, measured, images, calib_method, batch_size)
    total = sum(kl.values())
    median = float(np.median(list(kl.values())))
    others_amax = _others_median_amax(measured, amax)
    reasons: Dict[str, str] = {}
    kept: List[str] = []
    for layer in sorted(measured, key=lambda l: -kl[l.name]):
        share = kl[layer.name] / total if total > 0 else 0.0
        ratio = kl[layer.name] / median if median > 0 else float("inf")
        facts = f"alone in INT8: KL {kl[layer.name]:.3g} ({100 * share:.1f} % of all layers', {ratio:.0f}x the median)"
        facts += _amax_note(layer, amax, others_amax)
        dominant = share >= DOMINANT_SHARE and ratio >= DOMINANT_RATIO and kl[layer.name] >= MIN_KL
        if dominant:
            trial = {**precision, layer.name: "fp16"}
            if int8_mac_share(layers, trial) >= int8_budget:
                precision = trial
                kept.append(layer.name)
                reasons[layer.name] = f"fp16: dominates the INT8 loss; {facts}"
                continue
            reasons[layer.name] = f"{precision[layer.name]}: dominates the loss, but FP16 would take the INT8 MAC " \
                                  f"share below --int8-budget {int8_budget:g} %; {facts}"
        else:
            reasons[layer.name] = f"{precision[layer.name]}: {facts}"
    for layer in layers:
        reasons.setdefault(layer.name, f"{precision[layer.name]}: {base.meta.get('source', 'base plan')}")
    if kept:
        log.info("measured plan: %s kept in FP16 (each dominates the INT8 loss); %.1f %% of Linear/Conv MACs INT8",
                 ", ".join(kept), int8_mac_share(layers, precision))
    meta = {"source": f"measured ({len(images)} calibration images, each layer alone in INT8; "
                      f"{base.meta.get('source', 'base plan')} otherwise)",
            "int8_budget": int8_budget, "sensitivity_images": int(len(images)), "fp16_measured": sorted(kept),
            "reasons": reasons, "kl_alone": {name: float(f"{value:.4g}") for name, value in kl.items()}}
    return PrecisionPlan(default=base.default, layers=precision, meta=meta)


def _others_median_amax(layers, amax) -> Dict[str, Dict[str, float]]:
    """For each layer, the median input amax of the *other* layers of its role (qkv, mlp_fc2, ...)."""
    by_role: Dict[str, Dict[str, float]] = {}
    for layer in layers:
        if amax.get(layer.name):
            by_role.setdefault(layer.role, {})[layer.name] = max(amax[layer.name])
    return {name: float(np.median([v for n, v in members.items() if n != name]))
            for members in by_role.values() if len(members) > 1 for name in members}


def _amax_note(layer, amax, others_median) -> str:
    values = amax.get(layer.name) or []
    if not values:
        return ""
    top, median = max(values), others_median.get(layer.name, 0.0)
    note = f"; input amax {top:.3g}"
    if median > 0 and top >= 5 * median:
        note += f", {top / median:.0f}x the median of its role's others (massive activations)"
    return note
