"""Prometheus exposition of one node's metrics (`GET /metrics` on the management port).

A `PrometheusExporter` owns a per-node `CollectorRegistry` holding one custom collector that reads
the node's `MetricsService` at scrape time, and its own instance of prometheus_client's
`ProcessCollector`; nothing is registered in prometheus_client's global default registry (several
nodes may share a process). Every ``aether_*`` series has a ``node`` label.

Process series (prometheus_client's `ProcessCollector`, read from ``/proc`` at scrape time, so
Linux only; the standard names and types every Prometheus client library exports, without a
``node`` label since they describe the OS process, which nodes sharing a process share):
``process_cpu_seconds_total`` (counter), ``process_resident_memory_bytes``,
``process_virtual_memory_bytes``, ``process_open_fds``, ``process_max_fds``,
``process_start_time_seconds`` (gauges).

Node series: ``aether_node_cpu_ratio`` (CPU use of the node's process, 1.0 = one core),
``aether_node_memory_rss_bytes``, ``aether_node_uptime_seconds``, ``aether_node_loop_lag_seconds``
(gauges); per slice instance (labels ``artifact``, ``instance``): ``aether_instance_in_flight``,
``aether_instance_queued`` (gauges), ``aether_instance_rejected_total`` (counter); per entry (labels
``artifact``, ``entry``): ``aether_entry_successes_total``, ``aether_entry_failures_total``,
``aether_entry_client_errors_total``, ``aether_entry_blocked_total``,
``aether_entry_slow_calls_total`` (label ``threshold``: ``fixed`` or ``adaptive``) and the
histogram ``aether_entry_duration_seconds`` (its ``_count`` is the number of calls).

Cluster series, from the source's ``cluster_figures()`` (`ClusterFigures`, when it has one: the
node's `MetricsService` does): gauges ``aether_cluster_members``,
``aether_cluster_reachable_members``, ``aether_cluster_quorum`` (0/1), ``aether_cluster_leader``
(0/1), ``aether_consensus_applied_slot``, ``aether_http_routes``, ``aether_slices`` (label
``state``: every lifecycle state), per map (label ``map``) ``aether_map_partitions`` (label
``role``: ``primary``, ``replica``, ``syncing``), ``aether_map_entries``,
``aether_map_storage_bytes``, ``aether_map_replication_pending_acks``,
``aether_map_replication_lag_seconds``; counters ``aether_map_op_retries_total`` (per map, label
``reason``: ``timeout``, ``refused``, ``unreachable``), ``aether_cluster_leader_changes_total``,
``aether_consensus_slots_total``, ``aether_consensus_null_slots_total``,
``aether_consensus_commands_total``, ``aether_invoke_calls_total`` (label ``outcome``:
``succeeded``, ``failed``), ``aether_invoke_attempts_total`` (label ``where``: ``local``,
``remote``), ``aether_invoke_retries_total``, ``aether_invoke_indeterminate_total``; the histogram
``aether_consensus_commit_latency_seconds``.

Naming follows the Prometheus conventions (base units, ``_total`` on counters, no counter that
repeats a histogram's ``_count``); `promtool check metrics` passes on the output (tests/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from aether.metrics.cluster import ClusterFigures
from aether.metrics.collector import BUCKET_BOUNDS, EntryMetrics
from aether.metrics.messages import InstanceCounters, NodeSample

# the invoker's counters (`ClusterFigures.invoke`): (name, help, label or "", {label value: counter})
_INVOKE_SERIES: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("aether_invoke_calls", "Calls to slices this node's invoker made (from its router and its slices), "
     "by outcome", "outcome", {"succeeded": "succeeded", "failed": "failed"}),
    ("aether_invoke_attempts", "Attempts of those calls, by where they ran",
     "where", {"local": "local_attempts", "remote": "remote_attempts"}),
    ("aether_invoke_retries", "Attempts after a call's first (another instance or node, after an error "
     "or an attempt timeout)", "", {"": "retries"}),
    ("aether_invoke_indeterminate", "Calls that ended IndeterminateOutcome (an entry that must not run "
     "twice may have run)", "", {"": "indeterminate"}),
)

__all__ = ["CONTENT_TYPE", "PrometheusExporter"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What `generate_latest` writes (prometheus_client's own HTTP server sends this by default too)."""


