"""The default plan comes from measurement: a layer that dominates the INT8 loss stays FP16, within the
MAC budget, and plan.json says why each layer got its precision."""
from __future__ import annotations

import json

import pytest
import torch

from vitdeploy.pipeline import BuildConfig, build
from tests.conftest import TINY_VIT_ARCH, TINY_VIT_KWARGS

MASSIVE = "blocks.1.mlp.fc2"


@pytest.fixture(scope="module")
def massive_vit(tmp_path_factory, tiny_vit):
    """The tiny ViT with one post-GELU channel orders of magnitude above the rest (a "massive
    activation" at the input of blocks.1.mlp.fc2) and logits scaled so that errors show."""
    import timm

    model = timm.create_model(TINY_VIT_ARCH, pretrained=False, **TINY_VIT_KWARGS).eval()
    model.load_state_dict(torch.load(tiny_vit.state_dict))
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0] *= 300
        model.blocks[1].mlp.fc1.bias[0] = 50
        model.head.weight *= 30
    path = tmp_path_factory.mktemp("massive") / "massive.pt"
    torch.save(model.state_dict(), path)
    return path


def _build(path, calib_npz, out, **kwargs):
    kwargs = {"calib_size": 16, **kwargs}
    record = build(BuildConfig(model=path, arch=TINY_VIT_ARCH, model_kwargs=json.dumps(TINY_VIT_KWARGS),
                               calib=calib_npz, out=out, verify_min_agreement=0,
                               verify_min_cosine=-1, **kwargs))
    return record, json.loads((out / "plan.json").read_text())


def test_dominant_layer_stays_fp16_and_plan_says_why(massive_vit, calib_npz, tmp_path):
    record, plan = _build(massive_vit, calib_npz, tmp_path / "out", int8_budget=60)
    assert record["plan"]["fp16_measured"] == [MASSIVE]
    assert plan["layers"][MASSIVE] == "fp16"
    reason = plan["meta"]["reasons"][MASSIVE]
    assert reason.startswith("fp16: dominates the INT8 loss") and "massive activations" in reason
    assert plan["layers"]["blocks.0.mlp.fc2"] == "int8"
    assert plan["meta"]["reasons"]["blocks.0.mlp.fc2"].startswith("int8: alone in INT8: KL")
    assert plan["layers"]["head"] == "fp16" and plan["meta"]["reasons"]["head"].startswith("fp16: role defaults")
    assert record["plan"]["int8_linear_mac_share"] >= 60


def test_mac_budget_keeps_a_dominant_layer_int8(massive_vit, calib_npz, tmp_path):
    record, plan = _build(massive_vit, calib_npz, tmp_path / "out")   # default budget 90 %
    assert record["plan"]["fp16_measured"] == []
    assert plan["layers"][MASSIVE] == "int8"
    assert "below --int8-budget 90 %" in plan["meta"]["reasons"][MASSIVE]


def test_no_measurement_and_user_plans_are_taken_as_they_are(massive_vit, calib_npz, tmp_path):
    record, plan = _build(massive_vit, calib_npz, tmp_path / "roles", int8_budget=60, sensitivity_images=0)
    assert plan["layers"][MASSIVE] == "int8" and "reasons" not in plan["meta"]
    assert record["plan"]["source"].startswith("role defaults")
    (tmp_path / "mine.json").write_text(json.dumps({"layers": {"head": "int8"}}))
    record, plan = _build(massive_vit, calib_npz, tmp_path / "user", int8_budget=60, plan=tmp_path / "mine.json")
    assert plan["layers"][MASSIVE] == "int8" and plan["layers"]["head"] == "int8"
    assert record["plan"]["fp16_measured"] == []


def test_negligible_loss_moves_nothing(tiny_vit, calib_npz, tmp_path):
    """The random tiny ViT's layers all cost KL < 1e-3: nothing dominates, whatever the shares."""
    record, plan = _build(tiny_vit.state_dict, calib_npz, tmp_path / "out", int8_budget=0)
    assert record["plan"]["fp16_measured"] == []
    assert {p for n, p in plan["layers"].items() if n not in ("patch_embed.proj", "head") and "matmul" not in n} == {"int8"}


