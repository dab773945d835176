"""Read and write TensorRT INT8 calibration cache files.

The format is what TensorRT's ``IInt8EntropyCalibrator2`` writes and reads back::

    TRT-8601-EntropyCalibration2
    input: 3c010a14
    /blocks.0/attn/qkv/MatMul_output_0: 3d1a2b3c

One header line, then one line per tensor: the tensor name, ``": "`` and the quantization scale
(``amax / 127``) as the big-endian bits of an IEEE float32, in lower-case hex. Tensor names can
contain ``':'`` (and even ``": "``), so a line is split on its *last* ``": "``.

This module speaks in amax (the clipping magnitude calibrators produce); the conversion to and
from the scale happens only here.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

from vitdeploy.errors import InputError

__all__ = [
    "DEFAULT_TRT_VERSION",
    "DEFAULT_ALGORITHM",
    "INT8_MAX",
    "write_calib_cache",
    "read_calib_cache",
    "scale_to_hex",
    "hex_to_scale",
]

#: Version number written into the header, in TensorRT's NV_TENSORRT_VERSION style: 8601 is
#: TensorRT 8.6.1 (major*1000 + minor*100 + patch); TensorRT 10 uses major*10000 + minor*100 +
#: patch, e.g. 100300 for 10.3.0. TensorRT only compares it to warn about a version mismatch.
DEFAULT_TRT_VERSION = 8601

#: Calibration algorithm named in the header; entropy calibration 2 is TensorRT's default.
DEFAULT_ALGORITHM = "EntropyCalibration2"

#: Largest symmetric INT8 code: scale = amax / INT8_MAX.
INT8_MAX = 127

_SEPARATOR = ": "
_HEADER_RE = re.compile(r"TRT-(\d+)-(\S+)")
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,8}")

PathLike = Union[str, "os.PathLike[str]"]


def scale_to_hex(scale: float) -> str:
    """Big-endian float32 bits of ``scale`` as 8 lower-case hex digits (``1.0 -> '3f800000'``).

    Raises :class:`InputError` unless the scale is finite and > 0 once rounded to float32.
    """
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"scale {scale!r} is not a number") from None
    _check_scale(scale, "scale")
    try:
        packed = struct.pack(">f", scale)
    except OverflowError:
        raise InputError(f"scale {scale!r} does not fit in a float32") from None
    _check_scale(struct.unpack(">f", packed)[0], f"scale {scale!r} rounded to float32")
    return packed.hex()


def hex_to_scale(h: str) -> float:
    """Inverse of :func:`scale_to_hex`: the float32 whose big-endian bits are the hex ``h``.

    Accepts 1 to 8 hex digits of either case (leading zeros may be omitted). Does not check
    the sign or finiteness of the result; :func:`read_calib_cache` does.
    """
    if not isinstance(h, str) or not _HEX_RE.fullmatch(h):
        raise InputError(f"{h!r} is not a float32 hex value (1 to 8 hex digits)")
    return struct.unpack(">f", int(h, 16).to_bytes(4, "big"))[0]


def write_calib_cache(
    path: PathLike,
    amaxes: Mapping[str, float],
    trt_version: int = DEFAULT_TRT_VERSION,
    algorithm: str = DEFAULT_ALGORITHM,
) -> None:
    """Write ``{tensor name: amax}`` as a TensorRT calibration cache at ``path``.

    Entries keep the mapping's order. The file is written to a temporary name in the same
    folder and then renamed over ``path``, so a reader never sees a half-written cache.
    """
    from .outputs import atomic_write

    text = _format_cache(amaxes, trt_version, algorithm)
    try:
        atomic_write(Path(path), lambda f: f.write(text), mode="w")
    except OSError as exc:
        raise InputError(f"cannot write calibration cache {path}: {exc}") from None


def read_calib_cache(path: PathLike) -> Tuple[str, Dict[str, float]]:
    """Read a TensorRT calibration cache: ``(header line, {tensor name: amax})``.

    ``amax = scale * 127`` with the scale read back exactly as float32, so writing the result
    again reproduces the same hex values. Any malformed line raises :class:`InputError` naming
    the file and the line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read calibration cache {path}: {exc}") from None
    # Split on '\n' only: str.splitlines() would also break names at exotic separators.
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if not lines[0].strip():
        raise InputError(f"{path}:1: empty calibration cache (expected a 'TRT-<version>-<algorithm>' header)")
    header = lines[0].strip()
    if not _HEADER_RE.fullmatch(header):
        raise InputError(f"{path}:1: expected a 'TRT-<version>-<algorithm>' header, got {lines[0]!r}")
    amaxes: Dict[str, float] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # tolerate blank lines, e.g. a trailing one
        name, amax = _parse_entry(line, f"{path}:{lineno}")
        if name in amaxes:
            raise InputError(f"{path}:{lineno}: tensor {name!r} appears twice")
        amaxes[name] = amax
    return header, amaxes


def _format_cache(amaxes: Mapping[str, float], trt_version: int, algorithm: str) -> str:
    """The whole cache file as text, validating every input first."""
    if isinstance(trt_version, bool) or not isinstance(trt_version, int) or trt_version <= 0:
        raise InputError(f"trt_version must be a positive integer like 8601, got {trt_version!r}")
    if not isinstance(algorithm, str) or not re.fullmatch(r"\S+", algorithm):
        raise InputError(f"algorithm must be a non-empty word like 'EntropyCalibration2', got {algorithm!r}")
    lines = [f"TRT-{trt_version}-{algorithm}"]
    for name, amax in amaxes.items():
        _check_name(name)
        try:
            scale = float(amax) / INT8_MAX
        except (TypeError, ValueError):
            raise InputError(f"tensor {name!r}: amax {amax!r} is not a number") from None
        try:
            lines.append(f"{name}{_SEPARATOR}{scale_to_hex(scale)}")
        except InputError as exc:
            raise InputError(f"tensor {name!r}: amax {amax!r} gives an invalid scale ({exc})") from None
    return "\n".join(lines) + "\n"


def _parse_entry(line: str, where: str) -> Tuple[str, float]:
    """Split ``'<name>: <hex>'`` on its last separator and decode it to ``(name, amax)``."""
    name, sep, value = line.rstrip().rpartition(_SEPARATOR)
    if not sep or not name:
        raise InputError(f"{where}: expected '<tensor name>: <hex scale>', got {line!r}")
    try:
        scale = hex_to_scale(value)
        _check_scale(scale, "scale")
    except InputError as exc:
        raise InputError(f"{where}: tensor {name!r}: {exc}") from None
    return name, scale * INT8_MAX


def _check_scale(scale: float, what: str) -> None:
    """A quantization scale must be a finite positive number."""
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"{what} must be finite and > 0, got {scale!r}")


def _check_name(name: object) -> None:
    """Names must survive the line-based format unchanged."""
    if not isinstance(name, str) or not name:
        raise InputError(f"tensor names must be non-empty strings, got {name!r}")
    if "\n" in name or "\r" in name:
        raise InputError(f"tensor name {name!r} contains a line break")
