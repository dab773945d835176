"""The pieces a model is reconstructed in, found from one forward pass, and their recorded inputs and outputs.

A *unit* is the largest module that is called with one tensor and returns one, holds at least one
quantized layer and at most one attention: a transformer block in timm (``blocks.3``) and in
torchvision, a pre-norm sub-block in the vit-pytorch layout (``transformer.layers.2.0``: there the
residual add lives in the parent's loop, outside every module), and the patch embedding and the
head on their own. Nothing here knows a class name, so a hand-written ViT is cut the same way.

Units run in model order. Unit j *chains* from unit i when j's input is exactly i's output (timm's
blocks): its quantized input is then computed from the recovered unit i directly; otherwise a
forward pass of the whole quantized model records it (the class token, a residual add or a norm
sit in between).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..quantize.apply import run_with_hooks


@dataclasses.dataclass
class Unit:
    name: str
    layers: List[str]            # quantizable layer names inside it (Linear/Conv paths and matmuls)
    chains: bool = False         # its input is the previous unit's output


def find_units(model: nn.Module, layer_names: Sequence[str], example: torch.Tensor,
               attention_paths: Sequence[str]) -> List[Unit]:
    """Units covering every name in ``layer_names`` (Linear/Conv paths and ``<attn>.matmul_*``), in call order."""
    modules = dict(model.named_modules())
    calls: Dict[str, dict] = {}

    def pre_hook(name):
        def hook(_module, args, kwargs):
            if name not in calls:
                single = len(args) == 1 and isinstance(args[0], torch.Tensor) and \
                    all(v is None or v is False for v in kwargs.values())
                calls[name] = {"order": len(calls), "single": single}
        return hook

    def post_hook(name):
        def hook(_module, _args, output):
            calls[name]["single"] = calls[name]["single"] and isinstance(output, torch.Tensor)
        return hook

    handles = []
    for name, m in modules.items():
        if name:
            handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()

    def owner(layer: str) -> str:
        return layer.rpartition(".")[0] if layer.rpartition(".")[2] in ("matmul_qk", "matmul_av") else layer

    def inside(layer_path: str, module: str) -> bool:
        return layer_path == module or layer_path.startswith(module + ".")

    def candidate(module: str) -> bool:
        info = calls.get(module)
        if info is None or not info["single"]:
            return False
        if not any(inside(owner(n), module) for n in layer_names):
            return False
        return sum(inside(a, module) for a in attention_paths) <= 1

    units: List[Unit] = []
    covered = set()
    for name in sorted(calls, key=lambda n: calls[n]["order"]):
        if any(inside(name, u.name) for u in units) or not candidate(name):
            continue
        parts = name.split(".")
        if any(candidate(".".join(parts[:i])) for i in range(1, len(parts))):
            continue  # an ancestor is a unit (or will be: ancestors are called first)
        members = [n for n in layer_names if inside(owner(n), name)]
        covered.update(members)
        units.append(Unit(name, members))
    missing = [n for n in layer_names if n not in covered]
    if missing:
        raise ValueError(f"recovery: layer(s) {', '.join(missing[:3])} are not inside a module called with one "
                         f"tensor (cannot be reconstructed on their own)")
    return units


@torch.no_grad()
def record(model: nn.Module, units: Sequence[Unit], images: torch.Tensor, batch: int,
           outputs: bool) -> Dict[str, Dict[str, torch.Tensor]]:
    """Each unit's input (and output) over ``images``, on the CPU: {unit: {"input": x, "output": y}}."""
    modules = dict(model.named_modules())
    store: Dict[str, Dict[str, List[torch.Tensor]]] = {u.name: {"input": [], "output": []} for u in units}

    def hook(name):
        def fn(_module, args, output):
            store[name]["input"].append(args[0].detach().float().cpu())
            if outputs:
                store[name]["output"].append(output.detach().float().cpu())
        return fn

    handles = [modules[u.name].register_forward_hook(hook(u.name)) for u in units]
    run_with_hooks(model, handles, images, batch)
    return {name: {k: torch.cat(v) for k, v in parts.items() if v} for name, parts in store.items()}


def record_reference(model: nn.Module, units: Sequence[Unit], images: torch.Tensor,
                     batch: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """The FP32 model's unit inputs, outputs and output *importance*: the squared gradient of the
    cross-entropy against the model's own prediction (BRECQ's Fisher approximation; no labels needed).

    Why: a block's output error matters only as far as it moves the logits. In a timm ViT the head
    reads the class token alone, so an error spread evenly over all 197 tokens that a plain MSE
    would accept can land on the one token that counts (on a random tiny ViT, blocks whose plain
    MSE improved made the logits' error 10x worse).
    """
    modules = dict(model.named_modules())
    store: Dict[str, Dict[str, List[torch.Tensor]]] = {u.name: {"input": [], "output": [], "importance": []}
                                                       for u in units}
    live: Dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, args, output):
            store[name]["input"].append(args[0].detach().float().cpu())
            store[name]["output"].append(output.detach().float().cpu())
            if output.requires_grad:
                output.retain_grad()
                live[name] = output
        return fn

    handles = [modules[u.name].register_forward_hook(hook(u.name)) for u in units]
    device = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch):
            live.clear()
            x = images[i:i + batch].to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
                loss.backward()
            for u in units:
                g = live[u.name].grad if u.name in live and live[u.name].grad is not None else None
                shape = store[u.name]["output"][-1].shape
                store[u.name]["importance"].append(torch.ones(shape) if g is None else g.detach().float().cpu().pow(2))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in store.items()}


def mark_chains(units: Sequence[Unit], fp32: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """``unit.chains`` where the FP32 recording shows its input is exactly the previous unit's output."""
    for prev, unit in zip(units, units[1:]):
        a, b = fp32[prev.name].get("output"), fp32[unit.name]["input"]
        unit.chains = a is not None and a.shape == b.shape and torch.equal(a, b)


def owner_module(model: nn.Module, layer: str) -> Optional[nn.Module]:
    path = layer.rpartition(".")[0] if layer.rpartition(".")[2] in ("matmul_qk", "matmul_av") else layer
    return dict(model.named_modules()).get(path)
