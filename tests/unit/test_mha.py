"""nn.MultiheadAttention (torchvision's ViT, nn.TransformerEncoder) written out and quantized like timm's."""
import logging

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vitdeploy.quantize.mha import ExplicitMultiheadAttention, make_attention_explicit


@pytest.mark.parametrize("batch_first, bias", [(True, True), (False, True), (True, False)])
def test_explicit_attention_is_the_original(batch_first, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=0.3, bias=bias, batch_first=batch_first).eval()
    x = torch.randn(2, 9, 32) if batch_first else torch.randn(9, 2, 32)
    explicit = ExplicitMultiheadAttention(mha)
    assert not explicit.training              # dropout stays off, as in the original
    with torch.no_grad():
        want, want_w = mha(x, x, x)
        got, got_w = explicit(x, x, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert explicit.in_proj.weight is mha.in_proj_weight    # shared, not copied


class CrossAttention(nn.Module):
    """Uses its attention with key ≠ query: the written-out form must not be kept."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.memory = nn.Parameter(torch.randn(1, 5, 16))

    def forward(self, x):
        q = self.proj(x.flatten(2))
        return self.attn(q, self.memory.expand(len(x), -1, -1), self.memory.expand(len(x), -1, -1))[0].mean(1)


def test_cross_attention_keeps_the_original_with_a_warning(caplog):
    model = CrossAttention().eval()
    with caplog.at_level(logging.WARNING):
        assert make_attention_explicit(model, (3, 4, 3)) == []
    assert type(model.attn) is nn.MultiheadAttention and "stay in floating point" in caplog.text


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)      # torchvision starts the head at zero
    return model


class EncoderViT(nn.Module):
    """A hand-written ViT on nn.TransformerEncoder (whose fused fast path must not bypass the twin)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 64, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, 64) * 0.02)
        layer = nn.TransformerEncoderLayer(64, 2, 128, dropout=0.1, activation="gelu", batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        for p in self.encoder.parameters():  # clones start equal; trained layers never are
            if p.dim() > 1:
                nn.init.normal_(p, std=0.1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.encoder(x if self.batch_first else x.transpose(0, 1))
        return self.head((x if self.batch_first else x.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("kind", ["torchvision", "encoder_batch_first", "encoder_seq_first"])
def test_build_quantizes_projections_and_matmuls(kind, tmp_path):
    from vitdeploy.pipeline import BuildConfig, build

    model = _torchvision_vit() if kind == "torchvision" else EncoderViT(kind == "encoder_batch_first").eval()
    torch.save(model, tmp_path / "m.pt")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "out"
    # The role defaults with INT8 attention (TensorRT targets keep it FP16 unless a plan says otherwise).
    ends = {"conv_proj": "fp16", "heads.head": "fp16"} if kind == "torchvision" else {"embed": "fp16", "head": "fp16"}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": "int8", "layers": {**ends, "*.matmul_*": "int8"}}))
    record = build(BuildConfig(model=tmp_path / "m.pt", trust_pickle=True, mean=(0.5,), std=(0.5,), input_size=(3, 32, 32),
                               calib=calib, calib_size=32, verify_images=32, target="jetson-orin", out=out, plan=plan))
    assert record["verification"]["int8"]["agreement"] >= 99.0 and not record["lint"]
    roles = {layer["role"]: [] for layer in record["layers"]}
    for layer in record["layers"]:
        roles[layer["role"]].append(layer["precision"])
    for role in ("qkv", "attn_qk", "attn_av", "attn_out", "mlp_fc1", "mlp_fc2"):
        assert roles[role] == ["int8", "int8"], role
    # Every Linear but the head in INT8, whatever the token layout (seq-first counts tokens too).
    assert record["plan"]["int8_linear_mac_share"] > 80
    ops = [n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == 2 * 4 + 2 * 4    # 4 Linear inputs + q, k, P, v per block
