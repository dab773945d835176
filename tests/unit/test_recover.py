"""Accuracy recovery (``build --recover``): what is learned starts at plain calibration, folds into ordinary
INT8 weights and scales, leaves the exported graph's structure alone, and is deterministic for a seed."""
from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest
import torch

from vitdeploy.inventory import find_layers
from vitdeploy.plan import PrecisionPlan
from vitdeploy.quantize.quantizer import TensorQuantizer
from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques
from vitdeploy.recover import RecoverySettings, recover
from vitdeploy.recover.learnable import LearnedStep, LearnedWeight
from vitdeploy.recover.units import find_units, mark_chains, record

FAST = dict(iters=6, batch=8, guard_images=8)


def _tiny(tiny_vit):
    from vitdeploy.load import load_model

    model, spec = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs)
    return model, spec


def _images(n=24, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32))


def _quantized(model, spec, images, plan=None, num_bits=None):
    layers = find_layers(model, spec)
    precision = (plan or PrecisionPlan(default="int8", layers={})).resolve(layer.name for layer in layers)

    def loop(m):
        with torch.no_grad():
            m(images)

    qmodel, prepared, _ = quantize_with_techniques(model, precision, "jetson-orin", loop, "max",
                                                   Techniques(shift=True, softmax_shift=False), num_bits=num_bits)
    return layers, precision, qmodel, prepared


def test_learned_weight_starts_at_round_to_nearest_and_folds_onto_the_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = TensorQuantizer(axis=0)
    q.set_amax(w.abs().amax(1))
    lw = LearnedWeight(q, w, rank=4, generator=torch.Generator().manual_seed(0))
    lw.hard = True
    torch.testing.assert_close(lw(w), q(w))          # B = 0: plain rounding exactly
    with torch.no_grad():
        lw.v.normal_()                                # some other rounding, and a low-rank term
        lw.b.normal_(std=0.01)
    folded = lw.folded(w)
    codes = folded / q.scale.reshape(-1, 1)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    torch.testing.assert_close(q(folded), folded)    # the calibrated quantizer leaves it unchanged
    assert ((folded - w).abs() <= q.scale.reshape(-1, 1) * (1.01 + (lw.b @ lw.a).abs())).all()


def test_learned_step_is_the_calibrated_quantizer_and_learns():
    q = TensorQuantizer()
    q.set_amax(3.0)
    step = LearnedStep(q)
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(step(x), q(x))
    loss = (step(x) - x).pow(2).sum()
    loss.backward()
    assert step.log_scale.grad is not None and float(step.log_scale.grad) != 0.0


def test_units_are_blocks_patch_embedding_and_head_and_blocks_chain(tiny_vit):
    model, spec = _tiny(tiny_vit)
    layers = find_layers(model, spec)
    names = [layer.name for layer in layers]
    attention = sorted({layer.name.rpartition(".")[0] for layer in layers if layer.role == "attn_qk"})
    units = find_units(model, names, _images(1), attention)
    assert [u.name for u in units] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert sorted(n for u in units for n in u.layers) == sorted(names)
    mark_chains(units, record(model, units, _images(4), 2, outputs=True))
    assert [u.chains for u in units] == [False, False, True, False]   # class token between embed and block 0


def test_units_of_a_vit_pytorch_layout_are_its_pre_norm_sub_blocks(plain_attention_vit):
    model, spec = plain_attention_vit
    layers = find_layers(model, spec)
    attention = sorted({layer.name.rpartition(".")[0] for layer in layers if layer.role in ("attn_qk", "qkv")})
    units = find_units(model, [layer.name for layer in layers], torch.zeros(1, *spec.input_size), attention)
    # every unit holds at most one attention: the residual adds live in the parent's loop
    assert all(sum(a == n or a.startswith(n + ".") for a in attention) <= 1 for n in (u.name for u in units))
    assert len(units) >= 3


