"""Every node publishes where it serves its management API and HTTP router (`nodes/{id}`), so a
client can talk to one node in particular (`aether logs NODE`): shown by `GET /api/v1/nodes` and in
`status().nodes`, published again when a restarted node serves on other ports, removed with the
member."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aether.kv.keys import NodeInfoKey, NodeInfoValue, parse_key
from maps_cluster import MapCluster

pytestmark = pytest.mark.timeout(60)

IDS = ("node-1", "node-2", "node-3")


def published(c: MapCluster, by: str) -> dict[str, tuple[str | None, str | None]]:
    return {m.id: (m.management, m.http) for m in c.node(by).status().nodes}


def expected(c: MapCluster, nid: str) -> tuple[str, str]:
    n = c.node(nid)
    assert n.management is not None and n.http is not None
    return f"127.0.0.1:{n.management.port}", f"127.0.0.1:{n.http.port}"


async def wait_until(cond: Any, what: str, timeout: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_nodes_publish_their_addresses_and_again_after_a_restart(tmp_path: Path) -> None:
    c = MapCluster(tmp_path, 3)
    try:
        await c.start(*IDS, management=True)
        want = {nid: expected(c, nid) for nid in IDS}
        await wait_until(lambda: all(published(c, n) == want for n in IDS), "every node sees every address")
        n1 = c.node("node-1")
        assert n1.management is not None

        def get(url: str) -> Any:  # in a thread: the server runs on this loop
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())

        listing = await asyncio.to_thread(get, f"{n1.management.url}/api/v1/nodes")
        assert {e["id"]: (e["management"], e["http"]) for e in listing} == want
        info = n1.kv.get_local(NodeInfoKey("node-2"))
        assert isinstance(info, NodeInfoValue) and info.version and info.started > 0

        await c.stop("node-3")  # and back, on other (free) ports
        await c.start("node-3", management=True)
        want["node-3"] = expected(c, "node-3")
        await wait_until(lambda: published(c, "node-1")["node-3"] == want["node-3"], "node-3's new ports")
        # a node without a management API publishes only its router
        await c.stop("node-2")
        await c.start("node-2", management=False)
        http2 = c.node("node-2").http
        assert http2 is not None
        router_only = (None, f"127.0.0.1:{http2.port}")
        await wait_until(lambda: published(c, "node-1")["node-2"] == router_only, "node-2's router only")
        # a member removed takes its record with it
        await c.stop("node-3")
        await c.node("node-1").remove_member("node-3")
        n2 = c.node("node-2")
        await wait_until(lambda: n2.kv.get_local(NodeInfoKey("node-3")) is None, "record removed")
    finally:
        await c.stop_all()


def test_the_key_family_parses_and_names_bad_ids() -> None:
    assert parse_key("nodes/node-1") == NodeInfoKey("node-1")
    assert str(NodeInfoKey("node-1")) == "nodes/node-1"
    with pytest.raises(Exception, match="node id"):
        parse_key("nodes/a/b")
