"""``vitdeploy build``: load → find layers → quantize + calibrate → export → verify → evaluate → write.

Every stage lives in its own module; this file only wires them together and writes the output
folder (atomically: a failed build leaves nothing behind).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .artifacts import ModelSpec, write_json
from .errors import ExportError, InputError, stage
from .log import get_logger, progress
from .outputs import OutputFolder, folder_name

log = get_logger(__name__)

# The QDQ graph in ONNX Runtime must compute what the PyTorch fake-quant model computes.
VERIFY_MIN_AGREEMENT = 99.0
VERIFY_MIN_COSINE = 0.999


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
    # Accuracy techniques (vitdeploy/quantize/techniques.py); None = the technique's default.
    shift: Optional[bool] = None
    rescale: Optional[bool] = None
    bias_correction: Optional[bool] = None
    plan: Optional[Path] = None
    seed: int = 0
    # The default plan (no --plan) from measurement: measured_plan.py. 0 images = role defaults only.
    sensitivity_images: int = 64
    int8_budget: float = 90.0
    max_drop: Optional[float] = None    # accuracy budget in top-1 points (accuracy_budget.py)
    recover: Optional[object] = None    # recover.RecoverySettings: block reconstruction after calibration
    # `vitdeploy qat`: qat.QatSettings, training on all of --calib's images (calibration on a sample of them)
    qat: Optional[object] = None
    checkpoint_dir: Optional[Path] = None   # default: <output folder>.qat-checkpoint beside the output
    resume: bool = False
    use_labels: bool = True                 # qat: cross-entropy where the images have labels
    eval_data: Optional[Path] = None
    batch_size: int = 64
    verify_images: int = 256
    # ONNX Runtime must reproduce PyTorch this closely or the build fails. Lower them only for
    # models whose logits are near ties everywhere (random weights, as in benchmarks/cpu_speed.py).
    verify_min_agreement: float = VERIFY_MIN_AGREEMENT
    verify_min_cosine: float = VERIFY_MIN_COSINE
    opset: int = 17
    engines_dir: Path = Path("engines")
    # TensorRT engine options (used on a machine with TensorRT and a GPU; written into the bundle otherwise)
    workspace_mib: Optional[int] = None
    dla_core: Optional[int] = None
    trt_calibrator: Optional[str] = None   # "entropy": implicit INT8 (TensorRT ≤ 10, deprecated since 10.1)
    max_batch: int = 8

    def output_dir(self) -> Path:
        """``--out``, else ``engines/<name>`` (the checkpoint's file name unless ``--name``)."""
        if self.out is not None:
            return Path(self.out)
        return Path(self.engines_dir) / folder_name(self.name or Path(self.model).stem)

    def qat_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        out = self.output_dir()
        return out.parent / f"{out.name}.qat-checkpoint"

    def input_paths(self) -> list:
        """Every file or folder the build reads: none of them may lie inside the output folder."""
        from .load import arch_file

        return [p for p in (self.model, self.calib, self.plan, self.eval_data, arch_file(self.arch)) if p is not None]


def build(cfg: BuildConfig) -> dict:
    """Run the whole pipeline; returns the build.json content (also written to the output folder).

    Everything that can be checked without the model (arguments, the output folder, the plan file)
    is checked first, then each stage runs under its name (`errors.stage`), which a failure's
    one-line message carries.
    """
    from .plan import QUANTIZED, int8_mac_share, read_plan, role_defaults
    from .targets import get_target

    target = get_target(cfg.target)
    if cfg.calib_size <= 0:
        raise InputError(f"--calib-size must be positive, got {cfg.calib_size}")
    if cfg.max_drop is not None and not 0 <= cfg.max_drop <= 100:
        raise InputError(f"--max-drop is in top-1 points, 0 to 100; got {cfg.max_drop:g}")
    if cfg.dla_core is not None and not target.dla:
        raise InputError(f"--dla: {target.name} has no DLA (Jetson Xavier and Orin do)")
    if cfg.trt_calibrator and not target.is_tensorrt:
        raise InputError(f"--trt-calibrator is a TensorRT option; target {target.name} uses ONNX Runtime")
    if cfg.qat is not None:
        target, cfg = _qat_target(target, cfg)
    with stage("write"):
        output = OutputFolder(cfg.output_dir(), cfg.input_paths()).check()
    with stage("load"):
        plan = read_plan(cfg.plan) if cfg.plan else None
    if target.warning:
        log.warning("%s: %s", target.name, target.warning)
    started = time.time()
    from .data import load_images  # torch, onnx and timm load only now: refusals above come at once
    from .export.onnx_export import DEFAULT_OPSET, export_fp32, fixed_batch
    from .inventory import find_layers
    from .load import load_model
    from .versions import versions

    with stage("load"):
        model, spec = load_model(cfg.model, cfg.arch, cfg.model_kwargs, cfg.trust_pickle,
                                 cfg.input_size, cfg.mean, cfg.std)
        if cfg.name:
            spec = dataclasses.replace(spec, name=cfg.name)
        calib_all = load_images(cfg.calib, spec, what="calibration data")
        calib = calib_all.sample(cfg.calib_size, cfg.seed)
        warn_fewer_images(cfg.calib_size, len(calib_all), cfg.calib)
        eval_images = load_images(cfg.eval_data, spec, require_labels=True, what="evaluation data") \
            if cfg.eval_data else None
        layers = find_layers(model, spec)
    if plan is None and cfg.qat is not None:  # training recovers what calibration loses: everything quantized
        from .plan import PrecisionPlan

        plan = PrecisionPlan(default="int8", meta={"source": "qat default: every layer INT8, attention matmuls included"})
    if plan is None:
        plan = role_defaults(layers, include_attention=False)
        if cfg.sensitivity_images > 0 and target.int8:
            from .measured_plan import measured_plan

            with stage("analyse"):
                started_analysis = time.perf_counter()
                plan = measured_plan(model, layers, plan, calib.subset(range(min(cfg.sensitivity_images, len(calib)))),
                                     cfg.calib_method, cfg.int8_budget, cfg.batch_size)
                plan.meta["seconds"] = round(time.perf_counter() - started_analysis, 1)
    with stage("load"):
        precision = plan.resolve(layer.name for layer in layers)
    if not target.int8:  # TX2: no INT8 on sm_62, everything runs in FP16
        precision = {name: "fp16" if p in QUANTIZED else p for name, p in precision.items()}
    max_drop, calibrated = None, None
    if cfg.max_drop is not None and target.int8 and any(p in QUANTIZED for p in precision.values()):
        precision, max_drop, calibrated = _meet_max_drop(model, layers, precision, plan, calib, target, cfg)
    quantized = [n for n, p in precision.items() if p in QUANTIZED]
    with stage("calibrate"):
        log.info("model %s: input %s, %d classes; calibrating on %d of %d images from %s",
                 spec.name, "x".join(map(str, spec.input_size)), spec.num_classes, len(calib), len(calib_all),
                 cfg.calib)
        if calibrated is None:
            calibrated = _quantize(model, precision, target, calib, cfg) if quantized else (None, model, None, 0.0)
        qmodel, prepared, techniques, calib_seconds = calibrated
    recovery = None
    if cfg.recover is not None and qmodel is not None:
        if getattr(cfg.recover, "epochs", 0) and calib.labels is None:
            raise InputError("--recover-epochs trains with cross-entropy: the calibration images need labels "
                             "(class folders, or an .npz with y)")
        with stage("recover"):
            recovery = _recover(prepared, qmodel, layers, quantized, calib, eval_images, cfg)
    qat = None
    if cfg.qat is not None and qmodel is not None:
        with stage("qat"):
            qat = _train_qat(prepared, qmodel, calib_all, cfg)
        if qat["rank"] != 0:   # torchrun: rank 0 exports and writes; the others are done
            return {"rank": qat["rank"], "qat": qat}

    out_dir = output.final
    with stage("write"), output.write() as tmp:
        with stage("export"):
            fp32_proto = export_fp32(model, spec, tmp / "model.fp32.onnx", opset=max(cfg.opset, DEFAULT_OPSET))
            batch = fixed_batch(fp32_proto)
            if batch is not None:  # the model would not export batch-dynamic (export_fp32 said so)
                cfg = dataclasses.replace(cfg, max_batch=batch)
            amax = (_export_int8(qmodel, spec, fp32_proto, max(cfg.opset, DEFAULT_OPSET), target, tmp)
                    if qmodel is not None else None)
            violations = _lint(tmp, target)
        with stage("verify"):
            verification = _verify(qmodel, model, spec, calib, tmp, cfg, target)
            accuracy = _evaluate(tmp, eval_images, cfg.batch_size, target) if eval_images is not None else None
        record = {
            "name": spec.name,
            "target": target.name,
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
            "export": {"batch": "dynamic" if batch is None else batch, "opset": _opset(fp32_proto)},
            "versions": versions(),
            "files": {},
            "plan": {"source": str(cfg.plan) if cfg.plan else plan.meta.get("source"),
                     "fp16_measured": plan.meta.get("fp16_measured", []),
                     "measurement_seconds": plan.meta.get("seconds"),
                     "max_drop": max_drop,
                     "int8_linear_mac_share": int8_mac_share(layers, precision),
                     "int8_mac_share": int8_mac_share(layers, precision, kinds=("linear", "conv", "matmul"))},
            "techniques": techniques,
            "recovery": recovery,
            "qat": qat,
            "layers": [_layer_record(layer, precision[layer.name], qmodel, cfg) for layer in layers],
            "lint": [str(v) for v in violations],
            "verification": verification,
            "accuracy": accuracy,
            "cpu": _cpu_record(tmp, verification),
        }
        _write_outputs(tmp, record, precision, target, calib, amax, cfg.max_batch, plan.meta)
        record["build_seconds"] = round(time.time() - started, 2)
        _write_records(tmp, record)
    record["output"] = str(out_dir)
    if qat is not None:
        import shutil

        shutil.rmtree(cfg.qat_checkpoint_dir(), ignore_errors=True)  # the build is written: nothing to resume
    if target.is_tensorrt:
        with stage("engine"):
            record["engine"] = _engine_or_bundle(out_dir, target, spec, cfg)
    return record


def warn_fewer_images(asked: int, available: int, source) -> None:
    """One line when --calib-size asks for more images than there are (all of them are used)."""
    if asked > available:
        log.warning("--calib-size %d, but %s holds %d images: calibrating on all %d", asked, source, available,
                    available)


def _export_int8(qmodel, spec, fp32_proto, opset: int, target, folder: Path) -> dict:
    """model.int8.onnx for the target (FP16 strongly typed for desktop) and its activation ranges: the
    fake-quant model's own export (its quantizers are the Q/DQ), exported like model.fp32.onnx."""
    from .bundle import calib_amax_from_qdq
    from .export.onnx_export import save_model
    from .export.qdq import export_int8

    proto = export_int8(qmodel, spec, fp32_proto, opset)
    amax = calib_amax_from_qdq(proto)  # named after the TensorRT-style graph's tensors, before any rewrite
    if target.qdq_placement == "onnxruntime":  # cpu: the placement ONNX Runtime's kernels run fastest
        from .export.ort_placement import place_for_onnxruntime

        proto = place_for_onnxruntime(proto)
    if target.strongly_typed:
        from .export.fp16 import to_fp16

        proto = to_fp16(proto)  # TensorRT strongly typed networks take precisions from the ONNX types
    _set_cpu_exactness(proto)
    save_model(proto, folder / "model.int8.onnx")
    return amax


def _set_cpu_exactness(proto) -> None:
    """Metadata: the CPU kernel families whose ONNX Runtime computes this file exactly (eval/bench read it)."""
    from .cpu_isa import METADATA_KEY, exact_on
    from .export.ort_placement import set_metadata

    set_metadata(proto, METADATA_KEY, ",".join(exact_on(proto)))


def _lint(folder: Path, target) -> list:
    """The TensorRT contract (or ONNX Runtime's, for cpu) on what this build wrote; errors fail it."""
    from .errors import BuildError
    from .lint import lint_errors, lint_model

    name = "model.int8.onnx" if (folder / "model.int8.onnx").exists() else "model.fp32.onnx"
    violations = lint_model(folder / name, target)
    errors = lint_errors(violations)
    if errors:
        raise BuildError(f"{name} breaks the {target.name} contract: {errors[0]} "
                         f"({len(errors)} error(s); see vitdeploy lint)")
    for v in violations:
        log.warning("lint: %s", v)
    return violations


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _write_outputs(folder: Path, record: dict, precision: dict, target, calib, amax, max_batch: int,
                   plan_meta: dict) -> None:
    from .calib_cache import write_calib_cache
    from .plan import write_plan

    meta = {"model": record["name"], "source": record["plan"]["source"]}
    reasons = dict(plan_meta.get("reasons", {}))
    budget = record["plan"].get("max_drop")
    if budget:
        meta["max_drop"] = {k: v for k, v in budget.items() if k != "history"}
        for step in budget["history"][1:]:
            reasons[step["fp16"][-1]] = (f"fp16: --max-drop {budget['max_drop']:g}: with it in FP16 too, top-1 "
                                         f"{step['top1']:.2f} % on the calibration images (FP32 {budget['fp32_top1']:.2f})")
    if reasons:
        meta["reasons"] = reasons
    write_plan(folder / "plan.json", precision, meta)
    if amax and not target.is_tensorrt:
        write_calib_cache(folder / "calib.cache", amax)
    if target.is_tensorrt:
        from .bundle import write_bundle

        onnx_path = folder / ("model.int8.onnx" if amax else "model.fp32.onnx")
        images = np.concatenate([x for x, _ in calib.batches(256)])
        record["bundle"] = write_bundle(folder, target, onnx_path, images, amax, record, max_batch=max_batch)


def _write_records(folder: Path, record: dict) -> None:
    from .report import write_build_report

    record["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    write_json(folder / "build.json", record)
    write_build_report(folder / "report.md", record)


def engine_argv(target, spec: ModelSpec, cfg: BuildConfig) -> list:
    """build_engine.py's arguments for this build: the bundle's command plus the user's engine options."""
    from .bundle import build_engine_command

    implicit = cfg.trt_calibrator is not None
    onnx_name = "model.int8.onnx" if target.int8 and not implicit else "model.fp32.onnx"
    argv = build_engine_command(target, onnx_name, spec.input_size, cfg.max_batch, input_name=spec.input_name,
                                dla_core=cfg.dla_core)[2:]
    argv += ["--timing-cache", "timing.cache", "--preprocessing", "build.json"]
    if cfg.workspace_mib:
        argv += ["--workspace", str(cfg.workspace_mib)]
    if implicit:
        # Where TensorRT's entropy calibration writes its scales on the device. build_engine.py always calibrates
        # (into a fresh file) and reads a cache back only with --reuse-calib-cache, so "entropy" in
        # model.engine.json means the entropy algorithm ran -- never our max-calibrated calib.cache.
        argv += ["--trt-calibrator", cfg.trt_calibrator, "--calib", "calib.npy", "--calib-cache", ENTROPY_CACHE]
    return argv


#: Where TensorRT's entropy calibration (--trt-calibrator entropy) keeps its scales on the device.
ENTROPY_CACHE = "entropy.cache"


def _engine_or_bundle(out_dir: Path, target, spec: ModelSpec, cfg: BuildConfig) -> dict:
    """Build model.engine here when TensorRT and a GPU are present; otherwise say where to build it."""
    import contextlib
    import importlib.util
    import os
    import sys

    argv = engine_argv(target, spec, cfg)
    command = "python3 build_engine.py " + " ".join(argv)
    if importlib.util.find_spec("tensorrt") is None:
        log.info("TensorRT is not installed here, so %s holds a deploy bundle: build the engine on the %s itself "
                 "(TensorRT engines are not portable across GPUs and TensorRT versions): cd %s && %s",
                 out_dir, target.name, out_dir, command)
        return {"built": False, "command": command, "reason": "TensorRT not installed"}
    from .errors import BuildError
    from .trt import build_engine

    log.info("TensorRT found: building %s/model.engine (%s)", out_dir, command)
    cwd = os.getcwd()
    try:
        os.chdir(out_dir)  # the bundle's relative names (model.int8.onnx, calib.npy, ...)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for results
            code = build_engine.main(argv)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise BuildError(f"TensorRT engine build failed (exit {code}); the bundle in {out_dir} is complete: "
                         f"rerun there with: {command}")
    return {"built": True, "command": command, "engine": "model.engine", "metadata": "model.engine.json"}


def _meet_max_drop(model, layers, precision: dict, plan, calib, target, cfg: BuildConfig):
    """--max-drop: accuracy_budget.py's (precision, record, calibrated model or None), in order of the
    measured plan's per-layer KL (measured here when the plan came from --plan or without measurement)."""
    from .accuracy_budget import meet_max_drop
    from .measured_plan import DEFAULT_SENSITIVITY_IMAGES
    from .plan import QUANTIZED

    with stage("analyse"):
        sensitivity = plan.meta.get("kl_alone")
        if not sensitivity:
            from .analyse import measure_images

            subset = calib.subset(range(min(cfg.sensitivity_images or DEFAULT_SENSITIVITY_IMAGES, len(calib))))
            measured = [layer for layer in layers if precision[layer.name] in QUANTIZED]
            sensitivity = measure_images(model, measured, subset, cfg.calib_method, cfg.batch_size)[0]
        return meet_max_drop(model, layers, precision, calib, cfg.max_drop, cfg.int8_budget, sensitivity,
                             lambda p: _quantize(model, p, target, calib, cfg), cfg.batch_size)


def _quantize(model, precision: dict, target, calib, cfg: BuildConfig):
    """Techniques (shift, rescale, bias correction) + quantize + calibrate: (qmodel, prepared FP32 model,
    build.json "techniques" object, seconds)."""
    import torch

    from .quantize.techniques import Techniques, quantize_with_techniques

    from .quantize.technique_defaults import DEFAULT_SHIFT_BUILD, default_softmax_shift

    shift = DEFAULT_SHIFT_BUILD if cfg.shift is None else cfg.shift
    # An explicit --shift shifts the softmax too; the default one does so only where it is free (cpu).
    softmax_shift = default_softmax_shift(target) if cfg.shift is None else cfg.shift
    chosen = {k: v for k, v in (("shift", shift), ("softmax_shift", softmax_shift), ("rescale", cfg.rescale),
                                ("bias_correction", cfg.bias_correction)) if v is not None}
    techniques = dataclasses.replace(Techniques(), **chosen)

    def forward_loop(m):
        with torch.no_grad():
            for x, _ in progress(calib.batches(cfg.batch_size), "calibrate", total=calib.num_batches(cfg.batch_size)):
                m(torch.from_numpy(x))

    num_bits = None
    if cfg.qat is not None and (cfg.qat.weight_bits, cfg.qat.activation_bits) != (8, 8):
        num_bits = {"weights": min(cfg.qat.weight_bits, target.weight_bits), "activations": cfg.qat.activation_bits}
    start = time.perf_counter()
    qmodel, prepared, record = quantize_with_techniques(model, precision, target, forward_loop, cfg.calib_method,
                                                        techniques, num_bits=num_bits)
    return qmodel, prepared, record, time.perf_counter() - start


def _recover(prepared, qmodel, layers, quantized, calib, eval_images, cfg: BuildConfig):
    """--recover: block reconstruction of ``qmodel`` in place (it exports itself); build.json's "recovery".

    After each stage the model is measured on --eval-data when given, else on the verification
    images (seen by the recovery: agreement there says the stages work, not how well they generalise).
    """
    import torch

    from .recover import recover

    probe = eval_images if eval_images is not None else calib.subset(range(min(cfg.verify_images, len(calib))))
    probe_x = torch.from_numpy(np.concatenate([x for x, _ in probe.batches(cfg.batch_size)]))
    probe_labels = probe.labels

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(probe_x[i:i + cfg.batch_size]) for i in range(0, len(probe_x), cfg.batch_size)])

    reference = logits(prepared).argmax(1).numpy()

    def measure(m) -> dict:
        pred = logits(m).argmax(1).numpy()
        out = {"images": len(pred), "on": "eval data" if eval_images is not None else "verification images",
               "agreement": round(100.0 * float((pred == reference).mean()), 2)}
        if probe_labels is not None:
            out["top1"] = round(100.0 * float((pred == np.asarray(probe_labels)).mean()), 2)
        return out

    images = torch.from_numpy(np.concatenate([x for x, _ in calib.batches(cfg.batch_size)]))
    calib_labels = None if calib.labels is None else torch.from_numpy(np.asarray(calib.labels))
    before = measure(qmodel)
    result = recover(prepared, qmodel, layers, quantized, images, cfg.recover, after_stage=measure,
                     labels=calib_labels)
    result["before"] = before
    return result


