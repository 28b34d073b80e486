"""`MetricsService`: the asyncio adapter of one node's metrics (the only part that does I/O).

Once a second (`interval`) it samples the process with psutil (CPU %, RSS) and the node's event-loop
lag (the `loop_lag` callable), takes the node's cumulative entry counters from `EntryMetrics` and
its slice instances' counters (the `instances` callable: the node converts the slice runtime's),
and

- on every node: feeds that `NodeMetricsUpdate` to its own `MetricsAggregator` (the local view);
- on a non-leader: sends it to the leader (`transport.send(leader, update)`);
- on the leader: `tick()`s the aggregator and sends the resulting `ClusterMetricsSnapshot` to every
  peer that is up (no consensus traffic; a lost message is repaired by the next second's).

`on_message(sender, msg)` takes the peer messages of this package: updates (aggregated only while
this node leads) and snapshots (kept as the latest cluster view; their window points are mirrored,
so a node that becomes leader continues the window). The transport and the leader are reached
through the small Protocols below. Several services may run in one process (no module state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import msgspec
import psutil

from aether.core.periodic import run_every
from aether.metrics.aggregator import DEFAULT_EXPIRY, MetricsAggregator
from aether.metrics.cluster import ClusterFigures
from aether.metrics.collector import DEFAULT_SLOW_THRESHOLD, EntryMetrics
from aether.metrics.messages import (
    ClusterMetricsSnapshot,
    ClusterPoint,
    ClusterTotals,
    EntryStats,
    InstanceCounters,
    InstanceStats,
    NodeMetricsUpdate,
    NodeSample,
    NodeStats,
)

__all__ = ["HISTORY_MAX_SECONDS", "LeaderView", "MetricsService", "MetricsView", "PeerLink"]

HISTORY_MAX_SECONDS = 7200


class PeerLink(Protocol):
    """The node-to-node transport (`aether.transport.Transport` fits)."""

    def send(self, peer: str, msg: object) -> bool: ...

    @property
    def up_peers(self) -> frozenset[str]: ...


class LeaderView(Protocol):
    """Who leads (`aether.cluster.leader.LeaderManager` fits)."""

    @property
    def leader(self) -> str | None: ...


class MetricsView(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/metrics`: the cluster as the answering node knows it."""

    node_id: str
    """The node that answered."""
    leader: str | None
    """The leader as the answering node sees it now."""
    source: Literal["leader", "local"]
    """``leader``: the latest snapshot the leader broadcast (or made, on the leader itself);
    ``local``: the answering node's own figures only (no snapshot yet, or the last one is stale)."""
    note: str | None
    """Why the view is ``local``; null otherwise."""
    snapshot_seq: int
    snapshot_time: float
    """Wall-clock time the snapshot was made (Unix seconds)."""
    snapshot_age: float
    """Seconds since this node received (or made) the snapshot."""
    nodes: list[NodeStats]
    entries: list[EntryStats]
    totals: ClusterTotals
    instances: list[InstanceStats] = []
    """Every slice instance: calls in flight and queued, rates of the last interval, health."""


