"""`vitdeploy qat`: LSQ starts at calibration and folds back exactly, the IRM fold is exact, the
distillation losses measure what they claim, an interrupted run resumes to the same weights, two
gloo processes train what one process trains, and an 8-bit result exports like every build."""
from __future__ import annotations

import collections
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vitdeploy.inventory import find_layers
from vitdeploy.plan import PrecisionPlan
from vitdeploy.qat import QatSettings, parse_bits, train_qat
from vitdeploy.qat.distill import dgd_loss, kd_loss, similarity
from vitdeploy.qat.irm import Rectifier, fold_irm, install_irm
from vitdeploy.qat.lsq import LsqQuantizer, fold_lsq, install_lsq
from vitdeploy.quantize.techniques import Techniques, quantize_with_techniques

FAST = dict(epochs=2, batch=8, lr=1e-3)


def _tiny(tiny_vit):
    from vitdeploy.load import load_model

    return load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs)


def _images(n=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32))


def _calibrated(model, spec, images, bits=(8, 8), target="jetson-orin"):
    layers = find_layers(model, spec)
    precision = PrecisionPlan(default="int8", layers={}).resolve(layer.name for layer in layers)

    def loop(m):
        with torch.no_grad():
            m(images)

    num_bits = None if bits == (8, 8) else {"weights": bits[0], "activations": bits[1]}
    qmodel, prepared, _ = quantize_with_techniques(model, precision, target, loop, "max", Techniques(),
                                                   num_bits=num_bits)
    return qmodel, prepared


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_bits_parse():
    assert parse_bits("W4A4") == (4, 4) and parse_bits("w8a6") == (8, 6)
    from vitdeploy.errors import InputError

    for bad in ("W1A4", "W9A8", "4", "W4"):
        with pytest.raises(InputError, match="--bits"):
            parse_bits(bad)


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_lsq_starts_at_calibration_and_folds_back_exactly(tiny_vit, bits):
    model, spec = _tiny(tiny_vit)
    x = _images()
    qmodel, _ = _calibrated(model, spec, x, bits)
    before = _out(qmodel, x)
    installed = install_lsq(qmodel)
    assert installed and all(isinstance(q, LsqQuantizer) for q in installed)
    assert torch.allclose(_out(qmodel, x), before, atol=1e-6)   # LSQ at its start is the calibrated quantizer
    with torch.no_grad():                                          # "training": move every step and a weight
        for q in installed:
            q.step.mul_(1.1)
        qmodel.blocks[0].mlp.fc1.weight.add_(0.01)
    trained = _out(qmodel, x)
    assert not torch.allclose(trained, before, atol=1e-4)
    assert fold_lsq(qmodel)["quantizers"] == len(installed)
    assert not any(isinstance(m, LsqQuantizer) for m in qmodel.modules())
    assert torch.allclose(_out(qmodel, x), trained, atol=1e-6)


def test_lsq_gradient_reaches_the_step_and_is_scaled():
    from vitdeploy.quantize.quantizer import TensorQuantizer

    q = TensorQuantizer(axis=None)
    q.set_amax(torch.tensor(2.0))
    lsq = LsqQuantizer(q)
    x = torch.linspace(-3, 3, 600).reshape(6, 100)
    lsq(x).sum().backward()
    # LSQ's gradient of clamp(round(x/s))·s: round(x/s) - x/s inside the range, the clamp bound outside,
    # scaled by 1 / sqrt(N · qmax) with N = 100 features per sample
    u = x / lsq.step.detach()
    inside = (u >= -128) & (u <= 127)
    expected = torch.where(inside, torch.round(u) - u, torch.clamp(u, -128, 127)).sum() / (100 * 127) ** 0.5
    assert torch.allclose(lsq.step.grad.reshape(()), expected, rtol=1e-4)


