"""Our INT8 build beside ONNX Runtime's quantize_static and ModelOpt's ONNX PTQ: same FP32 ONNX,
same 512 calibration images.

    python benchmarks/compare_ort.py [--model imagenet_vit_tiny|cifar10_vit|mnist_vit] [--calib-method max]
                                     [--target jetson-orin] [--ort-methods minmax,entropy,percentile]
                                     [--modelopt-path DIR]   # a `pip install --target DIR nvidia-modelopt[onnx]`

Prints one row per method: top-1, agreement with FP32 (share of test images with the same
prediction), calibration seconds and the process's peak resident memory. Each method runs in
its own process so peak memory is its own (VmHWM). ORT: QDQ, per-channel weights, MinMax,
Entropy (2048 bins, ORT's own calibrator) and Percentile (ORT's default 99.999), on the FP32 ONNX
our build exported. ModelOpt (``python -m modelopt.onnx.quantization --quantize_mode int8``, CPU
calibration), when importable from the current environment or ``--modelopt-path``: its defaults,
and with LayerNormalization and Add excluded. Every INT8 file is scored with Q/DQ evaluated in
float, what TensorRT computes (not this host's integer kernels).

imagenet_vit_tiny: our build calibrates on 512 of the 1,000 ``imagenet_samples`` (seed 0) and
everything is scored on the other 488 (benchmarks/real_vit.py's held-out set).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
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


#: quantize_static's defaults quantize every op type it knows (LayerNormalization, the residual Add,
#: Softmax, ...); the second variant is what a careful user tries next: the matrix products only.
ORT_VARIANTS = {"defaults": None, "MatMul, Gemm, Conv only": ["MatMul", "Gemm", "Conv"]}


def _ort_quantize(fp32_path, calib_npy, out_path, method, op_types, queue):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    images = np.load(calib_npy)

    class Reader(CalibrationDataReader):
        def __init__(self, array=images):
            self.batches = iter([{"input": array[i:i + 1]} for i in range(len(array))])

        def get_next(self):
            return next(self.batches, None)

    start = time.perf_counter()
    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                  weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    if method == "minmax":
        quantize_static(str(fp32_path), str(out_path), Reader(), calibrate_method=CalibrationMethod.MinMax, **common)
    else:
        # ORT's histogram calibrators keep every intermediate tensor of every image until the reader is
        # exhausted: 512 ViT-Tiny images were killed for memory at 23.5 GB on this 24 GiB machine. Feeding
        # them 32 images per collect_data call gives the same histograms (merged across calls) in little
        # memory. quantize_static would also pass no bin count (at 128 bins entropy has one candidate, the
        # full range), so the ranges come from ORT's own calibrator with 2048 bins (percentile: its
        # default 99.999) and are handed to quantize_static as a calibration cache.
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        calibration = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
        options = {"num_bins": 2048, **({"num_quantized_bins": 128} if method == "entropy" else {"percentile": 99.999})}
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(Path(fp32_path), op_types, augmented_model_path=f"{tmp}/augmented.onnx",
                                           calibrate_method=calibration, extra_options=options)
            for first in range(0, len(images), 32):
                calibrator.collect_data(Reader(images[first:first + 32]))
            save_tensors_data(calibrator.compute_data(), f"{tmp}/ranges.json")
            quantize_static(str(fp32_path), str(out_path), None, calibrate_method=calibration,
                            calibration_cache_path=f"{tmp}/ranges.json", **common)
    queue.put({"seconds": time.perf_counter() - start, "peak_mb": _peak_mb()})


MODELOPT_VARIANTS = {"defaults": [], "LayerNormalization, Add excluded": ["--op_types_to_exclude", "LayerNormalization", "Add"]}


def _modelopt(fp32_path: Path, calib_npy: Path, out_path: Path, method: str, extra, pythonpath: str):
    """ModelOpt's ONNX PTQ in a child process (it brings its own onnx/onnxruntime builds): (seconds, peak MB) or
    None where it does not import."""
    import os
    import subprocess

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = subprocess.run([sys.executable, "-c", "import modelopt.onnx.quantization"], env=env, capture_output=True)
    if probe.returncode != 0:
        return None
    cmd = [sys.executable, "-c", "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
           "exec('try:\\n runpy.run_module(\"modelopt.onnx.quantization\", run_name=\"__main__\")\\n"
           "finally:\\n print(\"peak_mb\", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)')",
           "modelopt", "--onnx_path", str(fp32_path), "--quantize_mode", "int8", "--calibration_method", method,
           "--calibration_data_path", str(calib_npy), "--calibration_eps", "cpu", "--output_path", str(out_path), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out_path.is_file():
        print(done.stderr[-2000:], file=sys.stderr)
        raise RuntimeError(f"ModelOpt failed ({method}, {extra})")
    peak = [float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_mb ")]
    return time.perf_counter() - start, (peak[-1] if peak else float("nan"))


def _run(target, *args):
    """``target(*args, queue)`` in its own process: its result, or {"failed": why} when the process died."""
    import queue as queues

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    proc.start()
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queues.Empty:
            if not proc.is_alive():
                code = proc.exitcode
                return {"failed": "killed (out of memory?)" if code == -9 else f"exit code {code}"}
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
    parser.add_argument("--model", default="imagenet_vit_tiny", choices=["imagenet_vit_tiny", "cifar10_vit", "mnist_vit"])
    parser.add_argument("--calib-method", default="max")
    parser.add_argument("--target", default="jetson-orin", help="our build's target (a TensorRT one writes calib.npy)")
    parser.add_argument("--extra", default="", help="more options for our build, e.g. '--shift'")
    parser.add_argument("--ort-methods", default="minmax,entropy,percentile")
    parser.add_argument("--modelopt-methods", default="entropy,max")
    parser.add_argument("--modelopt-path", default="", help="PYTHONPATH holding nvidia-modelopt[onnx] (default: this environment)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--reuse-build", action="store_true", help="keep --work's previous build (ours/)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vitdeploy-ort-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "imagenet_vit_tiny":
        from benchmarks.real_vit import held_out

        weights = SHARED / "imagenet_vit_tiny" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
        cfg = dict(model=weights, arch="vit_tiny_patch16_224", calib=SHARED / "imagenet_samples",
                   eval_data=held_out(work, weights, SHARED / "imagenet_samples"))
    elif args.model == "cifar10_vit":
        import torch

        torch.save(import_model_file(SHARED / "cifar10_vit" / "model.py", "m").build(), work / "m.pt")
        cfg = dict(model=work / "m.pt", trust_pickle=True, mean=(0.5,), std=(0.5,), calib=SHARED / "cifar10" / "train_10k.npz",
                   eval_data=SHARED / "cifar10" / "test.npz")
    else:
        paths = mnist_npz(work)
        cfg = dict(model=SHARED / "mnist_vit" / "vit_mnist.pt", arch=f"{SHARED / 'mnist_vit' / 'model.py'}:ViT",
                   input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), calib=paths["calib"], eval_data=paths["eval"])
    # The bundle of a TensorRT target carries calib.npy: the exact 512 preprocessed images we calibrated on.
    for flag in shlex.split(args.extra):   # --shift / --no-rescale / ... -> BuildConfig's switches
        name = flag.lstrip("-").replace("-", "_")
        on = not name.startswith("no_")
        cfg[name[3:] if not on else name] = on
    cfg.update(calib_method=args.calib_method, target=args.target, out=work / "ours")
    folder = work / "ours"
    if args.reuse_build and (folder / "build.json").is_file():   # peers only, on the FP32 ONNX of a previous run
        ours = {"record": json.loads((folder / "build.json").read_text()), "peak_mb": float("nan")}
    else:
        ours = _run(_build, cfg)
        if "failed" in ours:
            raise SystemExit(f"our build failed: {ours['failed']}")
    record = ours["record"]
    spec = ModelSpec.from_dict(record["preprocessing"])
    test = load_images(cfg["eval_data"], spec, require_labels=True)
    with OrtRunner(folder / "model.fp32.onnx") as r:
        fp32 = predict(r, test, 256)

    def score(path: Path):
        with OrtRunner(path, qdq="float") as r:   # the ONNX semantics, what TensorRT computes
            return predict(r, test, 64)

    mine = score(folder / "model.int8.onnx")
    rows = [["FP32", fp32.top1, 100.0, "—", "—"],
            [f"vitdeploy {args.target} ({args.calib_method}{', ' + args.extra if args.extra else ''}; "
             f"FP16: {', '.join(record['plan']['fp16_measured']) or 'role defaults'})", mine.top1,
             agreement(fp32, mine), record["inputs"]["calibration"]["seconds"], ours["peak_mb"]]]
    calib_npy, fp32_onnx = folder / "calib.npy", folder / "model.fp32.onnx"
    for method in [m for m in args.ort_methods.split(",") if m]:
        for variant, op_types in ORT_VARIANTS.items():
            out = work / f"ort_{method}_{len(op_types or [])}.onnx"
            res = _run(_ort_quantize, fp32_onnx, calib_npy, out, method, op_types)
            if "failed" in res:
                rows.append([f"ORT quantize_static ({method}, {variant}): {res['failed']}", "—", "—", "—", "—"])
                continue
            theirs = score(out)
            rows.append([f"ORT quantize_static ({method}, {variant})", theirs.top1, agreement(fp32, theirs),
                         res["seconds"], res["peak_mb"]])
            print(json.dumps({"method": method, "variant": variant, "top1": theirs.top1}), file=sys.stderr)
    import importlib.metadata as md
    for method in [m for m in args.modelopt_methods.split(",") if m]:
        for variant, extra in MODELOPT_VARIANTS.items():
            out = work / f"modelopt_{method}_{len(extra)}.onnx"
            res = _modelopt(fp32_onnx, calib_npy, out, method, extra, args.modelopt_path)
            if res is None:
                print("ModelOpt: not importable here (pip install 'nvidia-modelopt[onnx]', or --modelopt-path)")
                break
            theirs = score(out)
            rows.append([f"ModelOpt ONNX PTQ int8 ({method}, {variant})", theirs.top1, agreement(fp32, theirs), *res])
            print(json.dumps({"modelopt": method, "variant": variant, "top1": theirs.top1}), file=sys.stderr)
        else:
            continue
        break
    print(f"{args.model}: {len(np.load(calib_npy, mmap_mode='r'))} calibration images, {test.labels.size} test images; "
          f"every INT8 file with Q/DQ evaluated in float (ONNX Runtime {md.version('onnxruntime')})")
    print(table(["method", "top-1 %", "agreement with FP32 %", "calibration (s)", "peak memory (MB)"], rows))
    print("peak memory: whole process (vitdeploy: the full build incl. export and verification; ORT: quantize_static; "
          "ModelOpt: its quantization process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
