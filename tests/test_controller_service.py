"""`ControllerService` with a scripted core and an in-memory store: the observation it builds, how it
carries out decisions (scale/ CAS with the operator's bounds kept and one retry, replace, recover,
dry run), the sync to followers and a new leader inheriting the memory, the config watch, the
reconciler's writes recorded as decisions, the bounded history."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from aether.controller.service import ControllerService, build_observation
from aether.controller.types import AlertState, ControllerMemory, ControllerSync, Decision
from aether.deploy.reconcile import Write
from aether.kv.keys import (
    BlueprintSlice,
    BlueprintValue,
    ControllerConfigValue,
    ScaleValue,
    ScalingRule,
    SliceStateValue,
)
from aether.metrics.messages import ClusterMetricsSnapshot, ClusterTotals, InstanceStats, NodeStats, SliceLoad
from controller_fakes import FakeKV, FakeLeader, FakeMetrics, FakeTransport, ScriptedCore

pytestmark = pytest.mark.timeout(20)

A = "org.demo:a:1.0.0"
B = "org.demo:b:1.0.0"
N = ["node-1", "node-2", "node-3"]
RULE = ScalingRule(min=1, max=8, in_flight=4.0)


def bp() -> BlueprintValue:
    return BlueprintValue([BlueprintSlice(A, 2, scaling=RULE), BlueprintSlice(B, 1)])


def snapshot(t: float) -> ClusterMetricsSnapshot:
    nodes = [NodeStats("node-1", 12.0, 1, 1.0, 0.0, 0, 0.0, loop_lag_ms=3.0),
             NodeStats("node-2", 50.0, 1, 1.0, 0.0, 0, 0.0, loop_lag_ms=400.0)]
    return ClusterMetricsSnapshot("node-1", 1, t, nodes, [], ClusterTotals(0, 0, 0, 0, 0, 0, 2, 0, 0), [])


def test_build_observation() -> None:
    slices = {
        "node-1": {A: SliceStateValue("ACTIVE", 1.0, None, [0]),
                   B: SliceStateValue("LOADING", 7.0, None, [0])},
        "node-2": {A: SliceStateValue("ACTIVE", 1.0, None, [1, 2])},
        "node-3": {A: SliceStateValue("FAILED", 1.0, "boom", [3])},
    }
    load = SliceLoad(A, 3, 5, 1, 40.0, 40.0, 0.0, 0.0, 50.0, 60.0, 20.0)
    inst = InstanceStats("node-1", A, 0, 2, 0, 10.0, 10.0, 0.0, 0.0, 50.0, 10, 0)
    obs = build_observation(
        1000.0, blueprints=[bp()], scales={A: ScaleValue(3, "controller", 1.0, min=2, max=5)}, slices=slices,
        members=N, up={"node-1", "node-2"}, snapshot=snapshot(998.5), slice_loads={A: load},
        instance_stats=[inst],
    )
    assert obs.metrics_age == 1.5 and obs.snapshot is not None
    assert [(n.node_id, n.up, n.loop_lag_ms) for n in obs.nodes] == [
        ("node-1", True, 3.0), ("node-2", True, 400.0), ("node-3", False, None)]
    a, b = obs.slices
    assert (a.artifact, a.desired, a.rule, a.min, a.max, a.bounds_source) == (A, 3, RULE, 2, 5, "operator")
    assert a.placement == {"node-1": [0], "node-2": [1, 2]} and a.active == 3  # FAILED is not placed
    assert a.load == load and a.instances == [inst]
    assert (b.artifact, b.desired, b.rule, b.min, b.max, b.active, b.load) == (B, 1, None, 1, 1, 0, None)
    assert b.placement == {"node-1": [0]}
    (k,) = obs.keys
    assert (k.node_id, k.artifact, k.state, k.since, k.instances) == ("node-1", B, "LOADING", 7.0, [0])
    none = build_observation(5.0, blueprints=[], scales={}, slices={}, members=N, up=set(N), snapshot=None,
                             slice_loads={}, instance_stats=[])
    assert none.metrics_age is None and none.slices == []


class Cluster:
    """Three services over one fake store and fake transports; node-1 leads."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.kv = FakeKV(data)
        self.net: dict[str, ControllerService] = {}
        self.cores: dict[str, list[ScriptedCore]] = {n: [] for n in N}
        self.leaders = {n: FakeLeader(n, N, "node-1") for n in N}
        self.events: dict[str, list[object]] = {n: [] for n in N}
        self.metrics = FakeMetrics()
        self.plan: Any = lambda obs: []
        self.clock = 1000.0
        for n in N:
            def factory(cfg: Any, mem: Any, n: str = n) -> ScriptedCore:
                core = ScriptedCore(cfg, mem)
                core.plan = lambda obs: self.plan(obs)
                self.cores[n].append(core)
                return core

            self.net[n] = ControllerService(
                self.kv, self.leaders[n], FakeTransport(n, self.net), self.metrics,  # type: ignore[arg-type]
                core_factory=factory, publish=self.events[n].append, clock=lambda: self.clock,
            )

    async def start(self) -> None:
        for s in self.net.values():
            s._load_config()
            s._cancels.append(s.kv.watch("controller/config", s._on_config))

    def lead(self, node: str) -> None:
        for lm in self.leaders.values():
            lm.leader = node

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        tasks = [t for s in self.net.values() for t in s._writes]
        if tasks:
            await asyncio.gather(*tasks)


