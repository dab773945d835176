"""What every measurement shares: timing a runner, latency statistics, result rows, Markdown tables.

One definition for ``vitdeploy bench``, the demo, build reports and the device benchmark
(``benchmark.py`` in a deploy bundle, which carries this file as ``measure_core.py``). So it is
standalone: the standard library and NumPy only, Python 3.8 (the device's floor), no vitdeploy.

Runners are Polygraphy runners (``OnnxrtRunner``, ``TrtRunner`` and vitdeploy's subclasses):
``infer(feed_dict, check_inputs=False)`` and ``last_inference_time()`` in seconds.
"""

import glob
import json
import os
import re
import sys

MB = 1e6   # sizes and memory are in MB = 10^6 bytes everywhere


def parse_batches(text, error=ValueError):
    """``"1,8"`` -> ``[1, 8]`` (sorted, unique); ``error`` (an exception class) for anything else."""
    pieces = [p.strip() for p in str(text).split(",") if p.strip()]
    if not pieces or not all(p.isdigit() and int(p) >= 1 for p in pieces):
        raise error("--batch takes comma-separated positive integers (e.g. 1,8), got {!r}".format(text))
    return sorted({int(p) for p in pieces})


def read_json(path):
    """A JSON file as a dict, or None when it is missing, unreadable or not an object."""
    try:
        with open(str(path), "r") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def engine_precision(meta):
    """``precision.built`` of an engine's ``<engine>.json`` (int8 / fp16 / fp32 / strongly-typed), or None."""
    precision = (meta or {}).get("precision")
    built = precision.get("built") if isinstance(precision, dict) else None
    return built if isinstance(built, str) else None


# --------------------------------------------------------------------------------------------- discovery

PRECISIONS = ("fp32", "fp16", "int8")   # table order
_NAME_PRECISION = re.compile(r"(?:^|[._-])(fp32|fp16|int8)(?=[._-]|$)", re.IGNORECASE)


def precision_from_name(name):
    """``model.int8.onnx`` -> ``int8``: the last precision token in a file name, or None."""
    found = _NAME_PRECISION.findall(os.path.basename(str(name)))
    return found[-1].lower() if found else None


def discover(paths, patterns, suffixes, error=ValueError, empty="{folder} holds none of {patterns}"):
    """The artifacts to measure: in each folder of ``paths`` the files matching ``patterns``, and each file
    given that ends in one of ``suffixes``; every file once. ``(entries, folders)``; an entry has ``path``,
    ``file``, ``size_bytes``, ``meta`` (an engine's ``<engine>.json``, None if unreadable) and ``precision``
    (from the name, else the engine's metadata). A folder's files come in `PRECISIONS` order, the file
    named for its precision first. ``error`` (an exception class) for a missing path, a file of another
    kind or a folder holding none (``empty``, formatted with ``folder`` and ``patterns``)."""
    entries, folders, seen = [], [], set()
    for raw in paths:
        path = str(raw)
        if os.path.isdir(path):
            found = {f for p in patterns for f in glob.glob(os.path.join(path, p))
                     if os.path.isfile(f) and not os.path.basename(f).startswith(".")}
            if not found:
                raise error(empty.format(folder=path, patterns=", ".join(patterns)))
            folders.append(path)
            files = sorted((_entry(f) for f in found), key=_rank)
        elif os.path.isfile(path):
            if not path.endswith(tuple(suffixes)):
                raise error("cannot benchmark {}: expected {} or a folder of them".format(path, " / ".join(suffixes)))
            files = [_entry(path)]
        else:
            raise error("not found: {}".format(path))
        for entry in files:
            if os.path.realpath(entry["path"]) not in seen:
                seen.add(os.path.realpath(entry["path"]))
                entries.append(entry)
    return entries, folders


def _entry(path):
    meta = read_json(path + ".json") if path.endswith(".engine") else None
    return {"path": path, "file": os.path.basename(path), "size_bytes": os.path.getsize(path), "meta": meta,
            "precision": precision_from_name(path) or engine_precision(meta)}


def _rank(entry):
    precision = entry["precision"]
    return (PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS),
            precision_from_name(entry["file"]) is None, entry["file"])


# --------------------------------------------------------------------------------------------- timing


def time_runner(runner, feed, warmup, runs):
    """Per-run latencies (ms) of ``runs`` inferences after ``warmup`` untimed ones, as the runner clocks
    them (ONNX Runtime: the session's run; TensorRT: copies, execution, synchronisation)."""
    for _ in range(warmup):
        runner.infer(feed, check_inputs=False)
    times = []
    for _ in range(runs):
        runner.infer(feed, check_inputs=False)
        times.append(runner.last_inference_time() * 1e3)
    return times


