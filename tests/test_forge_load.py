"""Forge's load generator: the sans-IO pacer, stats, node choice, traces, and one real run over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from aether.core.errors import BadRequest
from aether.forge.config import LoadConfig, ScheduleStep, Target, parse_forge_config
from aether.forge.load import (
    DETAIL_CHARS,
    FAILURES_KEPT,
    NO_NODE_DETAIL,
    LoadCore,
    LoadGenerator,
    LoadPlan,
    LoadStats,
    LogHistogram,
    NodePicker,
    SentRequest,
    Trace,
    load_trace,
    save_trace,
)

TICK = 0.01


def run(plan: LoadPlan, start: float, end: float, tick: float = TICK) -> list[tuple[float, int]]:
    """Drive `plan` with ticks from `start` to `end`: (time, target) of every emitted request."""
    out: list[tuple[float, int]] = []
    steps = round((end - start) / tick)
    for k in range(1, steps + 1):
        now = start + k * tick
        out.extend((now, j) for j in plan.due(now))
    return out


def per_second(events: list[tuple[float, int]], start: float, seconds: int) -> list[int]:
    counts = [0] * seconds
    for t, _ in events:
        k = int(t - start - 1e-9)  # an event at exactly start+1.0 was accumulated in [start, start+1]
        if 0 <= k < seconds:
            counts[k] += 1
    return counts


# -- the pacer


@pytest.mark.parametrize("rate", [0.5, 7.3, 50, 1000])
def test_the_pacer_emits_rate_times_seconds(rate: float) -> None:
    plan = LoadPlan(rate, [1], now=1000.0)
    events = run(plan, 1000.0, 1010.0)
    assert abs(len(events) - rate * 10) <= 1
    assert plan.rate_at(1005.0) == rate


def test_irregular_ticks_give_the_same_average() -> None:
    plan = LoadPlan(40, [1], now=0.0)
    rng = random.Random(3)
    now, n = 0.0, 0
    while now < 20.0:
        now = min(20.0, now + rng.uniform(0.001, 0.2))
        n += len(plan.due(now))
    assert abs(n - 800) <= 1


def test_a_ramp_is_linear() -> None:
    plan = LoadPlan(0, [1], now=0.0)
    plan.ramp(100, 10, 0.0)
    assert plan.rate_at(5.0) == pytest.approx(50) and plan.ramping_to == 100
    events = run(plan, 0.0, 12.0)
    counts = per_second(events, 0.0, 12)
    expected = [5 + 10 * k for k in range(10)] + [100, 100]  # mean rate within each second
    assert all(abs(c - e) <= 1 for c, e in zip(counts, expected, strict=True)), counts
    assert abs(len(events) - (500 + 200)) <= 1
    assert plan.ramping_to is None
    # a ramp down from the current rate, and a ramp of 0 seconds is a jump
    plan.ramp(0, 4, 12.0)
    assert abs(len(run(plan, 12.0, 16.0)) - 200) <= 1
    plan.ramp(30, 0, 16.0)
    assert abs(len(run(plan, 16.0, 18.0)) - 60) <= 1


def test_weights_split_the_rate() -> None:
    plan = LoadPlan(100, [3, 1, 0], now=0.0)
    by_target = Counter(j for _, j in run(plan, 0.0, 10.0))
    assert abs(by_target[0] - 750) <= 1 and abs(by_target[1] - 250) <= 1 and by_target[2] == 0
    # smooth: within any 0.1 s, both non-zero targets show up in proportion (3:1 per 4 requests)
    first = [j for _, j in run(LoadPlan(40, [3, 1], now=0.0), 0.0, 0.1)]
    assert sorted(first) == [0, 0, 0, 1]


def test_pause_stops_emission_and_resume_does_not_burst() -> None:
    plan = LoadPlan(50, [1], now=0.0)
    assert abs(len(run(plan, 0.0, 2.0)) - 100) <= 1
    plan.pause(2.0)
    assert plan.paused and plan.rate_at(3.0) == 0
    assert run(plan, 2.0, 5.0) == []
    plan.resume(5.0)
    events = run(plan, 5.0, 7.0)
    assert abs(len(events) - 100) <= 1
    assert len([t for t, _ in events if t <= 5.1]) <= 6  # no catch-up of the paused time
    # starting paused
    assert run(LoadPlan(50, [1], now=0.0, paused=True), 0.0, 2.0) == []


def test_the_schedule_applies_steps_and_manual_changes_in_between() -> None:
    steps = [ScheduleStep(at=5, rate=50), ScheduleStep(at=10, rate=0, ramp=4)]
    plan = LoadPlan(10, [1], now=100.0, schedule=steps)
    counts = per_second(run(plan, 100.0, 116.0), 100.0, 16)
    assert all(abs(c - 10) <= 1 for c in counts[:5]), counts
    assert all(abs(c - 50) <= 1 for c in counts[5:10]), counts
    assert all(abs(c - e) <= 1 for c, e in zip(counts[10:14], [43.75, 31.25, 18.75, 6.25], strict=True)), (
        counts
    )
    assert sum(counts[10:14]) in range(99, 102) and counts[14:] == [0, 0]
    # begin() restarts the timeline: the steps count from there again
    plan.begin(200.0, 1)
    assert plan.rate_at(200.0) == 1
    run(plan, 200.0, 206.0)
    assert plan.rate_at(206.0) == 50


def test_bad_rates_are_refused() -> None:
    plan = LoadPlan(1, [1], now=0.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(BadRequest, match="rate must be"):
            plan.set_rate(bad, 1.0)
    with pytest.raises(BadRequest, match="ramp seconds"):
        plan.ramp(5, -1, 1.0)
    with pytest.raises(ValueError):
        LoadPlan(1, [0, 0], now=0.0)


def test_a_stalled_caller_gets_at_most_a_second_of_backlog() -> None:
    plan = LoadPlan(100, [1], now=0.0)
    assert len(plan.due(30.0)) == 100


# -- histogram, stats, node choice, in-flight cap


def test_histogram_quantiles_on_known_data() -> None:
    h = LogHistogram()
    assert h.quantile(0.5) is None
    for ms in range(1, 1001):
        h.record(ms / 1000)
    for q, want in ((0.5, 0.5), (0.9, 0.9), (0.99, 0.99)):
        got = h.quantile(q)
        assert got is not None and abs(got - want) / want < 0.025, (q, got)
    other = LogHistogram()
    for _ in range(1000):
        other.record(5.0)
    h.merge(other)
    assert h.count == 2000
    assert h.quantile(0.9) == pytest.approx(5.0, rel=0.025)
    assert h.quantile(0.4) == pytest.approx(0.8, rel=0.025)
    tiny = LogHistogram()
    tiny.record(0.0)
    assert tiny.quantile(0.5) == pytest.approx(1e-6, rel=0.05)
    with pytest.raises(ValueError):
        h.quantile(1.0)


def test_node_picker_round_robin_and_skip() -> None:
    p = NodePicker()
    nodes = ["a", "b", "c"]
    assert [p.pick(nodes, 0.0) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    p.connect_failed("b", 0.0)
    assert [p.pick(nodes, 0.5) for _ in range(4)] == ["a", "c", "a", "c"]
    assert p.skipped(0.5) == ["b"]
    assert {p.pick(nodes, 1.01) for _ in range(3)} == {"a", "b", "c"}  # back after a second
    for n in nodes:
        p.connect_failed(n, 2.0)
    assert {p.pick(nodes, 2.1) for _ in range(3)} == {"a", "b", "c"}  # all skipped: try them anyway
    assert p.pick([], 3.0) is None
    # the list may change between calls (a node removed, another added)
    assert p.pick(["d"], 3.0) == "d"


def _config(**kw: object) -> LoadConfig:
    targets = [Target(name="ok", path="/ok", weight=3), Target(name="bad", path="/bad/${range:1:9}")]
    return msgspec.structs.replace(LoadConfig(targets=targets), **kw)  # type: ignore[arg-type]


def test_the_core_caps_in_flight_and_counts_drops() -> None:
    core = LoadCore(_config(rate=100, max_in_flight=5), now=0.0, rng=random.Random(1))
    sent = core.tick(0.5, ["n1:1", "n2:2"])
    assert len(sent) == 5 and core.in_flight == 5
    total = core.stats.totals("total")
    assert total.sent == 5 and total.dropped == 45
    for d in sent[:3]:
        core.finished(d, status=200, error=None, latency=0.01, now=0.6)
    assert core.in_flight == 2
    assert len(core.tick(0.6, ["n1:1"])) == 3  # 10 due, room for 3
    assert core.stats.totals("total").dropped == 52


def test_stats_per_target_node_status_and_per_second_series() -> None:
    core = LoadCore(_config(rate=40), now=100.0, rng=random.Random(1))
    nodes = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]  # the second one refuses connections
    for k in range(1, 301):  # 3 s; every request answered at once: ok 200, bad 500
        now = 100.0 + k * TICK
        for d in core.tick(now, nodes):
            req = core.render(d)
            assert req.url.startswith(f"http://{d.node}/")
            if d.node == nodes[1]:
                core.finished(d, status=None, error="connect", latency=None, now=now)
            elif req.target == "ok":
                core.finished(
                    d, status=200, error=None, latency=0.002 if d.node == nodes[0] else 0.2, now=now
                )
            else:
                assert req.url.startswith(f"http://{d.node}/bad/")
                core.finished(d, status=500, error=None, latency=0.05, now=now)
    view = core.view(running=True, now=103.0, cpu_percent=None)
    ok, bad = view.targets
    assert (ok.name, bad.name) == ("ok", "bad")
    assert abs(ok.sent - 90) <= 1 and abs(bad.sent - 30) <= 1
    assert ok.ok + ok.errors.get("error:connect", 0) == ok.sent and ok.failed == ok.sent - ok.ok
    assert bad.ok == 0 and bad.errors["500"] + bad.errors.get("error:connect", 0) == bad.sent
    assert view.total.sent == ok.sent + bad.sent and view.total.failed == ok.failed + bad.failed
    by_node = {n.name: n for n in view.nodes}
    assert set(by_node) == set(nodes)
    refused = by_node[nodes[1]]
    assert refused.errors == {"error:connect": refused.sent} and refused.ok == 0
    assert refused.sent >= 3 and view.total.errors["error:connect"] == refused.sent
    # the node that refused connections was skipped for a second each time: few requests there
    assert refused.sent < by_node[nodes[0]].sent / 4 and refused.sent < by_node[nodes[2]].sent / 4
    assert by_node[nodes[0]].errors.get("error:connect") is None and by_node[nodes[0]].errors["500"] >= 1
    assert by_node[nodes[0]].p50_ms == pytest.approx(2, rel=0.03)
    assert by_node[nodes[2]].p50_ms == pytest.approx(200, rel=0.03)
    # the second in progress is not in the series; each complete second has total, targets, nodes
    points = core.stats.series(0.0)
    assert sorted({p.t for p in points}) == [100.0, 101.0, 102.0]
    assert [(p.scope, p.name) for p in points if p.t == 101.0][:3] == [
        ("total", ""),
        ("target", "bad"),
        ("target", "ok"),
    ]
    assert all(abs(p.sent - 40) <= 1 for p in points if p.scope == "total")
    assert core.stats.series(102.0) == [p for p in points if p.t == 102.0]
    tot = next(p for p in points if p.t == 101.0 and p.scope == "total")
    assert tot.success_rate is not None and 0.6 < tot.success_rate < 0.8
    assert tot.p50_ms is not None and tot.p99_ms is not None and tot.p50_ms <= tot.p99_ms


def test_seconds_without_requests_have_zero_points_for_the_total_and_targets() -> None:
    # found by hand: with the load paused `GET /api/series` answered no point for those seconds, so
    # the dashboard's throughput chart drew a line across the pause and its numbers kept showing
    # the last second with requests (35 req/s) while nothing was sent
    core = LoadCore(_config(rate=20), now=100.0, rng=random.Random(1))
    for k in range(1, 501):  # 5 s: sending during 2 s, paused for 3
        now = 100.0 + k * TICK
        if k == 200:  # at 102.0: nothing starts from then on
            core.plan.pause(now)
        for d in core.tick(now, ["n:1"]):
            core.finished(d, status=200, error=None, latency=0.001, now=now)
    points = core.stats.series(0.0)
    totals = {p.t: p for p in points if p.scope == "total"}
    assert sorted(totals) == [100.0, 101.0, 102.0, 103.0, 104.0]  # 105 is in progress
    assert totals[101.0].sent > 0
    for t in (102.0, 103.0, 104.0):
        assert (totals[t].sent, totals[t].ok, totals[t].failed) == (0, 0, 0)
        assert totals[t].success_rate is None and totals[t].p50_ms is None
        assert {p.name for p in points if p.t == t and p.scope == "target"} == {"ok", "bad"}
        assert not [p for p in points if p.t == t and p.scope == "node"]  # no request, no node
    assert core.stats.totals("total").sent == sum(p.sent for p in totals.values())


def test_per_second_history_is_bounded() -> None:
    core = LoadCore(_config(rate=10, history=5), now=0.0, rng=random.Random(1))
    for k in range(1, 2001):  # 20 s
        for d in core.tick(k * TICK, ["n:1"]):
            core.finished(d, status=200, error=None, latency=0.001, now=k * TICK)
    times = sorted({p.t for p in core.stats.series(0.0)})
    assert times == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert abs(core.stats.totals("total").ok - 200) <= 1


def test_a_refused_connection_is_sent_to_another_node_once() -> None:
    core = LoadCore(_config(rate=10), now=0.0, rng=random.Random(1))
    (d,) = core.tick(0.1, ["n1:1", "n2:2"])
    other = core.reroute(d, 0.15, ["n1:1", "n2:2"])
    assert other is not None and other.node != d.node and other.target == d.target
    core.finished(other, status=200, error=None, latency=0.01, now=0.2)
    assert core.in_flight == 0
    total = core.stats.totals("total")
    assert (total.sent, total.ok, total.failed) == (1, 1, 0)  # one request, answered
    refused, answered = core.stats.totals("node", d.node), core.stats.totals("node", other.node)
    assert (refused.sent, refused.rerouted, refused.failed) == (1, 1, 0)
    assert (answered.sent, answered.ok) == (1, 1)
    assert d.node in core.picker.skipped(0.5)  # and skipped for a second
    # no other node: no reroute, the refusal is the request's failure
    d2 = core.tick(1.2, ["n1:1"])[0]
    assert core.reroute(d2, 1.25, ["n1:1"]) is None
    core.finished(d2, status=None, error="connect", latency=None, now=1.3)
    assert core.stats.totals("total").errors == {"error:connect": 1}


def test_a_core_needs_a_target() -> None:
    with pytest.raises(BadRequest, match="at least one target"):
        LoadCore(LoadConfig(rate=1), now=0.0, rng=random.Random())


# -- traces


def test_trace_save_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    trace = Trace(start=1700000000.0, targets=["a", "b"], counts=[[1, 2], [0, 0], [30, 7]])
    f = tmp_path / "t.jsonl"
    save_trace(trace, f)
    lines = f.read_text().splitlines()
    assert json.loads(lines[0]) == {"start": 1700000000.0, "targets": ["a", "b"], "interval": 1.0}
    assert lines[1:] == ["[1,2]", "[0,0]", "[30,7]"]
    assert load_trace(f) == trace
    f.write_text(lines[0] + "\n[1,2]\n[1]\n")
    with pytest.raises(BadRequest, match=r"t\.jsonl:3: expected 2 counts"):
        load_trace(f)
    f.write_text('{"targets": ["a"]}\n')
    with pytest.raises(BadRequest, match=r"t\.jsonl:1: not a trace header"):
        load_trace(f)
    with pytest.raises(BadRequest, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")


def test_recording_counts_offered_requests_per_target_per_second() -> None:
    core = LoadCore(_config(rate=20), now=50.0, rng=random.Random(1))
    core.start_recording(50.0)
    for k in range(1, 301):
        now = 50.0 + k * TICK
        assert core.tick(now, []) == []  # no node: failed at once, still offered
    trace = core.stop_recording(53.0)
    assert trace.start == 50.0 and trace.targets == ["ok", "bad"]
    assert len(trace.counts) >= 3
    for row in trace.counts[:3]:
        assert abs(row[0] - 15) <= 1 and abs(row[1] - 5) <= 1
    assert core.stats.totals("total").errors == {"error:no_node": sum(map(sum, trace.counts))}
    # the dashboard's Recent failures and the scenarios' examples say why (it was an empty detail)
    assert {f.detail for f in core.stats.failures()} == {NO_NODE_DETAIL}
    with pytest.raises(BadRequest, match="not recording"):
        core.stop_recording(54.0)


@pytest.mark.parametrize("speed", [1.0, 2.0])
def test_replay_reproduces_per_second_counts(tmp_path: Path, speed: float) -> None:
    counts = [[10, 0], [3, 7], [0, 0], [25, 5], [1, 1]]
    f = tmp_path / "trace.jsonl"
    save_trace(Trace(start=0.0, targets=["bad", "ok"], counts=counts), f)  # other column order
    core = LoadCore(_config(rate=500), now=0.0, rng=random.Random(1))
    core.replay(load_trace(f), speed, 10.0)
    assert core.plan.replaying and core.plan.rate_at(10.0) == 10 * speed
    events: list[tuple[float, int]] = []
    for k in range(1, round(5 / speed / TICK) + 1):
        now = 10.0 + k * TICK
        events.extend((10.0 + (now - 10.0) * speed, d.target) for d in core.tick(now, ["n:1"]))
    assert not core.plan.replaying
    got = [[0, 0] for _ in counts]
    for t, j in events:
        got[min(4, int(t - 10.0 - 1e-9))][1 - j] += 1  # config order is (ok, bad)
    for g, want in zip(got, counts, strict=True):
        assert all(abs(a - b) <= 1 for a, b in zip(g, want, strict=True)), (got, counts)
    assert [sum(c[i] for c in got) for i in (0, 1)] == [39, 13]
    # afterwards the configured rate applies again
    assert abs(len(core.plan.due(10.0 + 5 / speed + 0.1)) - 50) <= 1


@pytest.mark.timeout(20)  # before the fix the plan looped forever inside `due` (Forge hung)
@pytest.mark.parametrize("speed", [1.0, 50.0, 1000.0])
def test_replay_at_wall_clock_times_ends_with_the_traces_counts(speed: float) -> None:
    # Forge replays at time.time() (~1.8e9 s), where start + (k + 1) * step - start is not
    # (k + 1) * step in floats: at speed 50 the interval index computed again from the time at a
    # boundary came out as the same one and `due` never returned (found with
    # `POST /api/load/replay?speed=50`: the dashboard and the API stopped answering)
    start = 1796673853.123456
    plan = LoadPlan(40, [2, 1, 1], now=start)
    counts = [[20, 10, 10], [7, 0, 3], [0, 0, 0], [13, 5, 1]] * 25
    plan.replay(Trace(start=0.0, targets=["a", "b", "c"], counts=counts), [0, 1, 2], speed, start)
    got = [0, 0, 0]
    for k in range(1, round(len(counts) / speed / TICK) + 3):
        for j in plan.due(start + k * TICK):
            got[j] += 1
    assert not plan.replaying
    assert got == [sum(row[j] for row in counts) for j in range(3)]  # exactly what was offered


def test_replay_refuses_a_trace_with_unknown_targets() -> None:
    core = LoadCore(_config(rate=1), now=0.0, rng=random.Random(1))
    with pytest.raises(BadRequest, match="targets the config does not: other"):
        core.replay(Trace(start=0.0, targets=["ok", "other"], counts=[[1, 1]]), 1.0, 1.0)


# -- one real run


def _refused_address() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"127.0.0.1:{port}"


async def test_a_real_run_counts_statuses_and_nodes_and_skips_a_dead_address() -> None:
    async def ok(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"orderId": f"ORD-{len(body)}"}, status=201)

    async def fail(request: web.Request) -> web.Response:
        n = request.match_info["n"]
        if n == "1":
            return web.Response(status=500, text="no")
        problem = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                   "detail": f"item {n} is broken"}
        return web.json_response(problem, status=500, content_type="application/problem+json")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_get("/fail/{n}", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    live = f"127.0.0.1:{runner.addresses[0][1]}"
    dead = _refused_address()
    cfg = parse_forge_config(
        """