def _qat_target(target, cfg: BuildConfig):
    """QAT's target: INT8-capable; below 8 bits ONNX Runtime (cpu), said in one line."""
    from .targets import get_target

    if not target.int8:
        raise InputError(f"qat: {target.name} has no INT8 (TensorRT runs it in FP16): choose another --target")
    if cfg.qat.weight_bits < 8 or cfg.qat.activation_bits < 8:
        instead = f" instead of {target.name}" if target.name != "cpu" else ""
        log.warning("%s is below 8 bits: model.int8.onnx is a simulation for ONNX Runtime (%s values in INT8 Q/DQ, "
                    "target cpu%s); TensorRT has no such INT8 kernels to deploy it", cfg.qat.bits, cfg.qat.bits, instead)
        target = get_target("cpu")
        cfg = dataclasses.replace(cfg, target="cpu")
    return target, cfg


def _train_qat(prepared, qmodel, images, cfg: BuildConfig) -> dict:
    """`vitdeploy qat`: train ``qmodel`` in place on every image of --calib (qat/train.py); build.json's "qat"."""
    from .data import as_tensor_source
    from .qat import train_qat

    labels = images.labels if cfg.use_labels else None
    result = train_qat(prepared, qmodel, as_tensor_source(images), labels, cfg.qat, cfg.qat_checkpoint_dir(),
                       cfg.resume)
    from .qat.train import distributed

    result["rank"] = distributed()[0]
    result["deployable"] = "TensorRT and ONNX Runtime" if cfg.qat.bits == "W8A8" else \
        "simulation: ONNX Runtime only, INT8 Q/DQ holding the lower-bit values"
    result["checkpoint"] = str(cfg.qat_checkpoint_dir())
    return result


