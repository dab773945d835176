"""TensorRT engines at run time: `TrtRunner` (Polygraphy's, with vitdeploy's checks), engine metadata
and portability checks.

    with TrtRunner("engines/vit/model.engine") as runner:
        logits = runner.infer({"input": batch})["logits"]
        runner.last_inference_time()

Engines are built on the device by ``vitdeploy/trt/build_engine.py`` and are not portable: one
only loads in the TensorRT version that built it and only runs on that GPU architecture. The
``model.engine.json`` written next to each engine records both, so `check_engine_compatible` can
say *why* an engine will not load. TensorRT and Polygraphy are imported lazily: without them
`TrtRunner` raises `BuildError` with one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
from .errors import BuildError, InputError
from .log import get_logger
from .trt import build_engine as _engine_tools

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
    return _engine_tools.version_tuple(version)[:3]


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


class TrtRunner(PolygraphyTrtRunner):
    """Polygraphy's TrtRunner on a serialized engine, checked first against this GPU and TensorRT.

    The engine's ``<engine>.json`` (when there, or ``metadata``) is checked when the runner activates
    (`check_engine_compatible`), so a stale engine fails with the reason as one-line `BuildError`, not
    TensorRT's bare deserialization error; an engine built for a DLA core runs on it.
    """

    def __init__(self, engine_path: Union[str, Path], metadata: Union[str, Path, Mapping, None] = "auto",
                 check_compatibility: bool = True):
        self.is_active = False  # Polygraphy's __del__ reads it, also after a failed __init__
        try:
            self._trt, self._pg = _engine_tools.import_backend()
        except _engine_tools.UsageError as exc:
            raise BuildError(f"{exc}; use OrtRunner (ONNX Runtime) elsewhere") from None
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise InputError(f"TensorRT engine not found: {self.engine_path}")
        if metadata == "auto":
            path = engine_metadata_path(self.engine_path)
            metadata = path if path.is_file() else None
        self.metadata = (validate_engine_metadata(dict(metadata)) if isinstance(metadata, Mapping)
                         else load_engine_metadata(metadata) if metadata is not None else None)
        self.check_compatibility = check_compatibility
        super().__init__(self._load, name=self.engine_path.name)

    def _load(self):
        if self.metadata is not None and self.check_compatibility:
            gpu = _engine_tools.cuda_device()
            verdict = check_engine_compatible(self.metadata, gpu["name"], gpu["compute_capability"],
                                              self._trt.__version__)
            for message in verdict.warnings:
                log.warning("%s: %s", self.engine_path.name, message)
            if not verdict.ok:
                raise BuildError(f"{self.engine_path}: " + " ".join(verdict.errors))
        dla = ((self.metadata or {}).get("precision") or {}).get("dla_core")
        try:
            return _engine_tools.engine_loader(self._trt, self._pg, str(self.engine_path), dla)()
        except Exception as exc:  # noqa: BLE001 - Polygraphy raises its own exception type
            raise BuildError(f"TensorRT cannot load {self.engine_path}: {str(exc).strip().splitlines()[-1]}; "
                             f"{_REBUILD}") from None
