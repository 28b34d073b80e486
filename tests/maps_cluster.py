"""An in-process cluster of `Node`s for distributed-map tests: start, stop and restart members."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aether.api.server import ManagementServer
from aether.core.config import NodeConfig
from aether.core.maps import MapSpec
from aether.core.types import Address, PeerSpec
from aether.node.node import Node
from conftest import free_ports


class MapCluster:
    def __init__(self, tmp: Path, size: int, **config: Any) -> None:
        self.tmp = tmp
        ports = free_ports(size)
        self.peers = [PeerSpec(f"node-{i + 1}", Address("127.0.0.1", p)) for i, p in enumerate(ports)]
        self.config = config
        self.nodes: dict[str, Node] = {}

    def _make(self, i: int) -> Node:
        return Node(
            NodeConfig(
                node_id=f"node-{i + 1}",
                peers=self.peers,
                cluster_port=self.peers[i].address.port,
                management_port=0,
                http_port=0,
                data_dir=str(self.tmp / f"n{i + 1}"),
                repository=str(self.tmp / "repo"),
                **self.config,
            ),
            management_api=ManagementServer,
        )

    async def start(self, *ids: str, management: bool = False) -> None:
        for nid in ids:
            node = self._make(int(nid.split("-")[1]) - 1)
            await node.start(management=management)
            self.nodes[nid] = node

    async def stop(self, nid: str) -> None:
        node = self.nodes.pop(nid)
        await node.stop()

    async def stop_all(self) -> None:
        for nid in list(self.nodes):
            await self.stop(nid)

    def node(self, nid: str) -> Node:
        return self.nodes[nid]

    async def wait_table(self, members: list[str], timeout: float = 10.0) -> int:
        """Wait until every running node has a table with exactly `members`; returns its version."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            tables = [n.maps.table for n in self.nodes.values()]
            if all(t is not None and t.members == sorted(members) for t in tables):
                versions = {t.version for t in tables if t is not None}
                if len(versions) == 1 and not any(n.maps.syncing for n in self.nodes.values()):
                    return versions.pop()
            if loop.time() > end:
                got = {nid: (n.maps.table.version, n.maps.table.members) if n.maps.table else None
                       for nid, n in self.nodes.items()}
                raise AssertionError(f"no table for {members} within {timeout}s: {got}")
            await asyncio.sleep(0.02)

    async def define(self, name: str, spec: MapSpec | None = None) -> None:
        any_node = next(iter(self.nodes.values()))
        await any_node.maps.define(name, spec or MapSpec())
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while not all(name in n.maps.engines for n in self.nodes.values()):
            assert loop.time() < end, f"map {name} not defined everywhere"
            await asyncio.sleep(0.01)


def on_disk_keys(path: Path) -> set[str]:
    """The keys of a map's SQLite file that a process opening it after a crash would find: read from
    a copy of the file and its WAL as they are on disk now (SQLite recovers only committed
    transactions from a WAL). The node keeps its file locked, so the copy is the way to look."""
    import shutil
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "copy.sqlite"
        for suffix in ("", "-wal"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                shutil.copyfile(src, f"{copy}{suffix}")
        db = sqlite3.connect(copy)
        try:
            return {k for (k,) in db.execute("SELECT k FROM records")}
        finally:
            db.close()
