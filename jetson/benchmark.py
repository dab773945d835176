#!/usr/bin/env python3
"""Launcher: benchmark a bundle's TensorRT engines on this device (Jetson or GPU machine).

    python3 jetson/benchmark.py BUNDLE_DIR [--batch 1,8] [options; --help for all]

Runs ``main`` of vitdeploy's standalone ``benchmark.py`` (``../vitdeploy/trt/benchmark.py``, or next to
this file); see _launch.py. Python 3.8+.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _launch  # noqa: E402


def find_script():
    return _launch.find_script(__file__, "benchmark.py")


def load_script(path):
    return _launch.load_script(path)


def main(argv=None):
    return _launch.run(__file__, "benchmark.py", argv)


if __name__ == "__main__":
    sys.exit(main())
