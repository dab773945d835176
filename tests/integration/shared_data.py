"""Access to the real models and data sets in ../shared/data (absent on a user's fresh clone)."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test assets not found at {path} (they live in ../shared/data beside the checkout)")
    return path


def import_model_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mnist_npz(folder: Path) -> dict:
    """The official t10k files as two .npz: calibration = images 5000–9999, evaluation = 0–4999."""
    root = shared_path("mnist")
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    paths = {"calib": folder / "mnist_calib.npz", "eval": folder / "mnist_eval.npz"}
    np.savez(paths["calib"], x=x[5000:], y=y[5000:])
    np.savez(paths["eval"], x=x[:5000], y=y[:5000])
    return paths