def _verify(qmodel, model, spec: ModelSpec, calib, folder: Path, cfg: BuildConfig, target) -> dict:
    """ONNX Runtime vs PyTorch on real images, for both exported files; a mismatch fails the build.

    The INT8 file is run with Q/DQ evaluated in float, the ONNX semantics TensorRT computes: the
    check says the *model* is right, whatever this host's integer kernels do. A cpu build then
    checks the *host* (`_verify_host`). A strongly typed (FP16) INT8 file computes in FP16 on
    purpose: argmax may flip on near ties, so only the logits' cosine is held to the threshold
    there. Elsewhere the agreement bar counts every flip except near ties that rounding decides
    (`near_tie_flips`): on a weak model a 64-image check otherwise fails a correct export over one
    image whose top two logits differ by 0.03.
    """
    from .backends.ort import OrtRunner
    from .backends.torch_runner import TorchRunner
    from .measure.evaluate import predict

    images = calib.subset(range(min(cfg.verify_images, len(calib))))
    result = {"images": len(images), "bars": {"agreement": cfg.verify_min_agreement, "cosine": cfg.verify_min_cosine},
              "reference": "ONNX Runtime with Q/DQ evaluated in float (session.disable_quant_qdq): what TensorRT computes"}
    torch_runs, predictions = {}, {}
    for tag, torch_model in (("fp32", model), ("int8", qmodel)):
        if torch_model is None:
            continue
        with TorchRunner(torch_model, spec.input_name, spec.output_name, spec.input_size) as ref, \
                OrtRunner(folder / f"model.{tag}.onnx", qdq="float", warn_inexact=False) as ort:
            torch_runs[tag] = predict(ref, images, cfg.batch_size, desc=f"verify {tag}")
            predictions[tag] = predict(ort, images, cfg.batch_size, desc=f"verify {tag}")
        what = f"model.{tag}.onnx in ONNX Runtime does not reproduce PyTorch"
        check_argmax = not (target.strongly_typed and tag == "int8")
        if tag == "fp32":
            result[tag] = _compare(torch_runs[tag], predictions[tag], cfg, check_argmax, what)
        else:
            result[tag] = _compare_or_statistics((torch_runs["fp32"], torch_runs[tag]),
                                                 (predictions["fp32"], predictions[tag]), cfg, check_argmax, what,
                                                 ("PyTorch", "ONNX Runtime"))
    if qmodel is not None and target.qdq_placement == "onnxruntime":
        result["int8_host"] = _verify_host(folder / "model.int8.onnx", images, predictions, cfg)
    return result