@pytest.fixture(scope="module")
def labelled_by_fp32(tmp_path_factory, massive_vit):
    """64 random images labelled with the massive ViT's own FP32 predictions: FP32 top-1 is 100 %, so
    every image INT8 changes counts as a drop."""
    import numpy as np
    import timm

    model = timm.create_model(TINY_VIT_ARCH, pretrained=False, **TINY_VIT_KWARGS).eval()
    model.load_state_dict(torch.load(massive_vit))
    from vitdeploy.data import load_images
    from vitdeploy.load import load_model

    folder = tmp_path_factory.mktemp("labelled")
    x = np.random.default_rng(1).integers(0, 256, size=(64, 16, 16, 3), dtype=np.uint8)
    np.savez(folder / "unlabelled.npz", x=x)
    _, spec = load_model(massive_vit, TINY_VIT_ARCH, json.dumps(TINY_VIT_KWARGS))   # the build's preprocessing
    inputs = np.concatenate([b for b, _ in load_images(folder / "unlabelled.npz", spec).batches(64)])
    with torch.no_grad():
        y = model(torch.from_numpy(inputs)).argmax(1).numpy()
    path = folder / "labelled.npz"
    np.savez(path, x=x, y=y)
    return path


def test_max_drop_moves_sensitive_layers_until_the_drop_fits(massive_vit, labelled_by_fp32, tmp_path):
    # No measured plan (0 sensitivity images): the massive layer starts INT8 and --max-drop finds it.
    record, plan = _build(massive_vit, labelled_by_fp32, tmp_path / "out", max_drop=0.0, int8_budget=0.0,
                          sensitivity_images=0, calib_size=64, target="jetson-orin")
    budget = record["plan"]["max_drop"]
    history = budget["history"]
    assert budget["fp32_top1"] == 100.0 and history[0]["top1"] < 100.0   # INT8 changed some images
    assert budget["met"] and budget["drop"] <= 0.0 and budget["int8_top1"] == 100.0
    moved = budget["fp16_for_max_drop"]
    assert moved and all(plan["layers"][name] == "fp16" for name in moved)
    assert all("--max-drop 0" in plan["meta"]["reasons"][name] for name in moved)
    assert moved[0] == MASSIVE      # the most sensitive layer (KL alone in INT8) goes first
    # Each step's top-1 was measured, and the build is reproducible from its plan.json alone.
    assert len(history) == len(moved) + 1
    again, _ = _build(massive_vit, labelled_by_fp32, tmp_path / "again", plan=tmp_path / "out" / "plan.json",
                      calib_size=64, target="jetson-orin")
    assert {l["name"]: l["precision"] for l in again["layers"]} == {l["name"]: l["precision"] for l in record["layers"]}


def test_max_drop_respects_the_int8_budget(massive_vit, labelled_by_fp32, tmp_path):
    record, _ = _build(massive_vit, labelled_by_fp32, tmp_path / "out", max_drop=0.0, int8_budget=94.0,
                       sensitivity_images=0, calib_size=64, target="jetson-orin")
    budget = record["plan"]["max_drop"]
    assert record["plan"]["int8_linear_mac_share"] >= 94.0   # the role defaults have 94.4
    assert not budget["met"] and budget["drop"] > 0   # said, not silently lowered


def test_max_drop_needs_labels(massive_vit, calib_npz, tmp_path):
    from vitdeploy.cli import main

    code = main(["build", str(massive_vit), "--arch", TINY_VIT_ARCH, "--model-kwargs", json.dumps(TINY_VIT_KWARGS),
                 "--calib", str(calib_npz), "--calib-size", "16", "--out", str(tmp_path / "o"), "--quiet",
                 "--max-drop", "0.5"])
    assert code == 2 and not (tmp_path / "o").exists()
