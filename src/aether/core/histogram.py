"""`Histogram`: cumulative-free bucket counts with fixed upper bounds (seconds), for latencies that a
component records on a hot path and an exporter reads at scrape time.

Recording is one `bisect` and two additions (no allocation); `cumulative()` gives Prometheus'
``le`` buckets (the last one is ``+Inf``). Owned by whoever records into it; readers copy.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise

__all__ = ["LATENCY_BOUNDS", "Histogram"]

LATENCY_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the default latency buckets: 0.5 ms to 10 s, then one for longer."""


class Histogram:
    """Counts per bucket (``counts[i]``: observations <= ``bounds[i]`` and above the bound before;
    the last entry: above every bound), their number and their sum."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        if not bounds or any(b >= c for b, c in pairwise(bounds)):
            raise ValueError("histogram bounds must be a non-empty increasing sequence")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, the last with bound ``inf``."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
