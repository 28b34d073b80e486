"""Unit tests of the sans-IO metrics core: collector, quantiles, aggregator, window, Prometheus."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from aether.core.artifact import Artifact
from aether.metrics import (
    ADAPTIVE_MIN_CALLS,
    BUCKET_BOUNDS,
    ClusterMetricsSnapshot,
    EntryCounters,
    EntryMetrics,
    InstanceCounters,
    MetricsAggregator,
    MetricsMessage,
    NodeMetricsUpdate,
    NodeSample,
    quantile,
)
from aether.metrics.prometheus import PrometheusExporter

HELLO = Artifact.parse("org.example:hello:0.1.0")
NB = len(BUCKET_BOUNDS) + 1


# --- collector --------------------------------------------------------------------------------------


def test_record_counts_calls_successes_failures_and_buckets() -> None:
    m = EntryMetrics()
    m.record(HELLO, "greet", 0.0004, True)  # first bucket (<= 0.5 ms)
    m.record(HELLO, "greet", 0.0005, True)  # bounds are inclusive
    m.record(HELLO, "greet", 0.003, False)  # (2.5 ms, 5 ms]
    m.record(HELLO, "greet", 30.0, True)  # overflow
    (c,) = m.counters()
    assert (c.artifact, c.entry) == ("org.example:hello:0.1.0", "greet")
    assert (c.calls, c.successes, c.failures) == (4, 3, 1)
    assert c.total_seconds == pytest.approx(30.0039)
    assert c.buckets[0] == 2 and c.buckets[3] == 1 and c.buckets[-1] == 1 and sum(c.buckets) == 4
    assert c.slow == 1  # only the 30 s call is above 100 ms


def test_entries_are_kept_apart_and_sorted() -> None:
    m = EntryMetrics()
    m.record("b:x:1.0.0", "z", 0.001, True)
    m.record(HELLO, "greet", 0.001, True)
    m.record(HELLO, "age", 0.001, True)
    assert [(c.artifact, c.entry) for c in m.counters()] == [
        ("b:x:1.0.0", "z"), ("org.example:hello:0.1.0", "age"), ("org.example:hello:0.1.0", "greet"),
    ]  # fmt: skip


def test_per_entry_threshold_and_adaptive_slow_calls() -> None:
    m = EntryMetrics(slow_threshold=1.0, thresholds={"org.example:hello.greet": 0.01})
    for _ in range(ADAPTIVE_MIN_CALLS + 5):
        m.record(HELLO, "greet", 0.002, True)
        m.record(HELLO, "other", 0.002, True)
    m.record(HELLO, "greet", 0.05, True)  # > 10 ms per-entry threshold and > 3x the 2 ms average
    m.record(HELLO, "other", 0.05, True)  # < 1 s default, but > 3x its average
    by = {c.entry: c for c in m.counters()}
    assert (by["greet"].slow, by["greet"].slow_adaptive) == (1, 1)
    assert (by["other"].slow, by["other"].slow_adaptive) == (0, 1)


def test_adaptive_needs_warm_up() -> None:
    m = EntryMetrics()
    m.record(HELLO, "greet", 0.001, True)
    m.record(HELLO, "greet", 0.05, True)
    assert m.counters()[0].slow_adaptive == 0


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        EntryMetrics(slow_threshold=0)
    with pytest.raises(ValueError, match="greet"):
        EntryMetrics(thresholds={"greet": -1})


def test_quantiles_interpolate_inside_buckets() -> None:
    b = [0] * NB
    assert quantile(0.5, b) is None
    b[1] = 100  # (0.5 ms, 1 ms]
    assert quantile(0.5, b) == pytest.approx(0.00075)
    b = [0] * NB
    b[0], b[7] = 90, 10  # 90 calls <= 0.5 ms, 10 calls in (50 ms, 100 ms]
    assert quantile(0.5, b) == pytest.approx(0.0005 * 50 / 90)
    assert quantile(0.95, b) == pytest.approx(0.05 + 0.05 * 0.5)
    assert quantile(0.99, b) == pytest.approx(0.05 + 0.05 * 0.9)
    b[-1] = 1000
    assert quantile(0.99, b) == BUCKET_BOUNDS[-1]
    with pytest.raises(ValueError):
        quantile(1.0, b)
    with pytest.raises(ValueError):
        quantile(0.5, [1, 2])


# --- aggregator -------------------------------------------------------------------------------------


def counters(calls: int, failures: int = 0, bucket: int = 2, entry: str = "greet") -> EntryCounters:
    b = [0] * NB
    b[bucket] = calls
    return EntryCounters(str(HELLO), entry, calls, calls - failures, failures, calls * 0.002, b, 0, 0)


def upd(node: str, seq: int, uptime: float, *entries: EntryCounters, run: int = 1) -> NodeMetricsUpdate:
    return NodeMetricsUpdate(node, run, seq, NodeSample(10.0, 1000, uptime), list(entries))


def test_rates_come_from_cumulative_counters() -> None:
    agg = MetricsAggregator("n1")
    agg.update(upd("n1", 1, 10.0, counters(100)), now=0.0)
    agg.update(upd("n2", 1, 20.0, counters(50, 5)), now=0.0)
    snap = agg.compute(now=0.5, wall=1000.0)
    assert snap.entries[0].calls == 150 and snap.entries[0].calls_per_s == 0  # baselines only
    agg.update(upd("n1", 2, 11.0, counters(130)), now=1.0)
    agg.update(upd("n2", 3, 22.0, counters(90, 9)), now=1.0)  # seq 2 was lost: a 2 s interval
    snap = agg.compute(now=1.0, wall=1001.0)
    (e,) = snap.entries
    assert (e.calls, e.failures, e.successes) == (220, 9, 211)
    assert e.calls_per_s == pytest.approx(30 + 20)
    assert e.failures_per_s == pytest.approx(2)
    assert e.nodes == ["n1", "n2"]
    assert e.p50_ms is not None and 1.0 < e.p50_ms <= 2.5  # bucket (1 ms, 2.5 ms]
    assert snap.totals.calls == 220 and snap.totals.nodes == 2 and snap.totals.rss_bytes == 2000
    assert {n.node_id: n.calls_per_s for n in snap.nodes} == {"n1": 30.0, "n2": 20.0}


def test_stale_and_duplicate_updates_are_dropped_and_restarts_rebase() -> None:
    agg = MetricsAggregator("n1")
    assert agg.update(upd("n2", 5, 50.0, counters(500)), now=0.0)
    assert not agg.update(upd("n2", 4, 49.0, counters(490)), now=0.1)  # older
    assert agg.update(upd("n2", 1, 2.0, counters(10), run=2), now=1.0)  # restarted: a new incarnation
    (e,) = agg.compute(now=1.0, wall=1.0).entries
    assert e.calls == 10 and e.calls_per_s == pytest.approx(5.0)  # 10 calls in its 2 s of life


def test_silent_nodes_expire() -> None:
    agg = MetricsAggregator("n1", expiry=5.0)
    agg.update(upd("n1", 1, 1.0, counters(1)), now=0.0)
    agg.update(upd("n2", 1, 1.0, counters(2)), now=3.0)
    assert [n.node_id for n in agg.compute(now=5.0, wall=5.0).nodes] == ["n1", "n2"]
    snap = agg.compute(now=6.0, wall=6.0)
    assert [n.node_id for n in snap.nodes] == ["n2"] and snap.totals.calls == 2
    assert agg.node_ids == ["n2"]


def test_bad_bucket_count_is_a_clear_error() -> None:
    agg = MetricsAggregator("n1")
    bad = EntryCounters(str(HELLO), "greet", 1, 1, 0, 0.1, [1], 0, 0)
    with pytest.raises(ValueError, match="buckets"):
        agg.update(upd("n2", 1, 1.0, bad), now=0.0)


def test_window_is_capped_and_history_selects_by_time() -> None:
    agg = MetricsAggregator("n1", window_points=100, broadcast_points=10)
    for i in range(250):
        agg.update(upd("n1", i + 1, float(i), counters(10 * i)), now=float(i))
        snap = agg.tick(now=float(i), wall=1000.0 + i)
    assert len(agg.window) == 100
    assert agg.window[0].time == 1150.0 and agg.window[-1].time == 1249.0
    assert len(snap.window) == 10 and snap.window[-1].time == 1249.0 and snap.seq == 250
    assert snap.window[-1].calls_per_s == pytest.approx(10.0)
    assert snap.window[-1].p50_ms is not None
    assert [p.time for p in agg.history(3, wall=1249.5)] == [1247.0, 1248.0, 1249.0]
    assert len(agg.history(7200, wall=1249.5)) == 100


def test_default_window_is_two_hours() -> None:
    agg = MetricsAggregator("n1")
    for i in range(7300):
        agg.tick(now=float(i), wall=float(i))
    assert len(agg.window) == 7200 and agg.window[0].time == 100.0


def test_a_new_leader_continues_the_window_from_the_snapshots() -> None:
    old = MetricsAggregator("n1")
    new = MetricsAggregator("n2")
    for i in range(100):
        old.update(upd("n1", i + 1, float(i), counters(i)), now=float(i))
        snap = old.tick(now=float(i), wall=500.0 + i)
        wire = msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=MetricsMessage)
        assert isinstance(wire, ClusterMetricsSnapshot)
        new.ingest_snapshot(wire)
    assert [p.time for p in new.window] == [500.0 + i for i in range(100)]
    # n1 is gone; n2 leads: its window and sequence continue
    snap = new.tick(now=200.0, wall=600.0)
    assert snap.leader == "n2" and snap.seq == 101
    assert len(new.window) == 101 and new.window[-1].time == 600.0
    assert [p.time for p in snap.window][-2:] == [599.0, 600.0]


def test_messages_round_trip_on_the_wire() -> None:
    u = upd("n2", 7, 3.5, counters(3))
    raw = msgspec.msgpack.encode(u)
    assert msgspec.msgpack.decode(raw, type=MetricsMessage) == u
    assert msgspec.msgpack.decode(raw)[0] == 60  # tag first: array_like


# --- prometheus ---------------------------------------------------------------------------------------


class _Source:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.entries = EntryMetrics()
        self.sample = NodeSample(12.5, 4096, 3.0)


def test_prometheus_text_has_node_and_entry_series_per_node_registry() -> None:
    a, b = _Source("n1"), _Source("n2")
    for s in (0.0003, 0.004, 0.2):
        a.entries.record(HELLO, "greet", s, s < 0.1)
    text_a = PrometheusExporter(a).render().decode()
    PrometheusExporter(b)  # a second node in the same process: no duplicate-registration error
    fams = {f.name: f for f in text_string_to_metric_families(text_a)}
    assert fams["aether_node_cpu_ratio"].samples[0].value == 0.125
    assert fams["aether_node_memory_rss_bytes"].samples[0].labels == {"node": "n1"}
    assert "aether_entry_calls" not in fams  # the histogram's _count counts the calls
    count = next(s for s in fams["aether_entry_duration_seconds"].samples if s.name.endswith("_count"))
    assert count.labels == {"node": "n1", "artifact": str(HELLO), "entry": "greet"}
    assert fams["aether_entry_failures"].samples[0].value == 1
    slow = {s.labels["threshold"]: s.value for s in fams["aether_entry_slow_calls"].samples}
    assert slow == {"fixed": 1, "adaptive": 0}
    hist = {(s.name, s.labels.get("le")): s.value for s in fams["aether_entry_duration_seconds"].samples}
    assert hist[("aether_entry_duration_seconds_bucket", "0.0005")] == 1
    assert hist[("aether_entry_duration_seconds_bucket", "0.005")] == 2
    assert hist[("aether_entry_duration_seconds_bucket", "+Inf")] == 3
    assert hist[("aether_entry_duration_seconds_count", None)] == 3
    assert hist[("aether_entry_duration_seconds_sum", None)] == pytest.approx(0.2043)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process collector reads /proc")
def test_prometheus_text_has_the_standard_process_series() -> None:
    before = time.time()
    text = PrometheusExporter(_Source("n1")).render().decode()
    PrometheusExporter(_Source("n2"))  # its own process collector: no duplicate-registration error
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    types = {
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_virtual_memory_bytes": "gauge",
        "process_open_fds": "gauge",
        "process_max_fds": "gauge",
        "process_start_time_seconds": "gauge",
    }
    assert {name: fams[name].type for name in types} == types
    value = {name: fams[name].samples[0].value for name in types}
    assert [s.name for s in fams["process_cpu_seconds"].samples] == ["process_cpu_seconds_total"]
    assert all(len(fams[name].samples) == 1 and fams[name].samples[0].labels == {} for name in types)
    assert value["process_cpu_seconds"] > 0
    assert value["process_resident_memory_bytes"] > 1024 * 1024
    assert value["process_virtual_memory_bytes"] >= value["process_resident_memory_bytes"]
    assert 3 <= value["process_open_fds"] <= value["process_max_fds"]
    # started (with clock-tick resolution) before this test, and not before the test session
    assert time.time() - 24 * 3600 < value["process_start_time_seconds"] <= before + 1
    # not the global default registry: nothing of ours leaks into it
    assert REGISTRY.get_sample_value("aether_node_cpu_ratio", {"node": "n1"}) is None


# --- the node adapter (no loop started: step() by hand) ----------------------------------------------


class _Link:
    def __init__(self, *peers: str) -> None:
        self.up_peers = frozenset(peers)
        self.sent: list[tuple[str, object]] = []

    def send(self, peer: str, msg: object) -> bool:
        self.sent.append((peer, msg))
        return peer in self.up_peers


class _Leader:
    def __init__(self, leader: str | None) -> None:
        self.leader = leader


def test_service_follower_pushes_to_the_leader_and_answers_locally_until_a_snapshot() -> None:
    from aether.metrics import MetricsService

    link = _Link("n1", "n3")
    svc = MetricsService("n2", link, _Leader("n1"))
    svc.entries.record(str(HELLO), "greet", 0.001, True)
    view = svc.view()
    assert view.source == "local" and view.note and [n.node_id for n in view.nodes] == ["n2"]
    svc.step()
    ((peer, msg),) = link.sent
    assert peer == "n1" and isinstance(msg, NodeMetricsUpdate) and msg.entries[0].calls == 1
    # a snapshot from someone who is not the sender's claimed leader is dropped
    leader_agg = MetricsAggregator("n1")
    leader_agg.update(msg, now=0.0)
    snap = leader_agg.tick(now=0.0, wall=100.0)
    svc.on_message("n3", snap)
    assert svc.latest is None
    svc.on_message("n1", snap)
    view = svc.view()
    assert view.source == "leader" and view.note is None and view.snapshot_seq == 1
    assert view.entries[0].calls == 1 and [p.time for p in svc.aggregator.window] == [100.0]
    assert svc.history(7200).points == []  # the point is from wall time 100, long ago
    with pytest.raises(ValueError):
        svc.history(0)


def test_service_leader_aggregates_peers_and_broadcasts() -> None:
    from aether.metrics import MetricsService

    link = _Link("n2", "n3")
    svc = MetricsService("n1", link, _Leader("n1"))
    svc.on_message("n2", upd("n2", 1, 1.0, counters(5)))
    svc.on_message("n3", upd("n2", 2, 2.0, counters(9)))  # claims to be n2: dropped
    svc.step()
    assert [p for p, _ in link.sent] == ["n2", "n3"]
    snap = link.sent[0][1]
    assert isinstance(snap, ClusterMetricsSnapshot) and snap.leader == "n1" and snap.seq == 1
    assert sorted(n.node_id for n in snap.nodes) == ["n1", "n2"]
    assert snap.entries[0].calls == 5 and len(snap.window) == 1
    assert svc.view().source == "leader"


def test_client_errors_are_counted_apart_from_failures_everywhere() -> None:
    """Issue 11, item 8: a 4xx answer is a client error, not a failure, in every view."""
    src = _Source("n1")
    m = src.entries
    m.record(HELLO, "greet", 0.001, True)
    m.record(HELLO, "greet", 0.001, False, True)  # e.g. 404 NotFound
    m.record(HELLO, "greet", 0.001, False, True)  # e.g. 400 bad argument
    m.record(HELLO, "greet", 0.001, False)  # the entry raised
    (c,) = m.counters()
    assert (c.calls, c.successes, c.client_errors, c.failures) == (4, 1, 2, 1)
    agg = MetricsAggregator("n1")
    agg.update(upd("n1", 1, 1.0, c), now=0.0)
    agg.update(upd("n2", 1, 1.0, counters(10, 1)), now=0.0)  # a node sending no client_errors
    snap = agg.compute(now=0.5, wall=1.0)
    (e,) = snap.entries
    assert (e.calls, e.successes, e.client_errors, e.failures) == (14, 10, 2, 2)
    assert (snap.totals.client_errors, snap.totals.failures) == (2, 2)
    fams = {f.name: f for f in text_string_to_metric_families(PrometheusExporter(src).render().decode())}
    assert fams["aether_entry_client_errors"].samples[0].value == 2
    assert fams["aether_entry_failures"].samples[0].value == 1
    assert fams["aether_entry_successes"].samples[0].value == 1
    # an update from a node without the field decodes with client_errors = 0
    old = msgspec.msgpack.encode({k: v for k, v in msgspec.structs.asdict(c).items() if k != "client_errors"})
    assert msgspec.msgpack.decode(old, type=EntryCounters).client_errors == 0


def test_blocked_calls_are_counted_per_entry_everywhere() -> None:
    """Issue 11: the loop-lag watchdog's reports show in the metrics (a blocked call also ends as
    a failure, recorded by `record`)."""
    src = _Source("n1")
    m = src.entries
    m.record_block(HELLO, "nap")  # reported while the call is still running ...
    m.record(HELLO, "nap", 0.6, False)  # ... which then ends as a failure
    m.record(HELLO, "greet", 0.001, True)
    by = {c.entry: c for c in m.counters()}
    assert (by["nap"].blocked, by["nap"].failures, by["nap"].calls) == (1, 1, 1)
    assert by["greet"].blocked == 0
    agg = MetricsAggregator("n1")
    agg.update(upd("n1", 1, 1.0, *m.counters()), now=0.0)
    snap = agg.compute(now=0.5, wall=1.0)
    assert {e.entry: e.blocked for e in snap.entries} == {"greet": 0, "nap": 1}
    fams = {f.name: f for f in text_string_to_metric_families(PrometheusExporter(src).render().decode())}
    assert {s.labels["entry"]: s.value for s in fams["aether_entry_blocked"].samples
            if s.name == "aether_entry_blocked_total"} == {"greet": 0, "nap": 1}


# --- slice instances, slice loads, loop lag (issue 15) ------------------------------------------------

ART = str(HELLO)
OTHER = "org.example:other:1.0.0"


def inst(
    instance: int, admitted: int, calls: int, busy: float, *, started: float = 0.5, in_flight: int = 0,
    queued: int = 0, rejected: int = 0, failures: int = 0, artifact: str = ART, **kw: object,
) -> InstanceCounters:
    return InstanceCounters(
        artifact, instance, in_flight, queued, admitted, rejected, calls, failures, busy, started, **kw  # type: ignore[arg-type]
    )


def iupd(
    node: str, seq: int, uptime: float, *instances: InstanceCounters, entries: tuple[EntryCounters, ...] = (),
    cpu: float = 10.0, lag_ms: float = 0.0, run: int = 1,
) -> NodeMetricsUpdate:
    sample = NodeSample(cpu, 1000, uptime, lag_ms)
    return NodeMetricsUpdate(node, run, seq, sample, list(entries), list(instances))


def test_instance_rates_come_from_cumulative_counters_and_restarts_rebase() -> None:
    agg = MetricsAggregator("n1")
    agg.update(iupd("n1", 1, 10.0, inst(0, 100, 90, 9.0)), now=0.0)
    (x,) = agg.instance_stats(now=0.0)
    assert (x.in_flight, x.calls_per_s, x.exec_ms) == (0, 0.0, None)  # a baseline
    agg.update(iupd("n1", 2, 12.0, inst(0, 140, 120, 12.0, in_flight=3, queued=2, rejected=4, failures=2,
                                        healthy=False, health_failures=2, health_reason="db down")), now=1.0)
    (x,) = agg.instance_stats(now=1.0)
    assert (x.node_id, x.artifact, x.instance, x.in_flight, x.queued) == ("n1", ART, 0, 3, 2)
    assert (x.arrivals_per_s, x.calls_per_s, x.failures_per_s, x.rejected_per_s) == (20.0, 15.0, 1.0, 2.0)
    assert x.exec_ms == pytest.approx(100.0)  # 3 s of execution for 30 calls
    assert (x.calls, x.failures, x.healthy) == (120, 2, False)
    assert (x.health_failures, x.health_reason) == (2, "db down")
    assert (x.admitted, x.rejected) == (140, 4)
    # the instance restarted (a new `started`): its counters count from zero
    agg.update(iupd("n1", 3, 14.0, inst(0, 10, 8, 0.4, started=13.0)), now=2.0)
    (x,) = agg.instance_stats(now=2.0)
    assert (x.arrivals_per_s, x.calls_per_s, x.exec_ms) == (5.0, 4.0, pytest.approx(50.0))
    # a new instance on a known node counts from zero too; a node that stops reporting expires
    two = (inst(0, 10, 8, 0.4, started=13.0), inst(1, 6, 6, 0.06, started=14.5))
    agg.update(iupd("n1", 4, 15.0, *two), now=3.0)
    assert [(x.instance, x.calls_per_s) for x in agg.instance_stats(now=3.0)] == [(0, 0.0), (1, 6.0)]
    assert agg.instance_stats(now=9.0) == []


def test_slice_loads_sum_instances_and_take_p95_from_the_last_interval() -> None:
    agg = MetricsAggregator("n1")
    slow_b = [0] * NB
    slow_b[10] = 1000  # 1000 calls of (0.5 s, 1 s] long ago: not in the last interval
    old_calls = EntryCounters(ART, "greet", 1000, 1000, 0, 700.0, slow_b, 0, 0)
    agg.update(iupd("n1", 1, 10.0, inst(0, 0, 0, 0.0), entries=(old_calls,), cpu=30.0), now=0.0)
    agg.update(iupd("n2", 1, 10.0, inst(1, 0, 0, 0.0), inst(2, 0, 0, 0.0, artifact=OTHER), cpu=50.0), now=0.0)
    assert agg.slice_loads(now=0.0)[ART].p95_ms is None  # no interval yet
    fast_b = list(slow_b)
    fast_b[3] += 100  # 100 calls of (2.5 ms, 5 ms] in this interval
    new_calls = EntryCounters(ART, "greet", 1100, 1100, 0, 700.4, fast_b, 0, 0)
    busy = inst(0, 110, 100, 0.4, in_flight=2, queued=1)
    agg.update(iupd("n1", 2, 11.0, busy, entries=(new_calls,), cpu=30.0), now=1.0)
    agg.update(iupd("n2", 2, 12.0, inst(1, 40, 30, 0.3, in_flight=1, rejected=6),
                    inst(2, 5, 5, 0.5, artifact=OTHER), cpu=50.0), now=1.0)
    loads = agg.slice_loads(now=1.0)
    assert sorted(loads) == [ART, OTHER]
    a = loads[ART]
    assert (a.artifact, a.instances, a.in_flight, a.queued) == (ART, 2, 3, 1)
    assert a.arrivals_per_s == pytest.approx(110 + 20) and a.calls_per_s == pytest.approx(100 + 15)
    assert a.rejected_per_s == pytest.approx(3.0) and a.failures_per_s == 0
    assert a.exec_ms == pytest.approx(0.7 / 130 * 1000, abs=0.01)
    assert a.p95_ms is not None and 2.5 < a.p95_ms <= 5.0  # the interval's calls, not the old slow ones
    assert a.cpu_percent == pytest.approx(40.0)  # both nodes host an instance
    o = loads[OTHER]
    assert (o.instances, o.exec_ms, o.p95_ms, o.cpu_percent) == (1, pytest.approx(100.0), None, 50.0)


def test_loop_lag_and_instances_reach_the_snapshot_and_the_wire() -> None:
    agg = MetricsAggregator("n1")
    agg.update(iupd("n1", 1, 1.0, inst(0, 5, 5, 0.1), lag_ms=12.5), now=0.0)
    agg.update(iupd("n1", 2, 2.0, inst(0, 9, 9, 0.2, in_flight=1), lag_ms=3.0), now=1.0)
    snap = agg.tick(now=1.0, wall=100.0)
    assert [(n.node_id, n.loop_lag_ms) for n in snap.nodes] == [("n1", 3.0)]
    assert [(i.instance, i.in_flight, i.calls_per_s) for i in snap.instances] == [(0, 1, 4.0)]
    assert agg.compute(now=1.0, wall=101.0).instances == snap.instances
    for msg in (snap, iupd("n1", 3, 3.0, inst(0, 9, 9, 0.2), lag_ms=1.0)):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=MetricsMessage) == msg
    # an update from a node that sends no instances (an older version) decodes with none
    old = msgspec.msgpack.encode(["n9", 1, 1, NodeSample(1.0, 1, 1.0), []])
    tagged = msgspec.msgpack.encode([60, *msgspec.msgpack.decode(old)])
    decoded = msgspec.msgpack.decode(tagged, type=MetricsMessage)
    assert isinstance(decoded, NodeMetricsUpdate) and decoded.instances == []
    assert decoded.sample.loop_lag_ms == 0.0


class _InstanceSource(_Source):
    def __init__(self, node_id: str, instances: list[InstanceCounters]) -> None:
        super().__init__(node_id)
        self.sample = NodeSample(12.5, 4096, 3.0, 250.0)
        self._instances = instances

    def instance_counters(self) -> list[InstanceCounters]:
        return self._instances


def test_prometheus_has_instance_and_loop_lag_series() -> None:
    src = _InstanceSource("n1", [inst(0, 9, 5, 0.1, in_flight=2, queued=3, rejected=4), inst(1, 1, 1, 0.1)])
    fams = {f.name: f for f in text_string_to_metric_families(PrometheusExporter(src).render().decode())}
    assert fams["aether_node_loop_lag_seconds"].samples[0].value == 0.25
    names = ("aether_instance_in_flight", "aether_instance_queued", "aether_instance_rejected")
    by = {(s.name, s.labels["instance"]): (s.value, s.labels) for f in names for s in fams[f].samples}
    assert by[("aether_instance_in_flight", "0")] == (2, {"node": "n1", "artifact": ART, "instance": "0"})
    assert by[("aether_instance_queued", "0")][0] == 3 and by[("aether_instance_queued", "1")][0] == 0
    assert by[("aether_instance_rejected_total", "0")][0] == 4
    assert fams["aether_instance_rejected"].type == "counter"
    # a source without instances (no slice runtime) has the node series only
    text = PrometheusExporter(_Source("n2")).render().decode()
    names_2 = {f.name for f in text_string_to_metric_families(text)}
    assert "aether_instance_in_flight" not in names_2 and "aether_node_loop_lag_seconds" in names_2


def test_service_puts_instances_and_loop_lag_into_its_updates() -> None:
    from aether.metrics import MetricsService

    link = _Link("n1")
    svc = MetricsService(
        "n2", link, _Leader("n1"), loop_lag=lambda: 0.0425,
        instances=lambda: [inst(0, 3, 2, 0.1, started=svc.uptime_of(time.monotonic()))],
    )
    svc.step()
    ((_, msg),) = link.sent
    assert isinstance(msg, NodeMetricsUpdate) and msg.sample.loop_lag_ms == 42.5
    (c,) = msg.instances
    assert (c.instance, c.admitted, c.calls) == (0, 3, 2) and 0 <= c.started <= msg.sample.uptime + 0.01
    assert svc.instance_counters() == msg.instances

    def broken() -> list[InstanceCounters]:
        raise RuntimeError("runtime gone")

    svc.instances = broken  # a failing source never stops the update
    svc.step()
    assert isinstance(link.sent[-1][1], NodeMetricsUpdate) and link.sent[-1][1].instances == []
