"""Nothing lost, nothing half-done: the audit of ``vitdeploy build`` / ``analyze`` with odd outputs and inputs.

Every case runs the real CLI in a subprocess. A refused case must exit 2 with exactly one
``vitdeploy: error: <stage>: ...`` line, and the directory tree it ran in must be byte-for-byte
what it was (paths and sha256 before and after). SIGTERM/SIGINT on a real model are in
tests/integration/test_signals_real.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitdeploy.outputs import folder_name

LOW_BARS = ["--verify-min-agreement", "0", "--verify-min-cosine", "-1"]  # random weights: near ties everywhere


def run(*args, cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitdeploy", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, preexec_fn=lambda: os.umask(umask))


def snapshot(root: Path) -> dict:
    """Every path under ``root`` → sha256 of its bytes (files) or its kind (folders, links)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            tree[rel] = "dir"
        else:
            tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def assert_refused(proc, stage: str, *words: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith(f"vitdeploy: error: {stage}: "), lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def work(tmp_path, tiny_vit, calib_npz):
    """A folder holding the tiny model (state_dict) and 16 calibration images."""
    shutil.copy(tiny_vit.state_dict, tmp_path / "tiny.pt")
    shutil.copy(calib_npz, tmp_path / "calib.npz")
    return tmp_path


def build_args(work: Path, model="tiny.pt", *extra, calib: Path = None):
    from tests.conftest import TINY_VIT_ARCH, TINY_VIT_KWARGS

    return ["build", work / model, "--arch", TINY_VIT_ARCH, "--model-kwargs", json.dumps(TINY_VIT_KWARGS),
            "--calib", calib or work / "calib.npz", "--calib-size", "8", *LOW_BARS, *extra]


def refused_unchanged(work: Path, args, stage: str, *words: str, cwd: Path = None) -> str:
    before = snapshot(work)
    proc = run(*args, cwd=cwd or work)
    line = assert_refused(proc, stage, *words)
    assert snapshot(work) == before, "a refused build changed files"
    return line


# --------------------------------------------------------------------------- --out never destroys data

def test_out_folder_with_user_files_is_refused(work):
    (work / "userdir" / "sub").mkdir(parents=True)
    (work / "userdir" / "thesis.tex").write_text("\\chapter{One}")
    (work / "userdir" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    refused_unchanged(work, build_args(work, "tiny.pt", "--out", work / "userdir"), "write",
                      "did not write", "thesis.tex")


def test_out_folder_holding_the_inputs_is_refused(work):
    proj = work / "proj"
    proj.mkdir()
    shutil.move(work / "tiny.pt", proj / "tiny.pt")
    shutil.move(work / "calib.npz", proj / "calib.npz")
    args = build_args(work, proj / "tiny.pt", "--out", proj, calib=proj / "calib.npz")
    refused_unchanged(work, args, "write", "holds the input")


@pytest.mark.parametrize("out", [".", "..", "{cwd}"])
def test_out_that_is_or_contains_the_current_folder_is_refused(work, out):
    cwd = work / "here"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("keep me")
    refused_unchanged(work, build_args(work, "tiny.pt", "--out", out.format(cwd=cwd)), "write",
                      "current folder", cwd=cwd)


def test_out_that_is_a_file_is_refused(work):
    (work / "out").mkdir()
    (work / "out" / "existing_file.txt").write_text("precious")
    refused_unchanged(work, build_args(work, "tiny.pt", "--out", work / "out" / "existing_file.txt"), "write",
                      "not a folder")


def test_previous_build_with_a_foreign_file_is_refused(work):
    out = work / "out"
    first = run(*build_args(work, "tiny.pt", "--out", out), cwd=work)
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("mine")
    refused_unchanged(work, build_args(work, "tiny.pt", "--out", out), "write", "previous vitdeploy output",
                      "notes.txt")


def test_analyze_out_is_checked_the_same_way(work):
    from tests.conftest import TINY_VIT_ARCH, TINY_VIT_KWARGS

    (work / "userdir").mkdir()
    (work / "userdir" / "thesis.tex").write_text("x")
    refused_unchanged(work, ["analyze", work / "tiny.pt", "--arch", TINY_VIT_ARCH, "--model-kwargs",
                             json.dumps(TINY_VIT_KWARGS), "--calib", work / "calib.npz", "--out", work / "userdir"],
                      "write", "did not write")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_default_names_replacing_stale_temporaries_and_permissions(work):
    """Non-ASCII names get distinct folders; a rebuild replaces the previous one and removes what
    a killed run left; files and folders honour the umask."""
    for name in ("猫.pt", "犬.pt"):
        shutil.copy(work / "tiny.pt", work / name)
    first = run(*build_args(work, "猫.pt"), cwd=work, umask=0o022)
    assert first.returncode == 0, first.stderr
    cat = work / "engines" / folder_name("猫")
    assert cat.is_dir() and cat.name != "model"
    assert stat.S_IMODE(cat.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in cat.iterdir()} == {0o644}

    pid = _dead_pid()
    (cat.parent / f".{cat.name}.tmp-{pid}-abcdefgh").mkdir()
    (cat.parent / f".{cat.name}.tmp-{pid}-abcdefgh" / "model.int8.onnx").write_bytes(b"x" * 1000)
    (cat.parent / f".{cat.name}.old-{pid}").mkdir()
    created = json.loads((cat / "build.json").read_text())["created"]
    (cat / "build.json").write_text((cat / "build.json").read_text().replace(created, "then"))
    again = run(*build_args(work, "猫.pt"), cwd=work, umask=0o077)
    assert again.returncode == 0, again.stderr
    assert json.loads((cat / "build.json").read_text())["created"] != "then"
    assert sorted(p.name for p in cat.parent.iterdir()) == [cat.name], "stale temporaries were left"
    assert stat.S_IMODE(cat.stat().st_mode) == 0o700

    dog = run(*build_args(work, "犬.pt"), cwd=work)
    assert dog.returncode == 0, dog.stderr
    assert sorted(p.name for p in cat.parent.iterdir()) == sorted([cat.name, folder_name("犬")])
    assert folder_name("犬") != cat.name


def test_folder_names():
    assert folder_name("vit_small_patch16_224") == "vit_small_patch16_224"
    assert folder_name("my model") == "my-model"
    assert folder_name("猫") == folder_name("猫") != folder_name("犬")
    assert folder_name("猫").startswith("model-") and folder_name("chat-猫").startswith("chat-")
    long = folder_name("a" * 250)
    assert len(long) == 64 and long != folder_name("a" * 251)


def test_long_model_name_builds_into_a_short_folder(work):
    name = "m" * 250 + ".pt"
    shutil.copy(work / "tiny.pt", work / name)
    proc = run(*build_args(work, name), cwd=work)
    assert proc.returncode == 0, proc.stderr
    (folder,) = (work / "engines").iterdir()
    assert len(folder.name) == 64 and (folder / "model.int8.onnx").is_file()


def test_long_out_name_is_refused_before_work(work):
    refused_unchanged(work, build_args(work, "tiny.pt", "--out", work / ("o" * 250)), "write", "too long")


def test_read_only_location_is_refused_before_work(work):
    if os.geteuid() == 0:  # root writes through permissions: use a file system that refuses everyone
        target = Path("/sys/vitdeploy-audit/out")
        try:
            os.mkdir(target.parent)
            os.rmdir(target.parent)
            pytest.skip("/sys accepts new folders here")
        except OSError:
            pass
        refused_unchanged(work, build_args(work, "tiny.pt", "--out", target), "write", "cannot create a folder")
    else:
        locked = work / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            refused_unchanged(work, build_args(work, "tiny.pt", "--out", locked / "out"), "write",
                              "cannot create a folder", "permission denied")
        finally:
            locked.chmod(0o755)


# --------------------------------------------------------------------------- bad inputs: one line, before work

def test_random_bytes_are_not_called_a_pickle(work):
    (work / "noise.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    line = refused_unchanged(work, build_args(work, "noise.pt"), "load", "cannot read", "checkpoint")
    assert "--trust-pickle" not in line
    refused_unchanged(work, build_args(work, "noise.pt", "--trust-pickle"), "load", "noise.pt")


@pytest.mark.parametrize("content, words", [
    (b'{"layers": {"head": "fp16"}, "meta": 5}', ["'meta' must be an object"]),
    (b'{"layers": {"head": 16}}', ["precision string"]),
    (b'{"layers": {}, "default": "int8", "x": "\xff\xfe"}', ["not a UTF-8"]),
])
def test_bad_plans(work, content, words):
    (work / "plan.json").write_bytes(content)
    refused_unchanged(work, build_args(work, "tiny.pt", "--plan", work / "plan.json"), "load", *words)


@pytest.mark.parametrize("source, name, words", [
    ("def broken(:\n    pass\n", "Net", ["syntax error", "line 1"]),
    ("import not_a_module_anywhere\n", "Net", ["ModuleNotFoundError", "not_a_module_anywhere"]),
    ("def Net(**kw):\n    return 42\n", "Net", ["returned a int", "not a torch.nn.Module"]),
])
def test_bad_arch_files(work, plain_vit, source, name, words):
    (work / "arch.py").write_text(source)
    args = ["build", plain_vit.state_dict, "--arch", f"{work / 'arch.py'}:{name}", "--calib", work / "calib.npz",
            "--mean", "0.5", "--std", "0.5"]
    refused_unchanged(work, args, "load", *words)


def test_arch_must_be_a_timm_name_or_a_python_file(work):
    marker = work / "ran"
    args = build_args(work, "tiny.pt")
    args[args.index("--arch") + 1] = "os:system"
    args[args.index("--model-kwargs") + 1] = json.dumps({"command": f"touch {marker}"})
    refused_unchanged(work, args, "load", "file.py:Name")
    assert not marker.exists()


# --------------------------------------------------------------------------- accepted, with a word

def test_grayscale_and_tiny_images_are_accepted_with_a_warning(work):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        (work / "gray" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (2, 3), dtype=np.uint8), mode="L").save(work / "gray" / "c" / f"{i}.png")
    args = build_args(work, "tiny.pt", calib=work / "gray")
    proc = run(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "4 of 4 images are grayscale: each is replicated to 3 channels" in proc.stderr
    assert "smaller than the model's 16x16 input (smallest 2x3) and are upscaled" in proc.stderr


def test_raw_pixels_as_float_and_too_large_calib_size_are_accepted_with_a_warning(work):
    x = np.random.default_rng(0).integers(0, 256, (16, 3, 16, 16)).astype(np.float32)
    np.savez(work / "raw.npz", x=x)
    args = build_args(work, "tiny.pt", calib=work / "raw.npz")
    args[args.index("--calib-size") + 1] = "100000"
    proc = run(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "like raw 0-255 pixels" in proc.stderr
    assert "--calib-size 100000, but" in proc.stderr and "calibrating on all 16" in proc.stderr
