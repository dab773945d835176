#!/usr/bin/env python3
"""Launcher: benchmark a bundle's TensorRT engines on this device (Jetson or GPU machine).

    python3 jetson/benchmark.py BUNDLE_DIR [--batch 1,8] [options; --help for all]

Runs ``main`` of vitdeploy's standalone ``benchmark.py``, wherever it sits: in a repository
checkout (``../vitdeploy/trt/benchmark.py``) or next to this file in a deploy bundle. It is
imported by path, so neither vitdeploy nor its dependencies (torch, timm) need to be installed on
the device -- only TensorRT, NumPy and cuda-python/PyCUDA. Python 3.6 compatible (JetPack 4.6).
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

#: Where the real script may be, first match wins: the repository layout, then bundle layouts.
_CANDIDATES = (
    os.path.join(_HERE, os.pardir, "vitdeploy", "trt", "benchmark.py"),
    os.path.join(_HERE, "vitdeploy", "trt", "benchmark.py"),
    os.path.join(_HERE, "trt", "benchmark.py"),
    os.path.join(_HERE, "trt_benchmark.py"),
    os.path.join(_HERE, "benchmark.py"),
)


def find_script():
    """Path of the real benchmark.py (never this launcher itself), or None."""
    me = os.path.realpath(os.path.abspath(__file__))
    for candidate in _CANDIDATES:
        path = os.path.realpath(os.path.abspath(candidate))
        if path != me and os.path.isfile(path):
            return path
    return None


def load_script(path):
    """Import the script at ``path`` as a module, without touching sys.path or vitdeploy."""
    spec = importlib.util.spec_from_file_location("vitdeploy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    """Run the real script's ``main``; exit 2 with one line when it cannot be found."""
    path = find_script()
    if path is None:
        sys.stderr.write("error: benchmark.py not found next to {} nor in ../vitdeploy/trt/\n".format(_HERE))
        return 2
    return load_script(path).main(argv)


if __name__ == "__main__":
    sys.exit(main())