# When image-by-image agreement misses the bars, the INT8 file still passes if it is *as accurate*
# as the model it was checked against: agreement with FP32 within this many points and KL to FP32
# within this factor, on the same images. Why: a deep real ViT turns float rounding into different
# INT8 codes, layer after layer. timm ViT-Tiny (ImageNet), jetson-orin, role-default plan: block 0's
# qkv output differs between PyTorch and ONNX Runtime by 2e-4 (relative), block 11's by 0.28, and
# the two agree on 95.7 % of the 256 verification images (cosine 0.989) -- yet each agrees with its
# own FP32 on 87.5 % (PyTorch) and 87.1 % (ONNX Runtime), KL 0.151 and 0.157 (on 488 other images:
# 82.6 / 83.4 %, KL 0.233 / 0.218). Two equally good samples of the same rounding, as a TensorRT
# engine would be a third. A wrong scale or a missing Q/DQ moves KL by far more than 1.5x.
STATISTICS_MAX_AGREEMENT_GAP = 3.0
STATISTICS_MAX_KL_RATIO = 1.5


def _compare_or_statistics(reference, other, cfg, check_argmax: bool, what: str, names) -> dict:
    """`_compare` of the INT8 runs; if it fails, the same accuracy against each side's own FP32."""
    from .measure.evaluate import agreement, kl_divergence

    try:
        return {"mode": "image by image", **_compare(reference[1], other[1], cfg, check_argmax, what)}
    except ExportError as exc:
        failure = str(exc)
    per_image = _comparison(reference[1], other[1])
    stats = {name: {"agreement_with_fp32": agreement(fp32, int8), "kl_to_fp32": kl_divergence(fp32, int8)}
             for name, (fp32, int8) in zip(names, (reference, other))}
    (a, b) = (stats[names[0]], stats[names[1]])
    gap = abs(a["agreement_with_fp32"] - b["agreement_with_fp32"])
    low, high = sorted((a["kl_to_fp32"], b["kl_to_fp32"]))
    ratio = high / low if low > 0 else (1.0 if high == 0 else float("inf"))
    summary = (f"{names[0]} agrees with its FP32 on {a['agreement_with_fp32']:.2f} % (KL {a['kl_to_fp32']:.3g}), "
               f"{names[1]} on {b['agreement_with_fp32']:.2f} % (KL {b['kl_to_fp32']:.3g})")
    if gap > STATISTICS_MAX_AGREEMENT_GAP or ratio > STATISTICS_MAX_KL_RATIO:
        raise ExportError(f"{failure}; and not as accurate either: {summary}")
    log.info("%s image by image (agreement %.2f %%, cosine %.4f: INT8 rounding diverges through a deep model), but "
             "it is as accurate: %s", what, per_image["agreement"], per_image["cosine"], summary)
    return {"mode": "statistics", **per_image, "statistics": {
        **stats, "bars": {"agreement_gap": STATISTICS_MAX_AGREEMENT_GAP, "kl_ratio": STATISTICS_MAX_KL_RATIO}}}


