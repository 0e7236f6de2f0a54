"""Timing helpers: run a callable with warm-up and report p50 / p90 / p99 / mean."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def summarize(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "runs": len(a),
    }


def sample(
    fn: Callable[[], object], warmup: int, runs: int, min_seconds: float = 0.0
) -> list[float]:
    """Seconds of at least ``runs`` timed calls, and more until ``min_seconds`` have been sampled
    (at most 50 x ``runs``): a 25 ms stage then gets a p50 over seconds, not over half a second,
    so the figure does not move with a moment's noise on a shared machine."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while len(samples) < runs or (sum(samples) < min_seconds and len(samples) < 50 * runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples
