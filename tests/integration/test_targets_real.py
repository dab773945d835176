"""Issue 5 acceptance on the real CIFAR-10 ViT: deploy bundles for TensorRT targets, built without TensorRT."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitdeploy.cli import main

from .shared_data import import_model_file, shared_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar_targets")
    module = import_model_file(shared_path("cifar10_vit", "model.py"), "cifar10_vit_model")
    torch.save(module.build(), folder / "cifar10_vit.pt")
    return folder / "cifar10_vit.pt"


def _build(checkpoint, out, target, extra=()):
    return main(["build", str(checkpoint), "--trust-pickle", "--mean", "0.5", "--std", "0.5",
                 "--calib", str(shared_path("cifar10", "train_10k.npz")), "--target", target, "--out", str(out),
                 "--eval-data", str(shared_path("cifar10", "test_exact846.npz")), *extra])


def test_jetson_orin_bundle(cifar_module, tmp_path, capsys):
    assert _build(cifar_module, tmp_path / "cpu", "cpu", ["--quiet"]) == 0
    assert _build(cifar_module, tmp_path / "orin", "jetson", []) == 0   # 'jetson' is jetson-orin
    err = capsys.readouterr().err
    assert "not portable across GPUs and TensorRT versions" in err
    bundle = tmp_path / "orin"
    for name in ("model.int8.onnx", "model.fp32.onnx", "calib.npy", "calib.cache", "plan.json", "build.json",
                 "build_engine.py", "trtexec.txt", "DEPLOY.md"):
        assert (bundle / name).is_file(), name
    record = json.loads((bundle / "build.json").read_text())
    assert record["target"] == "jetson-orin"
    calib = np.load(bundle / "calib.npy")
    assert calib.shape == (512, 3, 32, 32) and calib.dtype == np.float32
    # The bundle's ONNX passes the TensorRT linter for its target...
    assert main(["lint", str(bundle / "model.int8.onnx"), "--target", "jetson-orin"]) == 0
    # ...and, with Q/DQ in float as TensorRT computes it, keeps FP32's top-1 (±0.5) and the cpu
    # build's within 0.6 points (5 of 846 images): the cpu file has 7-bit weights, the bundle 8-bit.
    acc = record["accuracy"]
    assert acc["int8_computed_by"].startswith("ONNX Runtime with Q/DQ in float")
    assert abs(acc["int8_top1"] - acc["fp32_top1"]) <= 0.5
    cpu = json.loads((tmp_path / "cpu" / "build.json").read_text())["accuracy"]["int8_top1"]
    assert abs(acc["int8_top1"] - cpu) <= 0.6
    # build_engine.py runs without TensorRT for --help.
    result = subprocess.run([sys.executable, str(bundle / "build_engine.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--precision" in result.stdout
    assert "--layerPrecisions" in (bundle / "trtexec.txt").read_text()   # Orin pins LayerNorm to FP32


def test_default_onnx_matches_golden(cifar_module, tmp_path):
    """The default build's ONNX files, cpu and jetson-orin, keep their node types, node count and
    predictions (golden_onnx.py; issue 16: the export's refactor must leave them alone)."""
    from vitdeploy.data import load_images
    from vitdeploy.load import load_model

    from .golden_onnx import check, summarize

    _, spec = load_model(cifar_module, trust_pickle=True, mean=(0.5,), std=(0.5,))
    test = load_images(shared_path("cifar10", "test_exact846.npz"), spec)
    images = np.concatenate([x for x, _ in test.batches(256)])
    for target in ("cpu", "jetson-orin"):
        assert _build(cifar_module, tmp_path / target, target, ["--quiet"]) == 0
        for name in ("model.fp32.onnx", "model.int8.onnx"):
            check(f"{target}/{name}", summarize(tmp_path / target / name, images))


def test_jetson_tx2_gets_fp16_bundle_and_a_warning(cifar_module, tmp_path, capsys):
    assert _build(cifar_module, tmp_path / "tx2", "jetson-tx2") == 0
    err = capsys.readouterr().err
    assert "no fast INT8" in err or "no INT8" in err
    bundle = tmp_path / "tx2"
    assert not (bundle / "model.int8.onnx").exists() and not (bundle / "calib.cache").exists()
    record = json.loads((bundle / "build.json").read_text())
    assert {layer["precision"] for layer in record["layers"]} == {"fp16"}
    assert "--fp16" in (bundle / "trtexec.txt").read_text() and "--int8" not in (bundle / "trtexec.txt").read_text()
    assert main(["lint", str(bundle / "model.fp32.onnx"), "--target", "jetson-tx2"]) == 0


def test_desktop_gets_strongly_typed_fp16_qdq(cifar_module, tmp_path):
    import onnx

    assert _build(cifar_module, tmp_path / "desktop", "desktop", ["--quiet"]) == 0
    model = onnx.load(str(tmp_path / "desktop" / "model.int8.onnx"))
    fp16 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16, "strongly typed: FP16 tensors are written into the ONNX"
    assert main(["lint", str(tmp_path / "desktop" / "model.int8.onnx"), "--target", "desktop"]) == 0
    assert "--stronglyTyped" in (tmp_path / "desktop" / "trtexec.txt").read_text()
