"""Streaming activation calibrators: max, entropy (TensorRT KL), percentile and MSE.

Every calibrator follows the same small protocol, modelled on NVIDIA ModelOpt's
``calib/max.py`` and ``calib/histogram.py``::

    cal = make_calibrator("entropy")
    for batch in batches:
        cal.collect(activation)        # any shape, float; once per batch
    amax = cal.compute_amax()          # scalar tensor (per-tensor) or 1-D (per-channel)

``collect`` keeps only bounded summary statistics (a running max, or a fixed-size histogram), so
calibrating on thousands of batches costs no more memory than calibrating on one.

The amax search routines (:func:`entropy_divergences`, :func:`amax_entropy`,
:func:`amax_percentile`, :func:`amax_mse`) are plain functions over a ``(hist, edges)`` pair so
that they can be tested, and reused, without a calibrator object.
"""

from __future__ import annotations

import abc
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from vitdeploy.errors import InputError

__all__ = [
    "Calibrator",
    "MaxCalibrator",
    "MinMaxCalibrator",
    "HistogramCalibrator",
    "make_calibrator",
    "entropy_divergences",
    "amax_entropy",
    "amax_percentile",
    "amax_mse",
    "MIN_AMAX",
    "HISTOGRAM_METHODS",
]

#: Smallest amax any calibrator returns. All-zero activations would otherwise give amax = 0 and
#: a zero (invalid) quantization scale downstream; a tiny positive value quantizes them to 0 too.
MIN_AMAX = 1e-8

#: Calibration methods served by :class:`HistogramCalibrator`.
HISTOGRAM_METHODS = ("entropy", "percentile", "mse")

# Symmetric signed 8-bit quantization: 128 magnitude levels for the KL search (TensorRT's
# "quantize into 128 bins") and a largest code of 127 for the MSE fake-quantization.
_NUM_LEVELS = 128
_MAX_CODE = 127

# Both the entropy and the MSE search start at bin 128, as in ModelOpt (start_bin=128): a
# threshold below that would leave fewer histogram bins than quantization levels.
_START_BIN = 128

# The streaming histogram keeps this many internal bins per output bin (see HistogramCalibrator).
_OVERSAMPLE = 16

# Elements binned per step: bounds the temporaries (|x| and bin indices, 4 bytes each) to
# 64 MiB apiece however large an activation tensor is.
_BIN_CHUNK = 1 << 24

# Above this, the per-element factor num_internal_bins / range would overflow float32.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# Candidates per chunk in the MSE search: bounds its temporary (chunk x bins) arrays to ~4 MiB.
_MSE_CHUNK = 256


class Calibrator(abc.ABC):
    """Base class: accumulate statistics batch by batch, then produce an amax."""

    @abc.abstractmethod
    def collect(self, x: torch.Tensor) -> None:
        """Fold one batch of activations (any shape, floating point) into the statistics."""

    @abc.abstractmethod
    def compute_amax(self) -> torch.Tensor:
        """Return the calibrated amax: a 0-d tensor, or a 1-D tensor for per-channel."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything collected so far."""


def make_calibrator(
    method: str,
    *,
    axis: Optional[int] = None,
    num_bins: int = 2048,
    percentile: float = 99.99,
) -> Calibrator:
    """Build the calibrator for ``method``: ``"max"``, ``"entropy"``, ``"percentile"`` or ``"mse"``.

    ``axis`` selects per-channel calibration and is only supported by ``"max"``; ``num_bins`` and
    ``percentile`` only matter to the histogram methods.
    """
    if method == "max":
        return MaxCalibrator(axis=axis)
    if method in HISTOGRAM_METHODS:
        if axis is not None:
            raise InputError(
                f"calibration method {method!r} is per-tensor only; got axis={axis} "
                "(use method 'max' for per-channel amax)"
            )
        return HistogramCalibrator(method, num_bins=num_bins, percentile=percentile)
    raise InputError(
        f"unknown calibration method {method!r}; expected one of "
        f"{', '.join(('max',) + HISTOGRAM_METHODS)}"
    )


# --------------------------------------------------------------------------------------------
# Input handling shared by the calibrators
# --------------------------------------------------------------------------------------------


