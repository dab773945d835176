"""Which quantizers a low-bit (W4A4 by default) ViT loses its accuracy to: one class of quantizer at a time.

    python benchmarks/low_bit_probe.py [--models imagenet_vit_tiny cifar10_vit] [--bits W4A4]
                                       [--starts max mse-clip] [--threads N]

The recovery benchmark's setting (every Linear, the patch embedding, the head and both attention
matmuls quantized, per-channel weights, per-tensor activations, calibration on 512 images,
jetson-orin techniques with the softmax unshifted), PyTorch fake-quant, scored against FP32 on the
recovery benchmark's held-out images. The quantizers are grouped by what they read -- weights,
the qkv input (after LayerNorm 1), q and k, v, the softmax output, the attention-out input, the
fc1 input (after LayerNorm 2), the fc2 input (after GELU), the patch embedding's and the head's
inputs -- and each group is measured twice: *alone* at low bits (every other quantizer off: what
that group costs by itself) and *left out* (every other quantizer on, that group float: what is
left when it is fixed). A group whose "left out" row is still near zero is not the only problem; a
last row leaves out the two groups that cost the most alone.
Two starting points: ``max`` (the calibrated range, what PTQ plain and the recovery start from)
and ``mse-clip`` (below 8 bits each quantizer's max clipped to its least-squared-error value, per
channel for weights -- the start ``vitdeploy qat`` trains from).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from ablation import PairedScore, logits, run_models  # noqa: E402
from recovery import load  # noqa: E402
from vitdeploy.inventory import find_layers  # noqa: E402
from vitdeploy.plan import PrecisionPlan  # noqa: E402
from vitdeploy.qat import parse_bits  # noqa: E402
from vitdeploy.quantize.low_bit import mse_clip_below_8_bits  # noqa: E402
from vitdeploy.quantize.quantizer import TensorQuantizer  # noqa: E402
from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques  # noqa: E402
from vitdeploy.report import table  # noqa: E402

# group -> pattern on the quantizer's module name (timm and vit-pytorch-like layouts alike)
GROUPS = {
    "weights": r"weight_quantizer$",
    "qkv input (post-LN1)": r"attn\.qkv\.input_quantizer$",
    "q, k": r"attn\.[qk]_quantizer$",
    "v": r"attn\.v_quantizer$",
    "softmax output": r"softmax_quantizer$",
    "attn-out input": r"attn\.proj\.input_quantizer$",
    "fc1 input (post-LN2)": r"fc1\.input_quantizer$",
    "fc2 input (post-GELU)": r"fc2\.input_quantizer$",
    "patch-embed, head inputs": r"^(patch_embed\.proj|head)\.input_quantizer$",
}


def groups_of(qmodel) -> dict:
    """{group: [quantizer]} over the enabled quantizers; every one must fall in exactly one group."""
    found = {g: [] for g in GROUPS}
    for name, module in qmodel.named_modules():
        if isinstance(module, TensorQuantizer) and module.enabled:
            hits = [g for g, pattern in GROUPS.items() if re.search(pattern, name)]
            if len(hits) != 1:
                raise RuntimeError(f"quantizer {name} is in {len(hits)} groups")
            found[hits[0]].append(module)
    return {g: qs for g, qs in found.items() if qs}


def run_model(name: str, args, work: Path) -> list:
    model, spec, calib, x, y = load(name, work, args.calib_size)
    layers = find_layers(model, spec)
    precision = PrecisionPlan(default="int8", layers={}).resolve(layer.name for layer in layers)
    weight_bits, activation_bits = parse_bits(args.bits)
    bits = {"weights": weight_bits, "activations": activation_bits}
    paired = PairedScore(logits(model, x), y)
    rows = []

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                m(calib[i:i + 64])

    for method in args.starts:
        start = time.perf_counter()
        qmodel, _, _ = quantize_with_techniques(model, precision, "jetson-orin", forward_loop, "max",
                                                Techniques(shift=True, softmax_shift=False), num_bits=bits)
        if method == "mse-clip":
            mse_clip_below_8_bits(qmodel, calib[:128])
        groups = groups_of(qmodel)
        everything = [q for qs in groups.values() for q in qs]
        paired.new_baseline()

        def score(what: str) -> None:
            top1, agree, kl, _ = paired(logits(qmodel, x))
            rows.append([name, method, what, top1, agree, kl])
            print(f"  {name} {args.bits} {method} {what}: top-1 {top1:.2f} %, agreement {agree:.2f} %, "
                  f"KL ×1e3 {kl}", file=sys.stderr, flush=True)

        score(f"all {args.bits}")
        alone = {}
        for group, quantizers in groups.items():
            for q in everything:
                q.enabled = q in quantizers
            score(f"{group} alone")
            alone[group] = rows[-1][4]
            for q in everything:
                q.enabled = q not in quantizers
            score(f"all but {group}")
        worst = sorted(alone, key=alone.get)[:2]   # the two groups that cost the most by themselves
        for q in everything:
            q.enabled = not any(q in groups[g] for g in worst)
        score(f"all but {' and '.join(worst)}")
        for q in everything:
            q.enabled = True
        print(f"  {name} {method}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["imagenet_vit_tiny", "cifar10_vit"])
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--starts", nargs="+", default=["max", "mse-clip"], choices=["max", "mse-clip"])
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run_models(args, run_model, "vitdeploy-probe-")
    if rows is None:
        return 1
    print(table(["model", "start", "quantized", "top-1 %", "agreement with FP32 %", "KL ×1e3"], rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all; {args.bits}, every layer quantized; PyTorch fake-quant; "
          f"{torch.get_num_threads()} threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