@pytest.fixture
def plain_attention_vit():
    """A vit-pytorch-layout model: residual adds in the parent's loop, no module per block."""
    from torch import nn

    from vitdeploy.artifacts import ModelSpec

    class Attention(nn.Module):
        def __init__(self, dim=16, heads=2, dim_head=8):
            super().__init__()
            self.heads, self.scale = heads, dim_head ** -0.5
            self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
            self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
            attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
            return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))

    class PreNorm(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.norm, self.fn = nn.LayerNorm(16), fn

        def forward(self, x):
            return self.fn(self.norm(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(48, 16)
            self.layers = nn.ModuleList([nn.ModuleList([
                PreNorm(Attention()), PreNorm(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)))])
                for _ in range(2)])
            self.head = nn.Linear(16, 4)

        def forward(self, img):
            x = self.embed(img.reshape(img.shape[0], 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, 16, 48))
            for attn, ff in self.layers:
                x = attn(x) + x
                x = ff(x) + x
            return self.head(x.mean(1))

    torch.manual_seed(0)
    spec = ModelSpec(name="plain", input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, num_classes=4)
    return ViT().eval(), spec


def _state(qmodel):
    return {k: v.clone() for k, v in qmodel.state_dict().items()}


@pytest.mark.parametrize("switches", [{}, {"progressive": False}, {"lowrank": False, "curriculum": False}])
def test_recovery_is_deterministic_folds_and_does_not_hurt(tiny_vit, switches):
    model, spec = _tiny(tiny_vit)
    images = _images()
    layers, precision, qmodel, prepared = _quantized(model, spec, images)
    quantized = [n for n, p in precision.items() if p == "int8"]
    twin = copy.deepcopy(qmodel)
    settings = RecoverySettings(**FAST, **switches)
    with torch.no_grad():
        before = float((qmodel(images) - model(images)).pow(2).mean())
    last = {}

    def after_stage(m):  # the learned model as the last stage leaves it, before the fold
        with torch.no_grad():
            last["out"] = m(images)
        return {}

    result = recover(prepared, qmodel, layers, quantized, images, settings, after_stage=after_stage)
    recover(prepared, twin, layers, quantized, images, settings)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(images), last["out"], rtol=1e-5, atol=1e-6)   # the fold is exact
    a, b = _state(qmodel), _state(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # same seed, same model
    assert not any(isinstance(m, (LearnedStep, LearnedWeight)) for m in qmodel.modules())   # folded back
    for name, m in qmodel.named_modules():
        if hasattr(m, "weight_quantizer"):
            torch.testing.assert_close(m.weight_quantizer(m.weight), m.weight)       # on the INT8 grid
    assert [s["stage"] for s in result["stages"]] == (["all"] if switches.get("progressive") is False else
                                                      ["mlp", "attention-out", "qkv", "patch-embed + head"])
    # every unit keeps its learned state only where it measured better than before
    for stage in result["stages"]:
        for unit in stage["units"]:
            assert unit["kept"] == (unit["loss_after"] < unit["loss_before"])
    with torch.no_grad():
        after = float((qmodel(images) - model(images)).pow(2).mean())
    assert after < before


def test_below_8_bits_recovery_tries_the_mse_clips_keeps_what_helps_and_folds_onto_their_grid(tiny_vit):
    """A 4-bit step over a max range leaves most values at 0, and a learned step moves too little in a
    unit's steps to fix that: below 8 bits each unit tries its quantizers' MSE clips, keeps those that
    lower its loss, and the folded weights lie on the grid the exported amax describes. INT8: untouched."""
    from vitdeploy.quantize.low_bit import clippable

    model, spec = _tiny(tiny_vit)
    images = _images()
    settings = RecoverySettings(**FAST, progressive=False, lowrank=False)
    for bits in (None, {"weights": 4, "activations": 4}):
        layers, precision, qmodel, prepared = _quantized(model, spec, images, num_bits=bits)
        # the softmax's interval is the focused search's (softmax_focus.py), not a learned step
        offered = sum(1 for n, m in qmodel.named_modules()
                      if clippable(m) and m.num_bits < 8 and not n.endswith("softmax_quantizer"))
        with torch.no_grad():
            before = float((qmodel(images) - model(images)).pow(2).mean())
        result = recover(prepared, qmodel, layers, [n for n, p in precision.items() if p == "int8"], images, settings)
        units = [u for stage in result["stages"] for u in stage["units"]]
        assert result["clip_candidates"] == offered and (offered > 0) == bool(bits)
        kept = sum(u.get("clipped", 0) for u in units)
        assert (kept > 0) == bool(bits), units
        with torch.no_grad():
            after = float((qmodel(images) - model(images)).pow(2).mean())
        assert after < before, (bits, before, after)
        for name, m in qmodel.named_modules():
            if hasattr(m, "weight_quantizer"):
                torch.testing.assert_close(m.weight_quantizer(m.weight), m.weight)   # on the exported grid


def test_recovered_build_has_the_same_graph_passes_lint_and_verification(tiny_vit, calib_npz, tmp_path):
    from vitdeploy.lint import lint_errors, lint_model
    from vitdeploy.pipeline import BuildConfig, build

    def node_types(folder):
        return collections.Counter(n.op_type for n in onnx.load(str(folder / "model.int8.onnx")).graph.node)

    common = dict(model=tiny_vit.state_dict, calib=calib_npz, arch=tiny_vit.arch, model_kwargs=tiny_vit.kwargs,
                  target="jetson-orin", calib_size=16, verify_images=16, sensitivity_images=0)
    plain = build(BuildConfig(out=tmp_path / "plain", **common))
    recovered = build(BuildConfig(out=tmp_path / "recovered", recover=RecoverySettings(**{**FAST, "iters": 40}), **common))
    assert node_types(tmp_path / "plain") == node_types(tmp_path / "recovered")
    assert not lint_errors(lint_model(tmp_path / "recovered" / "model.int8.onnx", "jetson-orin"))
    assert recovered["verification"]["int8"]["agreement"] >= 99.0 or \
        recovered["verification"]["int8"]["mode"] == "statistics"
    assert plain["recovery"] is None
    rec = recovered["recovery"]
    assert rec["settings"]["progressive"] and rec["stages"] and "before" in rec
    assert all("measured" in s for s in rec["stages"])
    # the INT8 weights differ from plain calibration's somewhere: something was learned and exported
    init = lambda f: {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(f / "model.int8.onnx")).graph.initializer}
    a, b = init(tmp_path / "plain"), init(tmp_path / "recovered")
    assert a.keys() == b.keys()
    assert any(u["kept"] for s in rec["stages"] for u in s["units"])
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("weight_quantized"))


