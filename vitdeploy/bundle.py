"""The deploy bundle for a TensorRT target, written where TensorRT itself is not installed.

A TensorRT engine only runs on the GPU model and TensorRT version it was built with, so the
engine cannot be made here: the bundle carries everything needed to build it on the device --
the target's ONNX, preprocessed calibration images (``calib.npy``), the calibrated ranges as a
TensorRT calibration cache (``calib.cache``), the engine build script (``build_engine.py``) and the
on-device benchmark (``benchmark.py``), both on Polygraphy, the equivalent ``trtexec`` command lines
(``trtexec.txt``, what JetPack 4.6 builds with: Polygraphy needs TensorRT 8.5+) and the instructions
(``DEPLOY.md``).

The build flags for each target are derived from its `Target` record (INT8 or not, strongly
typed or not, LayerNorm pinned to FP32 or not) in one place, `_precision_flags`, so that
build_engine.py, trtexec and DEPLOY.md always agree.
"""
from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from .calib_cache import INT8_MAX, write_calib_cache
from .errors import BuildError, InputError
from .outputs import atomic_write
from .targets import Target, get_target

__all__ = [
    "BENCHMARK_SOURCE",
    "BUILD_ENGINE_SOURCE",
    "CALIB_CACHE_VERSIONS",
    "DESKTOP_CALIB_CACHE_VERSION",
    "calib_amax_from_qdq",
    "calib_cache_version",
    "build_engine_command",
    "trtexec_command",
    "write_bundle",
]

#: The engine build script copied into every bundle (a module of this package, so it ships with it).
BUILD_ENGINE_SOURCE = Path(__file__).parent / "trt" / "build_engine.py"
#: The on-device benchmark copied next to it (standalone too; it loads build_engine.py from its folder).
BENCHMARK_SOURCE = Path(__file__).parent / "trt" / "benchmark.py"
#: The one measurement module (timing, statistics, tables), which benchmark.py loads as measure_core.py.
MEASURE_CORE_SOURCE = Path(__file__).parent / "measure" / "core.py"
#: The oldest TensorRT Polygraphy (and so build_engine.py and benchmark.py) runs on; JetPack 4.6 has 8.2.
POLYGRAPHY_MIN_TRT = (8, 5)

#: Version number written into calib.cache's header, per target TensorRT release, in
#: NV_TENSORRT_VERSION style: 8.2.1 → 8201 (JetPack 4.6), 8.5.2 → 8502 (JetPack 5.1),
#: 10.3.0 → 100300 (JetPack 6.1+; TensorRT 10 switched to major*10000 + minor*100 + patch).
#: TensorRT only compares it to its own version to warn about a mismatch; the entries are read
#: whatever the number.
CALIB_CACHE_VERSIONS: Mapping[str, int] = {"8.2": 8201, "8.5": 8502, "10.3": 100300}

#: The desktop target accepts any TensorRT 10.x/11.x, so there is no single right number: the
#: cache says 10.3.0, the oldest release the Jetson targets share with desktop. (A strongly
#: typed network ignores calibration caches altogether; see DEPLOY.md.)
DESKTOP_CALIB_CACHE_VERSION = 100300

# Defaults for the optimization profile. Edge deployments are mostly batch-1 latency, so that
# is what TensorRT tunes its kernels for; larger batches up to the maximum still run.
DEFAULT_MAX_BATCH = 8
DEFAULT_OPT_BATCH = 1
ENGINE_NAME = "model.engine"
DLA_ENGINE_NAME = "model.dla.engine"
# Where JetPack installs trtexec (it is not on PATH there).
_JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


# --------------------------------------------------------------------------------------------
# Calibration ranges
# --------------------------------------------------------------------------------------------


