"""Membership changes wired through in-process nodes: the transport, the leader, the map service,
admission and the status follow the committed member set (real nodes, one process)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from aether.core.errors import StatusError
from conftest import running_cluster


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
async def test_a_removal_reaches_transport_leader_maps_admission_and_status(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        n1, n2, n3 = nodes
        assert n1.deployments.members == 3
        with pytest.raises(StatusError, match="not a member"):
            await n1.remove_member("node-9")
        # (the refusal below needs node-2 to reach node-3: on a loaded machine the links of a just
        # started cluster may still be coming up)
        await _until(lambda: {"node-1", "node-3"} <= set(n2.transport.up_peers))
        res = await n2.remove_member("node-1")  # the leader itself
        assert res.ok and res.members == ["node-2", "node-3"]
        for n in nodes:
            await _until(lambda n=n: n.runner.engine.members == ("node-2", "node-3"))
        for n in (n2, n3):
            assert n.deployments.members == 2
            assert n.maps.core.members == {"node-2", "node-3"}
            assert [m.id for m in n.status().nodes] == ["node-2", "node-3"]
            assert n.leader.members == ["node-2", "node-3"]
        # a new leader among the members; the removed node leads nothing and has no quorum
        await _until(lambda: n2.leader.leader == "node-2" and n3.leader.leader == "node-2")
        assert n1.leader.leader is None and not n1.status().quorum
        # the removed node stays linked (it learns the log) until the next change
        assert "node-1" in n2.transport.members
        # the last two members cannot lose one more while one of them is down
        await n3.stop()
        await _until(lambda: "node-3" not in n2.transport.up_peers)
        with pytest.raises(StatusError, match="needs 1 live members to make progress"):
            await n2.remove_member("node-2")
