"""The ``vitdeploy`` command: one subcommand per job, options shared through argument groups.

Errors a user can fix print one line on stderr and exit with code 2 (``--debug`` shows the
traceback); results go to stdout.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .errors import InputError, StageFailure, Terminated, VitDeployError, stage


# --------------------------------------------------------------------------- argument groups

def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", type=Path, help="checkpoint: a state_dict (with --arch) or a pickled nn.Module")
    g.add_argument("--arch", help="timm model name (e.g. vit_small_patch16_224) or file.py:Class for plain PyTorch")
    g.add_argument("--model-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'; "
                                          "\"layer_norm_eps\" sets every LayerNorm's eps")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole nn.Module (this runs code from the file)")


def add_preprocessing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (default: the model's timm pretrained_cfg, or build.json)")
    g.add_argument("--input-size", type=int, nargs="+", metavar="N", help="C H W (or H W)")
    g.add_argument("--mean", type=float, nargs="+", help="per-channel mean of pixels scaled to [0, 1]")
    g.add_argument("--std", type=float, nargs="+", help="per-channel std of pixels scaled to [0, 1]")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", type=Path, default=Path("calib"),
                   help="folder of images (class sub-folders optional) or .npz with 'x' (default: calib/)")
    g.add_argument("--calib-size", type=int, default=512, help="images sampled with a fixed seed (default 512)")
    g.add_argument("--calib-method", default="max", choices=["max", "entropy", "percentile", "mse"],
                   help="activation range estimator (default max)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--plan", type=Path, help="precision plan JSON (written by every build as plan.json; "
                                             "module paths or patterns → int8|int8-asym|fp16|fp32)")


def add_measured_plan_args(p: argparse.ArgumentParser) -> None:
    from .measured_plan import DEFAULT_INT8_BUDGET, DEFAULT_SENSITIVITY_IMAGES

    g = p.add_argument_group("measured plan (without --plan: layers that dominate the INT8 loss stay FP16)")
    g.add_argument("--int8-budget", type=float, default=DEFAULT_INT8_BUDGET, metavar="PCT",
                   help=f"keep at least this share of Linear/Conv MACs INT8 (default {DEFAULT_INT8_BUDGET:g})")
    g.add_argument("--sensitivity-images", type=int, default=DEFAULT_SENSITIVITY_IMAGES, metavar="N",
                   help=f"calibration images each layer is measured on (default {DEFAULT_SENSITIVITY_IMAGES}; "
                        "0: no measurement, patch-embed and head FP16, the rest INT8)")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="then move the most sensitive layers to FP16 until the top-1 drop against FP32, measured on "
                        "the labelled calibration images, is at most POINTS (within --int8-budget)")


def add_technique_args(p: argparse.ArgumentParser) -> None:
    from .quantize.technique_defaults import DEFAULT_BIAS_CORRECTION, DEFAULT_RESCALE

    on_off = lambda default: "on" if default else "off"
    g = p.add_argument_group("accuracy techniques (all TensorRT-legal: symmetric Q/DQ, folded into FP32 parameters)")
    g.add_argument("--shift", action=argparse.BooleanOptionalAction, default=None,
                   help="centre each Linear input's channels before its quantizer, W·z folded into the bias "
                        "(default on; where a plan makes attention INT8, the softmax output too: on cpu by "
                        "default, on TensorRT targets only with an explicit --shift)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                   help="SmoothQuant channel factors folded into LayerNorm γ/β and the Linears it feeds "
                        f"(default {on_off(DEFAULT_RESCALE)})")
    g.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help=f"b -= (W_q - W)·E[x] on quantized layers (default {on_off(DEFAULT_BIAS_CORRECTION)})")


RECOVERY_PARTS = ("progressive", "lowrank", "softmax", "curriculum")


def add_recovery_args(p: argparse.ArgumentParser) -> None:
    from .recover.reconstruct import RecoverySettings

    d = RecoverySettings()
    g = p.add_argument_group("accuracy recovery (block reconstruction after calibration; folds into INT8 weights "
                             "and scales, the graph is unchanged)")
    g.add_argument("--recover", action="store_true",
                   help="reconstruct each block's FP32 output: learned rounding, activation steps, biases, "
                        "low-rank compensation, focused softmax interval, curriculum, progressive stages")
    g.add_argument("--recover-without", default="", metavar="PARTS",
                   help=f"comma-separated parts to leave out: {', '.join(RECOVERY_PARTS)}")
    g.add_argument("--recover-iters", type=int, default=d.iters, metavar="N",
                   help=f"gradient steps per block and stage (default {d.iters})")
    g.add_argument("--recover-epochs", type=int, default=d.epochs, metavar="N",
                   help="then fine-tune the whole quantized model N epochs on the labelled calibration images "
                        f"(cross-entropy, AdamW lr {d.finetune_lr:g}, batch {d.batch}, linear warm-up; default off)")
    g.add_argument("--device", default=d.device, help="where recovery runs: auto (a CUDA GPU when present), cpu, cuda")


def recovery_settings(args):
    """--recover's RecoverySettings, or None; an unknown part is bad input."""
    from .errors import InputError
    from .recover.reconstruct import RecoverySettings

    if not args.recover:
        if args.recover_without:
            raise InputError("--recover-without needs --recover")
        return None
    parts = [p.strip() for p in args.recover_without.split(",") if p.strip()]
    unknown = [p for p in parts if p not in RECOVERY_PARTS]
    if unknown:
        raise InputError(f"--recover-without: unknown part {unknown[0]!r} (parts: {', '.join(RECOVERY_PARTS)})")
    if args.recover_iters < 0 or args.recover_epochs < 0:
        raise InputError("--recover-iters and --recover-epochs must be >= 0")
    return RecoverySettings(iters=args.recover_iters, epochs=args.recover_epochs, device=args.device, seed=args.seed,
                            **{part: False for part in parts})


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


