"""Ablation of the accuracy techniques (shift, rescale, bias correction) on the two real ViTs.

    python benchmarks/ablation.py [--images 5000] [--calib-size 512] [--models cifar10_vit mnist_vit]

For each model, three settings, each evaluated on the PyTorch fake-quant model (which the QDQ
ONNX reproduces, see the build's verification), with `max` calibration on 512 images:

(a) the hardest deployable INT8 plan: every Linear/Conv and both attention matmuls INT8
    (plan ``{"default": "int8", "layers": {}}``);
(b) simulated W4A4 on the same layers: 4-bit per-output-channel weights, 4-bit per-tensor
    activations, the softmax output and q, k, v included. PyTorch only, no ONNX: the exporter is INT8;
(b') W4A4 on the Linear layers only, the rest FP32: the reference configuration (plain min/max
    W4A4 of the Linear layers of cifar10_vit: 82.9 % agreement). ``--w4a4-layers`` picks (b), (b') or both.

Rows: plain, +shift, +rescale, +bias-correction (each alone) and all three, as built for a
TensorRT target (symmetric Q/DQ, zero points 0; the shift includes the shifted softmax output).
Columns: top-1, agreement (%) with the FP32 model's predictions, the mean KL(FP32 ‖ quantized)
of the output distributions (noise-free where agreement moves by a few images), and the flipped
images: how many, and how many of them are close calls for FP32 itself (top-2 logit margin below
--close, 0.1 by default); and, against plain in the same setting, the images each variant fixes and
breaks, with McNemar's exact two-sided p-value (is the agreement difference more than chance?).
Where agreement is saturated (mnist_vit at INT8) the flips are close calls that any quantization
noise decides, so agreement there cannot rank the techniques; KL can. Takes about 5 minutes on 2
idle cores. cifar10_vit: calibration from train_10k.npz, evaluation on the first
--images test.npz images; mnist_vit: calibration from t10k images 5000–9999, evaluation on 0–4999.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration.shared_data import SHARED, import_model_file, mnist_npz  # noqa: E402
from vitdeploy.data import load_images  # noqa: E402
from vitdeploy.inventory import find_layers  # noqa: E402
from vitdeploy.load import load_model  # noqa: E402
from vitdeploy.measure.evaluate import Predictions, agreement, kl_divergence  # noqa: E402
from vitdeploy.plan import PrecisionPlan  # noqa: E402
from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques  # noqa: E402
from vitdeploy.report import table  # noqa: E402

VARIANTS = {
    "plain": Techniques.none(),
    "+shift": Techniques(shift=True, rescale=False, bias_correction=False),
    "+rescale": Techniques(shift=False, rescale=True, bias_correction=False),
    "+bias-correction": Techniques(shift=False, rescale=False, bias_correction=True),
    "all": Techniques.all(),
}
W4A4 = {"weights": 4, "activations": 4}


def load(name: str, work: Path, images: int, calib_size: int):
    """(model, spec, calibration tensor, evaluation tensor, labels)."""
    if name == "cifar10_vit":
        module = import_model_file(SHARED / "cifar10_vit" / "model.py", "cifar10_vit_model")
        torch.save(module.build(), work / "cifar10_vit.pt")
        model, spec = load_model(work / "cifar10_vit.pt", trust_pickle=True, mean=[0.5], std=[0.5])
        calib = load_images(SHARED / "cifar10" / "train_10k.npz", spec)
        data = load_images(SHARED / "cifar10" / "test.npz", spec, require_labels=True)
    else:
        paths = mnist_npz(work)
        model, spec = load_model(SHARED / "mnist_vit" / "vit_mnist.pt", f"{SHARED / 'mnist_vit' / 'model.py'}:ViT",
                                 input_size=[1, 28, 28], mean=[0.1307], std=[0.3081])
        calib = load_images(paths["calib"], spec)
        data = load_images(paths["eval"], spec, require_labels=True)
    data = data.subset(range(min(images, len(data))))
    calib = calib.sample(calib_size, 0)
    as_tensor = lambda s: torch.from_numpy(np.concatenate([x for x, _ in s.batches(256)]))
    return model, spec, as_tensor(calib), as_tensor(data), torch.from_numpy(np.asarray(data.labels))


def mcnemar(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value for paired flips: fixed vs broken images, each 1/2 under H0."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def versus_plain(plain_flipped, flipped) -> str:
    """Images a variant fixes and breaks against plain (both: flipped vs FP32), with McNemar's exact p."""
    fixed, broken = int((plain_flipped & ~flipped).sum()), int((flipped & ~plain_flipped).sum())
    return f"{fixed} / {broken} (p = {mcnemar(fixed, broken):.2g})"


