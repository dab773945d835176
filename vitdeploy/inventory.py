"""Find the layers worth quantizing by what they are and how they run, not by class names.

One forward pass with hooks records, for every nn.Linear / nn.Conv2d that actually executes, its
order, shapes and MACs per image. Roles (patch-embed, qkv, attention-out, fc1, fc2, head) follow
from structure: the first layer to see pixels embeds patches, the last one produces the logits (with
any same-shaped one just before it: DeiT-distilled's second head), a Linear whose width is 3× the next one's input is a fused QKV, a widening Linear followed by one
that narrows back is an MLP. That works for timm and for hand-written ViTs alike.
"""
from __future__ import annotations

import dataclasses
from typing import List

import torch
from torch import nn

from .artifacts import ModelSpec
from .log import get_logger

log = get_logger(__name__)

ROLES = ("patch_embed", "qkv", "attn_qk", "attn_av", "attn_out", "mlp_fc1", "mlp_fc2", "head", "linear")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str            # "linear" | "conv" | "matmul" (attention q·kᵀ and softmax·v)
    role: str
    in_features: int
    out_features: int
    macs: int            # multiply-accumulates per image

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_layers(model: nn.Module, spec: ModelSpec) -> List[LayerInfo]:
    """The layers that run in a forward pass, in execution order, with roles.

    Linear and Conv2d layers always; the two matmuls of every attention module that has a
    quantized twin (timm's Attention, the vit-pytorch layout, nn.MultiheadAttention written out) as ``<path>.matmul_qk`` and
    ``<path>.matmul_av`` -- if the twin reproduces the module's output on this pass's input.
    """
    from .quantize.attention import attention_twin_for, twin_reproduces

    names = {module: name for name, module in model.named_modules()}
    seen: list = []
    attentions: dict = {}

    def hook(module, inputs, output):
        if module in names and all(module is not s[0] for s in seen):
            seen.append((module, tuple(inputs[0].shape), tuple(output.shape)))

    def attention_hook(module, inputs, output):
        if names[module] not in attentions:
            attentions[names[module]] = (module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    handles += [m.register_forward_hook(attention_hook) for m in model.modules() if attention_twin_for(m)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *spec.input_size))
    finally:
        for h in handles:
            h.remove()
    layers = _assign_roles([_describe(names[m], m, out_shape) for m, _, out_shape in seen])
    checked = {}
    for path, (module, inputs, output) in attentions.items():
        if twin_reproduces(module, inputs, output):
            checked[path] = (module, tuple(inputs[0].shape))
        else:
            log.warning("attention %s (%s) does not compute what its quantized twin computes: "
                        "its matmuls stay in floating point", path, type(module).__name__)
    return _with_attention_matmuls(layers, checked)


def _with_attention_matmuls(layers: List[LayerInfo], attentions: dict) -> List[LayerInfo]:
    """Put each attention's two matmuls right after its qkv projection (execution order)."""
    from .quantize.attention import attention_heads

    out = []
    for layer in layers:
        out.append(layer)
        path = layer.name.rpartition(".")[0]
        if layer.role == "qkv" and path in attentions:
            module, in_shape = attentions[path]
            # nn.MultiheadAttention without batch_first sees (tokens, batch, dim)
            tokens = in_shape[1] if getattr(module, "batch_first", True) else in_shape[0]
            heads, head_dim = attention_heads(module)
            macs = heads * tokens * tokens * head_dim
            out.append(LayerInfo(f"{path}.matmul_qk", "matmul", "attn_qk", head_dim, tokens, macs))
            out.append(LayerInfo(f"{path}.matmul_av", "matmul", "attn_av", tokens, head_dim, macs))
    return out


def _describe(name: str, module: nn.Module, out_shape) -> dict:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        positions = out_shape[2] * out_shape[3]
        return dict(name=name, kind="conv", in_features=module.in_channels, out_features=module.out_channels,
                    macs=int(positions * k * module.out_channels))
    rows = 1
    for d in out_shape[:-1]:  # tokens: the pass runs one image, so batch-first or not, every other dim is 1
        rows *= d
    return dict(name=name, kind="linear", in_features=module.in_features, out_features=module.out_features,
                macs=int(rows * module.in_features * module.out_features))


def _assign_roles(layers: List[dict]) -> List[LayerInfo]:
    roles = ["linear"] * len(layers)
    for i, layer in enumerate(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if i == 0 and (layer["kind"] == "conv" or len(layers) > 1):
            roles[i] = "patch_embed"
        elif i == len(layers) - 1:
            roles[i] = "head"
        elif roles[i] != "linear":
            continue
        elif nxt and layer["out_features"] == 3 * nxt["in_features"]:
            roles[i] = "qkv"
            roles[i + 1] = "attn_out"
        elif nxt and layer["out_features"] > layer["in_features"] and nxt["in_features"] == layer["out_features"] \
                and nxt["out_features"] == layer["in_features"]:
            roles[i] = "mlp_fc1"
            roles[i + 1] = "mlp_fc2"
    # Several heads side by side (DeiT-distilled's head and head_dist, averaged into the logits): the
    # layers just before the last one with its exact shape and no other role are heads too.
    last = layers[-1] if len(layers) > 1 else None
    for i in range(len(layers) - 2, 0, -1):
        if roles[i] != "linear" or (layers[i]["kind"], layers[i]["in_features"], layers[i]["out_features"]) != \
                (last["kind"], last["in_features"], last["out_features"]):
            break
        roles[i] = "head"
    return [LayerInfo(role=r, **layer) for r, layer in zip(roles, layers)]
