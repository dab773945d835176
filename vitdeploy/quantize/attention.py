"""Quantized attention: Q/DQ on q, k, the softmax output and v, where TensorRT's INT8 fused MHA wants them.

timm hides q·kᵀ and softmax inside ``scaled_dot_product_attention``; its unfused branch keeps them
but offers no module on ``v`` to hook. So the quantized twin is a subclass of timm's ``Attention``
with the unfused forward written out, quantizers in place, and every option the class has
(q/k norm, scale norm, gate, masks) kept. Two "layers" per attention for the plan:
``<path>.matmul_qk`` (quantizes q and k) and ``<path>.matmul_av`` (the softmax output and v).
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch
from torch import nn

from .quantizer import TensorQuantizer

MATMULS = ("matmul_qk", "matmul_av")


def _timm_attention_class() -> Optional[Type[nn.Module]]:
    try:
        from timm.layers import Attention
    except ImportError:  # timm is optional for plain-PyTorch models
        return None
    return Attention


def _mask_helpers():
    try:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
    except ImportError:  # older timm: additive masks only
        return (lambda scores, mask=None: scores if mask is None else scores + mask), \
               (lambda n, attn, mask=None, is_causal=False: mask)
    return maybe_add_mask, resolve_self_attn_mask


_TimmAttention = _timm_attention_class()


if _TimmAttention is not None:

    class QuantTimmAttention(_TimmAttention):
        """timm Attention with fake quantizers on both attention matmuls' inputs."""

        def _add_quantizers(self, calib_method: str, calib_kwargs: dict) -> None:
            self.fused_attn = False
            for name in ("q_quantizer", "k_quantizer", "v_quantizer"):
                setattr(self, name, TensorQuantizer(axis=None, calib_method=calib_method, **calib_kwargs))
            # Softmax outputs lie in [0, 1] and the few large probabilities carry the attention:
            # a clipping calibrator (entropy, percentile) cuts exactly those, so always use max.
            self.softmax_quantizer = TensorQuantizer(axis=None, calib_method="max")

        def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    is_causal: bool = False) -> torch.Tensor:
            maybe_add_mask, resolve_self_attn_mask = _mask_helpers()
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            q = self.q_quantizer(q * self.scale)          # the MatMul's real input: q already scaled
            attn = q @ self.k_quantizer(k).transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            attn = self.softmax_quantizer(attn.softmax(dim=-1))
            attn = self.attn_drop(attn)
            x = attn @ self.v_quantizer(v)
            x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    ATTENTION_TWINS: Dict[Type[nn.Module], Type[nn.Module]] = {_TimmAttention: QuantTimmAttention}
else:  # pragma: no cover - timm is a dependency, but plain models do not need it
    ATTENTION_TWINS = {}


def attention_twin_for(module: nn.Module):
    return ATTENTION_TWINS.get(type(module))


def convert_attention(module: nn.Module, calib_method: str = "max", calib_kwargs: Optional[dict] = None) -> nn.Module:
    """Turn an attention module into its quantized twin in place (a subclass: every attribute stays)."""
    twin = attention_twin_for(module)
    if twin is None:
        raise ValueError(f"no quantized attention for {type(module).__name__}")
    module.__class__ = twin
    module._add_quantizers(calib_method, calib_kwargs or {})
    for q in matmul_quantizers(module, "matmul_qk") + matmul_quantizers(module, "matmul_av"):
        q.enabled = False  # the plan switches each matmul on
    return module


def matmul_quantizers(module: nn.Module, matmul: str):
    if matmul == "matmul_qk":
        return [module.q_quantizer, module.k_quantizer]
    if matmul == "matmul_av":
        return [module.softmax_quantizer, module.v_quantizer]
    raise ValueError(f"unknown attention matmul '{matmul}' (expected one of {MATMULS})")
