"""Accuracy techniques on tiny synthetic models: min/max calibration, asymmetric quantizers, the shift,
channel rescaling and bias correction; each fold exact in FP32, and the QDQ ONNX forms of each."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from vitdeploy.errors import InputError
from vitdeploy.quantize.apply import calibrate, quantize_model
from vitdeploy.quantize.calibrators import MinMaxCalibrator
from vitdeploy.quantize.layers import QuantLinear
from vitdeploy.quantize.quantizer import TensorQuantizer, fake_quantize_unsigned
from vitdeploy.quantize.rescale import find_norm_linear_groups, rescale_norm_linears
from vitdeploy.quantize.techniques import Techniques, input_modes, quantize_with_techniques


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Block(nn.Module):
    """Pre-norm transformer-ish block: LN → qkv-like Linear, LN → MLP (GELU), lopsided LN outputs."""

    def __init__(self, dim=16, residual_norm=False, bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc_a = nn.Linear(dim, 3 * dim, bias=bias)
        self.fc_b = nn.Linear(3 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.residual_norm = residual_norm
        with torch.no_grad():  # uneven channel ranges, as in trained LayerNorms
            for norm in (self.norm1, self.norm2):
                norm.weight.copy_(torch.rand(dim) * 4 + 0.1)
                norm.bias.copy_(torch.randn(dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.fc_b(torch.relu(self.fc_a(h)))
        if self.residual_norm:  # the LayerNorm output has a consumer that is not a Linear
            x = x + h
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class Tiny(nn.Module):
    def __init__(self, dim=16, **kw):
        super().__init__()
        self.blocks = nn.Sequential(Block(dim, **kw), Block(dim, **kw))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def _data(n=64, tokens=6, dim=16):
    return torch.randn(n, tokens, dim) * 2 + 0.5


def _loop(data, batch=16):
    def run(m):
        with torch.no_grad():
            for i in range(0, len(data), batch):
                m(data[i:i + batch])
    return run


# --------------------------------------------------------------------------- calibration, quantizer


def test_minmax_calibrator_per_tensor_and_per_channel():
    cal = MinMaxCalibrator()
    cal.collect(torch.tensor([[-1.0, 2.0], [0.5, 3.0]]))
    cal.collect(torch.tensor([[-2.0, 1.0]]))
    lo, hi = cal.compute_range()
    assert float(lo) == -2.0 and float(hi) == 3.0 and float(cal.compute_amax()) == 3.0
    per_channel = MinMaxCalibrator(axis=-1)
    per_channel.collect(torch.tensor([[[-1.0, 2.0], [0.5, 3.0]]]))
    per_channel.collect(torch.tensor([[-2.0, 1.0]]))
    lo, hi = per_channel.compute_range()
    assert lo.tolist() == [-2.0, 1.0] and hi.tolist() == [0.5, 3.0]
    with pytest.raises(InputError):
        MinMaxCalibrator().compute_range()
    with pytest.raises(InputError):
        per_channel.collect(torch.zeros(2, 3))  # channel count changed


def test_unsigned_quantizer_matches_onnx_quantize_dequantize():
    q = TensorQuantizer(unsigned=True)
    x = torch.linspace(-0.3, 2.7, 1001)
    q.enable_calib()
    q(x)
    q.load_calib_amax()
    assert 0 < q.zero_point < 255
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1001])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1001])],
        [numpy_helper.from_array(np.array(float(q.scale), np.float32), "s"),
         numpy_helper.from_array(np.array(q.zero_point, np.uint8), "z")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(q(x).numpy(), expected, rtol=0, atol=1e-6)
    assert float(q(torch.zeros(1))) == 0.0  # zero stays exact
    np.testing.assert_allclose(fake_quantize_unsigned(x, q.scale, torch.tensor(float(q.zero_point))).numpy(),
                               expected, atol=1e-6)


# --------------------------------------------------------------------------- shift


@pytest.mark.parametrize("mode", ["shift-tensor", "shift-channel"])
def test_shift_fold_is_exact_without_quantization_and_centres_the_input(mode):
    model = Tiny().eval()
    data = _data()
    names = ["blocks.0.fc_a", "blocks.0.fc2", "head"]
    qmodel = quantize_model(model, names, input_modes={n: mode for n in names})
    calibrate(qmodel, _loop(data))
    layer = qmodel.blocks[0].fc2
    assert layer.input_shift is not None
    assert layer.input_shift.numel() == (1 if mode == "shift-tensor" else layer.in_features)
    # Post-GELU input ≥ -0.17: the shift moves the centre of its range close to 0, halving amax.
    plain = quantize_model(model, names)
    calibrate(plain, _loop(data))
    assert float(layer.input_quantizer.amax) < 0.7 * float(plain.blocks[0].fc2.input_quantizer.amax)
    # z lies on the quantization grid: an input of exactly 0 is representable.
    assert torch.allclose(layer.input_shift / layer.input_quantizer.scale,
                          torch.round(layer.input_shift / layer.input_quantizer.scale), atol=1e-3)
    for q in qmodel.modules():
        if isinstance(q, TensorQuantizer):
            q.enabled = False
    with torch.no_grad():
        assert _rel(qmodel(data), model(data)) < 1e-5   # W(x - z) + (b + W z) == W x + b


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_shifted_input_keeps_its_full_range_with_a_clipping_method(method):
    """A massive-activation channel (most tokens ~0, one token 200): centred on its range, a clipping
    amax would clip the channel's bulk. The shifted input keeps its range, so both the bulk and the
    large token come through (the real ViT's fc2 went to 0 % top-1 when entropy clipped x - z)."""
    torch.manual_seed(0)
    layer = nn.Linear(768, 4)   # the bulk of one channel in 768 is a small share of the histogram
    x = torch.nn.functional.gelu(torch.randn(16, 32, 768) * 2)
    x[:, 0, 3] = 200.0       # one token, one channel
    qmodel = quantize_model(nn.Sequential(layer), ["0"], method, input_modes={"0": "shift-channel"})
    calibrate(qmodel, lambda m: m(x))
    q = qmodel.get_submodule("0")
    shifted = x - q.input_shift
    assert float(q.input_quantizer.amax) >= float(shifted.abs().max()) * 0.99
    bulk = x[:, 1:]          # every token but the large one
    recon = q.input_quantizer(bulk - q.input_shift) + q.input_shift
    assert float((recon - bulk).abs().max()) <= float(q.input_quantizer.scale) * 0.51
    big = q.input_quantizer(x[:, 0] - q.input_shift) + q.input_shift
    torch.testing.assert_close(big[:, 3], x[:, 0, 3], atol=float(q.input_quantizer.scale), rtol=0)


def test_shift_layer_computes_asymmetric_quantization():
    """y = W_q·q(x - z) + (b + W_q·z): the quantized input is q(x - z) + z, the grid centred on the data."""
    layer = nn.Linear(8, 4)
    q = QuantLinear.from_float(layer, shift_mode="tensor")
    x = torch.rand(32, 8) * 3 + 1   # all positive: [1, 4]
    q.input_quantizer.set_amax(1.5)
    q.input_shift = torch.tensor(2.5)
    w = q.weight_quantizer(q.weight)
    xq = torch.clamp(torch.round((x - 2.5) / q.input_quantizer.scale), -128, 127) * q.input_quantizer.scale + 2.5
    with torch.no_grad():
        torch.testing.assert_close(q(x), nn.functional.linear(xq, w, layer.bias), rtol=1e-5, atol=1e-5)


def test_input_modes_per_target():
    model = Tiny()
    precision = {"blocks.0.fc_a": "int8", "blocks.0.fc1": "int8-asym"}
    off, on = Techniques.none(), Techniques(shift=True, rescale=False, bias_correction=False)
    assert input_modes(model, precision, "cpu", off) == {"blocks.0.fc_a": "int8", "blocks.0.fc1": "uint8"}
    assert input_modes(model, precision, "jetson-orin", off) == {"blocks.0.fc_a": "int8",
                                                                  "blocks.0.fc1": "shift-tensor"}
    assert input_modes(model, precision, "jetson-orin", on) == {"blocks.0.fc_a": "shift-channel",
                                                                 "blocks.0.fc1": "shift-channel"}
    assert input_modes(model, precision, "cpu", on)["blocks.0.fc1"] == "uint8+shift-channel"
    matmuls = {"blocks.0.attn.matmul_av": "int8-asym", "blocks.0.attn.matmul_qk": "int8-asym"}
    assert input_modes(model, matmuls, "cpu", off) == {"blocks.0.attn.matmul_av": "uint8",
                                                       "blocks.0.attn.matmul_qk": "int8"}
    assert input_modes(model, matmuls, "jetson-orin", off) == {"blocks.0.attn.matmul_av": "shift-tensor",
                                                               "blocks.0.attn.matmul_qk": "int8"}
    int8 = {"blocks.0.attn.matmul_av": "int8", "blocks.0.attn.matmul_qk": "int8"}
    assert input_modes(model, int8, "jetson-orin", off)["blocks.0.attn.matmul_av"] == "int8"
    assert input_modes(model, int8, "jetson-orin", on)["blocks.0.attn.matmul_av"] == "shift-tensor"
    assert input_modes(model, int8, "cpu", on)["blocks.0.attn.matmul_av"] == "uint8"


# --------------------------------------------------------------------------- rescale


def test_norm_linear_groups_found_by_tensor_identity():
    model = Tiny().eval()
    groups = find_norm_linear_groups(model, lambda m: m(_data(4)))
    assert groups == {"blocks.0.norm1": ["blocks.0.fc_a"], "blocks.0.norm2": ["blocks.0.fc1"],
                      "blocks.1.norm1": ["blocks.1.fc_a"], "blocks.1.norm2": ["blocks.1.fc1"]}


def test_rescale_fold_is_exact_and_equalises_channels():
    model = Tiny().eval()
    data = _data()
    with torch.no_grad():
        reference = model(data)
        ranges_before = model.blocks[0].norm1(data).abs().amax(dim=(0, 1))
    record = rescale_norm_linears(model, _loop(data), alpha=0.5)
    assert sorted(record["groups"]) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2"]
    with torch.no_grad():
        assert _rel(model(data), reference) < 1e-5
        ranges_after = model.blocks[0].norm1(data).abs().amax(dim=(0, 1))
    spread = lambda r: float(r.max() / r.min())
    assert spread(ranges_after) < spread(ranges_before)


def test_rescale_undoes_a_fold_that_is_not_exact():
    model = Tiny(residual_norm=True).eval()
    data = _data()
    with torch.no_grad():
        reference = model(data)
        norm1 = model.blocks[0].norm1.weight.clone()
    record = rescale_norm_linears(model, _loop(data))
    assert "blocks.0.norm1" in record["skipped"] and "blocks.0.norm2" in record["groups"]
    assert torch.equal(model.blocks[0].norm1.weight, norm1)
    with torch.no_grad():
        assert _rel(model(data), reference) < 1e-5


def test_rescale_on_timm_vit_is_exact(tiny_vit):
    model = tiny_vit.model
    data = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        reference = model(data)
    precision = {n: "int8" for n, m in model.named_modules() if type(m) is nn.Linear}
    _, prepared, record = quantize_with_techniques(
        model, precision, "jetson-orin", _loop(data, 4), techniques=Techniques(shift=False, rescale=True,
                                                                               bias_correction=False))
    assert record["rescale"]["groups"] == {f"blocks.{i}.norm{j}": [f"blocks.{i}.{'attn.qkv' if j == 1 else 'mlp.fc1'}"]
                                           for i in range(2) for j in (1, 2)}
    assert prepared is not model
    with torch.no_grad():
        assert _rel(prepared(data), reference) < 1e-5
        assert torch.equal(model(data), reference)  # the caller's model is untouched


# --------------------------------------------------------------------------- bias correction


def test_bias_correction_restores_the_mean_output():
    model = Tiny(bias=False).eval()
    data = _data()
    names = ["blocks.0.fc_a", "blocks.0.fc1"]
    qmodel = quantize_model(model, names)
    for name in names:
        qmodel.get_submodule(name).weight_quantizer.num_bits = 3   # a large weight error
    calibrate(qmodel, _loop(data), bias_correction=True)
    layer = qmodel.blocks[0].fc_a
    assert layer.bias is not None and layer.bias_corrected   # created for a Linear without bias
    layer.input_quantizer.enabled = False
    x = model.blocks[0].norm1(data)
    with torch.no_grad():
        corrected = layer(x).mean(dim=(0, 1))
        expected = model.blocks[0].fc_a(x).mean(dim=(0, 1))
    torch.testing.assert_close(corrected, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- builds (ONNX)


def _build(tiny_vit, calib_npz, out, **kw):
    from vitdeploy.pipeline import BuildConfig, build

    return build(BuildConfig(model=tiny_vit.state_dict, calib=calib_npz, arch=tiny_vit.arch,
                             model_kwargs=tiny_vit.kwargs,
                             out=out, calib_size=16, verify_images=16, **kw))


def _zero_points(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_int8_asym_plan_on_tensorrt_target_has_only_zero_zero_points(tiny_vit, calib_npz, tmp_path):
    from vitdeploy.lint import lint_model

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": "int8-asym", "layers": {}}))   # Conv, Linears (head: Gemm), matmuls
    record = _build(tiny_vit, calib_npz, tmp_path / "orin", target="jetson-orin", plan=plan, shift=False)  # asym alone
    path = tmp_path / "orin" / "model.int8.onnx"
    assert not [v for v in lint_model(path, "jetson-orin") if v.rule == "zero-point"]
    assert all(z.dtype == np.int8 and not z.any() for z in _zero_points(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Sub") == 13   # one shift per Linear: (qkv, proj, fc1, fc2) × 2 blocks + head; 2 × (P, v)
    assert ops.count("ReduceMean") == 2   # v centred over the tokens, its mean added back
    assert record["techniques"]["int8_asym"]["blocks.0.attn.matmul_av"].startswith("softmax output int8 after a shift")
    assert record["verification"]["int8"]["cosine"] > 0.999
    assert record["techniques"]["int8_asym"]["blocks.0.mlp.fc2"].startswith("int8 after a per-tensor shift")
    fc2 = next(layer for layer in record["layers"] if layer["name"] == "blocks.0.mlp.fc2")
    assert "shift" in fc2["activations"]


def test_int8_asym_plan_on_cpu_uses_zero_points(tiny_vit, calib_npz, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": "int8-asym", "layers": {}}))   # the patch-embed Conv and head too
    record = _build(tiny_vit, calib_npz, tmp_path / "cpu", plan=plan, shift=False)  # zero points alone, no shift
    path = tmp_path / "cpu" / "model.int8.onnx"
    zps = _zero_points(path)
    assert any(z.dtype == np.uint8 and z.any() and z.reshape(-1)[0] != 128 for z in zps)
    assert "Sub" not in [n.op_type for n in onnx.load(str(path)).graph.node]
    assert record["verification"]["int8"]["cosine"] > 0.999
    av = next(layer for layer in record["layers"] if layer["name"] == "blocks.0.attn.matmul_av")
    assert av["activations"].startswith("softmax output uint8")


@pytest.mark.parametrize("target", ["cpu", "jetson-orin"])
def test_all_techniques_build_reproduces_pytorch_and_is_recorded(tiny_vit, calib_npz, tmp_path, target):
    from vitdeploy.lint import lint_errors, lint_model

    record = _build(tiny_vit, calib_npz, tmp_path / target, target=target, shift=True, rescale=True,
                    bias_correction=True)
    techniques = record["techniques"]
    assert all(techniques[k]["enabled"] for k in ("shift", "rescale", "bias_correction"))
    assert len(techniques["rescale"]["groups"]) == 4
    assert set(techniques["bias_correction"]["layers"]) == {"blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                            "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                                                            "blocks.1.attn.qkv", "blocks.1.attn.proj",
                                                            "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}
    assert record["verification"]["int8"]["agreement"] >= 99.0 and record["verification"]["int8"]["cosine"] >= 0.999
    if target != "cpu":
        assert not lint_errors(lint_model(tmp_path / target / "model.int8.onnx", target))
    # model.fp32.onnx is the user's model, untouched by the rescaling pre-pass.
    fp32 = onnx.load(str(tmp_path / target / "model.fp32.onnx"))
    gamma = next(numpy_helper.to_array(i) for i in fp32.graph.initializer if i.name == "blocks.0.norm1.weight")
    np.testing.assert_array_equal(gamma, tiny_vit.model.blocks[0].norm1.weight.detach().numpy())


@pytest.mark.parametrize("target", ["cpu", "jetson-orin"])
def test_defaults_are_recorded(tiny_vit, calib_npz, tmp_path, target):
    from vitdeploy.quantize import techniques as t

    record = _build(tiny_vit, calib_npz, tmp_path / "default", target=target)
    from vitdeploy.quantize.technique_defaults import DEFAULT_SHIFT_BUILD

    assert {k: record["techniques"][k]["enabled"] for k in ("shift", "rescale", "bias_correction")} == \
        {"shift": DEFAULT_SHIFT_BUILD, "rescale": t.DEFAULT_RESCALE, "bias_correction": t.DEFAULT_BIAS_CORRECTION}
    assert record["techniques"]["shift"]["default"] == DEFAULT_SHIFT_BUILD
    # The default plan keeps attention float, so no softmax output is quantized, shifted or not.
    assert record["techniques"]["shift"]["softmax"] is False


def test_bias_less_linear_gets_a_bias_add_in_onnx(tmp_path):
    """A shifted, bias-corrected Linear without bias: the QDQ graph gets its bias Add and matches PyTorch."""
    from vitdeploy.artifacts import ModelSpec
    from vitdeploy.export.onnx_export import export_fp32
    from vitdeploy.export.qdq import export_int8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(12)
            self.fc = nn.Linear(12, 24, bias=False)
            self.out = nn.Linear(24, 3)

        def forward(self, x):
            x = x.flatten(1).reshape(x.shape[0], -1, 12)
            return self.out(torch.relu(self.fc(self.norm(x))).mean(1))

    model = Net().eval()
    spec = ModelSpec(name="net", input_size=(1, 6, 8), mean=(0.0,), std=(1.0,), num_classes=3)
    data = torch.randn(32, 1, 6, 8)
    qmodel, prepared, _ = quantize_with_techniques(model, {"fc": "int8", "out": "int8"}, "jetson-orin", _loop(data),
                                                   techniques=Techniques.all())
    proto = export_fp32(prepared, spec, tmp_path / "fp32.onnx")
    qdq = export_int8(qmodel, spec, proto)
    onnx.checker.check_model(qdq, full_check=True)
    adds = [n for n in qdq.graph.node if n.op_type == "Add" and any(i.startswith("fc.") for i in n.input)]
    assert len(adds) == 1   # the folded bias b + W_q·z (b = 0) as the layer's bias initializer
    options = ort.SessionOptions()   # Q/DQ in float: what TensorRT computes, on any host CPU
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": data.numpy()})[0]
    with torch.no_grad():
        expected = qmodel(data).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_cli_switches_reach_the_build_config(monkeypatch):
    from vitdeploy import cli

    seen = {}

    def fake_build(cfg):
        seen["cfg"] = cfg
        raise InputError("stop here")

    monkeypatch.setattr("vitdeploy.pipeline.build", fake_build)
    assert cli.main(["build", "m.pt", "--no-shift", "--rescale", "--quiet"]) == 2
    cfg = seen["cfg"]
    assert (cfg.shift, cfg.rescale, cfg.bias_correction) == (False, True, None)
