import os
import sys

from .cli import main

code = main()
if code in (130, 143):
    # An interrupt that passed through C code running Python source (PyRun_*, as some extensions do)
    # marks it "unhandled" inside CPython even though main() handled it; with `python -m`, CPython then
    # ends the process by SIGINT instead of with our exit code. main() has cleaned up: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