async def test_scale_decision_writes_scale_key_keeping_operator_bounds_and_retries_once() -> None:
    c = Cluster({"blueprints/x": bp(), f"scale/{A}": ScaleValue(2, "operator", 1.0, "", 1, 6)})
    await c.start()
    leader = c.net["node-1"]
    c.plan = lambda obs: [{"kind": "scale_up", "artifact": A, "from_count": 2, "to_count": 9}]
    c.kv.refuse[f"scale/{A}"] = 1  # the first CAS loses to another writer: re-read, retry
    (d,) = leader.tick()
    await c.settle()
    v = c.kv.data[f"scale/{A}"]
    assert (v.instances, v.source, v.min, v.max, v.reason) == (6, "controller", 1, 6, "scripted")  # clamped
    assert len(c.kv.cas_calls) == 2
    # the core saw the blueprint's rule with the operator's bounds
    obs = c.cores["node-1"][0].observations[0]
    assert (obs.slices[0].min, obs.slices[0].max, obs.slices[0].bounds_source) == (1, 6, "operator")
    assert leader.history[-1] == d and c.events["node-1"] == [d]
    assert leader.steps == 1 and leader.step_seconds > 0


async def test_dry_run_records_without_writing_and_skips_are_not_applied() -> None:
    dry = ControllerConfigValue("dry_run = true", 1.0, "ops")
    c = Cluster({"blueprints/x": bp(), "controller/config": dry})
    await c.start()
    c.plan = lambda obs: [{"kind": "scale_up", "artifact": A, "to_count": 4},
                          {"kind": "skip", "artifact": A, "rule": "cooldown"}]
    ds = c.net["node-1"].tick()
    await c.settle()
    assert [d.applied for d in ds] == [False, False]
    assert c.kv.cas_calls == [] and f"scale/{A}" not in c.kv.data
    st = c.net["node-1"].status()
    assert st.dry_run and st.config_by == "ops"


async def test_replace_and_recover() -> None:
    active = SliceStateValue("ACTIVE", 1.0, None, [0, 4])
    stuck = SliceStateValue("ACTIVATING", 2.0, None, [1])
    c = Cluster({"blueprints/x": bp(), f"slices/node-2/{A}": active, f"slices/node-3/{A}": stuck})
    await c.start()
    c.plan = lambda obs: [
        {"kind": "replace", "artifact": A, "node": "node-2", "instance": 4, "reason": "health failed"},
        {"kind": "recover", "artifact": A, "node": "node-3"},
    ]
    c.net["node-1"].tick()
    await c.settle()
    assert c.kv.data[f"slices/node-2/{A}"] == SliceStateValue("ACTIVE", 1000.0, "health failed", [0])
    assert f"slices/node-3/{A}" not in c.kv.data
    assert c.kv.cas_calls[1] == (f"slices/node-3/{A}", stuck, None)  # expected: the value observed
    # a replace of an instance that is gone writes nothing
    c.plan = lambda obs: [{"kind": "replace", "artifact": A, "node": "node-2", "instance": 4}]
    c.net["node-1"].tick()
    await c.settle()
    assert len(c.kv.cas_calls) == 2
    # replacing the last instance on a node deactivates the slice there (no ACTIVE key without ids)
    last = {"kind": "replace", "artifact": A, "node": "node-2", "instance": 0, "reason": "sick"}
    c.plan = lambda obs: [last]
    c.net["node-1"].tick()
    await c.settle()
    assert c.kv.data[f"slices/node-2/{A}"] == SliceStateValue("DEACTIVATE", 1000.0, "sick", [0])


