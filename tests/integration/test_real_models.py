"""Acceptance on real trained ViTs: a timm ViT on CIFAR-10 and a plain-PyTorch ViT on MNIST.

Skipped when ../shared/data is absent. Each build runs the CLI exactly as a user would.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitdeploy.cli import main

from .shared_data import import_model_file, mnist_npz, shared_path

pytestmark = pytest.mark.slow

CIFAR_KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 128, "depth": 6, "num_heads": 4,
                "mlp_ratio": 2.0, "layer_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def cifar_build(tmp_path_factory):
    """cifar10_vit pickled whole, 512 calibration images from train_10k, evaluated on all 10,000 test images."""
    folder = tmp_path_factory.mktemp("cifar")
    module = import_model_file(shared_path("cifar10_vit", "model.py"), "cifar10_vit_model")
    torch.save(module.build(), folder / "cifar10_vit.pt")
    out = folder / "out"
    code = main(["build", str(folder / "cifar10_vit.pt"), "--trust-pickle", "--mean", "0.5", "--std", "0.5",
                 "--calib", str(shared_path("cifar10", "train_10k.npz")), "--calib-size", "512",
                 "--eval-data", str(shared_path("cifar10", "test.npz")), "--target", "cpu", "--out", str(out), "--quiet"])
    assert code == 0
    return out, json.loads((out / "build.json").read_text())


def test_cifar10_int8_top1_within_one_point(cifar_build):
    _, record = cifar_build
    acc = record["accuracy"]
    assert acc["images"] == 10000
    assert abs(acc["fp32_top1"] - 51.8) < 0.5  # the model card's FP32 number: the export is faithful
    assert abs(acc["int8_top1"] - acc["fp32_top1"]) <= 1.0


def test_cifar10_build_folder_is_complete(cifar_build):
    out, record = cifar_build
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "calib.cache", "model.fp32.onnx", "model.int8.onnx",
                                                     "plan.json", "report.md"]
    assert record["inputs"]["calibration"]["images"] == 512
    roles = [layer["role"] for layer in record["layers"]]
    # patch-embed conv, 6 × (qkv, q·kᵀ, softmax·v, attn-out, fc1, fc2), head.
    assert roles == ["patch_embed"] + ["qkv", "attn_qk", "attn_av", "attn_out", "mlp_fc1", "mlp_fc2"] * 6 + ["head"]
    precision = {layer["role"]: layer["precision"] for layer in record["layers"]}
    # Attention matmuls float by default (plan.py: on cifar10_vit's cpu build 99.12 -> 99.27 % agreement).
    assert precision == {"patch_embed": "fp16", "head": "fp16", "qkv": "int8", "attn_qk": "fp16", "attn_av": "fp16",
                         "attn_out": "int8", "mlp_fc1": "int8", "mlp_fc2": "int8"}
    assert record["plan"]["int8_linear_mac_share"] > 80.0
    assert record["files"]["model.int8.onnx"] < 0.4 * record["files"]["model.fp32.onnx"]
    report = (out / "report.md").read_text()
    assert "| INT8" in report and f"KL(FP32 ‖ INT8) {record['accuracy']['kl_to_fp32']:.3g}" in report


def test_cifar10_qdq_onnx_reproduces_pytorch_fake_quant(cifar_build, tmp_path):
    """ONNX Runtime running the QDQ graph vs the PyTorch fake-quant model, on real test images."""
    from vitdeploy.backends.ort import OrtRunner
    from vitdeploy.data import load_images
    from vitdeploy.load import load_model
    from vitdeploy.pipeline import BuildConfig, _quantize
    from vitdeploy.targets import get_target

    out, record = cifar_build
    model, spec = load_model(out.parent / "cifar10_vit.pt", trust_pickle=True, mean=[0.5], std=[0.5])
    # The build's fake-quant model again: its plan, its techniques (the cpu default has the shift on),
    # calibrated on the same 512 images.
    precision = {layer["name"]: layer["precision"] for layer in record["layers"]}
    calib = load_images(shared_path("cifar10", "train_10k.npz"), spec).sample(512, 0)
    qmodel, _, techniques, _ = _quantize(model, precision, get_target("cpu"), calib,
                                         BuildConfig(model=out.parent / "cifar10_vit.pt"))
    assert techniques["shift"]["enabled"] == record["techniques"]["shift"]["enabled"]
    int8 = [layer for layer in record["layers"] if layer["precision"] == "int8" and layer["kind"] != "matmul"]
    modules = dict(qmodel.named_modules())
    for layer in int8:  # the same activation ranges the build recorded
        assert float(modules[layer["name"]].input_quantizer.amax) == pytest.approx(layer["input_amax"], rel=1e-6)
    images = load_images(shared_path("cifar10", "test.npz"), spec).subset(range(2000))
    x = np.concatenate([b for b, _ in images.batches(500)])
    with torch.no_grad():
        reference = qmodel(torch.from_numpy(x)).numpy()
    for qdq in ("float", "fused"):  # the ONNX semantics, and this host's integer kernels
        with OrtRunner(out / "model.int8.onnx", qdq=qdq) as runner:
            onnx_logits = runner.infer({"input": x})["logits"]
        agreement = (reference.argmax(1) == onnx_logits.argmax(1)).mean()
        cosine = (reference * onnx_logits).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(onnx_logits, axis=1))
        assert agreement >= 0.99, qdq
        assert cosine.mean() >= 0.999, qdq


def test_cifar10_agreement_with_fp32(cifar_build):
    """Issue 3's bar for the default build: top-1 within 0.3 points and ≥ 98.5 % same predictions,
    computed by this host's fused integer kernels and with Q/DQ in float (issue 13)."""
    _, record = cifar_build
    acc = record["accuracy"]
    assert abs(acc["int8_top1"] - acc["fp32_top1"]) <= 0.3
    assert acc["agreement"] >= 98.5 and acc["agreement_float_qdq"] >= 98.5
    assert acc["int8_computed_by"].startswith("ONNX Runtime's fused integer kernels")
    # KL(FP32 ‖ INT8) beside agreement: positive (INT8 is not FP32) and small where agreement is high
    assert 0 < acc["kl_to_fp32"] < 0.01 and 0 < acc["kl_float_qdq_to_fp32"] < 0.01


