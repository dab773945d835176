"""What every quantized attention twin shares: its quantizers and the shifted-softmax arithmetic.

A module of its own so that the twins of timm's attention (attention.py) and of PyTorch's
nn.MultiheadAttention (mha.py) both build on it without importing each other.
"""
from __future__ import annotations

import torch

from .quantizer import TensorQuantizer

MATMULS = ("matmul_qk", "matmul_av")


class QuantAttentionMixin:
    """Quantizers and the shifted-softmax arithmetic shared by every attention twin."""

    def _add_quantizers(self, calib_method: str, calib_kwargs: dict) -> None:
        for name in ("q_quantizer", "k_quantizer", "v_quantizer"):
            setattr(self, name, TensorQuantizer(axis=None, calib_method=calib_method, **calib_kwargs))
        # Softmax outputs lie in [0, 1] and the few large probabilities carry the attention:
        # a clipping calibrator (entropy, percentile) cuts exactly those, so always use max
        # (on cifar10_vit, halving the max amax costs 4 points of agreement with FP32).
        self.softmax_quantizer = TensorQuantizer(axis=None, calib_method="max")
        #: True: quantize the softmax output shifted by half its range (set by calibration).
        self.softmax_shift_enabled = False
        self.register_buffer("softmax_shift", None)

    def _attend_values(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``Q(P)·Q(v)``, or with the softmax shift ``Q(P - z)·Q(d) + (v̄ + z·Σ_tokens Q(d))``, d = v - v̄.

        v is centred whenever the shift is on, calibration included (P·(v - v̄) + v̄ = P·v as
        rows of P sum to 1), so v's quantizer is calibrated on what it will quantize.
        """
        if not self.softmax_shift_enabled:
            return self.softmax_quantizer(attn) @ self.v_quantizer(v)
        v_mean = v.mean(dim=-2, keepdim=True)
        centred = self.v_quantizer(v - v_mean)
        shift = 0.0 if self.softmax_shift is None else self.softmax_shift   # None: calibrating P's range
        return self.softmax_quantizer(attn - shift) @ centred + (v_mean + shift * centred.sum(dim=-2, keepdim=True))

    def finish_softmax_shift(self) -> None:
        """After calibration: z = a/2 and the quantizer's amax a/2, for a calibrated softmax range [0, a]."""
        if not self.softmax_shift_enabled or self.softmax_quantizer.amax is None:
            return
        half = self.softmax_quantizer.amax.detach().clone().reshape(()) / 2
        self.softmax_quantizer.set_amax(half)
        # z on the quantization grid (127 steps of a/254): P = 0 maps to an integer code.
        scale = self.softmax_quantizer.scale
        self.softmax_shift = (torch.round(half / scale) * scale).to(torch.float32)
