"""``build --max-drop P``: move layers to FP16 until the measured top-1 drop is at most P points.

The measured plan (measured_plan.py) keeps the few layers that *dominate* the INT8 loss in FP16.
Where a user has an accuracy budget instead, this step measures it: the build's own fake-quant
model (the plan, the techniques, the calibration of the build) is scored against FP32 on the
labelled calibration images, and while the top-1 drop is above ``P`` the next layer in order of
measured sensitivity (KL alone in INT8) becomes FP16 -- as long as ``--int8-budget`` of the
Linear/Conv MACs stay INT8. A layer is moved by putting its FP32 module back (exact, with the
shift and bias folds of the quantized one gone), so the search calibrates once. When a layer
moved, the build calibrates again with the final plan, so that ``--plan plan.json`` reproduces it;
when none did, the search's calibration is the build's.

The drop is measured on the calibration images (their labels: class folders or an .npz ``y``),
the only labelled images a build is sure to have; plan.json says so, and ``--eval-data`` stays
an independent score. At 512 images one image is 0.2 points.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .log import get_logger, progress
from .plan import int8_mac_share

log = get_logger(__name__)


def top1(model, images, batch_size: int = 64) -> float:
    """Top-1 % of a PyTorch model on a labelled ImageSet."""
    import torch

    hits = 0
    with torch.no_grad():
        for x, y in images.batches(batch_size):
            hits += int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return 100.0 * hits / len(images)


def meet_max_drop(model, layers: List, precision: Dict[str, str], images, max_drop: float, int8_budget: float,
                  sensitivity: Dict[str, float], quantize: Callable,
                  batch_size: int = 64) -> Tuple[Dict[str, str], dict, Optional[tuple]]:
    """``precision`` with the fewest layers moved to FP16 (in order of ``sensitivity``, highest first) for a
    top-1 drop ≤ ``max_drop`` on ``images``. ``quantize(precision)`` returns a tuple whose first two items are
    the calibrated fake-quant model and the FP32 model it was made from. Returns the new precision, the
    record for plan.json, and ``quantize``'s result when no layer moved (still valid for the build), else None."""
    started = time.perf_counter()
    if images.labels is None:
        raise InputError("--max-drop measures top-1 on the calibration images and needs their labels "
                         "(class sub-folders, or an .npz with y)")
    fp32 = top1(model, images, batch_size)
    quantized = quantize(precision)
    qmodel, prepared = quantized[:2]
    modules = {layer.name for layer in layers if layer.kind in ("linear", "conv")}
    order = [name for name in sorted(sensitivity, key=lambda n: -sensitivity[n])
             if name in modules and precision.get(name) in ("int8", "int8-asym")]
    precision = dict(precision)
    moved: List[str] = []
    history = [{"fp16": [], "top1": top1(qmodel, images, batch_size)}]
    for name in progress(order, "max-drop", total=len(order), unit="layer"):
        if fp32 - history[-1]["top1"] <= max_drop:
            break
        trial = {**precision, name: "fp16"}
        if int8_mac_share(layers, trial) < int8_budget:
            continue
        precision = trial
        moved.append(name)
        qmodel.set_submodule(name, copy.deepcopy(prepared.get_submodule(name)))
        history.append({"fp16": list(moved), "top1": top1(qmodel, images, batch_size)})
    drop = fp32 - history[-1]["top1"]
    met = drop <= max_drop
    if met:
        log.info("--max-drop %g: top-1 drop %.2f points on %d calibration images with %d more layer(s) in FP16",
                 max_drop, drop, len(images), len(moved))
    else:
        log.warning("--max-drop %g not met within --int8-budget %g %%: top-1 drop %.2f points on %d calibration "
                    "images with %d more layer(s) in FP16", max_drop, int8_budget, drop, len(images), len(moved))
    record = {"max_drop": max_drop, "met": met, "images": int(len(images)),
              "measured_on": "the labelled calibration images (the build's calibration set)",
              "fp32_top1": fp32, "int8_top1": history[-1]["top1"], "drop": float(np.round(drop, 4)),
              "fp16_for_max_drop": moved, "history": history, "seconds": round(time.perf_counter() - started, 1)}
    return precision, record, (None if moved else quantized)