async def test_followers_merge_decisions_and_a_new_leader_inherits_the_memory() -> None:
    c = Cluster({"blueprints/x": bp()})
    await c.start()
    c.plan = lambda obs: [{"kind": "skip", "artifact": A, "rule": "tolerance"}]
    for _ in range(3):
        c.net["node-1"].tick()
    c.cores["node-1"][0].memory.avoided = ["node-3"]
    c.net["node-1"].tick()
    f = c.net["node-2"]
    assert [d.seq for d in f.history] == [1, 2, 3, 4] and [d.seq for d in c.events["node-2"]] == [1, 2, 3, 4]
    assert f.memory is not None and f.memory.seq == 4 and f.avoided() == {"node-3"}
    st = f.status()
    assert st.synced_from == "node-1" and not st.running and st.last_seq == 4 and st.avoided == ["node-3"]
    # a sync repeated or older is ignored; a forged one (leader != sender) too
    f.on_message("node-1", ControllerSync("node-1", 1, ControllerMemory(seq=99), []))
    f.on_message("node-3", ControllerSync("node-1", 50, ControllerMemory(seq=99), []))
    assert f.memory.seq == 4
    # node-1 goes away; node-2 leads and continues from the inherited memory
    c.net["node-2"].transport.down.add("node-1")  # type: ignore[attr-defined]
    c.lead("node-2")
    assert c.net["node-1"].tick() == [] and c.net["node-1"].core is None
    (d,) = c.net["node-2"].tick()
    assert d.seq == 5 and c.cores["node-2"][0].memory.avoided == ["node-3"]
    assert [x.seq for x in c.net["node-3"].history] == [1, 2, 3, 4, 5]
    # node-1 comes back as a follower before its own loop noticed it lost the lead: the sync of
    # node-2 wins over its stale core's memory
    c.net["node-1"].core = c.cores["node-1"][0]
    c.net["node-2"].transport.down.discard("node-1")  # type: ignore[attr-defined]
    c.net["node-2"].tick()
    assert c.net["node-1"].core is None and c.net["node-1"].memory.seq == 6  # type: ignore[union-attr]
    assert c.net["node-1"].status().synced_from == "node-2"


async def test_config_watch_keeps_previous_config_on_bad_text() -> None:
    c = Cluster({"blueprints/x": bp()})
    await c.start()
    s = c.net["node-2"]
    await s.set_config_text("[scaling]\ntolerance = 0.2\n", by="alice")
    assert s.config.scaling.tolerance == 0.2 and s.config_error is None
    await c.kv.put("controller/config", ControllerConfigValue("[scaling]\ntolerance = 7", 2.0))
    assert s.config.scaling.tolerance == 0.2 and s.config_error is not None and "tolerance" in s.config_error
    from aether.core.errors import BadRequest

    with pytest.raises(BadRequest, match="not valid TOML"):
        await s.set_config_text("[[[")
    c.net["node-1"].tick()
    await c.kv.put("controller/config", ControllerConfigValue("dry_run = true", 3.0))
    assert c.cores["node-1"][0].config.dry_run  # the running core gets set_config


async def test_reconciler_writes_become_decisions() -> None:
    c = Cluster({"blueprints/x": bp()})
    await c.start()
    leader = c.net["node-1"]
    failed = SliceStateValue("FAILED", 1.0, "start() raised", [2])
    leader.on_write(Write(f"slices/node-2/{A}", failed, SliceStateValue("UNLOAD", 2.0, "x", [2]),
                          "unload failed instance"))  # no core yet: not the running leader
    assert list(leader.history) == []
    leader.tick()
    leader.on_write(Write(f"slices/node-2/{A}", failed, SliceStateValue("UNLOAD", 2.0, "x", [2]),
                          "unload failed instance"))
    leader.on_write(Write(f"slices/node-3/{A}", SliceStateValue("ACTIVE", 1.0, None, [0, 1]), None,
                          "node node-3 is down"))
    leader.on_write(Write(f"endpoints/{A}/greet:0", None, None, "node node-3 is down"))  # not a slice key
    leader.on_write(Write(f"slices/node-1/{A}", None, SliceStateValue("LOAD", 1.0, None, [0]), "place"))
    restart, re_place = leader.history
    assert (restart.kind, restart.node, restart.source, restart.seq) == ("restart", "node-2", "reconciler", 1)
    assert "start() raised" in restart.reason
    assert (re_place.kind, re_place.node, re_place.inputs) == ("re_place", "node-3", {"instances": 2})


