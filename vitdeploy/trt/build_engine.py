#!/usr/bin/env python3
"""Build a TensorRT engine from an ONNX model, on the device that will run it.

    python build_engine.py model.onnx --out model.engine [--precision int8|fp16|fp32]
        [--strongly-typed] [--layernorm-fp32] [--workspace MiB] [--dla CORE]
        [--timing-cache FILE] [--trt-calibrator entropy --calib calib.npy --calib-cache calib.cache]
        [--min-batch 1 --opt-batch 1 --max-batch 8] [--input-name input]
        [--meta model.engine.json] [--preprocessing build.json]

Engines are not portable: an engine only runs on the GPU model (compute capability) and the
TensorRT version it was built with. So this file is standalone -- it imports only the standard
library, NumPy, TensorRT and (for calibration and device queries) cuda-python or PyCUDA, plus its
sibling ``device.py`` (the CUDA/TensorRT plumbing it shares with benchmark.py, loaded by path) --
and is copied, with device.py, into deploy bundles to run on a Jetson. It must stay Python 3.6
compatible (JetPack 4.6): no dataclasses, no walrus, no ``from __future__ import annotations``,
no ``f"{x=}"``.

It supports TensorRT 8.2 to 11.x by checking which attributes the installed ``tensorrt`` module
has, never its version string: `detect_api` turns the module into a dict of capabilities,
`plan_build` (pure) decides flags and warnings from the arguments, the capabilities and what the
GPU can do, and only `build` touches TensorRT.

Next to the engine it writes ``model.engine.json``: TensorRT version, GPU, precision as built,
per-layer precision (engine inspector), inputs/outputs, batch profile and preprocessing.

Exit codes: 0 built; 2 a problem with the arguments or the machine (including "TensorRT not
found"), explained in one line; 1 TensorRT failed to parse or build the model.
"""

import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
import warnings


