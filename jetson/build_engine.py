#!/usr/bin/env python3
"""Launcher: build a TensorRT engine on this device (Jetson or GPU machine).

    python3 jetson/build_engine.py model.onnx --out model.engine [options; --help for all]

Runs ``main`` of vitdeploy's standalone ``build_engine.py`` (``../vitdeploy/trt/build_engine.py``, or next to
this file); see _launch.py. Python 3.8+.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _launch  # noqa: E402


def find_script():
    return _launch.find_script(__file__, "build_engine.py")


def load_script(path):
    return _launch.load_script(path)


def main(argv=None):
    return _launch.run(__file__, "build_engine.py", argv)


if __name__ == "__main__":
    sys.exit(main())
