"""Stage 1: a model file on disk → an eval-mode nn.Module and its ModelSpec.

Accepted: a state_dict (with ``--arch``), a pickled ``nn.Module`` (only with ``--trust-pickle``:
unpickling runs code from the file). timm attention is switched to its explicit path so that
q·kᵀ, softmax and attn·v are separate ops a quantizer can see.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import math
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .artifacts import ModelSpec
from .errors import InputError, UnsupportedModelError, first_line
from .log import get_logger

log = get_logger(__name__)

# Extra key accepted in --model-kwargs: LayerNorm eps to set after construction (timm's default is
# 1e-6, many training scripts use PyTorch's 1e-5; a JSON string cannot carry functools.partial).
LAYER_NORM_EPS_KEY = "layer_norm_eps"


def load_model(
    path: str | Path,
    arch: Optional[str] = None,
    model_kwargs: Optional[str | Dict[str, Any]] = None,
    trust_pickle: bool = False,
    input_size: Optional[Sequence[int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
):
    """Return ``(model, spec)``; every user mistake raises a one-line VitDeployError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    kwargs = _parse_kwargs(model_kwargs)
    if _is_torchscript(path):
        raise UnsupportedModelError(
            f"{path} is a TorchScript archive, whose layers cannot be swapped for quantized ones: "
            "save the eager model's state_dict and pass it with --arch")
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        model = obj
        if arch:
            log.warning("%s holds a whole module; --arch %s is ignored", path, arch)
    else:
        state = _find_state_dict(obj, path)
        if not arch:
            raise InputError(
                f"{path} holds a state_dict: pass --arch <timm model name, or file.py:Class> "
                "(and --model-kwargs '<json>' if it differs from the default configuration)")
        model = build_arch(arch, kwargs)
        _load_state(model, state, arch)
    if LAYER_NORM_EPS_KEY in kwargs and isinstance(obj, torch.nn.Module):
        _set_layer_norm_eps(model, kwargs[LAYER_NORM_EPS_KEY])
    model = prepare_for_quantization(model)
    check_finite(model)
    spec = infer_spec(model, path, arch, input_size, mean, std)
    from .quantize.mha import make_attention_explicit

    make_attention_explicit(model, spec.input_size)
    return model, spec


def prepare_for_quantization(model):
    """Eval mode, and timm's explicit attention path (the fused SDPA hides q·kᵀ and softmax)."""
    model.eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def check_finite(model) -> None:
    import torch

    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UnsupportedModelError(f"weights contain NaN/Inf: {name} has {bad} non-finite values")


# --------------------------------------------------------------------------- file formats

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torch_load(path: Path, trust_pickle: bool):
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the classes it refuses ("Unsupported global"); any other
        # complaint ("Unsupported operand", truncated data) means the bytes are no pickle at all.
        if "Unsupported global" not in str(exc):
            raise InputError(f"cannot read {path} as a PyTorch checkpoint: it is neither a state_dict nor a "
                             "pickled model (damaged, or another format)") from exc
        if not trust_pickle:
            raise InputError(
                f"{path} is a pickled object, not a plain state_dict: unpickling runs code from the file, "
                "so vitdeploy refuses it unless you pass --trust-pickle (or save model.state_dict() and "
                "pass --arch)") from exc
    except Exception as exc:  # truncated zip, random bytes, ...
        raise InputError(f"cannot read {path} as a PyTorch checkpoint: {first_line(exc)}") from exc
    # Trusted full unpickling. Classes defined next to the checkpoint (a model.py) become importable.
    with _sys_path(path.parent):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"cannot unpickle {path}: {first_line(exc)} (the module defining the model class "
                "must be importable: add its folder to PYTHONPATH)") from exc
        except Exception as exc:  # the unpickled code itself failed
            raise UnsupportedModelError(f"cannot unpickle {path}: {type(exc).__name__}: {first_line(exc)}") from exc


def _find_state_dict(obj: Any, path: Path) -> Dict[str, Any]:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), dict) and obj[key] and _all_tensors(obj[key]):
                obj = obj[key]
                break
        if obj and _all_tensors(obj):
            # DistributedDataParallel and torch.compile prefixes.
            prefixes = ("module.", "_orig_mod.")
            return {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in obj.items()}
    raise InputError(f"{path} holds a {type(obj).__name__}, not a state_dict or nn.Module "
                     f"(expected torch.save(model.state_dict()) or torch.save(model))")


def _all_tensors(d: dict) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in d.values())


# --------------------------------------------------------------------------- architectures

def arch_file(arch: Optional[str]) -> Optional[Path]:
    """The Python file of a ``file.py:Name`` --arch (an input the output folder must not hold), else None."""
    return Path(arch.rpartition(":")[0]) if arch and ":" in arch else None


