"""The leader's `ClusterDeploymentManager` hooks the controller uses: `avoid` (nodes that get no new
instances, read each pass) and `on_write` (each write that succeeded, so the controller records
restarts and re-placements as its decisions). A fake store and leader: one pass, no event loop
timing."""

from __future__ import annotations

from typing import Any

import pytest

from aether.deploy.cluster_manager import ClusterDeploymentManager
from aether.deploy.reconcile import Write
from aether.kv.keys import BlueprintSlice, BlueprintValue, SliceStateValue

pytestmark = pytest.mark.timeout(10)

A = "org.demo:a:1.0.0"


class FakeKV:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = dict(data)
        self.refuse: set[str] = set()

    def list_local(self, prefix: str) -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    async def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        if key in self.refuse or self.data.get(key) != expected:
            return False
        if new is None:
            self.data.pop(key, None)
        else:
            self.data[key] = new
        return True


class FakeLeader:
    node_id = "node-1"
    is_leader = True
    leader = "node-1"
    members = ["node-1", "node-2", "node-3"]

    def __init__(self, up: set[str]) -> None:
        self.up = up
        self.listeners: list[Any] = []


async def test_avoid_hook_keeps_new_instances_off_and_on_write_sees_executed_writes() -> None:
    kv = FakeKV({"blueprints/x": BlueprintValue([BlueprintSlice(A, 4)])})
    seen: list[Write] = []
    mgr = ClusterDeploymentManager(
        kv, FakeLeader({"node-2", "node-3"}), avoid=lambda: {"node-2"}, on_write=seen.append,  # type: ignore[arg-type]
    )
    kv.refuse.add(f"slices/node-3/{A}")  # a refused CAS is not reported
    p = await mgr.reconcile_once()
    assert p is not None
    assert set(p.target[A]) == {"node-1", "node-3"}
    assert [w.key for w in seen] == [f"slices/node-1/{A}"]
    assert seen[0].why == "place"


async def test_a_failing_avoid_hook_places_everywhere() -> None:
    kv = FakeKV({"blueprints/x": BlueprintValue([BlueprintSlice(A, 3)])})

    def broken() -> set[str]:
        raise RuntimeError("boom")

    mgr = ClusterDeploymentManager(kv, FakeLeader({"node-2", "node-3"}), avoid=broken)  # type: ignore[arg-type]
    p = await mgr.reconcile_once()
    assert p is not None and set(p.target[A]) == {"node-1", "node-2", "node-3"}
    assert isinstance(kv.data[f"slices/node-2/{A}"], SliceStateValue)


@pytest.mark.parametrize("state", ["progressing", "paused", "rolling-back"])
async def test_a_rollout_whose_blueprint_was_deleted_ends_and_its_instances_go(state: str) -> None:
    """Deleting the only blueprint listing an artifact (or undeploying it) during a rollout: the
    rollout's counts used to keep both versions desired (they replace what the blueprints say);
    a paused rollout kept them running for ever, and a rolling-back one (no blueprint left to
    bring the old version back for) never ended. The leader now ends the rollout `aborted`,
    naming why, and removes the instances like for any deleted blueprint."""
    import msgspec

    from aether.deploy.rollout import begin
    from aether.kv.keys import RolloutPolicy

    old, new = "org.demo:a:1.0.0", "org.demo:a:2.0.0"
    r = begin("r1", "org.demo:a", "1.0.0", "2.0.0", 2, RolloutPolicy(), 1000.0)
    r = msgspec.structs.replace(r, state=state, new_instances=1)
    running = {
        f"slices/node-1/{old}": SliceStateValue("ACTIVE", 1.0, None, [0]),
        f"slices/node-2/{old}": SliceStateValue("ACTIVE", 1.0, None, [1]),
        f"slices/node-3/{new}": SliceStateValue("ACTIVE", 1.0, None, [0]),
    }
    kv = FakeKV({"rollouts/org.demo:a": r, **running})  # no blueprint lists org.demo:a any more
    mgr = ClusterDeploymentManager(kv, FakeLeader({"node-2", "node-3"}), wall=lambda: 1001.0)  # type: ignore[arg-type]
    p = await mgr.reconcile_once()
    assert p is not None
    ended = kv.data["rollouts/org.demo:a"]
    assert ended.state == "aborted" and ended.weights == {}
    assert "no blueprint lists org.demo:a" in ended.reason
    assert p.target == {}  # nothing desired: every instance of both versions is deactivated
    states = {k: v.state for k, v in kv.data.items() if k.startswith("slices/")}
    assert states == dict.fromkeys(running, "DEACTIVATE")
    # a rollout of an artifact a blueprint still lists is left alone
    bp = BlueprintValue([BlueprintSlice(new, 2)])
    kv2 = FakeKV({"rollouts/org.demo:a": r, "blueprints/x": bp, **running})
    mgr2 = ClusterDeploymentManager(kv2, FakeLeader({"node-2", "node-3"}), wall=lambda: 1001.0)  # type: ignore[arg-type]
    await mgr2.reconcile_once()
    # (rolling-back with the old version ready: rolled-back, as before)
    assert kv2.data["rollouts/org.demo:a"].state != "aborted"


async def test_the_leader_forgets_scale_values_no_blueprint_needs_but_keeps_those_of_a_rollout() -> None:
    """The backstop of `DeploymentService`'s own clean-up: a `scale/` value of an artifact that no
    blueprint autoscales any more (here its scaling rule was removed, and a version was replaced)
    is removed by the leader's pass; the old version of an active rollout keeps its value (a
    rollback brings it back with that count)."""
    from aether.deploy.rollout import begin
    from aether.kv.keys import RolloutPolicy, ScaleValue, ScalingRule

    b1, b2, c1, c2 = "org.demo:b:1.0.0", "org.demo:b:2.0.0", "org.demo:c:1.0.0", "org.demo:c:2.0.0"
    rule = ScalingRule(min=1, max=8, in_flight=4.0)
    kv = FakeKV({
        "blueprints/x": BlueprintValue([BlueprintSlice(A, 1), BlueprintSlice(b2, 1, scaling=rule),
                                        BlueprintSlice(c2, 1, scaling=rule)]),
        f"scale/{A}": ScaleValue(5, "operator", 1.0, "", 5, 5),  # A has no scaling rule any more
        f"scale/{b1}": ScaleValue(3, "controller", 1.0),  # replaced by b2, no rollout
        f"scale/{b2}": ScaleValue(3, "controller", 1.0),
        f"scale/{c1}": ScaleValue(4, "controller", 1.0),  # the old version of a running rollout
        "rollouts/org.demo:c": begin("r1", "org.demo:c", "1.0.0", "2.0.0", 4, RolloutPolicy(), 1000.0),
    })  # fmt: skip
    mgr = ClusterDeploymentManager(kv, FakeLeader({"node-2", "node-3"}))  # type: ignore[arg-type]
    await mgr.reconcile_once()
    assert sorted(k for k in kv.data if k.startswith("scale/")) == [f"scale/{b2}", f"scale/{c1}"]


async def test_a_rollback_writes_back_the_old_versions_own_slice_not_only_its_version() -> None:
    """The leader ended a rollback by swapping the coordinates in the blueprint: 1.0.0 came back
    with 2.0.0's config, limits, isolation and entry policies (and the node then reconfigured
    the old instances with them). It now writes back the slice the rollout recorded."""
    import msgspec

    from aether.core.policy import EntryPolicy
    from aether.deploy.rollout import abort, begin
    from aether.kv.keys import RolloutPolicy

    old, new = "org.demo:a:1.0.0", "org.demo:a:2.0.0"
    before = BlueprintSlice(old, 2, name="a", config={"currency": "EUR"}, max_concurrency=4,
                            entries={"charge": EntryPolicy(timeout=1.0)})  # fmt: skip
    after = BlueprintSlice(new, 2, name="a", config={"currency": "USD"}, max_concurrency=16,
                           isolation="process", entries={"refund": EntryPolicy(timeout=9.0)})  # fmt: skip
    dependent = BlueprintSlice("org.demo:b:1.0.0", 1, depends_on=[new], name="b")
    r = begin("r1", "org.demo:a", "1.0.0", "2.0.0", 2, RolloutPolicy(), 1000.0, blueprint="x",
              old_slice=before)
    r = abort(msgspec.structs.replace(r, new_instances=1), 1000.5)
    kv = FakeKV({
        "rollouts/org.demo:a": r,
        "blueprints/x": BlueprintValue([after, dependent]),
        f"slices/node-1/{old}": SliceStateValue("ACTIVE", 1.0, None, [0]),
        f"slices/node-2/{old}": SliceStateValue("ACTIVE", 1.0, None, [1]),
    })  # fmt: skip
    mgr = ClusterDeploymentManager(kv, FakeLeader({"node-2", "node-3"}), wall=lambda: 1001.0)  # type: ignore[arg-type]
    await mgr.reconcile_once()
    assert kv.data["rollouts/org.demo:a"].state == "aborted"
    a, b = kv.data["blueprints/x"].slices
    assert a == before
    assert b.depends_on == [old]