def test_mse_start_below_8_bits_clips_outliers():
    from vitdeploy.quantize.low_bit import best_clip as _best_clip

    torch.manual_seed(0)
    values = torch.cat([torch.randn(100000), torch.tensor([50.0])]).reshape(1, -1)
    clipped = float(_best_clip(values, torch.tensor([[50.0]]), 4))
    assert 2.0 < clipped < 6.0   # a 4-bit step of 50/7 would round most values to 0
    # per row (per output channel of a weight): each its own clip
    rows = torch.stack([torch.linspace(-1, 1, 1001), torch.linspace(-1, 1, 1001) ** 9])
    best = _best_clip(rows, torch.ones(2, 1), 4).reshape(-1)
    assert best[0] == 1.0 and best[1] < 1.0


def test_irm_starts_as_identity_and_folds_exactly_into_qkv(tiny_vit):
    model, spec = _tiny(tiny_vit)
    x = _images()
    qmodel, _ = _calibrated(model, spec, x)
    before = _out(qmodel, x)
    rectified = install_irm(qmodel, x)
    assert rectified == ["blocks.0.attn", "blocks.1.attn"]
    assert torch.allclose(_out(qmodel, x), before, atol=1e-5)
    install_lsq(qmodel)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in qmodel.modules():
            if isinstance(m, Rectifier):
                m.rho.copy_(0.3 * torch.randn(m.rho.shape, generator=gen))
                m.b.copy_(0.5 * torch.randn(m.b.shape, generator=gen))
    trained = _out(qmodel, x)
    assert not torch.allclose(trained, before, atol=1e-3)
    fold_lsq(qmodel)
    assert fold_irm(qmodel) == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.q", "blocks.1.attn.k"]
    assert not any(isinstance(m, Rectifier) for m in qmodel.modules())
    folded = _out(qmodel, x)
    assert torch.allclose(folded, trained, atol=1e-5, rtol=1e-4), float((folded - trained).abs().max())


class _PlainAttention(nn.Module):   # the vit-pytorch layout, no qkv bias (the fold creates one)
    def __init__(self, dim=16, heads=2, dim_head=8):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_irm_folds_exactly_in_the_vit_pytorch_layout():
    from vitdeploy.quantize.apply import calibrate, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(_PlainAttention()).eval()
    x = torch.randn(16, 5, 16)
    qmodel = quantize_model(model, ["0.matmul_qk", "0.matmul_av", "0.to_qkv", "0.to_out"])
    calibrate(qmodel, lambda m: m(x))
    assert install_irm(qmodel, x) == ["0"]
    with torch.no_grad():
        for m in qmodel.modules():
            if isinstance(m, Rectifier):
                m.rho.fill_(0.2)
                m.b.fill_(0.4)
    trained = _out(qmodel, x)
    fold_irm(qmodel)
    assert qmodel[0].to_qkv.bias is not None
    assert torch.allclose(_out(qmodel, x), trained, atol=1e-5, rtol=1e-4)


def test_distillation_losses():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 7, 4)
    sim = similarity(q)
    assert sim.shape == (2, 3, 7, 7) and torch.allclose(sim.norm(dim=-1), torch.ones(2, 3, 7), atol=1e-5)
    assert float(dgd_loss([q], [q])) == 0.0
    assert float(dgd_loss([2.5 * q], [q])) < 1e-10            # row-normalised: blind to a common scale
    assert float(dgd_loss([torch.randn(2, 3, 7, 4)], [q])) > 0.1
    logits = torch.randn(4, 10)
    assert float(kd_loss(logits, logits, 2.0)) < 1e-6 and float(kd_loss(logits.flip(1), logits, 2.0)) > 0.1