def build_arch(arch: str, kwargs: Dict[str, Any]):
    """A timm model name, or ``file.py:Name`` (a class or factory defined in that file) for plain PyTorch.

    Nothing else: ``module:callable`` would call any importable function (``os:system``).
    """
    import torch

    ctor_kwargs = {k: v for k, v in kwargs.items() if k != LAYER_NORM_EPS_KEY}
    if ":" in arch:
        factory = _import_factory(arch)
        model = _construct(factory, ctor_kwargs, arch)
        if not isinstance(model, torch.nn.Module):
            raise UnsupportedModelError(f"--arch {arch} returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        import timm

        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnsupportedModelError(f"unknown architecture '{arch}': not a timm model name{hint}")
        model = _construct(lambda **kw: timm.create_model(arch, pretrained=False, **kw), ctor_kwargs, arch)
    if LAYER_NORM_EPS_KEY in kwargs:
        _set_layer_norm_eps(model, kwargs[LAYER_NORM_EPS_KEY])
    return model


def _construct(factory, kwargs, arch):
    try:
        return factory(**kwargs)
    except Exception as exc:  # the user's constructor can raise anything
        raise UnsupportedModelError(f"cannot build '{arch}' with --model-kwargs {json.dumps(kwargs)}: "
                                    f"{type(exc).__name__}: {first_line(exc)}") from exc


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target.endswith(".py") or not attr.isidentifier():
        raise InputError(f"--arch {spec}: expected a timm model name or file.py:Name (a class or function defined "
                         "in that Python file)")
    file = Path(target)
    if not file.is_file():
        raise InputError(f"architecture file not found: {file}")
    mod_name = f"vitdeploy_user_arch_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(module_spec)
    with _sys_path(file.parent):
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise UnsupportedModelError(f"--arch {spec}: syntax error in {file}, line {exc.lineno}: {exc.msg}") from exc
        except Exception as exc:  # a missing import, or the file's own code failing
            raise UnsupportedModelError(f"--arch {spec}: importing {file} failed: {type(exc).__name__}: "
                                        f"{first_line(exc)}") from exc
    if not hasattr(module, attr):
        raise UnsupportedModelError(f"--arch {spec}: '{target}' has no attribute '{attr}'")
    return getattr(module, attr)


def _load_state(model, state: Dict[str, Any], arch: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise UnsupportedModelError(f"state_dict does not match --arch {arch}: {'; '.join(parts)} "
                                    "— check --arch and --model-kwargs")
    model.load_state_dict(state, strict=True)


def _set_layer_norm_eps(model, eps: float) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = float(eps)


def _parse_kwargs(model_kwargs) -> Dict[str, Any]:
    if model_kwargs is None or model_kwargs == "":
        return {}
    if isinstance(model_kwargs, dict):
        return dict(model_kwargs)
    try:
        value = json.loads(model_kwargs)
    except json.JSONDecodeError as exc:
        raise InputError(f"--model-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InputError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


# --------------------------------------------------------------------------- spec

def infer_spec(model, path: Path, arch: Optional[str], input_size=None, mean=None, std=None) -> ModelSpec:
    """Input size, mean and std: command line > the model's own structure/pretrained_cfg > error."""
    import torch

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = _input_size(model, cfg, input_size)
    channels = size[0]
    mean = _per_channel("mean", mean if mean is not None else cfg.get("mean"), channels)
    std = _per_channel("std", std if std is not None else cfg.get("std"), channels)
    if any(s <= 0 for s in std):
        raise InputError(f"--std must be positive, got {list(std)}")
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *size))
    except Exception as exc:
        raise UnsupportedModelError(f"the model does not run on a 1x{'x'.join(map(str, size))} input: "
                                    f"{first_line(exc)} (check --input-size)") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UnsupportedModelError("the model must return one tensor of logits, shape [batch, classes]; "
                                    f"got {type(out).__name__} {getattr(out, 'shape', '')}")
    return ModelSpec(
        name=path.stem, input_size=size, mean=mean, std=std, num_classes=int(out.shape[1]),
        source=str(path), arch=arch, crop_pct=float(cfg.get("crop_pct") or 1.0),
        crop_mode=str(cfg.get("crop_mode") or "center"), interpolation=str(cfg.get("interpolation") or "bilinear"),
    )


def _input_size(model, cfg, given) -> Tuple[int, int, int]:
    if given:
        size = tuple(int(v) for v in given)
        if len(size) == 2:  # H W: channels from the model
            size = (_in_chans(model) or 3,) + size
        if len(size) != 3 or min(size) <= 0:
            raise InputError(f"--input-size must be C H W (or H W), got {list(given)}")
        return size
    patch = getattr(model, "patch_embed", None)
    img = getattr(patch, "img_size", None)
    if img is not None and not getattr(patch, "dynamic_img_size", False):
        return (_in_chans(model) or 3, int(img[0]), int(img[1]))
    if cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    raise InputError("cannot tell the model's input size: pass --input-size C H W")


def _in_chans(model) -> Optional[int]:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return getattr(model, "in_chans", None)


def _per_channel(what: str, values, channels: int) -> Tuple[float, ...]:
    if values is None:
        raise InputError(f"the model carries no preprocessing: pass --mean and --std (the normalisation it was "
                         f"trained with), e.g. --mean 0.5 --std 0.5")
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise InputError(f"--{what} needs 1 or {channels} finite values, got {list(values)}")
    return values


@contextlib.contextmanager
def _sys_path(folder: Path):
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))

