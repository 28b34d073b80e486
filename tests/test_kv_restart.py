"""Writes through a node restarted on the same data directory are applied (issue 10, bug 2).

The node's internal KV session used to be `kv-{node_id}` with sequence numbers from 1 in every
process, while the replicated session table remembered the old ones: after a restart the node's
first writes were refused as stale and the next one answered from the cache without being applied.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aether.core.maps import MapSpec
from aether.kv.keys import MapDefKey
from maps_cluster import MapCluster

pytestmark = pytest.mark.timeout(90)
ALL3 = ["node-1", "node-2", "node-3"]


async def _wait(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _writes_through(c: MapCluster, nid: str, tag: str) -> None:
    """KV put/get/remove and map creation through node `nid` are acknowledged and applied."""
    kv = c.node(nid).kv
    others = [c.node(n) for n in c.nodes if n != nid]
    rev = await kv.put(f"user/{tag}-a", b"1")
    assert rev >= 1
    await kv.put(f"user/{tag}-b", b"2")
    assert await kv.get(f"user/{tag}-a") == b"1"
    for o in others:
        assert await o.kv.get(f"user/{tag}-b") == b"2"
    assert await kv.remove(f"user/{tag}-a") is True
    assert await kv.get(f"user/{tag}-a") is None
    assert await kv.remove(f"user/{tag}-a") is False
    assert await kv.compare_and_set(f"user/{tag}-b", b"2", b"3") is True
    assert await kv.compare_and_set(f"user/{tag}-b", b"2", b"4") is False
    assert await kv.get(f"user/{tag}-b") == b"3"
    for name in (f"{tag}-m2", f"{tag}-m3"):
        assert await c.node(nid).maps.define(name, MapSpec()) is True
        await _wait(lambda name=name: all(name in n.maps.engines for n in c.nodes.values()))  # type: ignore[misc]
        for o in others:
            assert o.kv.get_local(MapDefKey(name)) == MapSpec()


@pytest.fixture
async def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = MapCluster(tmp_path, 3)
    try:
        await c.start(*ALL3)
        await c.wait_table(ALL3)
        yield c
    finally:
        await c.stop_all()


async def test_writes_after_a_full_cluster_restart_are_applied(cluster: MapCluster) -> None:
    for nid in ALL3:  # every node's session has moved past its first sequence numbers
        await _writes_through(cluster, nid, f"before-{nid}")
    await cluster.stop_all()
    await cluster.start(*ALL3)
    await cluster.wait_table(ALL3)
    for nid in ALL3:
        await _writes_through(cluster, nid, f"after-{nid}")
    for nid in ALL3:
        assert cluster.node(nid).kv.get_local("user/before-node-1-b") == b"3"
        assert sorted(n for n in cluster.node(nid).maps.specs if n.endswith(("m2", "m3"))) == sorted(
            f"{w}-{n}-{m}" for w in ("before", "after") for n in ALL3 for m in ("m2", "m3")
        )


async def test_writes_through_a_restarted_leader_are_applied(cluster: MapCluster) -> None:
    # the leader writes the partition table; the other two keep the session table in memory
    await _writes_through(cluster, "node-1", "before")
    for i in range(100):  # far ahead of what a restarted session could catch up by retrying
        await cluster.node("node-1").kv.put(f"user/filler-{i}", b"x")
    await cluster.stop("node-1")
    await cluster.wait_table(["node-2", "node-3"])
    await cluster.start("node-1")
    version = await cluster.wait_table(ALL3)  # the returning leader's table write is applied
    assert all(n.maps.table is not None and n.maps.table.version == version for n in cluster.nodes.values())
    await _writes_through(cluster, "node-1", "after")
