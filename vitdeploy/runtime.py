"""TensorRT engines at run time: `TrtRunner`, engine metadata checks, portability checks.

    with TrtRunner("engines/vit/model.engine") as runner:
        logits = runner.infer({"input": batch})["logits"]
        runner.last_latency_ms, runner.last_compute_ms

Engines are built on the device by ``vitdeploy/trt/build_engine.py`` and are not portable: one
only loads in the TensorRT version that built it and only runs on that GPU architecture. The
``model.engine.json`` written next to each engine records both, so `check_engine_compatible` can
say *why* an engine will not load instead of TensorRT's bare deserialization error.

TensorRT and CUDA (cuda-python, else PyCUDA) are imported lazily: this module imports fine on a
machine without them, and `TrtRunner` then raises `BuildError` with one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .backends.base import Runner, TensorSpec
from .errors import BuildError, InputError
from .log import get_logger
from .trt import build_engine as _engine_tools
from .trt import device as _device

__all__ = [
    "TrtRunner",
    "EngineCompatibility",
    "load_engine_metadata",
    "validate_engine_metadata",
    "check_engine_compatible",
    "engine_metadata_path",
    "METADATA_SCHEMA",
]

log = get_logger("runtime")

METADATA_SCHEMA = _engine_tools.METADATA_SCHEMA

_BUILT_PRECISIONS = ("int8", "fp16", "fp32", "strongly-typed")

_REBUILD = "rebuild it on this device with build_engine.py"


# ---------------------------------------------------------------------------------------------
# model.engine.json
# ---------------------------------------------------------------------------------------------


def engine_metadata_path(engine_path: Union[str, Path]) -> Path:
    """Where build_engine.py writes an engine's metadata: ``model.engine`` -> ``model.engine.json``."""
    return Path(str(engine_path) + ".json")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(problems: List[str], where: str, value: Any, kinds: Tuple[type, ...], what: str) -> bool:
    """Record a problem unless ``value`` is one of ``kinds`` (ints exclude bools); returns ok."""
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        problems.append(f"'{where}' must be {what}, got {value!r}")
    return ok


def _check_tensors(problems: List[str], key: str, tensors: Any) -> None:
    """inputs/outputs: non-empty lists of {name: str, shape: [int], dtype: str}."""
    if not _check_type(problems, key, tensors, (list,), "a non-empty list of tensors") or not tensors:
        if isinstance(tensors, list):
            problems.append(f"'{key}' must not be empty")
        return
    for i, tensor in enumerate(tensors):
        where = f"{key}[{i}]"
        if not _check_type(problems, where, tensor, (dict,), "an object"):
            continue
        _check_type(problems, f"{where}.name", tensor.get("name"), (str,), "a string")
        _check_type(problems, f"{where}.dtype", tensor.get("dtype"), (str,), "a string")
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= -1 for d in shape)):
            problems.append(f"'{where}.shape' must be a list of ints (-1 for dynamic), got {shape!r}")


def _check_device(problems: List[str], device: Any) -> None:
    if not _check_type(problems, "device", device, (dict,), "an object"):
        return
    if device.get("name") is not None:
        _check_type(problems, "device.name", device.get("name"), (str,), "a string or null")
    cc = device.get("compute_capability")
    if cc is not None and not (isinstance(cc, list) and len(cc) == 2 and all(_is_int(v) and v >= 0 for v in cc)):
        problems.append(f"'device.compute_capability' must be [major, minor] or null, got {cc!r}")


def _check_precision(problems: List[str], precision: Any) -> None:
    if not _check_type(problems, "precision", precision, (dict,), "an object"):
        return
    if precision.get("built") not in _BUILT_PRECISIONS:
        problems.append(f"'precision.built' must be one of {list(_BUILT_PRECISIONS)}, got {precision.get('built')!r}")
    _check_type(problems, "precision.strongly_typed", precision.get("strongly_typed"), (bool,), "true or false")
    flags = precision.get("builder_flags")
    if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
        problems.append(f"'precision.builder_flags' must be a list of strings, got {flags!r}")