# --------------------------------------------------------------------------- subcommands

def cmd_build(args) -> int:
    from .pipeline import BuildConfig, build
    from .report import table

    cfg = BuildConfig(
        model=args.model, calib=args.calib, target=args.target, out=args.out, name=args.name, arch=args.arch,
        model_kwargs=args.model_kwargs, trust_pickle=args.trust_pickle, input_size=args.input_size,
        mean=args.mean, std=args.std, calib_size=args.calib_size, calib_method=args.calib_method, seed=args.seed,
        plan=args.plan, workspace_mib=args.workspace, dla_core=args.dla, trt_calibrator=args.trt_calibrator,
        max_batch=args.max_batch, shift=args.shift, rescale=args.rescale, bias_correction=args.bias_correction,
        eval_data=args.eval_data, batch_size=args.batch_size, int8_budget=args.int8_budget,
        sensitivity_images=args.sensitivity_images, max_drop=args.max_drop, recover=recovery_settings(args),
        verify_min_agreement=args.verify_min_agreement, verify_min_cosine=args.verify_min_cosine)
    record = build(cfg)
    rows = [[name, size / 1e6] for name, size in record["files"].items()]
    print(f"built {record['output']} in {record['build_seconds']:.1f} s")
    print(table(["file", "size (MB)"], rows))
    print(f"INT8 share of Linear/Conv MACs: {record['plan']['int8_linear_mac_share']:.1f} % "
          f"(with attention matmuls: {record['plan']['int8_mac_share']:.1f} %)")
    acc = record.get("accuracy")
    if acc:
        rows = [["FP32", acc["fp32_top1"]]] + ([["INT8", acc["int8_top1"]]] if "int8_top1" in acc else [])
        print(table(["model", f"top-1 % ({acc['images']} images)"], rows))
        if "agreement" in acc:
            print(f"INT8 agrees with FP32 on {acc['agreement']:.2f} % of the images")
    return 0


