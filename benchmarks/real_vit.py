"""The README's real-ViT table: default builds of the ImageNet ViT-Tiny, scored on held-out samples.

    python benchmarks/real_vit.py [--targets jetson-orin,cpu] [--work DIR] [--extra="--shift --rescale"]

Calibrates on 512 of the 1,000 ``../shared/data/imagenet_samples`` photos (the build's own sample,
seed 0) and evaluates on the other 488, written once as preprocessed tensors to ``held_out.npz``.
TensorRT targets are scored with Q/DQ in float (what TensorRT computes), cpu with this host's
fused kernels.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def held_out(work: Path, weights: Path, samples: Path) -> Path:
    """The sample photos the default calibration (512 images, seed 0) leaves out, preprocessed."""
    from vitdeploy.data import load_images
    from vitdeploy.load import load_model

    path = work / "held_out.npz"
    if not path.is_file():
        _, spec = load_model(weights, "vit_tiny_patch16_224")
        everything = load_images(samples, spec, require_labels=True)
        calib = set(everything.sample(512, 0).paths)
        rest = everything.subset([i for i, p in enumerate(everything.paths) if p not in calib])
        np.savez(path, x=np.concatenate([x for x, _ in rest.batches(64)]), y=rest.labels)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="jetson-orin,cpu")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--extra", default="", help="more build options, e.g. '--shift --rescale'")
    args = parser.parse_args()
    from tests.integration.shared_data import SHARED
    from vitdeploy.cli import main as vitdeploy
    from vitdeploy.report import table

    weights = SHARED / "imagenet_vit_tiny" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
    samples = SHARED / "imagenet_samples"
    if not weights.is_file() or not samples.is_dir():
        print(f"no ImageNet ViT-Tiny or samples under {SHARED}", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="vitdeploy-real-vit-"))
    work.mkdir(parents=True, exist_ok=True)
    data = held_out(work, weights, samples)
    rows = []
    for target in args.targets.split(","):
        out = work / target
        start = time.perf_counter()
        code = vitdeploy(["build", str(weights), "--arch", "vit_tiny_patch16_224", "--calib", str(samples),
                          "--target", target, "--eval-data", str(data), "--out", str(out), "--quiet",
                          *shlex.split(args.extra)])
        if code != 0:
            return code
        record = json.loads((out / "build.json").read_text())
        acc = record["accuracy"]
        rows.append([target, acc["int8_computed_by"], acc["fp32_top1"], acc["int8_top1"], acc["agreement"],
                     acc["kl_to_fp32"],
                     record["plan"]["int8_linear_mac_share"], ", ".join(record["plan"]["fp16_measured"]) or "-",
                     time.perf_counter() - start])
    print(table(["target", "INT8 computed by", "FP32 top-1 %", "INT8 top-1 %", "agreement %", "KL(FP32 ‖ INT8)",
                 "INT8 share of Linear MACs %", "kept FP16 by measurement", "build s"], rows))
    print(f"\ntimm vit_tiny_patch16_224 (ImageNet), 512 calibration samples, {len(np.load(data)['y'])} held-out "
          f"samples; options: {args.extra or 'defaults'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
