"""Shared fixtures: tiny models and calibration data, built once per test session.

Everything is small (3×16×16 inputs, 2 blocks of width 32) so that loading, calibrating and
exporting take well under a second per model.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

TINY_VIT_ARCH = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}

# A ViT-like plain PyTorch model: no timm, no pretrained_cfg, so it carries no mean/std.
PLAIN_MODULE_NAME = "vitdeploy_test_tiny_plain"
PLAIN_MODEL_SOURCE = '''
import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size=16, patch_size=4, in_chans=3, dim=16):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TinyPlainViT(nn.Module):
    def __init__(self, dim=16, num_classes=4):
        super().__init__()
        self.patch_embed = PatchEmbed(dim=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.fc(self.norm1(x))
        return self.head(self.norm(x).mean(1))
'''


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A tiny timm ViT (3×16×16 input, 5 classes; timm's pretrained_cfg gives mean/std 0.5), saved
    as a state_dict (``state_dict``), a pickled module (``module``) and with NaN weights (``nan``)."""
    import timm
    import torch

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    model = timm.create_model(TINY_VIT_ARCH, pretrained=False, **TINY_VIT_KWARGS).eval()
    state = model.state_dict()
    torch.save(state, folder / "tiny_vit.pt")
    torch.save(model, folder / "tiny_vit_module.pt")
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(nan_state, folder / "tiny_vit_nan.pt")
    inf_state = {k: v.clone() for k, v in state.items()}
    inf_state["head.bias"][1] = float("inf")
    torch.save(inf_state, folder / "tiny_vit_inf.pt")
    return types.SimpleNamespace(
        model=model, arch=TINY_VIT_ARCH, kwargs=json.dumps(TINY_VIT_KWARGS), kwargs_dict=dict(TINY_VIT_KWARGS),
        state_dict=folder / "tiny_vit.pt", module=folder / "tiny_vit_module.pt",
        nan=folder / "tiny_vit_nan.pt", inf=folder / "tiny_vit_inf.pt")


@pytest.fixture(scope="session")
def plain_vit(tmp_path_factory):
    """A plain nn.Module ViT-like model (``file.py:Class``), as state_dict and as pickled module."""
    import torch

    folder = tmp_path_factory.mktemp("plain_vit")
    source = folder / f"{PLAIN_MODULE_NAME}.py"
    source.write_text(PLAIN_MODEL_SOURCE)
    spec = importlib.util.spec_from_file_location(PLAIN_MODULE_NAME, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[PLAIN_MODULE_NAME] = module  # pickle finds the class by module name
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.TinyPlainViT().eval()
    torch.save(model.state_dict(), folder / "plain.pt")
    torch.save(model, folder / "plain_module.pt")
    return types.SimpleNamespace(model=model, source=source, arch=f"{source}:TinyPlainViT",
                                 state_dict=folder / "plain.pt", module=folder / "plain_module.pt")


@pytest.fixture(scope="session")
def calib_npz(tmp_path_factory) -> Path:
    """16 random uint8 RGB images, N×16×16×3, as an .npz with 'x'."""
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8))
    return path
