"""The leader's pure reconciliation pass: which CAS writes it decides for a given store content."""

from __future__ import annotations

import pytest

from aether.deploy.reconcile import DesiredSlice, FailureTracker, Write, desired_state, plan
from aether.kv.keys import BlueprintSlice, BlueprintValue, EndpointValue, RouteValue, SliceStateValue

pytestmark = pytest.mark.timeout(10)

A = "org.demo:a:1.0.0"
B = "org.demo:b:1.0.0"
N = ["node-1", "node-2", "node-3"]


def sv(state: str, ids: list[int], reason: str | None = None, ts: float = 1.0) -> SliceStateValue:
    return SliceStateValue(state, ts, reason, ids)


def run(
    desired: dict[str, DesiredSlice],
    slices: dict[str, dict[str, SliceStateValue]],
    *,
    up: list[str] = N,
    grace: set[str] | None = None,
    endpoints: list[tuple[str, EndpointValue]] | None = None,
    routes: list[tuple[str, RouteValue]] | None = None,
    tracker: FailureTracker | None = None,
    now: float = 100.0,
) -> list[Write]:
    tracker = tracker or FailureTracker()
    return plan(desired, up, grace or set(), slices, endpoints or [], routes or [], tracker, now, 5.0).writes


def cmds(writes: list[Write]) -> dict[str, tuple[str | None, list[int] | None]]:
    out: dict[str, tuple[str | None, list[int] | None]] = {}
    for w in writes:
        new = w.new
        out[w.key] = (new.state, new.instances) if isinstance(new, SliceStateValue) else (None, None)
    return out


def test_desired_is_max_over_blueprints_and_deps_union() -> None:
    d = desired_state([
        BlueprintValue([BlueprintSlice(B, 1), BlueprintSlice(A, 2, [B])]),
        BlueprintValue([BlueprintSlice(A, 3, ["org.demo:c:1.0.0"])]),
    ])
    assert d == {A: DesiredSlice(3, (B, "org.demo:c:1.0.0")), B: DesiredSlice(1, ())}


def test_fresh_deploy_writes_load_commands_spread_over_nodes() -> None:
    writes = run({A: DesiredSlice(4)}, {})
    assert cmds(writes) == {
        f"slices/node-1/{A}": ("LOAD", [0, 3]),
        f"slices/node-2/{A}": ("LOAD", [1]),
        f"slices/node-3/{A}": ("LOAD", [2]),
    }
    assert all(w.expected is None for w in writes)  # CAS absent -> LOAD


def test_activation_waits_for_dependencies() -> None:
    desired = {B: DesiredSlice(1), A: DesiredSlice(1, (B,))}
    slices = {"node-1": {A: sv("LOADED", [0])}, "node-2": {B: sv("LOADED", [0])}}
    assert cmds(run(desired, slices)) == {f"slices/node-2/{B}": ("ACTIVATE", [0])}
    slices["node-2"][B] = sv("ACTIVATING", [0])
    assert cmds(run(desired, slices)) == {}
    slices["node-2"][B] = sv("ACTIVE", [0])
    writes = run(desired, slices)
    assert cmds(writes) == {f"slices/node-1/{A}": ("ACTIVATE", [0])}
    assert writes[0].expected == sv("LOADED", [0])  # CAS on the observed LOADED


def test_scale_and_removal_commands() -> None:
    slices = {"node-1": {A: sv("ACTIVE", [0, 3])}, "node-2": {A: sv("ACTIVE", [1])},
              "node-3": {A: sv("ACTIVE", [2]), B: sv("LOADED", [0])}}
    assert cmds(run({A: DesiredSlice(3)}, slices)) == {
        f"slices/node-1/{A}": ("ACTIVE", [0]),  # scale down on the fullest node
        f"slices/node-3/{B}": ("UNLOAD", [0]),  # not desired any more
    }
    assert cmds(run({}, slices)) == {
        f"slices/node-1/{A}": ("DEACTIVATE", [0, 3]),
        f"slices/node-2/{A}": ("DEACTIVATE", [1]),
        f"slices/node-3/{A}": ("DEACTIVATE", [2]),
        f"slices/node-3/{B}": ("UNLOAD", [0]),
    }
    # in-transit states are left alone
    busy = {"node-1": {A: sv("LOADING", [0])}, "node-2": {A: sv("DEACTIVATING", [1])}}
    assert cmds(run({}, busy)) == {}


def test_dead_node_keys_and_endpoints_removed_and_instances_replaced() -> None:
    slices = {n: {A: sv("ACTIVE", [i])} for i, n in enumerate(N)}
    eps = [(f"endpoints/{A}/hello:2", EndpointValue("node-3", "ACTIVE")),
           (f"endpoints/{A}/hello:0", EndpointValue("node-1", "ACTIVE"))]
    # within the grace period: nothing happens
    two = ["node-1", "node-2"]
    assert cmds(run({A: DesiredSlice(3)}, slices, up=two, grace={"node-3"}, endpoints=eps)) == {}
    writes = run({A: DesiredSlice(3)}, slices, up=["node-1", "node-2"], endpoints=eps)
    assert cmds(writes) == {
        f"slices/node-3/{A}": (None, None),
        f"endpoints/{A}/hello:2": (None, None),
        f"slices/node-1/{A}": ("ACTIVE", [0, 2]),  # id 2 re-placed on the least loaded survivor
    }


