"""Every mistake a user can make with ``vitdeploy build`` ends the same way: exit code 2, exactly one
line on stderr starting with ``vitdeploy: error:``, no traceback (unless ``--debug``), and no output
folder (not even a hidden temporary one) left behind.

The CLI runs in-process (``main`` returns the exit code) except for two real-process tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitdeploy.cli import main
from vitdeploy.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def build(capsys, out: Path, *args):
    """Run ``vitdeploy build ARGS --out OUT --calib-size 8`` in-process; return (rc, stdout, stderr)."""
    rc = main(["build", *map(str, args), "--out", str(out), "--calib-size", "8"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_clean_failure(rc: int, err: str, out: Path, *words: str) -> str:
    """Exit code 2, one ``vitdeploy: error:`` line naming ``words``, nothing written to ``out``."""
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("vitdeploy: error: "), line
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    assert not out.exists(), f"{out} was created by a failed build"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary output folder was left behind"
    assert not list(out.parent.glob(f".{out.name}.old-*"))
    return line


def save_png(path: Path, shape=(16, 16, 3), seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# --------------------------------------------------------------------------- the model

def test_missing_model_file(capsys, tmp_path, out, calib_npz):
    rc, _, err = build(capsys, out, tmp_path / "nope.pt", "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "model file not found", "nope.pt")


def test_unknown_arch_is_named(capsys, out, tiny_vit, calib_npz):
    rc, _, err = build(capsys, out, tiny_vit.state_dict, "--arch", "not_a_model", "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "unknown architecture", "not_a_model")


@pytest.mark.parametrize("change, words", [
    ({"depth": 3}, ["does not match", "missing keys", "blocks.2."]),
    ({"embed_dim": 48}, ["does not match", "shape mismatch", "--model-kwargs"]),
    ({"depth": 1}, ["does not match", "unexpected keys", "blocks.1."]),
])
def test_state_dict_does_not_match_arch(capsys, out, tiny_vit, calib_npz, change, words):
    kwargs = json.dumps({**tiny_vit.kwargs_dict, **change})
    rc, _, err = build(capsys, out, tiny_vit.state_dict, "--arch", tiny_vit.arch, "--model-kwargs", kwargs,
                       "--calib", calib_npz)
    assert_clean_failure(rc, err, out, *words)


def test_pickled_module_needs_trust_pickle(capsys, out, tiny_vit, calib_npz):
    rc, _, err = build(capsys, out, tiny_vit.module, "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "--trust-pickle")


def test_state_dict_needs_arch(capsys, out, tiny_vit, calib_npz):
    rc, _, err = build(capsys, out, tiny_vit.state_dict, "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "state_dict", "--arch")


@pytest.mark.parametrize("which, tensor", [("nan", "blocks.0.attn.qkv.weight"), ("inf", "head.bias")])
def test_non_finite_weights_name_the_tensor(capsys, out, tiny_vit, calib_npz, which, tensor):
    rc, _, err = build(capsys, out, getattr(tiny_vit, which), "--arch", tiny_vit.arch,
                       "--model-kwargs", tiny_vit.kwargs, "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "NaN/Inf", tensor)


@pytest.mark.parametrize("kwargs, words", [
    ('{"depth": 2,', ["--model-kwargs", "not valid JSON"]),
    ("depth=2", ["--model-kwargs", "not valid JSON"]),
    ("[1, 2]", ["--model-kwargs", "JSON object"]),
])
def test_invalid_model_kwargs(capsys, out, tiny_vit, calib_npz, kwargs, words):
    rc, _, err = build(capsys, out, tiny_vit.state_dict, "--arch", tiny_vit.arch, "--model-kwargs", kwargs,
                       "--calib", calib_npz)
    assert_clean_failure(rc, err, out, *words)


@pytest.mark.parametrize("how", ["pickled", "file_arch"])
def test_model_without_preprocessing_needs_mean_and_std(capsys, out, plain_vit, calib_npz, how):
    model = ["--trust-pickle", plain_vit.module] if how == "pickled" else [plain_vit.state_dict, "--arch", plain_vit.arch]
    rc, _, err = build(capsys, out, *model, "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "no preprocessing", "--mean", "--std")


def test_torchscript_checkpoint(capsys, out, tmp_path, calib_npz):
    import warnings

    import torch

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.zeros(1, 4)).save(str(path))
    rc, _, err = build(capsys, out, path, "--trust-pickle", "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "TorchScript", "state_dict")


def test_not_a_checkpoint(capsys, out, tmp_path, calib_npz):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint")
    rc, _, err = build(capsys, out, path, "--calib", calib_npz)
    assert_clean_failure(rc, err, out, "junk.pt")


# --------------------------------------------------------------------------- calibration data

def test_missing_calibration_path(capsys, tmp_path, out, tiny_vit):
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", tmp_path / "no_such_calib")
    assert_clean_failure(rc, err, out, "calibration data not found", "no_such_calib")


def test_empty_calibration_folder(capsys, tmp_path, out, tiny_vit):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", empty)
    assert_clean_failure(rc, err, out, "calibration data", "no .jpg/.jpeg/.png images")


@pytest.mark.parametrize("good_images", [0, 3], ids=["only_corrupt", "corrupt_among_good"])
def test_corrupt_image_in_calibration_folder(capsys, tmp_path, out, tiny_vit, good_images):
    folder = tmp_path / "calib"
    for i in range(good_images):
        save_png(folder / f"a{i}.png", seed=i)
    folder.mkdir(exist_ok=True)
    (folder / "z_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", folder)
    assert_clean_failure(rc, err, out, "cannot read image", "z_corrupt.png")


def test_truncated_png(capsys, tmp_path, out, tiny_vit):
    folder = tmp_path / "calib"
    good = save_png(folder / "a.png").read_bytes()
    (folder / "b_truncated.png").write_bytes(good[: len(good) // 2])
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", folder)
    assert_clean_failure(rc, err, out, "cannot read image", "b_truncated.png")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: _npz(d / "no_x.npz", images=np.zeros((4, 16, 16, 3), np.uint8)), ["no 'x' array", "images"]),
    (lambda d: _npz(d / "obj.npz", x=np.array([None, 1], dtype=object)), ["cannot read", "obj.npz"]),
    (lambda d: _npz(d / "empty.npz", x=np.zeros((0, 16, 16, 3), np.uint8)), ["contains no images"]),
    (lambda d: _npz(d / "scalar.npz", x=np.uint8(7)), ["'x' must be an array"]),
    (lambda d: _npz(d / "int.npz", x=np.zeros((4, 16, 16, 3), np.int64)), ["uint8", "int64"]),
    (lambda d: _write(d / "bad.npz", b"PK\x03\x04 broken zip"), ["cannot read", "bad.npz"]),
    (lambda d: _write(d / "calib.txt", b"x"), ["folder of images or an .npz"]),
], ids=["no_x", "object_array", "no_images", "scalar_x", "int64_x", "broken_zip", "wrong_suffix"])
def test_unreadable_calibration_file(capsys, tmp_path, out, tiny_vit, make, words):
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", make(tmp_path))
    assert_clean_failure(rc, err, out, *words)


@pytest.mark.parametrize("x, words", [
    (np.zeros((4, 16, 16, 4), np.uint8), ["4 channels", "takes 3", "3x16x16"]),
    (np.zeros((4, 3, 8, 8), np.float32), ["float 'x'", "N×3×16×16", "[4, 3, 8, 8]"]),
    (np.zeros((4, 16, 16), np.float32), ["float 'x'", "N×3×16×16"]),
    (np.zeros((4, 2, 16, 16, 3), np.uint8), ["N×H×W×C"]),
], ids=["uint8_4_channels", "float_wrong_size", "float_3d", "uint8_5d"])
def test_images_that_do_not_fit_the_model(capsys, tmp_path, out, tiny_vit, x, words):
    calib = _npz(tmp_path / "calib.npz", x=x)
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", calib)
    assert_clean_failure(rc, err, out, *words)


def test_multi_line_messages_are_joined_into_one(capsys, monkeypatch, out, calib_npz, tmp_path):
    import vitdeploy.pipeline

    def fail(cfg):
        raise InputError("first line\n  second line\n")

    monkeypatch.setattr(vitdeploy.pipeline, "build", fail)
    rc, _, err = build(capsys, out, tmp_path / "m.pt", "--calib", calib_npz)
    assert assert_clean_failure(rc, err, out) == "vitdeploy: error: first line second line"


def test_eval_missing_onnx(capsys, tmp_path, calib_npz):
    rc = main(["eval", str(tmp_path / "missing.onnx"), "--data", str(calib_npz)])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines() == [f"vitdeploy: error: ONNX model not found: {tmp_path / 'missing.onnx'}"]


def test_debug_reraises_in_process(capsys, tmp_path, out, calib_npz):
    with pytest.raises(InputError, match="model file not found"):
        main(["build", str(tmp_path / "nope.pt"), "--calib", str(calib_npz), "--out", str(out), "--debug"])
    assert not out.exists()


# --------------------------------------------------------------------------- real processes

def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitdeploy", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_real_process_exit_code_and_no_traceback(tmp_path, tiny_vit, calib_npz):
    out = tmp_path / "out"
    proc = _run("build", tiny_vit.module, "--calib", calib_npz, "--calib-size", "8", "--out", out)
    assert proc.returncode == 2, proc.stderr
    line = assert_clean_failure(proc.returncode, proc.stderr, out, "--trust-pickle")
    assert line.startswith("vitdeploy: error: ")
    assert proc.stdout == ""


def test_real_process_debug_shows_traceback(tmp_path, calib_npz):
    out = tmp_path / "out"
    proc = _run("build", tmp_path / "nope.pt", "--calib", calib_npz, "--out", out, "--debug")
    assert proc.returncode not in (0, 2), proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "InputError: model file not found" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_calibration_folder(capsys, tmp_path, out, tiny_vit):
    folder = tmp_path / "locked"
    save_png(folder / "cls" / "a.png")
    folder.chmod(0)
    try:
        rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", folder)
    finally:
        folder.chmod(0o755)
    assert_clean_failure(rc, err, out, "calibration data", "locked")


def test_unreadable_calibration_folder_simulated(capsys, monkeypatch, tmp_path, out, tiny_vit):
    """What a non-root user sees for a folder without read permission (root reads everything)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access, real_scandir = os.access, os.scandir
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real_access(p, mode, **kw))

    def scandir(p="."):
        if Path(p) == folder:
            raise PermissionError(13, "Permission denied", str(p))
        return real_scandir(p)

    monkeypatch.setattr(os, "scandir", scandir)
    rc, _, err = build(capsys, out, tiny_vit.module, "--trust-pickle", "--calib", folder)
    assert_clean_failure(rc, err, out, "cannot read calibration data folder", "locked", "permission denied")