def _comparison(reference, other) -> dict:
    """Agreement, near ties, cosine and largest difference of two runs on the same images."""
    from .measure.evaluate import agreement, cosine_similarity, near_tie_flips

    agree, ties = agreement(reference, other), near_tie_flips(reference, other)
    # "agreement_checked": what the bar is held to, near-tie flips counted as agreeing.
    return {"agreement": agree, "near_tie_flips": ties, "agreement_checked": agree + 100.0 * ties / reference.n,
            "cosine": cosine_similarity(reference, other),
            "max_abs_diff": float(np.abs(reference.logits - other.logits).max())}


def _compare(reference, other, cfg: BuildConfig, check_argmax: bool, what: str) -> dict:
    """Agreement, near ties and cosine of two runs; ExportError starting with ``what`` below the bars."""
    record = _comparison(reference, other)
    agree, ties = record["agreement"], record["near_tie_flips"]
    if (check_argmax and record["agreement_checked"] < cfg.verify_min_agreement) \
            or record["cosine"] < cfg.verify_min_cosine:
        forgiven = f" ({ties} near-tie flips not counted)" if ties else ""
        raise ExportError(f"{what}: agreement {agree:.2f} %{forgiven}, cosine {record['cosine']:.5f} (bars "
                          f"{cfg.verify_min_agreement:g} %, {cfg.verify_min_cosine:g}){_near_tie_hint(reference, other)}")
    return record


