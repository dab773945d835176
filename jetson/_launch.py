"""Shared by the jetson/ launchers: find one of vitdeploy's standalone device scripts and run it.

The scripts are imported by path, so neither vitdeploy nor torch/timm need to be installed on
the device -- only TensorRT, NumPy, Polygraphy and ONNX Runtime (jetson/setup.sh). benchmark.py
loads build_engine.py and vitdeploy/measure/core.py (measure_core.py in a bundle) beside it. Python 3.8+ (Polygraphy's floor).
"""

import importlib.util
import os
import sys


def candidates(here, name):
    """Where the real script may be, first match wins: the repository layout, then bundle layouts."""
    stem = os.path.splitext(name)[0]
    return (
        os.path.join(here, os.pardir, "vitdeploy", "trt", name),
        os.path.join(here, "vitdeploy", "trt", name),
        os.path.join(here, "trt", name),
        os.path.join(here, "trt_" + stem + ".py"),
        os.path.join(here, name),
    )


def find_script(launcher, name):
    """Path of the real ``name`` (never the launcher itself), or None."""
    me = os.path.realpath(os.path.abspath(launcher))
    for candidate in candidates(os.path.dirname(me), name):
        path = os.path.realpath(os.path.abspath(candidate))
        if path != me and os.path.isfile(path):
            return path
    return None


def load_script(path):
    """Import the script at ``path`` as a module, without touching sys.path or vitdeploy."""
    spec = importlib.util.spec_from_file_location("vitdeploy_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(launcher, name, argv=None):
    """Run the real script's ``main``; exit 2 with one line when it (or its sibling) cannot be found."""
    path = find_script(launcher, name)
    if path is None:
        sys.stderr.write("error: {} not found next to {} nor in ../vitdeploy/trt/\n".format(
            name, os.path.dirname(os.path.abspath(launcher))))
        return 2
    try:
        script = load_script(path)
    except ImportError as exc:  # benchmark.py without its build_engine.py
        sys.stderr.write("error: {}\n".format(exc))
        return 2
    return script.main(argv)
