"""Stage 1, happy paths: every accepted checkpoint form loads into an eval-mode model with a ModelSpec."""
from __future__ import annotations

import warnings

import pytest
import torch

from vitdeploy.errors import InputError, UnsupportedModelError
from vitdeploy.load import load_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def same_outputs(a, b) -> bool:
    with torch.no_grad():
        return torch.allclose(a(X), b(X), atol=1e-5)


def layer_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]


def test_state_dict_with_arch(tiny_vit):
    model, spec = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs)
    assert not model.training
    assert same_outputs(model, tiny_vit.model)
    # timm's explicit attention path, so q·kᵀ and softmax are visible to the quantizer
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert spec.arch == tiny_vit.arch and spec.source == str(tiny_vit.state_dict)


def test_model_kwargs_as_dict(tiny_vit):
    model, _ = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs_dict)
    assert same_outputs(model, tiny_vit.model)


def test_pickled_module_with_trust_pickle(tiny_vit):
    model, spec = load_model(tiny_vit.module, trust_pickle=True)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert same_outputs(model, tiny_vit.model)
    assert spec.num_classes == 5


def test_pickled_module_refused_without_trust_pickle(tiny_vit):
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(tiny_vit.module)


def test_file_py_class_arch(plain_vit):
    model, spec = load_model(plain_vit.state_dict, plain_vit.arch, mean=[0.5], std=[0.25])
    assert type(model).__name__ == "TinyPlainViT"
    assert same_outputs(model, plain_vit.model)
    assert spec.input_size == (3, 16, 16)  # from patch_embed.img_size
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
    assert spec.num_classes == 4
    assert spec.crop_pct == 1.0 and spec.interpolation == "bilinear"


def test_file_py_class_arch_with_kwargs(plain_vit, tmp_path):
    built, _ = load_model(plain_vit.state_dict, plain_vit.arch, '{"num_classes": 4, "dim": 16}', mean=[0.5], std=[0.5])
    assert same_outputs(built, plain_vit.model)
    with pytest.raises(UnsupportedModelError, match="does not match"):
        load_model(plain_vit.state_dict, plain_vit.arch, '{"num_classes": 7}', mean=[0.5], std=[0.5])
    with pytest.raises(InputError, match="architecture file not found"):
        load_model(plain_vit.state_dict, f"{tmp_path / 'missing.py'}:TinyPlainViT", mean=[0.5], std=[0.5])
    with pytest.raises(UnsupportedModelError, match="no attribute 'Nope'"):
        load_model(plain_vit.state_dict, f"{plain_vit.source}:Nope", mean=[0.5], std=[0.5])


def test_layer_norm_eps_from_model_kwargs(tiny_vit):
    default, _ = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs)
    assert {m.eps for m in layer_norms(default)} == {1e-6}  # timm's default
    kwargs = {**tiny_vit.kwargs_dict, "layer_norm_eps": 1e-5}
    model, _ = load_model(tiny_vit.state_dict, tiny_vit.arch, kwargs)
    norms = layer_norms(model)
    assert len(norms) == 2 * 2 + 1  # two per block, plus the final norm
    assert {m.eps for m in norms} == {1e-5}


def test_layer_norm_eps_on_pickled_module_and_file_arch(tiny_vit, plain_vit):
    model, _ = load_model(tiny_vit.module, model_kwargs='{"layer_norm_eps": 0.001}', trust_pickle=True)
    assert {m.eps for m in layer_norms(model)} == {1e-3}
    model, _ = load_model(plain_vit.state_dict, plain_vit.arch, {"layer_norm_eps": 1e-3}, mean=[0.5], std=[0.5])
    assert {m.eps for m in layer_norms(model)} == {1e-3}


def test_spec_from_timm_pretrained_cfg(tiny_vit):
    _, spec = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs)
    # input size from the model itself (patch_embed.img_size), not the cfg's 224
    assert spec.input_size == (3, 16, 16)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert spec.num_classes == 5
    assert spec.crop_pct == pytest.approx(0.9) and spec.interpolation == "bicubic"
    assert spec.name == "tiny_vit"


def test_spec_command_line_overrides(tiny_vit):
    _, spec = load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs, input_size=[16, 16],
                         mean=[0.485, 0.456, 0.406], std=[0.2])
    assert spec.input_size == (3, 16, 16)  # H W: channels from the model
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.std == (0.2, 0.2, 0.2)


def test_input_size_override_on_a_model_that_accepts_it(plain_vit):
    _, spec = load_model(plain_vit.state_dict, plain_vit.arch, input_size=[3, 24, 32], mean=[0.5], std=[0.5])
    assert spec.input_size == (3, 24, 32)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"input_size": [3, 32, 32]}, UnsupportedModelError, "does not run on a 1x3x32x32 input"),
    ({"input_size": [3, 16, 16, 1]}, InputError, "--input-size must be C H W"),
    ({"mean": [0.5, 0.5]}, InputError, "--mean needs 1 or 3"),
    ({"std": [0.0]}, InputError, "--std must be positive"),
])
def test_spec_bad_overrides(tiny_vit, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_model(tiny_vit.state_dict, tiny_vit.arch, tiny_vit.kwargs, **kwargs)


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "checkpoint_dict"])
def test_wrapped_state_dicts(tiny_vit, tmp_path, wrap):
    state = tiny_vit.model.state_dict()
    if wrap == "checkpoint_dict":  # a training checkpoint: {"model": DDP state_dict, "epoch": ...}
        obj = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3, "optimizer": {}}
    else:
        obj = {f"{wrap}{k}": v for k, v in state.items()}
    path = tmp_path / "wrapped.pt"
    torch.save(obj, path)
    model, _ = load_model(path, tiny_vit.arch, tiny_vit.kwargs)
    assert same_outputs(model, tiny_vit.model)


def test_torchscript_gives_clear_error(tmp_path, tiny_vit):
    path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(tiny_vit.model, torch.zeros(1, 3, 16, 16)).save(str(path))
    for trust in (False, True):
        with pytest.raises(UnsupportedModelError, match="TorchScript") as info:
            load_model(path, tiny_vit.arch, tiny_vit.kwargs, trust_pickle=trust)
        assert "--arch" in str(info.value) and "\n" not in str(info.value)
