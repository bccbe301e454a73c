"""Latency figures, one way everywhere: the benchmarks' tables and the realtime server's per-session logs."""

from __future__ import annotations

import math
import statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of already sorted values: the smallest value with at least a
    fraction q of the values at or below it."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def stats_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50": round(statistics.median(ms), 2),
        "p95": round(percentile(ms, 0.95), 2),
        "mean": round(statistics.fmean(ms), 2),
        "min": round(ms[0], 2),
        "n": len(ms),
    }
