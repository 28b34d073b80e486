"""`MetricsAggregator`: merges the nodes' `NodeMetricsUpdate`s into `ClusterMetricsSnapshot`s.

Sans-IO: every method takes the times it needs (`now`: a monotonic clock of the caller, for
expiry; `wall`: Unix time, for the window's points); nothing here sleeps, sends or reads a clock.

One aggregator per node, in either role:

- on the leader, `update()` takes every node's update (its own too) and `tick()` once a second
  makes the snapshot to broadcast and appends a point to the window;
- on the other nodes, `update()` takes only the node's own update (so `compute()` is the node's
  local view before any snapshot arrived) and `ingest_snapshot()` copies the points of each
  received snapshot into the window, so the window survives a change of leader: the new leader
  simply keeps ticking on the window it has mirrored ("a new leader continues from the last
  snapshot").

Rates come from cumulative counters: the difference to the node's previous update divided by the
difference of its uptimes (so a lost update only lengthens the interval). A node's first update is
the baseline (rate 0); an update of a new incarnation (the node restarted) counts everything as
new since the restart; an update older than the last one taken is dropped. Nodes not heard from
for more than `expiry` seconds are dropped.

Slice instances (issue 15): each update carries its node's instances' gauges and cumulative
counters (`InstanceCounters`); their rates come the same way, and an instance whose ``started``
changed (it restarted) or that is new counts everything as new. Per node the aggregator also keeps
the last interval's latency-bucket deltas of every entry, so `slice_loads` can give an artifact's
p95 over the last interval (not since the nodes started, as the entries' percentiles are).
`instance_stats(now)` and `slice_loads(now)` are the controller's inputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from aether.metrics.collector import BUCKET_BOUNDS, quantile
from aether.metrics.messages import (
    ClusterMetricsSnapshot,
    ClusterPoint,
    ClusterTotals,
    EntryCounters,
    EntryStats,
    InstanceCounters,
    InstanceStats,
    NodeMetricsUpdate,
    NodeSample,
    NodeStats,
    SliceLoad,
)

__all__ = ["BROADCAST_POINTS", "DEFAULT_EXPIRY", "WINDOW_POINTS", "MetricsAggregator"]

WINDOW_POINTS = 7200  # 2 hours of one-second points
BROADCAST_POINTS = 60  # points carried by each snapshot
DEFAULT_EXPIRY = 5.0

_NBUCKETS = len(BUCKET_BOUNDS) + 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass(frozen=True, slots=True)
class _InstanceRates:
    """One instance over its node's last interval."""

    arrivals: float  # per second
    calls: float
    failures: float
    rejected: float
    dcalls: int  # calls that finished in the interval
    dbusy: float  # their execution time (seconds)


_NO_RATES = _InstanceRates(0.0, 0.0, 0.0, 0.0, 0, 0.0)


@dataclass(slots=True)
class _LoadSum:
    """One artifact's instances summed (`MetricsAggregator.slice_loads`)."""

    instances: int = 0
    in_flight: int = 0
    queued: int = 0
    arrivals: float = 0.0
    calls: float = 0.0
    failures: float = 0.0
    rejected: float = 0.0
    dcalls: int = 0
    dbusy: float = 0.0
    nodes: set[str] = field(default_factory=set)


@dataclass
class _Node:
    incarnation: int
    seq: int
    last_seen: float
    sample: NodeSample
    entries: dict[tuple[str, str], EntryCounters]
    rates: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    instances: dict[tuple[str, int], InstanceCounters] = field(default_factory=dict)
    irates: dict[tuple[str, int], _InstanceRates] = field(default_factory=dict)
    # the latency buckets of the calls of each entry that finished in the last interval
    interval: dict[tuple[str, str], list[int]] = field(default_factory=dict)


def _instance_rates(c: InstanceCounters, old: InstanceCounters | None, dt: float) -> _InstanceRates:
    """`c`'s rates over `dt` seconds since `old` (None, a restart or counters gone back: since 0)."""
    if old is None or old.started != c.started or c.admitted < old.admitted or c.calls < old.calls:
        da, dc, df, dr, db = c.admitted, c.calls, c.failures, c.rejected, c.busy_seconds
    else:
        da, dc = c.admitted - old.admitted, c.calls - old.calls
        df, dr = c.failures - old.failures, c.rejected - old.rejected
        db = c.busy_seconds - old.busy_seconds
    if dt <= 0:
        return _NO_RATES
    return _InstanceRates(da / dt, dc / dt, max(df, 0) / dt, max(dr, 0) / dt, max(dc, 0), max(db, 0.0))


