"""Ablation of accuracy recovery (``build --recover``) on the real ImageNet ViT-Tiny and on cifar10_vit.

    python benchmarks/recovery.py [--models imagenet_vit_tiny cifar10_vit] [--settings int8 w6a6 w4a4]
                                  [--variants plain reconstruction +progressive ... all] [--iters N] [--json F]

Settings, all on the same layers -- every Linear, the patch embedding, the head and both attention
matmuls (the hardest plan TensorRT can deploy): ``int8`` (deployable), ``w6a6`` and ``w4a4``
(simulated: per-channel weights, per-tensor activations; PyTorch only, the exporter is INT8), and
``w8a8-token``: the thesis's W8A8 with one dynamic scale per token on every Linear input (a
simulation: TensorRT takes per-tensor activation scales).
Calibration is max on 512 images with the build's default techniques for jetson-orin (per-channel
input shift on, softmax unshifted). Variants:

* ``plain``: calibration only (what a build without --recover exports);
* ``shifted softmax``: plain with today's shifted softmax (the --shift form on TensorRT targets);
* ``reconstruction``: block reconstruction alone, one stage (rounding, activation steps, biases);
* ``+progressive`` / ``+low-rank`` / ``+softmax`` / ``+curriculum``: reconstruction with that one part;
* ``all``: every part (what ``--recover`` does by default); ``all + shifted softmax``: on top of it.

ViT-Tiny: calibration and reconstruction on 512 of ``imagenet_samples``, evaluation on the other 488;
cifar10_vit: 512 images of ``train_10k.npz``, evaluation on all 10,000 of ``test.npz``. Columns:
top-1, agreement with FP32, KL(FP32 ‖ quantized), wall time (quantize + recover), and against plain
in the same setting the images fixed / broken with McNemar's exact p. PyTorch fake-quant evaluation
(the build's verification shows the exported ONNX computes the same).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from ablation import PairedScore, load as load_small, logits  # noqa: E402
from tests.integration.shared_data import SHARED  # noqa: E402
from vitdeploy.inventory import find_layers  # noqa: E402
from vitdeploy.plan import QUANTIZED, PrecisionPlan  # noqa: E402
from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques  # noqa: E402
from vitdeploy.recover import RecoverySettings, recover  # noqa: E402
from vitdeploy.report import table  # noqa: E402

NONE = dict(progressive=False, lowrank=False, softmax=False, curriculum=False)
VARIANTS = {
    "plain": None,
    "shifted softmax": None,
    "reconstruction": NONE,
    "+progressive": {**NONE, "progressive": True},
    "+low-rank": {**NONE, "lowrank": True},
    "+softmax": {**NONE, "softmax": True},
    "+curriculum": {**NONE, "curriculum": True},
    "all": {},
    "all + shifted softmax": {},
}
SHIFTED = ("shifted softmax", "all + shifted softmax")
SETTINGS = {"int8": None, "w6a6": {"weights": 6, "activations": 6}, "w4a4": {"weights": 4, "activations": 4},
            "w8a8-token": None}


def per_token(qmodel) -> None:
    """The thesis's setting: every Linear input quantized with one dynamic scale per token (simulation)."""
    from vitdeploy.quantize.apply import quantized_layers

    for m in quantized_layers(qmodel).values():
        if isinstance(m, torch.nn.Linear):
            m.input_quantizer.per_token = True


def load(name: str, work: Path, calib_size: int):
    """(model, spec, calibration tensor, evaluation tensor, labels)."""
    if name != "imagenet_vit_tiny":
        return load_small(name, work, 10 ** 9, calib_size)
    from vitdeploy.data import load_images
    from vitdeploy.load import load_model

    model, spec = load_model(SHARED / "imagenet_vit_tiny" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
                             "vit_tiny_patch16_224")
    images = load_images(SHARED / "imagenet_samples", spec)
    pick = np.sort(np.random.default_rng(0).choice(len(images), size=calib_size, replace=False))
    calib, held = images.subset(pick), images.subset(np.setdiff1d(np.arange(len(images)), pick))
    as_tensor = lambda s: torch.from_numpy(np.concatenate([x for x, _ in s.batches(64)]))
    return model, spec, as_tensor(calib), as_tensor(held), torch.from_numpy(np.asarray(held.labels))


def run_model(name: str, args, work: Path) -> list:
    model, spec, calib, x, y = load(name, work, args.calib_size)
    layers = find_layers(model, spec)
    precision = PrecisionPlan(default="int8", layers={}).resolve(layer.name for layer in layers)
    quantized = [n for n, p in precision.items() if p in QUANTIZED]
    score = PairedScore(logits(model, x), y)
    rows = [[name, "FP32", "", score.fp32_top1(), 100.0, 0.0, "", ""]]

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                m(calib[i:i + 64])

    for setting in args.settings:
        bits = SETTINGS[setting]
        score.new_baseline()
        for variant in args.variants:
            start = time.perf_counter()
            techniques = Techniques(shift=True, softmax_shift=variant in SHIFTED)
            qmodel, prepared, _ = quantize_with_techniques(model, precision, "jetson-orin", forward_loop, "max",
                                                           techniques, num_bits=bits)
            if setting == "w8a8-token":
                per_token(qmodel)
            parts = VARIANTS[variant]
            if parts is not None:
                settings = RecoverySettings(**parts, **({"iters": args.iters} if args.iters is not None else {}))
                recover(prepared, qmodel, layers, quantized, calib, settings)
            seconds = time.perf_counter() - start
            top1, agree, kl, versus = score(logits(qmodel, x))
            rows.append([name, setting, variant, top1, agree, kl, round(seconds), versus])
            print(f"  {name} {setting} {variant}: top-1 {top1:.2f} %, agreement {agree:.2f} %, KL ×1e3 {kl}, "
                  f"{seconds:.0f} s {versus}", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["imagenet_vit_tiny", "cifar10_vit"])
    parser.add_argument("--settings", nargs="+", default=["int8", "w6a6", "w4a4"], choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "all + shifted softmax"],
                        choices=list(VARIANTS))
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--iters", type=int, help="gradient steps per unit and stage (default: --recover's)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"no real assets at {SHARED}", file=sys.stderr)
        return 1
    if "plain" in args.variants:
        args.variants = ["plain"] + [v for v in args.variants if v != "plain"]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitdeploy-recovery-") as work:
        for name in args.models:
            rows += run_model(name, args, Path(work))
    headers = ["model", "setting", "variant", "top-1 %", "agreement with FP32 %", "KL ×1e3", "seconds",
               "vs plain: fixed / broken (McNemar p)"]
    print(table(headers, rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all; max calibration on {args.calib_size} images; "
          f"PyTorch fake-quant evaluation; {torch.get_num_threads()} threads.")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(headers, r)) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
