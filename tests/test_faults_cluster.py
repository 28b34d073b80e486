"""Fault injection on 3 in-process nodes started with fault_injection (issue 16), through their
management API: a node cut off both ways is seen down while the others keep quorum and serve
writes, and rejoins when healed; a link delay slows a call between two nodes by that much; a slice
fault fails the calls to the instance with kind injected_fault until the controller replaces it."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.invoke.errors import InvokeError
from conftest import running_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

HELLO = "org.example:hello:0.1.0"
READ = "read"
NAME = "org.example:hello"


async def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


async def api(
    http: aiohttp.ClientSession, node: Any, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, f"http://127.0.0.1:{node.management.port}{path}", json=body) as r:
        return r.status, await r.json(content_type=None)


async def test_a_node_cut_off_is_seen_down_the_rest_serves_writes_and_it_rejoins(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, fault_injection=True) as nodes, aiohttp.ClientSession() as http:
        n1, n2, n3 = nodes
        # node-3 blocks what it sends to the others, and they what they send to it
        for peer in ("node-1", "node-2"):
            status, doc = await api(http, n3, "PUT", f"/api/v1/faults/links/{peer}", {"blocked": True})
            assert status == 200, doc
        for n in (n1, n2):
            status, doc = await api(http, n, "PUT", "/api/v1/faults/links/node-3", {"blocked": True})
            assert status == 200, doc
        await until(
            lambda: "node-3" not in n1.transport.up_peers and "node-3" not in n2.transport.up_peers
            and not n3.transport.up_peers,
            "node-3 seen down on both sides", timeout=10,
        )
        status, st = await api(http, n1, "GET", "/api/v1/status")
        states = {m["id"]: m["state"] for m in st["nodes"]}
        assert states == {"node-1": "up", "node-2": "up", "node-3": "down"}
        assert st["quorum"] is True
        assert not n3.transport.has_quorum()
        # the majority serves writes (a key is a write through consensus) ...
        status, doc = await api(http, n2, "POST", "/api/v1/keys", {"name": "during-partition", "role": READ})
        assert status == 201, doc
        # ... the minority does not
        status, doc = await api(http, n3, "POST", "/api/v1/keys", {"name": "on-the-minority", "role": READ})
        assert status in (503, 504), doc
        await asyncio.sleep(1.0)  # it stays cut off: its redials never complete a handshake
        assert not n3.transport.up_peers and "node-3" not in n1.transport.up_peers

        status, doc = await api(http, n1, "GET", "/api/v1/faults")
        assert status == 200 and doc["enabled"] is True and doc["links"] == {
            "node-3": {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0, "blocked": True}
        }
        for n in nodes:  # heal
            status, doc = await api(http, n, "DELETE", "/api/v1/faults")
            assert status == 200 and doc["links"] == {}, doc
        await until(
            lambda: all(n.transport.up_peers == {"node-1", "node-2", "node-3"} - {n.node_id} for n in nodes),
            "every node up again", timeout=15,
        )
        # node-3 catches up with the write it missed, and writes again
        await until(lambda: n3.kv.get_local("auth/keys/during-partition") is not None, "node-3 caught up")
        status, doc = await api(http, n3, "POST", "/api/v1/keys", {"name": "after-healing", "role": "read"})
        assert status == 201, doc


async def _deploy_one(nodes: list[Any]) -> tuple[Any, Any]:
    """Deploy one instance of hello; (the node hosting it, another node that knows it is ACTIVE)."""
    await nodes[0].deployments.deploy(Artifact.parse(HELLO), 1)
    await until(lambda: any(n.slice_runtime.local_instances(HELLO) for n in nodes), "one instance ACTIVE")
    host = next(n for n in nodes if n.slice_runtime.local_instances(HELLO))
    caller = next(n for n in nodes if n is not host)
    await until(
        lambda: any(v.state == "ACTIVE" for k, v in caller.kv.list_local("slices/") if k.endswith(HELLO)),
        "the caller's replica knows the instance",
    )
    return host, caller


async def _timed_calls(caller: Any, n: int = 5) -> float:
    """The median seconds of `n` calls of hello.greet through `caller`'s invoker."""
    times = []
    for i in range(n):
        t0 = time.monotonic()
        raw = await caller.invoker.invoke(NAME, "greet", msgspec.msgpack.encode(f"n{i}"), timeout=10)
        times.append(time.monotonic() - t0)
        assert "Hello" in msgspec.msgpack.decode(raw)["message"]
    return statistics.median(times)


