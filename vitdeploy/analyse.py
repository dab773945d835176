"""Stage 2: how sensitive is each layer to INT8? Two scores per layer, and a plan from them.

- **S(W) = ‖W‖₂ / ‖W‖_F · E‖∂L/∂W‖_F** (our design's score), the expectation over calibration
  batches. L is cross-entropy with the labels when the data has them; without labels it is the
  cross-entropy to the FP32 model's own top-1. (The KL divergence to the FP32 output itself has a
  zero gradient at the FP32 weights, so it cannot rank anything; its one-hot version can.)
  Attention matmuls have no weights and get no S(W).
- **Measured**: only that layer quantized (weights and input, or both matmul inputs), the output
  compared with FP32: mean KL(FP32 ‖ quantized) and top-1 agreement. All quantizers are calibrated
  in one pass, then switched on one layer at a time, so the cost is one forward pass per layer.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .inventory import LayerInfo
from .log import get_logger, progress

log = get_logger(__name__)


@dataclasses.dataclass
class LayerScore:
    name: str
    kind: str
    role: str
    macs: int
    spectral_ratio: Optional[float]      # ‖W‖₂ / ‖W‖_F
    grad_norm: Optional[float]           # E‖∂L/∂W‖_F
    score: Optional[float]               # S(W), the product
    kl: float                            # measured, this layer alone in INT8
    agreement: float                     # % same top-1 as FP32, this layer alone in INT8


@dataclasses.dataclass
class SensitivityReport:
    model: str
    images: int
    loss: str
    layers: List[LayerScore]

    def to_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "loss": self.loss,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    def ranked(self, by: str = "kl") -> List[LayerScore]:
        return sorted(self.layers, key=lambda s: -(getattr(s, by) if getattr(s, by) is not None else -1.0))


def analyse(model, layers: List[LayerInfo], images, calib_method: str = "max", batch_size: int = 64,
            name: str = "model") -> SensitivityReport:
    """Both scores for every layer, on ``images`` (an ImageSet; labels used when present)."""
    import torch

    inputs = torch.from_numpy(np.concatenate([x for x, _ in images.batches(256)]))
    labels = torch.from_numpy(images.labels) if images.labels is not None else None
    with torch.no_grad():
        reference = torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    targets = labels if labels is not None else reference.argmax(1)
    grads = _gradient_norms(model, layers, inputs, targets, batch_size)
    kl, agree = _measured(model, layers, inputs, reference, calib_method, batch_size)
    modules = dict(model.named_modules())
    scores = []
    for layer in layers:
        ratio = score = None
        if layer.kind != "matmul":
            ratio = _spectral_ratio(modules[layer.name].weight.detach())
            score = ratio * grads[layer.name]
        scores.append(LayerScore(layer.name, layer.kind, layer.role, layer.macs, ratio,
                                 grads.get(layer.name), score, kl[layer.name], agree[layer.name]))
    loss = "cross-entropy (labels)" if labels is not None else "cross-entropy to the FP32 top-1"
    return SensitivityReport(name, len(inputs), loss, scores)


def _spectral_ratio(weight) -> float:
    import torch

    w = weight.reshape(weight.shape[0], -1).float()
    return float(torch.linalg.matrix_norm(w, ord=2) / torch.linalg.matrix_norm(w, ord="fro"))


def _gradient_norms(model, layers, inputs, targets, batch_size) -> Dict[str, float]:
    """E over batches of ‖∂L/∂W‖_F for every weighted layer."""
    import torch

    modules = dict(model.named_modules())
    weighted = [layer.name for layer in layers if layer.kind != "matmul"]
    sums = {name: 0.0 for name in weighted}
    batches = range(0, len(inputs), batch_size)
    params = {name: modules[name].weight for name in weighted}
    for start in progress(batches, "gradients", total=len(batches)):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads):
            sums[name] += float(g.norm())
    model.zero_grad(set_to_none=True)
    return {name: total / len(batches) for name, total in sums.items()}


def _measured(model, layers, inputs, reference, calib_method, batch_size):
    kl, agree, _ = measure_layers(model, layers, inputs, reference, calib_method, batch_size)
    return kl, agree


def measure_images(model, layers, images, calib_method="max", batch_size=64):
    """`measure_layers` on an ImageSet, FP32 reference included (the build's measured plan and --max-drop)."""
    import torch

    inputs = torch.from_numpy(np.concatenate([x for x, _ in images.batches(256)]))
    with torch.no_grad():
        reference = torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return measure_layers(model, layers, inputs, reference, calib_method, batch_size)


def measure_layers(model, layers, inputs, reference, calib_method="max", batch_size=64):
    """KL(FP32 ‖ one layer INT8), top-1 agreement and the input amax (per-tensor quantizers) of each layer."""
    import torch

    from .quantize.apply import calibrate, quantize_model

    qmodel = quantize_model(model, [layer.name for layer in layers], calib_method)

    def run(m):
        with torch.no_grad():
            return torch.cat([m(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])

    calibrate(qmodel, run)
    switches = {layer.name: _quantizers_of(qmodel, layer) for layer in layers}
    for qs in switches.values():
        for q in qs:
            q.enabled = False
    amax = {name: [float(q.amax.max()) for q in qs if q.axis is None] for name, qs in switches.items()}
    ref_logp = torch.log_softmax(reference.double(), dim=1)
    kl, agree = {}, {}
    for layer in progress(layers, "sensitivity", total=len(layers), unit="layer"):
        for q in switches[layer.name]:
            q.enabled = True
        out = run(qmodel)
        for q in switches[layer.name]:
            q.enabled = False
        logp = torch.log_softmax(out.double(), dim=1)
        # KL ≥ 0 per image; where a layer changes nothing, rounding can leave -1e-9 instead of 0.
        kl[layer.name] = float((ref_logp.exp() * (ref_logp - logp)).sum(1).clamp_min(0).mean())
        agree[layer.name] = float((out.argmax(1) == reference.argmax(1)).float().mean() * 100)
    return kl, agree, amax


def _quantizers_of(qmodel, layer: LayerInfo):
    from .quantize.attention import matmul_quantizers

    modules = dict(qmodel.named_modules())
    if layer.kind == "matmul":
        path, _, matmul = layer.name.rpartition(".")
        return matmul_quantizers(modules[path], matmul)
    module = modules[layer.name]
    return [module.input_quantizer, module.weight_quantizer]


# --------------------------------------------------------------------------- plans from scores

def default_thresholds(report: SensitivityReport):
    """τ_low = the 75th percentile of S(W); τ_high = Q3 + 1.5·IQR (Tukey's outlier fence).

    So about a quarter of the layers get the int8-asym tier and only layers whose score is an
    outlier stay in FP16 — on ViTs the scores are close together except for a few layers.
    """
    scores = np.array([s.score for s in report.layers if s.score is not None])
    q1, q3 = np.percentile(scores, [25, 75])
    return float(q3), float(q3 + 1.5 * (q3 - q1))


def plan_from_scores(report: SensitivityReport, tau_low: Optional[float] = None, tau_high: Optional[float] = None):
    """int8 below τ_low, int8-asym up to τ_high, fp16 above; patch-embed and head FP16.

    Attention matmuls (no S(W)) stay INT8 unless their measured KL is an outlier among all layers.
    """
    from .plan import PrecisionPlan

    low, high = default_thresholds(report)
    tau_low = low if tau_low is None else tau_low
    tau_high = high if tau_high is None else tau_high
    kls = np.array([s.kl for s in report.layers])
    k1, k3 = np.percentile(kls, [25, 75])
    kl_fence = k3 + 1.5 * (k3 - k1)
    layers = {}
    for s in report.layers:
        if s.role in ("patch_embed", "head"):
            layers[s.name] = "fp16"
        elif s.score is None:
            layers[s.name] = "fp16" if s.kl > kl_fence else "int8"
        else:
            layers[s.name] = "int8" if s.score < tau_low else ("int8-asym" if s.score < tau_high else "fp16")
    return PrecisionPlan(default="int8", layers=layers,
                         meta={"source": "sensitivity thresholds", "tau_low": tau_low, "tau_high": tau_high})


def search_max_drop(model, layers: List[LayerInfo], report: SensitivityReport, data, max_drop: float,
                    calib_images, calib_method: str = "max", batch_size: int = 64):
    """Most INT8 MACs with a measured top-1 drop ≤ ``max_drop`` points on labelled ``data``.

    Greedy: start with every layer INT8, then move layers to FP16 in order of measured
    sensitivity (KL) until the drop fits. Returns (plan, history of (layers in FP16, top-1)).
    """
    import torch

    from .plan import PrecisionPlan, int8_mac_share
    from .quantize.apply import calibrate, quantize_model

    from .accuracy_budget import top1

    calib = torch.from_numpy(np.concatenate([b for b, _ in calib_images.batches(256)]))

    fp32 = top1(model, data, batch_size)
    qmodel = quantize_model(model, [layer.name for layer in layers], calib_method)
    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), batch_size):
                m(calib[i:i + batch_size])

    calibrate(qmodel, forward_loop)
    switches = {layer.name: _quantizers_of(qmodel, layer) for layer in layers}
    order = [s.name for s in report.ranked("kl")]
    fp16: List[str] = []
    history = []
    while True:
        acc = top1(qmodel, data, batch_size)
        history.append({"fp16_layers": list(fp16), "top1": acc, "drop": fp32 - acc})
        if fp32 - acc <= max_drop or len(fp16) == len(order):
            break
        name = order[len(fp16)]
        fp16.append(name)
        for q in switches[name]:
            q.enabled = False
    resolved = {layer.name: ("fp16" if layer.name in fp16 else "int8") for layer in layers}
    meta = {"source": f"--max-drop {max_drop}", "fp32_top1": fp32, "int8_top1": history[-1]["top1"],
            "int8_linear_mac_share": int8_mac_share(layers, resolved),
            "int8_mac_share": int8_mac_share(layers, resolved, kinds=("linear", "conv", "matmul")),
            "search_images": int(len(data))}
    return PrecisionPlan(default="int8", layers=resolved, meta=meta), history


