"""`python -m vitdeploy` exits with main()'s interrupt code even when CPython saw the interrupt pass
through C code (CI once got death-by-SIGINT, -2, instead of 130 after a cleanly handled Ctrl-C)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """\
import ctypes, runpy
import vitdeploy.cli
ctypes.pythonapi.PyRun_SimpleString(b"raise KeyboardInterrupt")  # sets CPython's 'unhandled' flag
vitdeploy.cli.main = lambda: {code}  # what main() returns after handling an interrupt
runpy.run_module("vitdeploy", run_name="__main__")
"""


@pytest.mark.parametrize("code", [130, 143])
def test_exit_code_survives_an_interrupt_seen_in_c_code(tmp_path, code):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__main__.py").write_text(PROBE.format(code=code))
    proc = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == code, proc.stderr