class PairedScore:
    """Scores variants against FP32 (top-1 %, agreement %, KL(FP32 ‖ variant) ×1e3, with the build's own
    measures) and pairs each with the first one scored since the last ``new_baseline()`` (fixed /
    broken, McNemar p). ``flipped``: the last variant's images whose class differs from FP32's."""

    def __init__(self, reference: torch.Tensor, labels) -> None:
        self.fp32 = Predictions(reference.float().numpy(), np.asarray(labels))
        self.baseline = self.flipped = None

    def fp32_top1(self) -> float:
        return round(self.fp32.top1, 2)

    def new_baseline(self) -> None:
        self.baseline = None

    def __call__(self, out: torch.Tensor):
        variant = Predictions(out.float().numpy(), self.fp32.labels)
        self.flipped = variant.argmax != self.fp32.argmax
        versus = "" if self.baseline is None else versus_plain(self.baseline, self.flipped)
        if self.baseline is None:
            self.baseline = self.flipped
        return (round(variant.top1, 2), round(agreement(self.fp32, variant), 2),
                round(kl_divergence(self.fp32, variant) * 1e3, 2), versus)


def run_models(args, run_model, prefix: str):
    """``run_model(name, args, work)`` for each of ``args.models`` in one temporary folder, after
    ``--threads``; the rows of all, or None (and a line saying why) without the shared assets."""
    if not SHARED.is_dir():
        print(f"no real assets at {SHARED}", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        for name in args.models:
            rows += run_model(name, args, Path(work))
    return rows


def logits(model, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def run_model(name: str, args, work: Path) -> list:
    model, spec, calib, x, y = load(name, work, args.images, args.calib_size)
    layers = find_layers(model, spec)
    int8 = PrecisionPlan(default="int8", layers={}).resolve(layer.name for layer in layers)
    linear_only = {layer.name: "int8" if layer.kind == "linear" else "fp32" for layer in layers}
    settings = {"(a) INT8, all layers": (int8, None)}
    if args.w4a4_layers in ("all", "both"):
        settings["(b) W4A4, all layers"] = (int8, W4A4)
    if args.w4a4_layers in ("linear", "both"):
        settings["(b) W4A4, Linear layers"] = (linear_only, W4A4)
    reference = logits(model, x)
    fp32 = reference.argmax(1)
    log_p = torch.log_softmax(reference, 1)
    top2 = reference.topk(2, 1).values
    close = (top2[:, 0] - top2[:, 1]) < args.close
    rows = [[name, "FP32", "", round(float((fp32 == y).float().mean() * 100), 2), 100.0, 0.0,
             f"0 ({int(close.sum())} close calls)", ""]]

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                m(calib[i:i + 64])

    for setting, (precision, bits) in settings.items():
        plain_flipped = None
        for variant, techniques in VARIANTS.items():
            start = time.perf_counter()
            qmodel, _, _ = quantize_with_techniques(model, precision, args.target, forward_loop, "max",
                                                    techniques, num_bits=bits)
            out = logits(qmodel, x)
            pred = out.argmax(1)
            top1 = float((pred == y).float().mean() * 100)
            agree = float((pred == fp32).float().mean() * 100)
            kl = float((log_p.exp() * (log_p - torch.log_softmax(out, 1))).sum(1).mean())
            flipped = pred != fp32
            flips = f"{int(flipped.sum())} ({int((flipped & close).sum())})"
            if plain_flipped is None:
                plain_flipped, versus = flipped, ""
            else:
                versus = versus_plain(plain_flipped, flipped)
            rows.append([name, setting, variant, round(top1, 2), round(agree, 2), round(kl * 1e3, 3), flips, versus])
            print(f"  {name} {setting} {variant}: top-1 {top1:.2f} %, agreement {agree:.2f} %, KL {kl:.2e} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_vit", "mnist_vit"])
    parser.add_argument("--images", type=int, default=5000, help="evaluation images (default 5000)")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--w4a4-layers", choices=["all", "linear", "both"], default="both",
                        help="setting (b): 4 bits on the same layers as (a), on the Linear layers only (the "
                             "reference configuration), or both (default)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's; use 1 on a busy machine, where more run slower)")
    parser.add_argument("--close", type=float, default=0.1,
                        help="top-2 logit margin under which an FP32 prediction counts as a close call (default 0.1)")
    parser.add_argument("--target", default="jetson-orin",
                        help="target the techniques are built for (default jetson-orin: TensorRT's symmetric rules)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"no real assets at {SHARED}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitdeploy-ablation-") as work:
        for name in args.models:
            rows += run_model(name, args, Path(work))
    print(table(["model", "setting", "techniques", "top-1 %", "agreement with FP32 %", "KL ×1e3",
                 f"flips (FP32 margin < {args.close:g})", "vs plain: fixed / broken (McNemar p)"], rows))
    print(f"\n{time.perf_counter() - started:.0f} s; max calibration on {args.calib_size} images; "
          f"PyTorch fake-quant evaluation.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
