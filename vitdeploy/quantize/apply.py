"""Swap layers for their quantized twins and calibrate them with the caller's data.

Layer names are module paths (``blocks.0.attn.qkv``) for Linear/Conv2d, and
``<attention path>.matmul_qk`` / ``.matmul_av`` for the two attention matmuls.
The caller owns the data (ModelOpt's ``forward_loop`` idea): ``calibrate`` only runs it.

``input_modes`` chooses, per layer, how its input activation is quantized (see `INPUT_MODES`):
symmetric INT8 (the default), asymmetric UINT8 with a zero point (ONNX Runtime only), or
symmetric INT8 after a shift folded into the bias (TensorRT's form of asymmetric: zero points
stay 0). For ``matmul_av`` "uint8" quantizes the softmax output (≥ 0) unsigned and
"shift-tensor" shifts it by half its range (with v centred over the tokens, see attention.py);
q, k and v stay symmetric, since a shift there has no exact fold once P is quantized.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .attention import MATMULS, attention_twin_for, convert_attention, matmul_quantizers
from .layers import QuantLinear, quant_class_for
from .quantizer import TensorQuantizer
from .stats import ChannelStats

#: How a layer's input activation is quantized. "int8": symmetric, per tensor. "uint8":
#: asymmetric with a zero point (ONNX Runtime). "shift-tensor" / "shift-channel": symmetric INT8
#: of ``x - z`` with z one constant (= asymmetric quantization, TensorRT-legal) or one constant
#: per input channel (each channel centred), ``W_q·z`` folded into the bias; Linear layers only.
#: "uint8+shift-channel": both (the shift, then an asymmetric quantizer).
INPUT_MODES = ("int8", "uint8", "shift-tensor", "shift-channel", "uint8+shift-channel")


def _parse_mode(name: str, mode: str):
    if mode not in INPUT_MODES:
        raise ValueError(f"layer '{name}': input mode {mode!r} is not one of {', '.join(INPUT_MODES)}")
    unsigned = mode.startswith("uint8")
    shift = "channel" if mode.endswith("shift-channel") else ("tensor" if mode == "shift-tensor" else None)
    return unsigned, shift


def quantize_model(model: nn.Module, layer_names: Iterable[str], calib_method: str = "max",
                   calib_kwargs: Optional[dict] = None, input_modes: Optional[Dict[str, str]] = None) -> nn.Module:
    """A copy of ``model`` in which each named layer is replaced by (or turned into) its quantized twin.

    ``input_modes`` maps layer names to one of `INPUT_MODES` (default "int8" for every layer).
    """
    qmodel = copy.deepcopy(model)
    names = list(layer_names)
    input_modes = dict(input_modes or {})
    # Attention first: converting it keeps its children, which the Linear swaps then replace.
    for name in [n for n in names if n.rpartition(".")[2] in MATMULS]:
        attn_path, _, matmul = name.rpartition(".")
        module = dict(qmodel.named_modules()).get(attn_path)
        if module is None or (attention_twin_for(module) is None and not hasattr(module, "q_quantizer")):
            raise ValueError(f"layer '{name}': '{attn_path}' is not an attention module vitdeploy can quantize")
        if not hasattr(module, "q_quantizer"):
            convert_attention(module, calib_method, calib_kwargs)
        unsigned, shift = _parse_mode(name, input_modes.get(name, "int8"))
        if matmul == "matmul_av":  # softmax ≥ 0: all 2^8 codes on [0, max], by a zero point or a shift
            if unsigned:
                module.softmax_quantizer = TensorQuantizer(axis=None, unsigned=True)
            module.softmax_shift_enabled = shift is not None
        elif unsigned or shift is not None:
            raise ValueError(f"layer '{name}': q and k are quantized symmetrically (no free fold for a shift)")
        for q in matmul_quantizers(module, matmul):
            q.enabled = True
    modules = dict(qmodel.named_modules())
    for name in [n for n in names if n.rpartition(".")[2] not in MATMULS]:
        module = modules.get(name)
        qcls = quant_class_for(module) if module is not None else None
        if qcls is None:
            raise ValueError(f"layer '{name}' is not a quantizable Linear/Conv2d")
        unsigned, shift = _parse_mode(name, input_modes.get(name, "int8"))
        if shift is not None and qcls is not QuantLinear:
            raise ValueError(f"layer '{name}': an input shift is only folded into Linear layers")
        extra = {"unsigned": unsigned} if unsigned else {}
        if shift is not None:
            extra["shift_mode"] = shift
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else qmodel
        setattr(parent, child, qcls.from_float(module, calib_method, calib_kwargs, **extra))
    return qmodel


@torch.no_grad()
def run_with_hooks(model: nn.Module, handles: list, images: torch.Tensor, batch: int) -> None:
    """``model`` over ``images`` in batches on its own device, then the hooks in ``handles`` removed
    (also when the forward fails): how statistics and recordings are taken."""
    device = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch):
            model(images[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()


def quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Linear/Conv2d modules that carry an input and a weight quantizer, by path."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "input_quantizer", None), TensorQuantizer)}


def quantized_attentions(model: nn.Module) -> Dict[str, nn.Module]:
    """Attention modules with matmul quantizers, by path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "q_quantizer", None), TensorQuantizer)}


