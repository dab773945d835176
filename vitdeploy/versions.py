"""Versions of everything that shapes a build, recorded in build.json."""
from __future__ import annotations

import platform
import sys
from importlib import metadata


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("vitdeploy", "torch", "timm", "onnx", "onnxruntime", "numpy", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