def _train(tiny_vit, **kw):
    model, spec = _tiny(tiny_vit)
    x = _images(32)
    bits = kw.pop("bits", (8, 8))
    qmodel, prepared = _calibrated(model, spec, x, bits=bits)
    settings = QatSettings(**{**FAST, "weight_bits": bits[0], "activation_bits": bits[1], **kw.pop("settings", {})})
    record = train_qat(prepared, qmodel, x, kw.pop("labels", None), settings, **kw)
    return qmodel, record


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_training_lowers_the_loss_records_it_and_is_deterministic(tiny_vit):
    qmodel, record = _train(tiny_vit, bits=(4, 4), settings={"epochs": 3})
    again, _ = _train(tiny_vit, bits=(4, 4), settings={"epochs": 3})
    a, b = _state(qmodel), _state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record["losses"] == ["dgd", "kd"] and len(record["history"]) == 3
    total = [sum(h.values()) for h in record["history"]]
    assert total[-1] < total[0]
    assert record["rectified"] and record["mse_initialised"] > 0 and record["folded"]["rectified"]


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_vit, tmp_path):
    settings = {"epochs": 3}
    whole, _ = _train(tiny_vit, settings=settings, checkpoint_dir=tmp_path / "whole")

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_vit, settings=settings, checkpoint_dir=tmp_path / "cut", on_epoch_end=stop)
    assert (tmp_path / "cut" / "last.pt").is_file()
    resumed, record = _train(tiny_vit, settings=settings, checkpoint_dir=tmp_path / "cut", resume=True)
    assert record["resumed_from_epoch"] == 1 and len(record["history"]) == 3
    a, b = _state(whole), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from vitdeploy.errors import InputError

    with pytest.raises(InputError, match="settings differ: epochs"):
        _train(tiny_vit, settings={"epochs": 4}, checkpoint_dir=tmp_path / "cut", resume=True)
    with pytest.raises(InputError, match="no checkpoint"):
        _train(tiny_vit, settings=settings, checkpoint_dir=tmp_path / "none", resume=True)


def _ddp_worker(rank, world, init_file, out, state_dict, kwargs):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import types

        qmodel, _ = _train(types.SimpleNamespace(**state_dict), **kwargs)
        if rank == 0:
            torch.save(_state(qmodel), out)
    finally:
        dist.destroy_process_group()


def _distance(a, b, keys):
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys) ** 0.5


def test_two_gloo_processes_train_what_one_process_trains(tiny_vit, tmp_path):
    """Equal up to float summation order: gloo's all-reduce of two half-batch gradients is not one
    autograd pass over the batch bit for bit, and Adam (which divides by the gradient's size) and
    the quantizers' rounding make last-bit differences grow over the steps. So the two-process run
    must land an order of magnitude closer to the one-process run than a run whose only difference
    is the data order (another seed) -- which a broken split (each rank its own batch, no averaged
    gradient, the wrong share) does not."""
    import torch.multiprocessing as mp

    kwargs = {"settings": {"epochs": 2, "batch": 8}}
    torch.set_num_threads(1)
    model, spec = _tiny(tiny_vit)
    start = _state(_calibrated(model, spec, _images(32))[0])
    one = _state(_train(tiny_vit, **kwargs)[0])
    reordered = _state(_train(tiny_vit, settings={**kwargs["settings"], "seed": 1})[0])
    info = {"state_dict": tiny_vit.state_dict, "arch": tiny_vit.arch, "kwargs": tiny_vit.kwargs}
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank0.pt"), info, kwargs), nprocs=2)
    two = torch.load(tmp_path / "rank0.pt")
    assert one.keys() == two.keys()
    keys = [k for k in one if k in start]
    moved, apart, other = _distance(one, start, keys), _distance(one, two, keys), _distance(one, reordered, keys)
    assert apart < 0.1 * other and apart < 0.1 * moved, (apart, other, moved)


