"""``nn.MultiheadAttention`` written out, so its projections and both matmuls can be quantized.

PyTorch's own attention module (torchvision's ``vit_b_16`` and many hand-written ViTs use it) keeps
the q/k/v projection as a bare parameter (``in_proj_weight``), not a Linear, and computes q·kᵀ and
softmax·v inside one function: nothing there can take a quantizer, so such a model would get INT8
only in its MLPs. At load time each instance is replaced by :class:`ExplicitMultiheadAttention`,
which shares the same parameters as two Linears (``in_proj``, ``out_proj``) and computes the same
thing step by step. It is kept only if the whole model then reproduces its original output on an
input of the model's size; anything else (cross-attention, masks, bias_k/bias_v, zero attention,
separate q/k/v weights) keeps the original module, with a warning.

The quantized twin (:class:`QuantExplicitMultiheadAttention`) puts the usual four quantizers on
q, k, the softmax output and v (attention.py), exactly as for timm's attention.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..log import get_logger
from .attention_base import QuantAttentionMixin

log = get_logger(__name__)


class ExplicitMultiheadAttention(nn.Module):
    """Self-attention of an ``nn.MultiheadAttention``, step by step; same call and return value."""

    # nn.TransformerEncoder(Layer) read these to decide on their fused fast path, which would take
    # the weights and skip this module (and the quantizers of its twin): False keeps the slow path.
    _qkv_same_embed_dim = False

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        return self.in_proj.bias

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, h, e // h
        self.batch_first = mha.batch_first
        self.scale = self.head_dim ** -0.5
        self.dropout = mha.dropout
        self.in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device="meta")
        self.in_proj.weight, self.in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, device="meta")
        self.out_proj.weight, self.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        self.train(mha.training)  # a new module starts in training mode: its dropout would be on

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask=None, need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if any(t is not None and t is not query for t in (key, value)) or key_padding_mask is not None \
                or attn_mask is not None or is_causal or query.dim() != 3:
            raise NotImplementedError("ExplicitMultiheadAttention: batched self-attention without masks only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        q, k, v = self.in_proj(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self._scores(q * self.scale, k).softmax(dim=-1)
        out = self._attend(F.dropout(attn, self.dropout, self.training), v)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        return out, weights

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.transpose(-2, -1)

    def _attend(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attn @ v


class QuantExplicitMultiheadAttention(QuantAttentionMixin, ExplicitMultiheadAttention):
    """Quantizers on q (already scaled, as the MatMul sees it), k, the softmax output and v."""

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.q_quantizer(q) @ self.k_quantizer(k).transpose(-2, -1)

    def _attend(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend_values(attn, v)


def make_attention_explicit(model: nn.Module, input_size) -> List[str]:
    """Replace every ``nn.MultiheadAttention`` the model still reproduces its output without.

    Returns the paths replaced. Checked on one fixed random input of ``input_size`` (C, H, W):
    the output must match within 1e-4 of its largest value, or the module is put back.
    """
    paths = [name for name, m in model.named_modules() if type(m) is nn.MultiheadAttention]
    if not paths:
        return []
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _first_tensor(model(x))
    def swap(path: str, module: nn.Module) -> nn.Module:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, attr)
        setattr(parent, attr, module)
        return old

    def reproduces() -> bool:
        try:
            with torch.no_grad():
                got = _first_tensor(model(x))
        except Exception:  # how the model calls it (masks, cross-attention) is not covered
            return False
        return got.shape == expected.shape and \
            float((got - expected).abs().max()) <= 1e-4 * (float(expected.abs().max()) or 1.0)

    originals = {path: swap(path, ExplicitMultiheadAttention(model.get_submodule(path))) for path in paths}
    if reproduces():  # the usual case: one check for all of them
        return paths
    for path, original in originals.items():
        swap(path, original)
    replaced = []
    for path, original in originals.items():  # one at a time, to keep those that work
        swap(path, ExplicitMultiheadAttention(original))
        if reproduces():
            replaced.append(path)
        else:
            swap(path, original)
            log.warning("attention %s (nn.MultiheadAttention) is not plain batched self-attention: "
                        "its projections and matmuls stay in floating point", path)
    return replaced


def _first_tensor(output):
    return output if isinstance(output, torch.Tensor) else next(t for t in output if isinstance(t, torch.Tensor))