def calib_amax_from_qdq(model: onnx.ModelProto) -> Dict[str, float]:
    """``{activation tensor name: amax}`` for every activation QuantizeLinear, ``amax = scale*127``.

    An activation Q is one whose input is not an initializer (weights are quantized offline).
    The name is the Q's input, i.e. the tensor TensorRT's calibrator would have measured. When
    one tensor feeds several Qs, the largest amax is kept so that no consumer clips.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
    amax: Dict[str, float] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        scale = _scalar(node.input[1], initializers, constants, node)
        value = float(scale) * INT8_MAX
        amax[node.input[0]] = max(value, amax.get(node.input[0], value))
    return amax


def _scalar(name: str, initializers: Mapping[str, onnx.TensorProto],
            constants: Mapping[str, onnx.NodeProto], node: onnx.NodeProto) -> float:
    """The single value of a per-tensor scale held in an initializer or a Constant node."""
    if name in initializers:
        values = numpy_helper.to_array(initializers[name])
    elif name in constants and constants[name].attribute:
        attr = constants[name].attribute[0]
        values = numpy_helper.to_array(attr.t) if attr.name == "value" else \
            np.asarray(onnx.helper.get_attribute_value(attr))
    else:
        raise BuildError(f"QuantizeLinear {node.name or node.output[0]!r}: scale {name!r} is not a "
                         "constant; cannot write a calibration cache")
    if values.size != 1:
        raise BuildError(f"QuantizeLinear {node.name or node.output[0]!r}: activation scale {name!r} "
                         f"has {values.size} values; a calibration cache holds one per tensor")
    return float(values.reshape(-1)[0])


def calib_cache_version(target: Target) -> int:
    """The TensorRT version number for `target`'s calib.cache header (see CALIB_CACHE_VERSIONS)."""
    if target.trt_version in CALIB_CACHE_VERSIONS:
        return CALIB_CACHE_VERSIONS[target.trt_version]
    if target.is_tensorrt and 10 in target.trt_major_versions:
        return DESKTOP_CALIB_CACHE_VERSION
    raise BuildError(f"no calibration cache version known for target {target.name} "
                     f"(TensorRT {target.trt_version})")


# --------------------------------------------------------------------------------------------
# Build commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Precision:
    """How a target's engine gets its precisions.

    `precision` is build_engine.py's ``--precision`` (``int8`` means INT8 + FP16 builder flags);
    None for a strongly typed network, whose precisions all come from the ONNX.
    """

    precision: Optional[str]
    strongly_typed: bool
    layernorm_fp32: bool

    @property
    def trtexec_flags(self) -> List[str]:
        """trtexec's precision flags for the same build."""
        if self.strongly_typed:
            return ["--stronglyTyped"]
        return {"int8": ["--int8", "--fp16"], "fp16": ["--fp16"], "fp32": []}[self.precision]


def _precision_flags(target: Target) -> _Precision:
    """The one place target → build precision is decided.

    A strongly typed network takes every precision from the ONNX (FP16 tensors, Q/DQ, LayerNorm
    kept FP32 by a Cast) and TensorRT refuses precision flags for it, so it gets none.
    """
    if target.strongly_typed:
        return _Precision(precision=None, strongly_typed=True, layernorm_fp32=False)
    if target.int8 and not target.fp16:
        # build_engine.py's int8 always adds FP16; no registered target needs INT8 + FP32.
        raise BuildError(f"target {target.name}: INT8 without FP16 has no build_engine.py precision")
    precision = "int8" if target.int8 else "fp16" if target.fp16 else "fp32"
    return _Precision(precision=precision, strongly_typed=False,
                      layernorm_fp32=target.layernorm_fp32 and precision != "fp32")


def _dims(batch: int, input_shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in (batch, *input_shape))


