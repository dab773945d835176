#!/usr/bin/env python3
"""Build a TensorRT engine from an ONNX model, on the device that will run it, through Polygraphy.

    python3 build_engine.py model.onnx --out model.engine [--precision int8|fp16|fp32]
        [--strongly-typed] [--layernorm-fp32] [--workspace MiB] [--dla CORE] [--timing-cache FILE]
        [--trt-calibrator entropy --calib calib.npy [--calib-cache FILE [--reuse-calib-cache]]]
        [--min-batch 1 --opt-batch 1 --max-batch 8] [--input-name input]
        [--meta model.engine.json] [--preprocessing build.json]

Engines only run on the GPU model and TensorRT version they were built with, so this script is
copied into every deploy bundle and runs on the Jetson or GPU machine itself. Polygraphy (NVIDIA's
own, ``pip install "polygraphy>=0.49.9,<0.54"``, Python >= 3.8; ``jetson/setup.sh`` installs it)
parses, configures, calibrates, builds and saves; what is ours is the plan -- which precision,
calibrator, pins, profile and DLA core this TensorRT and GPU can honour -- and ``model.engine.json``.
Supported: TensorRT 8.5 (JetPack 5.1) to 11. JetPack 4.6 (TX2: TensorRT 8.2, Python 3.6, no fast
INT8) is below what Polygraphy runs on: build the FP16 engine there with the bundle's trtexec.txt.

``--trt-calibrator entropy`` really calibrates (TensorRT's IInt8EntropyCalibrator2, TensorRT <= 10)
on ``--calib``; the cache it writes (``--calib-cache``) is read back only with ``--reuse-calib-cache``,
never silently, so ``model.engine.json`` saying "entropy" means the entropy algorithm ran.

Exit codes: 0 built; 2 a problem with the arguments or the machine (no TensorRT, no Polygraphy),
in one line; 1 TensorRT failed to parse or build the model.
"""

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

#: Identifies the layout of ``model.engine.json`` (validated by ``vitdeploy.runtime``).
METADATA_SCHEMA = "vitdeploy.engine/1"
#: The Polygraphy releases this script is written against (0.49.9 is the first with strongly typed networks).
POLYGRAPHY_SPEC = "polygraphy>=0.49.9,<0.54"
NO_TENSORRT_MESSAGE = ("TensorRT not found (cannot import tensorrt): engines are built and run on the device they "
                       "are for (Jetson or GPU machine with TensorRT; jetson/setup.sh prepares it), not here")
NO_POLYGRAPHY_MESSAGE = ("Polygraphy not found: pip install '{}' (Python >= 3.8; jetson/setup.sh does it); on "
                         "JetPack 4.6 build with trtexec (trtexec.txt)".format(POLYGRAPHY_SPEC))
MIB = 1 << 20
EXIT_OK, EXIT_BUILD_FAILED, EXIT_USAGE = 0, 1, 2
PRECISIONS = ("int8", "fp16", "fp32")


class UsageError(Exception):
    """A problem with the arguments, the files or the machine (exit 2, one line)."""


class BuildFailed(Exception):
    """TensorRT could not parse or build the model (exit 1); the device benchmark's failures are ones too."""


def warn(message):
    sys.stderr.write("warning: " + message + "\n")


def report_error(exc):
    """One ``error:`` line on stderr; the exit code of a `UsageError` (2) or a `BuildFailed` (1)."""
    sys.stderr.write("error: {}\n".format(exc))
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_BUILD_FAILED


def write_atomic(path, data):
    """Write to a temporary file next to ``path``, then rename: nobody ever sees half an engine."""
    data = data if isinstance(data, bytes) else data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def version_tuple(version):
    """``"10.3.0.26" -> (10, 3, 0, 26)``; parsing stops at the first part that is not a number."""
    parts = []
    for piece in str(version).split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group(0)))
    return tuple(parts)


# ---------------------------------------------------------------------------------------------
# What this TensorRT and GPU can do, and the plan (pure: plain data in, plain data out)
# ---------------------------------------------------------------------------------------------


