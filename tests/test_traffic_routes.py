"""Routes across the versions of one artifact and the draining order, on real nodes in one event loop
with the fake slice store of tests/test_deploy_cluster.py (no cluster manager: the test plays the
leader and writes the commands itself).

A route belongs to the artifact, not to one version: it stays registered while any version has an
instance (the last instance of a version going away hands the route to a version that still
serves), and is removed when the last version goes. Endpoints of an instance that is deactivated or
scaled away are withdrawn before the slice store drains it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aether.deploy.lifecycle import LifecycleTimeouts
from aether.kv.keys import RouteValue, SliceKey, SliceStateValue
from aether.kv.machine import WatchEvent
from test_deploy_cluster import (
    CATALOG,
    HELLO,
    HELLO_BINDINGS,
    Behavior,
    BoundRoute,
    Cluster,
    FakeInfo,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

HELLO2 = "org.demo:hello:1.1.0"  # the new version of HELLO (1.0.0): same route, same entries
ROUTE = "routes/GET:/hello/{name}"


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setitem(
        CATALOG,
        HELLO2,
        FakeInfo(
            {"greet": None, "shout": None},
            [BoundRoute("GET", "/hello/{name}", "greet", ["name"], HELLO_BINDINGS)],
        ),
    )
    c = Cluster(tmp_path, 3, Behavior(), LifecycleTimeouts(activate=3.0), leaders=False)
    try:
        for i in range(3):
            await c.start(i)
        first = c.members[0].node
        await wait_for(lambda: all(m.node.leader.leader == first.node_id for m in c.up), what="leader")
        yield c
    finally:
        for i in range(3):
            await c.stop(i)


async def command(c: Cluster, node: str, artifact: str, st: str, ids: list[int], expect: str) -> None:
    """Play a leader: CAS `st(ids)` onto `node`'s key of `artifact`, wait until it reports `expect`."""
    kv = c.members[0].node.kv
    key = SliceKey(node, artifact)
    new = SliceStateValue(st, time.time(), None, ids)
    assert await kv.compare_and_set(key, kv.get_local(key), new)

    def reported() -> bool:
        v = kv.get_local(key)
        return v is not None and v.state == expect and v != new

    await wait_for(reported, what=f"{node} {artifact} {expect}{ids}")


async def activate(c: Cluster, node: str, artifact: str, ids: list[int]) -> None:
    await command(c, node, artifact, "LOAD", ids, "LOADED")
    await command(c, node, artifact, "ACTIVATE", ids, "ACTIVE")


def route_events(c: Cluster, times: list[float] | None = None) -> list[tuple[str, str]]:
    """(kind, artifact) of every change of ROUTE from now on, as node-1's replica applies them
    (and when, in `times`)."""
    seen: list[tuple[str, str]] = []
    kv = c.members[0].node.kv

    def on(ev: WatchEvent) -> None:
        if ev.key == ROUTE:
            seen.append((ev.kind, kv.get_local(ROUTE).artifact if ev.kind == "put" else ""))
            if times is not None:
                times.append(time.monotonic())

    kv.watch("routes/", on)
    return seen


def route(c: Cluster) -> Any:
    return c.members[0].node.kv.get_local(ROUTE)


async def test_the_route_survives_the_old_version_and_goes_with_the_last_version(cluster: Cluster) -> None:
    c = cluster
    await activate(c, "node-2", HELLO, [0])
    assert route(c) == RouteValue(HELLO, "greet", HELLO_BINDINGS)
    events = route_events(c)
    await activate(c, "node-3", HELLO2, [1])
    assert route(c).artifact == HELLO2  # taken over by the new version
    await command(c, "node-2", HELLO, "DEACTIVATE", [0], "LOADED")  # the old version's last instance
    assert route(c) == RouteValue(HELLO2, "greet", HELLO_BINDINGS)
    await command(c, "node-3", HELLO2, "DEACTIVATE", [1], "LOADED")  # the last version's last instance
    await wait_for(lambda: route(c) is None, what="route removed with the last version")
    assert events == [("put", HELLO2), ("remove", "")]


async def test_a_rolled_back_new_version_hands_the_route_back_without_a_gap(cluster: Cluster) -> None:
    c = cluster
    await activate(c, "node-2", HELLO, [0])
    await activate(c, "node-3", HELLO2, [1])
    assert route(c).artifact == HELLO2
    times: list[float] = []
    events = route_events(c, times)
    await command(c, "node-3", HELLO2, "DEACTIVATE", [1], "LOADED")  # rollback: the new version goes
    await wait_for(lambda: route(c) is not None and route(c).artifact == HELLO, what="route handed back")
    assert route(c) == RouteValue(HELLO, "greet", HELLO_BINDINGS)
    assert events == [("put", HELLO)]  # handed over in one write: never absent (no 404 meanwhile)
    # before the instance drains (the leader's sweep of routes with no instance could win meanwhile)
    (t_drain,) = [t for t, _, ev, a in c.behavior.timeline if ev == "deactivate-start" and a == HELLO2]
    assert times[0] < t_drain
    await command(c, "node-2", HELLO, "DEACTIVATE", [0], "LOADED")
    await wait_for(lambda: route(c) is None, what="route removed with the last version")


async def test_endpoints_are_withdrawn_before_instances_drain(cluster: Cluster) -> None:
    c = cluster
    node2 = c.members[1]
    removed: dict[str, float] = {}

    def on(ev: WatchEvent) -> None:
        if ev.kind == "remove":
            removed[ev.key] = time.monotonic()

    node2.node.kv.watch("endpoints/", on)
    await activate(c, "node-2", HELLO, [0, 2])
    await command(c, "node-2", HELLO, "ACTIVE", [0], "ACTIVE")  # scale down: instance 2 goes
    (t_scale,) = [t for t, node, ev, a in c.behavior.timeline if ev == "set_instances-start" and a == HELLO]
    assert set(removed) == {f"endpoints/{HELLO}/greet:2", f"endpoints/{HELLO}/shout:2"}
    assert max(removed.values()) < t_scale, "instance 2 drained while its endpoints were still published"
    await command(c, "node-2", HELLO, "DEACTIVATE", [0], "LOADED")
    (t_deact,) = [t for t, node, ev, a in c.behavior.timeline if ev == "deactivate-start" and a == HELLO]
    assert removed[f"endpoints/{HELLO}/greet:0"] < t_deact and removed[f"endpoints/{HELLO}/shout:0"] < t_deact
