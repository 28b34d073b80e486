"""Two versions of one slice on 3 real nodes in one event loop (issue 17): the rollout's traffic
weights split calls through the invoker and the HTTP router, and deactivating the old version while
calls flow fails none of them.

Two versions of one slice cannot be imported in one process yet (same module name), so the two
wheels share the coordinates `org.example:hello:0.1.0` / `:0.2.0` but have different top-level
modules; each answers with its own version. No cluster manager runs: the test plays the leader and
writes the `slices/` commands itself, and writes the `rollouts/` key the rollout manager would.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest

from aether.kv.keys import RolloutKey, RolloutValue, SliceKey, SliceStateValue
from aether.node.node import Node
from aether.slices.repository import Repository
from aether.slices.testing import build_slice_wheel, isolated_imports
from conftest import node_configs

pytestmark = pytest.mark.timeout(60)

NAME = "org.example:hello"
V1 = f"{NAME}:0.1.0"
V2 = f"{NAME}:0.2.0"
ROUTE = "routes/GET:/hello/{name}"

SOURCE = """
import asyncio

from aether.slices import Slice, route


class Hello(Slice):
    @route("GET", "/hello/{name}")
    async def greet(self, name: str) -> str:
        await asyncio.sleep(0.002)  # calls are in flight when the instance is deactivated
        return "VERSION"
"""


class _Dormant:
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    repo = Repository(tmp_path / "repo")
    for coords, module in ((V1, "hello_v1"), (V2, "hello_v2")):
        source = SOURCE.replace("VERSION", coords.rsplit(":", 1)[1])
        repo.deploy(build_slice_wheel(tmp_path / "wheels", coords, source, "Hello", module=module))
    nodes = [Node(c) for c in node_configs(tmp_path, repository=str(tmp_path / "repo"))]
    for n in nodes:  # the test plays the leader: no reconciliation of its hand-written commands
        n.cluster_deployer = _Dormant()  # type: ignore[assignment]
    with isolated_imports():
        started: list[Node] = []
        try:
            for n in nodes:
                await n.start(management=False)
                started.append(n)
            await until(lambda: all(n.leader.leader == "node-1" for n in nodes), "a leader")
            yield nodes
        finally:
            for n in started:
                await n.stop()


async def command(n: Node, node: str, coords: str, st: str, ids: list[int], expect: str) -> None:
    key = SliceKey(node, coords)
    new = SliceStateValue(st, time.time(), None, ids)
    assert await n.kv.compare_and_set(key, n.kv.get_local(key), new)

    def reported() -> bool:
        v = n.kv.get_local(key)
        return v is not None and v.state == expect and v != new

    await until(reported, f"{node} {coords} {expect}")


async def activate(n: Node, node: str, coords: str, ids: list[int]) -> None:
    await command(n, node, coords, "LOAD", ids, "LOADED")
    await command(n, node, coords, "ACTIVATE", ids, "ACTIVE")


async def set_weights(nodes: list[Node], weights: dict[str, int]) -> None:
    value = RolloutValue(
        id="r1",
        artifact=NAME,
        old_version="0.1.0",
        new_version="0.2.0",
        strategy="canary",
        state="progressing",
        instances=1,
        old_instances=1,
        new_instances=1,
        weights=weights,
    )
    await nodes[0].kv.put(RolloutKey(NAME), value)
    await until(lambda: all(dict(n.traffic.weights(NAME)) == weights for n in nodes), "weights everywhere")


async def two_versions(nodes: list[Node]) -> Node:
    """v1 on node-2 (instance 0), v2 on node-3 (instance 1); returns node-1 (runs neither)."""
    n1 = nodes[0]
    await activate(n1, "node-2", V1, [0])
    await activate(n1, "node-3", V2, [1])
    await until(lambda: {e.artifact for e in n1.endpoints.instances(NAME, "greet")} == {V1, V2}, "endpoints")
    return n1


async def get(session: aiohttp.ClientSession, n: Node) -> tuple[int, object]:
    assert n.http is not None
    async with session.get(f"http://127.0.0.1:{n.http.port}/hello/x") as r:
        return r.status, msgspec.json.decode(await r.read())


async def test_invoker_and_router_follow_the_weights(nodes: list[Node]) -> None:
    n1 = await two_versions(nodes)
    await set_weights(nodes, {"0.1.0": 80, "0.2.0": 20})
    calls = Counter()
    for _ in range(100):
        calls[
            msgspec.msgpack.decode(
                await n1.invoker.invoke(NAME, "greet", msgspec.msgpack.encode({"name": "x"}))
            )
        ] += 1
    assert calls == {"0.1.0": 80, "0.2.0": 20}
    async with aiohttp.ClientSession() as s:
        answers = Counter()
        for _ in range(50):
            status, body = await get(s, n1)
            assert status == 200, body
            answers[body] += 1
    assert answers == {"0.1.0": 40, "0.2.0": 10}  # the route is version-free: the weights apply
    await set_weights(nodes, {"0.2.0": 100})  # the new version takes everything
    async with aiohttp.ClientSession() as s:
        assert {(await get(s, n1))[1] for _ in range(10)} == {"0.2.0"}
    assert n1.invoker.stats.failed == 0


async def test_deactivating_the_old_version_while_calls_flow_fails_none(nodes: list[Node]) -> None:
    n1 = await two_versions(nodes)
    await set_weights(nodes, {"0.1.0": 50, "0.2.0": 50})
    ok: Counter[str] = Counter()
    failed: list[str] = []
    stop = asyncio.Event()
    payload = msgspec.msgpack.encode({"name": "x"})

    async def via_invoker() -> None:
        while not stop.is_set():
            try:
                ok[msgspec.msgpack.decode(await n1.invoker.invoke(NAME, "greet", payload))] += 1
            except Exception as e:
                failed.append(repr(e))

    async def via_router(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            status, body = await get(s, n1)
            if status == 200:
                ok[str(body)] += 1
            else:
                failed.append(f"{status} {body}")

    async with aiohttp.ClientSession() as s:
        workers = [asyncio.create_task(via_invoker()) for _ in range(3)]
        workers += [asyncio.create_task(via_router(s)) for _ in range(2)]
        await until(lambda: ok["0.1.0"] >= 50 and ok["0.2.0"] >= 50, "calls to both versions")
        await command(n1, "node-2", V1, "DEACTIVATE", [0], "LOADED")  # the old version goes
        before = Counter(ok)
        await until(lambda: ok["0.2.0"] >= before["0.2.0"] + 100, "calls after the deactivation")
        after_old = ok["0.1.0"]
        await until(lambda: ok["0.2.0"] >= before["0.2.0"] + 200, "more calls")
        stop.set()
        await asyncio.gather(*workers)
        assert failed == [], failed[:5]
        assert ok["0.1.0"] == after_old  # nothing reaches the deactivated version any more
        assert n1.invoker.stats.failed == 0
        # the route (taken over by the new version) stays while it serves, and goes with it
        assert n1.kv.get_local(ROUTE) is not None and (await get(s, n1))[0] == 200
        await command(n1, "node-3", V2, "DEACTIVATE", [1], "LOADED")
        await until(lambda: n1.kv.get_local(ROUTE) is None, "route removed with the last version")
        status, _ = await get(s, n1)
        assert status == 404
