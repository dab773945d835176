"""``vitdeploy bench``: latency, throughput, memory, size and top-1 of FP32 / FP16 / INT8 artifacts.

    result = run_bench(["engines/vit"], batches=[1, 8], threads=2, runs=100)
    print(markdown_table(result["rows"]))

Artifacts are ONNX files (run by ONNX Runtime on the CPU), TensorRT engines (``*.engine``, run by
`vitdeploy.runtime.TrtRunner` where TensorRT is installed, skipped with one line elsewhere) or a
build folder (all its ``model.*.onnx`` and ``*.engine``).

How it measures:

- every artifact runs in its **own fresh process** (multiprocessing, spawn), so its peak resident
  memory (``VmHWM``; ``ru_maxrss`` off Linux) is its own: the session (weights, pre-packed kernels, arena) plus the
  Python/NumPy/ONNX Runtime baseline every process pays. Engines report CUDA memory instead: the
  engine's device (activation) memory and the device memory the process measurably took;
- the processes are started one at a time, warmed up, then timed in **interleaved blocks**
  (A×5, B×5, C×5, A×5, ...), so that a change in machine load hits every artifact alike;
- latency is the wall time of one ``run`` (CUDA-event time for engines): median, p90 and p99 of
  ``runs`` timed runs per batch size; throughput = batch / median;
- speed-up and size ratio compare each row with the FP32 row of the same backend and batch.

The pure functions (`infer_precision`, `assemble_rows`, `markdown_table`, `bench_json`,
`plot_latency`) do the bookkeeping and are what the tests exercise.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..log import get_logger
from . import core

log = get_logger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
BACKEND_ORT = "onnxruntime"
BACKEND_TRT = "tensorrt"
DEFAULT_RUNS = 100
DEFAULT_WARMUP = 10
DEFAULT_BLOCK = 5
NO_TENSORRT = "TensorRT is not installed here (engines only run with the TensorRT and on the GPU that built them)"


@dataclasses.dataclass(frozen=True)
class Artifact:
    path: Path
    backend: str            # BACKEND_ORT or BACKEND_TRT
    precision: str          # fp32 | fp16 | int8
    size_bytes: int
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.path.name


@dataclasses.dataclass
class Measurement:
    """What one artifact's process reported for one batch size."""

    artifact: Artifact
    batch: int
    times_ms: List[float]
    memory_mb: Optional[float] = None
    top1: Optional[float] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------- inputs

def parse_batches(text: str) -> List[int]:
    """``"1,8"`` → ``[1, 8]`` (sorted, unique); InputError for anything but positive integers."""
    return core.parse_batches(text, InputError)


def default_threads() -> int:
    """Physical cores (ONNX Runtime's own default counts them too), at least 1."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return max(1, int(cores or os.cpu_count() or 1))


precision_from_name = core.precision_from_name


def precision_from_onnx(model) -> str:
    """From the graph: any QuantizeLinear (or INT8 weights behind a DequantizeLinear) → int8,
    FP16 initializers → fp16, else fp32."""
    import onnx

    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops or any(op.startswith("QLinear") for op in ops) \
            or "MatMulInteger" in ops or "ConvInteger" in ops:
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input):
        return "fp16"
    return "fp32"


def precision_from_engine_metadata(engine: Path) -> Optional[str]:
    """``precision.built`` of ``<engine>.json`` (``strongly-typed`` counts as int8 when it has Q/DQ)."""
    meta_path = Path(str(engine) + ".json")
    built = core.engine_precision(core.read_json(meta_path))
    if built in PRECISIONS:
        return built
    if built == "strongly-typed":
        return "int8" if "int8" in meta_path.name else None
    return None


def infer_precision(path: Path) -> str:
    """fp32 / fp16 / int8 of an artifact: its file name first, then the engine metadata or the graph."""
    path = Path(path)
    from_name = precision_from_name(path.name)
    if from_name:
        return from_name
    if path.suffix == ".engine":
        return precision_from_engine_metadata(path) or "fp32"
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises many types for a bad file
        raise InputError(f"cannot read ONNX model {path}: {str(exc).strip().splitlines()[0]}") from None
    return precision_from_onnx(model)


def artifact_size_bytes(path: Path) -> int:
    """File size, plus the external-data files an ONNX model points to."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix != ".onnx" or size > _INLINE_LIMIT:
        return size
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001
        return size
    locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    return size + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def discover(paths: Sequence[Path]) -> Tuple[List[Artifact], List[Path]]:
    """Artifacts for the given files and build folders, and the build folders seen.

    A folder contributes its ``model.*.onnx`` and ``*.engine`` files (FP32 first; `core.discover`, the
    device benchmark's too); InputError for a missing path, an unknown file type or a folder without any.
    """
    entries, folders = core.discover(paths, ("model.*.onnx", "*.engine"), (".onnx", ".engine"), InputError,
                                     empty="{folder} holds no model.*.onnx or *.engine to benchmark")
    return _unique_labels([_artifact(Path(e["path"])) for e in entries]), [Path(f) for f in folders]