def detect_api(trt):
    """The few facts the plan needs from the ``tensorrt`` module (Polygraphy handles the rest)."""
    flags = getattr(trt, "BuilderFlag", None)
    weak = hasattr(flags, "INT8") or hasattr(flags, "FP16")  # TensorRT 11 removed weak typing
    version = str(getattr(trt, "__version__", "unknown"))
    return {
        "version": version,
        "strongly_typed_only": not weak,
        "strongly_typed_available": version_tuple(version)[:1] >= (10,) or not weak,
        "implicit_int8": weak and hasattr(trt, "IInt8EntropyCalibrator2"),
        "implicit_int8_deprecated": version_tuple(version)[:2] >= (10, 1),
        "dla": hasattr(getattr(trt, "DeviceType", None), "DLA"),
    }


def query_platform(builder):
    """Fast INT8/FP16 and DLA cores as this TensorRT reports them; None = unknown (11 removed the queries)."""
    def read(name):
        try:
            value = getattr(builder, name, None)
        except Exception:  # a property TensorRT refuses to compute is "unknown"
            value = None
        return value

    cores = read("num_DLA_cores")
    return {"has_fast_int8": read("platform_has_fast_int8"), "has_fast_fp16": read("platform_has_fast_fp16"),
            "num_dla_cores": int(cores) if cores is not None else None}


@dataclass
class BuildPlan:
    """Everything `build` does, decided before TensorRT is touched (see `plan_build`)."""

    requested_precision: str = "int8"
    precision: str = "int8"           # built: int8, fp16, fp32 or strongly-typed (the ONNX's types decide)
    strongly_typed: bool = False
    fp16: bool = False                # builder flags for a weakly typed network
    int8: bool = False
    calibrate: bool = False           # run IInt8EntropyCalibrator2 on --calib
    reuse_calib_cache: bool = False   # hand --calib-cache to TensorRT instead of calibrating
    pin_layernorm_fp32: bool = False  # with precision_constraints="obey"
    workspace_bytes: Optional[int] = None
    dla_core: Optional[int] = None
    batch: Tuple[int, int, int] = (1, 1, 8)
    timing_cache: Optional[str] = None
    warnings: List[str] = field(default_factory=list)

    def as_dict(self):
        return asdict(self)