def _check_batch_profile(problems: List[str], profile: Any) -> None:
    if profile is None or not _check_type(problems, "batch_profile", profile, (dict,), "an object or null"):
        return
    values = [profile.get(k) for k in ("min", "opt", "max")]
    if not (all(_is_int(v) for v in values) and 1 <= values[0] <= values[1] <= values[2]):
        problems.append(f"'batch_profile' must have integers 1 <= min <= opt <= max, got {profile!r}")


def _check_layers(problems: List[str], layers: Any) -> None:
    if layers is None or not _check_type(problems, "layers", layers, (list,), "a list or null"):
        return
    for i, layer in enumerate(layers):
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)
                and (layer.get("precision") is None or isinstance(layer.get("precision"), str))):
            problems.append(f"'layers[{i}]' must be {{name: string, precision: string or null}}, got {layer!r}")
            break  # one example is enough; an inspector dump can hold thousands of layers


def validate_engine_metadata(meta: Any, source: str = "engine metadata") -> Dict[str, Any]:
    """Check a ``model.engine.json`` record against the schema; returns it unchanged.

    Required: ``schema`` (= `METADATA_SCHEMA`), ``engine``, ``tensorrt_version``, ``device``
    {name, compute_capability}, ``precision`` {built, strongly_typed, builder_flags}, ``inputs``
    and ``outputs`` [{name, shape, dtype}], ``batch_profile`` (null or {min, opt, max}),
    ``layers`` (null or [{name, precision}]) and ``preprocessing`` (null or an object).
    Raises InputError naming ``source`` and every problem found.
    """
    if not isinstance(meta, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(meta).__name__}")
    required = ("schema", "engine", "tensorrt_version", "device", "precision", "inputs", "outputs",
                "batch_profile", "layers", "preprocessing")
    missing = [key for key in required if key not in meta]
    if missing:
        raise InputError(f"{source}: missing key(s) {missing} (not written by build_engine.py?)")
    problems: List[str] = []
    if meta["schema"] != METADATA_SCHEMA:
        problems.append(f"'schema' must be {METADATA_SCHEMA!r}, got {meta['schema']!r}")
    _check_type(problems, "engine", meta["engine"], (str,), "a string")
    if _check_type(problems, "tensorrt_version", meta["tensorrt_version"], (str,), "a string") \
            and not meta["tensorrt_version"].strip():
        problems.append("'tensorrt_version' must not be empty")
    _check_device(problems, meta["device"])
    _check_precision(problems, meta["precision"])
    _check_tensors(problems, "inputs", meta["inputs"])
    _check_tensors(problems, "outputs", meta["outputs"])
    _check_batch_profile(problems, meta["batch_profile"])
    _check_layers(problems, meta["layers"])
    if meta["preprocessing"] is not None:
        _check_type(problems, "preprocessing", meta["preprocessing"], (dict,), "an object or null")
    if problems:
        raise InputError(f"{source}: invalid engine metadata: " + "; ".join(problems))
    return meta


def load_engine_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and validate ``model.engine.json``; InputError for a missing, unreadable or bad file."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"engine metadata not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read engine metadata {path}: {exc}") from None
    return validate_engine_metadata(meta, source=str(path))


# ---------------------------------------------------------------------------------------------
# Portability
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCompatibility:
    """Whether an engine can run here: ``errors`` block loading, ``warnings`` do not."""

    errors: Tuple[str, ...] = ()
    warnings: Tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def explain(self) -> str:
        """All messages, errors first, one per line."""
        return "\n".join([f"error: {m}" for m in self.errors] + [f"warning: {m}" for m in self.warnings])


def _sm(cc: Optional[Sequence[int]]) -> str:
    return f"sm_{cc[0]}{cc[1]}" if cc else "unknown sm"


