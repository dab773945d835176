"""Quantization-aware training (``vitdeploy qat``) against post-training quantization, W4A4 by default.

    python benchmarks/qat.py [--models cifar10_vit imagenet_vit_tiny] [--bits W4A4] [--epochs N]
                             [--variants LSQ +IRM +DGD both] [--no-recovery] [--json F]

Every Linear, the patch embedding, the head and both attention matmuls quantized (per-channel
weights, per-tensor activations), max calibration on 512 images with the build's default techniques
for jetson-orin (softmax unshifted) -- the recovery benchmark's setting, so its rows are comparable. Rows:

* ``PTQ plain``: calibration only; ``PTQ recovery (all)``: ``--recover``'s block reconstruction with
  every part, the best post-training result of benchmarks/recovery.py at W4A4;
* ``FP32, same training`` (labelled data only): the FP32 model trained with QAT's recipe and no
  quantizer, the reference a top-1 above the untrained FP32 model is read against; each QAT row
  trained with labels is scored against it as well (``..., against FP32 same training``: agreement
  and KL to that model -- what the quantization costs once the training is the same);
* QAT ``LSQ`` (learned steps, logit distillation), ``+IRM`` (rectified q/k), ``+DGD`` (q/k
  similarity distillation), ``both`` (Q-ViT: IRM and DGD) -- what ``vitdeploy qat`` trains.

cifar10_vit: QAT on all of ``train_10k.npz`` with its labels (cross-entropy beside the distillation;
``both, no labels`` shows distillation alone), evaluation on all 10,000 of ``test.npz``.
ImageNet ViT-Tiny: distillation only (no labels) on 512 of ``imagenet_samples`` -- the recovery
benchmark's 512 -- agreement with FP32 on the other 488. Columns: top-1, agreement with FP32,
KL(FP32 ‖ quantized), wall time (calibration + training), and against PTQ plain the images fixed /
broken with McNemar's exact p. PyTorch fake-quant evaluation (a qat build's verification shows the
exported ONNX computes the same).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from ablation import PairedScore, logits, run_models  # noqa: E402
from recovery import load  # noqa: E402
from tests.integration.shared_data import SHARED  # noqa: E402
from vitdeploy.inventory import find_layers  # noqa: E402
from vitdeploy.plan import QUANTIZED, PrecisionPlan  # noqa: E402
from vitdeploy.qat import QatSettings, parse_bits, train_qat  # noqa: E402
from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques  # noqa: E402
from vitdeploy.report import table  # noqa: E402

VARIANTS = {
    "LSQ": dict(irm=False, dgd=False),
    "+IRM": dict(irm=True, dgd=False),
    "+DGD": dict(irm=False, dgd=True),
    "both": dict(irm=True, dgd=True),
    "both, no labels": dict(irm=True, dgd=True),
    # The reference for "within 2 points of FP32" where the images have labels: the FP32 model itself
    # trained with the same recipe (cross-entropy + logit distillation from its untrained copy, same
    # epochs, rate and order), no quantizer -- what the training alone does to top-1.
    "FP32, same training": dict(irm=False, dgd=False, weight_bits=8, activation_bits=8),
}


def training_data(name: str, work: Path, calib: torch.Tensor):
    """(images, labels or None) QAT trains on: cifar10's train_10k with labels; ViT-Tiny's 512 without."""
    if name != "cifar10_vit":
        return calib, None
    from vitdeploy.data import as_tensor_source, load_images
    from vitdeploy.load import load_model

    _, spec = load_model(work / "cifar10_vit.pt", trust_pickle=True, mean=[0.5], std=[0.5])
    images = load_images(SHARED / "cifar10" / "train_10k.npz", spec)
    return as_tensor_source(images), torch.as_tensor(np.asarray(images.labels), dtype=torch.long)


def run_model(name: str, args, work: Path) -> list:
    model, spec, calib, x, y = load(name, work, args.calib_size)
    train_x, train_y = training_data(name, work, calib)
    if args.train_images:
        train_x, train_y = train_x[:args.train_images], None if train_y is None else train_y[:args.train_images]
    layers = find_layers(model, spec)
    precision = PrecisionPlan(default="int8", layers={}).resolve(layer.name for layer in layers)
    quantized = [n for n, p in precision.items() if p in QUANTIZED]
    weight_bits, activation_bits = parse_bits(args.bits)
    bits = None if (weight_bits, activation_bits) == (8, 8) else {"weights": weight_bits, "activations": activation_bits}
    paired = PairedScore(logits(model, x), y)
    rows = [[name, "FP32", paired.fp32_top1(), 100.0, 0.0, "", ""]]

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                m(calib[i:i + 64])

    def score(label, qmodel, seconds):
        top1, agree, kl, versus = paired(logits(qmodel, x))
        versus = "" if label.startswith("FP32") else versus   # a trained FP32 model is no quantization of it
        rows.append([name, label, top1, agree, kl, round(seconds), versus])
        print(f"  {name} {args.bits} {label}: top-1 {top1:.2f} %, agreement {agree:.2f} %, KL ×1e3 {kl}, "
              f"{seconds:.0f} s {versus}", file=sys.stderr, flush=True)

    def calibrated():
        qmodel, prepared, _ = quantize_with_techniques(model, precision, "jetson-orin", forward_loop, "max",
                                                       Techniques(shift=True, softmax_shift=False), num_bits=bits)
        return qmodel, prepared

    start = time.perf_counter()
    qmodel, _ = calibrated()
    score("PTQ plain", qmodel, time.perf_counter() - start)
    if not args.no_recovery:
        from vitdeploy.recover import RecoverySettings, recover

        start = time.perf_counter()
        qmodel, prepared = calibrated()
        recover(prepared, qmodel, layers, quantized, calib, RecoverySettings())
        score("PTQ recovery (all)", qmodel, time.perf_counter() - start)
    base = QatSettings(weight_bits=weight_bits, activation_bits=activation_bits, epochs=args.epochs,
                       batch=args.batch_size, seed=0)
    if args.lr is not None:
        base = dataclasses.replace(base, lr=args.lr)
    # The FP32 reference first, so each QAT row can also be read against it (what quantization costs
    # once the training is the same).
    variants = sorted(args.variants, key=lambda v: not v.startswith("FP32"))
    trained_fp32, trained_rows = None, []
    for variant in variants:
        if variant == "both, no labels" and train_y is None:
            continue   # ViT-Tiny trains without labels in every variant
        if variant == "FP32, same training" and train_y is None:
            continue   # without labels it would distil the model into itself
        start = time.perf_counter()
        qmodel, prepared = (copy.deepcopy(model), model) if variant.startswith("FP32") else calibrated()
        labels = None if variant == "both, no labels" else train_y
        record = train_qat(prepared, qmodel, train_x, labels, dataclasses.replace(base, **VARIANTS[variant]))
        score(variant if variant.startswith("FP32") else f"QAT {variant}", qmodel, time.perf_counter() - start)
        if variant.startswith("FP32"):
            trained_fp32 = PairedScore(logits(qmodel, x), y)
        elif trained_fp32 is not None and labels is not None:
            top1, agree, kl, _ = trained_fp32(logits(qmodel, x))
            trained_rows.append([name, f"QAT {variant}, against FP32 same training", top1, agree, kl, "", ""])
        print(f"    loss per epoch: {record['history']}", file=sys.stderr, flush=True)
    return rows + trained_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_vit", "imagenet_vit_tiny"])
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=QatSettings().epochs)
    parser.add_argument("--batch-size", type=int, default=QatSettings().batch)
    parser.add_argument("--lr", type=float, help="weights' rate (default: vitdeploy qat's)")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--train-images", type=int, help="train on the first N images only (a quick look)")
    parser.add_argument("--no-recovery", action="store_true", help="skip the PTQ recovery (all) row")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run_models(args, run_model, "vitdeploy-qat-")
    if rows is None:
        return 1
    headers = ["model", "variant", "top-1 %", "agreement with FP32 %", "KL ×1e3", "seconds",
               "vs PTQ plain: fixed / broken (McNemar p)"]
    print(table(headers, rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all; {args.bits}, every layer quantized; {args.epochs} epochs, "
          f"batch {args.batch_size}; PyTorch fake-quant evaluation; {torch.get_num_threads()} threads.")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(headers, r)) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