def _artifact(path: Path) -> Artifact:
    backend = BACKEND_TRT if path.suffix == ".engine" else BACKEND_ORT
    return Artifact(path=path, backend=backend, precision=infer_precision(path), size_bytes=artifact_size_bytes(path))


_INLINE_LIMIT = 64 << 20  # a graph file this large holds its weights itself: no external data to add


def _unique_labels(artifacts: List[Artifact]) -> List[Artifact]:
    names = [a.path.name for a in artifacts]
    out = []
    for a in artifacts:
        label = a.path.name if names.count(a.path.name) == 1 else f"{a.path.parent.name}/{a.path.name}"
        out.append(dataclasses.replace(a, label=label))
    return out


def preprocessing_for(artifacts: Sequence[Artifact]) -> Dict[Path, dict]:
    """``{artifact path: build.json preprocessing}``: its own build.json, else the first one found."""
    from ..artifacts import read_json

    own = {}
    for a in artifacts:
        build_json = a.path.parent / "build.json"
        if build_json.is_file():
            try:
                own[a.path] = read_json(build_json)["preprocessing"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
    fallback = next(iter(own.values()), None)
    if fallback is None:
        raise InputError("--data needs the model's preprocessing: benchmark a build folder, or keep build.json "
                         "beside the ONNX files")
    return {a.path: own.get(a.path, fallback) for a in artifacts}


# --------------------------------------------------------------------------------------------- rows

def assemble_rows(measurements: Iterable[Measurement]) -> List[dict]:
    """One JSON-ready row per measurement, with speed-up and size ratio against the FP32 row of the
    same backend and batch (None when there is none)."""
    return core.add_ratios([core.make_row(m.artifact.precision, m.batch, m.artifact.size_bytes / core.MB, m.times_ms,
                                     top1=m.top1, memory_mb=m.memory_mb, artifact=str(m.artifact.path),
                                     label=m.artifact.name, backend=m.artifact.backend, **m.extra)
                       for m in measurements])


TABLE_HEADERS = ["artifact", "backend", "precision", "batch", "top-1 %", "size (MB)", "median (ms)", "p90 (ms)",
                 "p99 (ms)", "throughput (img/s)", "memory (MB)", "speed-up", "size ratio"]


def markdown_table(rows: Sequence[dict]) -> str:
    body = [[r.get("label") or Path(r["artifact"]).name, r["backend"], r["precision"].upper(), r["batch"], r["top1"],
             r["size_mb"], r["latency_ms"]["median"], r["latency_ms"]["p90"], r["latency_ms"]["p99"],
             r["throughput_ips"], r["memory_mb"], core.fmt(r["speedup_vs_fp32"], 2, "x"),
             core.fmt(r["size_ratio_vs_fp32"], 2, "x")]
            for r in rows]
    return core.markdown_table(TABLE_HEADERS, body)


def bench_json(rows: Sequence[dict], threads: int, device: str, **extra) -> dict:
    """The ``--json`` object: {"threads", "device", "rows": [...]} (plus any ``extra`` keys)."""
    keys = ("artifact", "backend", "precision", "batch", "top1", "size_mb", "latency_ms", "throughput_ips",
            "memory_mb", "speedup_vs_fp32", "size_ratio_vs_fp32")
    out_rows = []
    for r in rows:
        row = {k: r.get(k) for k in keys}
        row.update({k: v for k, v in r.items() if k not in keys and k != "label"})
        out_rows.append(row)
    return {"threads": threads, "device": device, "rows": out_rows, **extra}


def plot_latency(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Bar chart of median latency (whiskers to p99) per artifact, grouped by batch size; PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    batches = sorted({r["batch"] for r in rows})
    series: Dict[str, Dict[int, dict]] = {}
    for r in rows:
        name = f"{(r.get('label') or Path(r['artifact']).name)} ({r['precision'].upper()}, {r['backend']})"
        series.setdefault(name, {})[r["batch"]] = r
    fig = Figure(figsize=(max(6.0, 1.6 + 1.4 * len(batches) * max(1, len(series)) * 0.5), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(batches))
    for i, (name, by_batch) in enumerate(series.items()):
        med = [by_batch[b]["latency_ms"]["median"] if b in by_batch else np.nan for b in batches]
        p99 = [by_batch[b]["latency_ms"]["p99"] if b in by_batch else np.nan for b in batches]
        err = np.vstack([np.zeros(len(batches)), np.nan_to_num(np.asarray(p99) - np.asarray(med))])
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, med, width, yerr=err, capsize=3, label=name)
        for bar, b, top in zip(bars, batches, p99):
            speed = by_batch.get(b, {}).get("speedup_vs_fp32")
            if speed is not None and np.isfinite(bar.get_height()):
                y = top if np.isfinite(top) else bar.get_height()
                ax.annotate(f"{speed:.2f}x", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("latency, median (ms); whisker: p99")
    ax.set_title(title or "vitdeploy bench", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    return path


# --------------------------------------------------------------------------------------------- device

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def describe_device(threads: int, gpu: Optional[str] = None, backends: Iterable[str] = (BACKEND_ORT,)) -> str:
    parts = []
    backends = set(backends)
    if BACKEND_ORT in backends:
        import onnxruntime

        from ..cpu_isa import host_isa

        parts.append(f"CPU {cpu_name()} ({host_isa()}, {default_threads()} cores, {threads} intra-op threads), "
                     f"ONNX Runtime {onnxruntime.__version__}")
    if BACKEND_TRT in backends and gpu:
        parts.append(f"GPU {gpu}")
    return "; ".join(parts) or "unknown"


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


# --------------------------------------------------------------------------------------------- worker

def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _describe(exc: BaseException) -> str:
    """One line for the parent: the message of our own errors, type and message of anything else."""
    from ..errors import VitDeployError

    return _one_line(exc) if isinstance(exc, VitDeployError) else f"{type(exc).__name__}: {_one_line(exc)}"


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB).

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process image. Not
    ``ru_maxrss``: Linux carries that over fork + exec, so a spawned worker would report its
    parent's peak whenever the parent was bigger.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 1e6


def _cuda_free_bytes() -> Optional[int]:
    """Free device memory as CUDA reports it; None when it cannot tell (no CUDA, no Polygraphy)."""
    try:
        from ..trt.build_engine import cuda_free_bytes

        return cuda_free_bytes()
    except Exception:  # noqa: BLE001 - no CUDA, no driver: memory is simply unknown
        return None


def engine_device_memory_bytes(runner) -> Optional[int]:
    """The engine's own device (activation scratch) memory: TensorRT 10's ``device_memory_size_v2``
    or 8.x's ``device_memory_size``."""
    engine = getattr(runner, "engine", None)
    for attr in ("device_memory_size_v2", "device_memory_size"):
        value = getattr(engine, attr, None)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                continue
    return None


class _Worker:
    """State of one artifact inside its own process."""

    def __init__(self, backend: str, path: str, threads: int):
        self.backend, self.path, self.threads = backend, Path(path), threads
        self.runner = None
        self.cuda_free_before = None
        self.gpu = None

    def start(self) -> dict:
        if self.backend == BACKEND_TRT:
            from ..runtime import TrtRunner

            self.cuda_free_before = _cuda_free_bytes()
            self.runner = TrtRunner(self.path).__enter__()
            from ..trt.build_engine import cuda_device

            self.gpu = cuda_device()["name"]
        else:
            from ..backends.ort import OrtRunner

            self.runner = OrtRunner(self.path, threads=self.threads).__enter__()
        return {"gpu": self.gpu}

    def time(self, batch: int, runs: int, warmup: int) -> List[float]:
        return core.time_runner(self.runner, core.random_feed(self.runner, batch), warmup, runs)

    def memory(self) -> dict:
        if self.backend != BACKEND_TRT:
            return {"memory_mb": _peak_rss_mb()}
        engine = engine_device_memory_bytes(self.runner)
        free_now = _cuda_free_bytes()
        used = None if self.cuda_free_before is None or free_now is None else max(0, self.cuda_free_before - free_now)
        return {"memory_mb": None if used is None else used / 1e6,
                "engine_memory_mb": None if engine is None else engine / 1e6,
                "host_memory_mb": _peak_rss_mb()}

    def top1(self, data: str, preprocessing: dict, batch: int) -> Optional[float]:
        from ..artifacts import ModelSpec
        from ..data import load_images
        from .evaluate import predict

        images = load_images(Path(data), ModelSpec.from_dict(preprocessing), require_labels=True,
                             what="evaluation data")
        return predict(self.runner, images, batch, desc=f"top-1 {self.path.name}").top1

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.__exit__(None, None, None)
            self.runner = None


def _worker_main(conn, backend: str, path: str, threads: int) -> None:
    """Entry point of an artifact's process: answers commands from the parent until 'stop'."""
    from ..log import configure

    configure(progress=False)
    worker = _Worker(backend, path, threads)
    try:
        conn.send(("ok", worker.start()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which skips the artifact
        conn.send(("error", _describe(exc)))
        return
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:
            break
        if command == "stop":
            break
        try:
            conn.send(("ok", getattr(worker, command)(*args)))
        except BaseException as exc:  # noqa: BLE001
            conn.send(("error", _describe(exc)))
    worker.stop()


class _Process:
    """The parent's handle on one artifact's process."""

    def __init__(self, ctx, artifact: Artifact, threads: int):
        self.artifact = artifact
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, artifact.backend, str(artifact.path), threads),
                                daemon=True)
        self.proc.start()
        child.close()
        self.info = self.call()

    def call(self, *message):
        try:
            if message:
                self.conn.send(message)
            status, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.proc.join(timeout=5)
            code = self.proc.exitcode
            hint = "; killed, out of memory?" if code is not None and code in (-9, 137) else ""
            raise RuntimeError(f"its process died (exit code {code}{hint})") from None
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()


# --------------------------------------------------------------------------------------------- driver

def run_bench(paths: Sequence[Path], data: Optional[Path] = None, batches: Sequence[int] = (1,),
              threads: Optional[int] = None, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
              block: int = DEFAULT_BLOCK, png: Optional[Path] = None, top1_batch: int = 64) -> dict:
    """Benchmark every artifact in ``paths``; returns {"threads", "device", "rows", "skipped", "png"}.

    ``png``: where to draw the chart; default ``bench.png`` inside the build folder when exactly one
    folder is benchmarked, else no chart. Engines are skipped (with a message in "skipped") where
    TensorRT is absent; an artifact that fails to load or run is skipped the same way.
    """
    import multiprocessing

    if runs < 1 or warmup < 0 or block < 1:
        raise InputError("--runs must be >= 1 and --warmup >= 0")
    batches = sorted(set(int(b) for b in batches))
    threads = int(threads or default_threads())
    artifacts, folders = discover(paths)
    if data is not None and not Path(data).exists():
        raise InputError(f"evaluation data not found: {data}")
    skipped: List[str] = []
    if not tensorrt_available():
        for a in [a for a in artifacts if a.backend == BACKEND_TRT]:
            skipped.append(f"skipping {a.path}: {NO_TENSORRT}")
            log.warning(skipped[-1])
        artifacts = [a for a in artifacts if a.backend != BACKEND_TRT]
    preprocessing = preprocessing_for(artifacts) if data is not None and artifacts else {}

    ctx = multiprocessing.get_context("spawn")
    procs: List[_Process] = []
    measurements: List[Measurement] = []
    gpu = None
    try:
        for a in artifacts:  # one at a time: loading is memory- and CPU-hungry
            try:
                procs.append(_Process(ctx, a, threads))
                gpu = gpu or procs[-1].info.get("gpu")
            except RuntimeError as exc:
                skipped.append(f"skipping {a.path}: {exc}")
                log.warning(skipped[-1])
        for batch in batches:
            measurements += _time_interleaved(procs, batch, runs, warmup, block, skipped)
        top1 = {}
        if data is not None:
            for p in procs:
                try:
                    top1[p.artifact.path] = p.call("top1", str(data), preprocessing[p.artifact.path],
                                                   max(batches) if p.artifact.backend == BACKEND_TRT else top1_batch)
                except RuntimeError as exc:
                    skipped.append(f"no top-1 for {p.artifact.path}: {exc}")
                    log.warning(skipped[-1])
        for m in measurements:
            m.top1 = top1.get(m.artifact.path)
    finally:
        for p in procs:
            p.close()
    rows = assemble_rows(measurements)
    device = describe_device(threads, gpu, {a.backend for a in artifacts} or {BACKEND_ORT})
    if png is None and len(folders) == 1 and len(paths) == 1:
        png = folders[0] / "bench.png"
    if png is not None and rows:
        plot_latency(rows, Path(png), title=f"{device}")
    return {"threads": threads, "device": device, "rows": rows, "skipped": skipped,
            "png": str(png) if png is not None and rows else None, "runs": runs, "warmup": warmup}


def _time_interleaved(procs: List[_Process], batch: int, runs: int, warmup: int, block: int,
                      skipped: List[str]) -> List[Measurement]:
    """Warm every process up, then time them in turns of ``block`` runs until each has ``runs``;
    the turn order reverses every round so no artifact always runs right after the same one."""
    live, times = [], {}
    for p in procs:
        try:
            p.call("time", batch, 0, warmup)
            live.append(p)
            times[id(p)] = []
        except RuntimeError as exc:
            skipped.append(f"skipping {p.artifact.path} at batch {batch}: {exc}")
            log.warning(skipped[-1])
    done = 0
    round_index = 0
    while done < runs and live:
        n = min(block, runs - done)
        order = live if round_index % 2 == 0 else list(reversed(live))
        for p in list(order):
            try:
                times[id(p)] += p.call("time", batch, n, 0)
            except RuntimeError as exc:
                skipped.append(f"skipping {p.artifact.path} at batch {batch}: {exc}")
                log.warning(skipped[-1])
                live.remove(p)
        done += n
        round_index += 1
    out = []
    for p in live:
        try:
            memory = p.call("memory")
        except RuntimeError:
            memory = {"memory_mb": None}
        extra = {k: v for k, v in memory.items() if k != "memory_mb"}
        out.append(Measurement(p.artifact, batch, times[id(p)], memory.get("memory_mb"), extra=extra))
    return out
