"""An in-process node starting again on its data directory: what it does before its cluster
links are up (`Node.start`)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from aether.core.maps import MapSpec
from aether.node.node import Node
from conftest import node_configs, wait_until

pytestmark = pytest.mark.timeout(60)


async def test_the_map_files_are_opened_before_the_links_come_up(tmp_path: Path) -> None:
    """Seen: a node restarted with a log map of 20,000 keys replayed its file (0.3-0.75 s) on its
    event loop after its links were up; its peers heard nothing for 0.64 s, took it for down and
    changed the partition table twice (out, then in again). The files are now opened (in a worker
    thread, `MapService.prepare`) before the transport starts, and the map serves what it held."""
    (config,) = node_configs(tmp_path, 1)
    node = Node(config)
    await node.start()
    try:
        assert await node.maps.define("orders", MapSpec(replicas=1, write_quorum=1, engine="log"))
        await wait_until(lambda: "orders" in node.maps.core.engines, 10, "the map defined")
        await wait_until(lambda: not node.maps.syncing and node.maps.table is not None, 10, "the map served")
        await node.maps.map_put("orders", "o-1", b"placed")
    finally:
        await node.stop()

    node = Node(config)
    seen: dict[str, Any] = {}
    start_transport = node.transport.start

    async def transport_start() -> None:
        seen["open before the links"] = sorted(node.maps._preopened)
        await start_transport()

    node.transport.start = transport_start  # type: ignore[method-assign]
    await node.start()
    try:
        assert seen == {"open before the links": ["orders"]}, seen
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while True:
            try:
                got = await node.maps.map_get("orders", "o-1")
                break
            except Exception:  # (its partitions are being taken over)
                assert loop.time() < end
                await asyncio.sleep(0.05)
        assert got == b"placed"
        assert not node.maps._preopened  # (start took the engine)
    finally:
        await node.stop()


async def test_the_only_node_of_its_process_freezes_what_it_loaded_before_the_links_come_up(
    tmp_path: Path,
) -> None:
    """Seen: a node restarted with a log map of 20,000 keys ran a full cyclic collection over all
    of it once started (`runner._serve`: gc.collect, then gc.freeze), its links up: 0.06-0.13 s
    of its event loop. The node of its own process (`aether node`) now collects and freezes
    before its transport starts, so its maps' records are out of every later full collection.
    Nodes sharing a process (tests) leave the collector alone."""
    (config,) = node_configs(tmp_path, 1)
    node = Node(config)
    await node.start()
    try:
        assert await node.maps.define("orders", MapSpec(replicas=1, write_quorum=1, engine="log"))
        await wait_until(lambda: not node.maps.syncing and node.maps.table is not None, 10, "the map served")
        await node.maps.map_put("orders", "o-1", b"placed")
    finally:
        await node.stop()

    seen: dict[str, Any] = {}
    for own in (False, True):
        node = Node(config, own_process=own)
        start_transport = node.transport.start

        async def transport_start(node: Node = node, start: Any = start_transport, own: bool = own) -> None:
            engine: Any = node.maps._preopened["orders"][2]
            seen[own] = not any(o is engine._parts for o in gc.get_objects())  # frozen: not tracked
            await start()

        node.transport.start = transport_start  # type: ignore[method-assign]
        try:
            await node.start()
        finally:
            await node.stop()
            gc.unfreeze()  # (this process is the suite's)
    assert seen == {False: False, True: True}, seen
