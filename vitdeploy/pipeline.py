"""``vitdeploy build``: load → find layers → quantize + calibrate → export → verify → evaluate → write.

Every stage lives in its own module; this file only wires them together and writes the output
folder (atomically: a failed build leaves nothing behind).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .artifacts import ModelSpec, write_json
from .errors import ExportError, InputError
from .log import get_logger, progress
from .outputs import atomic_folder

log = get_logger(__name__)

# The QDQ graph in ONNX Runtime must compute what the PyTorch fake-quant model computes.
VERIFY_MIN_AGREEMENT = 99.0
VERIFY_MIN_COSINE = 0.999
SUPPORTED_TARGETS = ("cpu",)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    model: Path
    calib: Path = Path("calib")
    target: str = "cpu"
    out: Optional[Path] = None
    name: Optional[str] = None
    arch: Optional[str] = None
    model_kwargs: Optional[str] = None
    trust_pickle: bool = False
    input_size: Optional[Sequence[int]] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    calib_size: int = 512
    calib_method: str = "max"
    seed: int = 0
    eval_data: Optional[Path] = None
    batch_size: int = 64
    verify_images: int = 256
    opset: int = 17
    engines_dir: Path = Path("engines")

    def output_dir(self, spec: ModelSpec) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name or spec.name).strip("-.") or "model"
        return Path(self.engines_dir) / name


def build(cfg: BuildConfig) -> dict:
    """Run the whole pipeline; returns the build.json content (also written to the output folder)."""
    from .data import load_images
    from .export.onnx_export import DEFAULT_OPSET, export_fp32, save_model
    from .export.qdq import insert_qdq, layer_quant_from_module
    from .inventory import find_layers
    from .load import load_model
    from .quantize.apply import calibrate, quantize_model, quantized_layers
    from .versions import versions

    if cfg.target not in SUPPORTED_TARGETS:
        raise InputError(f"unknown target '{cfg.target}': this version builds {', '.join(SUPPORTED_TARGETS)}")
    if cfg.calib_size <= 0:
        raise InputError(f"--calib-size must be positive, got {cfg.calib_size}")
    started = time.time()
    model, spec = load_model(cfg.model, cfg.arch, cfg.model_kwargs, cfg.trust_pickle,
                             cfg.input_size, cfg.mean, cfg.std)
    if cfg.name:
        spec = dataclasses.replace(spec, name=cfg.name)
    calib_all = load_images(cfg.calib, spec, what="calibration data")
    calib = calib_all.sample(cfg.calib_size, cfg.seed)
    eval_images = load_images(cfg.eval_data, spec, require_labels=True, what="evaluation data") \
        if cfg.eval_data else None
    log.info("model %s: input %s, %d classes; calibrating on %d of %d images from %s",
             spec.name, "x".join(map(str, spec.input_size)), spec.num_classes, len(calib), len(calib_all), cfg.calib)

    layers = find_layers(model, spec)
    qmodel = quantize_model(model, [layer.name for layer in layers], cfg.calib_method)
    calib_seconds = _calibrate(qmodel, calib, cfg.batch_size, calibrate)

    out_dir = cfg.output_dir(spec)
    with atomic_folder(out_dir) as tmp:
        steps = iter(progress(range(3), "export", total=3, unit="step"))
        next(steps)
        fp32_proto = export_fp32(model, spec, tmp / "model.fp32.onnx", opset=max(cfg.opset, DEFAULT_OPSET))
        next(steps)
        int8_proto = insert_qdq(fp32_proto, {n: layer_quant_from_module(m) for n, m in quantized_layers(qmodel).items()})
        save_model(int8_proto, tmp / "model.int8.onnx")
        next(steps, None)
        verification = _verify(qmodel, model, spec, calib, tmp, cfg)
        accuracy = _evaluate(tmp, eval_images, cfg.batch_size) if eval_images is not None else None
        record = {
            "name": spec.name,
            "target": cfg.target,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": None,
            "inputs": {
                "model": str(cfg.model), "model_sha256": _sha256(cfg.model), "arch": cfg.arch,
                "model_kwargs": cfg.model_kwargs, "calibration": {
                    "source": str(cfg.calib), "images": len(calib), "available": len(calib_all),
                    "seed": cfg.seed, "method": cfg.calib_method, "seconds": round(calib_seconds, 3)},
                "eval_data": str(cfg.eval_data) if cfg.eval_data else None,
            },
            "preprocessing": spec.to_dict(),
            "versions": versions(),
            "files": {},
            "layers": [_layer_record(layer, qmodel, cfg) for layer in layers],
            "verification": verification,
            "accuracy": accuracy,
        }
        record["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.suffix == ".onnx"}
        record["build_seconds"] = round(time.time() - started, 2)
        write_json(tmp / "build.json", record)
        from .report import write_build_report

        write_build_report(tmp / "report.md", record)
    record["output"] = str(out_dir)
    return record


def _calibrate(qmodel, calib, batch_size: int, calibrate) -> float:
    import torch

    def forward_loop(m):
        with torch.no_grad():
            for x, _ in progress(calib.batches(batch_size), "calibrate", total=calib.num_batches(batch_size)):
                m(torch.from_numpy(x))

    start = time.perf_counter()
    calibrate(qmodel, forward_loop)
    return time.perf_counter() - start


def _verify(qmodel, model, spec: ModelSpec, calib, folder: Path, cfg: BuildConfig) -> dict:
    """ONNX Runtime vs PyTorch on real images, for both exported files; a mismatch fails the build."""
    from .backends.ort import OrtRunner
    from .backends.torch_runner import TorchRunner
    from .measure.evaluate import agreement, cosine_similarity, predict

    images = calib.subset(range(min(cfg.verify_images, len(calib))))
    result = {"images": len(images)}
    for tag, torch_model in (("fp32", model), ("int8", qmodel)):
        with TorchRunner(torch_model, spec.input_name, spec.output_name, spec.input_size) as ref, \
                OrtRunner(folder / f"model.{tag}.onnx") as ort:
            a = predict(ref, images, cfg.batch_size, desc=f"verify {tag}")
            b = predict(ort, images, cfg.batch_size, desc=f"verify {tag}")
        result[tag] = {"agreement": agreement(a, b), "cosine": cosine_similarity(a, b),
                       "max_abs_diff": float(np.abs(a.logits - b.logits).max())}
        if result[tag]["agreement"] < VERIFY_MIN_AGREEMENT or result[tag]["cosine"] < VERIFY_MIN_COSINE:
            raise ExportError(f"model.{tag}.onnx in ONNX Runtime does not reproduce PyTorch: agreement "
                              f"{result[tag]['agreement']:.2f} %, cosine {result[tag]['cosine']:.5f}")
    return result


def _evaluate(folder: Path, images, batch_size: int) -> dict:
    from .backends.ort import OrtRunner
    from .measure.evaluate import agreement, predict

    preds = {}
    for tag in ("fp32", "int8"):
        with OrtRunner(folder / f"model.{tag}.onnx") as runner:
            preds[tag] = predict(runner, images, max(batch_size, 128), desc=f"evaluate {tag}")
    return {"images": preds["fp32"].n, "fp32_top1": preds["fp32"].top1, "int8_top1": preds["int8"].top1,
            "agreement": agreement(preds["fp32"], preds["int8"])}


def _layer_record(layer, qmodel, cfg: BuildConfig) -> dict:
    module = dict(qmodel.named_modules())[layer.name]
    return {
        **layer.to_dict(), "precision": "int8",
        "weights": "int8 symmetric, per output channel (max |w|)",
        "activations": "int8 symmetric, per tensor",
        "input_amax": float(module.input_quantizer.amax),
        "scales_source": f"{cfg.calib_method} calibration",
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
