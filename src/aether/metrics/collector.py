"""`EntryMetrics`: the per-node, sans-IO collector of entry-point calls.

The node's slice runtime calls `record(artifact, entry, seconds, ok, client_error)` once per call it
runs (local calls and calls served for other nodes alike, so each call is counted once, on the node
that ran it). A call that did not succeed is a *client error* when it was answered with a 4xx (bad
argument, `NotFound`, `Conflict`, ...) and a *failure* otherwise (5xx: the entry raised, returned a
value that does not fit its annotation, or was cancelled). The caller measures `seconds` with
`time.perf_counter`; this class reads no clock. Recording is a dict lookup, a `bisect` into the
fixed bucket bounds and a few additions.

Slow calls, counted two ways (both cumulative):

- ``slow``: the call took longer than the entry's threshold: `DEFAULT_SLOW_THRESHOLD` (100 ms), or
  the per-entry value given in ``thresholds`` (keys ``"group:artifact.entry"`` or ``"entry"``);
- ``slow_adaptive``: the call took longer than `ADAPTIVE_FACTOR` (3) times the entry's running
  mean (an exponentially weighted moving average, weight `ADAPTIVE_ALPHA`, starting at the first
  call's duration), counted from the call after the `ADAPTIVE_MIN_CALLS`-th, so an entry that is
  always slow is not always "slow".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Final

from aether.core.artifact import Artifact
from aether.metrics.messages import EntryCounters

__all__ = [
    "ADAPTIVE_ALPHA",
    "ADAPTIVE_FACTOR",
    "ADAPTIVE_MIN_CALLS",
    "BUCKET_BOUNDS",
    "DEFAULT_SLOW_THRESHOLD",
    "EntryMetrics",
    "quantile",
]

BUCKET_BOUNDS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds, inclusive) of the latency buckets; one more bucket holds the rest."""
DEFAULT_SLOW_THRESHOLD: Final = 0.1
ADAPTIVE_FACTOR: Final = 3.0
ADAPTIVE_ALPHA: Final = 0.05
ADAPTIVE_MIN_CALLS: Final = 20


class _Cell:
    __slots__ = (
        "adaptive", "blocked", "buckets", "calls", "client_errors", "ewma", "failures", "slow",
        "slow_adaptive", "threshold", "total",
    )  # fmt: skip

    def __init__(self, threshold: float, first: float) -> None:
        self.calls = 0
        self.failures = 0
        self.client_errors = 0
        self.blocked = 0
        self.total = 0.0
        self.buckets = [0] * (len(BUCKET_BOUNDS) + 1)
        self.slow = 0
        self.slow_adaptive = 0
        self.ewma = first  # the running mean starts at the first call's duration
        self.adaptive = float("inf")  # ADAPTIVE_FACTOR * ewma once warmed up
        self.threshold = threshold


class EntryMetrics:
    """Cumulative per-(artifact, entry) call metrics of one node. Not thread-safe (one event loop)."""

    def __init__(
        self,
        *,
        slow_threshold: float = DEFAULT_SLOW_THRESHOLD,
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        if not slow_threshold > 0:
            raise ValueError(f"slow_threshold must be a positive number of seconds, not {slow_threshold!r}")
        for key, value in (thresholds or {}).items():
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"slow threshold for {key!r} must be a positive number of seconds")
        self.slow_threshold = slow_threshold
        self.thresholds = dict(thresholds or {})
        self._cells: dict[Artifact | str, dict[str, _Cell]] = {}

    def record(
        self, artifact: Artifact | str, entry: str, seconds: float, ok: bool, client_error: bool = False
    ) -> None:
        """Count one finished call of `entry` of `artifact` that took `seconds` (hot path); a call
        that is not `ok` is a client error (4xx) when `client_error`, else a failure."""
        try:
            cell = self._cells[artifact][entry]
        except KeyError:
            cell = _Cell(self._threshold(artifact, entry), seconds)
            self._cells.setdefault(artifact, {})[entry] = cell
        cell.calls += 1
        if not ok:
            if client_error:
                cell.client_errors += 1
            else:
                cell.failures += 1
        cell.total += seconds
        cell.buckets[bisect_left(BUCKET_BOUNDS, seconds)] += 1
        if seconds > cell.threshold:
            cell.slow += 1
        if seconds > cell.adaptive:
            cell.slow_adaptive += 1
        ewma = cell.ewma = cell.ewma + ADAPTIVE_ALPHA * (seconds - cell.ewma)
        if cell.calls >= ADAPTIVE_MIN_CALLS:
            cell.adaptive = ADAPTIVE_FACTOR * ewma

    def record_block(self, artifact: Artifact | str, entry: str) -> None:
        """Count one call of `entry` that blocked its slice's event loop past the limit (the call
        itself is recorded by `record` when it ends, as a failure)."""
        try:
            cell = self._cells[artifact][entry]
        except KeyError:
            cell = _Cell(self._threshold(artifact, entry), 0.0)
            self._cells.setdefault(artifact, {})[entry] = cell
        cell.blocked += 1

    def _threshold(self, artifact: Artifact | str, entry: str) -> float:
        if self.thresholds:
            name = artifact.name if isinstance(artifact, Artifact) else ":".join(artifact.split(":")[:2])
            for key in (f"{name}.{entry}", entry):
                if key in self.thresholds:
                    return self.thresholds[key]
        return self.slow_threshold

    def counters(self) -> list[EntryCounters]:
        """Every entry's cumulative counters, sorted by (artifact, entry)."""
        out = [
            EntryCounters(
                artifact=str(artifact),
                entry=entry,
                calls=c.calls,
                successes=c.calls - c.failures - c.client_errors,
                failures=c.failures,
                client_errors=c.client_errors,
                blocked=c.blocked,
                total_seconds=c.total,
                buckets=list(c.buckets),
                slow=c.slow,
                slow_adaptive=c.slow_adaptive,
            )
            for artifact, cells in self._cells.items()
            for entry, c in cells.items()
        ]
        out.sort(key=lambda e: (e.artifact, e.entry))
        return out

    def __len__(self) -> int:
        return sum(len(cells) for cells in self._cells.values())


def quantile(q: float, buckets: Sequence[int]) -> float | None:
    """The `q` quantile (0 < q < 1), in seconds, of a histogram over `BUCKET_BOUNDS`.

    Linear interpolation inside the bucket that holds it (like Prometheus' ``histogram_quantile``);
    the first bucket starts at 0; a quantile in the overflow bucket is reported as the highest
    bound (10 s). None when the histogram is empty.
    """
    if not 0 < q < 1:
        raise ValueError(f"quantile must be between 0 and 1, not {q!r}")
    if len(buckets) != len(BUCKET_BOUNDS) + 1:
        raise ValueError(f"expected {len(BUCKET_BOUNDS) + 1} buckets, got {len(buckets)}")
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(BUCKET_BOUNDS):
                return BUCKET_BOUNDS[-1]
            lower = BUCKET_BOUNDS[i - 1] if i > 0 else 0.0
            return lower + (BUCKET_BOUNDS[i] - lower) * ((rank - seen) / count)
        seen += count
    return BUCKET_BOUNDS[-1]
