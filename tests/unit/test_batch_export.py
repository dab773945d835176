"""The exported files keep a dynamic batch even when user code reads the batch as a Python int.

``len(x)`` for the class token is baked in by the TorchScript tracer; the build notices (ONNX
Runtime at two batch sizes against PyTorch) and exports with strict ``torch.export`` instead. A
model that neither exporter can keep batch-dynamic is built for batch 1, with a warning, and still
runs at any batch (one image at a time).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdeploy.backends.ort import OrtRunner
from vitdeploy.pipeline import BuildConfig, build

SOURCE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class ClassTokenViT(nn.Module):
    """Expands its class token with BATCH, as much hand-written ViT code does."""

    def __init__(self, dim=32, depth=2, heads=2, num_classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(BATCH, -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
'''


def _build(tmp_path, calib_npz, batch_expr: str, target: str = "cpu", replace=("", "")):
    source = tmp_path / "cls_vit.py"
    source.write_text(SOURCE.replace("BATCH", batch_expr).replace(*replace))
    arch = f"{source}:ClassTokenViT"
    from vitdeploy.load import build_arch

    model = build_arch(arch, {}).eval()
    torch.save(model.state_dict(), tmp_path / "cls_vit.pt")
    record = build(BuildConfig(model=tmp_path / "cls_vit.pt", arch=arch, input_size=(3, 16, 16), mean=(0.5,),
                               std=(0.5,), calib=calib_npz, calib_size=16, target=target, out=tmp_path / "out",
                               batch_size=2))  # the old failure: a verification batch equal to the export batch
    return model, record, tmp_path / "out"


def _run(path, x, qdq="float"):
    with OrtRunner(path, qdq=qdq, warn_inexact=False) as runner:
        return runner.infer({"input": x})["logits"]


@pytest.mark.parametrize("batch_expr", ["len(x)", "x.size(0)"])
def test_class_token_from_len_x_exports_batch_dynamic(tmp_path, calib_npz, batch_expr):
    model, record, out = _build(tmp_path, calib_npz, batch_expr)
    assert record["export"]["batch"] == "dynamic"
    x7 = np.random.default_rng(1).standard_normal((7, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x7)).numpy()
    for name in ("model.fp32.onnx", "model.int8.onnx"):
        whole = _run(out / name, x7)
        ones = np.concatenate([_run(out / name, x7[i:i + 1]) for i in range(7)])
        assert whole.shape == (7, 10)
        np.testing.assert_allclose(whole, ones, rtol=1e-4, atol=1e-5)   # batch 7 = seven batches of 1
        if name == "model.fp32.onnx":
            np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-4)


def test_model_that_cannot_export_batch_dynamic_builds_at_batch_1(tmp_path, calib_npz, caplog):
    """A Python list as long as the batch is a constant to both exporters: batch 1, a warning, and the
    files still run at batch 7."""
    model, record, out = _build(tmp_path, calib_npz, "len(x)", target="jetson-orin",
                                replace=("self.cls.expand(len(x), -1, -1)", "torch.cat([self.cls] * len(x))"))
    assert record["export"]["batch"] == 1
    assert any("cannot be exported with a dynamic batch" in r.getMessage() for r in caplog.records)
    x7 = np.random.default_rng(1).standard_normal((7, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x7)).numpy()
    np.testing.assert_allclose(_run(out / "model.fp32.onnx", x7), expected, rtol=1e-4, atol=1e-4)
    assert _run(out / "model.int8.onnx", x7).shape == (7, 10)
    assert "--max-batch 1" in record["engine"]["command"]          # the engine profile: batch 1 only
    assert "maxShapes=input:1x3x16x16" in (out / "trtexec.txt").read_text()