def test_failed_instance_backoff_then_unload_with_reason_kept() -> None:
    tracker = FailureTracker(base=1.0, cap=30.0)
    slices = {"node-1": {A: sv("ACTIVE", [0])},
              "node-2": {A: sv("FAILED", [1], "activate failed: boom", ts=7.0)},
              "node-3": {A: sv("ACTIVE", [2])}}
    writes = run({A: DesiredSlice(3)}, slices, tracker=tracker, now=100.0)
    # FAILED stays visible during the backoff; its instance is re-placed right away elsewhere
    assert cmds(writes) == {f"slices/node-1/{A}": ("ACTIVE", [0, 1])}
    assert tracker.failures == {(A, "node-2"): 1}
    writes = run({A: DesiredSlice(3)}, slices, tracker=tracker, now=100.5)
    assert cmds(writes) == {f"slices/node-1/{A}": ("ACTIVE", [0, 1])}
    writes = run({A: DesiredSlice(3)}, slices, tracker=tracker, now=101.0)
    unload = [w for w in writes if w.key == f"slices/node-2/{A}"]
    assert unload and unload[0].new.state == "UNLOAD" and unload[0].new.reason == "activate failed: boom"
    assert tracker.failures == {(A, "node-2"): 1}  # the same report is counted once


def test_backoff_grows_and_node_avoided_after_repeated_failures() -> None:
    tracker = FailureTracker(base=1.0, cap=4.0, max_per_node=2)
    for k, ts in enumerate([1.0, 2.0, 3.0, 4.0]):
        tracker.observe({"node-2": {A: sv("FAILED", [0], "x", ts=ts)}}, 100.0)
        assert tracker.blocked_until[(A, "node-2")] == 100.0 + min(4.0, 2.0 ** k)
    assert tracker.excluded(A, N, 200.0) == {(A, "node-2")}  # avoided: others are eligible
    assert tracker.excluded(A, ["node-2"], 200.0) == set()  # unless it is the only one
    tracker.observe({"node-2": {A: sv("ACTIVE", [0])}}, 201.0)
    assert tracker.excluded(A, N, 201.0) == set()


def test_route_sweep_only_when_no_instance_anywhere() -> None:
    route = [("routes/GET:/a", RouteValue(A, "hello"))]
    assert cmds(run({}, {}, routes=route)) == {"routes/GET:/a": (None, None)}
    assert cmds(run({A: DesiredSlice(1)}, {"node-1": {A: sv("ACTIVATING", [0])}}, routes=route)) == {}
    eps = [(f"endpoints/{A}/hello:0", EndpointValue("node-2", "ACTIVE"))]
    assert cmds(run({}, {}, routes=route, endpoints=eps)) == {}


def test_route_of_a_wanted_artifact_whose_start_failed_is_kept() -> None:
    """Every instance FAILED (start() raised), nothing serves, but a blueprint still wants the
    artifact: the sweep used to remove its routes, so a request to one answered 404 "no route"
    instead of the invoker's 503 saying why. Kept while wanted (any version), swept once not."""
    route = [("routes/GET:/a", RouteValue(A, "hello"))]
    failed = {"node-1": {A: sv("FAILED", [0], "activate failed: start() raised: boom")}}
    writes = cmds(run({A: DesiredSlice(1)}, failed, routes=route))
    assert "routes/GET:/a" not in writes, writes
    # another version of it wanted (a rollout to 2.0.0): the route serves it too, kept
    assert "routes/GET:/a" not in cmds(run({"org.demo:a:2.0.0": DesiredSlice(1)}, {}, routes=route))
    # not wanted any more (blueprint removed): swept
    assert cmds(run({}, failed, routes=route))["routes/GET:/a"] == (None, None)
    assert cmds(run({A: DesiredSlice(0)}, {}, routes=route)) == {"routes/GET:/a": (None, None)}


def test_avoided_node_gets_no_new_instances_but_keeps_its_own() -> None:
    tracker = FailureTracker()
    # node-2 already runs instance 1; scaling to 5 must place the new ones on node-1 and node-3 only
    slices = {n: {A: sv("ACTIVE", [i])} for i, n in enumerate(N)}
    p = plan({A: DesiredSlice(5)}, N, set(), slices, [], [], tracker, 100.0, 5.0, avoid={"node-2"})
    assert p.target[A]["node-2"] == [1]  # existing instance stays
    assert sum(len(ids) for ids in p.target[A].values()) == 5
    assert f"slices/node-2/{A}" not in cmds(p.writes)
    # a fresh deployment avoids it too
    p = plan({B: DesiredSlice(3)}, N, set(), {}, [], [], FailureTracker(), 100.0, 5.0, avoid={"node-2"})
    assert set(p.target[B]) == {"node-1", "node-3"}


def test_avoid_is_ignored_when_every_live_node_is_avoided() -> None:
    p = plan({A: DesiredSlice(3)}, N, set(), {}, [], [], FailureTracker(), 100.0, 5.0, avoid=set(N))
    assert set(p.target[A]) == set(N)
    # a down node in the avoid set does not count as a live alternative
    p = plan({A: DesiredSlice(2)}, ["node-1"], set(), {}, [], [], FailureTracker(), 100.0, 5.0,
             avoid={"node-1", "node-9"})
    assert p.target[A] == {"node-1": [0, 1]}
