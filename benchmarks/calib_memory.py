"""Peak memory and time of calibrating timm vit_base_patch16_224 (random weights, 224×224) on 512 images.

    python benchmarks/calib_memory.py [--method entropy] [--images 512]

ONNX Runtime's entropy calibrator keeps every activation and needs more than 21 GiB here; ours
streams 2048-bin histograms. Prints the process's peak resident memory (VmHWM) and seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_mb() -> float:
    """This process's own peak resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main() -> int:
    import numpy as np
    import timm
    import torch

    from vitdeploy.artifacts import ModelSpec
    from vitdeploy.data import ImageSet
    from vitdeploy.inventory import find_layers
    from vitdeploy.load import prepare_for_quantization
    from vitdeploy.log import progress
    from vitdeploy.quantize.apply import calibrate, quantize_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="entropy")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = prepare_for_quantization(timm.create_model("vit_base_patch16_224", pretrained=False))
    spec = ModelSpec(name="vit_base_patch16_224", input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3,
                     num_classes=1000)
    # Random pixels, kept as uint8 like a real calibration set; preprocessed batch by batch.
    pixels = np.random.default_rng(0).integers(0, 256, size=(args.images, 224, 224, 3), dtype=np.uint8)
    images = ImageSet(source="random", spec=spec, pixels=pixels)
    layers = find_layers(model, spec)
    qmodel = quantize_model(model, [layer.name for layer in layers], args.method)
    before = peak_mb()

    def loop(m):
        with torch.no_grad():
            for x, _ in progress(images.batches(args.batch_size), "calibrate", total=images.num_batches(args.batch_size)):
                m(torch.from_numpy(x))

    start = time.perf_counter()
    calibrate(qmodel, loop)
    seconds = time.perf_counter() - start
    peak = peak_mb()
    print(json.dumps({"model": spec.name, "images": args.images, "method": args.method, "quantizers": sum(
        1 for m in qmodel.modules() if m.__class__.__name__ == "TensorQuantizer"), "seconds": round(seconds, 1),
        "peak_rss_mb_before_calibration": round(before), "peak_rss_mb": round(peak)}))
    print(f"peak RSS {peak / 1024:.2f} GiB for {args.images} images ({args.method}, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