# --------------------------------------------------------------------------- outputs

def format_table(report: SensitivityReport, plan_layers: Optional[Dict[str, str]] = None) -> str:
    from .report import table

    rows = []
    for s in report.layers:
        rows.append([s.name, s.role, "—" if s.score is None else f"{s.score:.4g}", f"{s.kl:.3e}",
                     f"{s.agreement:.2f}", (plan_layers or {}).get(s.name, "")])
    return table(["layer", "role", "S(W)", "KL alone INT8", "agreement %", "plan"], rows)


def write_png(report: SensitivityReport, path: Path) -> None:
    """Both scores per layer in execution order, coloured by kind of layer, blocks separated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"patch_embed": "#7f7f7f", "qkv": "#1f77b4", "attn_qk": "#17becf", "attn_av": "#9edae5",
               "attn_out": "#ff7f0e", "mlp_fc1": "#2ca02c", "mlp_fc2": "#98df8a", "head": "#d62728",
               "linear": "#8c564b"}
    names = [s.name for s in report.layers]
    x = np.arange(len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(names)), 7), sharex=True)
    score = [s.score if s.score is not None else 0.0 for s in report.layers]
    axes[0].bar(x, score, color=[colours.get(s.role, "#8c564b") for s in report.layers])
    axes[0].set_ylabel("S(W) = ‖W‖₂/‖W‖F · E‖∂L/∂W‖F")
    axes[1].bar(x, [s.kl for s in report.layers], color=[colours.get(s.role, "#8c564b") for s in report.layers])
    axes[1].set_ylabel("KL(FP32 ‖ layer alone INT8)")
    axes[1].set_yscale("log")
    for ax in axes:  # block boundaries
        for i, n in enumerate(names[1:], 1):
            if n.split(".")[:2] != names[i - 1].split(".")[:2]:
                ax.axvline(i - 0.5, color="#dddddd", linewidth=0.8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names, rotation=90, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for r, c in colours.items()
               if any(s.role == r for s in report.layers)]
    axes[0].legend(handles, [r for r in colours if any(s.role == r for s in report.layers)], fontsize=7, ncol=4)
    axes[0].set_title(f"{report.model}: per-layer INT8 sensitivity ({report.images} images, {report.loss})")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
