"""Accuracy techniques that survive TensorRT: shift (asymmetric INT8), channel rescaling, bias correction.

TensorRT runs only symmetric INT8 (zero points 0) with per-tensor activation scales, so every
technique here ends as plain FP32 parameters or constants around symmetric Q/DQ:

* **shift** -- the input of a quantized Linear is centred before its symmetric quantizer,
  ``x - z`` with z the middle of each input channel's calibrated [min, max], and ``W_q·z`` goes
  into the bias. Post-GELU/ReLU activations (fc2 inputs) are lopsided ([-0.17, max] after GELU):
  centring halves the range one per-tensor scale must cover; LayerNorm output channels have
  offsets (β) of their own. In ONNX: a ``Sub`` of a constant before the QuantizeLinear and a folded
  bias initializer (export/qdq.py); the fake-quant layer computes exactly that (layers.py).
* **rescale** -- per-channel factors folded into LayerNorm γ/β and the columns of the Linears
  it feeds (SmoothQuant, α = 0.75 here), so one per-tensor scale fits all channels (rescale.py).
* **bias correction** -- ``b' = b - (W_q - W)·E[x]``: the mean output error of the quantized
  weights, with E[x] the per-channel input mean on the calibration data (apply.py).

The plan's ``int8-asym`` precision is asymmetric input quantization whatever the switches:
on ``cpu`` (ONNX Runtime) a uint8 Q/DQ with a zero point, on TensorRT targets one shift z per
tensor (the same numbers as a zero point: z = (min + max)/2, amax = (max - min)/2) -- or one per
channel when the shift technique is on. Conv layers (the patch embedding) take the zero point on
cpu and stay symmetric on TensorRT (their input is the normalized image, already centred).

Attention matmuls: the softmax output P (in [0, a]) is the lopsided activation there. With
``int8-asym`` on ``matmul_av`` or the shift technique it is quantized asymmetrically: on cpu as
uint8 with zero point 0, on TensorRT targets shifted, ``Q(P - a/2)·Q(v - v̄) + v̄`` with v̄ the
token mean of v (exact before quantization since softmax rows sum to 1; a ``Sub`` on P, a
``ReduceMean`` and ``Sub`` on v, an ``Add`` after the matmul, zero points 0; see attention.py). The price on TensorRT: the ``Sub`` between Softmax and its QuantizeLinear is not
in the fused-MHA pattern (linted as ``attention-softmax-shift``), so it is part of the opt-in
shift technique, not of a default build. q, k and v stay symmetric: a shift of v is exact in FP32
(softmax rows sum to 1) but not once P is quantized, and q/k have no fold at all.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, Optional

from torch import nn

from .attention import MATMULS

# Defaults, and the measurements behind them: technique_defaults.py.
from .technique_defaults import DEFAULT_BIAS_CORRECTION, DEFAULT_RESCALE, DEFAULT_SHIFT, DEFAULT_SHIFT_BUILD  # noqa: E402
# SmoothQuant's α (0.5 in the paper; 1.0 is RepQ-ViT's full equalisation): W4A4, all three, KL ×1e3
# cifar10_vit / mnist_vit: α = 0.5: 19.5 / 16.6, 0.75: 18.3 / 14.1, 1.0: 17.2 / 15.2 -- 0.75 and 1.0
# tie on average, and at INT8 0.75 is better (mnist_vit relative logit error 0.0080 vs 0.0099).
DEFAULT_ALPHA = 0.75


@dataclasses.dataclass(frozen=True)
class Techniques:
    shift: bool = DEFAULT_SHIFT
    #: With the shift on, whether it also shifts the softmax output of an INT8 matmul_av (the build
    #: turns it off on TensorRT targets unless --shift is given: outside the fused-MHA pattern).
    softmax_shift: bool = True
    rescale: bool = DEFAULT_RESCALE
    bias_correction: bool = DEFAULT_BIAS_CORRECTION
    alpha: float = DEFAULT_ALPHA

    @classmethod
    def none(cls) -> "Techniques":
        return cls(shift=False, rescale=False, bias_correction=False)

    @classmethod
    def all(cls) -> "Techniques":
        return cls(shift=True, rescale=True, bias_correction=True)


def _is_tensorrt(target) -> bool:
    if target is None:
        return False
    if isinstance(target, str):
        from ..targets import get_target

        target = get_target(target)
    return bool(target.is_tensorrt)


def _weight_bits(target) -> int:
    if target is None:
        return 8
    from ..targets import get_target

    return get_target(target).weight_bits


def input_modes(model: nn.Module, precision: Dict[str, str], target, techniques: Techniques) -> Dict[str, str]:
    """Per quantized layer, how its input is quantized (one of apply.INPUT_MODES).

    int8 Linear: shifted per channel with the shift technique, else symmetric. int8-asym Linear:
    TensorRT → shifted (per channel with the technique, else one z per tensor); cpu → uint8 with a
    zero point (after the per-channel shift with the technique). int8-asym Conv: uint8 on cpu,
    symmetric on TensorRT. matmul_av with int8-asym or the shift technique: the softmax output
    uint8 on cpu, shifted by half its range on TensorRT. Everything else: int8.
    """
    modules = dict(model.named_modules())
    trt = _is_tensorrt(target)
    modes = {}
    for name, p in precision.items():
        if p not in ("int8", "int8-asym"):
            continue
        asym = p == "int8-asym"
        if name.rpartition(".")[2] in MATMULS:
            if name.endswith("matmul_av") and (asym or (techniques.shift and techniques.softmax_shift)):
                modes[name] = "shift-tensor" if trt else "uint8"
            else:
                modes[name] = "int8"
        elif type(modules.get(name)) is nn.Linear:
            if trt:
                modes[name] = "shift-channel" if techniques.shift else ("shift-tensor" if asym else "int8")
            elif asym:
                modes[name] = "uint8+shift-channel" if techniques.shift else "uint8"
            else:
                modes[name] = "shift-channel" if techniques.shift else "int8"
        else:
            modes[name] = "uint8" if asym and not trt else "int8"
    return modes


def quantize_with_techniques(model: nn.Module, precision: Dict[str, str], target,
                             forward_loop: Callable[[nn.Module], None], calib_method: str = "max",
                             techniques: Optional[Techniques] = None, calib_kwargs: Optional[dict] = None,
                             num_bits: Optional[Dict[str, int]] = None):
    """Rescale (FP32 pre-pass), quantize, calibrate (with shifts) and bias-correct.

    ``precision``: resolved plan (layer name → precision). Returns ``(qmodel, prepared, record)``:
    the calibrated fake-quant model, the FP32 model it was made from (``model`` itself unless
    rescaling changed a copy of it) and the build.json "techniques" object (``shift.layers``: every
    Linear whose input is shifted, int8-asym ones on TensorRT included).
    ``num_bits`` (``{"weights": 4, "activations": 4}``) is for simulations: the QDQ export is INT8 only.
    """
    from .apply import calibrate, quantize_model
    from .rescale import rescale_norm_linears

    techniques = techniques or Techniques()
    quantized = [n for n, p in precision.items() if p in ("int8", "int8-asym")]
    prepared, rescale_record = model, {"groups": {}, "skipped": {}}
    if techniques.rescale and quantized:
        prepared = copy.deepcopy(model)
        rescale_record = rescale_norm_linears(prepared, forward_loop, set(quantized), alpha=techniques.alpha,
                                              centered=techniques.shift)
        if not rescale_record["groups"]:
            prepared = model
    modes = input_modes(prepared, precision, target, techniques)
    qmodel = quantize_model(prepared, quantized, calib_method, calib_kwargs, input_modes=modes)
    set_num_bits(qmodel, weights=_weight_bits(target))  # cpu: 7-bit weights (targets.py)
    if num_bits:
        set_num_bits(qmodel, **num_bits)
    calibrate(qmodel, forward_loop, bias_correction=techniques.bias_correction)
    corrected = [n for n, m in qmodel.named_modules() if getattr(m, "bias_corrected", False)]
    record = {
        "shift": {"enabled": techniques.shift, "default": DEFAULT_SHIFT_BUILD,
                  "softmax": any(n.endswith("matmul_av") and m in ("shift-tensor", "uint8") for n, m in modes.items()),
                  "layers": [n for n, m in modes.items() if "shift" in m]},
        "rescale": {"enabled": techniques.rescale, "default": DEFAULT_RESCALE, "alpha": techniques.alpha,
                    "groups": rescale_record["groups"], "skipped": rescale_record["skipped"]},
        "bias_correction": {"enabled": techniques.bias_correction, "default": DEFAULT_BIAS_CORRECTION,
                            "layers": corrected},
        "int8_asym": {n: _asym_form(n, modes[n]) for n, p in precision.items() if p == "int8-asym"},
    }
    return qmodel, prepared, record


def _asym_form(name: str, mode: str) -> str:
    """How an int8-asym layer was realised, for build.json."""
    if mode == "int8":
        why = "q and k have no exact fold for a shift" if name.endswith("matmul_qk") else \
            "Conv inputs are not shifted on TensorRT"
        return f"int8 symmetric ({why})"
    if name.endswith("matmul_av"):
        if mode == "shift-tensor":
            return "softmax output int8 after a shift by half its range, v int8 centred over the tokens"
        return "softmax output uint8 (zero point 0), v int8 symmetric"
    return {"uint8": "uint8 with a zero point",
            "uint8+shift-channel": "per-channel shift, then uint8 with a zero point",
            "shift-tensor": "int8 after a per-tensor shift folded into the bias",
            "shift-channel": "int8 after a per-channel shift folded into the bias"}[mode]


def set_num_bits(qmodel: nn.Module, weights: int = 8, activations: int = 8) -> None:
    """Simulate other bit widths (e.g. W4A4) in PyTorch: every weight and activation quantizer."""
    from .quantizer import TensorQuantizer

    for m in qmodel.modules():
        if isinstance(m, TensorQuantizer):
            m.num_bits = weights if m.axis is not None else activations


def describe_input(module) -> Dict[str, object]:
    """build.json fields for a quantized Linear/Conv: how its input and bias were quantized."""
    quantizer = module.input_quantizer
    shift = getattr(module, "input_shift", None)
    out: Dict[str, object] = {}
    if getattr(quantizer, "unsigned", False):
        out["activations"] = f"uint{quantizer.num_bits} asymmetric, per tensor, zero point {quantizer.zero_point}"
        out["input_range"] = [float(quantizer.range_min), float(quantizer.range_max)]
    else:
        out["activations"] = f"int{quantizer.num_bits} symmetric, per tensor"
    if shift is not None:
        out["activations"] += (" after a per-channel shift" if shift.numel() > 1 else " after a per-tensor shift") + \
            " folded into the bias"
        out["input_shift"] = "per channel" if shift.numel() > 1 else float(shift)
    if getattr(module, "bias_corrected", False):
        out["bias"] = "corrected: b - (W_q - W)·E[x]"
    return out


def describe_matmul(module, matmul: str) -> Dict[str, object]:
    """build.json fields for an attention matmul whose softmax output is quantized asymmetrically."""
    softmax = module.softmax_quantizer
    if matmul == "matmul_av" and getattr(softmax, "unsigned", False):
        return {"activations": f"softmax output uint8 asymmetric (zero point {softmax.zero_point}), "
                               "v int8 symmetric, per tensor"}
    if matmul == "matmul_av" and getattr(module, "softmax_shift", None) is not None:
        return {"activations": "softmax output int8 symmetric after a shift by half its range, "
                               "v int8 symmetric after centring over the tokens (its mean added back), per tensor",
                "softmax_shift": float(module.softmax_shift)}
    return {}
