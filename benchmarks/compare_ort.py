"""Our INT8 build beside ONNX Runtime's quantize_static, same model, same 512 calibration images.

    python benchmarks/compare_ort.py [--model cifar10_vit|mnist_vit] [--calib-method max]

Prints one row per method: top-1, agreement with FP32 (share of test images with the same
prediction), calibration seconds and the process's peak resident memory. Each method runs in
its own process so peak memory is its own (VmHWM). ORT: QDQ, per-channel weights, MinMax and
Entropy (2048 bins, ORT's own calibrator), on the FP32 ONNX our build exported.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    """This process's own peak RSS (ru_maxrss would carry the spawning parent's peak over)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024.0


def _build(cfg_kwargs, queue):
    from vitdeploy.log import configure
    from vitdeploy.pipeline import BuildConfig, build

    configure(progress=False)
    record = build(BuildConfig(**cfg_kwargs))
    queue.put({"record": record, "peak_mb": _peak_mb()})


def _ort_quantize(fp32_path, calib_npy, out_path, method, queue):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    images = np.load(calib_npy)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    start = time.perf_counter()
    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                  weight_type=QuantType.QInt8)
    if method == "minmax":
        quantize_static(str(fp32_path), str(out_path), Reader(), calibrate_method=CalibrationMethod.MinMax, **common)
    else:
        # quantize_static passes no bin count to its calibrator, and at the default 128 bins (with 128
        # quantized bins) the entropy search has one candidate: the full range, i.e. minmax. So run
        # ORT's own entropy calibrator with 2048 bins and hand quantize_static its ranges.
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(Path(fp32_path), None, augmented_model_path=f"{tmp}/augmented.onnx",
                                           calibrate_method=CalibrationMethod.Entropy,
                                           extra_options={"num_bins": 2048, "num_quantized_bins": 128})
            calibrator.collect_data(Reader())
            save_tensors_data(calibrator.compute_data(), f"{tmp}/ranges.json")
            quantize_static(str(fp32_path), str(out_path), None, calibrate_method=CalibrationMethod.Entropy,
                            calibration_cache_path=f"{tmp}/ranges.json", **common)
    queue.put({"seconds": time.perf_counter() - start, "peak_mb": _peak_mb()})


def _run(target, *args):
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> int:
    from tests.integration.shared_data import SHARED, import_model_file, mnist_npz
    from vitdeploy.artifacts import ModelSpec
    from vitdeploy.backends.ort import OrtRunner
    from vitdeploy.data import load_images
    from vitdeploy.measure.evaluate import agreement, predict
    from vitdeploy.report import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_vit", choices=["cifar10_vit", "mnist_vit"])
    parser.add_argument("--calib-method", default="max")
    parser.add_argument("--ort-methods", default="minmax,entropy")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vitdeploy-ort-"))
    if args.model == "cifar10_vit":
        import torch

        torch.save(import_model_file(SHARED / "cifar10_vit" / "model.py", "m").build(), work / "m.pt")
        cfg = dict(model=work / "m.pt", trust_pickle=True, mean=(0.5,), std=(0.5,), calib=SHARED / "cifar10" / "train_10k.npz",
                   eval_data=SHARED / "cifar10" / "test.npz")
    else:
        paths = mnist_npz(work)
        cfg = dict(model=SHARED / "mnist_vit" / "vit_mnist.pt", arch=f"{SHARED / 'mnist_vit' / 'model.py'}:ViT",
                   input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), calib=paths["calib"], eval_data=paths["eval"])
    # The bundle of a TensorRT target carries calib.npy: the exact 512 preprocessed images we calibrated on.
    cfg.update(calib_method=args.calib_method, target="jetson-orin", out=work / "ours")
    ours = _run(_build, cfg)
    record, folder = ours["record"], work / "ours"
    spec = ModelSpec.from_dict(record["preprocessing"])
    test = load_images(cfg["eval_data"], spec, require_labels=True)
    with OrtRunner(folder / "model.fp32.onnx") as r:
        fp32 = predict(r, test, 256)
    with OrtRunner(folder / "model.int8.onnx") as r:
        mine = predict(r, test, 256)
    rows = [["FP32", fp32.top1, 100.0, "—", "—"],
            [f"vitdeploy ({args.calib_method}, plan: {record['plan']['source']})", mine.top1, agreement(fp32, mine),
             record["inputs"]["calibration"]["seconds"], ours["peak_mb"]]]
    for method in args.ort_methods.split(","):
        out = work / f"ort_{method}.onnx"
        res = _run(_ort_quantize, folder / "model.fp32.onnx", folder / "calib.npy", out, method)
        with OrtRunner(out) as r:
            theirs = predict(r, test, 256)
        rows.append([f"ORT quantize_static ({method})", theirs.top1, agreement(fp32, theirs), res["seconds"], res["peak_mb"]])
        print(json.dumps({"method": method, "top1": theirs.top1, "seconds": res["seconds"]}), file=sys.stderr)
    print(f"{args.model}: {len(calib := np.load(folder / 'calib.npy'))} calibration images, {test.labels.size} test images")
    print(table(["method", "top-1 %", "agreement with FP32 %", "calibration (s)", "peak memory (MB)"], rows))
    print("peak memory: whole process (vitdeploy: the full build incl. export and verification; ORT: quantize_static)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