class MetricsHistory(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/metrics/history?seconds=N`."""

    node_id: str
    leader: str | None
    seconds: float
    points: list[ClusterPoint]


class MetricsService:
    """One node's metrics: the collector, the aggregator, the one-second loop and the latest view.

    `instances()` gives the node's slice instances' counters for each update (their ``started`` on
    this service's uptime clock: `uptime_of`); `loop_lag()` the node's event-loop lag in seconds
    (`aether.node.looplag.LoopLagProbe.max_recent`); `cluster()` the node's view of the cluster
    for the Prometheus exposition (`ClusterFigures`, read at scrape time). All are optional.
    """

    def __init__(
        self,
        node_id: str,
        transport: PeerLink,
        leader: LeaderView,
        *,
        interval: float = 1.0,
        expiry: float = DEFAULT_EXPIRY,
        slow_threshold: float = DEFAULT_SLOW_THRESHOLD,
        thresholds: Mapping[str, float] | None = None,
        logger: logging.Logger | None = None,
        instances: Callable[[], list[InstanceCounters]] | None = None,
        loop_lag: Callable[[], float] | None = None,
        cluster: Callable[[], ClusterFigures] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be a positive number of seconds")
        self.node_id = node_id
        self.interval = interval
        self.entries = EntryMetrics(slow_threshold=slow_threshold, thresholds=thresholds)
        self.aggregator = MetricsAggregator(node_id, expiry=expiry)
        self._transport = transport
        self._leader = leader
        self.instances = instances
        self.loop_lag = loop_lag
        self.cluster = cluster
        self._log = logger or logging.getLogger(f"aether.metrics.{node_id}")
        self._process = psutil.Process(os.getpid())
        self._started = time.monotonic()
        self._seq = 0
        self._incarnation = time.time_ns() // 1_000_000
        self.sample = NodeSample(0.0, 0, 0.0)
        self.latest: ClusterMetricsSnapshot | None = None
        self._latest_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the one-second loop (on the running event loop)."""
        if self._task is not None:
            return
        self._started = time.monotonic()
        self._process.cpu_percent(None)  # the first reading only starts the measurement
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"aether-metrics-{self.node_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await run_every(self.interval, self.step, self._log, f"metrics step on {self.node_id}")

    # --- one second -----------------------------------------------------------------------------

    def uptime_of(self, monotonic: float) -> float:
        """`monotonic` (a `time.monotonic()` reading) on the uptime clock of the samples."""
        return round(monotonic - self._started, 3)

    def take_sample(self) -> NodeSample:
        try:
            cpu = float(self._process.cpu_percent(None))
            rss = int(self._process.memory_info().rss)
        except psutil.Error as e:  # cannot happen for our own process, but keep the loop alive
            self._log.warning("cannot sample the process: %s", e)
            cpu, rss = self.sample.cpu_percent, self.sample.rss_bytes
        lag = 0.0
        if self.loop_lag is not None:
            try:
                lag = round(float(self.loop_lag()) * 1000, 3)
            except Exception:
                self._log.exception("reading the loop lag failed")
        self.sample = NodeSample(round(cpu, 2), rss, round(time.monotonic() - self._started, 3), lag)
        return self.sample

    def instance_counters(self) -> list[InstanceCounters]:
        """The node's slice instances' counters now (the `instances` callable; none without one)."""
        if self.instances is None:
            return []
        try:
            return self.instances()
        except Exception:
            self._log.exception("reading the instance counters failed")
            return []

    def cluster_figures(self) -> ClusterFigures | None:
        """The node's view of the cluster now (the `cluster` callable; None without one or when
        reading it failed, which is logged)."""
        if self.cluster is None:
            return None
        try:
            return self.cluster()
        except Exception:
            self._log.exception("reading the cluster figures failed")
            return None

    def make_update(self) -> NodeMetricsUpdate:
        self._seq += 1
        return NodeMetricsUpdate(
            self.node_id, self._incarnation, self._seq, self.take_sample(), self.entries.counters(),
            self.instance_counters(),
        )

    def step(self) -> None:
        """One round: sample, update the local aggregator, push to the leader or (as leader) tick
        and broadcast."""
        now = time.monotonic()
        update = self.make_update()
        self.aggregator.update(update, now)
        leader = self._leader.leader
        if leader is None:
            return
        if leader != self.node_id:
            self._transport.send(leader, update)
            return
        snap = self.aggregator.tick(now, time.time())
        self.latest, self._latest_at = snap, now
        for peer in sorted(self._transport.up_peers):
            self._transport.send(peer, snap)

    def on_message(self, sender: str, msg: object) -> None:
        """A metrics peer message from `sender` (from the transport's on_message)."""
        if isinstance(msg, NodeMetricsUpdate):
            if msg.node_id != sender:
                self._log.warning(
                    "metrics update claiming to be from %s arrived from %s; dropped", msg.node_id, sender
                )
                return
            if self._leader.leader != self.node_id:
                self._log.debug("metrics update from %s dropped: %s does not lead", sender, self.node_id)
                return
            try:
                self.aggregator.update(msg, time.monotonic())
            except ValueError as e:
                self._log.warning("bad metrics update from %s dropped: %s", sender, e)
        elif isinstance(msg, ClusterMetricsSnapshot):
            if self._leader.leader == self.node_id:
                self._log.debug("metrics snapshot from %s ignored: %s leads", sender, self.node_id)
                return
            if msg.leader != sender:
                self._log.warning("metrics snapshot of %s arrived from %s; dropped", msg.leader, sender)
                return
            self.aggregator.ingest_snapshot(msg)
            self.latest, self._latest_at = msg, time.monotonic()
        else:
            self._log.warning("unexpected %s from %s dropped", type(msg).__name__, sender)

    # --- views ----------------------------------------------------------------------------------

    def view(self) -> MetricsView:
        """The latest cluster snapshot, or this node's own figures when there is none (or it is
        older than the expiry: the leader went silent)."""
        now = time.monotonic()
        snap = self.latest
        note: str | None = None
        age = now - self._latest_at
        if snap is None:
            note = "no cluster snapshot received yet: this node's own figures only"
        elif age > self.aggregator.expiry:
            note = f"the last cluster snapshot is {age:.1f} s old: this node's own figures only"
        if note is not None:
            if self.node_id not in self.aggregator.node_ids:  # the loop has not run yet
                self.aggregator.update(self.make_update(), now)
            local = self.aggregator.compute(now, time.time())
            return MetricsView(
                self.node_id, self._leader.leader, "local", note, local.seq, local.time, 0.0,
                local.nodes, local.entries, local.totals, self.aggregator.instance_stats(now),
            )  # fmt: skip
        assert snap is not None
        return MetricsView(
            self.node_id, self._leader.leader, "leader", None, snap.seq, snap.time, round(age, 3),
            snap.nodes, snap.entries, snap.totals, snap.instances,
        )  # fmt: skip

    def history(self, seconds: float) -> MetricsHistory:
        """The window's points of the last `seconds` (1..7200) seconds, from this node's copy."""
        if not 0 < seconds <= HISTORY_MAX_SECONDS:
            raise ValueError(f"seconds must be more than 0 and at most {HISTORY_MAX_SECONDS}")
        return MetricsHistory(
            self.node_id, self._leader.leader, seconds, self.aggregator.history(seconds, time.time())
        )
