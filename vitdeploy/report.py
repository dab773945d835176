"""Human-readable summaries: report.md for a build, and terminal tables."""
from __future__ import annotations

from pathlib import Path

from .measure.core import markdown_table as table  # the one table writer (the device benchmark's too)


def _amax(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return " / ".join(f"{v:.4g}" for v in value)
    return f"{value:.4g}"


def _measured(m) -> str:
    if not m:
        return ""
    top1 = f"top-1 {m['top1']:.2f} %, " if "top1" in m else ""
    return f"{top1}agreement with FP32 {m['agreement']:.2f} % ({m['images']} {m['on']})"


def write_build_report(path: Path, record: dict) -> None:
    from .measure.evaluate import NEAR_TIE_TOLERANCE

    spec = record["preprocessing"]
    calib = record["inputs"]["calibration"]
    verification = record["verification"]
    bars = verification["bars"]
    lines = [
        f"# {record['name']}: INT8 build for `{record['target']}`",
        "",
        f"- model: `{record['inputs']['model']}`" + (f" (arch `{record['inputs']['arch']}`)" if record["inputs"]["arch"] else ""),
        f"- input: {'x'.join(map(str, spec['input_size']))}, mean {list(spec['mean'])}, std {list(spec['std'])}, "
        f"{spec['num_classes']} classes",
        f"- calibration: {calib['images']} images from `{calib['source']}` (seed {calib['seed']}), "
        f"{calib['method']}, {calib['seconds']:.1f} s",
        f"- built in {record['build_seconds']:.1f} s with " + ", ".join(
            f"{k} {v}" for k, v in record["versions"].items() if k in ("torch", "timm", "onnx", "onnxruntime")),
        "",
        "## Files",
        "",
        table(["file", "size (MB)"], [[name, size / 1e6] for name, size in record["files"].items()]),
        "",
        "## Verification (ONNX Runtime vs PyTorch; INT8 with Q/DQ in float, as TensorRT computes it)",
        "",
        table(["model", "images", "argmax agreement %", "near-tie flips", "cosine", "max |Δlogit|"],
              [[label, verification["images"], v["agreement"], v.get("near_tie_flips", 0), f"{v['cosine']:.6f}",
                f"{v['max_abs_diff']:.3g}"]
               for label, v in ((label, verification[t]) for t, label in
                                (("fp32", "fp32"), ("int8", "int8"),
                                 ("int8_host", "int8, this CPU's fused kernels vs Q/DQ in float")) if t in verification)]),
        "",
        f"Bars: agreement ≥ {bars['agreement']:g} % (near-tie flips, where the logits moved by ≤ "
        f"{NEAR_TIE_TOLERANCE * 100:g} % of their spread, not counted), cosine ≥ {bars['cosine']:g}.",
    ]
    for tag in ("int8", "int8_host"):
        v = verification.get(tag) or {}
        if v.get("mode") == "statistics":
            (a, sa), (b, sb) = [(k, x) for k, x in v["statistics"].items() if k != "bars"]
            lines += ["", f"{tag}: below the bars image by image (rounding diverges through a deep model), but as "
                          f"accurate: {a} agrees with its FP32 on {sa['agreement_with_fp32']:.2f} % (KL "
                          f"{sa['kl_to_fp32']:.3g}), {b} on {sb['agreement_with_fp32']:.2f} % (KL {sb['kl_to_fp32']:.3g}); "
                          f"bars: within {v['statistics']['bars']['agreement_gap']:g} points and "
                          f"{v['statistics']['bars']['kl_ratio']:g}x."]
    cpu = record.get("cpu")
    if cpu:
        host = verification.get("int8_host")
        lines += ["", f"CPU kernels: model.int8.onnx is exact in ONNX Runtime on {', '.join(cpu['exact_on']) or 'none'}; "
                      f"this host is {cpu['host_isa']}" + (f", checked layer by layer ({host['kernels']['layers']} layers, "
                      f"largest relative difference {host['kernels']['max_rel_error']:.1e})." if host else ".")]
    acc = record.get("accuracy")
    if acc:
        lines += ["", f"## Accuracy on `{record['inputs']['eval_data']}` ({acc['images']} images, ONNX Runtime)", "",
                  table(["model", "top-1 %"], [["FP32", acc["fp32_top1"]]] +
                        ([["INT8", acc["int8_top1"]]] if "int8_top1" in acc else []))]
        if "agreement" in acc:
            lines += ["", f"INT8 ({acc.get('int8_computed_by', 'ONNX Runtime')}) predicts the same class as FP32 on "
                          f"{acc['agreement']:.2f} % of the images (KL(FP32 ‖ INT8) {acc['kl_to_fp32']:.3g})."]
        if "agreement_float_qdq" in acc:
            lines += [f"With Q/DQ evaluated in float: top-1 {acc['int8_float_qdq_top1']:.2f} %, agreement "
                      f"{acc['agreement_float_qdq']:.2f} %, KL {acc['kl_float_qdq_to_fp32']:.3g}."]
    recovery = record.get("recovery")
    if recovery:
        switches = [k for k in ("progressive", "lowrank", "softmax", "curriculum") if recovery["settings"][k]]
        rows = [["calibrated", _measured(recovery["before"])]] + \
               [[f"after {s['stage']} ({s['seconds']:.0f} s)", _measured(s.get("measured"))] for s in recovery["stages"]]
        lines += ["", f"## Recovery ({', '.join(switches) or 'reconstruction only'}; {recovery['settings']['iters']} "
                      f"steps per block and stage on {recovery['images']} images, {recovery['device']}, "
                      f"{recovery['seconds']:.0f} s)", "",
                  table(["PyTorch fake-quant model", "measured"], rows)]
    lines += ["", "## Layers", "",
              table(["layer", "role", "precision", "MACs/image", "input amax"],
                    [[l["name"], l["role"], l["precision"], l["macs"], _amax(l.get("input_amax"))] for l in record["layers"]]),
              ""]
    Path(path).write_text("\n".join(lines))
