"""Layer roles from structure: what the default plan keeps in FP16 (patch-embed, every head)."""
import functools

import torch

from vitdeploy.artifacts import ModelSpec
from vitdeploy.inventory import find_layers
from vitdeploy.plan import role_defaults

SPEC = ModelSpec(name="m", input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=5)
KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))


def roles(model):
    return {layer.name: layer.role for layer in find_layers(model.eval(), SPEC)}


def test_timm_vit_roles():
    from timm.models.vision_transformer import VisionTransformer

    got = roles(VisionTransformer(**KW))
    assert got["patch_embed.proj"] == "patch_embed" and got["head"] == "head"
    assert got["blocks.0.attn.qkv"] == "qkv" and got["blocks.0.attn.proj"] == "attn_out"
    assert got["blocks.1.mlp.fc1"] == "mlp_fc1" and got["blocks.1.mlp.fc2"] == "mlp_fc2"
    assert got["blocks.1.attn.matmul_av"] == "attn_av"
    assert [n for n, r in got.items() if r == "head"] == ["head"]


def test_deit_distilled_has_two_heads_and_both_stay_fp16():
    """head and head_dist are averaged into the logits: both are the classifier, both stay FP16."""
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(**KW).eval()
    layers = find_layers(model, SPEC)
    got = {layer.name: layer.role for layer in layers}
    assert got["head"] == "head" and got["head_dist"] == "head"
    assert got["blocks.1.mlp.fc2"] == "mlp_fc2"           # the last block is not swallowed by the heads
    resolved = role_defaults(layers).resolve(got)
    assert resolved["head"] == "fp16" and resolved["head_dist"] == "fp16"
    assert resolved["blocks.1.mlp.fc2"] == "int8"