class MetricsSource(Protocol):
    """What the exporter reads (`MetricsService` fits). A source with an ``instance_counters()``
    method (`MetricsService.instance_counters`) gets the per-instance series too."""

    node_id: str
    entries: EntryMetrics
    sample: NodeSample


class _NodeCollector(Collector):
    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        src = self._source
        node = src.node_id
        sample = src.sample
        for name, doc, value in (
            ("aether_node_cpu_ratio", "CPU use of the node's process (1.0 = one core busy)",
             sample.cpu_percent / 100),
            ("aether_node_memory_rss_bytes", "Resident memory of the node's process", sample.rss_bytes),
            ("aether_node_uptime_seconds", "Seconds since the node started", sample.uptime),
            ("aether_node_loop_lag_seconds", "The node's event-loop lag: the largest of the last few seconds",
             sample.loop_lag_ms / 1000),
        ):
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([node], float(value))
            yield g
        yield from self._instances(node)
        yield from self._cluster(node)
        labels = ["node", "artifact", "entry"]
        ok = CounterMetricFamily("aether_entry_successes", "Entry-point calls that returned", labels=labels)
        failed = CounterMetricFamily(
            "aether_entry_failures", "Entry-point calls that failed (5xx: raised, bad answer)", labels=labels
        )
        client = CounterMetricFamily(
            "aether_entry_client_errors",
            "Entry-point calls answered with a 4xx (bad argument, NotFound, Conflict)",
            labels=labels,
        )
        blocked = CounterMetricFamily(
            "aether_entry_blocked",
            "Calls that blocked their slice's event loop past the limit (blocking code in an async entry)",
            labels=labels,
        )
        slow = CounterMetricFamily(
            "aether_entry_slow_calls", "Calls above the slow threshold", labels=[*labels, "threshold"]
        )
        hist = HistogramMetricFamily(
            "aether_entry_duration_seconds", "Duration of entry-point calls run on this node", labels=labels
        )
        for c in src.entries.counters():
            key = [node, c.artifact, c.entry]
            ok.add_metric(key, c.successes)
            failed.add_metric(key, c.failures)
            client.add_metric(key, c.client_errors)
            blocked.add_metric(key, c.blocked)
            slow.add_metric([*key, "fixed"], c.slow)
            slow.add_metric([*key, "adaptive"], c.slow_adaptive)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*BUCKET_BOUNDS, float("inf")), c.buckets, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric(key, buckets, c.total_seconds)
        yield from (ok, failed, client, blocked, slow, hist)


    def _cluster(self, node: str) -> Iterator[Metric]:
        read: Callable[[], ClusterFigures | None] | None = getattr(self._source, "cluster_figures", None)
        fig = read() if read is not None else None
        if fig is None:
            return
        for name, doc, value in (
            ("aether_cluster_members", "Members of the cluster's member set, as this node knows it",
             fig.members),
            ("aether_cluster_reachable_members", "Members this node reaches now, itself included",
             fig.reachable_members),
            ("aether_cluster_quorum", "1 when this node reaches a majority of the members (writes commit)",
             int(fig.quorum)),
            ("aether_cluster_leader", "1 on the node that leads (as it sees itself), else 0",
             int(fig.is_leader)),
            ("aether_consensus_applied_slot", "The last consensus slot this node applied", fig.applied_slot),
            ("aether_http_routes", "HTTP routes in this node's route table", fig.routes),
        ):
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([node], float(value))
            yield g
        for name, doc, value in (
            ("aether_cluster_leader_changes", "Changes of the leader this node sees, since it started",
             fig.leader_changes),
            ("aether_consensus_slots", "Consensus slots this node applied since it started (null slots too)",
             fig.slots),
            ("aether_consensus_null_slots", "Consensus slots decided empty, since this node started",
             fig.null_slots),
            ("aether_consensus_commands", "Commands in the consensus slots this node applied since start",
             fig.commands),
        ):
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric([node], float(value))
            yield c
        if fig.invoke:  # the calls this node's invoker made, their attempts and what came of them
            for name, doc, label, keys in _INVOKE_SERIES:
                if all(k in fig.invoke for k in keys.values()):
                    c = CounterMetricFamily(name, doc, labels=["node", label] if label else ["node"])
                    for tag, stat in keys.items():
                        c.add_metric([node, tag] if label else [node], float(fig.invoke[stat]))
                    yield c
        commit = HistogramMetricFamily(
            "aether_consensus_commit_latency_seconds",
            "Seconds from submitting commands on this node to their results (committed writes only)",
            labels=["node"],
        )
        commit.add_metric(
            [node], [("+Inf" if b == float("inf") else repr(b), n) for b, n in fig.commit_buckets],
            fig.commit_seconds,
        )
        yield commit
        slices = GaugeMetricFamily(
            "aether_slices", "Slices on this node per lifecycle state", labels=["node", "state"]
        )
        for state, n in sorted(fig.slices.items()):
            slices.add_metric([node, state], n)
        yield slices
        labels = ["node", "map"]
        parts = GaugeMetricFamily(
            "aether_map_partitions",
            "Partitions of a map this node holds, by role (primary, replica; syncing: taking over)",
            labels=[*labels, "role"],
        )
        entries = GaugeMetricFamily(
            "aether_map_entries", "Entries of a map stored on this node", labels=labels
        )
        size = GaugeMetricFamily(
            "aether_map_storage_bytes", "Bytes of a map's data stored on this node", labels=labels
        )
        pending = GaugeMetricFamily(
            "aether_map_replication_pending_acks",
            "Replication messages this node (as primary) sent and got no acknowledgement for yet",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "aether_map_replication_lag_seconds",
            "Age of the oldest write this node's replicas have not acknowledged (0: none pending)",
            labels=labels,
        )
        retries = CounterMetricFamily(
            "aether_map_op_retries",
            "Attempts of map operations of this node's callers after one that got no answer, by why "
            "(timeout: the primary did not answer in time; refused: not the primary, or the map "
            "unavailable there; unreachable: no primary known or reachable)",
            labels=[*labels, "reason"],
        )
        for m in fig.maps:
            key = [node, m.map]
            for reason, n in sorted(m.retries.items()):
                retries.add_metric([*key, reason], float(n))
            parts.add_metric([*key, "primary"], m.primary_partitions)
            parts.add_metric([*key, "replica"], m.replica_partitions)
            parts.add_metric([*key, "syncing"], m.syncing_partitions)
            entries.add_metric(key, m.entries)
            size.add_metric(key, m.bytes)
            pending.add_metric(key, m.pending_acks)
            lag.add_metric(key, m.replication_lag_seconds)
        yield from (parts, entries, size, pending, lag, retries)

    def _instances(self, node: str) -> Iterator[Metric]:
        read: Callable[[], list[InstanceCounters]] | None = getattr(self._source, "instance_counters", None)
        if read is None:
            return
        labels = ["node", "artifact", "instance"]
        in_flight = GaugeMetricFamily(
            "aether_instance_in_flight", "Calls a slice instance runs now", labels=labels
        )
        queued = GaugeMetricFamily(
            "aether_instance_queued", "Calls waiting for a slot of a slice instance (max_concurrency)",
            labels=labels,
        )
        rejected = CounterMetricFamily(
            "aether_instance_rejected",
            "Calls a slice instance refused because its queue was full (503), since it started",
            labels=labels,
        )
        for c in read():
            key = [node, c.artifact, str(c.instance)]
            in_flight.add_metric(key, c.in_flight)
            queued.add_metric(key, c.queued)
            rejected.add_metric(key, c.rejected)
        yield from (in_flight, queued, rejected)


class PrometheusExporter:
    """A per-node registry with the node's collector and a process collector; `render()` is the
    text exposition."""

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_NodeCollector(source))
        ProcessCollector(registry=self.registry)  # registers itself in this registry only

    def render(self) -> bytes:
        return generate_latest(self.registry)
