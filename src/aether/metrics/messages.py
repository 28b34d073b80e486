"""Wire types of the metrics package: the two transport messages (tags 60-69) and the values
they carry, which are also the JSON answers of the management API's metrics endpoints.

Only the two top-level messages are tagged and ``array_like`` (compact on the node-to-node wire);
the nested structs are plain maps, so the same structs encode to readable JSON objects for the API.
Durations on the wire are seconds; the derived latency figures for people are milliseconds
(``*_ms``). Imports only msgspec.
"""

from __future__ import annotations

from typing import Final, Union

import msgspec

__all__ = [
    "METRICS_MESSAGE_TYPES",
    "ClusterMetricsSnapshot",
    "ClusterPoint",
    "ClusterTotals",
    "EntryCounters",
    "EntryStats",
    "InstanceCounters",
    "InstanceStats",
    "MetricsMessage",
    "NodeMetricsUpdate",
    "NodeSample",
    "NodeStats",
    "SliceLoad",
]


class NodeSample(msgspec.Struct, frozen=True):
    """The process a node runs in, sampled once a second (several in-process nodes share one)."""

    cpu_percent: float
    """CPU use of the process since the previous sample, percent of one core (may exceed 100)."""
    rss_bytes: int
    """Resident memory of the process."""
    uptime: float
    """Seconds since the node started (monotonic clock): the time base of its rates."""
    loop_lag_ms: float = 0.0
    """The node's event-loop lag: the largest lag of the last few seconds (`LoopLagProbe`)."""


class EntryCounters(msgspec.Struct, frozen=True):
    """Cumulative counters of one entry point on one node, since that node started."""

    artifact: str
    entry: str
    calls: int
    successes: int
    failures: int
    total_seconds: float
    buckets: list[int]
    """Calls per latency bucket (not cumulative): ``len(BUCKET_BOUNDS) + 1``, the last is overflow."""
    slow: int
    """Calls slower than the entry's fixed (or per-entry configured) threshold."""
    slow_adaptive: int
    """Calls slower than ``ADAPTIVE_FACTOR`` times the entry's running average (after a warm-up)."""
    client_errors: int = 0
    """Calls answered with a 4xx (bad argument, NotFound, Conflict, ...): neither successes nor
    failures. (Last, with a default: updates from nodes that do not send it decode as 0.)"""
    blocked: int = 0
    """Times a call of this entry held its slice's event loop past the limit (blocking code)."""


class InstanceCounters(msgspec.Struct, frozen=True):
    """One slice instance on the reporting node: gauges now, counters since the instance started."""

    artifact: str
    instance: int
    in_flight: int
    """Calls running now."""
    queued: int
    """Calls waiting for a free slot (`max_concurrency`)."""
    admitted: int
    """Calls accepted (run or queued) since the instance started: its arrivals."""
    rejected: int
    """Calls refused because the queue was full (answered 503 with Retry-After)."""
    calls: int
    """Calls finished."""
    failures: int
    """Finished calls that failed (5xx)."""
    busy_seconds: float
    """Execution time of the finished calls, queue wait excluded."""
    started: float
    """The node's uptime when the instance started: a new value means new counters."""
    healthy: bool | None = None
    """The last `health()` answer; None when the slice has no health check or it has not run yet."""
    health_failures: int = 0
    """Consecutive failed health checks."""
    health_reason: str | None = None


class InstanceStats(msgspec.Struct, frozen=True):
    """One instance as the leader's aggregator sees it: gauges and the rates of the last interval."""

    node_id: str
    artifact: str
    instance: int
    in_flight: int
    queued: int
    arrivals_per_s: float
    calls_per_s: float
    failures_per_s: float
    rejected_per_s: float
    exec_ms: float | None
    """Mean execution time of the calls that finished in the last interval (None: none did)."""
    calls: int
    failures: int
    healthy: bool | None = None
    health_failures: int = 0
    health_reason: str | None = None
    admitted: int = 0
    """Calls accepted (run or queued) since the instance started."""
    rejected: int = 0
    """Calls refused because the queue was full, since the instance started."""