def test_cli_recover_flags(monkeypatch):
    from vitdeploy import cli
    from vitdeploy.errors import InputError

    args = cli.make_parser().parse_args(["build", "m.pt", "--recover", "--recover-without", "lowrank,curriculum",
                                         "--recover-iters", "7", "--seed", "3"])
    settings = cli.recovery_settings(args)
    assert (settings.lowrank, settings.curriculum, settings.progressive, settings.softmax) == (False, False, True, True)
    assert settings.iters == 7 and settings.seed == 3
    with pytest.raises(InputError, match="unknown part"):
        cli.recovery_settings(cli.make_parser().parse_args(["build", "m.pt", "--recover", "--recover-without", "x"]))
    with pytest.raises(InputError, match="needs --recover"):
        cli.recovery_settings(cli.make_parser().parse_args(["build", "m.pt", "--recover-without", "lowrank"]))
    assert cli.recovery_settings(cli.make_parser().parse_args(["build", "m.pt"])) is None


def test_full_model_fine_tuning_needs_labels_and_is_recorded(tiny_vit, calib_npz, tmp_path):
    from vitdeploy.errors import InputError
    from vitdeploy.pipeline import BuildConfig, build

    common = dict(model=tiny_vit.state_dict, arch=tiny_vit.arch, model_kwargs=tiny_vit.kwargs, target="cpu",
                  calib_size=16, verify_images=16, sensitivity_images=0)
    settings = RecoverySettings(**FAST, epochs=2, progressive=False)
    with pytest.raises(InputError, match="need labels"):
        build(BuildConfig(calib=calib_npz, out=tmp_path / "unlabelled", recover=settings, **common))
    assert not (tmp_path / "unlabelled").exists()
    data = np.load(calib_npz)
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, x=data["x"], y=np.arange(len(data["x"])) % 5)
    record = build(BuildConfig(calib=labelled, out=tmp_path / "labelled", recover=settings, **common))
    stages = record["recovery"]["stages"]
    assert [s["stage"] for s in stages] == ["all", "fine-tune"]
    assert len(stages[-1]["loss"]) == 2 and "measured" in stages[-1] and "top1" in stages[-1]["measured"]
