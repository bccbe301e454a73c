"""Latency figures (lib/stats.py): nearest-rank percentiles, the same rank whatever the count's parity."""

import pytest

from lib.stats import percentile, stats_ms


@pytest.mark.parametrize(
    "n, q, index",
    [(1, 0.95, 0), (4, 0.5, 1), (10, 0.5, 4), (20, 0.95, 18), (21, 0.95, 19), (100, 0.95, 94), (100, 1.0, 99)],
)
def test_nearest_rank(n, q, index):
    assert percentile([float(i) for i in range(n)], q) == index


def test_stats_ms():
    s = stats_ms([0.004, 0.001, 0.003, 0.002])
    assert s == {"p50": 2.5, "p95": 4.0, "mean": 2.5, "min": 1.0, "n": 4}