def cmd_qat(args) -> int:
    from .pipeline import BuildConfig, build
    from .qat import QatSettings, parse_bits
    from .report import table

    weight_bits, activation_bits = parse_bits(args.bits)
    if args.epochs < 1 or args.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    settings = QatSettings(weight_bits=weight_bits, activation_bits=activation_bits, epochs=args.epochs,
                           batch=args.batch_size, lr=args.lr, step_lr=args.step_lr, irm=not args.no_irm,
                           dgd=not args.no_dgd, temperature=args.temperature, seed=args.seed, device=args.device,
                           amp=args.amp)
    cfg = BuildConfig(
        model=args.model, calib=args.data, target=args.target, out=args.out, name=args.name, arch=args.arch,
        model_kwargs=args.model_kwargs, trust_pickle=args.trust_pickle, input_size=args.input_size,
        mean=args.mean, std=args.std, calib_size=args.calib_size, calib_method=args.calib_method, seed=args.seed,
        plan=args.plan, shift=args.shift, rescale=args.rescale, bias_correction=args.bias_correction,
        eval_data=args.eval_data, sensitivity_images=0, qat=settings, checkpoint_dir=args.checkpoint_dir,
        resume=args.resume, use_labels=not args.no_labels,
        verify_min_agreement=args.verify_min_agreement, verify_min_cosine=args.verify_min_cosine)
    record = build(cfg)
    if record.get("rank", 0) != 0:
        return 0
    qat = record["qat"]
    print(f"built {record['output']} in {record['build_seconds']:.1f} s ({settings.bits} QAT, {settings.epochs} "
          f"epochs on {qat['images']} images, {qat['processes']} process(es) on {qat['device']}, {qat['seconds']:.0f} s)")
    losses = qat["losses"]
    print(table(["epoch"] + losses, [[i + 1] + [h.get(k, "") for k in losses] for i, h in enumerate(qat["history"])]))
    acc = record.get("accuracy")
    if acc:
        rows = [["FP32", acc["fp32_top1"]]] + ([[settings.bits, acc["int8_top1"]]] if "int8_top1" in acc else [])
        print(table(["model", f"top-1 % ({acc['images']} images)"], rows))
        if "agreement" in acc:
            print(f"{settings.bits} agrees with FP32 on {acc['agreement']:.2f} % of the images")
    return 0


def cmd_analyze(args) -> int:
    from .analyse import analyse, format_table, plan_from_scores, search_max_drop, write_png
    from .artifacts import write_json
    from .data import load_images
    from .inventory import find_layers
    from .load import arch_file, load_model
    from .outputs import OutputFolder, folder_name
    from .pipeline import warn_fewer_images
    from .plan import int8_mac_share, write_plan

    if args.max_drop is not None and args.data is None:
        raise InputError("--max-drop needs held-out labelled images: pass --data")
    out = args.out or Path("engines") / f"{folder_name(args.model.stem)}-analysis"
    with stage("write"):
        output = OutputFolder(out, [args.model, args.calib, args.data, arch_file(args.arch)]).check()
    with stage("load"):
        model, spec = load_model(args.model, args.arch, args.model_kwargs, args.trust_pickle,
                                 args.input_size, args.mean, args.std)
        calib_all = load_images(args.calib, spec, what="calibration data")
        calib = calib_all.sample(args.calib_size, args.seed)
        warn_fewer_images(args.calib_size, len(calib_all), args.calib)
        data = load_images(args.data, spec, require_labels=True, what="labelled data") if args.data else None
        scored = (data.sample(args.images, args.seed) if data is not None else calib.sample(args.images, args.seed))
        layers = find_layers(model, spec)
    with stage("analyse"):
        report = analyse(model, layers, scored, args.calib_method, name=spec.name)
        if args.max_drop is not None:
            plan, history = search_max_drop(model, layers, report, data, args.max_drop, calib, args.calib_method)
        else:
            plan = plan_from_scores(report, args.tau_low, args.tau_high)
        resolved = plan.resolve(layer.name for layer in layers)
    with stage("write"), output.write() as tmp:
        write_json(tmp / "sensitivity.json", report.to_dict())
        write_png(report, tmp / "sensitivity.png")
        write_plan(tmp / "plan.json", resolved, {**plan.meta, "model": spec.name})
    print(format_table(report, resolved))
    print(f"INT8 share of Linear/Conv MACs: {int8_mac_share(layers, resolved):.1f} %  "
          f"({plan.meta.get('source')}; "
          + (f"top-1 {plan.meta['int8_top1']:.2f} % vs FP32 {plan.meta['fp32_top1']:.2f} % on {plan.meta['search_images']} "
             "held-out images" if args.max_drop is not None else
             f"tau_low {plan.meta['tau_low']:.4g}, tau_high {plan.meta['tau_high']:.4g}") + ")")
    print(f"wrote {out}/sensitivity.json, sensitivity.png, plan.json (use it: vitdeploy build ... --plan {out}/plan.json)")
    return 0


def cmd_targets(args) -> int:
    from .cpu_isa import FAMILIES, host_isa
    from .targets import format_targets_table

    print(format_targets_table())
    isa = host_isa()
    print(f"this host: {isa} ({FAMILIES.get(isa, 'kernel family not recognised')}); cpu files are exact on every "
          f"CPU kernel family: {', '.join(FAMILIES)}")
    return 0


