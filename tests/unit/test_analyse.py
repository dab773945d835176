"""Sensitivity analysis: both scores, the ranking, the plan from thresholds, the outputs."""
import json

import numpy as np
import pytest
import torch

from vitdeploy.analyse import analyse, plan_from_scores, search_max_drop
from vitdeploy.data import load_images
from vitdeploy.inventory import find_layers
from vitdeploy.load import load_model


@pytest.fixture
def tiny(tiny_vit, calib_npz):
    model, spec = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs)
    images = load_images(calib_npz, spec)
    return model, spec, images


def test_damaged_layer_ranks_first(tiny):
    """fc2 ends a residual branch: ×100 makes its INT8 error dominate the residual stream.

    Only the measured ranking can see this: S(W) is invariant to scaling W (‖W‖₂/‖W‖_F is
    scale-free, and the next LayerNorm shrinks the gradient by the same factor).
    """
    model, spec, images = tiny
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.mul_(100.0)
    layers = find_layers(model, spec)
    report = analyse(model, layers, images)
    assert report.ranked("kl")[0].name == "blocks.1.mlp.fc2"


def test_scores_and_plan(tiny):
    model, spec, images = tiny
    layers = find_layers(model, spec)
    report = analyse(model, layers, images)
    by_name = {s.name: s for s in report.layers}
    assert set(by_name) == {layer.name for layer in layers}
    qkv = by_name["blocks.0.attn.qkv"]
    assert 0 < qkv.spectral_ratio <= 1 and qkv.grad_norm > 0
    assert qkv.score == pytest.approx(qkv.spectral_ratio * qkv.grad_norm)
    assert by_name["blocks.0.attn.matmul_qk"].score is None      # no weights
    assert all(s.kl >= 0 and 0 <= s.agreement <= 100 for s in report.layers)
    plan = plan_from_scores(report)
    resolved = plan.resolve(by_name)
    assert resolved["patch_embed.proj"] == "fp16" and resolved["head"] == "fp16"
    assert set(resolved.values()) <= {"int8", "int8-asym", "fp16"}
    tight = plan_from_scores(report, tau_low=0.0, tau_high=0.0).resolve(by_name)
    assert all(p == "fp16" for n, p in tight.items() if by_name[n].score is not None)
    json.dumps(report.to_dict())


def test_max_drop_search(tiny):
    """Labels = the FP32 model's own predictions, so FP32 top-1 is 100 % and every flip is a drop."""
    import dataclasses

    model, spec, images = tiny
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.mul_(100.0)
        x = torch.from_numpy(np.concatenate([b for b, _ in images.batches(64)]))
        labelled = dataclasses.replace(images, labels=model(x).argmax(1).numpy())
    layers = find_layers(model, spec)
    report = analyse(model, layers, labelled)
    plan, history = search_max_drop(model, layers, report, labelled, 0.0, images)
    assert history[0]["fp16_layers"] == [] and history[-1]["drop"] <= 0.0
    # Layers leave INT8 in order of measured sensitivity, the damaged one first.
    if len(history) > 1:
        assert history[-1]["fp16_layers"][0] == "blocks.1.mlp.fc2"
    resolved = plan.resolve(layer.name for layer in layers)
    assert all(resolved[n] == "fp16" for n in history[-1]["fp16_layers"])
    assert 0.0 <= plan.meta["int8_linear_mac_share"] <= 100.0


def test_analyze_cli_writes_json_png_plan(tiny_vit, calib_npz, tmp_path, capsys):
    from vitdeploy.cli import main

    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--images", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "S(W)" in printed and "blocks.0.attn.qkv" in printed
    report = json.loads((out / "sensitivity.json").read_text())
    assert len(report["layers"]) > 5
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "vitdeploy-plan/1" and plan["layers"]["head"] == "fp16"
