"""Membership changes on a REAL cluster (one OS process per node, loopback).

Three nodes serve writes; a fourth starts with `aether node --join`, catches up as a learner and
is added with `aether cluster add-node`; then one of the original three is removed with
`aether cluster remove-node`. Writes keep succeeding throughout, and quorum follows the committed
member set (with four members, two up is no quorum; after the removal, three of three are needed
no more). A full restart afterwards keeps the committed set.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from aether.core.errors import AetherError
from conftest import HOST, ProcessCluster, aether_cli, http_json


class GrowingCluster(ProcessCluster):
    """Nodes 0..initial-1 form the cluster from --peers; later ones start with --join node 0."""

    def __init__(self, n: int, base_dir: Path, initial: int, **kw: Any) -> None:
        super().__init__(n, base_dir, **kw)
        self.initial = initial

    @property
    def peers_arg(self) -> str:
        return ",".join(f"{self.ids[i]}={HOST}:{self.cluster_ports[i]}" for i in range(self.initial))

    def command(self, i: int) -> list[str]:
        cmd = super().command(i)
        if i >= self.initial:
            k = cmd.index("--peers")
            cmd[k : k + 2] = ["--join", self.address(0)]
        return cmd


def _cli(c: ProcessCluster, i: int, *args: str) -> Any:
    return aether_cli("--connect", f"{HOST}:{c.management_ports[i]}", *args, env=c.env)


async def _acli(c: ProcessCluster, i: int, *args: str) -> Any:
    return await asyncio.to_thread(_cli, c, i, *args)


async def _map_members(c: ProcessCluster, i: int, expected: list[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await asyncio.to_thread(http_json, c.management_ports[i], "GET", "/api/v1/maps")
        if status == 200 and sorted(body["members"]) == expected:
            return
        assert time.monotonic() < deadline, f"map table members {body} (want {expected})"
        await asyncio.sleep(0.1)


def _status_members(c: ProcessCluster, i: int) -> list[str]:
    return sorted(m["id"] for m in c.status(i)["nodes"])


async def _writer(c: ProcessCluster, only: list[int], stop: asyncio.Event, done: list[str],
                  failed: list[str]) -> None:
    async with c.client(prefer=only[0], only=only, timeout=10.0) as cl:
        n = 0
        while not stop.is_set():
            key = f"user/w{n}"
            try:
                await cl.put(key, str(n).encode())
                done.append(key)
            except AetherError as e:
                failed.append(f"{key}: {e}")
            n += 1
            await asyncio.sleep(0.01)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_add_a_fourth_node_and_remove_one_while_writes_go_on(tmp_path: Path) -> None:
    c = GrowingCluster(4, tmp_path / "grow", initial=3)
    try:
        for i in range(3):
            c.start(i)
        c.wait_quorum(30, nodes=[0, 1, 2])
        stop = asyncio.Event()
        done: list[str] = []
        failed: list[str] = []
        writer = asyncio.create_task(_writer(c, [0, 1], stop, done, failed))
        status, body = http_json(c.management_ports[0], "POST", "/api/v1/maps", {"name": "carts"})
        assert status in (200, 201), (status, body)
        await _map_members(c, 0, ["node-1", "node-2", "node-3"])

        # a node that is not running cannot be added: refused with the reason
        r = await _acli(c, 0, "cluster", "add-node", c.ids[3], c.address(3))
        assert r.returncode != 0 and "cannot be reached" in (r.stdout + r.stderr), r.stdout + r.stderr

        # node-4 joins: it learns the member set from node-1 and runs as a learner; the member
        # asked to add it dials it, waits until it caught up by snapshot, then commits the change
        c.start(3)
        deadline = time.monotonic() + 30
        while (st := c.try_status(3)) is None:
            assert time.monotonic() < deadline, "node-4 did not start"
            await asyncio.sleep(0.1)
        assert st["quorum"] is False  # a learner: it cannot write
        r = await _acli(c, 1, "cluster", "add-node", c.ids[3], c.address(3))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "node-4 added" in r.stdout
        assert "installed snapshot" in c.log_text(3) or c.status(3)["applied_slot"] > 0
        for i in range(4):
            deadline = time.monotonic() + 20
            while _status_members(c, i) != ["node-1", "node-2", "node-3", "node-4"]:
                assert time.monotonic() < deadline, f"{c.ids[i]}: {c.status(i)}"
                await asyncio.sleep(0.1)
        c.wait_quorum(30)
        # the map's partitions rebalance onto the new member set
        await _map_members(c, 0, ["node-1", "node-2", "node-3", "node-4"])
        # a second add of the same node is refused (409, named)
        status, body = http_json(c.management_ports[0], "POST", "/api/v1/cluster/nodes",
                                 {"id": "node-4", "address": c.address(3)})
        assert status == 409 and "already a member" in str(body), (status, body)

        status, body = http_json(c.management_ports[0], "POST", "/api/v1/cluster/nodes",
                                 {"id": "node-9", "address": "nowhere"})
        assert status == 400 and "invalid address" in str(body), (status, body)

        # writes through the new member commit
        async with c.client(prefer=3, only=[3]) as cl4:
            await cl4.put("user/via-4", b"yes")
            assert await cl4.get("user/w0") == b"0"

        # quorum follows the member set: with 4 members, node-3 and node-4 down leaves 2 of 4
        c.kill9(2)
        c.kill9(3)
        deadline = time.monotonic() + 10
        while c.status(0)["quorum"]:
            assert time.monotonic() < deadline, "node-1 kept quorum with 2 of 4 members up"
            await asyncio.sleep(0.05)
        c.start(2)
        c.start(3)
        c.wait_quorum(30)
        failed.clear()  # the writes during that outage failed, as they must

        # remove node-3 through node-2 while writes go on
        r = await _acli(c, 1, "cluster", "remove-node", "node-3")
        assert r.returncode == 0, r.stdout + r.stderr
        for i in (0, 1, 3):
            deadline = time.monotonic() + 20
            while _status_members(c, i) != ["node-1", "node-2", "node-4"]:
                assert time.monotonic() < deadline, f"{c.ids[i]}: {c.status(i)}"
                await asyncio.sleep(0.1)
        # partitions move off the removed node (although it still runs)
        await _map_members(c, 0, ["node-1", "node-2", "node-4"])
        # the removed node learns it was removed, and refuses writes naming why
        deadline = time.monotonic() + 10
        async with c.client(prefer=2, only=[2], timeout=2.0) as cl3:
            while True:
                with pytest.raises(AetherError) as info:
                    await cl3.put("user/via-3", b"no")
                if "not a member" in str(info.value):
                    break
                assert time.monotonic() < deadline, str(info.value)
                await asyncio.sleep(0.2)
        # with node-3 gone for good, node-1, node-2, node-4 carry on; one of them down still
        # leaves 2 of 3
        c.kill9(2)
        c.kill9(3)
        n0 = len(done)
        deadline = time.monotonic() + 15
        while len(done) < n0 + 20:
            assert time.monotonic() < deadline, f"writes stalled: failed {failed[-3:]}"
            await asyncio.sleep(0.05)
        # and the nodes say so: 2 of 3 members up is a quorum (the removed node, still in the
        # transport's map until the next change, does not count)
        deadline = time.monotonic() + 10
        while any(m["state"] == "up" for m in c.status(0)["nodes"] if m["id"] == "node-4"):
            assert time.monotonic() < deadline, "node-1 still sees node-4 up"
            await asyncio.sleep(0.05)
        assert c.status(0)["quorum"] and c.status(1)["quorum"]
        stop.set()
        await writer
        assert not failed, failed[:5]
        async with c.client(prefer=0, only=[0, 1]) as cl:
            for key in done[-10:]:
                assert await cl.get(key) is not None

        # a full restart keeps the committed member set (the originals' --peers still list node-3,
        # node-4 starts with --join): it comes from each node's snapshot and journal
        await asyncio.to_thread(c.stop_all)
        c.start(3)  # node-4 first: the member it joins through is down, it starts from local state
        deadline = time.monotonic() + 30
        while c.try_status(3) is None:
            assert time.monotonic() < deadline, "node-4 did not start from its local state"
            await asyncio.sleep(0.1)
        assert c.log_lines(3, "starting from local state")
        c.start(0)
        c.start(1)
        for i in (0, 1, 3):
            deadline = time.monotonic() + 30
            while (st := c.try_status(i)) is None or not st["quorum"] or \
                    sorted(m["id"] for m in st["nodes"]) != ["node-1", "node-2", "node-4"]:
                assert time.monotonic() < deadline, f"{c.ids[i]} after the restart: {st}"
                await asyncio.sleep(0.1)
        async with c.client(prefer=3, only=[0, 1, 3]) as cl:
            await cl.put("user/after-restart", b"1")
            assert await cl.get(done[-1]) is not None
    finally:
        c.close()