def cmd_lint(args) -> int:
    from .lint import format_report, lint_errors, lint_model

    violations = lint_model(args.onnx, args.target)
    print(format_report(violations))
    return 1 if lint_errors(violations) else 0


def cmd_eval(args) -> int:
    from .backends.ort import OrtRunner
    from .data import load_images
    from .measure.evaluate import predict

    spec = _eval_spec(args)
    images = load_images(args.data, spec, require_labels=True, what="evaluation data")
    if args.limit:
        images = images.subset(range(min(args.limit, len(images))))
    qdq = "float" if args.float_qdq else "fused"
    with OrtRunner(args.onnx, threads=args.threads, qdq=qdq) as runner:
        preds = predict(runner, images, args.batch_size)
    result = {"model": str(args.onnx), "data": str(args.data), "top1": preds.top1, "n": preds.n, "qdq": qdq}
    if args.json:
        print(json.dumps(result))
    else:
        how = ", Q/DQ in float" if args.float_qdq else ""
        print(f"top-1 {preds.top1:.2f} % on {preds.n} images ({args.onnx}{how})")
    return 0


def _eval_spec(args):
    """Preprocessing from the flags, else from build.json beside the ONNX file."""
    from .artifacts import ModelSpec, read_json

    if not args.onnx.is_file():
        raise InputError(f"ONNX model not found: {args.onnx}")
    build_json = args.onnx.parent / "build.json"
    base = ModelSpec.from_dict(read_json(build_json)["preprocessing"]) if build_json.is_file() else None
    size = tuple(args.input_size) if args.input_size else (base.input_size if base else _onnx_input_size(args.onnx))
    if len(size) == 2:
        size = (_onnx_input_size(args.onnx)[0],) + tuple(size)
    mean = tuple(args.mean) if args.mean else (base.mean if base else None)
    std = tuple(args.std) if args.std else (base.std if base else None)
    if mean is None or std is None:
        raise InputError(f"no build.json beside {args.onnx}: pass --mean and --std (and --input-size if needed)")
    expand = lambda v: tuple(v) * size[0] if len(v) == 1 else tuple(v)
    return ModelSpec(name=args.onnx.stem, input_size=tuple(size), mean=expand(mean), std=expand(std),
                     num_classes=base.num_classes if base else 0,
                     crop_pct=base.crop_pct if base else 1.0, crop_mode=base.crop_mode if base else "center",
                     interpolation=base.interpolation if base else "bilinear")


def _onnx_input_size(path: Path):
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    size = tuple(d.dim_value for d in dims[1:])
    if len(size) != 3 or not all(size):
        raise InputError(f"{path} has no static C×H×W input: pass --input-size")
    return size


def cmd_bench(args) -> int:
    from .measure.bench import bench_json, markdown_table, parse_batches, run_bench

    result = run_bench(args.artifacts, data=args.data, batches=parse_batches(args.batch), threads=args.threads,
                       runs=args.runs, warmup=args.warmup, png=args.png)
    if args.json:
        print(json.dumps(bench_json(result["rows"], result["threads"], result["device"], skipped=result["skipped"])))
        return 0 if result["rows"] or result["skipped"] else 1
    if result["rows"]:
        print(markdown_table(result["rows"]))
        print(f"\n{result['device']}; warm-up {result['warmup']}, {result['runs']} timed runs per batch, interleaved")
    if result["png"]:
        print(f"chart: {result['png']}")
    return 0 if result["rows"] or result["skipped"] else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    print(run_demo(Path(args.out), epochs=args.epochs))
    return 0