def _release(version: Any) -> Tuple[int, ...]:
    """major.minor.patch of a TensorRT version string: the part an engine is tied to."""
    return _device.version_tuple(version)[:3]


def _check_trt_version(built: str, here: Optional[str]) -> Tuple[List[str], List[str]]:
    if not here:
        return [], ["cannot tell which TensorRT is installed: the engine may not load"]
    if not _release(built) or not _release(here):
        return [], [f"cannot compare TensorRT versions {built!r} and {here!r}"]
    if _release(built) != _release(here):
        return [f"engine built with TensorRT {built}, this is TensorRT {here}: an engine only loads in the "
                f"TensorRT version that built it; {_REBUILD}"], []
    return [], []


def _check_gpu(meta_device: Mapping[str, Any], name: Optional[str],
               cc: Optional[Sequence[int]]) -> Tuple[List[str], List[str]]:
    built_name, built_cc = meta_device.get("name"), meta_device.get("compute_capability")
    if built_cc is None:
        return [], [f"the metadata does not say which GPU built the engine: cannot check it suits "
                    f"{name or 'this GPU'}"]
    if cc is None:
        return [], [f"cannot query this GPU: the engine needs {_sm(built_cc)} ({built_name or 'unknown GPU'})"]
    if tuple(built_cc) != tuple(cc):
        return [f"engine built for {built_name or 'a GPU'} ({_sm(built_cc)}), this GPU is {name or 'unknown'} "
                f"({_sm(cc)}): engines only run on the GPU architecture they were built for; {_REBUILD}"], []
    if built_name and name and built_name != name:
        return [], [f"engine tuned on {built_name}, running on {name} (both {_sm(cc)}): it runs, but its kernels "
                    f"were timed on the other GPU; {_REBUILD} for best speed"]
    return [], []


def check_engine_compatible(meta: Mapping[str, Any], device_name: Optional[str],
                            compute_capability: Optional[Sequence[int]],
                            trt_version: Optional[str]) -> EngineCompatibility:
    """Explain whether the engine described by ``meta`` can run on this GPU with this TensorRT.

    Different compute capability or TensorRT release (major.minor.patch): errors -- TensorRT
    refuses the engine. Same architecture but another GPU model (say Orin NX vs AGX Orin):
    a warning -- it runs, with kernels tuned for the other one. Unknown values: warnings.
    """
    errors, notes = _check_trt_version(str(meta.get("tensorrt_version", "")), trt_version)
    gpu_errors, gpu_notes = _check_gpu(meta.get("device") or {}, device_name, compute_capability)
    return EngineCompatibility(errors=tuple(errors + gpu_errors), warnings=tuple(notes + gpu_notes))


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def _import_tensorrt():
    """``tensorrt``, or BuildError with one line."""
    try:
        return _device.import_tensorrt()
    except _device.TensorRTNotFound:
        raise BuildError("TensorRT not found (cannot import tensorrt): TrtRunner runs engines on the device "
                         "that built them; use OrtRunner (ONNX Runtime) elsewhere") from None


def _quietly(fn, *args) -> None:
    """Run a cleanup call; a CUDA error while tearing down must not hide the error that caused it."""
    try:
        fn(*args)
    except RuntimeError as exc:
        log.debug("cleanup %s failed: %s", getattr(fn, "__name__", fn), exc)


