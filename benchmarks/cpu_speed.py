"""CPU speed acceptance: a `cpu` build of timm vit_base_patch16_224 (random weights) in ONNX Runtime.

    python benchmarks/cpu_speed.py [--work DIR] [--runs 60] [--threads 2] [--rebuild]

1. writes a random-weight vit_base_patch16_224 state_dict and 32 random-pixel 224×224 calibration
   images (uint8 .npz);
2. builds it for the `cpu` target with vitdeploy's pipeline (FP32 + INT8 QDQ ONNX); when the
   pipeline does not apply the ONNX Runtime placement itself yet, applies
   `vitdeploy.export.ort_placement.place_for_onnxruntime` to model.int8.onnx (the TensorRT-style
   file is kept beside the build as qdq_tensorrt_style.onnx) and checks the two agree;
3. quantizes the same FP32 ONNX with ONNX Runtime's own ``quantize_static`` (QDQ, per-channel,
   default U8 activations / S8 weights, same 32 images through a CalibrationDataReader), once with
   its defaults (8-bit weights: not exact on x86 AVX2 / AVX-512 without VNNI) and once with
   ``reduce_range=True`` (7-bit weights: its only setting that is exact there);
4. prints, per INT8 file, the CPU kernel families it is exact on (`vitdeploy.cpu_isa.exact_on`)
   and whether this host's kernels compute it exactly (`vitdeploy.measure.kernel_check`);
5. benchmarks the four models in the same run with `vitdeploy.measure.bench.run_bench`: one fresh
   process per model, warm-up, then interleaved blocks of runs, batch 1, 2 intra-op threads.

Speed depends on the host's kernel family, printed first and last. The last line is
``host=<family> speedup_vs_fp32=<x> speedup_vs_ort_quantize_static=<y> speedup_vs_ort_reduce_range=<z>``
(ratios of median latencies).

Random weights make 1000 near-tied logits, so one argmax flip among the 32 verification images
already fails the build's 99 % agreement check against PyTorch; this script lowers the build's
verification thresholds (and prints what verification measured): it judges speed, not accuracy.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH = "vit_base_patch16_224"
CALIB_IMAGES = 32
TARGET_SPEEDUP = 1.8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_inputs(work: Path) -> tuple:
    import timm
    import torch

    weights, calib = work / "vit_base_random.pt", work / "calib_random_224.npz"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(timm.create_model(ARCH, pretrained=False).eval().state_dict(), weights)
    if not calib.is_file():
        rng = np.random.default_rng(0)
        np.savez(calib, x=rng.integers(0, 256, size=(CALIB_IMAGES, 224, 224, 3), dtype=np.uint8))
    return weights, calib


def build_cpu(work: Path, weights: Path, calib: Path, rebuild: bool) -> Path:
    from vitdeploy import pipeline

    out = work / "build"
    if (out / "model.int8.onnx").is_file() and (out / "model.fp32.onnx").is_file() and not rebuild:
        log(f"reusing {out}")
        return out
    start = time.time()
    record = pipeline.build(pipeline.BuildConfig(model=weights, arch=ARCH, calib=calib, calib_size=CALIB_IMAGES,
                                                 verify_images=CALIB_IMAGES, target="cpu", out=out,
                                                 # random weights: near-tied logits, see the module docstring
                                                 verify_min_agreement=0.0, verify_min_cosine=0.0))
    v = record["verification"]["int8"]
    log(f"built {out} in {time.time() - start:.0f} s; INT8 ONNX Runtime vs PyTorch fake-quant on {CALIB_IMAGES} "
        f"images: agreement {v['agreement']:.2f} %, cosine {v['cosine']:.5f}")
    return out


def place(build: Path, work: Path) -> dict:
    """model.int8.onnx in ONNX Runtime's placement (unless the pipeline already did it); agreement check."""
    import onnx

    from vitdeploy.export.ort_placement import PlacementStats, place_for_onnxruntime

    path = build / "model.int8.onnx"
    model = onnx.load(str(path))
    trt_style = work / "qdq_tensorrt_style.onnx"
    if {p.key: p.value for p in model.metadata_props}.get("vitdeploy.placement") == "onnxruntime":
        by = "an earlier run of this script" if trt_style.is_file() else "the pipeline"
        log(f"model.int8.onnx already has ONNX Runtime's placement (applied by {by})")
        return {"placed_by": by}
    stats = PlacementStats()
    placed = place_for_onnxruntime(model, stats)
    onnx.save(model, str(trt_style))
    onnx.save(placed, str(path))
    check = _agreement(trt_style, path)
    log(f"placement for ONNX Runtime: {stats.as_dict()}; agreement with the TensorRT-style QDQ model on "
        f"16 random inputs: argmax {check['agreement']:.1f} %, min cosine {check['cosine']:.6f}, "
        f"max |Δ| {check['max_abs_diff']:.3g}")
    return {"placed_by": "benchmark", "stats": stats.as_dict(), "check": check}


