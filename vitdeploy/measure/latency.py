"""Latency of one runner: warm-up, then timed runs; median, p90, p99 and throughput."""
from __future__ import annotations

from typing import Dict

import numpy as np

from ..backends.base import Runner


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
    t = np.asarray(times)
    median = float(np.median(t))
    return {"batch": batch, "runs": runs, "median_ms": median, "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()),
            "throughput_ips": float(batch * 1e3 / median)}