async def test_a_link_delay_slows_a_call_between_two_nodes(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, fault_injection=True) as nodes, aiohttp.ClientSession() as http:
        host, caller = await _deploy_one(nodes)
        await _timed_calls(caller, 3)  # warm up (connections, caches)
        plain = await _timed_calls(caller)
        link = f"/api/v1/faults/links/{host.node_id}"
        status, doc = await api(http, caller, "PUT", link, {"delay_ms": 300})
        assert status == 200, doc
        slow = await _timed_calls(caller)
        # the request to the host waits 300 ms (the answer comes back on the host's own, healthy link)
        assert slow >= 0.29 and slow - plain >= 0.25, (plain, slow)
        # the link stays up under a delay below the heartbeat timeout
        assert host.node_id in caller.transport.up_peers and caller.node_id in host.transport.up_peers
        status, doc = await api(http, caller, "DELETE", link)
        assert status == 200 and doc["links"] == {}
        await asyncio.sleep(0.4)  # frames delayed before the heal leave first
        healed = await _timed_calls(caller)
        assert healed < plain + 0.1, (plain, healed)


async def test_a_slice_fault_fails_calls_until_the_controller_replaces_the_instance(tmp_path: Path) -> None:
    async with running_cluster(
        tmp_path, fault_injection=True, health_interval=0.2, health_timeout=1.0
    ) as nodes, aiohttp.ClientSession() as http:
        n1 = nodes[0]
        host, caller = await _deploy_one(nodes)
        await _timed_calls(caller, 2)
        (iid,) = host.slice_runtime.local_instances(HELLO)
        # a node that does not run it answers 404 naming the artifact
        status, doc = await api(http, caller, "PUT", f"/api/v1/faults/slices/{HELLO}", {})
        assert status == 404 and HELLO in doc["detail"] and caller.node_id in doc["detail"]
        status, doc = await api(http, host, "PUT", f"/api/v1/faults/slices/{HELLO}",
                                {"error_rate": 1, "unhealthy": True})
        assert status == 200 and doc["instances"] == [iid], doc
        # calls to it fail with the injected fault's kind, from another node and locally alike
        for who in (caller, host):
            with pytest.raises(InvokeError) as info:
                await who.invoker.invoke(NAME, "greet", msgspec.msgpack.encode("x"), timeout=10)
            assert info.value.kind == "injected_fault" and info.value.status == 500
            text = str(info.value)
            assert HELLO in text and f"instance {iid}" in text and host.node_id in text
        # its health checks fail: the leader's controller replaces it, and the new instance is healthy
        await until(lambda: any(d.kind == "replace" for d in n1.controller.history), "a replace decision",
                    timeout=30)
        (d,) = [d for d in n1.controller.history if d.kind == "replace"]
        assert d.rule == "health" and d.artifact == HELLO and "injected fault" in d.reason

        async def served() -> bool:
            try:
                await caller.invoker.invoke(NAME, "greet", msgspec.msgpack.encode("y"), timeout=10)
                return True
            except InvokeError:
                return False

        end = time.monotonic() + 30
        while not await served():
            assert time.monotonic() < end, "the replacement does not serve within 30 s"
            await asyncio.sleep(0.2)
        for _ in range(10):
            assert await served()
        status, doc = await api(http, host, "GET", "/api/v1/faults")
        assert status == 200 and doc["slices"][HELLO]["instances"] == []  # the faulted instance is gone