def _agreement(a: Path, b: Path) -> dict:
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((16, 3, 224, 224)).astype(np.float32)
    outs = []
    for path in (a, b):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outs.append(np.concatenate([session.run(None, {"input": x[i:i + 4]})[0] for i in range(0, 16, 4)]))
    ya, yb = outs
    cos = (ya * yb).sum(1) / (np.linalg.norm(ya, axis=1) * np.linalg.norm(yb, axis=1) + 1e-12)
    return {"agreement": float((ya.argmax(1) == yb.argmax(1)).mean() * 100), "cosine": float(cos.min()),
            "max_abs_diff": float(np.abs(ya - yb).max())}


def ort_quantize_static(build: Path, calib: Path, work: Path, rebuild: bool, reduce_range: bool = False,
                        calib_size: Optional[int] = None) -> Path:
    """quantize_static on the build's FP32 ONNX; ``calib_size`` images drawn as the build draws them."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitdeploy.artifacts import ModelSpec, read_json
    from vitdeploy.data import load_images

    out = work / ("ort_quantize_static_reduce_range.int8.onnx" if reduce_range else "ort_quantize_static.int8.onnx")
    if out.is_file() and not rebuild:
        log(f"reusing {out}")
        return out
    spec = ModelSpec.from_dict(read_json(build / "build.json")["preprocessing"])
    batches = [x for x, _ in load_images(calib, spec).sample(calib_size).batches(1)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {spec.input_name: x}

    import logging

    start = time.time()
    pre = work / "fp32_preprocessed.onnx"
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR    # quantize_static warns once per LayerNorm weight
    try:
        quant_pre_process(str(build / "model.fp32.onnx"), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range)
    finally:
        root.setLevel(level)
    log(f"ONNX Runtime quantize_static (QDQ, per-channel, U8 activations / S8 weights, reduce_range={reduce_range}, "
        f"{len(batches)} images) in {time.time() - start:.0f} s: {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one); reused if present")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per model (default 60)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=3, help="runs per model per turn of the interleaving (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if --work holds a build")
    args = parser.parse_args()

    import logging

    logging.getLogger("vitdeploy").setLevel(logging.WARNING)
    from vitdeploy.log import configure
    from vitdeploy.measure.bench import markdown_table, run_bench

    configure(progress=False)
    work = args.work or Path(tempfile.mkdtemp(prefix="vitdeploy-cpu-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    weights, calib = make_inputs(work)
    build = build_cpu(work, weights, calib, args.rebuild)
    place(build, work)
    ort_model = ort_quantize_static(build, calib, work, args.rebuild)
    ort_reduced = ort_quantize_static(build, calib, work, args.rebuild, reduce_range=True)

    from vitdeploy.cpu_isa import exact_on, host_isa
    from vitdeploy.measure.kernel_check import check_integer_kernels
    import onnx

    ours, fp32 = build / "model.int8.onnx", build / "model.fp32.onnx"
    host = host_isa()
    print(f"host CPU kernel family: {host}")
    for path in (ours, ort_model, ort_reduced):
        model = onnx.load(str(path))
        check = check_integer_kernels(model)
        print(f"{path.name}: exact on {', '.join(exact_on(model))}; this host ({host}): "
              f"{'exact' if check.exact else f'NOT exact ({len(check.failed)} of {check.layers} layers)'}, "
              f"largest layer error {check.max_rel_error:.1e}")
    log(f"benchmarking (batch 1, {args.threads} threads, {args.runs} runs each, interleaved) ...")
    result = run_bench([fp32, ours, ort_model, ort_reduced], batches=[1], threads=args.threads, runs=args.runs,
                       warmup=args.warmup, block=args.block, png=work / "cpu_speed.png")
    rows = {Path(r["artifact"]): r for r in result["rows"]}
    for path in (fp32, ours, ort_model, ort_reduced):
        if path not in rows:
            log(f"no measurement for {path}: {result['skipped']}")
            return 1
    # speed-up of the ONNX Runtime quantize_static model is also relative to FP32 in the table
    print(markdown_table(result["rows"]))
    print(f"\n{result['device']}; {args.runs} timed runs per model after {args.warmup} warm-up runs, "
          f"interleaved in blocks of {args.block}; chart {result['png']}")
    median = {path: rows[path]["latency_ms"]["median"] for path in rows}
    vs_fp32 = median[fp32] / median[ours]
    vs_ort = median[ort_model] / median[ours]
    vs_reduced = median[ort_reduced] / median[ours]
    ok = vs_fp32 >= TARGET_SPEEDUP and vs_reduced >= 1.0
    print(f"acceptance on {host} (INT8 >= {TARGET_SPEEDUP}x FP32 and no slower than quantize_static with "
          f"reduce_range=True, the only ORT setting exact on every CPU): {'PASS' if ok else 'FAIL'}")
    print(f"host={host} speedup_vs_fp32={vs_fp32:.2f} speedup_vs_ort_quantize_static={vs_ort:.2f} "
          f"speedup_vs_ort_reduce_range={vs_reduced:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