def _as_float_tensor(x) -> torch.Tensor:
    """Detached floating-point view of ``x`` (numpy arrays accepted as a convenience)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    x = x.detach()
    # Integer and half types are promoted so all the arithmetic below runs in float32, which
    # represents every half/bfloat16 value exactly.
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.numel() == 0:
        raise InputError("cannot calibrate on an empty tensor")
    return x


def _check_finite(value: float, what: str) -> None:
    """Reject NaN/inf statistics: they would silently poison every later amax."""
    if not math.isfinite(value):
        raise InputError(f"{what} contains non-finite values (NaN or inf); cannot calibrate")


def _no_data_error(name: str) -> InputError:
    return InputError(f"{name}: no data collected; call collect() at least once before compute_amax()")


# --------------------------------------------------------------------------------------------
# Max calibrator
# --------------------------------------------------------------------------------------------


class MaxCalibrator(Calibrator):
    """Running max of ``|x|``, per tensor or per channel along ``axis``.

    Per-channel mode reduces every dimension except ``axis``; the channel count must be the same
    for every batch. Negative axes count from the end, as in PyTorch.
    """

    def __init__(self, axis: Optional[int] = None) -> None:
        if axis is not None and not isinstance(axis, int):
            raise InputError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis
        self._amax: Optional[torch.Tensor] = None

    def collect(self, x: torch.Tensor) -> None:
        """Update the running max with one batch."""
        x = _as_float_tensor(x)
        batch_amax = self._per_tensor(x) if self.axis is None else self._per_channel(x)
        _check_finite(float(batch_amax.max()), "calibration batch")
        batch_amax = batch_amax.to("cpu", torch.float32)
        if self._amax is None:
            self._amax = batch_amax
        elif self._amax.shape != batch_amax.shape:
            raise InputError(
                f"per-channel calibration along axis {self.axis}: got {batch_amax.numel()} "
                f"channels, earlier batches had {self._amax.numel()}"
            )
        else:
            torch.maximum(self._amax, batch_amax, out=self._amax)

    @staticmethod
    def _per_tensor(x: torch.Tensor) -> torch.Tensor:
        # aminmax reads x once and allocates nothing, unlike x.abs().max().
        lo, hi = torch.aminmax(x)
        return torch.maximum(lo.abs(), hi.abs())

    def _per_channel(self, x: torch.Tensor) -> torch.Tensor:
        if not -x.dim() <= self.axis < x.dim():
            raise InputError(f"axis {self.axis} is out of range for a {x.dim()}-D tensor")
        axis = self.axis % x.dim()
        reduce_dims = [d for d in range(x.dim()) if d != axis]
        if not reduce_dims:
            return x.abs()
        return x.abs().amax(dim=reduce_dims)

    def compute_amax(self) -> torch.Tensor:
        """Running max so far, floored at :data:`MIN_AMAX` (float32, on CPU)."""
        if self._amax is None:
            raise _no_data_error("MaxCalibrator")
        return self._amax.clamp(min=MIN_AMAX)

    def reset(self) -> None:
        """Forget the running max."""
        self._amax = None

    def __repr__(self) -> str:
        return f"MaxCalibrator(axis={self.axis})"


# --------------------------------------------------------------------------------------------
# Min/max calibrator (asymmetric ranges)
# --------------------------------------------------------------------------------------------


class MinMaxCalibrator(Calibrator):
    """Running minimum and maximum of ``x`` (signed), per tensor or per channel along ``axis``.

    What asymmetric quantization needs: a zero point (ONNX Runtime) or a shift (TensorRT) places
    the quantization grid on ``[min, max]`` instead of ``[-max|x|, max|x|]``. ``compute_amax``
    keeps the calibrator protocol (``max(|min|, |max|)``); ``compute_range`` gives both ends.
    Not a ``--calib-method``: the asymmetric quantizers and the shift use it directly.
    """

    def __init__(self, axis: Optional[int] = None) -> None:
        if axis is not None and not isinstance(axis, int):
            raise InputError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis
        self.reset()

    def reset(self) -> None:
        """Forget the running range."""
        self._min: Optional[torch.Tensor] = None
        self._max: Optional[torch.Tensor] = None

    def collect(self, x: torch.Tensor) -> None:
        """Update the running min and max with one batch."""
        x = _as_float_tensor(x)
        if self.axis is None:
            lo, hi = torch.aminmax(x)
        else:
            if not -x.dim() <= self.axis < x.dim():
                raise InputError(f"axis {self.axis} is out of range for a {x.dim()}-D tensor")
            axis = self.axis % x.dim()
            flat = x.movedim(axis, -1).reshape(-1, x.shape[axis])
            lo, hi = torch.aminmax(flat, dim=0)
        _check_finite(float(lo.min()) + float(hi.max()), "calibration batch")
        lo, hi = lo.to("cpu", torch.float32), hi.to("cpu", torch.float32)
        if self._min is None:
            self._min, self._max = lo.clone(), hi.clone()
        elif self._min.shape != lo.shape:
            raise InputError(
                f"per-channel calibration along axis {self.axis}: got {lo.numel()} "
                f"channels, earlier batches had {self._min.numel()}"
            )
        else:
            torch.minimum(self._min, lo, out=self._min)
            torch.maximum(self._max, hi, out=self._max)

    def compute_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` seen so far: 0-d tensors, or 1-D per channel (float32, on CPU)."""
        if self._min is None:
            raise _no_data_error("MinMaxCalibrator")
        return self._min.clone(), self._max.clone()

    def compute_amax(self) -> torch.Tensor:
        """``max(|min|, |max|)``, floored at :data:`MIN_AMAX`: the symmetric amax of the same data."""
        lo, hi = self.compute_range()
        return torch.maximum(lo.abs(), hi.abs()).clamp(min=MIN_AMAX)

    def __repr__(self) -> str:
        return f"MinMaxCalibrator(axis={self.axis})"