async def test_history_is_bounded_and_decisions_query() -> None:
    c = Cluster({"blueprints/x": bp()})
    await c.start()
    s = c.net["node-1"]
    s.history = type(s.history)(maxlen=5)
    s._add([Decision(i, float(i), "skip", "r", "x", applied=False) for i in range(1, 9)], submit=False)
    assert [d.seq for d in s.history] == [4, 5, 6, 7, 8]
    assert [d.seq for d in s.decisions(since=5, limit=10)] == [6, 7, 8]
    assert [d.seq for d in s.decisions(limit=2)] == [7, 8]
    assert [d.seq for d in await s.wait_decisions(7, 0.01)] == [8]
    assert await s.wait_decisions(8, 0.01) == []
    later = asyncio.get_running_loop().call_later(
        0.05, lambda: s._add([Decision(9, 9.0, "skip", "r", "x")], submit=False))
    assert [d.seq for d in await s.wait_decisions(8, 2.0)] == [9]
    later.cancel()


async def test_alerts_view() -> None:
    c = Cluster({"controller/config": ControllerConfigValue(
        '[[alerts]]\nname = "slow"\nmetric = "entry.p99_ms"\nthreshold = 100.0\nfor = 5.0\n'
        'severity = "critical"\n',
        1.0)})
    await c.start()
    s = c.net["node-2"]
    assert s.alerts() == []
    mem = ControllerMemory(alerts={
        "slow{artifact=a,entry=e}": AlertState("pending", 20.0, 120.0, {"artifact": "a", "entry": "e"}),
        "slow{artifact=b,entry=e}": AlertState("firing", 30.0, 300.0, {"artifact": "b", "entry": "e"}),
    })
    s.on_message("node-1", ControllerSync("node-1", 1, mem, []))
    firing, pending = s.alerts()
    assert (firing.state, firing.name, firing.severity, firing.for_, firing.value) == (
        "firing", "slow", "critical", 5.0, 300.0)
    assert pending.state == "pending" and pending.labels == {"artifact": "a", "entry": "e"}


def test_the_controller_does_not_scale_an_artifact_during_its_rollout() -> None:
    """During a canary the new version gets a share of the calls only; the controller used to scale
    its `scale/` count by that share (down to min within a minute), and the rollout's end then left
    the artifact on that count under the full load. It now holds the count while a rollout of the
    artifact is active (docs/deployment.md, *Known limits*), and scales again once it ended."""
    from aether.controller.config import ControllerConfig
    from aether.controller.core import Controller
    from aether.deploy.rollout import begin
    from aether.kv.keys import RolloutPolicy

    new = "org.demo:a:2.0.0"
    bps = [BlueprintValue([BlueprintSlice(new, 6, scaling=RULE)])]
    scales = {new: ScaleValue(6, "controller", 1.0)}
    running = begin("r1", "org.demo:a", "1.0.0", "2.0.0", 6, RolloutPolicy(strategy="canary"), 900.0)
    slices = {"node-1": {new: SliceStateValue("ACTIVE", 1.0, None, [0])},
              "node-2": {"org.demo:a:1.0.0": SliceStateValue("ACTIVE", 1.0, None, [0, 1, 2, 3, 4, 5])}}
    canary_share = SliceLoad(new, 1, 1, 0, 4.0, 4.0, 0.0, 0.0, 250.0, 260.0, 10.0)  # wants 0.25 instances
    core = Controller(ControllerConfig())

    def step(t: float, rollouts: list[Any]) -> list[Decision]:
        obs = build_observation(
            t, blueprints=bps, scales=scales, slices=slices, members=N, up=set(N), snapshot=snapshot(t),
            slice_loads={new: canary_share}, instance_stats=[], rollouts=rollouts,
        )  # fmt: skip
        return [d for d in core.step(obs) if d.kind in ("scale_up", "scale_down")]

    assert [d for t in range(1000, 1120) for d in step(float(t), [running])] == []
    done = msgspec.structs.replace(running, state="succeeded")
    after = [d for t in range(1120, 1240) for d in step(float(t), [done])]
    assert any(d.to_count is not None and d.to_count < 6 for d in after)
