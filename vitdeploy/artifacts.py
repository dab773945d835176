"""What flows between stages, with a JSON round trip so any stage can be rerun from disk."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a deployment needs to know about a model besides its weights."""

    name: str
    input_size: Tuple[int, int, int]  # C, H, W
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_classes: int
    source: str = ""
    arch: Optional[str] = None
    crop_pct: float = 1.0
    crop_mode: str = "center"     # timm's: center, squash or border (data.py runs timm's eval transform)
    interpolation: str = "bilinear"
    input_name: str = "input"
    output_name: str = "logits"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["input_size"] = tuple(d["input_size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    from .outputs import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
