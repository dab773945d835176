"""Per-channel activation statistics (min, max, mean) collected with forward hooks.

Calibration-time helpers for the accuracy techniques: the shift before a quantizer needs each
channel's min and max, bias correction each channel's mean, channel rescaling each channel's
range. The statistics are bounded (a few vectors per layer) however much data streams through.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .calibrators import MinMaxCalibrator


class ChannelStats:
    """Running per-channel min, max and mean of a tensor along ``axis`` (default: the last one)."""

    def __init__(self, axis: int = -1, track_range: bool = True, track_mean: bool = True) -> None:
        self.axis = axis
        self._range = MinMaxCalibrator(axis=axis) if track_range else None
        self._sum: Optional[torch.Tensor] = None
        self._count = 0
        self.track_mean = track_mean

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self._range is not None:
            self._range.collect(x)
        if self.track_mean:
            axis = self.axis % x.dim()
            flat = x.movedim(axis, -1).reshape(-1, x.shape[axis]).to(torch.float64)
            total = flat.sum(dim=0).cpu()
            self._sum = total if self._sum is None else self._sum + total
            self._count += flat.shape[0]

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max), float32."""
        if self._range is None:
            raise RuntimeError("ChannelStats created without track_range")
        return self._range.compute_range()

    def mean(self) -> torch.Tensor:
        """Per-channel mean, float32."""
        if self._sum is None:
            raise RuntimeError("ChannelStats: no data collected (or created without track_mean)")
        return (self._sum / self._count).to(torch.float32)

    @property
    def collected(self) -> bool:
        return self._count > 0 or (self._range is not None and self._range._min is not None)
