"""Metrics: per-node entry-point and process metrics, their cluster aggregation, and Prometheus
exposition (docs/metrics.md).

Owns:

- `EntryMetrics` (sans-IO): per (artifact, entry) calls, successes, failures, total duration, a
  fixed-bucket latency histogram and slow-call counts, recorded on the node that runs the instance;
- the transport messages `NodeMetricsUpdate` (tag 60, node -> leader, once a second, cumulative
  counters) and `ClusterMetricsSnapshot` (tag 61, leader -> every node, once a second); tags 60-69
  are reserved for this package;
- `MetricsAggregator` (sans-IO): the leader's merge of the latest update per node, rates, merged
  histogram quantiles, node expiry and the 2-hour sliding window of per-second cluster points;
- `MetricsService`: the thin asyncio adapter of one node (psutil sampling, the one-second loop,
  sending through a transport-like `send(peer, msg)`);
- `ClusterFigures`: the node's view of the cluster (members, quorum, leader, consensus counters and
  commit latency, maps, slice states, routes) that the node hands the exporter at scrape time;
- `PrometheusExporter`: a per-node `CollectorRegistry` with a custom collector and
  prometheus_client's process collector (the standard ``process_*`` series); never the global
  default registry, since several nodes may share a process.

May import `aether.core`, msgspec, psutil and prometheus_client only; never the node, API,
transport or slices packages (they are reached through small Protocols). See docs/metrics.md.
"""

from aether.metrics.aggregator import MetricsAggregator
from aether.metrics.cluster import ClusterFigures, MapFigures
from aether.metrics.collector import (
    ADAPTIVE_FACTOR,
    ADAPTIVE_MIN_CALLS,
    BUCKET_BOUNDS,
    DEFAULT_SLOW_THRESHOLD,
    EntryMetrics,
    quantile,
)
from aether.metrics.messages import (
    METRICS_MESSAGE_TYPES,
    ClusterMetricsSnapshot,
    ClusterPoint,
    ClusterTotals,
    EntryCounters,
    EntryStats,
    InstanceCounters,
    InstanceStats,
    MetricsMessage,
    NodeMetricsUpdate,
    NodeSample,
    NodeStats,
    SliceLoad,
)
from aether.metrics.service import MetricsService, MetricsView

__all__ = [
    "ADAPTIVE_FACTOR",
    "ADAPTIVE_MIN_CALLS",
    "BUCKET_BOUNDS",
    "DEFAULT_SLOW_THRESHOLD",
    "METRICS_MESSAGE_TYPES",
    "ClusterFigures",
    "ClusterMetricsSnapshot",
    "ClusterPoint",
    "ClusterTotals",
    "EntryCounters",
    "EntryMetrics",
    "EntryStats",
    "InstanceCounters",
    "InstanceStats",
    "MapFigures",
    "MetricsAggregator",
    "MetricsMessage",
    "MetricsService",
    "MetricsView",
    "NodeMetricsUpdate",
    "NodeSample",
    "NodeStats",
    "SliceLoad",
    "quantile",
]