def _verify_host(path: Path, images, float_runs: dict, cfg: BuildConfig) -> dict:
    """This CPU's fused integer kernels against the same file with Q/DQ in float.

    First each quantized layer alone at its worst-case input (`kernel_check`): integer saturation
    shows there, named, whatever the model. Then the whole file on the verification images.
    """
    import onnx

    from .backends.ort import OrtRunner
    from .cpu_isa import FAMILIES, file_exact_on, host_isa
    from .measure.evaluate import predict
    from .measure.kernel_check import check_integer_kernels

    isa = host_isa()
    kernels = check_integer_kernels(onnx.load(str(path)))
    if not kernels.exact:
        exact = ", ".join(file_exact_on(path))
        raise ExportError(
            f"{path.name}: ONNX Runtime's integer kernels on this CPU ({FAMILIES.get(isa, isa)}) do not compute "
            f"{len(kernels.failed)} of {kernels.layers} quantized layers exactly (integer saturation; worst "
            f"{kernels.worst}, {100 * kernels.max_rel_error:.1f} % off its float Q/DQ result); the file claims to be "
            f"exact on {exact or 'no CPU'}: please report it, with the output of 'vitdeploy targets'")
    with OrtRunner(path, warn_inexact=False) as runner:
        fused = predict(runner, images, cfg.batch_size, desc="verify int8 on this CPU")
    record = _compare_or_statistics((float_runs["fp32"], float_runs["int8"]), (float_runs["fp32"], fused), cfg, True,
                                    f"{path.name}: every quantized layer is exact on this CPU ({isa}) alone, but the "
                                    f"whole model amplifies the fused kernels' float rounding (a neighbouring INT8 code "
                                    f"now and then) beyond the bars", ("Q/DQ in float", "fused kernels"))
    return {"isa": isa, "kernels": kernels.as_dict(), **record}


