"""Where the default ViT-Tiny INT8 build's agreement with FP32 is lost, and how low it can go.

    python benchmarks/int8_floor.py [--work DIR] [--threads N] [--every-layer]

The jetson-orin default build's quantized model (measured plan, max calibration on 512 of the
``imagenet_samples`` photos, channel shift, FP16 attention), in PyTorch fake-quant, scored on the
other 488 against FP32: top-1, agreement and KL(FP32 ‖ variant), each variant paired with the
default (fixed / broken, McNemar p). Variants switch one thing:

* ``weights INT8 only``: every activation quantizer off -- the agreement no per-tensor activation
  scheme can beat with these weights; ``... GPTQ weights``: the same with GPTQ rounding (Hessian of
  each layer's calibration inputs) instead of round-to-nearest;
* ``FP16 everything``: the TX2 build (model.half());
* ``+ FP16 blocks.0 fc1, proj``: the two layers whose float inputs cut the KL most, kept in float
  (3.5 % of the Linear MACs; the plan's budget allows 4.6 % more);
* ``outlier split, k channels``: the k input channels with the largest calibrated |x| of every
  Linear bypass its INT8 quantizer (a deployment would add a k-wide FP16 MatMul per layer), the
  per-tensor scale set by the others.

``--every-layer``: the same for the hardest plan TensorRT deploys (every Linear, the patch
embedding, the head and both attention matmuls INT8: the recovery benchmark's plain row).

It also prints how close to a tie FP32 is on the images the default build flips: agreement on a
488-image sample moves by whole images, and the flips sit among the images with the smallest
FP32 top-2 probability margin.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from ablation import PairedScore, logits  # noqa: E402
from real_vit import held_out  # noqa: E402
from tests.integration.shared_data import SHARED  # noqa: E402
from vitdeploy.data import load_images  # noqa: E402
from vitdeploy.inventory import find_layers  # noqa: E402
from vitdeploy.load import load_model  # noqa: E402
from vitdeploy.measured_plan import measured_plan  # noqa: E402
from vitdeploy.pipeline import BuildConfig, _quantize  # noqa: E402
from vitdeploy.plan import PrecisionPlan, role_defaults  # noqa: E402
from vitdeploy.quantize.apply import activation_quantizers, quantized_layers, run_with_hooks  # noqa: E402
from vitdeploy.quantize.quantizer import fake_quantize  # noqa: E402
from vitdeploy.report import table  # noqa: E402
from vitdeploy.targets import get_target  # noqa: E402

WEIGHTS = SHARED / "imagenet_vit_tiny" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
SAMPLES = SHARED / "imagenet_samples"


def input_statistics(qmodel, images: torch.Tensor):
    """Per Linear, the Gram matrix XᵀX and the per-channel max |x| of what its input quantizer sees
    (the shifted input), with every activation in float."""
    layers = {n: m for n, m in quantized_layers(qmodel).items() if isinstance(m, torch.nn.Linear)}
    gram, chan = {}, {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().flatten(0, -2)
            gram[name] = gram.get(name, 0) + x.double().T @ x.double()
            top = x.abs().amax(0)
            chan[name] = top if name not in chan else torch.maximum(chan[name], top)
        return record

    with activations_off(qmodel):
        run_with_hooks(qmodel, [m.input_quantizer.register_forward_hook(hook(n)) for n, m in layers.items()],
                       images, 32)
    return layers, gram, chan


class activations_off:
    """Every activation quantizer off (the attention matmuls' too), or only the inputs of ``names``."""

    def __init__(self, qmodel, names=None):
        self.quantizers = (activation_quantizers(qmodel) if names is None else
                           [m.input_quantizer for n, m in quantized_layers(qmodel).items() if n in names])

    def __enter__(self):
        for q in self.quantizers:
            q.enabled = False

    def __exit__(self, *exc):
        for q in self.quantizers:
            q.enabled = True


def gptq_(layer: torch.nn.Linear, gram: torch.Tensor, damp: float = 0.01) -> None:
    """GPTQ (Frantar et al. 2022) in place, on the layer's fixed per-channel 8-bit grid."""
    w = layer.weight.detach().double().clone()
    step = layer.weight_quantizer.scale.double()
    qmax = layer.weight_quantizer.qmax
    h = gram.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i in range(w.shape[1]):
        q = torch.clamp(torch.round(w[:, i] / step), -qmax, qmax) * step
        err = (w[:, i] - q) / u[i, i]
        w[:, i] = q
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None]
    layer.weight.data = w.to(layer.weight.dtype)