def _check_shape(input_shape: Sequence[int], max_batch: int, opt_batch: int) -> Tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise InputError(f"input shape must be C, H, W (positive), got {tuple(input_shape)}")
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise InputError(f"need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    return shape


def _profile(input_name: str, input_shape: Sequence[int], batches: Tuple[int, int, int]) -> List[str]:
    """``name:BxCxHxW`` for the min, opt and max shapes."""
    return [f"{input_name}:{_dims(b, input_shape)}" for b in batches]


def build_engine_command(target: Target | str, onnx_name: str, input_shape: Sequence[int],
                         max_batch: int = DEFAULT_MAX_BATCH, *, input_name: str = "input",
                         opt_batch: int = DEFAULT_OPT_BATCH, engine_name: str = ENGINE_NAME,
                         dla_core: Optional[int] = None) -> List[str]:
    """argv of ``python3 build_engine.py`` that builds `target`'s engine from `onnx_name`.

    `input_shape` is C, H, W (build_engine.py reads it from the ONNX; it is checked here so that
    this command and `trtexec_command` describe the same engine). The profile covers batch 1 to
    `max_batch`, tuned for `opt_batch`; with `dla_core` the engine is static at batch 1 (DLA
    takes no dynamic shapes).
    """
    target = get_target(target)
    _check_shape(input_shape, max_batch, opt_batch)
    precision = _precision_flags(target)
    argv = ["python3", "build_engine.py", onnx_name, "--out", engine_name]
    if precision.strongly_typed:
        argv.append("--strongly-typed")
    else:
        argv += ["--precision", precision.precision]
    if precision.layernorm_fp32:
        argv.append("--layernorm-fp32")
    low, opt, high = (1, 1, 1) if dla_core is not None else (1, opt_batch, max_batch)
    argv += ["--min-batch", str(low), "--opt-batch", str(opt), "--max-batch", str(high),
             "--input-name", input_name]
    if dla_core is not None:
        argv += ["--dla", str(dla_core)]
    return argv


def trtexec_command(target: Target | str, onnx_name: str, input_shape: Sequence[int],
                    max_batch: int = DEFAULT_MAX_BATCH, *, input_name: str = "input",
                    opt_batch: int = DEFAULT_OPT_BATCH, engine_name: str = ENGINE_NAME,
                    layernorm_layers: Sequence[str] = (), dla_core: Optional[int] = None,
                    trtexec: str = "trtexec") -> List[str]:
    """argv of the ``trtexec`` run equivalent to `build_engine_command`.

    trtexec cannot find LayerNorm layers itself, so pinning them to FP32 (targets with
    ``layernorm_fp32``) needs their names, `layernorm_layers` (the ONNX node names, which
    TensorRT's ONNX parser gives its layers).
    """
    target = get_target(target)
    shape = _check_shape(input_shape, max_batch, opt_batch)
    precision = _precision_flags(target)
    argv = [trtexec, f"--onnx={onnx_name}", f"--saveEngine={engine_name}", *precision.trtexec_flags]
    if precision.layernorm_fp32 and layernorm_layers:
        argv += ["--precisionConstraints=obey",
                 "--layerPrecisions=" + ",".join(f"{name}:fp32" for name in layernorm_layers)]
    batches = (1, 1, 1) if dla_core is not None else (1, opt_batch, max_batch)
    for flag, spec in zip(("--minShapes", "--optShapes", "--maxShapes"),
                          _profile(input_name, shape, batches)):
        argv.append(f"{flag}={spec}")
    if dla_core is not None:
        argv += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return argv


# --------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelFacts:
    """What the bundle needs to know about the ONNX it ships."""

    input_name: str
    input_shape: Tuple[Optional[int], ...]  # C, H, W as declared (None where dynamic)
    layernorm_layers: Tuple[str, ...]
    unnamed_layernorms: int


def _model_facts(path: Path) -> _ModelFacts:
    """Input name/shape and LayerNorm node names, read without loading external weights."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf raises several unrelated types
        raise InputError(f"cannot read ONNX model {str(path)!r}: {exc}") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"{path.name}: expected one image input, found {len(inputs)}")
    dims = tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in inputs[0].type.tensor_type.shape.dim)
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    return _ModelFacts(input_name=inputs[0].name, input_shape=dims[1:],
                       layernorm_layers=tuple(n.name for n in norms if n.name),
                       unnamed_layernorms=sum(1 for n in norms if not n.name))


def _check_images(images: np.ndarray, facts: _ModelFacts) -> np.ndarray:
    """Calibration images as float32 N×C×H×W matching the model's declared input."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0 or images.dtype != np.float32:
        raise InputError(f"calibration images must be float32 N×C×H×W with N > 0, got "
                         f"{images.dtype} {images.shape}")
    declared = facts.input_shape
    if len(declared) != 3 or any(d not in (None, 0, n) for d, n in zip(declared, images.shape[1:])):
        raise InputError(f"calibration images are {images.shape[1:]} but the model's input "
                         f"{facts.input_name!r} is {declared}")
    return np.ascontiguousarray(images)


def write_bundle(folder: Path, target: Target | str, onnx_model_path: Path,
                 calib_images: np.ndarray, amax: Optional[Mapping[str, float]],
                 build_record: Mapping, *, max_batch: int = DEFAULT_MAX_BATCH,
                 opt_batch: int = DEFAULT_OPT_BATCH) -> Dict[str, int]:
    """Write the deploy bundle for `target` into `folder`; returns ``{file name: size}``.

    `onnx_model_path` is the target's ONNX, already inside `folder`. `calib_images` are the
    preprocessed calibration images (float32 N×C×H×W). `amax` maps activation tensor names to
    calibrated ranges; None reads them from the ONNX's QuantizeLinear scales. `build_record` is
    the build.json content (its ``name`` titles DEPLOY.md). Targets without INT8 get no
    calib.cache. Every file is written under a temporary name and renamed into place.
    """
    folder, onnx_path = Path(folder), Path(onnx_model_path)
    target = get_target(target)
    if not target.is_tensorrt:
        raise BuildError(f"target {target.name} runs on {target.backend}; deploy bundles are "
                         "for TensorRT targets")
    if onnx_path.parent.resolve() != folder.resolve() or not onnx_path.is_file():
        raise InputError(f"{onnx_path} must be an existing file inside the bundle folder {folder}")
    facts = _model_facts(onnx_path)
    images = _check_images(calib_images, facts)
    shape = images.shape[1:]
    written = [_write_npy(folder / "calib.npy", images)]
    if target.int8:
        ranges = dict(amax) if amax is not None else calib_amax_from_qdq(onnx.load(str(onnx_path)))
        write_calib_cache(folder / "calib.cache", ranges, trt_version=calib_cache_version(target))
        written.append(folder / "calib.cache")
    written.append(_copy_script(BUILD_ENGINE_SOURCE, folder / "build_engine.py"))
    written.append(_copy_script(BENCHMARK_SOURCE, folder / "benchmark.py"))
    written.append(_copy_script(MEASURE_CORE_SOURCE, folder / "measure_core.py"))
    commands = _Commands(target, onnx_path.name, shape, facts, max_batch, opt_batch)
    written.append(_write_text(folder / "trtexec.txt", commands.trtexec_text()))
    written.append(_write_text(folder / "DEPLOY.md",
                               _deploy_markdown(target, build_record, commands, target.int8)))
    return {path.name: path.stat().st_size for path in written}


class _Commands:
    """The build commands of one bundle, rendered for trtexec.txt and DEPLOY.md."""

    def __init__(self, target: Target, onnx_name: str, shape: Sequence[int], facts: _ModelFacts,
                 max_batch: int, opt_batch: int) -> None:
        self.target, self.facts, self.onnx_name = target, facts, onnx_name
        common = dict(input_name=facts.input_name, opt_batch=opt_batch)
        self.build_engine = build_engine_command(target, onnx_name, shape, max_batch, **common)
        self.trtexec = trtexec_command(target, onnx_name, shape, max_batch,
                                       layernorm_layers=facts.layernorm_layers, **common)
        self.dla_build_engine = self.dla_trtexec = None
        if target.dla:
            dla = dict(common, engine_name=DLA_ENGINE_NAME, dla_core=0)
            self.dla_build_engine = build_engine_command(target, onnx_name, shape, max_batch, **dla)
            self.dla_trtexec = trtexec_command(target, onnx_name, shape, max_batch,
                                               layernorm_layers=facts.layernorm_layers, **dla)

    def trtexec_text(self) -> str:
        """trtexec.txt: the command line(s), with comments saying what each is for."""
        t = self.target
        lines = [f"# trtexec equivalent of build_engine.py for {t.name} ({t.description}).",
                 "# Run in this folder on the device; engines do not carry over to other GPUs or",
                 "# TensorRT versions."]
        if t.jetpack:
            lines.append(f"# On JetPack trtexec is not on PATH: it is {_JETSON_TRTEXEC}.")
        lines += self._layernorm_notes()
        lines.append(shlex.join(self.trtexec))
        if self.dla_trtexec:
            lines += ["",
                      "# Optional: DLA core 0, static batch 1 (DLA takes no dynamic shapes); layers",
                      "# DLA cannot run (LayerNorm, Softmax, GELU) fall back to the GPU, so compare",
                      "# its latency with the GPU engine before using it.",
                      shlex.join(self.dla_trtexec)]
        return "\n".join(lines) + "\n"

    def _layernorm_notes(self) -> List[str]:
        if not _precision_flags(self.target).layernorm_fp32:
            return []
        notes = ["# LayerNorm runs in FP32 (its variance overflows FP16): its layers are named in",
                 "# --layerPrecisions, and --precisionConstraints=obey makes TensorRT keep them."]
        if self.facts.unnamed_layernorms:
            notes.append(f"# WARNING: {self.facts.unnamed_layernorms} LayerNormalization node(s) have "
                         "no name and cannot be pinned here; build_engine.py pins them anyway.")
        if not self.facts.layernorm_layers and not self.facts.unnamed_layernorms:
            notes.append("# (this model has no LayerNormalization node)")
        return notes


def _deploy_markdown(target: Target, record: Mapping, commands: _Commands, has_cache: bool) -> str:
    """DEPLOY.md: what to run on the device, and what each file is."""
    name = record.get("name") or "model"
    lines = [f"# Deploying {name} on {target.name}", "",
             f"Target: {target.description}; ONNX: {target.onnx_kind}.", "",
             "TensorRT engines are not portable across GPUs and TensorRT versions, so the engine "
             "is built on the device itself, from the ONNX in this folder.", ""]
    if target.warning:
        lines += [f"**Note:** {target.warning}.", ""]
    lines += _precision_notes(_precision_flags(target))
    if _before_polygraphy(target):
        lines += [f"TensorRT {target.trt_version} is older than Polygraphy supports (8.5+, Python 3.8+), so "
                  "`build_engine.py` and `benchmark.py` do not run here: build and time with `trtexec`.", "",
                  "## 1. Build the engine (on the device, in this folder)", "",
                  "```", shlex.join(commands.trtexec), "```", "",
                  "## 2. Benchmark", "", "```", shlex.join(_trtexec_timing(commands)), "```", ""]
    else:
        lines += ["## 1. Build the engine (on the device, in this folder)", "",
                  "```", shlex.join(commands.build_engine), "```", "",
                  "or, with TensorRT's own tool (same flags, see `trtexec.txt`):", "",
                  "```", shlex.join(commands.trtexec), "```", ""]
        if commands.dla_build_engine:
            lines += ["Optional DLA engine (static batch 1; unsupported layers fall back to the GPU):", "",
                      "```", shlex.join(commands.dla_build_engine), "```", ""]
        lines += ["## 2. Benchmark (and compare with ONNX Runtime)", "", "```", "python3 benchmark.py .", "```",
                  ""]
    lines += ["## Files", ""]
    lines += [f"- `{commands.onnx_name}`: the model, {target.onnx_kind}."]
    lines += ["- `calib.npy`: the preprocessed calibration images (float32 N×C×H×W), for "
              "calibrating or checking accuracy on the device."]
    if has_cache:
        lines += ["- `calib.cache`: the calibrated activation ranges in TensorRT's calibration cache "
                  "format. The Q/DQ ONNX already carries them and TensorRT ignores caches for "
                  "networks with Q/DQ, so it only serves to inspect the ranges, or an implicit-INT8 "
                  "build from an FP32 ONNX with *these* ranges (`--trt-calibrator entropy --calib-cache "
                  "calib.cache --reuse-calib-cache`, TensorRT 8.5-10). A build with `--trt-calibrator "
                  "entropy --calib calib.npy` always calibrates on the device and writes TensorRT's "
                  "scales to its `--calib-cache` (`entropy.cache`)."]
    lines += ["- `build_engine.py`: builds the engine with Polygraphy (`jetson/setup.sh` installs it).",
              "- `benchmark.py`: times the engines in this folder (latency, throughput, memory) and, with an "
              "`eval.npz`, their top-1 and agreement with ONNX Runtime; it loads `build_engine.py` and "
              "`measure_core.py` (timing, statistics, tables) from this folder. `python3 benchmark.py --help`.",
              "- `trtexec.txt`: the same build as `trtexec` command lines."]
    return "\n".join(lines) + "\n"


def _precision_notes(precision: _Precision) -> List[str]:
    """DEPLOY.md sentences explaining the precision flags, so nobody 'fixes' them on the device."""
    if precision.strongly_typed:
        return ["The network is strongly typed: TensorRT runs the types written in the ONNX (FP16 "
                "tensors, INT8 Q/DQ, LayerNorm kept FP32 by Casts), so no precision flags are "
                "passed (trtexec: no --fp16/--int8); TensorRT refuses them for strongly typed "
                "networks.", ""]
    if precision.layernorm_fp32:
        return ["LayerNorm layers are pinned to FP32 (their variance overflows FP16); keep "
                "`--layernorm-fp32` (trtexec: `--precisionConstraints=obey --layerPrecisions`).", ""]
    return []


def _before_polygraphy(target: Target) -> bool:
    """JetPack 4.6's TensorRT 8.2 (TX2): Polygraphy, and so our device scripts, need 8.5+."""
    from .trt.build_engine import version_tuple

    return version_tuple(target.trt_version)[:2] < POLYGRAPHY_MIN_TRT


def _trtexec_timing(commands: _Commands) -> List[str]:
    """trtexec timing the engine it just built, at batch 1 (where Polygraphy cannot run)."""
    engine = next((a.split("=", 1)[1] for a in commands.trtexec if a.startswith("--saveEngine=")), "model.engine")
    shape = next((a.split("=", 1)[1] for a in commands.trtexec if a.startswith("--optShapes=")), None)
    return [commands.trtexec[0], f"--loadEngine={engine}"] + ([f"--shapes={shape}"] if shape else [])


# --------------------------------------------------------------------------------------------
# Atomic file writes
# --------------------------------------------------------------------------------------------


def _write_npy(path: Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _copy_script(source_path: Path, target: Path) -> Path:
    """Copy one of the package's standalone device scripts into the bundle."""
    if not source_path.is_file():
        raise BuildError(f"{source_path} is missing from the vitdeploy installation")
    with open(source_path, "rb") as source:
        return atomic_write(target, lambda f: shutil.copyfileobj(source, f))
