"""Quantized attention twins beyond timm (the vit-pytorch layout) and the shifted softmax."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vitdeploy.artifacts import ModelSpec
from vitdeploy.inventory import find_layers
from vitdeploy.quantize.apply import calibrate, quantize_model, quantized_attentions
from vitdeploy.quantize.attention import attention_twin_for, twin_reproduces
from vitdeploy.quantize.quantizer import TensorQuantizer

# The vit-pytorch layout: written out here so that the test file is its own module source, as a
# user's model file would be (the pipeline imports it from --arch file.py:Class).
SOURCE = '''
import torch
from torch import nn


class Attention(nn.Module):          # vit-pytorch 0.x: PreNorm outside, softmax inline
    def __init__(self, dim, heads=2, dim_head=16):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class NewAttention(nn.Module):       # vit-pytorch 1.x: LayerNorm, nn.Softmax and dropout inside
    def __init__(self, dim, heads=2, dim_head=16):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.0)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x):
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = self.dropout(self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale))
        return self.to_out(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1))


class LookAlike(Attention):          # same attributes, another computation (a talking-heads mix)
    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1).flip(1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class TinyViT(nn.Module):
    def __init__(self, attention="Attention", dim=32, depth=2, classes=4):
        super().__init__()
        cls = globals()[attention]
        self.embed = nn.Linear(16, dim)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.attns = nn.ModuleList([cls(dim) for _ in range(depth)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.ReLU(),
                                                 nn.Linear(2 * dim, dim)) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

    def forward(self, img):
        b = img.shape[0]
        x = self.embed(img.reshape(b, 1, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(b, 16, 16))
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), 1) + self.pos
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            x = x + attn(norm(x))
            x = x + mlp(x)
        return self.head(x[:, 0])
'''
SPEC = ModelSpec(name="tiny_vit_pytorch", input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), num_classes=4)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import importlib.util
    import sys

    path = tmp_path_factory.mktemp("vit_pytorch") / "tiny_vit_pytorch_model.py"
    path.write_text(SOURCE)
    spec = importlib.util.spec_from_file_location("tiny_vit_pytorch_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_vit_pytorch_model"] = module
    spec.loader.exec_module(module)
    return path, module


def _model(module, attention="Attention"):
    torch.manual_seed(0)
    model = module.TinyViT(attention).eval()
    with torch.no_grad():   # peaked attention, as trained models have: softmax outputs up to ~1
        for attn in model.attns:
            attn.to_qkv.weight.mul_(4.0)
    return model


def _images(n=64, seed=1):
    return torch.randn(n, *SPEC.input_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["Attention", "NewAttention"])
def test_vit_pytorch_attention_gets_both_matmuls_in_the_inventory(source, attention):
    model = _model(source[1], attention)
    layers = find_layers(model, SPEC)
    matmuls = [layer for layer in layers if layer.kind == "matmul"]
    assert [layer.name for layer in matmuls] == ["attns.0.matmul_qk", "attns.0.matmul_av",
                                                 "attns.1.matmul_qk", "attns.1.matmul_av"]
    assert all(layer.macs == 2 * 17 * 17 * 16 for layer in matmuls)          # heads · tokens² · head size
    names = [layer.name for layer in layers]
    assert names.index("attns.0.to_qkv") + 1 == names.index("attns.0.matmul_qk")   # execution order


def test_look_alike_attention_is_refused_with_a_warning(source, caplog):
    model = _model(source[1], "LookAlike")
    assert attention_twin_for(model.attns[0]) is not None          # the structure matches...
    with caplog.at_level(logging.WARNING, logger="vitdeploy"):
        layers = find_layers(model, SPEC)
    assert not [layer for layer in layers if layer.kind == "matmul"]   # ...the computation does not
    assert "attns.0" in caplog.text and "floating point" in caplog.text


@pytest.mark.parametrize("attention", ["Attention", "NewAttention"])
def test_twin_with_quantizers_off_and_a_softmax_shift_is_the_original(source, attention):
    model = _model(source[1], attention)
    x = _images()
    with torch.no_grad():
        reference = model(x)
    names = [n for n in (layer.name for layer in find_layers(model, SPEC)) if "matmul" in n]
    qmodel = quantize_model(model, names, input_modes={n: "shift-tensor" for n in names if n.endswith("av")})
    calibrate(qmodel, lambda m: m(x))
    attns = quantized_attentions(qmodel)
    assert len(attns) == 2 and all(0.25 < float(a.softmax_shift) <= 0.5 for a in attns.values())
    for q in qmodel.modules():
        if isinstance(q, TensorQuantizer):
            q.enabled = False
    with torch.no_grad():
        got = qmodel(x)
    assert float((got - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_shifted_softmax_halves_the_quantization_step(source):
    """Same calibrated range [0, a]: step a/254 instead of a/127, so the attention output error drops."""
    model = _model(source[1])
    x = _images(128)
    attention = model.attns[0]
    inputs = []
    hook = attention.register_forward_pre_hook(lambda m, i: inputs.append(i[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    with torch.no_grad():
        expected = attention(inputs[0])
    errors = {}
    for mode in ("int8", "shift-tensor"):
        qmodel = quantize_model(model, ["attns.0.matmul_av"], input_modes={"attns.0.matmul_av": mode})
        twin = qmodel.attns[0]
        twin.v_quantizer.enabled = False                     # only the softmax quantizer differs
        calibrate(qmodel, lambda m: m(x))
        with torch.no_grad():
            errors[mode] = float(((twin(inputs[0]) - expected) ** 2).mean())
        amax = float(twin.softmax_quantizer.amax)
        if mode == "shift-tensor":
            assert float(twin.softmax_shift) == pytest.approx(amax, rel=1e-6)   # z = a/2 = amax of P - z
    assert errors["shift-tensor"] < 0.5 * errors["int8"]


def test_twin_reproduces_rejects_a_wrong_shape(source):
    model = _model(source[1])
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = model.attns[0](x)
    assert twin_reproduces(model.attns[0], (x,), out)
    assert not twin_reproduces(model.attns[0], (x,), out[:, :1])
    assert not twin_reproduces(model.attns[0], (x,), out + 1.0)


@pytest.mark.parametrize("target, shift", [("cpu", False), ("jetson-orin", True), ("desktop", True), ("desktop", False), ("jetson-orin", False)])
def test_vit_pytorch_build_quantizes_attention_and_onnx_matches(source, tmp_path, target, shift):
    from vitdeploy.pipeline import BuildConfig, build

    path, module = source
    weights = tmp_path / "weights.pt"
    torch.save(_model(module).state_dict(), weights)
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.integers(0, 256, (32, 16, 16, 1), dtype=np.uint8))
    out = tmp_path / "out"
    plan = tmp_path / "plan.json"   # TensorRT targets keep attention FP16 by default: ask for INT8
    plan.write_text(json.dumps({"default": "int8", "layers": {"embed": "fp16", "head.1": "fp16", "*.matmul_*": "int8"}}))
    record = build(BuildConfig(model=weights, arch=f"{path}:TinyViT", input_size=[1, 16, 16], mean=[0.5], std=[0.5],
                               calib=calib, calib_size=32, verify_images=32, target=target, out=out, shift=shift,
                               plan=plan))
    matmuls = [layer for layer in record["layers"] if layer["kind"] == "matmul"]
    assert len(matmuls) == 4 and all(layer["precision"] == "int8" for layer in matmuls)
    verification = record["verification"]["int8"]
    assert verification["cosine"] >= 0.999          # FP16 desktop: argmax ties may flip, as any FP16 build
    if target != "desktop":
        assert verification["agreement"] >= 99.0
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    if shift:   # the shifted softmax: Sub before its Q/DQ, v centred, its token mean added back
        assert ops.count("ReduceMean") == 2
        assert sum("attention-softmax-shift" in v for v in record["lint"]) == 2
        av = next(layer for layer in record["layers"] if layer["name"] == "attns.0.matmul_av")
        assert "shift" in av["activations"]
    else:
        assert "ReduceMean" not in ops and not record["lint"]
    assert json.loads((out / "build.json").read_text())["techniques"]["shift"]["enabled"] is shift


@pytest.mark.parametrize("target", ["jetson-orin", "cpu"])
def test_default_build_attention_precision_per_target(source, tmp_path, target):
    """Attention matmuls FP16 (float on cpu) by default, every INT8 Linear's input shifted, and no
    Sub between Softmax and a Q/DQ; an explicit plan still gets INT8 attention (test above)."""
    from vitdeploy.pipeline import BuildConfig, build

    path, module = source
    weights = tmp_path / "weights.pt"
    torch.save(_model(module).state_dict(), weights)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).integers(0, 256, (32, 16, 16, 1), dtype=np.uint8))
    out = tmp_path / "out"
    record = build(BuildConfig(model=weights, arch=f"{path}:TinyViT", input_size=[1, 16, 16], mean=[0.5], std=[0.5],
                               calib=calib, calib_size=32, verify_images=32, target=target, out=out))
    matmuls = {layer["name"]: layer["precision"] for layer in record["layers"] if layer["kind"] == "matmul"}
    assert set(matmuls.values()) == {"fp16"}
    shift = record["techniques"]["shift"]
    assert shift["enabled"] and not shift["softmax"]
    linears = {layer["name"] for layer in record["layers"] if layer["kind"] == "linear" and layer["precision"] == "int8"}
    assert linears and set(shift["layers"]) == linears   # every INT8 Linear's input is shifted
    ops = [n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node]
    assert "ReduceMean" not in ops and not any("attention-softmax-shift" in v for v in record["lint"])
