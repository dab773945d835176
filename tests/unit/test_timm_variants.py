"""timm ViT variants users bring: each builds for TensorRT, verified in ONNX Runtime, heads kept FP16.

Tiny random-weight models (32×32, 2 blocks). What each one exercises: no class token and average
pooling (fc_norm), register tokens, qk-norm inside attention, LayerScale, DeiT-distilled's two heads,
and the attention-pooling head (``global_pool="map"``, SigLIP) -- an attention with no quantized twin
whose MatMul → Softmax → MatMul must not be mistaken for a block's.
"""
import functools

import numpy as np
import onnx
import pytest
import torch

from vitdeploy.export.graph import GraphIndex

BASE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
VARIANTS = {
    "gap_fc_norm": dict(global_pool="avg", class_token=False, fc_norm=True),
    "register_tokens": dict(reg_tokens=4, no_embed_class=True),
    "qk_norm_layer_scale": dict(qk_norm=True, init_values=1e-5),
    "attention_pool": dict(global_pool="map"),
    "deit_distilled": dict(),
}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_builds_for_tensorrt(variant, calib, tmp_path):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from vitdeploy.pipeline import BuildConfig, build

    torch.manual_seed(0)
    cls = VisionTransformerDistilled if variant == "deit_distilled" else VisionTransformer
    torch.save(cls(**BASE, **VARIANTS[variant]).eval(), tmp_path / "m.pt")
    out = tmp_path / "out"
    plan = tmp_path / "plan.json"   # the role defaults with INT8 attention (TensorRT's default keeps it FP16)
    plan.write_text('{"default": "int8", "layers": {"patch_embed.proj": "fp16", "head*": "fp16"}}')
    record = build(BuildConfig(model=tmp_path / "m.pt", trust_pickle=True, mean=(0.5,), std=(0.5,), calib=calib,
                               calib_size=32, verify_images=32, target="jetson-orin", out=out, plan=plan))
    assert record["verification"]["int8"]["agreement"] >= 99.0 and not record["lint"]
    precision = {layer["name"]: layer["precision"] for layer in record["layers"]}
    heads = [n for n in precision if n.startswith("head")]
    assert heads and all(precision[n] == "fp16" for n in heads)
    for block in range(2):
        assert precision[f"blocks.{block}.attn.matmul_qk"] == precision[f"blocks.{block}.attn.matmul_av"] == "int8"
    quantized = softmax_outputs_quantized(onnx.load(str(out / "model.int8.onnx")))
    expected = {"blocks.0.attn": True, "blocks.1.attn": True}
    if variant == "attention_pool":
        expected["attn_pool"] = False      # no twin: its softmax·v stays FP, the blocks' are INT8
    assert quantized == expected


def _scope(node_name: str) -> str:
    """Module path from a TorchScript-exporter node name: '/blocks/blocks.0/attn/Softmax' → 'blocks.0.attn'."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if path and part.startswith(path + ".") else (f"{path}.{part}" if path else part)
    return path


def softmax_outputs_quantized(model: onnx.ModelProto) -> dict:
    """{attention module path: whether its softmax output reaches the softmax·v MatMul through Q/DQ}."""
    g = GraphIndex(model)
    found = {}
    for softmax in (n for n in g.nodes if n.op_type == "Softmax"):
        tensor, through = softmax.output[0], []
        while len(g.readers(tensor)) == 1 and g.readers(tensor)[0].op_type != "MatMul":
            through.append(g.readers(tensor)[0].op_type)
            tensor = g.readers(tensor)[0].output[0]
        found[_scope(softmax.name)] = "DequantizeLinear" in through
    return found


@pytest.mark.parametrize("name, scope", [("/blocks/blocks.0/attn/Softmax", "blocks.0.attn"),
                                         ("/layers.0.0/fn/Softmax", "layers.0.0.fn"),
                                         ("/attn_pool/Softmax", "attn_pool"), ("Softmax_3", "")])
def test_scope_from_node_name(name, scope):
    assert _scope(name) == scope