class SliceLoad(msgspec.Struct, frozen=True):
    """One artifact's load summed over its reporting instances (the controller's input)."""

    artifact: str
    instances: int
    """Instances that reported."""
    in_flight: int
    queued: int
    arrivals_per_s: float
    calls_per_s: float
    failures_per_s: float
    rejected_per_s: float
    exec_ms: float | None
    """Mean execution time over the instances' last interval (None: no call finished)."""
    p95_ms: float | None
    """95th percentile latency of the artifact's calls in the last interval (None: no call)."""
    cpu_percent: float | None
    """Mean CPU percent of the nodes that host an instance."""


class NodeMetricsUpdate(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=60):
    """Node -> leader, once a second: the process sample and every entry's cumulative counters.

    Cumulative counters make a lost update harmless: the next one carries everything.
    """

    node_id: str
    incarnation: int
    """Identifies one run of the node (its start time in ms): a new value means new counters."""
    seq: int
    """Increases by one per update within an incarnation (older ones are dropped)."""
    sample: NodeSample
    entries: list[EntryCounters]
    instances: list[InstanceCounters] = []


class NodeStats(msgspec.Struct, frozen=True):
    """One node in a cluster snapshot."""

    node_id: str
    cpu_percent: float
    rss_bytes: int
    uptime: float
    age: float
    """Seconds since the aggregator last heard from the node (nodes silent for > 5 s are dropped)."""
    calls: int
    """Calls run on the node since it started (all entries)."""
    calls_per_s: float
    loop_lag_ms: float = 0.0


class EntryStats(msgspec.Struct, frozen=True):
    """One entry point across the cluster (every node's counters merged)."""

    artifact: str
    entry: str
    calls: int
    successes: int
    failures: int
    calls_per_s: float
    """Calls per second over each node's last update interval, summed over the nodes."""
    failures_per_s: float
    mean_ms: float | None
    p50_ms: float | None
    """Quantiles of the merged cumulative histograms (every call since the nodes started)."""
    p95_ms: float | None
    p99_ms: float | None
    slow: int
    slow_adaptive: int
    nodes: list[str]
    """Nodes that ran the entry."""
    client_errors: int = 0
    """Calls answered with a 4xx (the caller's mistake); `failures` are the 5xx ones."""
    blocked: int = 0
    """Calls that blocked their slice's event loop past the limit (each is also a failure)."""


class ClusterTotals(msgspec.Struct, frozen=True):
    calls: int
    successes: int
    failures: int
    calls_per_s: float
    failures_per_s: float
    slow: int
    nodes: int
    cpu_percent: float
    """Average over the nodes."""
    rss_bytes: int
    """Sum over the nodes (in-process nodes of one process count that process once per node)."""
    client_errors: int = 0


class ClusterPoint(msgspec.Struct, frozen=True):
    """One second of the cluster in the sliding window."""

    time: float
    """Wall-clock time (Unix seconds) of the leader when it made the point."""
    calls_per_s: float
    failures_per_s: float
    p50_ms: float | None
    """Latency quantiles of the calls the leader learned about during this point's interval."""
    p99_ms: float | None
    nodes: int
    cpu_percent: float
    rss_bytes: int


class ClusterMetricsSnapshot(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=61):
    """Leader -> every node, once a second: the aggregated cluster view and the recent window.

    ``window`` holds the last points (at most 60) so that every node keeps a copy of the window and
    a new leader continues it.
    """

    leader: str
    seq: int
    time: float
    nodes: list[NodeStats]
    entries: list[EntryStats]
    totals: ClusterTotals
    window: list[ClusterPoint]
    instances: list[InstanceStats] = []


MetricsMessage = Union[NodeMetricsUpdate, ClusterMetricsSnapshot]  # noqa: UP007 - a runtime Union for msgspec
"""Add to the node's peer message union."""

METRICS_MESSAGE_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (NodeMetricsUpdate, ClusterMetricsSnapshot)
"""For ``isinstance(msg, METRICS_MESSAGE_TYPES)`` when demultiplexing the transport's on_message."""
