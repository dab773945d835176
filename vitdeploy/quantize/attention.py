"""Quantized attention: Q/DQ on q, k, the softmax output and v, where TensorRT's INT8 fused MHA wants them.

Three families of attention modules have quantized twins:

* **timm's** ``Attention``: timm hides q·kᵀ and softmax inside ``scaled_dot_product_attention``;
  its unfused branch keeps them but offers no module on ``v`` to hook. The twin is a subclass with
  the unfused forward written out, quantizers in place, and every option the class has (q/k norm,
  scale norm, gate, masks) kept.
* **plain-PyTorch ViTs in the vit-pytorch layout** (lucidrains/vit-pytorch and the many models
  copied from it): a module with ``to_qkv`` (one Linear), ``heads``, ``scale`` and ``to_out``,
  optionally ``norm``, ``attend`` and ``dropout``. Its class is the user's own, so the twin is
  made at run time as a subclass of it, with the layout's forward written out.
* **PyTorch's** ``nn.MultiheadAttention`` (torchvision's ViT), once load time has written it out
  as ``ExplicitMultiheadAttention`` (mha.py).

A structural match is not proof that a module computes what the twin computes, so the inventory
accepts a twin only after it reproduced the module's output on a real input (`twin_reproduces`);
an attention that fails keeps its matmuls in floating point.

Two "layers" per attention for the plan: ``<path>.matmul_qk`` (quantizes q and k, each as the
MatMul sees it: timm scales q before, vit-pytorch the product after) and ``<path>.matmul_av``
(the softmax output and v).

**Shifted softmax** (the shift technique on TensorRT targets): softmax outputs lie in [0, a], so
a symmetric INT8 quantizer spends half its codes on values that never occur. The twin quantizes
``P - z`` (z = a/2) on [-a/2, a/2] instead, twice the resolution, and undoes the shift after the
matmul. Two ways to undo it that look right are not (measured on cifar10_vit):

* ``Q(P - z)·Q(v) + z·Σ_tokens Q(v)`` is exact, but the two terms are large (z·N·mean(v) each
  for N tokens) and cancel: in FP16 that loses ~N/2 × 2⁻¹¹ of the result (cosine 0.998 on a
  tiny model built for ``desktop``);
* centring v over the tokens (d = v - v̄, Σd = 0) and adding v̄ back makes the shift vanish in
  exact arithmetic, but not for the quantized d: ``(P - z)·e_d`` sums d's rounding errors over
  all tokens with weight -z (agreement with FP32 98.8 → 97.9 %).

What is used combines both, with nothing large left to cancel:

    P·v = Q(P - z)·Q(d) + z·Σ_tokens Q(d) + v̄        (d = v - v̄; the middle term is ≈ 0)

which equals ``P·Q(d) + v̄`` up to the softmax rounding alone. In ONNX: ``Sub(P, z)`` before the
softmax QuantizeLinear, ``ReduceMean`` + ``Sub`` before v's, and after the MatMul an ``Add`` of
``v̄ + z·ReduceSum(DQ(d))`` (O(tokens·head) per head against the matmul's O(tokens²·head)). Zero
points stay 0. The price: the ``Sub`` between Softmax and its Q/DQ is not in TensorRT's fused
INT8 MHA pattern (linted as ``attention-softmax-shift``), so this belongs to the opt-in shift
technique.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple, Type

import torch
from torch import nn

from .attention_base import MATMULS, QuantAttentionMixin
from .mha import ExplicitMultiheadAttention, QuantExplicitMultiheadAttention


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

    class QuantTimmAttention(QuantAttentionMixin, _TimmAttention):
        """timm Attention with fake quantizers on both attention matmuls' inputs."""

        def _add_quantizers(self, calib_method: str, calib_kwargs: dict) -> None:
            self.fused_attn = False
            super()._add_quantizers(calib_method, calib_kwargs)

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
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = self._attend_values(attn, v)
            x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))


class _QuantVitPytorchAttention(QuantAttentionMixin):
    """The vit-pytorch layout's forward with quantizers; mixed into a subclass of the user's class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, "norm", None)
        if isinstance(norm, nn.Module):  # newer vit-pytorch normalises inside the attention
            x = norm(x)
        b, n, _ = x.shape
        h = self.heads
        q, k, v = (t.reshape(b, n, h, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (self.q_quantizer(q) @ self.k_quantizer(k).transpose(-1, -2)) * self.scale
        attend = getattr(self, "attend", None)
        attn = attend(attn) if isinstance(attend, nn.Module) else attn.softmax(dim=-1)
        dropout = getattr(self, "dropout", None)
        if isinstance(dropout, nn.Module):
            attn = dropout(attn)
        out = self._attend_values(attn, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _is_vit_pytorch_attention(module: nn.Module) -> bool:
    qkv, heads = getattr(module, "to_qkv", None), getattr(module, "heads", None)
    attend = getattr(module, "attend", None)
    return (isinstance(qkv, nn.Linear) and isinstance(heads, int)
            and heads > 0 and qkv.out_features % (3 * heads) == 0
            and isinstance(getattr(module, "scale", None), (int, float))
            and isinstance(getattr(module, "to_out", None), nn.Module)
            and (attend is None or isinstance(attend, nn.Softmax)))


_VIT_PYTORCH_TWINS: Dict[Type[nn.Module], Type[nn.Module]] = {}


def _vit_pytorch_twin(cls: Type[nn.Module]) -> Type[nn.Module]:
    if cls not in _VIT_PYTORCH_TWINS:
        _VIT_PYTORCH_TWINS[cls] = type(f"Quant{cls.__name__}", (_QuantVitPytorchAttention, cls),
                                       {"__module__": __name__})
    return _VIT_PYTORCH_TWINS[cls]


def attention_twin_for(module: nn.Module) -> Optional[Type[nn.Module]]:
    """The quantized twin class for an attention module, or None."""
    if isinstance(module, QuantAttentionMixin):
        return None
    if _TimmAttention is not None and type(module) is _TimmAttention:
        return QuantTimmAttention
    if _is_vit_pytorch_attention(module):
        return _vit_pytorch_twin(type(module))
    if type(module) is ExplicitMultiheadAttention:
        return QuantExplicitMultiheadAttention
    return None


def attention_heads(module: nn.Module) -> Tuple[int, int]:
    """(number of heads, head size) of an attention module that has a twin."""
    if hasattr(module, "num_heads"):
        return int(module.num_heads), int(module.head_dim)
    return int(module.heads), module.to_qkv.out_features // 3 // int(module.heads)


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


def twin_reproduces(module: nn.Module, inputs: tuple, expected: torch.Tensor, rtol: float = 1e-4) -> bool:
    """True when the twin (quantizers off) computes what ``module`` computed on ``inputs``."""
    try:
        twin = convert_attention(copy.deepcopy(module))
        with torch.no_grad():
            got = twin(*inputs)
    except Exception:  # a module that only looks like the layout: its own forward differs
        return False
    if isinstance(expected, tuple) and isinstance(got, tuple) and got:  # nn.MultiheadAttention: (out, weights)
        expected, got = expected[0], got[0]
    if not isinstance(got, torch.Tensor) or not isinstance(expected, torch.Tensor) or got.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) or 1.0
    return float((got - expected).abs().max()) <= rtol * scale


def matmul_quantizers(module: nn.Module, matmul: str):
    if matmul == "matmul_qk":
        return [module.q_quantizer, module.k_quantizer]
    if matmul == "matmul_av":
        return [module.softmax_quantizer, module.v_quantizer]
    raise ValueError(f"unknown attention matmul '{matmul}' (expected one of {MATMULS})")