def _import_sibling(name):
    """``name``.py from this file's folder. This script runs as ``python3 build_engine.py`` in a bundle, by path
    from jetson/ and as ``vitdeploy.trt.build_engine``: neither sys.path nor a relative import finds it in all three."""
    if __package__ and __package__ in sys.modules:  # vitdeploy.trt.build_engine: share the package's module
        return importlib.import_module(__package__ + "." + name)
    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), name + ".py")
    if not os.path.isfile(path):
        message = "{} needs {} next to it (deploy bundles carry both)".format(__file__, path)
        if __name__ == "__main__":  # run as a script: one line and exit 2, like any other missing piece
            sys.stderr.write("error: " + message + "\n")
            sys.exit(2)
        raise ImportError(message)
    spec = importlib.util.spec_from_file_location("vitdeploy_trt_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_device = _import_sibling("device")
# The shared device plumbing, under the names this script has always had.
UsageError = _device.UsageError
TensorRTNotFound = _device.TensorRTNotFound
CudaNotFound = _device.CudaNotFound
load_cuda = _device.load_cuda
query_device = _device.query_device
get_trt_logger = _device.get_trt_logger
engine_io = _device.engine_io
_import_cudart = _device.import_cudart
_version_tuple = _device.version_tuple
_warn = _device.warn
_write_atomic = _device.write_atomic

__all__ = [
    "METADATA_SCHEMA",
    "NO_TENSORRT_MESSAGE",
    "UsageError",
    "TensorRTNotFound",
    "CudaNotFound",
    "BuildFailed",
    "BuildPlan",
    "detect_api",
    "query_platform",
    "plan_build",
    "find_layernorm_layers",
    "layer_precisions_from_inspector",
    "format_parser_error",
    "calibration_batch_size",
    "load_calibration_array",
    "make_metadata",
    "import_tensorrt",
    "load_cuda",
    "query_device",
    "engine_io",
    "build",
    "build_arg_parser",
    "parse_args",
    "main",
]

#: Identifies the layout of ``model.engine.json`` (validated by ``vitdeploy.runtime``).
METADATA_SCHEMA = "vitdeploy.engine/1"

#: The one line printed (exit 2) when ``import tensorrt`` fails.
NO_TENSORRT_MESSAGE = ("TensorRT not found (cannot import tensorrt): engines are built on the device that runs "
                       "them (Jetson or GPU machine with TensorRT), not here")

MIB = 1 << 20

#: TensorRT 8.2 (JetPack 4.6) still has the old ``max_workspace_size``, whose default is far too
#: small for a ViT's attention GEMMs; 8.4+ defaults the workspace pool to the device memory.
LEGACY_DEFAULT_WORKSPACE_MIB = 1024

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_USAGE = 2

PRECISIONS = ("int8", "fp16", "fp32")


class BuildFailed(Exception):
    """TensorRT could not parse or build the model (exit 1); the message may span lines."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _has(obj, *path):
    """True when ``obj.a.b...`` exists (``_has(trt, "BuilderFlag", "FP16")``); None-safe."""
    for name in path:
        if obj is None or not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


# ---------------------------------------------------------------------------------------------
# What the installed TensorRT can do (pure: attribute checks only)
# ---------------------------------------------------------------------------------------------


def _precision_constraint_flag(builder_flag):
    """OBEY_PRECISION_CONSTRAINTS (8.2-10.x), else the older STRICT_TYPES, else None (11.x)."""
    for name in ("OBEY_PRECISION_CONSTRAINTS", "STRICT_TYPES"):
        if _has(builder_flag, name):
            return name
    return None


def _implicit_int8_deprecated(trt, version):
    """IInt8EntropyCalibrator2 is deprecated from 10.1: its docstring says so; the version backs it up."""
    doc = getattr(getattr(trt, "IInt8EntropyCalibrator2", None), "__doc__", None) or ""
    return "DEPRECATED" in doc.upper() or version[:2] >= (10, 1)


def detect_api(trt):
    """Capabilities of a ``tensorrt`` module, as a dict of booleans (and a few names).

    Pure: only ``hasattr`` checks, so tests can pass ``types.SimpleNamespace`` objects shaped
    like each TensorRT release. Keys:

    * ``explicit_batch_flag_needed``: 8.x needs ``EXPLICIT_BATCH`` for ONNX; from 10.0 the flag is
      deprecated (implicit batch is gone -- ``Builder.max_batch_size`` disappeared with it).
    * ``strongly_typed_available`` / ``strongly_typed_flag`` / ``strongly_typed_only``: 10.x has
      the ``STRONGLY_TYPED`` network flag; 11.x removed the weak-typing builder flags (FP16, INT8)
      so every network is strongly typed and the flag is not passed.
    * ``memory_pool_api`` (8.4+) vs ``legacy_workspace_api`` (``max_workspace_size``, 8.2/8.3).
    * ``implicit_int8_available`` (IInt8EntropyCalibrator2 + ``int8_calibrator``; gone in 11) and
      ``implicit_int8_deprecated`` (10.1+).
    * ``engine_inspector_available`` (8.2+), ``detailed_profiling_available``.
    * ``precision_constraint_flag``: ``"OBEY_PRECISION_CONSTRAINTS"``, ``"STRICT_TYPES"`` or None.
    * ``tensor_io_api`` (8.5+: names, ``execute_async_v3``) and ``binding_api`` (8.x bindings).
    """
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    builder_flag = getattr(trt, "BuilderFlag", None)
    builder = getattr(trt, "Builder", None)
    config = getattr(trt, "IBuilderConfig", None)
    engine = getattr(trt, "ICudaEngine", None)
    context = getattr(trt, "IExecutionContext", None)
    version_string = str(getattr(trt, "__version__", "unknown"))
    version = _version_tuple(version_string)
    weak_typing = _has(builder_flag, "FP16") or _has(builder_flag, "INT8")
    int8_flag = _has(builder_flag, "INT8")
    return {
        "version": version_string,
        "build_serialized_network": _has(builder, "build_serialized_network"),
        "explicit_batch_flag_needed": _has(flags, "EXPLICIT_BATCH") and _has(builder, "max_batch_size"),
        "strongly_typed_available": _has(flags, "STRONGLY_TYPED") or not weak_typing,
        "strongly_typed_flag": _has(flags, "STRONGLY_TYPED") and weak_typing,
        "strongly_typed_only": not weak_typing,
        "fp16_flag": _has(builder_flag, "FP16"),
        "int8_flag": int8_flag,
        "precision_constraint_flag": _precision_constraint_flag(builder_flag),
        "memory_pool_api": _has(config, "set_memory_pool_limit") and _has(trt, "MemoryPoolType", "WORKSPACE"),
        "legacy_workspace_api": _has(config, "max_workspace_size"),
        "implicit_int8_available": (_has(trt, "IInt8EntropyCalibrator2") and _has(config, "int8_calibrator")
                                    and int8_flag),
        "implicit_int8_deprecated": _implicit_int8_deprecated(trt, version),
        "calibration_profile_available": _has(config, "set_calibration_profile"),
        "engine_inspector_available": (_has(engine, "create_engine_inspector")
                                       and _has(trt, "LayerInformationFormat", "JSON")),
        "detailed_profiling_available": (_has(trt, "ProfilingVerbosity", "DETAILED")
                                         and _has(config, "profiling_verbosity")),
        "timing_cache_available": _has(config, "create_timing_cache") and _has(config, "set_timing_cache"),
        "dla_available": _has(trt, "DeviceType", "DLA") and _has(config, "default_device_type"),
        "gpu_fallback_flag": _has(builder_flag, "GPU_FALLBACK"),
        "platform_query_available": _has(builder, "platform_has_fast_int8"),
        "normalization_layer": _has(trt, "LayerType", "NORMALIZATION"),
        "tensor_io_api": (_has(engine, "num_io_tensors") and _has(context, "execute_async_v3")
                          and _has(context, "set_input_shape")),
        "binding_api": _has(engine, "num_bindings") and _has(context, "execute_async_v2"),
        "tensor_profile_shape": _has(engine, "get_tensor_profile_shape"),
        "parse_from_file": _has(trt, "OnnxParser", "parse_from_file"),
    }


def query_platform(builder, caps):
    """What the GPU can do, as far as this TensorRT says: fast INT8/FP16 and DLA core count.

    ``None`` means unknown: TensorRT 11 removed ``platform_has_fast_int8`` (and 10.5 deprecated
    it), so there we trust the ONNX's Q/DQ nodes instead.
    """
    def read(name):
        if not caps.get("platform_query_available") and name.startswith("platform_"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated properties warn on 10.5+
            try:
                return getattr(builder, name)
            except Exception:  # an attribute TensorRT refuses to compute is "unknown"
                return None

    cores = read("num_DLA_cores")
    return {
        "has_fast_int8": read("platform_has_fast_int8"),
        "has_fast_fp16": read("platform_has_fast_fp16"),
        "num_dla_cores": int(cores) if cores is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# The plan: every decision, no TensorRT
# ---------------------------------------------------------------------------------------------


class BuildPlan(object):
    """What `build` will do: creation flags, builder flags, pins, memory, DLA, warnings.

    Attributes:
        requested_precision: what the user asked (``int8`` when not given).
        precision: what is built: ``int8``, ``fp16``, ``fp32`` or ``strongly-typed`` (the ONNX's
            own types decide).
        strongly_typed: the network is created strongly typed (explicit flag or TensorRT 11).
        network_flags: ``NetworkDefinitionCreationFlag`` names to OR together.
        builder_flags: ``BuilderFlag`` names to set.
        pin_layernorm_fp32: pin LayerNorm layers (or the decomposed pattern) to FP32.
        workspace_bytes / workspace_api: the limit and ``"memory_pool"`` or
            ``"max_workspace_size"``; both None for TensorRT's default.
        dla_core: DLA core to build for, or None for the GPU.
        use_calibrator: run implicit INT8 calibration (IInt8EntropyCalibrator2).
        batch: ``(min, opt, max)`` for inputs with a dynamic batch dimension.
        detailed_profiling: build with ProfilingVerbosity.DETAILED so the inspector reports
            per-layer precisions.
        timing_cache: path to load and save, or None.
        warnings: one-line messages for the user.
    """

    def __init__(self, **fields):
        self.requested_precision = "int8"
        self.precision = "int8"
        self.strongly_typed = False
        self.network_flags = []
        self.builder_flags = []
        self.pin_layernorm_fp32 = False
        self.workspace_bytes = None
        self.workspace_api = None
        self.dla_core = None
        self.use_calibrator = False
        self.batch = (1, 1, 8)
        self.detailed_profiling = False
        self.timing_cache = None
        self.warnings = []
        for key, value in fields.items():
            if not hasattr(self, key):
                raise TypeError("BuildPlan has no field " + repr(key))
            setattr(self, key, value)

    def as_dict(self):
        """The plan as plain data (for logs and tests)."""
        return dict(self.__dict__)

    def __repr__(self):
        return "BuildPlan(" + ", ".join("{}={!r}".format(k, v) for k, v in sorted(self.__dict__.items())) + ")"


def _plan_batch(args):
    """``(min, opt, max)`` from the arguments, checked 1 <= min <= opt <= max."""
    low = args.min_batch if args.min_batch is not None else 1
    opt = args.opt_batch if args.opt_batch is not None else low
    high = args.max_batch if args.max_batch is not None else max(8, opt)
    if not 1 <= low <= opt <= high:
        raise UsageError("batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                         "{} / {} / {}".format(low, opt, high))
    return low, opt, high


def _plan_calibrator(args, caps, strongly_typed, precision):
    """Whether to calibrate, or a UsageError explaining why implicit INT8 cannot be used."""
    if not args.trt_calibrator:
        return False, []
    if not caps["implicit_int8_available"]:
        raise UsageError("TensorRT {} has no IInt8EntropyCalibrator2 (implicit INT8 calibration was removed in "
                         "TensorRT 11): build the QDQ ONNX instead (explicit quantization)".format(caps["version"]))
    if strongly_typed:
        raise UsageError("--trt-calibrator needs a weakly typed network: drop --strongly-typed, or build the QDQ ONNX")
    if precision != "int8":
        raise UsageError("--trt-calibrator calibrates INT8: it needs --precision int8, got " + precision)
    if not args.calib:
        raise UsageError("--trt-calibrator entropy needs --calib calib.npy (float32 N x C x H x W, preprocessed)")
    notes = []
    if caps["implicit_int8_deprecated"]:
        notes.append("implicit INT8 calibration (IInt8EntropyCalibrator2) is deprecated since TensorRT 10.1 and "
                     "removed in 11: prefer the QDQ ONNX")
    return True, notes


def _plan_weak_precision(precision, platform, caps, use_calibrator):
    """Builder flags for a weakly typed network, with the no-fast-INT8 (TX2) fallback to FP16."""
    notes = []
    if precision == "int8" and platform.get("has_fast_int8") is False:
        notes.append("this GPU has no fast INT8 (e.g. Jetson TX2, sm_62): building an FP16 engine instead"
                     + ("; calibration skipped" if use_calibrator else ""))
        precision, use_calibrator = "fp16", False
    if precision in ("int8", "fp16") and platform.get("has_fast_fp16") is False:
        notes.append("this GPU has no fast FP16: TensorRT will keep most non-INT8 layers in FP32")
    flags = []
    if precision == "int8":
        flags.append("INT8")
    if precision in ("int8", "fp16") and caps["fp16_flag"] and platform.get("has_fast_fp16") is not False:
        # INT8 engines keep the layers without Q/DQ (softmax, GELU, LayerNorm) in FP16, not FP32.
        flags.append("FP16")
    return precision, flags, use_calibrator, notes


def _plan_layernorm(args, caps, strongly_typed, precision):
    """``(pin, extra builder flags, notes)`` for --layernorm-fp32."""
    if not args.layernorm_fp32:
        return False, [], []
    if strongly_typed:
        return False, [], ["--layernorm-fp32 is ignored for a strongly typed network: it keeps the ONNX's types "
                           "(export LayerNorm in FP32 instead)"]
    if precision == "fp32":
        return False, [], []  # nothing runs below FP32 anyway
    flag = caps["precision_constraint_flag"]
    if flag is None:
        return False, [], ["--layernorm-fp32 is ignored: this TensorRT has no precision-constraint builder flag"]
    return True, [flag], []


def _plan_dla(args, caps, platform, precision, batch):
    """``(dla core or None, extra builder flags, notes)``; UsageError for impossible requests."""
    if args.dla is None:
        return None, [], []
    if not caps["dla_available"]:
        raise UsageError("--dla: TensorRT {} has no DLA support".format(caps["version"]))
    if args.dla < 0:
        raise UsageError("--dla must be a core number >= 0")
    cores = platform.get("num_dla_cores")
    if cores is not None and args.dla >= cores:
        raise UsageError("--dla {}: this device has {} DLA core(s)".format(args.dla, cores))
    if precision == "fp32":
        raise UsageError("DLA runs FP16 and INT8 only: use --precision fp16 or int8 with --dla")
    flags = ["GPU_FALLBACK"] if caps["gpu_fallback_flag"] else []
    notes = []
    if batch[0] != batch[2]:
        notes.append("DLA does not take dynamic shapes: use --min-batch = --opt-batch = --max-batch for a DLA "
                     "engine, or expect layers to fall back to the GPU")
    return args.dla, flags, notes


def _plan_workspace(args, caps):
    """``(bytes, api, notes)``: the requested limit through whichever API this TensorRT has."""
    if args.workspace is not None and args.workspace <= 0:
        raise UsageError("--workspace must be a positive number of MiB")
    if caps["memory_pool_api"]:
        if args.workspace is None:
            return None, None, []  # default pool = device memory (8.4+)
        return args.workspace * MIB, "memory_pool", []
    if caps["legacy_workspace_api"]:
        mib = args.workspace if args.workspace is not None else LEGACY_DEFAULT_WORKSPACE_MIB
        return mib * MIB, "max_workspace_size", []
    if args.workspace is not None:
        return None, None, ["--workspace is ignored: this TensorRT has no workspace limit API"]
    return None, None, []


def plan_build(args, caps, platform=None):
    """Decide everything `build` does from the arguments, the API and the platform (pure).

    Args:
        args: parsed arguments (see `parse_args`).
        caps: `detect_api` result.
        platform: `query_platform` result (``has_fast_int8``, ``has_fast_fp16``,
            ``num_dla_cores``; ``None`` values or a missing dict mean unknown).

    Raises UsageError for requests this TensorRT or device cannot honour.
    """
    platform = platform or {}
    if not caps["build_serialized_network"]:
        raise UsageError("TensorRT {} is too old: build_engine.py needs 8.2 or newer".format(caps["version"]))
    notes = []
    batch = _plan_batch(args)
    if args.strongly_typed and not caps["strongly_typed_available"]:
        raise UsageError("--strongly-typed needs TensorRT 10 or newer: TensorRT {} has no "
                         "NetworkDefinitionCreationFlag.STRONGLY_TYPED".format(caps["version"]))
    strongly_typed = bool(args.strongly_typed) or caps["strongly_typed_only"]
    requested = args.precision or "int8"
    if caps["strongly_typed_only"] and not args.strongly_typed and args.precision not in (None, "int8"):
        notes.append("TensorRT {} builds strongly typed networks only: --precision {} is ignored, the ONNX's types "
                     "decide (write FP16 tensors into the ONNX)".format(caps["version"], args.precision))
    use_calibrator, calib_notes = _plan_calibrator(args, caps, strongly_typed, requested)
    notes.extend(calib_notes)
    if not args.trt_calibrator and (args.calib or args.calib_cache):
        notes.append("--calib/--calib-cache are ignored without --trt-calibrator entropy")

    if strongly_typed:
        precision, builder_flags = "strongly-typed", []
    else:
        precision, builder_flags, use_calibrator, precision_notes = _plan_weak_precision(
            requested, platform, caps, use_calibrator)
        notes.extend(precision_notes)

    pin, pin_flags, pin_notes = _plan_layernorm(args, caps, strongly_typed, precision)
    dla_core, dla_flags, dla_notes = _plan_dla(args, caps, platform, precision, batch)
    workspace_bytes, workspace_api, workspace_notes = _plan_workspace(args, caps)
    notes.extend(pin_notes + dla_notes + workspace_notes)
    timing_cache = args.timing_cache
    if timing_cache and not caps["timing_cache_available"]:
        notes.append("--timing-cache is ignored: this TensorRT has no timing cache API")
        timing_cache = None

    network_flags = []
    if caps["explicit_batch_flag_needed"]:
        network_flags.append("EXPLICIT_BATCH")
    if strongly_typed and caps["strongly_typed_flag"]:
        network_flags.append("STRONGLY_TYPED")
    return BuildPlan(
        requested_precision=requested, precision=precision, strongly_typed=strongly_typed,
        network_flags=network_flags, builder_flags=builder_flags + pin_flags + dla_flags,
        pin_layernorm_fp32=pin, workspace_bytes=workspace_bytes, workspace_api=workspace_api,
        dla_core=dla_core, use_calibrator=use_calibrator, batch=batch,
        detailed_profiling=caps["detailed_profiling_available"] and caps["engine_inspector_available"],
        timing_cache=timing_cache, warnings=notes)


# ---------------------------------------------------------------------------------------------
# Pure helpers on TensorRT-shaped data
# ---------------------------------------------------------------------------------------------


def _consumers(records):
    """tensor name -> records that read it."""
    readers = {}
    for record in records:
        for name in record["inputs"]:
            readers.setdefault(name, []).append(record)
    return readers


def _next(readers, tensor, layer_type, also_reads=None):
    """Readers of ``tensor`` of ``layer_type`` (that also read ``also_reads`` when given)."""
    return [r for r in readers.get(tensor, ()) if r["type"] == layer_type
            and (also_reads is None or also_reads in r["inputs"])]


def _decomposed_layernorm_at(reduce_mean, readers):
    """The 7 layers of ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` starting at a REDUCE.

    Matched by structure, not by names: Sub reads x and the mean; Pow (or Mul) squares the
    difference; a second REDUCE, an Add (eps), a UNARY (sqrt) and a Div that reads the
    difference again. Returns the records, or [] when the pattern is not there.
    """
    x, mean = reduce_mean["inputs"][0], reduce_mean["outputs"][0]
    for sub in _next(readers, mean, "ELEMENTWISE", also_reads=x):
        diff = sub["outputs"][0]
        for square in _next(readers, diff, "ELEMENTWISE"):
            for variance in _next(readers, square["outputs"][0], "REDUCE"):
                for add_eps in _next(readers, variance["outputs"][0], "ELEMENTWISE"):
                    for sqrt in _next(readers, add_eps["outputs"][0], "UNARY"):
                        for div in _next(readers, sqrt["outputs"][0], "ELEMENTWISE", also_reads=diff):
                            return [reduce_mean, sub, square, variance, add_eps, sqrt, div]
    return []


def find_layernorm_layers(records):
    """Indices of the layers to pin to FP32 for LayerNorm.

    ``records`` describe the network's layers in order: dicts with ``index``, ``name``,
    ``type`` (LayerType name: ``NORMALIZATION``, ``REDUCE``, ``ELEMENTWISE``, ``UNARY`` ...),
    ``inputs`` and ``outputs`` (tensor names). LayerNormalization (opset 17, TensorRT 8.6+)
    arrives as one NORMALIZATION layer; older exports as the decomposed pattern, whose
    Pow/ReduceMean overflow in FP16 on ViT activations -- the reason for pinning.
    """
    readers = _consumers(records)
    picked = []
    for record in records:
        if record["type"] == "NORMALIZATION":
            picked.append(record["index"])
        elif record["type"] == "REDUCE" and record["inputs"] and record["outputs"]:
            picked.extend(r["index"] for r in _decomposed_layernorm_at(record, readers))
    return sorted(set(picked))


_PRECISION_WORDS = {
    "fp32": "fp32", "float": "fp32", "fp16": "fp16", "half": "fp16", "bf16": "bf16", "int8": "int8",
    "fp8": "fp8", "int32": "int32", "int64": "int64", "bool": "bool", "uint8": "uint8", "int4": "int4",
    "fp4": "fp4",
}


def _tensor_precision(tensor):
    """Precision of one inspector tensor entry: TensorRT 11's ``DataType`` ("Half") or the
    8.x/10.x ``Format/Datatype`` text ("Row major linear FP32", "... Int8 format")."""
    if not isinstance(tensor, dict):
        return None
    text = tensor.get("DataType") or tensor.get("Format/Datatype") or ""
    for word in re.findall(r"[A-Za-z0-9]+", str(text)):
        precision = _PRECISION_WORDS.get(word.lower())
        if precision:
            return precision
    return None


def layer_precisions_from_inspector(info_json):
    """Per-layer precision from ``IEngineInspector.get_engine_information(JSON)``.

    Returns ``[{"name", "type", "precision"}]`` where precision joins the output precisions
    (``"int8"``, ``"fp16"``, ``"fp16+fp32"``...), or None when the engine was built without
    detailed profiling verbosity (layers are then bare names).
    """
    info = json.loads(info_json) if isinstance(info_json, str) else info_json
    layers = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            layers.append({"name": str(layer), "type": None, "precision": None})
            continue
        found = sorted({p for p in (_tensor_precision(t) for t in layer.get("Outputs") or []) if p})
        layers.append({"name": str(layer.get("Name", "")), "type": layer.get("LayerType"),
                       "precision": "+".join(found) if found else None})
    return layers


def _call(obj, method):
    """``obj.method()`` or None when the method is missing (older parsers) or fails."""
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:
        return None


def format_parser_error(error):
    """One ONNX parser error as ``node 12 '/blocks.0/attn/MatMul' (MatMul): <description>``.

    ``node_name``/``node_operator`` exist from TensorRT 8.6; before that only the node index.
    """
    index, name, op = _call(error, "node"), _call(error, "node_name"), _call(error, "node_operator")
    where = "node {}".format(index) if index is not None and index >= 0 else "model"
    if name:
        where += " '{}'".format(name)
    if op:
        where += " ({})".format(op)
    return "{}: {}".format(where, _call(error, "desc") or "unknown parser error")


def calibration_batch_size(samples, network_batch, plan_batch):
    """Batch size for calibration: the network's static batch, else opt clipped to the data.

    Raises UsageError when calib.npy has fewer samples than one batch needs.
    """
    low, opt, _high = plan_batch
    if network_batch is not None and network_batch > 0:
        size = network_batch
    else:
        size = max(low, min(opt, samples))
    if samples < size:
        raise UsageError("--calib has {} sample(s), fewer than one calibration batch of {}".format(samples, size))
    return size


def load_calibration_array(path, sample_shape=None):
    """calib.npy as float32 N x C x H x W (memory-mapped), checked against the input's C, H, W.

    With ``sample_shape`` (the network input's shape without the batch) any rank that matches is
    accepted; without it the array must be 4-D.
    """
    import numpy as np

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError("cannot read --calib {}: {}".format(path, exc))
    rank = len(sample_shape) + 1 if sample_shape is not None else 4
    if array.ndim != rank or array.shape[0] == 0:
        raise UsageError("--calib {} must hold N x C x H x W preprocessed images, got shape {}".format(
            path, list(array.shape)))
    if not np.issubdtype(array.dtype, np.floating):
        raise UsageError("--calib {} must be float32 preprocessed images, got {}".format(path, array.dtype))
    if sample_shape is not None and tuple(array.shape[1:]) != tuple(sample_shape):
        raise UsageError("--calib {} holds samples of shape {}, the network input takes {}".format(
            path, list(array.shape[1:]), list(sample_shape)))
    return array


def make_metadata(engine_file, trt_version, device_name, compute_capability, plan, inputs, outputs,
                  onnx_file=None, layers=None, pinned_layers=None, batch_profile=None,
                  preprocessing=None, calibrator=None, built_at=None):
    """The ``model.engine.json`` record (schema `METADATA_SCHEMA`).

    ``inputs``/``outputs`` are ``[{"name", "shape", "dtype"}]`` with -1 for dynamic dims;
    ``batch_profile`` is ``{"min", "opt", "max"}`` or None for a static batch.
    """
    if built_at is None:
        built_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "schema": METADATA_SCHEMA,
        "engine": os.path.basename(str(engine_file)),
        "onnx": os.path.basename(str(onnx_file)) if onnx_file else None,
        "built_at": built_at,
        "tensorrt_version": str(trt_version),
        "device": {
            "name": device_name,
            "compute_capability": list(compute_capability) if compute_capability else None,
        },
        "precision": {
            "requested": plan.requested_precision,
            "built": plan.precision,
            "strongly_typed": bool(plan.strongly_typed),
            "builder_flags": list(plan.builder_flags),
            "network_flags": list(plan.network_flags),
            "layernorm_fp32": bool(plan.pin_layernorm_fp32),
            "pinned_fp32_layers": list(pinned_layers or []),
            "calibrator": calibrator,
            "dla_core": plan.dla_core,
        },
        "inputs": [dict(t) for t in inputs],
        "outputs": [dict(t) for t in outputs],
        "batch_profile": dict(batch_profile) if batch_profile else None,
        "layers": layers,
        "preprocessing": preprocessing,
        "warnings": list(plan.warnings),
    }


# ---------------------------------------------------------------------------------------------
# TensorRT (CUDA, the logger and engine_io come from device.py)
# ---------------------------------------------------------------------------------------------


def import_tensorrt():
    """The ``tensorrt`` module, imported only when needed so ``--help`` works without it."""
    return _device.import_tensorrt(NO_TENSORRT_MESSAGE)


def _parse_onnx(trt, network, logger, onnx_path, caps):
    """Parse the ONNX into ``network``; BuildFailed lists every parser error with its node."""
    parser = trt.OnnxParser(network, logger)
    if caps["parse_from_file"]:
        ok = parser.parse_from_file(os.path.abspath(onnx_path))
    else:
        with open(onnx_path, "rb") as f:
            ok = parser.parse(f.read(), os.path.abspath(onnx_path))
    if not ok or parser.num_errors:
        lines = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailed("TensorRT's ONNX parser rejected {}:\n  ".format(onnx_path)
                          + "\n  ".join(lines or ["no details given"]))
    return parser  # keep it alive as long as the network: the network can refer to its weights


def _network_inputs(network):
    """``[(name, shape list)]`` of the parsed network's inputs."""
    return [(network.get_input(i).name, [int(d) for d in network.get_input(i).shape])
            for i in range(network.num_inputs)]


def _batch_profile_inputs(inputs):
    """Inputs with a dynamic batch; UsageError when other dimensions are dynamic too."""
    dynamic = []
    for name, shape in inputs:
        if any(d < 0 for d in shape[1:]):
            raise UsageError("input '{}' has dynamic dimensions beyond the batch {}: export the ONNX with a fixed "
                             "image size".format(name, shape))
        if shape and shape[0] < 0:
            dynamic.append((name, shape))
    return dynamic


def _add_batch_profile(builder, config, dynamic_inputs, batch):
    """One optimization profile covering the batch range for every dynamic-batch input."""
    profile = builder.create_optimization_profile()
    for name, shape in dynamic_inputs:
        rest = tuple(shape[1:])
        profile.set_shape(name, (batch[0],) + rest, (batch[1],) + rest, (batch[2],) + rest)
    config.add_optimization_profile(profile)


def _configure(trt, config, plan):
    """Builder flags, workspace, DLA and profiling verbosity from the plan."""
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.workspace_api == "memory_pool":
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    elif plan.workspace_api == "max_workspace_size":
        config.max_workspace_size = plan.workspace_bytes
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    if plan.detailed_profiling:
        # The inspector only reports per-layer formats/precisions at DETAILED verbosity.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED


def _layer_records(network):
    """The network's layers as plain records for `find_layernorm_layers`."""
    records = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        records.append({"index": i, "name": layer.name, "type": layer.type.name,
                        "inputs": [t.name for t in ins if t is not None],
                        "outputs": [t.name for t in outs if t is not None]})
    return records


def _set_compute_precision_fp32(trt, layer):
    """INormalizationLayer.compute_precision (8.6+) = FP32, when this TensorRT lets us set it."""
    try:
        # Python hands out the base ILayer; the subclass view (as Polygraphy does) exposes
        # compute_precision, the type the normalisation is computed in.
        layer.__class__ = trt.INormalizationLayer
        if hasattr(layer, "compute_precision"):
            layer.compute_precision = trt.float32
    except (TypeError, AttributeError):
        pass  # layer.precision + output types already pin it under precision constraints


def _pin_fp32(trt, network, indices):
    """Pin the given layers (compute and outputs) to FP32; returns the pinned layer names."""
    names = []
    for index in indices:
        layer = network.get_layer(index)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == getattr(trt.LayerType, "NORMALIZATION", None) and hasattr(trt, "INormalizationLayer"):
            _set_compute_precision_fp32(trt, layer)
        names.append(layer.name)
    return names


def _make_entropy_calibrator(trt, cuda, array, batch_size, cache_path):
    """An IInt8EntropyCalibrator2 feeding ``array`` (N x C x H x W) in batches of ``batch_size``.

    Created inside a function because the base class comes from the lazily imported TensorRT.
    A non-empty ``cache_path`` is read back instead of calibrating, and written after.
    """
    import numpy as np

    base = trt.IInt8EntropyCalibrator2

    class NpyEntropyCalibrator(base):
        """Calibration batches from calib.npy; scales cached in calib.cache."""

        def __init__(self):
            base.__init__(self)  # pybind11 trampolines crash without the explicit base init
            self.position = 0
            self.batches = 0
            sample_bytes = int(np.prod(array.shape[1:])) * 4
            self.device_ptr = cuda.malloc(batch_size * sample_bytes)

        def get_batch_size(self):
            # Explicit-batch networks take the batch from the input shape (Polygraphy returns 1 too).
            return 1

        def get_batch(self, names, *unused):
            if self.position + batch_size > array.shape[0]:
                return None  # no more data: TensorRT computes the scales
            host = np.ascontiguousarray(array[self.position:self.position + batch_size], dtype=np.float32)
            cuda.htod(self.device_ptr, host)
            self.position += batch_size
            self.batches += 1
            return [self.device_ptr] * len(names)

        def read_calibration_cache(self):
            if cache_path and os.path.isfile(cache_path) and os.path.getsize(cache_path) > 0:
                with open(cache_path, "rb") as f:
                    return f.read()
            return None

        def write_calibration_cache(self, cache):
            if cache_path:
                _write_atomic(cache_path, bytes(cache))

        def free(self):
            if self.device_ptr is not None:
                cuda.free(self.device_ptr)
                self.device_ptr = None

    return NpyEntropyCalibrator()


def _setup_calibration(trt, builder, config, plan, args, inputs, dynamic_inputs):
    """Attach the entropy calibrator (and a fixed calibration profile for dynamic batch)."""
    if len(inputs) != 1:
        raise UsageError("--trt-calibrator feeds a single input; this network has {}".format([n for n, _ in inputs]))
    name, shape = inputs[0]
    array = load_calibration_array(args.calib, shape[1:])
    size = calibration_batch_size(array.shape[0], shape[0] if shape[0] > 0 else None, plan.batch)
    if array.shape[0] % size:
        _warn("calibration uses {} of {} samples (whole batches of {})".format(
            array.shape[0] - array.shape[0] % size, array.shape[0], size))
    if dynamic_inputs and hasattr(config, "set_calibration_profile"):
        # Calibration runs at one shape: without its own profile TensorRT would use the
        # inference profile's opt shape, which need not match our batches.
        fixed = (size,) + tuple(shape[1:])
        profile = builder.create_optimization_profile()
        profile.set_shape(name, fixed, fixed, fixed)
        config.set_calibration_profile(profile)
    try:
        cuda = load_cuda()
    except RuntimeError as exc:
        raise UsageError("calibration needs a working CUDA device: {}".format(exc))
    calibrator = _make_entropy_calibrator(trt, cuda, array, size, args.calib_cache)
    config.int8_calibrator = calibrator
    return calibrator


def _load_timing_cache(config, path):
    """Attach the timing cache from ``path`` (an empty one when missing or from another device)."""
    blob = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            blob = f.read()
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        _warn("timing cache {} does not match this device/TensorRT: starting an empty one".format(path))
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config, path):
    """Write the (updated) timing cache back so the next build on this device is faster."""
    cache = config.get_timing_cache()
    if cache is not None:
        _write_atomic(path, bytes(cache.serialize()))


def _inspect_layers(trt, engine):
    """Per-layer precisions from the engine inspector, or None when it cannot tell."""
    try:
        inspector = engine.create_engine_inspector()
        return layer_precisions_from_inspector(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # the metadata is still useful without the layer table
        _warn("engine inspector failed ({}): no per-layer precisions in the metadata".format(exc))
        return None


def _has_qdq(records):
    """Whether the parsed network contains explicit quantization (Q/DQ layers)."""
    return any(r["type"] in ("QUANTIZE", "DEQUANTIZE") for r in records)


def _warn_precision_vs_qdq(plan, has_qdq):
    """Say when the ONNX and the precision disagree: TensorRT would silently build something else."""
    if plan.strongly_typed:
        return
    if plan.precision == "int8" and not plan.use_calibrator and not has_qdq:
        _warn("INT8 requested but the ONNX has no Q/DQ nodes and no --trt-calibrator was given: layers will run "
              "in FP16/FP32")
    elif plan.precision != "int8" and has_qdq:
        _warn("the ONNX has Q/DQ nodes but the engine is built in {}: TensorRT may reject it or keep the Q/DQ math; "
              "build from the FP32 ONNX instead".format(plan.precision))


def _parse_network(trt, builder, logger, plan, args, caps):
    """Create the network with the plan's flags and parse the ONNX into it.

    Returns ``(network, parser, inputs, records)``; the parser must outlive the network's use.
    """
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = _parse_onnx(trt, network, logger, args.onnx, caps)
    inputs = _network_inputs(network)
    names = [name for name, _shape in inputs]
    if args.input_name and args.input_name not in names:
        raise UsageError("--input-name {!r}: the network's inputs are {}".format(args.input_name, names))
    return network, parser, inputs, _layer_records(network)


def _engine_metadata(trt, logger, serialized, plan, args, pinned, dynamic, preprocessing):
    """Load the fresh engine back to record its I/O, per-layer precisions and the GPU."""
    runtime = trt.Runtime(logger)
    if plan.dla_core is not None:
        runtime.DLA_core = plan.dla_core
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise BuildFailed("TensorRT built an engine it cannot load back")
    io = engine_io(engine, trt)
    device_name, cc = query_device()
    return make_metadata(
        args.out, trt.__version__, device_name, cc, plan,
        inputs=[{k: t[k] for k in ("name", "shape", "dtype")} for t in io if t["is_input"]],
        outputs=[{k: t[k] for k in ("name", "shape", "dtype")} for t in io if not t["is_input"]],
        onnx_file=args.onnx, layers=_inspect_layers(trt, engine) if plan.detailed_profiling else None,
        pinned_layers=pinned, preprocessing=preprocessing,
        batch_profile=dict(zip(("min", "opt", "max"), plan.batch)) if dynamic else None,
        calibrator=args.trt_calibrator if plan.use_calibrator else None)


def build(args, trt, preprocessing=None):
    """Build the engine and its metadata, write both; returns ``(plan, metadata)``.

    Touches TensorRT (and CUDA for calibration and the device name). UsageError for requests
    the device cannot honour, BuildFailed when TensorRT fails. Nothing is written on failure.
    """
    caps = detect_api(trt)
    logger = get_trt_logger(trt, args.verbose)
    builder = trt.Builder(logger)
    plan = plan_build(args, caps, query_platform(builder, caps))
    for note in plan.warnings:
        _warn(note)
    network, parser, inputs, records = _parse_network(trt, builder, logger, plan, args, caps)
    dynamic_inputs = _batch_profile_inputs(inputs)
    if not dynamic_inputs and args.max_batch is not None and inputs and args.max_batch != inputs[0][1][0]:
        _warn("the ONNX has a fixed batch of {}: the batch profile is ignored (export it with a dynamic batch "
              "to serve up to --max-batch {})".format(inputs[0][1][0], args.max_batch))
    _warn_precision_vs_qdq(plan, _has_qdq(records))

    config = builder.create_builder_config()
    _configure(trt, config, plan)
    if dynamic_inputs:
        _add_batch_profile(builder, config, dynamic_inputs, plan.batch)
    pinned = _pin_fp32(trt, network, find_layernorm_layers(records)) if plan.pin_layernorm_fp32 else []
    if plan.pin_layernorm_fp32 and not pinned:
        _warn("--layernorm-fp32: no LayerNormalization (or decomposed LayerNorm) found in the network")
    calibrator = None
    if plan.use_calibrator:
        calibrator = _setup_calibration(trt, builder, config, plan, args, inputs, dynamic_inputs)
    if plan.timing_cache:
        _load_timing_cache(config, plan.timing_cache)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        raise BuildFailed("TensorRT could not build the engine (its messages above say why)")
    if plan.timing_cache:
        _save_timing_cache(config, plan.timing_cache)
    del parser

    meta = _engine_metadata(trt, logger, serialized, plan, args, pinned, bool(dynamic_inputs), preprocessing)
    _write_atomic(args.out, bytes(serialized))
    _write_atomic(args.meta, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return plan, meta


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_arg_parser():
    """The CLI (no TensorRT needed to build it, so ``--help`` always works)."""
    p = argparse.ArgumentParser(
        prog="build_engine.py",
        description="Build a TensorRT engine (and model.engine.json) from an ONNX model, on the device that "
                    "runs it. Engines only run on the GPU model and TensorRT version they were built with.")
    p.add_argument("onnx", help="ONNX model (QDQ INT8, or FP32 for FP16/FP32 engines)")
    p.add_argument("--out", required=True, help="engine file to write (model.engine)")
    p.add_argument("--meta", help="metadata JSON to write (default: <out>.json)")
    g = p.add_argument_group("precision")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="int8 (default; INT8 + FP16 flags, FP16 on GPUs without fast INT8 such as TX2), fp16 or "
                        "fp32; ignored for strongly typed networks")
    g.add_argument("--strongly-typed", action="store_true",
                   help="strongly typed network (TensorRT 10+): the ONNX's types are the precisions; always on in 11")
    g.add_argument("--layernorm-fp32", action="store_true",
                   help="pin LayerNorm (or its decomposed pattern) to FP32 with precision constraints")
    g.add_argument("--trt-calibrator", choices=("entropy",),
                   help="implicit INT8 calibration with IInt8EntropyCalibrator2 (TensorRT 8.x-10.x; deprecated)")
    g.add_argument("--calib", help="calibration data: .npy float32 N x C x H x W, preprocessed")
    g.add_argument("--calib-cache", help="calibration cache to reuse and write (calib.cache)")
    g = p.add_argument_group("shapes")
    g.add_argument("--min-batch", type=int, help="smallest batch of the profile (default 1)")
    g.add_argument("--opt-batch", type=int, help="batch TensorRT tunes for (default: --min-batch)")
    g.add_argument("--max-batch", type=int, help="largest batch of the profile (default 8)")
    g.add_argument("--input-name", help="input to check / calibrate (default: the model's only input)")
    g = p.add_argument_group("build")
    g.add_argument("--workspace", type=int, metavar="MiB", help="workspace memory limit in MiB")
    g.add_argument("--dla", type=int, metavar="CORE", help="build for this DLA core (GPU fallback on)")
    g.add_argument("--timing-cache", metavar="FILE", help="timing cache to load and update (faster rebuilds)")
    g.add_argument("--preprocessing", metavar="BUILD_JSON",
                   help="copy the 'preprocessing' record of this build.json into the metadata")
    g.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def parse_args(argv=None):
    """Parsed arguments with ``meta`` defaulted to ``<out>.json``."""
    args = build_arg_parser().parse_args(argv)
    if not args.meta:
        args.meta = args.out + ".json"
    return args


def _check_files(args):
    """Input files exist and output folders are writable, before spending minutes in TensorRT."""
    for option, path in (("ONNX model", args.onnx), ("--calib", args.calib), ("--preprocessing", args.preprocessing)):
        if path and not os.path.isfile(path):
            raise UsageError("{} not found: {}".format(option, path))
    for path in (args.out, args.meta):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError("output folder does not exist: " + folder)


def read_preprocessing(path):
    """The ``preprocessing`` record of a vitdeploy build.json."""
    try:
        with open(path, "r") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError("cannot read --preprocessing {}: {}".format(path, exc))
    if not isinstance(record, dict) or not isinstance(record.get("preprocessing"), dict):
        raise UsageError("--preprocessing {} has no 'preprocessing' object".format(path))
    return record["preprocessing"]


def _summary(args, plan, meta):
    """The success line."""
    device = meta["device"]["name"] or "unknown GPU"
    cc = meta["device"]["compute_capability"]
    if cc:
        device += " (sm_{}{})".format(cc[0], cc[1])
    size = os.path.getsize(args.out) / float(MIB)
    batch = meta["batch_profile"]
    shape = "batch {}-{}".format(batch["min"], batch["max"]) if batch else "static batch"
    return "built {} ({:.1f} MiB, {}, {}) with TensorRT {} on {}; metadata in {}".format(
        args.out, size, plan.precision, shape, meta["tensorrt_version"], device, args.meta)


def main(argv=None):
    """CLI entry point; returns the exit code (0 built, 1 TensorRT failed, 2 usage/machine)."""
    args = parse_args(argv)
    try:
        _check_files(args)
        preprocessing = read_preprocessing(args.preprocessing) if args.preprocessing else None
        trt = import_tensorrt()
        plan, meta = build(args, trt, preprocessing)
    except UsageError as exc:
        sys.stderr.write("error: {}\n".format(exc))
        return EXIT_USAGE
    except BuildFailed as exc:
        sys.stderr.write("error: {}\n".format(exc))
        return EXIT_BUILD_FAILED
    print(_summary(args, plan, meta))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