[load]
rate = 100
timeout = 5
[[load.targets]]
name = "place"
method = "POST"
path = "/ok"
body = '{"c": "${random:5}"}'
headers = { "Content-Type" = "application/json" }
expect = [201]
capture = true
[[load.targets]]
name = "broken"
path = "/fail/${range:1:3}"
""",
        "test.toml",
    ).load
    captured: list[str] = []
    statuses: Counter[int] = Counter()

    def on_response(target: str, status: int, body: bytes | None, request: SentRequest) -> None:
        statuses[status] += 1
        if target == "place":
            assert body is not None and request.body is not None and request.url.endswith("/ok")
            captured.append(json.loads(body)["orderId"])
        else:
            assert body is None

    addresses = [live, dead]
    gen = LoadGenerator(cfg, lambda: addresses, seed=5, on_response=on_response)
    assert not gen.snapshot().running
    await gen.start()
    try:
        for _ in range(600):  # up to 30 s on a loaded machine; typically ~2.5 s
            view = gen.snapshot()
            if view.total.ok >= 120 and view.targets[1].errors.get("500", 0) >= 60:
                break
            await asyncio.sleep(0.05)
        gen.pause()
        assert gen.snapshot().paused and gen.snapshot().rate == 0
    finally:
        await gen.stop()
    view = gen.snapshot()
    assert not view.running and view.in_flight == 0
    place, broken = view.targets
    # a refused connection never reached a server: the request went to the live node instead
    assert place.ok >= 120 and place.failed == 0
    assert broken.ok == 0 and broken.errors.get("500", 0) >= 60
    assert set(broken.errors) == {"500"}
    nodes = {n.name: n for n in view.nodes}
    assert nodes[live].ok == place.ok and nodes[live].failed == broken.errors["500"]
    assert nodes[dead].ok == 0 and nodes[dead].failed == 0 and nodes[dead].errors == {}
    assert nodes[dead].sent >= 1 and nodes[dead].rerouted == nodes[dead].sent
    assert nodes[live].sent == view.total.sent  # every request, the rerouted ones included
    # skipped for a second after each refusal: far fewer requests than the live node got
    assert nodes[dead].sent < nodes[live].sent / 5, (nodes[dead], nodes[live])
    assert place.p50_ms is not None and place.p99_ms is not None and place.p50_ms <= place.p99_ms
    assert statuses[201] == place.ok and statuses[500] == broken.errors["500"]
    assert len(captured) == place.ok and all(c == "ORD-14" for c in captured)  # {"c": "xxxxx"}
    assert view.cpu_percent is not None and view.cpu_percent >= 0
    assert gen.cpu_seconds() > 0
    assert any(p.scope == "node" and p.name == live for p in gen.series(0.0))
    # each failure is kept with what the answer said: the problem document's detail, else the text
    failures = gen.failures()
    assert [f.seq for f in failures] == list(range(1, len(failures) + 1))
    assert len(failures) == min(gen.failure_count, FAILURES_KEPT) and gen.failure_count == broken.failed
    assert {f.detail for f in failures} == {"no", "item 2 is broken", "item 3 is broken"}
    assert {(f.cause, f.target, f.node) for f in failures} == {("500", "broken", live)}
    assert gen.failures(failures[-1].seq) == [] and gen.failures(failures[-2].seq) == failures[-1:]
    await runner.cleanup()


@contextlib.asynccontextmanager
async def _hanging_server() -> AsyncIterator[str]:
    """A server whose `GET /hang` answers only once the test is over; yields its base URL."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/hang", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        release.set()
        await runner.cleanup()


