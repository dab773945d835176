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
    record = build(BuildConfig(model=path, arch=TINY_VIT_ARCH, model_kwargs=json.dumps(TINY_VIT_KWARGS),
                               calib=calib_npz, calib_size=16, out=out, verify_min_agreement=0,
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
    assert plan["layers"]["head"] == "fp16" and plan["meta"]["reasons"]["head"] == "fp16: role defaults"
    assert record["plan"]["int8_linear_mac_share"] >= 60


def test_mac_budget_keeps_a_dominant_layer_int8(massive_vit, calib_npz, tmp_path):
    record, plan = _build(massive_vit, calib_npz, tmp_path / "out")   # default budget 90 %
    assert record["plan"]["fp16_measured"] == []
    assert plan["layers"][MASSIVE] == "int8"
    assert "below --int8-budget 90 %" in plan["meta"]["reasons"][MASSIVE]


def test_no_measurement_and_user_plans_are_taken_as_they_are(massive_vit, calib_npz, tmp_path):
    record, plan = _build(massive_vit, calib_npz, tmp_path / "roles", int8_budget=60, sensitivity_images=0)
    assert plan["layers"][MASSIVE] == "int8" and "reasons" not in plan["meta"]
    assert record["plan"]["source"] == "role defaults"
    (tmp_path / "mine.json").write_text(json.dumps({"layers": {"head": "int8"}}))
    record, plan = _build(massive_vit, calib_npz, tmp_path / "user", int8_budget=60, plan=tmp_path / "mine.json")
    assert plan["layers"][MASSIVE] == "int8" and plan["layers"]["head"] == "int8"
    assert record["plan"]["fp16_measured"] == []


def test_negligible_loss_moves_nothing(tiny_vit, calib_npz, tmp_path):
    """The random tiny ViT's layers all cost KL < 1e-3: nothing dominates, whatever the shares."""
    record, plan = _build(tiny_vit.state_dict, calib_npz, tmp_path / "out", int8_budget=0)
    assert record["plan"]["fp16_measured"] == []
    assert {p for n, p in plan["layers"].items() if n not in ("patch_embed.proj", "head")} == {"int8"}