# --------------------------------------------------------------------------------------------
# Histogram calibrator
# --------------------------------------------------------------------------------------------


class HistogramCalibrator(Calibrator):
    """Per-tensor histogram of ``|x|`` with an entropy, percentile or MSE amax search.

    Streaming scheme (memory bounded, independent of the number of batches):

    * Internally the calibrator keeps ``num_bins * 16`` int64 counts over ``[0, R]`` (512 KiB
      for 2048 bins). ``R`` starts as the first batch's max.
    * When a batch's max exceeds ``R``, ``R`` is doubled as many times as needed and the
      existing counts are merged in groups of ``2**k`` adjacent bins. Each old bin lies entirely
      inside one new bin, so re-binning is exact: no count moves to a wrong place, only
      resolution is lost.
    * :meth:`histogram` resamples the internal counts onto exactly ``num_bins`` bins over
      ``[0, amax_seen]`` (``amax_seen`` = the largest ``|x|`` seen) by linear interpolation of
      the cumulative count (uniform density inside an internal bin). After a doubling,
      ``amax_seen > R / 2``, so every output bin spans 8 to 16 internal bins and the resampling
      error is at most one internal bin (1/8 output bin) at each output bin edge. While the
      range has never grown, the output is an exact merge of 16 internal bins: the same
      histogram as binning all the data in a single call.

    The 16x oversampling was chosen empirically: percentile/MSE amaxes then match a one-shot
    histogram to within a bin, and the (more sensitive) entropy amax usually matches exactly
    and differs by at most ~2-3% otherwise, well inside its sample-to-sample variation (~10%
    between two independent draws of the same distribution); 8x occasionally gave ~9%.

    ModelOpt instead keeps the bin width fixed and appends bins; its memory then grows with the
    ratio of final to first max, which is unbounded, and its final histogram does not end at
    the observed max.
    """

    def __init__(self, method: str = "entropy", num_bins: int = 2048, percentile: float = 99.99) -> None:
        if method not in HISTOGRAM_METHODS:
            raise InputError(
                f"unknown histogram calibration method {method!r}; expected one of "
                f"{', '.join(HISTOGRAM_METHODS)}"
            )
        min_bins = _START_BIN if method in ("entropy", "mse") else 1
        if not isinstance(num_bins, int) or num_bins < min_bins:
            raise InputError(f"num_bins must be an integer >= {min_bins} for method {method!r}, got {num_bins!r}")
        if not 0.0 < float(percentile) <= 100.0:
            raise InputError(f"percentile must be in (0, 100], got {percentile!r}")
        self.method = method
        self.num_bins = num_bins
        self.percentile = float(percentile)
        self._num_internal = num_bins * _OVERSAMPLE
        self.reset()

    def reset(self) -> None:
        """Forget the histogram."""
        self._counts: Optional[torch.Tensor] = None  # int64 [num_bins * _OVERSAMPLE] over [0, _range]
        self._range = 0.0
        self._amax_seen = 0.0

    # -- collection -------------------------------------------------------------------------

    def collect(self, x: torch.Tensor) -> None:
        """Add ``|x|`` of one batch to the histogram, widening its range if needed."""
        x = _as_float_tensor(x)
        lo, hi = torch.aminmax(x)
        batch_max = max(abs(float(lo)), abs(float(hi)))
        _check_finite(batch_max, "calibration batch")
        if self._counts is None:
            self._counts = torch.zeros(self._num_internal, dtype=torch.int64)
            self._range = batch_max
        elif batch_max > self._range:
            self._grow_range(batch_max)
        self._amax_seen = max(self._amax_seen, batch_max)
        if self._range == 0.0:
            # Only zeros so far (batch_max <= range == 0): binning needs a positive range.
            self._counts[0] += x.numel()
            return
        self._add_counts(x.reshape(-1))

    def _grow_range(self, new_max: float) -> None:
        """Double the range until it covers ``new_max``, merging bins exactly."""
        if self._range == 0.0:
            # Everything so far was exactly 0, which stays in bin 0 for any range.
            self._range = new_max
            return
        factor = 1
        while self._range * factor < new_max:
            factor *= 2  # multiplying by a power of two is exact in floating point
        self._range *= factor
        n = self._num_internal
        if factor >= n:
            merged = self._counts.sum().reshape(1)
        else:
            padded = torch.zeros(-(-n // factor) * factor, dtype=torch.int64)
            padded[:n] = self._counts
            merged = padded.view(-1, factor).sum(dim=1)
        self._counts = torch.zeros(n, dtype=torch.int64)
        self._counts[: merged.numel()] = merged

    def _add_counts(self, values: torch.Tensor) -> None:
        """Histogram ``|values|`` (all <= range) into the internal counts.

        Bin ``k`` holds ``[k, k + 1) * range / bins``, the last bin also holds ``range`` itself
        (torch.histc's convention). This uses ``bincount`` on int32 indices rather than
        ``torch.histc``: counts are exact int64, and histc's per-call cost grows with the bin
        count (~50 ms for 32768 bins on a 1000-element tensor), which dominates calibration
        when there are many small activations.
        """
        n = self._num_internal
        factor = n / self._range
        for start in range(0, values.numel(), _BIN_CHUNK):
            chunk = values[start : start + _BIN_CHUNK].abs()
            if factor > _FLOAT32_MAX and chunk.dtype != torch.float64:
                chunk = chunk.double()  # a tiny range: keep the product finite
            index = chunk.mul_(factor).clamp_(max=n - 1).to(torch.int32)
            self._counts += torch.bincount(index, minlength=n).to("cpu")

    # -- amax -------------------------------------------------------------------------------

    def histogram(self) -> Tuple[np.ndarray, np.ndarray]:
        """Return ``(hist, edges)``: ``num_bins`` float64 counts over ``[0, amax_seen]``.

        ``edges`` has ``num_bins + 1`` entries, ``edges[0] == 0`` and ``edges[-1] == amax_seen``.
        """
        if self._counts is None:
            raise _no_data_error("HistogramCalibrator")
        n_out, n_in = self.num_bins, self._num_internal
        edges = np.linspace(0.0, self._amax_seen, n_out + 1)
        cumulative = np.concatenate(([0.0], np.cumsum(self._counts.numpy()).astype(np.float64)))
        total = cumulative[-1]
        if self._amax_seen == 0.0:
            hist = np.zeros(n_out)
            hist[0] = total
            return hist, edges
        # Output edge k sits at internal position k * (n_in / n_out) * (amax_seen / range). If
        # the range never grew the ratio is exactly 1.0 and the positions are exact integers,
        # so the interpolation below reduces to an exact merge of _OVERSAMPLE bins.
        step = (n_in / n_out) * (self._amax_seen / self._range)
        positions = np.arange(n_out + 1) * step
        positions[-1] = min(n_out * step, float(n_in))
        cdf = np.interp(positions, np.arange(n_in + 1, dtype=np.float64), cumulative)
        hist = np.diff(cdf)
        # Mass interpolated beyond amax_seen (inside the internal bin holding it) belongs below.
        hist[-1] += total - cdf[-1]
        return hist, edges

    def compute_amax(self) -> torch.Tensor:
        """Run the configured search on the histogram; returns a 0-d float32 tensor."""
        hist, edges = self.histogram()
        if self._amax_seen == 0.0:
            return torch.tensor(MIN_AMAX, dtype=torch.float32)
        if self.method == "entropy":
            amax = amax_entropy(hist, edges)
        elif self.method == "percentile":
            amax = amax_percentile(hist, edges, self.percentile)
        else:
            amax = amax_mse(hist, edges)
        return torch.tensor(max(amax, MIN_AMAX), dtype=torch.float32)

    def __repr__(self) -> str:
        return (
            f"HistogramCalibrator(method={self.method!r}, num_bins={self.num_bins}, "
            f"percentile={self.percentile}, amax_seen={self._amax_seen:.6g})"
        )


# --------------------------------------------------------------------------------------------
# amax searches over a histogram
# --------------------------------------------------------------------------------------------


def _prefix(values: np.ndarray) -> np.ndarray:
    """Prefix sums with a leading 0: ``out[k] = values[:k].sum()``."""
    return np.concatenate(([0.0], np.cumsum(values, dtype=np.float64)))


def entropy_divergences(
    hist: Sequence[float],
    *,
    start_bin: int = _START_BIN,
    stride: int = 1,
    num_levels: int = _NUM_LEVELS,
) -> Tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of TensorRT's entropy calibration for every candidate threshold bin, vectorised.

    Returns ``(candidates, divergences)`` with candidates ``i = start_bin, start_bin + stride,
    ..., <= len(hist)``. For candidate ``i`` (ModelOpt's ``_compute_amax_entropy``, itself the
    TensorRT "8-bit Inference with TensorRT" algorithm):

    * ``hist[0]`` is first replaced by ``hist[1]`` (ModelOpt/pytorch-quantization do this so the
      spike of exact zeros, e.g. after ReLU/GELU, does not dominate the divergence);
    * reference ``P = hist[:i]`` with the outliers ``sum(hist[i:])`` added to its last bin;
    * bin ``j < i`` belongs to level ``floor(j * num_levels / i)``; ``Q`` spreads each level's
      total uniformly over that level's non-zero bins (zero bins stay zero);
    * both are normalised and ``KL = sum_{P>0} p log(p / q)``, ``inf`` where ``q == 0 < p``
      (which happens when the last bin is empty but there are outliers).

    Instead of a Python loop over candidates, it uses prefix sums: with ``b`` the histogram,
    ``T = sum(b)``, ``S_i = sum(b[:i])`` and ``G_g``/``n_g`` a level's count sum/non-zero bins,

        T * KL_i = sum_g [sum_{j in g} b_j log b_j - G_g log(G_g / n_g)]
                   + [(b + t) log(b + t) - b log b - t log(G_127 / n_127)]_(last bin, t = outliers)
                   + T log(S_i / T)

    where every per-level sum is a difference of prefix sums, so all candidates are evaluated
    as (candidates x levels) array operations.
    """
    if start_bin < num_levels or stride < 1:
        # The last kept bin must fall in the top level, which the formula below relies on.
        raise InputError(f"need start_bin >= num_levels ({num_levels}) and stride >= 1")
    bins = np.array(hist, dtype=np.float64)
    n = bins.size
    if n < max(start_bin, num_levels):
        raise InputError(f"entropy calibration needs at least {max(start_bin, num_levels)} bins, got {n}")
    if n > 1:
        bins[0] = bins[1]
    total = bins.sum()
    candidates = np.arange(start_bin, n + 1, stride, dtype=np.int64)
    if total <= 0:
        return candidates, np.zeros(candidates.size)

    safe = np.where(bins > 0, bins, 1.0)
    count_sum = _prefix(bins)
    nonzero_sum = _prefix((bins > 0).astype(np.float64))
    blogb_sum = _prefix(np.where(bins > 0, bins * np.log(safe), 0.0))
    # Suffix sums, not total - prefix: a run of empty trailing bins must give exactly 0 outliers.
    tail_sum = np.concatenate((np.cumsum(bins[::-1])[::-1], [0.0]))

    # Level g of candidate i covers bins [ceil(g*i/L), ceil((g+1)*i/L)) (exact integer maths,
    # matching ModelOpt's np.digitize over np.linspace(0, i, L + 1)).
    levels = np.arange(num_levels + 1, dtype=np.int64)
    bounds = (levels[None, :] * candidates[:, None] + num_levels - 1) // num_levels
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    group_count = count_sum[hi] - count_sum[lo]
    group_nonzero = nonzero_sum[hi] - nonzero_sum[lo]
    group_blogb = blogb_sum[hi] - blogb_sum[lo]

    filled = group_count > 0  # implies group_nonzero >= 1
    mean_q = np.where(filled, group_count, 1.0) / np.where(filled, group_nonzero, 1.0)
    level_terms = np.where(filled, group_blogb - group_count * np.log(mean_q), 0.0).sum(axis=1)

    last = bins[candidates - 1]
    tail = tail_sum[candidates]
    merged = last + tail
    last_correction = np.where(
        tail > 0,
        merged * np.log(np.where(merged > 0, merged, 1.0))
        - last * np.log(np.where(last > 0, last, 1.0))
        - tail * np.log(mean_q[:, -1]),
        0.0,
    )
    kept = count_sum[candidates]
    impossible = (tail > 0) & (last == 0)  # P > 0 where Q == 0
    with np.errstate(divide="ignore"):
        log_ratio = np.log(kept / total)
    divergences = (level_terms + last_correction) / total + log_ratio
    divergences = np.where(impossible, np.inf, divergences)
    return candidates, divergences


def amax_entropy(
    hist: Sequence[float], edges: Sequence[float], *, start_bin: int = _START_BIN, stride: int = 1
) -> float:
    """amax minimising the KL divergence (TensorRT entropy calibration, IInt8EntropyCalibrator2).

    Ties go to the largest threshold and the result is ``edges[i]``, the upper edge of the last
    kept bin ``i - 1``, both exactly as in ModelOpt (``calib_bin_edges[last_argmin * stride +
    start_bin]``).
    """
    candidates, divergences = entropy_divergences(hist, start_bin=start_bin, stride=stride)
    # Last minimum: scan the reversed array (ModelOpt's tie-breaking).
    best = candidates.size - 1 - int(np.argmin(divergences[::-1]))
    return float(edges[candidates[best]])


def amax_percentile(hist: Sequence[float], edges: Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile of the histogrammed values.

    Finds the bin where the cumulative count reaches ``percentile`` % of the total, like
    ModelOpt, then interpolates linearly inside that bin (ModelOpt returns the bin's lower
    edge); the result is within one bin width of the exact sample percentile.
    """
    if not 0.0 < percentile <= 100.0:
        raise InputError(f"percentile must be in (0, 100], got {percentile!r}")
    counts = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    if total <= 0:
        return float(edges[-1])
    target = total * (percentile / 100.0)
    idx = min(int(np.searchsorted(cumulative, target, side="left")), counts.size - 1)
    below = cumulative[idx - 1] if idx > 0 else 0.0
    fraction = (target - below) / counts[idx] if counts[idx] > 0 else 1.0
    fraction = min(max(fraction, 0.0), 1.0)
    return float(edges[idx] + fraction * (edges[idx + 1] - edges[idx]))


def amax_mse(
    hist: Sequence[float], edges: Sequence[float], *, start_bin: int = _START_BIN, stride: int = 1
) -> float:
    """amax minimising the expected squared error of symmetric 8-bit fake quantization.

    Candidates are the bin upper edges ``edges[i]`` for ``i = start_bin, ..., len(hist)`` (the
    last one is the observed max). Every bin is represented by its centre weighted by its
    count; each candidate's error is ``sum count * (fq(centre) - centre)^2`` with
    ``fq(v) = clamp(round(v / s), -127, 127) * s``, ``s = amax / 127`` (round half to even, as
    torch). ModelOpt's ``_compute_amax_mse`` uses bin centres as candidates and skips the last
    bin; upper edges keep the choices aligned with the entropy search. First minimum wins.
    """
    counts = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    n = counts.size
    if n < start_bin:
        raise InputError(f"mse calibration needs at least {start_bin} bins, got {n}")
    keep = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2.0)[keep]
    weights = counts[keep]
    candidates = np.arange(start_bin, n + 1, stride)
    amaxes = edges[candidates]
    errors = np.concatenate([
        _fake_quant_errors(centres, weights, amaxes[k : k + _MSE_CHUNK])
        for k in range(0, amaxes.size, _MSE_CHUNK)
    ])
    return float(amaxes[int(np.argmin(errors))])


def _fake_quant_errors(values: np.ndarray, weights: np.ndarray, amaxes: np.ndarray) -> np.ndarray:
    """Weighted squared 8-bit fake-quantization error of ``values`` for each amax, vectorised."""
    scales = np.where(amaxes > 0, amaxes, 1.0)[:, None] / _MAX_CODE
    codes = np.clip(np.round(values[None, :] / scales), -_MAX_CODE, _MAX_CODE)
    return (((codes * scales - values[None, :]) ** 2) * weights[None, :]).sum(axis=1)