def percentile(ordered, q):
    """Linear-interpolation percentile of a sorted list (NumPy's default method)."""
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_stats(times_ms):
    """``{"median", "p90", "p99"}`` of per-run latencies in ms."""
    ordered = sorted(float(t) for t in times_ms)
    if not ordered:
        raise ValueError("no timings")
    return {"median": percentile(ordered, 50), "p90": percentile(ordered, 90), "p99": percentile(ordered, 99)}


def make_row(precision, batch, size_mb, times_ms, top1=None, memory_mb=None, **extra):
    """One result row, the shape ``bench`` and the device benchmark both write (ratios: `add_ratios`)."""
    latency = latency_stats(times_ms)
    row = {"precision": precision, "batch": int(batch), "top1": top1, "size_mb": size_mb, "latency_ms": latency,
           "throughput_ips": batch * 1e3 / latency["median"] if latency["median"] > 0 else None,
           "memory_mb": memory_mb, "speedup_vs_fp32": None, "size_ratio_vs_fp32": None}
    row.update(extra)
    return row


def add_ratios(rows):
    """Fill ``speedup_vs_fp32`` (FP32 median / this median) and ``size_ratio_vs_fp32`` (FP32 size / this
    size) from the first FP32 row of the same backend (when rows name one) and batch; None without one.
    In place, also returned."""
    reference = {}
    for row in rows:
        if row.get("precision") == "fp32":
            reference.setdefault((row.get("backend"), row.get("batch")), row)
    for row in rows:
        ref = reference.get((row.get("backend"), row.get("batch"))) or {}
        median, ref_median = (row.get("latency_ms") or {}).get("median"), (ref.get("latency_ms") or {}).get("median")
        row["speedup_vs_fp32"] = ref_median / median if ref_median and median else None
        size, ref_size = row.get("size_mb"), ref.get("size_mb")
        row["size_ratio_vs_fp32"] = ref_size / size if ref_size and size else None
    return rows


# --------------------------------------------------------------------------------------------- tables


def missing_mark(stream=None):
    """What a table shows for "no value": an em dash, or "-" where ``stream`` (stdout) cannot encode it
    (a C locale, e.g. a service or container without UTF-8)."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        "\u2014".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "-"
    return "\u2014"


def fmt(value, digits=2, suffix="", missing="\u2014"):
    """A table cell: None -> ``missing``, floats to ``digits`` decimals, anything else as str."""
    if value is None:
        return missing
    if isinstance(value, float):
        return "{:.{}f}{}".format(value, digits, suffix)
    return "{}{}".format(value, suffix)


def markdown_table(headers, rows, missing="\u2014"):
    """A GitHub-flavoured Markdown table (also plain text in a terminal): first column left-aligned,
    the others right-aligned; cells through `fmt`; a "|" inside a cell escaped, or it would split it."""
    cells = [[str(h).replace("|", "\\|") for h in headers]]
    cells += [[fmt(c, missing=missing).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def image_input(runner):
    """``(name, shape, numpy dtype)`` of an active runner's one input; None for each dynamic dimension."""
    from polygraphy.datatype import DataType

    meta = runner.get_input_metadata(use_numpy_dtypes=False)
    if len(meta) != 1:
        raise ValueError("{}: {} inputs; vitdeploy models take one image batch".format(runner.name, len(meta)))
    (name, (dtype, shape)), = meta.items()
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
    return name, dims, DataType.to_dtype(DataType.from_dtype(dtype), "numpy")


def random_feed(runner, batch, seed=0):
    """``{input: batch}`` of standard-normal values in the input's dtype, for timing; ValueError when the
    input is not one image batch of fixed sample shape that takes ``batch``."""
    import numpy as np

    name, shape, dtype = image_input(runner)
    if not shape:
        raise ValueError("input '{}' is a scalar, not a batch of images".format(name))
    if shape[0] is not None and shape[0] != batch:
        raise ValueError("input '{}' has a fixed batch of {}".format(name, shape[0]))
    if any(d is None for d in shape[1:]):
        raise ValueError("input '{}' has dynamic dimensions besides the batch: {}".format(name, list(shape)))
    return {name: np.random.default_rng(seed).standard_normal((batch,) + shape[1:]).astype(dtype)}
