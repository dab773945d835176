"""Swap layers for their quantized twins and calibrate them with the caller's data.

Layer names are module paths (``blocks.0.attn.qkv``) for Linear/Conv2d, and
``<attention path>.matmul_qk`` / ``.matmul_av`` for the two attention matmuls.
The caller owns the data (ModelOpt's ``forward_loop`` idea): ``calibrate`` only runs it.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional

from torch import nn

from .attention import MATMULS, attention_twin_for, convert_attention, matmul_quantizers
from .layers import quant_class_for
from .quantizer import TensorQuantizer


def quantize_model(model: nn.Module, layer_names: Iterable[str], calib_method: str = "max",
                   calib_kwargs: Optional[dict] = None) -> nn.Module:
    """A copy of ``model`` in which each named layer is replaced by (or turned into) its quantized twin."""
    qmodel = copy.deepcopy(model)
    names = list(layer_names)
    # Attention first: converting it keeps its children, which the Linear swaps then replace.
    for name in [n for n in names if n.rpartition(".")[2] in MATMULS]:
        attn_path, _, matmul = name.rpartition(".")
        module = dict(qmodel.named_modules()).get(attn_path)
        if module is None or (attention_twin_for(module) is None and not hasattr(module, "q_quantizer")):
            raise ValueError(f"layer '{name}': '{attn_path}' is not an attention module vitdeploy can quantize")
        if not hasattr(module, "q_quantizer"):
            convert_attention(module, calib_method, calib_kwargs)
        for q in matmul_quantizers(module, matmul):
            q.enabled = True
    modules = dict(qmodel.named_modules())
    for name in [n for n in names if n.rpartition(".")[2] not in MATMULS]:
        module = modules.get(name)
        qcls = quant_class_for(module) if module is not None else None
        if qcls is None:
            raise ValueError(f"layer '{name}' is not a quantizable Linear/Conv2d")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else qmodel
        setattr(parent, child, qcls.from_float(module, calib_method, calib_kwargs))
    return qmodel


def quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Linear/Conv2d modules that carry an input and a weight quantizer, by path."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "input_quantizer", None), TensorQuantizer)}


def quantized_attentions(model: nn.Module) -> Dict[str, nn.Module]:
    """Attention modules with matmul quantizers, by path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "q_quantizer", None), TensorQuantizer)}


def activation_quantizers(model: nn.Module) -> List[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.axis is None and m.enabled]


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> nn.Module:
    """Collect activation statistics with ``forward_loop(model)``, then quantize with them."""
    quantizers = activation_quantizers(model)
    for q in quantizers:
        q.enable_calib()
    forward_loop(model)
    for q in quantizers:
        q.load_calib_amax()
    return model