def activation_quantizers(model: nn.Module) -> List[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.axis is None and m.enabled]


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], None], bias_correction: bool = False) -> nn.Module:
    """Collect activation statistics with ``forward_loop(model)``, then quantize with them.

    Layers with an input shift get it here: the pass also records each one's per-channel
    min and max, z is the centre of that range and the quantizer's amax its half-width, whatever
    the calibration method. A clipping method (entropy, percentile, mse) on ``x - z`` clips the
    *bulk* of a channel whose mass is far from its centre: the post-GELU massive-activation
    channel of the real ViT's fc2 (most tokens near 0, one at 217) is centred at 108, entropy put
    amax at 6.9, and every token read ~100 -- 0 % top-1 (keeping the channel mean inside the
    range instead still left 72 % agreement: the one large token is what the block carries).
    z is then moved onto the quantization grid (a multiple of the scale) so that an input of
    exactly 0 stays exactly representable, as with an integer zero point.

    ``bias_correction``: after calibration, each quantized Linear/Conv's bias absorbs the mean
    output error of its quantized weights, ``b' = b - (W_q - W)·E[x]`` (E[x]: the per-channel
    mean of the layer's input over the calibration data).
    """
    quantizers = activation_quantizers(model)
    shifted = {name: m for name, m in model.named_modules()
               if isinstance(m, QuantLinear) and m.shift_mode and m.input_quantizer.enabled}
    corrected = {name: m for name, m in quantized_layers(model).items()
                 if m.weight_quantizer.enabled} if bias_correction else {}
    stats: Dict[str, ChannelStats] = {}
    for m in quantized_attentions(model).values():
        m.softmax_shift = None  # calibrate on the softmax output itself
    for name, m in shifted.items():
        m.input_shift = None
        stats[name] = ChannelStats(axis=-1, track_range=True, track_mean=name in corrected)
    for name, m in corrected.items():
        if name not in stats:
            stats[name] = ChannelStats(axis=1 if isinstance(m, nn.Conv2d) else -1, track_range=False)
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda _m, inputs, s=s: s.collect(inputs[0]))
               for name, s in stats.items()]
    # A shifted input's quantizer sees x - z, unknown until this pass ends: its amax comes from
    # the per-channel ranges (see above for why never from a clipping method).
    first = [q for q in quantizers if all(q is not m.input_quantizer for m in shifted.values())]
    try:
        for q in first:
            q.enable_calib()
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    for q in first:
        q.load_calib_amax()
    for m in quantized_attentions(model).values():
        m.finish_softmax_shift()
    for name, m in shifted.items():
        lo, hi = stats[name].range()
        if m.shift_mode == "tensor":
            lo, hi = lo.min(), hi.max()
        m.input_shift = (lo + hi) / 2
        half = float(((hi - lo) / 2).max())
        if m.input_quantizer.unsigned:
            m.input_quantizer.set_range(-half, half)
        else:
            m.input_quantizer.set_amax(half)
    for m in shifted.values():
        m.input_shift = _on_grid(m.input_shift, m.input_quantizer.scale)
    for name, m in corrected.items():
        correct_bias(m, stats[name].mean())
    return model


def _on_grid(shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z moved to the nearest multiple of the scale: x = 0 then maps to an integer code."""
    return (torch.round(shift / scale) * scale).to(torch.float32)


def correct_bias(module: nn.Module, input_mean: torch.Tensor) -> torch.Tensor:
    """``b -= (W_q - W)·E[x]`` for a quantized Linear/Conv2d (a bias is created if it had none).

    For a Conv2d E[x] is the per-input-channel mean, which assumes the mean is the same at every
    kernel position (true of images; exact where there is no padding and the data is stationary).
    Returns the correction subtracted.
    """
    with torch.no_grad():
        weight = module.weight.detach()
        delta = (module.weight_quantizer(weight) - weight).to(torch.float64)
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return torch.zeros(module.out_channels)
            delta = delta.sum(dim=(2, 3))
        correction = (delta @ input_mean.to(torch.float64)).to(torch.float32)
        if module.bias is None:
            module.bias = nn.Parameter(-correction)
        else:
            module.bias = nn.Parameter(module.bias.detach() - correction)
    module.bias_corrected = True
    return correction