async def test_a_hanging_server_fills_the_in_flight_cap_and_stop_cancels_the_rest() -> None:
    async with _hanging_server() as address:  # a base URL works as well as host:port
        cfg = LoadConfig(rate=200, max_in_flight=10, targets=[Target(name="hang", path="/hang")])
        gen = LoadGenerator(cfg, lambda: [address])
        await gen.start()
        gen.start_recording()
        try:
            for _ in range(600):
                if gen.snapshot().total.dropped >= 20:
                    break
                await asyncio.sleep(0.05)
            view = gen.snapshot()
            assert view.in_flight == 10 and view.total.sent == 10 and view.total.dropped >= 20
            trace = gen.stop_recording()
            assert trace.targets == ["hang"] and sum(r[0] for r in trace.counts) >= 30  # drops included
        finally:
            await gen.stop(grace=0.2)
    view = gen.snapshot()
    assert view.in_flight == 0 and view.total.errors == {"error:cancelled": 10} and view.total.ok == 0


async def test_a_request_without_an_answer_in_time_fails_as_a_timeout_saying_so() -> None:
    async with _hanging_server() as address:
        cfg = LoadConfig(rate=20, timeout=0.2, targets=[Target(name="hang", path="/hang")])
        gen = LoadGenerator(cfg, lambda: [address])
        await gen.start()
        try:
            for _ in range(600):
                if gen.failure_count >= 3:
                    break
                await asyncio.sleep(0.05)
        finally:
            await gen.stop(grace=0.2)
    timeouts = [f for f in gen.failures() if f.cause == "error:timeout"]
    assert len(timeouts) >= 3, gen.failures()
    assert {f.detail for f in timeouts} == {"no answer within 0.2 s"}


def test_the_stats_keep_the_latest_failures_numbered_with_their_detail() -> None:
    stats = LoadStats()
    for k in range(FAILURES_KEPT + 50):
        stats.finished("t", "n:1", None, 0.01, float(k))  # successes are not kept
        stats.finished("t", "n:1", "503", 0.01, float(k), "x" * 1000 if k == FAILURES_KEPT + 49 else f"d{k}")
    kept = stats.failures()
    assert stats.failure_count == FAILURES_KEPT + 50 and len(kept) == FAILURES_KEPT
    assert [f.seq for f in kept] == list(range(51, FAILURES_KEPT + 51))
    assert kept[0].detail == "d50" and kept[0].t == 50.0 and kept[0].cause == "503"
    assert len(kept[-1].detail) == DETAIL_CHARS  # a long message is cut
    assert [f.seq for f in stats.failures(FAILURES_KEPT + 48)] == [FAILURES_KEPT + 49, FAILURES_KEPT + 50]
