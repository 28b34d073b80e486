"""End to end on 3 real nodes in one event loop: the hello example from repository to calls.

Wheels of `examples/hello` are built from the example sources (no setuptools run), deployed into a
temporary repository, the example blueprint is applied through the management API, and calls go
through the invoker of a node, including while a node hosting an instance is stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from aether.node.node import Node
from conftest import EXAMPLES, running_cluster, wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


class Welcome(msgspec.Struct):
    name: str


class Welcomed(msgspec.Struct):
    text: str
    greeted_by: str


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[Node]]:
    async with running_cluster(tmp_path) as nodes:
        yield nodes


async def _http(node: Node, method: str, path: str, body: object | None = None) -> tuple[int, object]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            f"http://127.0.0.1:{node.management.port}{path}",
            data=None if body is None else msgspec.json.encode(body),
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, msgspec.json.decode(await r.read())


async def test_blueprint_apply_converges_and_slices_call_each_other(cluster: list[Node]) -> None:
    n1, n2, n3 = cluster
    text = (EXAMPLES / "hello.blueprint").read_text()
    status, applied = await _http(
        n2, "POST", "/api/v1/blueprints", {"toml": text, "filename": "hello.blueprint"}
    )
    assert status == 201, applied
    assert isinstance(applied, dict)
    # expansion put the dependency first
    assert [s["artifact"] for s in applied["slices"]] == [
        "org.example:hello:0.1.0",
        "org.example:greeter:0.1.0",
    ]
    status, statuses = await _http(n3, "POST", "/api/v1/blueprints/hello:0.1.0/wait?timeout=30")
    assert status == 200, statuses
    by_art = {s["artifact"]: s for s in statuses}  # type: ignore[union-attr]
    assert by_art["org.example:hello:0.1.0"]["active"] == 2
    assert by_art["org.example:greeter:0.1.0"]["active"] == 1
    # the two hello instances are on different nodes (spread)
    hello_nodes = {i["node"] for i in by_art["org.example:hello:0.1.0"]["instances"]}
    assert len(hello_nodes) == 2
    # routes were registered by the activated slices
    assert n1.kv.get_local("routes/GET:/hello/{name}") is not None
    assert n1.kv.get_local("routes/POST:/greeter/welcome") is not None
    # a call through any node's invoker reaches greeter, which calls hello through the runtime
    for node in cluster:
        raw = await node.invoker.invoke(
            "org.example:greeter", "welcome", msgspec.msgpack.encode(Welcome("Ann"))
        )
        out = msgspec.msgpack.decode(raw, type=Welcomed)
        assert out.text == "Welcome! Hello, Ann!"
        assert out.greeted_by.split("/")[0] in hello_nodes
    # the routes the slices declared are served by every node's HTTP router
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for node in cluster:
            base = f"http://127.0.0.1:{node.http.port}"  # type: ignore[union-attr]
            async with http.get(f"{base}/hello/Ann") as r:
                assert r.status == 200, await r.text()
                body = await r.json()
                assert body["message"] == "Hello, Ann!" and r.headers.get("X-Request-Id")
            async with http.post(f"{base}/greeter/welcome", json={"names": ["Ann", "Bo"]}) as r:
                assert r.status == 200, await r.text()
                assert [w["text"] for w in await r.json()] == ["Welcome! Hello, Ann!", "Welcome! Hello, Bo!"]
            async with http.get(f"{base}/nowhere") as r:
                assert r.status == 404
                assert "/nowhere" in (await r.json())["detail"]
            json_h = {"Content-Type": "application/json"}
            async with http.post(f"{base}/greeter/welcome", data=b"{broken", headers=json_h) as r:
                assert r.status == 400
    # slices listing shape used by `aether slices --json`
    status, listing = await _http(n1, "GET", "/api/v1/slices")
    assert status == 200 and {s["artifact"] for s in listing} == set(by_art)  # type: ignore[union-attr]


async def test_calls_survive_loss_of_a_node_hosting_an_instance(cluster: list[Node]) -> None:
    n1 = cluster[0]
    await n1.deployments.apply_blueprint((EXAMPLES / "hello.blueprint").read_text(), "hello.blueprint")
    await n1.deployments.wait_converged("hello:0.1.0", timeout=30)
    hello = next(s for s in n1.deployments.slices_status() if s.artifact == "org.example:hello:0.1.0")
    victim_id = next(i.node for i in hello.instances if i.node != "node-1")
    victim = next(n for n in cluster if n.node_id == victim_id)
    caller = n1  # the leader stays up; it calls through its invoker
    failures: list[str] = []
    served_by: list[str] = []
    stop = asyncio.Event()

    async def stream() -> None:
        payload = msgspec.msgpack.encode("Bo")
        while not stop.is_set():
            try:
                raw = await caller.invoker.invoke("org.example:hello", "greet", payload, timeout=10)
                served_by.append(msgspec.msgpack.decode(raw)["node"])
            except Exception as e:  # every failure counts
                failures.append(repr(e))
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(stream()) for _ in range(4)]
    await wait_until(lambda: len(served_by) > 50, 10, "calls flowing")
    await victim.stop()
    before = len(served_by)
    await wait_until(lambda: len(served_by) > before + 200, 15, "calls after the node stopped")

    # the lost instance is re-placed on a survivor within 5 s
    def replaced() -> bool:
        st = next(x for x in n1.deployments.slices_status() if x.artifact == "org.example:hello:0.1.0")
        return st.active == 2 and all(i.node != victim_id for i in st.instances)

    await wait_until(replaced, 5, "the hello instance re-placed on a survivor")
    stop.set()
    await asyncio.gather(*tasks)
    assert failures == [], failures[:5]
    assert victim_id not in served_by[before + 50 :]