def _near_tie_hint(reference, other) -> str:
    """Why a correct export can still miss the bars: logits that are near ties everywhere.

    ONNX Runtime and PyTorch round a few activations to neighbouring INT8 codes (different float
    summation order); on a trained model that moves nothing, but when the top two logits are
    closer than those differences (untrained weights, random inputs) argmax and cosine flip.
    """
    top2 = np.sort(reference.logits, axis=1)[:, -2:]
    margin = float(np.median(top2[:, 1] - top2[:, 0]))
    diff = float(np.median(np.abs(reference.logits - other.logits).max(axis=1)))
    if margin >= 10 * diff:
        return ""
    return (f"; the logits are close to ties (median top-2 margin {margin:.3g}, median largest difference "
            f"{diff:.3g}): expected with untrained weights, where --verify-min-agreement / --verify-min-cosine "
            f"can lower the bars; with a trained model, please report it")


def _cpu_record(folder: Path, verification: dict) -> Optional[dict]:
    """build.json "cpu": this host's kernel family, where model.int8.onnx is exact, where that was checked."""
    from .cpu_isa import file_exact_on, host_isa

    path = folder / "model.int8.onnx"
    if not path.exists():
        return None
    host = verification.get("int8_host")
    return {"host_isa": host_isa(), "exact_on": file_exact_on(path),
            "verified_on": [host["isa"]] if host else [],
            "note": "exact_on: ONNX Runtime's fused integer kernels compute the ONNX Q/DQ result there "
                    "(vitdeploy/cpu_isa.py); verified_on: checked layer by layer on this host"}