class TrtRunner(Runner):
    """Runs a serialized TensorRT engine on NumPy batches, by input/output name.

    Any batch inside the engine's optimization profile works (1..max for a dynamic batch).
    Uses TensorRT's name-based tensor API (8.5+, required from 10) or the 8.x bindings API,
    whichever the engine has; device memory, the stream and CUDA events come from cuda-python
    (preferred) or PyCUDA. ``last_latency_ms`` is the device time of one `infer` (host->device
    copies, execution, device->host copies) from CUDA events; ``last_compute_ms`` the execution
    alone.

    Args:
        engine_path: the ``.engine`` file.
        metadata: ``"auto"`` reads ``<engine>.json`` when present; a path must exist; a dict
            is validated; None skips it.
        check_compatibility: refuse (BuildError) an engine whose metadata says it was built for
            another GPU architecture or TensorRT release, with the reason.
        device: CUDA device index.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Union[str, Path], metadata: Union[str, Path, Mapping, None] = "auto",
                 check_compatibility: bool = True, device: int = 0):
        super().__init__()
        self._trt = _import_tensorrt()
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise InputError(f"TensorRT engine not found: {self.engine_path}")
        self.metadata = self._resolve_metadata(metadata)
        self.check_compatibility = check_compatibility
        self.device = device
        self.last_compute_ms: Optional[float] = None
        self._reset_state()

    def _resolve_metadata(self, metadata) -> Optional[Dict[str, Any]]:
        if metadata is None:
            return None
        if isinstance(metadata, Mapping):
            return validate_engine_metadata(dict(metadata))
        if metadata == "auto":
            path = engine_metadata_path(self.engine_path)
            return load_engine_metadata(path) if path.is_file() else None
        return load_engine_metadata(metadata)

    def _reset_state(self) -> None:
        self._cuda = None
        self._runtime = None
        self._engine = None
        self._context = None
        self._stream = None
        self._events: List[Any] = []
        self._buffers: Dict[str, Tuple[int, int]] = {}
        self._io: List[Dict[str, Any]] = []
        self._profiles: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
        self._tensor_api = False

    # lifecycle -------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        try:
            self._cuda = _device.load_cuda(self.device)
        except _device.CudaNotFound as exc:
            raise BuildError(str(exc)) from None
        except RuntimeError as exc:
            raise BuildError(f"CUDA is not usable here: {exc}") from None
        try:
            self._check_compatibility()
            self._load_engine()
            self._stream = self._cuda.stream_create()
            self._events = [self._cuda.event_create() for _ in range(4)]
        except BaseException:
            self._release()
            raise

    def deactivate_impl(self) -> None:
        self._release()

    def _check_compatibility(self) -> None:
        """Refuse, with the reason, an engine built for another GPU or TensorRT."""
        if self.metadata is None or not self.check_compatibility:
            return
        try:
            name, cc = self._cuda.device_properties()
        except (RuntimeError, AttributeError):
            name, cc = None, None
        verdict = check_engine_compatible(self.metadata, name, cc, getattr(self._trt, "__version__", None))
        for message in verdict.warnings:
            log.warning("%s: %s", self.engine_path, message)
        if not verdict.ok:
            raise BuildError(f"{self.engine_path}: " + "; ".join(verdict.errors))

    def _load_engine(self) -> None:
        trt = self._trt
        self._runtime = trt.Runtime(_device.get_trt_logger(trt))
        dla_core = ((self.metadata or {}).get("precision") or {}).get("dla_core")
        if dla_core is not None:
            self._runtime.DLA_core = dla_core
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise BuildError(f"TensorRT {trt.__version__} cannot load {self.engine_path}: an engine only loads in "
                             f"the TensorRT version and on the GPU architecture that built it; {_REBUILD}")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._tensor_api = _device.uses_tensor_api(engine, self._context)
        self._io = _device.engine_io(engine, trt)
        for tensor in self._io:
            try:
                tensor["np_dtype"] = np.dtype(tensor["dtype"])
            except TypeError:
                raise BuildError(f"{self.engine_path}: tensor '{tensor['name']}' is {tensor['dtype']}, which NumPy "
                                 f"cannot hold; build the engine with float32/float16 I/O") from None
        # (min shape, max shape) each input accepts: its profile 0, or its static shape.
        self._profiles = {t["name"]: _device.profile_range(engine, t, self._tensor_api)
                          for t in self._io if t["is_input"]}

    def _release(self) -> None:
        """Free device memory, events and stream, then the context before the engine."""
        cuda = self._cuda
        if cuda is not None:
            for ptr, _size in self._buffers.values():
                _quietly(cuda.free, ptr)
            for event in self._events:
                _quietly(cuda.event_destroy, event)
            if self._stream is not None:
                _quietly(cuda.stream_destroy, self._stream)
        self._context = None
        self._engine = None
        self._runtime = None
        if cuda is not None:
            _quietly(cuda.close)
        self._reset_state()

    # inference -------------------------------------------------------------------------------
    def input_spec_impl(self) -> Dict[str, TensorSpec]:
        if self._engine is None:
            raise RuntimeError(f"{self.name}: use the runner inside a 'with' block")
        return {t["name"]: TensorSpec(tuple(None if d < 0 else d for d in t["shape"]), t["np_dtype"])
                for t in self._io if t["is_input"]}

    def output_names(self) -> List[str]:
        return [t["name"] for t in self._io if not t["is_input"]]

    def infer_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        inputs = {t["name"]: np.ascontiguousarray(feeds[t["name"]]) for t in self._io if t["is_input"]}
        for tensor in self._io:
            if tensor["is_input"]:
                self._set_input_shape(tensor, inputs[tensor["name"]].shape)
        outputs = {t["name"]: np.empty(self._output_shape(t), t["np_dtype"]) for t in self._io if not t["is_input"]}
        arrays = {**inputs, **outputs}
        # device memory per tensor, grown (never shrunk) to the largest batch seen
        pointers = {name: _device.ensure_buffer(self._cuda, self._buffers, name, array.nbytes)
                    for name, array in arrays.items()}
        self._run(inputs, outputs, pointers)
        return outputs

    def _set_input_shape(self, tensor: Dict[str, Any], shape: Tuple[int, ...]) -> None:
        low, high = self._profiles[tensor["name"]]
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            raise InputError(f"{self.name}: input '{tensor['name']}' has shape {list(shape)}, the engine's profile "
                             f"takes {list(low)} to {list(high)}; rebuild with a larger --max-batch for bigger batches")
        if _device.set_input_shape(self._context, tensor, shape, self._tensor_api) is False:
            raise InputError(f"{self.name}: TensorRT rejected shape {list(shape)} for input '{tensor['name']}'")

    def _output_shape(self, tensor: Dict[str, Any]) -> Tuple[int, ...]:
        shape = _device.output_shape(self._context, tensor, self._tensor_api)
        if any(d < 0 for d in shape):
            raise RuntimeError(f"{self.name}: TensorRT could not infer the shape of output '{tensor['name']}' "
                               f"({list(shape)})")
        return shape

    def _run(self, inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray], pointers: Dict[str, int]) -> None:
        """Copy in, execute, copy out on our stream, timing both spans with CUDA events."""
        cuda, stream = self._cuda, self._stream
        start, compute_start, compute_end, end = self._events
        cuda.event_record(start, stream)
        for name, array in inputs.items():
            if array.nbytes:
                cuda.htod(pointers[name], array, stream)
        bindings = _device.bind(self._engine, self._context, self._io, pointers, self._tensor_api)
        cuda.event_record(compute_start, stream)
        ok = _device.enqueue(self._context, bindings, cuda.stream_handle(stream), self._tensor_api)
        cuda.event_record(compute_end, stream)
        if not ok:
            cuda.stream_synchronize(stream)
            raise RuntimeError(f"{self.name}: TensorRT failed to execute {self.engine_path} (see its log)")
        for name, array in outputs.items():
            if array.nbytes:
                cuda.dtoh(array, pointers[name], stream)
        cuda.event_record(end, stream)
        cuda.stream_synchronize(stream)
        self.last_compute_ms = cuda.event_elapsed_ms(compute_start, compute_end)
        self.last_latency_ms = cuda.event_elapsed_ms(start, end)