def test_cifar10_cpu_file_is_exact_on_every_cpu_and_checked_here(cifar_build):
    from vitdeploy.cpu_isa import FAMILIES, host_isa

    _, record = cifar_build
    assert record["cpu"]["exact_on"] == list(FAMILIES)
    assert record["cpu"]["host_isa"] == host_isa() and record["cpu"]["verified_on"] == [host_isa()]
    host = record["verification"]["int8_host"]
    assert host["kernels"]["exact"] and host["kernels"]["layers"] == 24   # 6 blocks x 4 Linear (attention float)
    assert host["kernels"]["max_rel_error"] <= 1e-5
    assert host["agreement_checked"] >= 99.0 and host["cosine"] >= 0.999


def test_eval_json_matches_build(cifar_build, capsys):
    out, record = cifar_build
    assert main(["eval", str(out / "model.int8.onnx"), "--data", str(shared_path("cifar10", "test_exact846.npz")),
                 "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 846
    assert 30.0 < result["top1"] < 70.0


def test_cifar10_state_dict_with_arch_matches_pickled_module(tmp_path, capsys):
    """The state_dict + --arch path builds the same network (layer_norm_eps included)."""
    module = import_model_file(shared_path("cifar10_vit", "model.py"), "cifar10_vit_model")
    reference = module.build()
    x = np.load(shared_path("cifar10", "test_exact846.npz"))["x"][:64]
    out = tmp_path / "out"
    code = main(["build", str(shared_path("cifar10_vit", "vit_cifar10_timm.pth")), "--arch", "vit_tiny_patch16_224",
                 "--model-kwargs", json.dumps(CIFAR_KWARGS), "--mean", "0.5", "--std", "0.5",
                 "--calib", str(shared_path("cifar10", "train_10k.npz")), "--calib-size", "64", "--out", str(out),
                 "--quiet"])
    assert code == 0
    from vitdeploy.backends.ort import OrtRunner

    inputs = ((x.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()
    with torch.no_grad():
        expected = reference(torch.from_numpy(inputs)).numpy()
    with OrtRunner(out / "model.fp32.onnx") as runner:
        got = runner.infer({"input": inputs})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_mnist_plain_pytorch_vit(tmp_path):
    """A hand-written ViT (not timm): state_dict + --arch file.py:Class, calibrate on 5000–9999, evaluate on 0–4999."""
    paths = mnist_npz(tmp_path)
    out = tmp_path / "out"
    code = main(["build", str(shared_path("mnist_vit", "vit_mnist.pt")),
                 "--arch", f"{shared_path('mnist_vit', 'model.py')}:ViT", "--input-size", "1", "28", "28",
                 "--mean", "0.1307", "--std", "0.3081", "--calib", str(paths["calib"]), "--calib-size", "512",
                 "--eval-data", str(paths["eval"]), "--out", str(out), "--quiet"])
    assert code == 0
    record = json.loads((out / "build.json").read_text())
    acc = record["accuracy"]
    assert acc["images"] == 5000
    assert acc["fp32_top1"] > 95.0
    assert abs(acc["int8_top1"] - acc["fp32_top1"]) <= 0.1   # issue 3's bar (issue 2's was 1.0)
    # Issue 3's bar was 99.85 % with 8-bit weights (measured 99.86 %); the cpu file's 7-bit weights,
    # exact on every CPU, measured 99.84 % with INT8 attention, 99.92 % with the float attention of
    # today's default. Both fused and with Q/DQ in float.
    assert acc["agreement"] >= 99.8 and acc["agreement_float_qdq"] >= 99.8
    assert set(record["cpu"]["exact_on"]) >= {"x86-avx2", "x86-avx512", "x86-vnni", "arm64"}
    roles = [layer["role"] for layer in record["layers"]]
    assert roles == ["patch_embed"] + ["qkv", "attn_qk", "attn_av", "attn_out", "mlp_fc1", "mlp_fc2"] * 6 + ["head"]
    matmuls = [layer for layer in record["layers"] if layer["kind"] == "matmul"]   # the vit-pytorch twin
    assert len(matmuls) == 12 and all(layer["precision"] == "fp16" for layer in matmuls)   # found; float by default


@pytest.mark.parametrize("damaged", ["blocks.2.mlp.fc2", "blocks.1.attn.qkv"])
def test_cifar10_sensitivity_ranks_damaged_layer_first(damaged):
    from vitdeploy.analyse import analyse
    from vitdeploy.data import load_images
    from vitdeploy.inventory import find_layers
    from vitdeploy.load import infer_spec, prepare_for_quantization

    module = import_model_file(shared_path("cifar10_vit", "model.py"), "cifar10_vit_model")
    model = prepare_for_quantization(module.build())
    spec = infer_spec(model, shared_path("cifar10_vit", "vit_cifar10_timm.pth"), None, None, [0.5], [0.5])
    with torch.no_grad():
        dict(model.named_modules())[damaged].weight.mul_(100.0)
    images = load_images(shared_path("cifar10", "test_exact846.npz"), spec).subset(range(96))
    report = analyse(model, find_layers(model, spec), images)
    assert report.ranked("kl")[0].name == damaged
