"""SIGTERM (what ``timeout``, CI and ``docker stop`` send) and SIGINT during a real build.

The mnist plain-PyTorch ViT is built by the real CLI in a subprocess and signalled while it
calibrates and while it exports. It must exit 143 (SIGTERM) or 130 (SIGINT) with one line naming
the stage, leave no temporary folder (or anything else) behind, and leave the folder it ran in as
it was.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.shared_data import mnist_npz, shared_path
from tests.unit.test_output_safety import snapshot


def _start(args, cwd: Path) -> subprocess.Popen:
    def child_setup():  # a background shell may have SIGINT ignored; Python then keeps ignoring it
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "vitdeploy", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=child_setup)


def _export_wrote_a_file(folder: Path) -> bool:
    try:
        return any(any(tmp.iterdir()) for tmp in folder.glob(".out.tmp-*"))
    except FileNotFoundError:  # the build removed it between glob and iterdir
        return False


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("phase", ["calibrate", "export"])
def test_signal_leaves_nothing_behind(tmp_path, signum, code, phase):
    paths = mnist_npz(tmp_path)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    proc = _start(["build", shared_path("mnist_vit", "vit_mnist.pt"),
                   "--arch", f"{shared_path('mnist_vit', 'model.py')}:ViT", "--input-size", "1", "28", "28",
                   "--mean", "0.1307", "--std", "0.3081", "--calib", paths["calib"], "--calib-size", "512",
                   "--out", out], cwd=tmp_path)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if phase == "calibrate" and any("calibrating on" in line for line in lines):
            break
        # The output's temporary folder appears a moment before the export stage is entered (a signal
        # then is "during write"); its first file, the FP32 ONNX, is written by the export itself.
        if phase == "export" and _export_wrote_a_file(tmp_path):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "".join(lines)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert proc.returncode == code, "".join(lines)
    failure = [line for line in lines if not line.startswith("model ")]  # the "calibrating on" log line
    assert len(failure) == 1, "".join(lines)
    name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    assert failure[0].strip() == f"vitdeploy: {name} during {phase}; no output was written"
    assert snapshot(tmp_path) == before, "the signalled build left files behind"
