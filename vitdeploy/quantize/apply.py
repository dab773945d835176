"""Swap layers for their quantized twins and calibrate them with the caller's data.

The caller owns the data (ModelOpt's ``forward_loop`` idea): ``calibrate`` only runs it.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, Optional

from torch import nn

from .layers import quant_class_for
from .quantizer import TensorQuantizer


def quantize_model(model: nn.Module, layer_names: Iterable[str], calib_method: str = "max",
                   calib_kwargs: Optional[dict] = None) -> nn.Module:
    """A copy of ``model`` in which each named Linear/Conv2d is replaced by its quantized twin."""
    qmodel = copy.deepcopy(model)
    modules = dict(qmodel.named_modules())
    for name in layer_names:
        module = modules.get(name)
        qcls = quant_class_for(module) if module is not None else None
        if qcls is None:
            raise ValueError(f"layer '{name}' is not a quantizable Linear/Conv2d")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else qmodel
        setattr(parent, child, qcls.from_float(module, calib_method, calib_kwargs))
    return qmodel


def quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules that carry an input and a weight quantizer, by path."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "input_quantizer", None), TensorQuantizer)}


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> nn.Module:
    """Collect activation statistics with ``forward_loop(model)``, then switch quantization on."""
    act_quantizers = [m.input_quantizer for m in quantized_layers(model).values()]
    for q in act_quantizers:
        q.enable_calib()
    forward_loop(model)
    for q in act_quantizers:
        q.load_calib_amax()
    return model
