"""Real images on an x86 AVX2 CPU without VNNI: our cpu build vs ONNX Runtime's quantize_static.

    python benchmarks/emulated_avx2.py [--work DIR] [--limit 10000]

Needs ``qemu-x86_64`` (Debian: ``apt-get install qemu-user``) when this host has VNNI: ONNX
Runtime then runs under ``qemu-x86_64 -cpu Haswell``, whose CPUID says AVX2 without VNNI and whose
TCG executes ``vpmaddubsw`` with its int16 saturation, so MLAS picks and runs the AVX2 kernel.
(On a real AVX2-only host the script runs ONNX Runtime directly.) Speed under emulation means
nothing; only the numbers are compared.

1. builds cifar10_vit for ``--target cpu`` here (512 calibration images from train_10k.npz);
2. quantizes the same FP32 ONNX with ``quantize_static`` on the same 512 images (QDQ, per-channel,
   U8 activations / S8 weights): its defaults, and ``reduce_range=True`` (7-bit weights);
3. on the AVX2 CPU, runs every file on the CIFAR-10 test images with ONNX Runtime's fused kernels
   and with Q/DQ in float, and prints top-1 and agreement with FP32 for each.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs on the AVX2 CPU: ONNX Runtime and numpy only.
_CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from vitdeploy.artifacts import ModelSpec, read_json
from vitdeploy.backends.ort import OrtRunner
from vitdeploy.cpu_isa import host_isa
from vitdeploy.data import load_images
from vitdeploy.measure.evaluate import predict
work, limit = sys.argv[1], int(sys.argv[2])
spec = ModelSpec.from_dict(read_json(work + "/cpu/build.json")["preprocessing"])
images = load_images({data!r}, spec, require_labels=True)
images = images.subset(range(min(limit, len(images))))
runs = {{}}
for name, path in json.loads(sys.argv[3]).items():
    for qdq in (("fused",) if name == "fp32" else ("fused", "float")):
        with OrtRunner(path, threads=1, qdq=qdq, warn_inexact=False) as runner:
            runs[name + "/" + qdq] = predict(runner, images, 500).argmax.tolist()
print(json.dumps({{"isa": host_isa(), "labels": images.labels.tolist(), "runs": runs}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--limit", type=int, default=10000, help="test images (default all 10,000)")
    args = parser.parse_args()
    from tests.integration.shared_data import SHARED, import_model_file
    from vitdeploy.cpu_isa import SATURATING, host_isa
    from vitdeploy.pipeline import BuildConfig, build

    import torch

    if not SHARED.is_dir():
        print(f"no real assets at {SHARED}", file=sys.stderr)
        return 1
    prefix = [] if host_isa() in SATURATING else ["qemu-x86_64", "-cpu", "Haswell"]
    if prefix and shutil.which("qemu-x86_64") is None:
        print(f"this host is {host_isa()} and qemu-x86_64 is not installed (apt-get install qemu-user)", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="vitdeploy-avx2-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = SHARED / "cifar10" / "train_10k.npz"
    if not (work / "cpu" / "build.json").is_file():
        module = import_model_file(SHARED / "cifar10_vit" / "model.py", "cifar10_vit_model")
        torch.save(module.build(), work / "cifar10_vit.pt")
        build(BuildConfig(model=work / "cifar10_vit.pt", trust_pickle=True, mean=(0.5,), std=(0.5,), calib=calib,
                          out=work / "cpu"))
    from benchmarks.cpu_speed import ort_quantize_static

    files = {"fp32": work / "cpu" / "model.fp32.onnx", "vitdeploy cpu": work / "cpu" / "model.int8.onnx"}
    for reduce_range in (False, True):
        out = ort_quantize_static(work / "cpu", calib, work, rebuild=True, reduce_range=reduce_range, calib_size=512)
        files["ORT quantize_static" + (" reduce_range=True" if reduce_range else " (defaults)")] = out
    child = work / "child.py"
    child.write_text(_CHILD.format(root=str(ROOT), data=str(SHARED / "cifar10" / "test.npz")))
    command = prefix + [sys.executable, str(child), str(work), str(args.limit),
                        json.dumps({k: str(v) for k, v in files.items()})]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return 1
    out = json.loads(result.stdout.strip().splitlines()[-1])
    labels, runs = np.array(out["labels"]), {k: np.array(v) for k, v in out["runs"].items()}
    fp32 = runs["fp32/fused"]
    from vitdeploy.report import table

    rows = []
    for name in files:
        for qdq in ("fused", "float"):
            if f"{name}/{qdq}" not in runs:
                continue
            pred = runs[f"{name}/{qdq}"]
            how = "float (no Q/DQ)" if name == "fp32" else "fused integer kernels" if qdq == "fused" else "Q/DQ in float"
            rows.append([name, how, 100 * (pred == labels).mean(),
                         100 * (pred == fp32).mean()])
    print(table(["model", "computed with", "top-1 %", "agreement with FP32 %"], rows))
    emulated = "emulated (qemu-x86_64 -cpu Haswell)" if prefix else "native"
    print(f"\ncifar10_vit, {len(labels)} CIFAR-10 test images; ONNX Runtime on {out['isa']} ({emulated}), "
          f"1 thread; built on {host_isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
