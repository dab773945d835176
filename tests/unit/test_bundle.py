"""Deploy bundles for TensorRT targets (`vitdeploy.bundle`), written without TensorRT.

Bundles are made from the tiny timm ViT fixture built once by the pipeline: TX2 gets the FP32
ONNX, Xavier and Orin the QDQ ONNX, desktop the QDQ ONNX converted to FP16. The checks are on
what a user runs on the device: the flags per target, the calibration cache against the ONNX's
own Q scales, and that build_engine.py (which must run with TensorRT absent to print --help)
accepts the command DEPLOY.md tells the user to run.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import vitdeploy.bundle as bundle
from vitdeploy.bundle import (CALIB_CACHE_VERSIONS, DESKTOP_CALIB_CACHE_VERSION, build_engine_command,
                              calib_amax_from_qdq, calib_cache_version, trtexec_command, write_bundle)
from vitdeploy.calib_cache import read_calib_cache
from vitdeploy.errors import BuildError, InputError
from vitdeploy.export.fp16 import to_fp16
from vitdeploy.targets import get_target, list_targets

REAL_BUILD_ENGINE = Path(bundle.__file__).parent / "trt" / "build_engine.py"
needs_build_engine = pytest.mark.skipif(not REAL_BUILD_ENGINE.is_file(),
                                        reason="vitdeploy/trt/build_engine.py not written yet")
ONNX_FOR = {"jetson-tx2": "model.fp32.onnx", "jetson-xavier": "model.int8.onnx",
            "jetson-orin": "model.int8.onnx", "desktop": "model.int8.fp16.onnx"}
TRT_TARGETS = list(ONNX_FOR)
SHAPE = (3, 16, 16)
BUNDLE_FILES = {"calib.npy", "calib.cache", "build_engine.py", "benchmark.py", "measure_core.py", "trtexec.txt",
                "DEPLOY.md"}


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_vit, calib_npz, tmp_path_factory):
    """Folder holding model.fp32.onnx, model.int8.onnx and model.int8.fp16.onnx of the tiny ViT."""
    from vitdeploy.pipeline import BuildConfig, build

    out = tmp_path_factory.mktemp("bundle_build") / "tiny"
    build(BuildConfig(model=tiny_vit.state_dict, calib=calib_npz, arch=tiny_vit.arch,
                      model_kwargs=tiny_vit.kwargs, out=out, calib_size=16, verify_images=16))
    onnx.save(to_fp16(onnx.load(str(out / "model.int8.onnx"))), str(out / "model.int8.fp16.onnx"))
    return out


@pytest.fixture(scope="module", autouse=True)
def build_engine_source(tmp_path_factory):
    """The real trt/build_engine.py, or a stand-in while it is not written yet."""
    if REAL_BUILD_ENGINE.is_file():
        yield REAL_BUILD_ENGINE
        return
    stub = tmp_path_factory.mktemp("stub") / "build_engine.py"
    stub.write_text("import argparse\nargparse.ArgumentParser().parse_args()\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bundle, "BUILD_ENGINE_SOURCE", stub)
        yield stub


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((4, *SHAPE)).astype(np.float32)


def _make(models: Path, folder: Path, target: str, images, amax=None):
    """Copy the target's ONNX into `folder` and write its bundle there."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_FOR[target]
    shutil.copy(models / ONNX_FOR[target], onnx_path)
    files = write_bundle(folder, get_target(target), onnx_path, images, amax, {"name": "tiny"})
    return types.SimpleNamespace(folder=folder, files=files, onnx=onnx_path,
                                 trtexec=(folder / "trtexec.txt").read_text(),
                                 deploy=(folder / "DEPLOY.md").read_text())