def _evaluate(folder: Path, images, batch_size: int, target) -> dict:
    """FP32 vs INT8 top-1 and agreement in ONNX Runtime. INT8 as the target computes it: Q/DQ in float
    for TensorRT; for cpu this host's fused kernels (what an app gets), and Q/DQ in float beside it."""
    from .backends.ort import OrtRunner
    from .measure.evaluate import agreement, kl_divergence, predict

    runs = [("fp32", "fused")]
    if (folder / "model.int8.onnx").exists():
        runs += [("int8", "fused"), ("int8", "float")] if target.qdq_placement == "onnxruntime" else [("int8", "float")]
    preds = {}
    for tag, qdq in runs:
        with OrtRunner(folder / f"model.{tag}.onnx", qdq=qdq, warn_inexact=False) as runner:
            preds[(tag, qdq)] = predict(runner, images, max(batch_size, 128), desc=f"evaluate {tag}")
    fp32 = preds[("fp32", "fused")]
    result = {"images": fp32.n, "fp32_top1": fp32.top1}
    for (tag, qdq), p in preds.items():
        if tag == "int8":
            suffix = "" if qdq == runs[1][1] else "_float_qdq"
            # KL resolves what agreement cannot: on a few hundred images one flip is worth 0.2 points,
            # and the flips are near-ties (docs/real-vit.md).
            result.update({f"int8{suffix}_top1": p.top1, f"agreement{suffix}": agreement(fp32, p),
                           f"kl{suffix}_to_fp32": float(f"{kl_divergence(fp32, p):.4g}")})
    if "int8_top1" in result:
        result["int8_computed_by"] = ("ONNX Runtime's fused integer kernels on this CPU" if runs[1][1] == "fused"
                                      else "ONNX Runtime with Q/DQ in float (what TensorRT computes)")
    return result


def _layer_record(layer, precision: str, qmodel, cfg: BuildConfig) -> dict:
    record = {**layer.to_dict(), "precision": precision}
    if precision not in ("int8", "int8-asym"):
        return record
    from .quantize.techniques import describe_input, describe_matmul

    modules = dict(qmodel.named_modules())
    if layer.kind == "matmul":
        attn_path, _, matmul = layer.name.rpartition(".")
        from .quantize.attention import matmul_quantizers

        record["input_amax"] = [float(q.amax) for q in matmul_quantizers(modules[attn_path], matmul)]
        record["activations"] = "int8 symmetric, per tensor, on both inputs"
        record.update(describe_matmul(modules[attn_path], matmul))
    else:
        record["input_amax"] = float(modules[layer.name].input_quantizer.amax)
        bits = modules[layer.name].weight_quantizer.num_bits
        record["weights"] = "int8 symmetric, per output channel" + (" (max |w|)" if cfg.qat is None else "") + \
            ("" if bits == 8 else f", {bits}-bit codes (|code| <= {2 ** (bits - 1) - 1}"
             + (": exact on every CPU)" if bits == 7 else ")"))
        act_bits = modules[layer.name].input_quantizer.num_bits
        record["activations"] = "int8 symmetric, per tensor" + ("" if act_bits == 8 else f", {act_bits}-bit codes")
        record.update(describe_input(modules[layer.name]))
    record["scales_source"] = (f"{cfg.calib_method} calibration" if cfg.qat is None else
                               f"learned in QAT (LSQ), from {cfg.calib_method} calibration")
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
