"""The precision plan: patterns, order, rejection of unknown names, and a build driven by an edited plan."""
import json

import pytest

from vitdeploy.errors import InputError
from vitdeploy.plan import PrecisionPlan, read_plan

NAMES = ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.matmul_qk", "blocks.0.attn.matmul_av",
         "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "head"]


def test_default_then_entries_in_order():
    plan = PrecisionPlan(default="int8", layers={"blocks.*.attn.*": "fp16", "blocks.1.attn.qkv": "int8-asym"})
    resolved = plan.resolve(NAMES)
    assert resolved["blocks.0.attn.qkv"] == "fp16"
    assert resolved["blocks.0.attn.matmul_qk"] == "fp16"
    assert resolved["blocks.1.attn.qkv"] == "int8-asym"   # later entries win
    assert resolved["blocks.0.mlp.fc1"] == "int8"          # default
    assert set(resolved) == set(NAMES)


@pytest.mark.parametrize("layers, words", [
    ({"blocks.0.attn.qvk": "fp16"}, ["blocks.0.attn.qvk", "matches no layer"]),
    ({"decoder.*": "fp16"}, ["decoder.*", "matches no layer"]),
    ({"head": "int4"}, ["int4", "not one of"]),
])
def test_mistakes_are_rejected(layers, words):
    with pytest.raises(InputError) as err:
        PrecisionPlan(layers=layers).resolve(NAMES)
    assert all(w in str(err.value) for w in words)


def test_read_plan_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_plan(bad)
    with pytest.raises(InputError, match="not found"):
        read_plan(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "other/9", "layers": {}}))
    with pytest.raises(InputError, match="unknown format"):
        read_plan(wrong)


def test_build_writes_plan_and_obeys_an_edited_one(tiny_vit, calib_npz, tmp_path):
    from vitdeploy.cli import main

    out = tmp_path / "first"
    assert main(["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--calib-size", "8", "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "plan.json").read_text())
    assert written["layers"]["patch_embed.proj"] == "fp16" and written["layers"]["head"] == "fp16"
    assert written["layers"]["blocks.0.attn.matmul_qk"] == "fp16"   # attention float by default (plan.py)
    # The user edits it: all MLPs to FP16 by pattern; the rebuild follows.
    written["layers"]["blocks.*.mlp.*"] = "fp16"
    edited = tmp_path / "plan.json"
    edited.write_text(json.dumps(written))
    out2 = tmp_path / "second"
    assert main(["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--calib-size", "8", "--plan", str(edited), "--out", str(out2),
                 "--quiet"]) == 0
    record = json.loads((out2 / "build.json").read_text())
    precision = {layer["name"]: layer["precision"] for layer in record["layers"]}
    assert precision["blocks.0.mlp.fc1"] == "fp16" and precision["blocks.1.mlp.fc2"] == "fp16"
    assert precision["blocks.0.attn.qkv"] == "int8"
    import onnx

    quantizers = [n.name for n in onnx.load(str(out2 / "model.int8.onnx")).graph.node if n.op_type == "QuantizeLinear"]
    assert not any("/blocks.0/mlp/fc1/input_quantizer/" in n for n in quantizers)   # exporter names: module paths
    assert any("/blocks.0/attn/qkv/input_quantizer/" in n for n in quantizers)