@pytest.fixture(scope="module")
def bundles(models, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {t: _make(models, root / t, t, images) for t in TRT_TARGETS}


def _commands(trtexec_text: str) -> list:
    """The trtexec command lines of trtexec.txt (comments and blanks dropped), as argv lists."""
    return [shlex.split(line) for line in trtexec_text.splitlines()
            if line.strip() and not line.startswith("#")]


def _layernorm_names(onnx_path: Path) -> list:
    return [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "LayerNormalization"]


def _q_scales(onnx_path: Path) -> dict:
    """Activation tensor → Q scale, read straight from the ONNX (independently of the module)."""
    model = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


# ---------------------------------------------------------------------------------------------
# Bundle contents per target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_bundle_files_and_sizes(bundles, target):
    b = bundles[target]
    expected = BUNDLE_FILES - ({"calib.cache"} if target == "jetson-tx2" else set())
    assert set(b.files) == expected
    for name, size in b.files.items():
        assert (b.folder / name).stat().st_size == size > 0
    assert not [p.name for p in b.folder.iterdir() if p.name.startswith(".")]  # no temp files left
    assert b.onnx.is_file()


def test_calib_npy_round_trip(bundles, images):
    for b in bundles.values():
        loaded = np.load(b.folder / "calib.npy", allow_pickle=False)
        assert loaded.dtype == np.float32 and np.array_equal(loaded, images)


def test_tx2_fp16_only(bundles):
    b = bundles["jetson-tx2"]
    assert not (b.folder / "calib.cache").exists()
    (line,) = _commands(b.trtexec)
    assert "--fp16" in line
    assert not {"--int8", "--stronglyTyped", "--precisionConstraints=obey"} & set(line)
    assert not any(a.startswith(("--layerPrecisions", "--useDLACore")) for a in line)
    assert "no fast INT8" in b.deploy  # the target's warning reaches the user


def test_xavier_int8_weakly_typed_with_optional_dla(bundles):
    gpu, dla = _commands(bundles["jetson-xavier"].trtexec)
    assert {"--int8", "--fp16"} <= set(gpu)
    assert "--stronglyTyped" not in gpu
    assert not any(a.startswith("--layerPrecisions") for a in gpu)
    assert {"--useDLACore=0", "--allowGPUFallback", "--saveEngine=model.dla.engine"} <= set(dla)
    assert {"--minShapes=input:1x3x16x16", "--maxShapes=input:1x3x16x16"} <= set(dla)


def test_orin_pins_every_layernorm_to_fp32(bundles):
    b = bundles["jetson-orin"]
    gpu = _commands(b.trtexec)[0]
    assert {"--int8", "--fp16", "--precisionConstraints=obey"} <= set(gpu)
    (spec,) = [a for a in gpu if a.startswith("--layerPrecisions=")]
    pinned = [item.rsplit(":", 1) for item in spec.split("=", 1)[1].split(",")]
    names = _layernorm_names(b.onnx)
    assert len(names) == 5
    assert pinned == [[name, "fp32"] for name in names]
    assert "--layernorm-fp32" in b.deploy


def test_desktop_strongly_typed_without_precision_flags(bundles):
    b = bundles["desktop"]
    (line,) = _commands(b.trtexec)
    assert "--stronglyTyped" in line
    assert not {"--int8", "--fp16", "--precisionConstraints=obey"} & set(line)
    assert "--strongly-typed" in b.deploy


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_trtexec_shapes_and_files(bundles, target):
    line = _commands(bundles[target].trtexec)[0]
    assert line[:3] == ["trtexec", f"--onnx={ONNX_FOR[target]}", "--saveEngine=model.engine"]
    assert {"--minShapes=input:1x3x16x16", "--optShapes=input:1x3x16x16",
            "--maxShapes=input:8x3x16x16"} <= set(line)


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_deploy_md(bundles, target):
    text = bundles[target].deploy
    assert "not portable across GPUs and TensorRT versions" in text
    assert shlex.join(_commands(bundles[target].trtexec)[0]) in text
    ours = shlex.join(build_engine_command(target, ONNX_FOR[target], SHAPE, 8))
    if target == "jetson-tx2":  # TensorRT 8.2: below Polygraphy, so trtexec builds and times
        assert ours not in text and "python3 benchmark.py ." not in text
        assert "Polygraphy supports (8.5+" in text and "--loadEngine=model.engine" in text
    else:
        assert ours in text and "python3 benchmark.py ." in text


# ---------------------------------------------------------------------------------------------
# calib.cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["jetson-xavier", "jetson-orin", "desktop"])
def test_calib_cache_equals_q_scales(bundles, target):
    b = bundles[target]
    header, amax = read_calib_cache(b.folder / "calib.cache")
    assert header == f"TRT-{calib_cache_version(get_target(target))}-EntropyCalibration2"
    scales = _q_scales(b.onnx)
    assert scales and set(amax) == set(scales)
    for name, scale in scales.items():
        # The cache stores the scale as float32 bits: exact for FP32 and FP16 scales alike.
        assert amax[name] / 127 == np.float32(scale)
    assert calib_amax_from_qdq(onnx.load(str(b.onnx))) == pytest.approx(amax, rel=1e-6)


def test_explicit_amax_is_written_as_given(models, images, tmp_path):
    amax = {"input": 2.5, "/blocks/blocks.0/norm1/LayerNormalization_output_0": 7.0}
    b = _make(models, tmp_path / "b", "jetson-orin", images, amax=amax)
    _, read = read_calib_cache(b.folder / "calib.cache")
    assert read == pytest.approx(amax, rel=1e-6)


def test_calib_cache_versions():
    versions = {t.name: calib_cache_version(t) for t in list_targets() if t.int8 and t.is_tensorrt}
    assert versions == {"jetson-xavier": CALIB_CACHE_VERSIONS["8.5"],
                        "jetson-orin": CALIB_CACHE_VERSIONS["10.3"],
                        "desktop": DESKTOP_CALIB_CACHE_VERSION}
    assert CALIB_CACHE_VERSIONS == {"8.2": 8201, "8.5": 8502, "10.3": 100300}


# ---------------------------------------------------------------------------------------------
# build_engine.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_build_engine_command_per_target(target):
    argv = build_engine_command(target, "m.onnx", SHAPE, 16, opt_batch=4)
    assert argv[:5] == ["python3", "build_engine.py", "m.onnx", "--out", "model.engine"]
    joined = " ".join(argv)
    assert "--min-batch 1 --opt-batch 4 --max-batch 16 --input-name input" in joined
    expected = {"jetson-tx2": "--precision fp16", "jetson-xavier": "--precision int8",
                "jetson-orin": "--precision int8 --layernorm-fp32", "desktop": "--strongly-typed"}
    assert expected[target] in joined
    assert ("--layernorm-fp32" in argv) == (target == "jetson-orin")
    assert ("--strongly-typed" in argv) == (target == "desktop")


def test_commands_reject_bad_shapes():
    with pytest.raises(InputError):
        build_engine_command("desktop", "m.onnx", (16, 16), 8)
    with pytest.raises(InputError):
        trtexec_command("desktop", "m.onnx", SHAPE, 4, opt_batch=8)


@needs_build_engine
def test_bundled_build_engine_help_runs_without_tensorrt(bundles):
    folder = bundles["jetson-orin"].folder
    assert (folder / "build_engine.py").read_bytes() == REAL_BUILD_ENGINE.read_bytes()
    result = subprocess.run([sys.executable, "build_engine.py", "--help"], cwd=folder,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout


def test_bundled_benchmark_is_the_package_script_and_runs_without_tensorrt(bundles):
    """DEPLOY.md says `python3 benchmark.py .`: the bundle carries the script, and it explains itself."""
    folder = bundles["jetson-xavier"].folder
    assert (folder / "benchmark.py").read_bytes() == bundle.BENCHMARK_SOURCE.read_bytes()
    assert (folder / "measure_core.py").read_bytes() == bundle.MEASURE_CORE_SOURCE.read_bytes()
    result = subprocess.run([sys.executable, "benchmark.py", "--help"], cwd=folder,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--batch" in result.stdout
    assert "`benchmark.py`" in bundles["jetson-xavier"].deploy and "device.py" not in bundles["jetson-xavier"].deploy


@needs_build_engine
@pytest.mark.parametrize("target", TRT_TARGETS)
def test_build_engine_accepts_our_command(target):
    """The command DEPLOY.md gives parses with build_engine.py's own parser, meaning what we meant."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundled_build_engine", REAL_BUILD_ENGINE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    t = get_target(target)
    for dla in ([None, 0] if t.dla else [None]):
        argv = build_engine_command(t, "model.onnx", SHAPE, 8, dla_core=dla)
        args = script.parse_args(argv[2:])
        assert args.onnx == "model.onnx" and args.out == "model.engine"
        assert bool(args.strongly_typed) == t.strongly_typed
        assert bool(args.layernorm_fp32) == t.layernorm_fp32
        if not t.strongly_typed:
            assert args.precision == ("int8" if t.int8 else "fp16")
        batches = (args.min_batch, args.opt_batch, args.max_batch)
        assert batches == ((1, 1, 8) if dla is None else (1, 1, 1))
        assert args.dla == dla and args.input_name == "input"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_onnx_must_be_inside_the_folder(models, images, tmp_path):
    with pytest.raises(InputError, match="inside the bundle folder"):
        write_bundle(tmp_path, get_target("jetson-orin"), models / "model.int8.onnx", images, None, {})


def test_cpu_target_has_no_bundle(models, images, tmp_path):
    shutil.copy(models / "model.int8.onnx", tmp_path / "model.int8.onnx")
    with pytest.raises(BuildError, match="TensorRT"):
        write_bundle(tmp_path, get_target("cpu"), tmp_path / "model.int8.onnx", images, None, {})


@pytest.mark.parametrize("bad", [np.zeros((4, *SHAPE), np.float64), np.zeros((4, 3, 8, 8), np.float32),
                                 np.zeros(SHAPE, np.float32)])
def test_calibration_images_are_checked(models, tmp_path, bad):
    shutil.copy(models / "model.int8.onnx", tmp_path / "model.int8.onnx")
    with pytest.raises(InputError, match="calibration images"):
        write_bundle(tmp_path, get_target("jetson-orin"), tmp_path / "model.int8.onnx", bad, None, {})
    assert not (tmp_path / "calib.npy").exists()