def test_qat_build_exports_lints_and_verifies_at_8_bits(tiny_vit, calib_npz, tmp_path):
    from vitdeploy.lint import lint_errors, lint_model
    from vitdeploy.pipeline import BuildConfig, build

    common = dict(model=tiny_vit.state_dict, calib=calib_npz, arch=tiny_vit.arch, model_kwargs=tiny_vit.kwargs,
                  target="jetson-orin", calib_size=16, verify_images=16, sensitivity_images=0)
    plain = build(BuildConfig(out=tmp_path / "plain", plan=_all_int8(tmp_path), **common))
    record = build(BuildConfig(out=tmp_path / "qat", qat=QatSettings(epochs=1, batch=8), **common))
    # Identity aside: the exporter links initializers of equal value (the untrained tiny model's
    # LayerNorms are all ones and zeros) through Identity nodes, and training makes them differ.
    kinds = lambda f: collections.Counter(n.op_type for n in onnx.load(str(f / "model.int8.onnx")).graph.node
                                          if n.op_type != "Identity")
    assert kinds(tmp_path / "qat") == kinds(tmp_path / "plain")
    assert not lint_errors(lint_model(tmp_path / "qat" / "model.int8.onnx", "jetson-orin"))
    assert record["verification"]["int8"]["agreement"] >= 99.0 or record["verification"]["int8"]["mode"] == "statistics"
    assert record["qat"]["deployable"].startswith("TensorRT") and record["plan"]["int8_mac_share"] == 100.0
    assert not (tmp_path / "qat.qat-checkpoint").exists()   # removed once the build is written
    assert plain["qat"] is None


def _all_int8(tmp_path):
    path = tmp_path / "all_int8.json"
    path.write_text(json.dumps({"default": "int8", "layers": {}}))
    return path


def test_qat_below_8_bits_is_an_onnx_runtime_simulation(tiny_vit, calib_npz, tmp_path, caplog):
    from vitdeploy.pipeline import BuildConfig, build

    record = build(BuildConfig(model=tiny_vit.state_dict, calib=calib_npz, arch=tiny_vit.arch,
                               model_kwargs=tiny_vit.kwargs, target="jetson-orin", calib_size=16, verify_images=16,
                               out=tmp_path / "w4a4", qat=QatSettings(4, 4, epochs=1, batch=8)))
    assert record["target"] == "cpu" and record["qat"]["deployable"].startswith("simulation")
    assert any("W4A4 is below 8 bits" in r.getMessage() and "instead of jetson-orin" in r.getMessage()
               for r in caplog.records)
    assert record["verification"]["int8"]["agreement"] >= 99.0 or record["verification"]["int8"]["mode"] == "statistics"


def test_cli_qat_errors(tiny_vit, calib_npz, tmp_path, capsys):
    from vitdeploy.cli import main

    base = ["qat", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
            "--data", str(calib_npz), "--out", str(tmp_path / "o"), "--batch-size", "8"]
    assert main(base + ["--bits", "W9A9"]) == 2
    assert "--bits" in capsys.readouterr().err
    assert main(base + ["--resume", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err and not (tmp_path / "o").exists()
    assert main(base + ["--target", "jetson-tx2", "--epochs", "1"]) == 2
    assert "no INT8" in capsys.readouterr().err


def test_torchrun_runs_the_qat_command_on_two_cpu_processes(tiny_vit, calib_npz, tmp_path):
    """The documented command, not the library: `torchrun --nproc-per-node 2 -m vitdeploy qat ...`
    (gloo on CPUs) trains on both ranks, rank 0 alone writes the one output folder and reports, and
    the checkpoint is gone afterwards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vitdeploy", "qat", str(tiny_vit.state_dict), "--arch", tiny_vit.arch,
           "--model-kwargs", tiny_vit.kwargs, "--data", str(calib_npz), "--out", str(out), "--bits", "W8A8",
           "--epochs", "1", "--batch-size", "8", "--calib-size", "16", "--target", "jetson-orin"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built ") == 1, done.stdout            # rank 0 reports, once
    record = json.loads((out / "build.json").read_text())
    assert record["qat"]["processes"] == 2 and record["qat"]["rank"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]    # no second folder, no checkpoint left
    assert (out / "model.int8.onnx").is_file()