def _batch(args):
    low = args.min_batch if args.min_batch is not None else 1
    opt = args.opt_batch if args.opt_batch is not None else low
    high = args.max_batch if args.max_batch is not None else max(8, opt)
    if not 1 <= low <= opt <= high:
        raise UsageError("batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                         "{} / {} / {}".format(low, opt, high))
    return low, opt, high


def _calibration(args, caps, strongly_typed, precision, notes):
    """``(calibrate, reuse cache)``; UsageError when implicit INT8 cannot run here."""
    if not args.trt_calibrator:
        if args.calib or args.calib_cache or args.reuse_calib_cache:
            notes.append("--calib/--calib-cache are ignored without --trt-calibrator entropy")
        return False, False
    if not caps["implicit_int8"]:
        raise UsageError("TensorRT {} has no IInt8EntropyCalibrator2 (implicit INT8 was removed in TensorRT 11): "
                         "build the QDQ ONNX instead".format(caps["version"]))
    if strongly_typed:
        raise UsageError("--trt-calibrator needs a weakly typed network: drop --strongly-typed, or build the QDQ ONNX")
    if precision != "int8":
        raise UsageError("--trt-calibrator calibrates INT8: it needs --precision int8, got " + precision)
    reuse = bool(args.reuse_calib_cache)
    if reuse and not (args.calib_cache and os.path.isfile(args.calib_cache) and os.path.getsize(args.calib_cache)):
        raise UsageError("--reuse-calib-cache: no calibration cache at --calib-cache {}".format(args.calib_cache))
    if not reuse and not args.calib:
        raise UsageError("--trt-calibrator entropy needs --calib calib.npy (float32 N x C x H x W, preprocessed), "
                         "or --calib-cache FILE --reuse-calib-cache")
    if caps["implicit_int8_deprecated"]:
        notes.append("implicit INT8 calibration (IInt8EntropyCalibrator2) is deprecated since TensorRT 10.1 and "
                     "removed in 11: prefer the QDQ ONNX")
    return True, reuse


def plan_build(args, caps, platform=None):
    """Decide precision, calibration, pins, memory, DLA and profile; UsageError for what cannot be honoured."""
    platform = platform or {}
    notes = []
    batch = _batch(args)
    if args.strongly_typed and not caps["strongly_typed_available"]:
        raise UsageError("--strongly-typed needs TensorRT 10 or newer (this is {})".format(caps["version"]))
    strongly_typed = bool(args.strongly_typed) or caps["strongly_typed_only"]
    requested = args.precision or "int8"
    if caps["strongly_typed_only"] and args.precision not in (None, "int8"):
        notes.append("TensorRT {} builds strongly typed networks only: --precision {} is ignored, the ONNX's types "
                     "decide".format(caps["version"], args.precision))
    calibrate, reuse = _calibration(args, caps, strongly_typed, requested, notes)
    precision = "strongly-typed" if strongly_typed else requested
    if precision == "int8" and platform.get("has_fast_int8") is False:
        notes.append("this GPU has no fast INT8 (e.g. Jetson TX2, sm_62): building an FP16 engine instead"
                     + ("; calibration skipped" if calibrate else ""))
        precision, calibrate, reuse = "fp16", False, False
    if precision in ("int8", "fp16") and platform.get("has_fast_fp16") is False:
        notes.append("this GPU has no fast FP16: TensorRT will keep most non-INT8 layers in FP32")
    pin = bool(args.layernorm_fp32) and precision in ("int8", "fp16")
    if args.layernorm_fp32 and strongly_typed:
        notes.append("--layernorm-fp32 is ignored for a strongly typed network: it keeps the ONNX's types")
    if args.workspace is not None and args.workspace <= 0:
        raise UsageError("--workspace must be a positive number of MiB")
    dla = _dla(args, caps, platform, precision, batch, notes)
    return BuildPlan(
        requested_precision=requested, precision=precision, strongly_typed=strongly_typed,
        # INT8 engines keep what has no Q/DQ (softmax, GELU, LayerNorm) in FP16, not FP32.
        fp16=precision in ("int8", "fp16") and platform.get("has_fast_fp16") is not False,
        int8=precision == "int8", calibrate=calibrate, reuse_calib_cache=reuse, pin_layernorm_fp32=pin,
        workspace_bytes=args.workspace * MIB if args.workspace else None, dla_core=dla, batch=batch,
        timing_cache=args.timing_cache, warnings=notes)


def _dla(args, caps, platform, precision, batch, notes):
    if args.dla is None:
        return None
    if not caps["dla"]:
        raise UsageError("--dla: TensorRT {} has no DLA support".format(caps["version"]))
    cores = platform.get("num_dla_cores")
    if args.dla < 0 or (cores is not None and args.dla >= cores):
        raise UsageError("--dla {}: this device has {} DLA core(s)".format(args.dla, cores if cores is not None
                                                                        else "an unknown number of"))
    if precision == "fp32":
        raise UsageError("DLA runs FP16 and INT8 only: use --precision fp16 or int8 with --dla")
    if batch[0] != batch[2]:
        notes.append("DLA does not take dynamic shapes: use --min-batch = --opt-batch = --max-batch for a DLA "
                     "engine, or expect layers to fall back to the GPU")
    return args.dla


# ---------------------------------------------------------------------------------------------
# Pure helpers on TensorRT-shaped records
# ---------------------------------------------------------------------------------------------


def _readers(records, tensor, layer_type, also_reads=None):
    return [r for r in records if tensor in r["inputs"] and r["type"] == layer_type
            and (also_reads is None or also_reads in r["inputs"])]


def _decomposed_layernorm_at(mean, records):
    """The 7 layers of ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` from its first REDUCE, or []."""
    x, m = mean["inputs"][0], mean["outputs"][0]
    for sub in _readers(records, m, "ELEMENTWISE", also_reads=x):
        diff = sub["outputs"][0]
        for square in _readers(records, diff, "ELEMENTWISE"):
            for var in _readers(records, square["outputs"][0], "REDUCE"):
                for eps in _readers(records, var["outputs"][0], "ELEMENTWISE"):
                    for sqrt in _readers(records, eps["outputs"][0], "UNARY"):
                        for div in _readers(records, sqrt["outputs"][0], "ELEMENTWISE", also_reads=diff):
                            return [mean, sub, square, var, eps, sqrt, div]
    return []


def find_layernorm_layers(records):
    """Indices of LayerNorm layers: NORMALIZATION (opset 17, TensorRT 8.6+) or the decomposed pattern older
    parsers produce, whose Pow/ReduceMean overflow in FP16 on ViT activations -- the reason to pin them.

    ``records``: ``{"index", "name", "type" (LayerType name), "inputs", "outputs" (tensor names)}`` per layer.
    """
    picked = set()
    for record in records:
        if record["type"] == "NORMALIZATION":
            picked.add(record["index"])
        elif record["type"] == "REDUCE" and record["inputs"] and record["outputs"]:
            picked.update(r["index"] for r in _decomposed_layernorm_at(record, records))
    return sorted(picked)


_PRECISION_WORDS = {"fp32": "fp32", "float": "fp32", "fp16": "fp16", "half": "fp16", "bf16": "bf16",
                    "int8": "int8", "fp8": "fp8", "int32": "int32", "int64": "int64", "bool": "bool"}


def _tensor_precision(tensor):
    """``"Row major linear FP32"`` / ``"... Int8 format"`` (8.x, 10.x) or ``{"DataType": "Half"}`` (11)."""
    text = (tensor.get("DataType") or tensor.get("Format/Datatype") or "") if isinstance(tensor, dict) else ""
    for word in re.findall(r"[A-Za-z0-9]+", str(text)):
        if word.lower() in _PRECISION_WORDS:
            return _PRECISION_WORDS[word.lower()]
    return None


def layer_precisions_from_inspector(info):
    """``[{"name", "type", "precision"}]`` from the engine inspector's JSON (precision of the outputs,
    ``"fp16+fp32"`` when mixed; None without detailed profiling, where layers are bare names)."""
    info = json.loads(info) if isinstance(info, str) else info
    layers = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            layers.append({"name": str(layer), "type": None, "precision": None})
            continue
        found = sorted({p for p in map(_tensor_precision, layer.get("Outputs") or []) if p})
        layers.append({"name": str(layer.get("Name", "")), "type": layer.get("LayerType"),
                       "precision": "+".join(found) or None})
    return layers


def load_calibration_array(path, sample_shape):
    """calib.npy (memory-mapped) as N x ``sample_shape`` floats; UsageError otherwise."""
    import numpy as np

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError("cannot read --calib {}: {}".format(path, exc))
    if (array.ndim != len(sample_shape) + 1 or not len(array) or not np.issubdtype(array.dtype, np.floating)
            or tuple(array.shape[1:]) != tuple(sample_shape)):
        raise UsageError("--calib {} must hold float32 N x {} preprocessed images, got {} {}".format(
            path, " x ".join(map(str, sample_shape)), array.dtype, list(array.shape)))
    return array


def calibration_batches(array, name, batch):
    """What Polygraphy's Calibrator reads: ``{name: float32 batch}`` in whole batches of ``batch``."""
    import numpy as np

    if len(array) < batch:
        raise UsageError("--calib has {} sample(s), fewer than one calibration batch of {}".format(len(array), batch))
    if len(array) % batch:
        warn("calibration uses {} of {} samples (whole batches of {})".format(len(array) - len(array) % batch,
                                                                              len(array), batch))
    for begin in range(0, len(array) - batch + 1, batch):
        yield {name: np.ascontiguousarray(array[begin:begin + batch], dtype=np.float32)}


def make_metadata(args, trt_version, device, plan, inputs, outputs, layers, pinned, dynamic, preprocessing,
                  calibrator):
    """The ``model.engine.json`` record (`METADATA_SCHEMA`); tensors are ``{"name", "shape", "dtype"}``."""
    return {
        "schema": METADATA_SCHEMA,
        "engine": os.path.basename(args.out),
        "onnx": os.path.basename(args.onnx),
        "built_at": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "tensorrt_version": str(trt_version),
        "device": device,
        "precision": {
            "requested": plan.requested_precision, "built": plan.precision, "strongly_typed": plan.strongly_typed,
            "builder_flags": [f for f, on in (("FP16", plan.fp16), ("INT8", plan.int8)) if on],
            "layernorm_fp32": plan.pin_layernorm_fp32, "pinned_fp32_layers": pinned,
            "calibrator": calibrator, "dla_core": plan.dla_core,
        },
        "inputs": inputs,
        "outputs": outputs,
        "batch_profile": dict(zip(("min", "opt", "max"), plan.batch)) if dynamic else None,
        "layers": layers,
        "preprocessing": preprocessing,
        "warnings": list(plan.warnings),
    }


# ---------------------------------------------------------------------------------------------
# TensorRT, through Polygraphy
# ---------------------------------------------------------------------------------------------


def import_backend():
    """``(tensorrt, polygraphy.backend.trt)``, imported only when building so ``--help`` works anywhere."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UsageError(NO_TENSORRT_MESSAGE)
    try:
        from polygraphy.backend import trt as pg
    except ImportError:
        raise UsageError(NO_POLYGRAPHY_MESSAGE)
    return trt, pg


def _records(network):
    records = []
    for i, layer in enumerate(network):
        tensors = lambda n, get: [t.name for t in (get(j) for j in range(n)) if t is not None]  # noqa: E731
        records.append({"index": i, "name": layer.name, "type": layer.type.name,
                        "inputs": tensors(layer.num_inputs, layer.get_input),
                        "outputs": tensors(layer.num_outputs, layer.get_output)})
    return records


def _pin_fp32(trt, network, indices):
    """Compute and outputs of these layers in FP32 (obeyed under precision constraints); their names."""
    names = []
    for index in indices:
        layer = network.get_layer(index)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        names.append(layer.name)
    return names


def _inputs(network, args):
    """``(name, shape)`` of the one image input; UsageError for anything else the profile cannot cover."""
    inputs = [(network.get_input(i).name, [int(d) for d in network.get_input(i).shape])
              for i in range(network.num_inputs)]
    chosen = [t for t in inputs if t[0] == args.input_name] if args.input_name else inputs
    if len(chosen) != 1:
        raise UsageError("--input-name {!r}: the network's inputs are {}".format(args.input_name, [n for n, _ in inputs])
                         if args.input_name else "the network has {} inputs; vitdeploy engines take one image "
                         "batch".format(len(inputs)))
    name, shape = chosen[0]
    if any(d < 0 for d in shape[1:]):
        raise UsageError("input '{}' has dynamic dimensions beyond the batch {}: export it with a fixed image "
                         "size".format(name, shape))
    return name, shape


def engine_loader(trt, pg, path, dla_core=None):
    """A Polygraphy loader of the serialized engine at ``path``, deserialized on ``dla_core`` when it was built
    for one (its runtime must name the core): what TrtRunner takes."""
    from polygraphy.backend.common import BytesFromPath

    def runtime():
        rt = trt.Runtime(pg.get_trt_logger())
        if dla_core is not None:
            rt.DLA_core = dla_core
        return rt

    return pg.EngineFromBytes(BytesFromPath(path), runtime=runtime)


def cuda_device():
    """``{"name", "compute_capability"}`` of CUDA device 0, from the libcudart Polygraphy loads."""
    import ctypes

    from polygraphy import cuda

    handle = cuda.wrapper().handle
    props, major, minor = ctypes.create_string_buffer(4096), ctypes.c_int(), ctypes.c_int()
    # cudaDeviceProp starts with char name[256] in every CUDA release; 75/76 are the compute capability.
    named = handle.cudaGetDeviceProperties(props, 0) == 0
    handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)
    handle.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)
    return {"name": props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if named else None,
            "compute_capability": [major.value, minor.value] if major.value else None}


def cuda_free_bytes():
    """Free device memory (``cudaMemGetInfo`` of the libcudart Polygraphy loads), or None."""
    import ctypes

    from polygraphy import cuda

    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cuda.wrapper().handle.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return free.value


def engine_io(trt, engine):
    """``(inputs, outputs)``, each ``[{"name", "shape" (-1 = dynamic), "dtype"}]``, of an engine."""
    io = ([], [])
    for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
        io[engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT].append(
            {"name": name, "shape": [int(d) for d in engine.get_tensor_shape(name)],
             "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1].lower()})
    return io


def build(args, preprocessing=None):
    """Parse, configure, (calibrate,) build, inspect and save; returns ``(plan, metadata)``."""
    trt, pg = import_backend()
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if args.verbose else G_LOGGER.INFO
    caps = detect_api(trt)
    plan = plan_build(args, caps, query_platform(trt.Builder(pg.get_trt_logger())))
    for note in plan.warnings:
        warn(note)
    try:
        builder, network, parser = pg.NetworkFromOnnxPath(os.path.abspath(args.onnx),
                                                          strongly_typed=plan.strongly_typed or None)()
    except Exception as exc:  # Polygraphy reports every parser error before failing
        raise BuildFailed("TensorRT's ONNX parser rejected {}: {}".format(args.onnx, exc))
    name, shape = _inputs(network, args)
    records = _records(network)
    has_qdq = any(r["type"] in ("QUANTIZE", "DEQUANTIZE") for r in records)
    if plan.int8 and not plan.calibrate and not has_qdq:
        warn("INT8 requested but the ONNX has no Q/DQ nodes and no --trt-calibrator was given: layers will run in "
             "FP16/FP32")
    elif not plan.strongly_typed and plan.precision != "int8" and has_qdq:
        warn("the ONNX has Q/DQ nodes but the engine is built in {}: build from the FP32 ONNX".format(plan.precision))
    pinned = _pin_fp32(trt, network, find_layernorm_layers(records)) if plan.pin_layernorm_fp32 else []
    if plan.pin_layernorm_fp32 and not pinned:
        warn("--layernorm-fp32: no LayerNormalization (or decomposed LayerNorm) found in the network")

    dynamic = shape[0] < 0
    if not dynamic and args.max_batch is not None and args.max_batch != shape[0]:
        warn("the ONNX has a fixed batch of {}: the batch profile is ignored".format(shape[0]))
    rest = tuple(shape[1:])
    profile = pg.Profile().add(name, *[(b,) + rest for b in plan.batch]) if dynamic else pg.Profile()
    calibrator, cache_tmp = None, None
    if plan.calibrate:
        batch = plan.batch[1] if dynamic else shape[0]  # TensorRT calibrates at the profile's opt shape
        if plan.reuse_calib_cache:
            calibrator = pg.Calibrator([], cache=args.calib_cache, BaseClass=trt.IInt8EntropyCalibrator2)
        else:
            # A fresh, empty cache file: Polygraphy's calibrator returns any non-empty cache to TensorRT, which
            # then skips calibrating. Renamed over --calib-cache only after a successful build.
            fd, cache_tmp = tempfile.mkstemp(suffix=".calib.tmp", dir=os.path.dirname(os.path.abspath(args.out)))
            os.close(fd)
            data = calibration_batches(load_calibration_array(args.calib, rest), name, batch)
            calibrator = pg.Calibrator(data, cache=cache_tmp, BaseClass=trt.IInt8EntropyCalibrator2)
    config = pg.CreateConfig(
        fp16=plan.fp16, int8=plan.int8, profiles=[profile], calibrator=calibrator,
        precision_constraints="obey" if pinned else None, load_timing_cache=plan.timing_cache,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes} if plan.workspace_bytes else None,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED, use_dla=plan.dla_core is not None,
        allow_gpu_fallback=plan.dla_core is not None)
    if plan.dla_core:  # Polygraphy always picks DLA core 0
        config = pg.PostprocessConfig(config, lambda _b, _n, c: setattr(c, "DLA_core", plan.dla_core))
    try:
        try:
            engine = pg.EngineFromNetwork((builder, network, parser), config,
                                          save_timing_cache=plan.timing_cache)()
        except Exception as exc:
            raise BuildFailed("TensorRT could not build the engine ({}; its messages above say why)".format(
                str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__))
        if cache_tmp and os.path.getsize(cache_tmp) and args.calib_cache:
            os.replace(cache_tmp, args.calib_cache)
    finally:
        if cache_tmp and os.path.exists(cache_tmp):
            os.unlink(cache_tmp)

    try:
        inspector = engine.create_engine_inspector()
        layers = layer_precisions_from_inspector(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # noqa: BLE001 - the metadata is still useful without the layer table
        warn("engine inspector failed ({}): no per-layer precisions in the metadata".format(exc))
        layers = None
    calibrated = None
    if plan.calibrate:
        calibrated = "entropy (cache {} reused)".format(args.calib_cache) if plan.reuse_calib_cache else "entropy"
    meta = make_metadata(args, trt.__version__, cuda_device(), plan, *engine_io(trt, engine), layers, pinned, dynamic,
                         preprocessing, calibrated)
    write_atomic(args.out, bytes(engine.serialize()))
    write_atomic(args.meta, json.dumps(meta, indent=2) + "\n")
    return plan, meta


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="build_engine.py",
        description="Build a TensorRT engine (and model.engine.json) from an ONNX model with Polygraphy, on the "
                    "device that runs it. Engines only run on the GPU model and TensorRT version they were built "
                    "with.")
    p.add_argument("onnx", help="ONNX model (QDQ INT8, or FP32 for FP16/FP32 engines and --trt-calibrator)")
    p.add_argument("--out", required=True, help="engine file to write (model.engine)")
    p.add_argument("--meta", help="metadata JSON to write (default: <out>.json)")
    g = p.add_argument_group("precision")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="int8 (default; INT8 + FP16 flags, FP16 on GPUs without fast INT8), fp16 or fp32; ignored "
                        "for strongly typed networks")
    g.add_argument("--strongly-typed", action="store_true",
                   help="strongly typed network (TensorRT 10+): the ONNX's types are the precisions; always in 11")
    g.add_argument("--layernorm-fp32", action="store_true", help="pin LayerNorm to FP32 (precision constraints)")
    g.add_argument("--trt-calibrator", choices=("entropy",),
                   help="implicit INT8 calibration with IInt8EntropyCalibrator2 (TensorRT <= 10; deprecated)")
    g.add_argument("--calib", help="calibration data: .npy float32 N x C x H x W, preprocessed")
    g.add_argument("--calib-cache", help="where the calibration writes TensorRT's cache")
    g.add_argument("--reuse-calib-cache", action="store_true",
                   help="hand --calib-cache to TensorRT instead of calibrating (only when asked)")
    g = p.add_argument_group("shapes")
    g.add_argument("--min-batch", type=int, help="smallest batch of the profile (default 1)")
    g.add_argument("--opt-batch", type=int, help="batch TensorRT tunes (and calibrates) for (default: --min-batch)")
    g.add_argument("--max-batch", type=int, help="largest batch of the profile (default 8)")
    g.add_argument("--input-name", help="the image input (default: the model's only input)")
    g = p.add_argument_group("build")
    g.add_argument("--workspace", type=int, metavar="MiB", help="workspace memory limit in MiB")
    g.add_argument("--dla", type=int, metavar="CORE", help="build for this DLA core (GPU fallback on)")
    g.add_argument("--timing-cache", metavar="FILE", help="timing cache to load and update (faster rebuilds)")
    g.add_argument("--preprocessing", metavar="BUILD_JSON", help="copy this build.json's 'preprocessing' record")
    g.add_argument("--verbose", action="store_true", help="Polygraphy's and TensorRT's verbose log")
    return p


def parse_args(argv=None):
    args = build_arg_parser().parse_args(argv)
    args.meta = args.meta or args.out + ".json"
    return args


def _check_files(args):
    """Inputs exist and output folders are there, before minutes are spent in TensorRT."""
    for option, path in (("ONNX model", args.onnx), ("--calib", args.calib), ("--preprocessing", args.preprocessing)):
        if path and not os.path.isfile(path):
            raise UsageError("{} not found: {}".format(option, path))
    for path in (args.out, args.meta):
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError("output folder does not exist: " + os.path.dirname(os.path.abspath(path)))


def read_preprocessing(path):
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError("cannot read --preprocessing {}: {}".format(path, exc))
    if not isinstance(record, dict) or not isinstance(record.get("preprocessing"), dict):
        raise UsageError("--preprocessing {} has no 'preprocessing' object".format(path))
    return record["preprocessing"]


def main(argv=None):
    """Returns the exit code: 0 built, 1 TensorRT failed, 2 arguments or machine."""
    args = parse_args(argv)
    try:
        _check_files(args)
        plan, meta = build(args, read_preprocessing(args.preprocessing) if args.preprocessing else None)
    except (UsageError, BuildFailed) as exc:
        return report_error(exc)
    cc = meta["device"]["compute_capability"]
    batch = meta["batch_profile"]
    print("built {} ({:.1f} MiB, {}, {}) with TensorRT {} on {}{}; metadata in {}".format(
        args.out, os.path.getsize(args.out) / MIB, plan.precision,
        "batch {}-{}".format(batch["min"], batch["max"]) if batch else "static batch", meta["tensorrt_version"],
        meta["device"]["name"] or "unknown GPU", " (sm_{}{})".format(*cc) if cc else "", args.meta))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