# --------------------------------------------------------------------------- parser

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitdeploy", description="Compile PyTorch Vision Transformers to INT8 "
                                     "ONNX (ONNX Runtime) and TensorRT deployments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="quantize a model and export FP32 + INT8 QDQ ONNX into engines/<name>/")
    add_model_args(p)
    add_preprocessing_args(p)
    add_calibration_args(p)
    add_measured_plan_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--target", default="cpu", help="cpu, jetson-tx2, jetson-xavier, jetson-orin (jetson), desktop "
                                                   "(default cpu; see vitdeploy targets)")
    g.add_argument("--out", type=Path, help="output folder (default engines/<name>)")
    g.add_argument("--name", help="build name (default: the checkpoint's file name)")
    g.add_argument("--eval-data", type=Path, help="labelled images (.npz or class folders): report FP32 vs INT8 top-1")
    g.add_argument("--batch-size", type=int, default=64)
    from .pipeline import VERIFY_MIN_AGREEMENT, VERIFY_MIN_COSINE

    g = p.add_argument_group("verification (ONNX Runtime must reproduce PyTorch on 256 calibration images, "
                             "or the build fails)")
    g.add_argument("--verify-min-agreement", type=float, default=VERIFY_MIN_AGREEMENT, metavar="PCT",
                   help=f"argmax agreement in %% (default {VERIFY_MIN_AGREEMENT:g}); lower it only for models "
                        "whose logits are near ties, such as untrained ones")
    g.add_argument("--verify-min-cosine", type=float, default=VERIFY_MIN_COSINE, metavar="C",
                   help=f"cosine of the logits (default {VERIFY_MIN_COSINE:g})")
    g = p.add_argument_group("TensorRT engine (built here when TensorRT and a GPU are present, else on the device "
                             "from the bundle)")
    g.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace limit")
    g.add_argument("--dla", type=int, metavar="CORE", help="DLA core on Xavier/Orin (GPU fallback on; batch 1)")
    g.add_argument("--trt-calibrator", choices=["entropy"],
                   help="implicit INT8 with IInt8EntropyCalibrator2 on the FP32 ONNX (TensorRT <= 10 only; "
                        "deprecated since 10.1, removed in 11: explicit Q/DQ is the default)")
    g.add_argument("--max-batch", type=int, default=8, help="largest batch of the engine's profile (default 8)")
    add_technique_args(p)
    add_recovery_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("qat", help="quantization-aware training (LSQ steps, IRM, distillation from the FP32 model), "
                                   "then the build's export, lint and verification into engines/<name>/")
    add_model_args(p)
    add_preprocessing_args(p)
    from .qat import QatSettings

    d = QatSettings()
    g = p.add_argument_group("training (single process, or torchrun --nproc-per-node N -m vitdeploy qat ...)")
    g.add_argument("--data", type=Path, required=True,
                   help="training images: folder (class sub-folders give labels) or .npz with x (and y)")
    g.add_argument("--bits", default="W8A8", help="weight and activation bits, W2A2 .. W8A8 (default W8A8; below "
                                                  "8 bits the export is an ONNX Runtime simulation)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"(default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=d.batch, help=f"global batch, split over the processes "
                                                                   f"(default {d.batch})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW rate of the weights (default {d.lr:g}); warm-up, "
                                                         "then cosine")
    g.add_argument("--step-lr", type=float, default=d.step_lr,
                   help=f"rate of the quantizer steps and rectifiers, relative to their size (default {d.step_lr:g})")
    g.add_argument("--temperature", type=float, default=d.temperature, help="logit distillation temperature")
    g.add_argument("--no-irm", action="store_true", help="no information rectification of q and k")
    g.add_argument("--no-dgd", action="store_true", help="no distribution-guided distillation of q and k")
    g.add_argument("--no-labels", action="store_true", help="distillation only, even where the images have labels")
    g.add_argument("--seed", type=int, default=0, help="image order and calibration sample (default 0)")
    g.add_argument("--device", default=d.device, help="auto (a CUDA GPU when present), cpu, cuda")
    g.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "off"],
                   help="bf16 autocast (auto: on CUDA only; the quantizers always compute in FP32)")
    g.add_argument("--checkpoint-dir", type=Path, help="where each epoch's checkpoint goes (default "
                                                       "<out>.qat-checkpoint, removed after a finished build)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the same run")
    g = p.add_argument_group("calibration (the steps' starting point) and output")
    g.add_argument("--calib-size", type=int, default=512, help="images of --data sampled for calibration")
    g.add_argument("--calib-method", default="max", choices=["max", "entropy", "percentile", "mse"])
    g.add_argument("--plan", type=Path, help="precision plan JSON (default: every layer quantized)")
    g.add_argument("--target", default="cpu", help="cpu or a TensorRT target with INT8 (default cpu)")
    g.add_argument("--out", type=Path, help="output folder (default engines/<name>)")
    g.add_argument("--name", help="build name (default: the checkpoint's file name)")
    g.add_argument("--eval-data", type=Path, help="labelled images: report FP32 vs quantized top-1")
    from .pipeline import VERIFY_MIN_AGREEMENT as _AGREE, VERIFY_MIN_COSINE as _COS

    g.add_argument("--verify-min-agreement", type=float, default=_AGREE, metavar="PCT")
    g.add_argument("--verify-min-cosine", type=float, default=_COS, metavar="C")
    add_technique_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_qat)

    p = sub.add_parser("eval", help="top-1 of an ONNX model in ONNX Runtime on labelled images")
    p.add_argument("onnx", type=Path, help="ONNX model (preprocessing from the build.json beside it)")
    p.add_argument("--data", type=Path, required=True, help="labelled images: .npz with x, y or class folders")
    p.add_argument("--json", action="store_true", help="print one JSON object with top1 (%%) and n")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--float-qdq", action="store_true",
                   help="evaluate Q/DQ in float, as ONNX defines it and TensorRT computes it (default: ONNX Runtime's "
                        "fused integer kernels, which on some CPUs differ for full-range INT8 files)")
    add_preprocessing_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="per-layer INT8 sensitivity (S(W) and measured), table + JSON + PNG, "
                                       "and a plan.json from thresholds or --max-drop")
    add_model_args(p)
    add_preprocessing_args(p)
    add_calibration_args(p)
    g = p.add_argument_group("analysis")
    g.add_argument("--data", type=Path, help="labelled held-out images (labels for the loss; needed by --max-drop)")
    g.add_argument("--images", type=int, default=256, help="images scored (default 256)")
    g.add_argument("--tau-low", type=float, help="S(W) below → int8 (default: 75th percentile of the scores)")
    g.add_argument("--tau-high", type=float, help="S(W) above → fp16 (default: Q3 + 1.5 IQR of the scores)")
    g.add_argument("--max-drop", type=float, help="search the plan with the most INT8 MACs whose top-1 drop on --data "
                                                  "stays within this many points")
    g.add_argument("--out", type=Path, help="output folder (default engines/<name>-analysis)")
    add_common_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("targets", help="list the deployment targets and what each implies")
    add_common_args(p)
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("lint", help="check a QDQ ONNX model against a target's rules (TensorRT's contract); "
                                    "exit 1 on errors")
    p.add_argument("onnx", type=Path)
    p.add_argument("--target", default="jetson-orin", help="target whose rules apply (default jetson-orin)")
    add_common_args(p)
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("bench", help="latency (median/p90/p99), throughput, memory, size and top-1 of FP32/FP16/INT8 "
                                     "ONNX models (ONNX Runtime, CPU) and TensorRT engines")
    p.add_argument("artifacts", type=Path, nargs="+", metavar="ARTIFACT",
                   help="ONNX model, TensorRT .engine, or build folder (all its model.*.onnx and *.engine)")
    p.add_argument("--data", type=Path, help="labelled images (.npz or class folders) for top-1; preprocessing "
                                             "from the build.json")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1), e.g. 1,8")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: physical cores)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per batch size (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs per batch size (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--png", type=Path, help="latency bar chart (default: bench.png in a benchmarked build folder)")
    add_common_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="train a small ViT on scikit-learn's digits for a minute, build it, show FP32 vs INT8")
    p.add_argument("--out", default="engines", help="where the demo's build goes (default engines/)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs (default 100, about a minute)")
    add_common_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from .log import configure

    import os

    other_rank = int(os.environ.get("RANK", "0")) != 0   # torchrun: rank 0 speaks for the run
    configure(verbose=False, progress=not args.quiet and not other_rank and sys.stderr.isatty())
    if args.quiet or other_rank:
        import logging

        logging.getLogger("vitdeploy").setLevel(logging.WARNING)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = False
    try:
        return args.func(args)
    except VitDeployError as exc:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # always one line
        where = f"{exc.stage}: " if exc.stage else ""
        print(f"vitdeploy: error: {where}{message or type(exc).__name__}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        terminated = isinstance(exc, Terminated)
        where = f" during {exc.stage}" if getattr(exc, "stage", None) else ""
        print(f"vitdeploy: {'terminated (SIGTERM)' if terminated else 'interrupted'}{where}; no output was written",
              file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # outside any stage: still one line
        if args.debug:
            raise
        print(f"vitdeploy: error: {StageFailure(args.command, exc)}", file=sys.stderr)
        return 1
    finally:
        if previous is not False:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _terminate(signum, frame):
    """SIGTERM raises where the program is, so every cleanup that Ctrl-C runs runs too; a second one
    during that cleanup is ignored (SIGKILL still works)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
