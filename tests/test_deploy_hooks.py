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
