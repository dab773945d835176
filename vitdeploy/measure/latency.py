"""Latency of one runner: warm-up, then timed runs; median, p90, p99 and throughput."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ..backends.base import Runner


def latency_stats(times_ms: Sequence[float]) -> Dict[str, float]:
    """Median, p90 and p99 of per-run times (ms): the one definition `bench` and the demo share."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99))}


def measure_latency(runner: Runner, batch: int = 1, warmup: int = 10, runs: int = 100, seed: int = 0) -> Dict[str, float]:
    (name, spec), = runner.input_spec().items()
    shape = tuple(batch if d is None else d for d in spec.shape)
    x = np.random.default_rng(seed).standard_normal(shape).astype(spec.dtype)
    for _ in range(warmup):
        runner.infer({name: x})
    times = []
    for _ in range(runs):
        runner.infer({name: x})
        times.append(runner.last_latency_ms)
    stats = latency_stats(times)
    return {"batch": batch, "runs": runs, "median_ms": stats["median"], "p90_ms": stats["p90"],
            "p99_ms": stats["p99"], "mean_ms": float(np.mean(times)),
            "throughput_ips": float(batch * 1e3 / stats["median"])}