class OutlierSplit(torch.nn.Module):
    """x's k largest-range channels pass in float, the rest through one per-tensor INT8 scale."""

    def __init__(self, channel_amax: torch.Tensor, k: int):
        super().__init__()
        self.mask = torch.zeros_like(channel_amax)
        self.mask[channel_amax.topk(k).indices] = 1.0
        self.amax = torch.where(self.mask.bool(), 0.0, channel_amax).max().clamp_min(1e-8)

    def forward(self, x):
        return fake_quantize(x * (1 - self.mask), self.amax / 127) + x * self.mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--every-layer", action="store_true", help="the hardest plan: every layer INT8")
    parser.add_argument("--stat-images", type=int, default=512, help="calibration images for GPTQ / split statistics")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not WEIGHTS.is_file() or not SAMPLES.is_dir():
        print(f"no ImageNet ViT-Tiny or samples under {SHARED}", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="vitdeploy-int8-floor-"))
    work.mkdir(parents=True, exist_ok=True)
    data = np.load(held_out(work, WEIGHTS, SAMPLES))
    x, y = torch.from_numpy(data["x"]), data["y"]
    model, spec = load_model(WEIGHTS, "vit_tiny_patch16_224")
    calib = load_images(SAMPLES, spec).sample(512, 0)
    layers = find_layers(model, spec)
    if args.every_layer:
        plan = PrecisionPlan(default="int8")
    else:
        plan = measured_plan(model, layers, role_defaults(layers, include_attention=False),
                             calib.subset(range(64)), "max", 90.0, 64)
    cfg = BuildConfig(model=WEIGHTS, target="jetson-orin")
    qmodel, prepared, _, _ = _quantize(model, plan.resolve(l.name for l in layers), get_target("jetson-orin"),
                                       calib, cfg)
    reference = logits(prepared, x)
    paired = PairedScore(reference, y)
    rows, flipped = [], {}

    def score(what: str, out: torch.Tensor) -> None:
        rows.append([what, *paired(out)])
        flipped[what] = paired.flipped
        print(f"{what}: agreement {rows[-1][2]:.2f} %", flush=True)

    baseline = "every layer INT8 (jetson-orin)" if args.every_layer else "default build (jetson-orin)"
    score(baseline, logits(qmodel, x))
    with activations_off(qmodel):
        score("weights INT8 only (activations float)", logits(qmodel, x))
    stats = torch.from_numpy(np.concatenate([b for b, _ in calib.batches(64)]))[:args.stat_images]
    linears, gram, chan = input_statistics(qmodel, stats)
    with activations_off(qmodel):
        gptq_model = copy.deepcopy(qmodel)
        for name, layer in quantized_layers(gptq_model).items():
            if name in gram:
                gptq_(layer, gram[name])
        score("weights INT8 only, GPTQ weights", logits(gptq_model, x))
    del gptq_model
    score("FP16 everything", logits(copy.deepcopy(prepared).half(), x.half()))
    early = [] if args.every_layer else ["blocks.0.mlp.fc1", "blocks.0.attn.proj"]
    for name in early:
        quantized_layers(qmodel)[name].weight_quantizer.enabled = False
    if early:
        with activations_off(qmodel, early):
            score("+ FP16 blocks.0 fc1, proj", logits(qmodel, x))
    for name in early:
        quantized_layers(qmodel)[name].weight_quantizer.enabled = True
    originals = {name: layer.input_quantizer for name, layer in linears.items()}
    for k in (4, 16):
        for name, layer in linears.items():
            layer.input_quantizer = OutlierSplit(chan[name], k)
        score(f"outlier split, k = {k} channels", logits(qmodel, x))
    for name, layer in linears.items():
        layer.input_quantizer = originals[name]

    print(table(["variant", "top-1 %", "agreement with FP32 %", "KL x1e3", "vs default: fixed / broken"], rows))
    probs = reference.softmax(1).topk(2, 1).values
    margin = (probs[:, 0] - probs[:, 1]).numpy()
    default_flipped = flipped[baseline]
    print(f"\nFP32 top-2 probability margin: 5 % of the {len(x)} images below {np.quantile(margin, 0.05):.3f}, "
          f"10 % below {np.quantile(margin, 0.10):.3f}; on the {int(default_flipped.sum())} images the default "
          f"flips: {', '.join(f'{m:.3f}' for m in sorted(margin[default_flipped]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