class _Merge:
    """One entry's counters summed over the nodes."""

    __slots__ = (
        "blocked", "buckets", "calls", "client_errors", "failures", "frate", "nodes", "rate", "slow",
        "slow_adaptive", "total",
    )  # fmt: skip

    def __init__(self) -> None:
        self.calls = self.failures = self.client_errors = self.slow = self.slow_adaptive = 0
        self.blocked = 0
        self.total = self.rate = self.frate = 0.0
        self.buckets = [0] * _NBUCKETS
        self.nodes: list[str] = []

    def add(self, node_id: str, e: EntryCounters, rate: float, frate: float) -> None:
        self.calls += e.calls
        self.failures += e.failures
        self.client_errors += e.client_errors
        self.blocked += e.blocked
        self.total += e.total_seconds
        self.slow += e.slow
        self.slow_adaptive += e.slow_adaptive
        self.rate += rate
        self.frate += frate
        for i, n in enumerate(e.buckets):
            self.buckets[i] += n
        self.nodes.append(node_id)


class MetricsAggregator:
    """Latest update per node -> cluster snapshots, plus the bounded window of per-second points."""

    def __init__(
        self,
        node_id: str,
        *,
        expiry: float = DEFAULT_EXPIRY,
        window_points: int = WINDOW_POINTS,
        broadcast_points: int = BROADCAST_POINTS,
    ) -> None:
        if expiry <= 0 or window_points < 1 or broadcast_points < 0:
            raise ValueError("need expiry > 0, window_points >= 1 and broadcast_points >= 0")
        self.node_id = node_id
        self.expiry = expiry
        self.broadcast_points = broadcast_points
        self.window: deque[ClusterPoint] = deque(maxlen=window_points)
        self.seq = 0
        self._nodes: dict[str, _Node] = {}
        self._interval = [0] * _NBUCKETS  # latency buckets of calls learned since the last tick

    # --- input ----------------------------------------------------------------------------------

    def update(self, msg: NodeMetricsUpdate, now: float) -> bool:
        """Take a node's update; False if it was dropped (older than one already taken)."""
        prev = self._nodes.get(msg.node_id)
        entries = {(e.artifact, e.entry): e for e in msg.entries}
        for e in msg.entries:
            if len(e.buckets) != _NBUCKETS:
                raise ValueError(
                    f"update from {msg.node_id}: {e.artifact}.{e.entry} has {len(e.buckets)} buckets, "
                    f"expected {_NBUCKETS}"
                )
        instances = {(c.artifact, c.instance): c for c in msg.instances}
        node = _Node(msg.incarnation, msg.seq, now, msg.sample, entries, instances=instances)
        if prev is None:  # baseline: no interval known yet
            self._nodes[msg.node_id] = node
            return True
        restarted = msg.incarnation != prev.incarnation
        if not restarted and msg.seq <= prev.seq:
            return False
        dt = msg.sample.uptime if restarted else msg.sample.uptime - prev.sample.uptime
        interval = self._interval
        for key, e in entries.items():
            old = None if restarted else prev.entries.get(key)
            if old is None or e.calls < old.calls:
                dcalls, dfail, dbuckets = e.calls, e.failures, e.buckets
            else:
                dcalls, dfail = e.calls - old.calls, e.failures - old.failures
                dbuckets = [a - b for a, b in zip(e.buckets, old.buckets, strict=True)]
            for i, n in enumerate(dbuckets):
                if n > 0:
                    interval[i] += n
            if dcalls > 0:
                node.interval[key] = [max(n, 0) for n in dbuckets]
            node.rates[key] = (dcalls / dt, max(dfail, 0) / dt) if dt > 0 else (0.0, 0.0)
        for ikey, c in instances.items():
            node.irates[ikey] = _instance_rates(c, None if restarted else prev.instances.get(ikey), dt)
        self._nodes[msg.node_id] = node
        return True

    def ingest_snapshot(self, snap: ClusterMetricsSnapshot) -> None:
        """Mirror a received snapshot's window (points newer than the last one kept) and its seq."""
        last = self.window[-1].time if self.window else float("-inf")
        for p in snap.window:
            if p.time > last:
                self.window.append(p)
                last = p.time
        self.seq = max(self.seq, snap.seq)
        self._interval = [0] * _NBUCKETS  # calls seen as a follower belong to the other leader's points

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    @property
    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    # --- output ---------------------------------------------------------------------------------

    def expire(self, now: float) -> list[str]:
        """Drop the nodes not heard from for more than `expiry` seconds; returns their ids."""
        gone = [n for n, s in self._nodes.items() if now - s.last_seen > self.expiry]
        for n in gone:
            del self._nodes[n]
        return gone

    def compute(self, now: float, wall: float) -> ClusterMetricsSnapshot:
        """The current cluster view (expiring silent nodes first); does not touch the window."""
        self.expire(now)
        merged: dict[tuple[str, str], _Merge] = {}
        node_stats: list[NodeStats] = []
        for node_id in sorted(self._nodes):
            s = self._nodes[node_id]
            node_calls = 0
            node_rate = 0.0
            for key, e in s.entries.items():
                rate, frate = s.rates.get(key, (0.0, 0.0))
                node_calls += e.calls
                node_rate += rate
                m = merged.get(key)
                if m is None:
                    m = merged[key] = _Merge()
                m.add(node_id, e, rate, frate)
            node_stats.append(
                NodeStats(
                    node_id=node_id,
                    cpu_percent=s.sample.cpu_percent,
                    rss_bytes=s.sample.rss_bytes,
                    uptime=s.sample.uptime,
                    age=round(max(0.0, now - s.last_seen), 3),
                    calls=node_calls,
                    calls_per_s=round(node_rate, 3),
                    loop_lag_ms=s.sample.loop_lag_ms,
                )
            )
        entries = [
            EntryStats(
                artifact=artifact,
                entry=entry,
                calls=m.calls,
                successes=m.calls - m.failures - m.client_errors,
                failures=m.failures,
                calls_per_s=round(m.rate, 3),
                failures_per_s=round(m.frate, 3),
                mean_ms=_ms(m.total / m.calls) if m.calls else None,
                p50_ms=_ms(quantile(0.5, m.buckets)),
                p95_ms=_ms(quantile(0.95, m.buckets)),
                p99_ms=_ms(quantile(0.99, m.buckets)),
                slow=m.slow,
                slow_adaptive=m.slow_adaptive,
                nodes=m.nodes,
                client_errors=m.client_errors,
                blocked=m.blocked,
            )
            for (artifact, entry), m in sorted(merged.items())
        ]
        n = len(node_stats)
        totals = ClusterTotals(
            calls=sum(e.calls for e in entries),
            successes=sum(e.successes for e in entries),
            failures=sum(e.failures for e in entries),
            calls_per_s=round(sum(e.calls_per_s for e in entries), 3),
            failures_per_s=round(sum(e.failures_per_s for e in entries), 3),
            slow=sum(e.slow for e in entries),
            nodes=n,
            cpu_percent=round(sum(s.cpu_percent for s in node_stats) / n, 2) if n else 0.0,
            rss_bytes=sum(s.rss_bytes for s in node_stats),
            client_errors=sum(e.client_errors for e in entries),
        )
        tail = list(self.window)[-self.broadcast_points :] if self.broadcast_points else []
        return ClusterMetricsSnapshot(
            self.node_id, self.seq, wall, node_stats, entries, totals, tail, self._instance_stats()
        )

    def tick(self, now: float, wall: float) -> ClusterMetricsSnapshot:
        """Leader, once a second: append this second's point to the window and return the snapshot
        to broadcast (its window ends with that point)."""
        view = self.compute(now, wall)
        t = view.totals
        point = ClusterPoint(
            time=wall,
            calls_per_s=t.calls_per_s,
            failures_per_s=t.failures_per_s,
            p50_ms=_ms(quantile(0.5, self._interval)),
            p99_ms=_ms(quantile(0.99, self._interval)),
            nodes=t.nodes,
            cpu_percent=t.cpu_percent,
            rss_bytes=t.rss_bytes,
        )
        if self.window and self.window[-1].time >= wall:  # clocks stepped back: keep the window ordered
            self.window.clear()
        self.window.append(point)
        self._interval = [0] * _NBUCKETS
        self.seq += 1
        tail = list(self.window)[-self.broadcast_points :] if self.broadcast_points else []
        return ClusterMetricsSnapshot(
            self.node_id, self.seq, wall, view.nodes, view.entries, t, tail, view.instances
        )

    def instance_stats(self, now: float) -> list[InstanceStats]:
        """Every slice instance the live nodes report (silent nodes expired first), with its gauges
        and the rates of its node's last interval, sorted by (artifact, node, instance)."""
        self.expire(now)
        return self._instance_stats()

    def _instance_stats(self) -> list[InstanceStats]:
        out: list[InstanceStats] = []
        for node_id, s in self._nodes.items():
            for key, c in s.instances.items():
                r = s.irates.get(key, _NO_RATES)
                out.append(InstanceStats(
                    node_id=node_id, artifact=c.artifact, instance=c.instance, in_flight=c.in_flight,
                    queued=c.queued, arrivals_per_s=round(r.arrivals, 3), calls_per_s=round(r.calls, 3),
                    failures_per_s=round(r.failures, 3), rejected_per_s=round(r.rejected, 3),
                    exec_ms=_ms(r.dbusy / r.dcalls) if r.dcalls else None, calls=c.calls,
                    failures=c.failures, healthy=c.healthy, health_failures=c.health_failures,
                    health_reason=c.health_reason, admitted=c.admitted, rejected=c.rejected,
                ))  # fmt: skip
        out.sort(key=lambda x: (x.artifact, x.node_id, x.instance))
        return out

    def slice_loads(self, now: float) -> dict[str, SliceLoad]:
        """Each artifact's load summed over its reporting instances (silent nodes expired first):
        in-flight and queued calls, arrival/call/failure/rejection rates, the mean execution time
        and the p95 latency of the calls that finished in the nodes' last interval, and the mean
        CPU of the nodes hosting an instance. Keyed by artifact coordinates."""
        self.expire(now)

        sums: dict[str, _LoadSum] = {}
        for node_id, s in self._nodes.items():
            for key, c in s.instances.items():
                m = sums.get(c.artifact)
                if m is None:
                    m = sums[c.artifact] = _LoadSum()
                r = s.irates.get(key, _NO_RATES)
                m.instances += 1
                m.in_flight += c.in_flight
                m.queued += c.queued
                m.arrivals += r.arrivals
                m.calls += r.calls
                m.failures += r.failures
                m.rejected += r.rejected
                m.dcalls += r.dcalls
                m.dbusy += r.dbusy
                m.nodes.add(node_id)
        out: dict[str, SliceLoad] = {}
        for artifact in sorted(sums):
            m = sums[artifact]
            buckets = [0] * _NBUCKETS
            for s in self._nodes.values():
                for (a, _entry), b in s.interval.items():
                    if a == artifact:
                        for i, n in enumerate(b):
                            buckets[i] += n
            cpus = [self._nodes[n].sample.cpu_percent for n in sorted(m.nodes)]
            out[artifact] = SliceLoad(
                artifact=artifact, instances=m.instances, in_flight=m.in_flight, queued=m.queued,
                arrivals_per_s=round(m.arrivals, 3), calls_per_s=round(m.calls, 3),
                failures_per_s=round(m.failures, 3), rejected_per_s=round(m.rejected, 3),
                exec_ms=_ms(m.dbusy / m.dcalls) if m.dcalls else None,
                p95_ms=_ms(quantile(0.95, buckets)),
                cpu_percent=round(sum(cpus) / len(cpus), 2) if cpus else None,
            )  # fmt: skip
        return out

    def artifact_counters(self, artifact: str, now: float) -> dict[str, tuple[int, int, int, list[int]]]:
        """One artifact's (full coordinates) cumulative counters per node, its entries summed:
        ``{node: (incarnation, calls, failures, latency buckets)}`` (silent nodes expired first).
        What a rollout's health gates diff between two readings (`aether.deploy.rollout`)."""
        self.expire(now)
        out: dict[str, tuple[int, int, int, list[int]]] = {}
        for node_id, s in self._nodes.items():
            calls = failures = 0
            buckets = [0] * _NBUCKETS
            found = False
            for (a, _entry), e in s.entries.items():
                if a != artifact:
                    continue
                found = True
                calls += e.calls
                failures += e.failures
                for i, n in enumerate(e.buckets):
                    buckets[i] += n
            if found:
                out[node_id] = (s.incarnation, calls, failures, buckets)
        return out

    def history(self, seconds: float, wall: float) -> list[ClusterPoint]:
        """The window's points of the last `seconds` seconds before `wall`, oldest first."""
        since = wall - seconds
        out: list[ClusterPoint] = []
        for p in reversed(self.window):
            if p.time < since:
                break
            out.append(p)
        out.reverse()
        return out
