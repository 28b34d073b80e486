"""Rollouts on real nodes in one event loop with the fake slice store of test_deploy_cluster:
rolling update bounds and route continuity, automatic rollback, commands, the canary error gate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aether.deploy.errors import DeploymentFailed, RolloutConflict, RolloutNotFound
from aether.kv.keys import BlueprintValue, RolloutValue
from test_deploy_cluster import HELLO, HELLO2, HELLO3, Cluster, bp, make_cluster, wait_for

__all__ = ["make_cluster"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(90)

NAME = "org.demo:hello"
PRESENT = ("LOAD", "LOADING", "LOADED", "ACTIVATE", "ACTIVATING", "ACTIVE")


def counts(c: Cluster, artifact: str, states: tuple[str, ...] = ("ACTIVE",)) -> int:
    return sum(len(v) for v in c.placement(artifact, states).values())


def record(c: Cluster) -> RolloutValue | None:
    v = c.up[0].node.kv.get_local(f"rollouts/{NAME}")
    return v if isinstance(v, RolloutValue) else None


async def watch_rollouts(c: Cluster) -> list[RolloutValue]:
    seen: list[RolloutValue] = []

    def on(ev: Any) -> None:
        v = record(c)
        if v is not None and (not seen or seen[-1] != v):
            seen.append(v)

    c.up[0].node.kv.watch("rollouts/", on)
    return seen


async def test_rolling_update_keeps_instances_serving_and_the_route_registered(make_cluster: Any) -> None:
    c = await make_cluster(3)
    svc = c.svc(0)
    await svc.apply_blueprint(bp("demo", (HELLO, 3)), "demo.toml")
    await svc.wait_converged("demo", timeout=10)
    samples: list[tuple[int, int, int, bool]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            routes = dict(c.kv("routes/"))
            old, new = counts(c, HELLO), counts(c, HELLO2)
            samples.append((old, new, old + counts(c, HELLO2, PRESENT), "routes/GET:/hello/{name}" in routes))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    await c.svc(1).apply_blueprint(bp("demo", (HELLO2, 3)), "demo.toml")  # the version changes: a rollout
    r = await svc.wait_rollout(NAME, timeout=30)
    await svc.wait_converged("demo", timeout=10)
    stop.set()
    await sampler
    assert r.state == "succeeded", r.history
    assert (r.old_version, r.new_version, r.strategy) == ("1.0.0", "2.0.0", "rolling")
    assert any(old == 3 and placed == 4 for old, _, placed, _ in samples), "a new instance starts first"
    assert min(old + new for old, new, _, _ in samples) >= 3, "never fewer than 3 ACTIVE instances"
    assert max(placed for _, _, placed, _ in samples) <= 4, "at most one surge instance serving or starting"
    assert all(route for *_, route in samples), "the route stays registered while versions change"
    assert counts(c, HELLO2) == 3
    await wait_for(lambda: counts(c, HELLO, PRESENT) == 0, what="old version unloaded")
    stored = svc.get_blueprint("demo")
    assert stored is not None and [s.artifact for s in stored.slices] == [HELLO2]
    assert any("step" in line for line in r.history) and "succeeded" in r.history[-1]


async def test_a_version_whose_start_fails_never_gets_traffic_and_is_rolled_back(make_cluster: Any) -> None:
    c = await make_cluster(3)
    svc = c.svc(0)
    await svc.apply_blueprint(bp("demo", (HELLO, 3)), "demo.toml")
    await svc.wait_converged("demo", timeout=10)
    c.behavior.fail_activate[HELLO3] = "start() raised: no database"
    seen = await watch_rollouts(c)
    serving: list[int] = []

    def on_slices(_ev: Any) -> None:
        serving.append(counts(c, HELLO))

    cancel = c.up[0].node.kv.watch("slices/", on_slices)
    await svc.apply_blueprint(bp("demo", (HELLO3, 3)), "demo.toml")
    with pytest.raises(DeploymentFailed, match=r"rolled-back: an instance of 3\.0\.0 failed"):
        await svc.wait_converged("demo", timeout=30)
    await asyncio.sleep(1.0)  # passes after the rollback
    cancel()
    assert serving and min(serving) == 3, "the old version kept all its instances through the rollback"
    r = record(c)
    assert r is not None and r.state == "rolled-back" and "no database" in r.reason
    assert seen and all(v.weights.get("3.0.0", 0) == 0 for v in seen), "the failed version never got traffic"
    await wait_for(lambda: counts(c, HELLO) == 3 and counts(c, HELLO3, PRESENT) == 0, what="back on 1.0.0")
    stored = svc.get_blueprint("demo")
    assert isinstance(stored, BlueprintValue) and [s.artifact for s in stored.slices] == [HELLO]
    # applying the same (bad) file again is a new attempt, not a no-op: the stored blueprint says 1.0.0
    c.behavior.fail_activate.clear()
    await svc.apply_blueprint(bp("demo", (HELLO3, 3)), "demo.toml")
    r2 = await svc.wait_rollout(NAME, timeout=30)
    assert r2.state == "succeeded" and r2.id != r.id


async def test_pause_resume_abort_and_undo(make_cluster: Any) -> None:
    c = await make_cluster(3)
    svc = c.svc(0)
    await svc.deploy(__import__("aether.core.artifact", fromlist=["Artifact"]).Artifact.parse(HELLO), 2)
    await svc.wait_converged([HELLO], timeout=10)
    with pytest.raises(RolloutNotFound):
        svc.rollout(NAME)
    r = await svc.update(NAME, "2.0.0", strategy="canary", steps=[50, 100], interval=60)
    assert (r.strategy, r.steps, r.state) == ("canary", [50, 100], "progressing")
    await wait_for(lambda: (record(c) or r).weights.get("2.0.0") == 50, what="first canary step")
    paused = await c.svc(2).pause_rollout(NAME)
    assert paused.state == "paused"
    with pytest.raises(RolloutConflict, match="only a progressing rollout can be paused"):
        await svc.pause_rollout(NAME)
    with pytest.raises(RolloutConflict, match="is paused"):
        await svc.update(NAME, "3.0.0")
    resumed = await svc.resume_rollout(NAME)
    assert resumed.state == "progressing"
    aborted = await svc.abort_rollout(NAME)
    assert aborted.state == "rolling-back" and aborted.weights == {"1.0.0": 1}
    done = await svc.wait_rollout(NAME, timeout=20)
    assert done.state == "aborted"
    await wait_for(lambda: counts(c, HELLO) == 2 and counts(c, HELLO2, PRESENT) == 0, what="aborted to 1.0.0")
    # a rolling update that succeeds, then undo: back to 1.0.0 through a new rollout
    await svc.update(NAME, "2.0.0", strategy="rolling")
    assert (await svc.wait_rollout(NAME, timeout=20)).state == "succeeded"
    undo = await svc.undo_rollout(NAME)
    assert (undo.old_version, undo.new_version) == ("2.0.0", "1.0.0")
    assert (await svc.wait_rollout(NAME, timeout=20)).state == "succeeded"
    await wait_for(lambda: counts(c, HELLO) == 2 and counts(c, HELLO2, PRESENT) == 0, what="undone to 1.0.0")


async def test_canary_error_gate_rolls_back_on_the_metrics(make_cluster: Any) -> None:
    c = await make_cluster(3)
    calls: dict[str, list[int]] = {HELLO: [0, 0], HELLO2: [0, 0]}  # coords -> [calls, failures]
    read: list[tuple[int, int]] = []  # what the leader's passes read of 2.0.0, in order

    def counters(a: str) -> dict[str, tuple[int, int, int, list[int]]]:
        if a == HELLO2:
            read.append((calls[a][0], calls[a][1]))
        return {"node-1": (1, calls[a][0], calls[a][1], [calls[a][0], 0, 0, 0])} if a in calls else {}

    for m in c.members:  # what the leader's metrics say (per-node cumulative counters)
        m.cm._counters = counters
        m.cm._bounds = [0.001, 0.01, 0.1]
    svc = c.svc(0)
    await svc.apply_blueprint(bp("demo", (HELLO, 3)), "demo.toml")
    await svc.wait_converged("demo", timeout=10)
    await svc.update(NAME, "2.0.0", strategy="canary", steps=[10, 100], interval=60, max_error_rate=0.1,
                     min_calls=20)  # fmt: skip
    await wait_for(lambda: (r := record(c)) is not None and r.weights.get("2.0.0") == 10, what="canary step")
    step = record(c)
    assert step is not None
    # the leader's first pass of the step takes its baseline: a sleep of 0.6 s for it lost the race
    # to a late pass (a loaded machine; a 0.7 s delay injected before the leader's rollout passes:
    # the baseline read [10, 9] and the gate counted 11 failures, not 20)
    await wait_for(
        lambda: any((step.id, HELLO2, step.step_started) in m.cm._baselines for m in c.up),
        what="the leader's baseline of the step",
    )
    calls[HELLO2] = [10, 9]
    await wait_for(lambda: read.count((10, 9)) >= 2, what="two passes of the leader read 10 calls")
    r = record(c)
    assert r is not None and r.state == "progressing", "too few calls to judge"
    calls[HELLO2] = [40, 20]
    done = await svc.wait_rollout(NAME, timeout=20)
    assert done.state == "rolled-back" and "failed" in done.reason and "max_error_rate" in done.reason
    assert done.failures >= 20 and done.calls >= 40


async def test_an_autoscaled_slice_keeps_its_count_across_an_update(make_cluster: Any) -> None:
    c = await make_cluster(3)
    svc = c.svc(0)

    def blueprint(coords: str) -> str:
        return (f'id = "demo"\n[slices.hello]\nartifact = "{coords}"\ninstances = 2\n'
                "[slices.hello.scaling]\nmin = 2\nmax = 6\nin_flight = 4\n")  # fmt: skip

    await svc.apply_blueprint(blueprint(HELLO), "demo.toml")
    await svc.scale_to(HELLO, 4)  # as the controller or an operator would: 4, not the blueprint's 2
    await wait_for(lambda: counts(c, HELLO) == 4, what="scaled to 4")
    await svc.apply_blueprint(blueprint(HELLO2), "demo.toml")
    r = record(c)
    assert r is not None and r.instances == 4
    assert (await svc.wait_rollout(NAME, timeout=30)).state == "succeeded"
    await wait_for(lambda: counts(c, HELLO2) == 4 and counts(c, HELLO, PRESENT) == 0, what="4 of 2.0.0")
    await asyncio.sleep(1.2)  # a few passes later the count holds
    assert counts(c, HELLO2) == 4
    # the old version's value is forgotten once the rollout is over (a later apply of 1.0.0 would
    # otherwise start from that count, or from an operator's pin of long ago)
    await wait_for(lambda: set(svc.scales()) == {HELLO2}, what="scale/ of 1.0.0 forgotten")


async def test_the_leader_stopped_mid_rollout_the_next_leader_finishes_it(make_cluster: Any) -> None:
    """The rollout lives in the store, not in the leader: a new leader picks it up at the step it
    had reached and finishes it, with the old version serving until the new one is ready."""
    c = await make_cluster(3)
    svc = c.svc(1)
    await svc.apply_blueprint(bp("demo", (HELLO, 2)), "demo.toml")
    await svc.wait_converged("demo", timeout=10)
    await svc.update(NAME, "2.0.0", strategy="canary", steps=[50, 100], interval=1.5)
    await wait_for(lambda: (r := record(c)) is not None and r.weights.get("2.0.0") == 50, what="canary step")
    before = record(c)
    assert before is not None and before.state == "progressing" and before.step == 0
    await c.stop(0)  # the leader, mid-step
    await wait_for(lambda: c.members[1].node.leader.is_leader, what="node-2 leads")
    mid = record(c)
    assert mid is not None and mid.state == "progressing" and mid.step == 0, "the new leader resumes the step"
    done = await svc.wait_rollout(NAME, timeout=30)
    assert done.state == "succeeded", done.history
    assert done.history[: len(before.history)] == before.history, "one history, carried on"
    await svc.wait_converged("demo", timeout=15)
    await wait_for(
        lambda: counts(c, HELLO2) == 2
        and counts(c, HELLO, PRESENT) == 0
        and "node-1" not in c.placement(HELLO2),
        what="2 instances of 2.0.0 on the live nodes",
    )
    stored = svc.get_blueprint("demo")
    assert stored is not None and [s.artifact for s in stored.slices] == [HELLO2]
