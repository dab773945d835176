"""The precision plan: which layer runs in which precision, as a JSON file people can read and edit.

    {
      "format": "vitdeploy-plan/1",
      "default": "int8",
      "layers": {"patch_embed.proj": "fp16", "blocks.*.attn.matmul_*": "int8", "head": "fp16"}
    }

Layers are named by module path; the attention matmuls as ``<attention path>.matmul_qk`` and
``.matmul_av``. Keys may be fnmatch patterns (ModelOpt's quantizer configuration works the same
way): ``default`` applies first, then the entries in file order, later ones winning. A key that
matches no layer is an error, so a typo cannot silently leave a layer in the wrong precision.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .artifacts import read_json, write_json
from .errors import InputError

FORMAT = "vitdeploy-plan/1"
PRECISIONS = ("int8", "int8-asym", "fp16", "fp32")
QUANTIZED = ("int8", "int8-asym")


@dataclasses.dataclass
class PrecisionPlan:
    default: str = "int8"
    layers: Dict[str, str] = dataclasses.field(default_factory=dict)   # name or pattern → precision
    meta: Dict[str, object] = dataclasses.field(default_factory=dict)  # how the plan was chosen

    def resolve(self, layer_names: Iterable[str]) -> Dict[str, str]:
        """Precision of every layer; unknown names or patterns matching nothing raise InputError."""
        names = list(layer_names)
        _check_precision("default", self.default)
        resolved = {name: self.default for name in names}
        for key, precision in self.layers.items():
            _check_precision(key, precision)
            matched = [n for n in names if n == key or fnmatch.fnmatchcase(n, key)]
            if not matched:
                close = [n for n in names if key.split(".")[-1] in n][:3]
                hint = f" (layers look like: {', '.join(close or names[:3])})" if names else ""
                raise InputError(f"plan entry '{key}' matches no layer of this model{hint}")
            for name in matched:
                resolved[name] = precision
        return resolved

    def to_dict(self) -> dict:
        return {"format": FORMAT, "default": self.default, "layers": dict(self.layers), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "PrecisionPlan":
        if not isinstance(d, dict) or not isinstance(d.get("layers", {}), dict):
            raise InputError(f"{where}: expected an object with a 'layers' object")
        if d.get("format", FORMAT) != FORMAT:
            raise InputError(f"{where}: unknown format '{d.get('format')}' (expected {FORMAT})")
        if not isinstance(d.get("meta", {}), dict):
            raise InputError(f"{where}: 'meta' must be an object, got {type(d['meta']).__name__}")
        for key, value in [("default", d.get("default", "int8"))] + list(d.get("layers", {}).items()):
            if not isinstance(value, str):
                raise InputError(f"{where}: entry '{key}' must be a precision string "
                                 f"({', '.join(PRECISIONS)}), got {json.dumps(value)}")
        return cls(default=d.get("default", "int8"), layers=dict(d.get("layers", {})), meta=dict(d.get("meta", {})))


def _check_precision(key: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"plan entry '{key}': precision '{precision}' is not one of {', '.join(PRECISIONS)}")


def read_plan(path: Path) -> PrecisionPlan:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plan not found: {path}")
    try:
        data = read_json(path)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a UTF-8 text file (a plan is JSON): {exc.reason} at byte {exc.start}") from exc
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
    return PrecisionPlan.from_dict(data, where=str(path))


def write_plan(path: Path, resolved: Dict[str, str], meta: Optional[dict] = None) -> None:
    """Write the fully resolved plan (one entry per layer): the file a user edits and passes back."""
    write_json(path, PrecisionPlan(default="fp32", layers=dict(resolved), meta=dict(meta or {})).to_dict())


def role_defaults(layers: List, include_attention: bool = True) -> PrecisionPlan:
    """The plan without measurements: patch-embed and head in FP16, every other layer INT8.

    ``include_attention=False`` (a build's default) keeps the attention matmuls (q·kᵀ, softmax·v)
    in FP16 as well (float on the cpu target). Measured, channel shift on, agreement with FP32:
    - TensorRT form (Q/DQ in float), ImageNet ViT-Tiny (PyTorch, 488 held-out samples): 89.1 % with
      INT8 attention, 95.7 % with INT8 attention and the softmax shift (which breaks TensorRT's
      fused INT8 MHA pattern), 95.7 % with FP16 attention; cifar10_vit 99.20 -> 99.43 %.
    - cpu (fused kernels, x86 AVX512-VNNI), INT8 attention with its uint8 softmax -> float
      attention: ViT-Tiny top-1 80.53 -> 80.94 % (FP32 81.35), agreement 94.47 -> 94.47 %;
      cifar10_vit 99.12 -> 99.27 %, mnist_vit 99.84 -> 99.92 %; ViT-Tiny batch-1 latency 7.82 ->
      8.01 ms median (2 threads; p90 twice the median on this host, so about equal).
    They hold no weights, and TensorRT's fused FP16 attention is its mature path, while fused INT8
    MHA is reported missing or slower on Orin (TensorRT #4167, #3243; not measured here: no GPU).
    A plan can still make them INT8 (``"*.matmul_*": "int8"``).
    """
    layers_map = {}
    for layer in layers:
        if layer.role in ("patch_embed", "head"):
            layers_map[layer.name] = "fp16"
        elif layer.kind == "matmul" and not include_attention:
            layers_map[layer.name] = "fp16"
    source = "role defaults" if include_attention else "role defaults (attention matmuls FP16)"
    return PrecisionPlan(default="int8", layers=layers_map, meta={"source": source})


def int8_mac_share(layers: List, resolved: Dict[str, str], kinds=("linear", "conv")) -> float:
    """Share (%) of the MACs of the given layer kinds that run in INT8."""
    total = sum(layer.macs for layer in layers if layer.kind in kinds)
    int8 = sum(layer.macs for layer in layers if layer.kind in kinds and resolved.get(layer.name) in QUANTIZED)
    return 100.0 * int8 / total if total else 0.0
