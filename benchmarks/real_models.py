"""Build the two real ViTs in ../shared/data and print FP32 vs INT8: top-1, agreement, size, latency.

    python benchmarks/real_models.py [--calib-method max] [--out /tmp/vitdeploy-bench]

cifar10_vit: timm ViT, 512 calibration images from train_10k.npz, all 10,000 test.npz images.
mnist_vit: plain-PyTorch ViT, calibration on t10k images 5000–9999, evaluation on 0–4999.
Latency: ONNX Runtime on this CPU, batch 1, 1 thread, median of 300 runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration.shared_data import SHARED, import_model_file, mnist_npz  # noqa: E402
from vitdeploy.backends.ort import OrtRunner  # noqa: E402
from vitdeploy.measure.core import latency_stats, random_feed, time_runner  # noqa: E402
from vitdeploy.pipeline import BuildConfig, build  # noqa: E402
from vitdeploy.report import table  # noqa: E402


def configs(work: Path, method: str):
    module = import_model_file(SHARED / "cifar10_vit" / "model.py", "cifar10_vit_model")
    torch.save(module.build(), work / "cifar10_vit.pt")
    mnist = mnist_npz(work)
    yield "cifar10_vit", BuildConfig(model=work / "cifar10_vit.pt", trust_pickle=True, mean=(0.5,), std=(0.5,),
                                     calib=SHARED / "cifar10" / "train_10k.npz", eval_data=SHARED / "cifar10" / "test.npz",
                                     calib_method=method, out=work / "cifar10_vit")
    yield "mnist_vit", BuildConfig(model=SHARED / "mnist_vit" / "vit_mnist.pt", arch=f"{SHARED / 'mnist_vit' / 'model.py'}:ViT",
                                   input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), calib=mnist["calib"],
                                   eval_data=mnist["eval"], calib_method=method, out=work / "mnist_vit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-method", default="max")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"no real assets at {SHARED}", file=sys.stderr)
        return 1
    work = args.out or Path(tempfile.mkdtemp(prefix="vitdeploy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg in configs(work, args.calib_method):
        record = build(cfg)
        acc = record["accuracy"]
        lat = {}
        for tag in ("fp32", "int8"):
            with OrtRunner(Path(record["output"]) / f"model.{tag}.onnx", threads=1) as runner:
                lat[tag] = latency_stats(time_runner(runner, random_feed(runner, 1), 30, 300))["median"]
        for tag in ("fp32", "int8"):
            rows.append([name, tag.upper(), acc["images"], acc[f"{tag}_top1"],
                         100.0 if tag == "fp32" else acc["agreement"], record["files"][f"model.{tag}.onnx"] / 1e6,
                         lat[tag], f"{lat['fp32'] / lat[tag]:.2f}x"])
        print(json.dumps({"model": name, "accuracy": acc, "latency_ms": lat,
                          "calib_seconds": record["inputs"]["calibration"]["seconds"]}), file=sys.stderr)
    print(table(["model", "precision", "images", "top-1 %", "agreement with FP32 %", "size (MB)",
                 "latency median (ms)", "speed-up"], rows))
    print(f"\ncalibration: {args.calib_method}, 512 images; ONNX Runtime {__import__('onnxruntime').__version__}, "
          "CPU, batch 1, 1 thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
