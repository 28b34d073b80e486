"""Management API of the controller: status, config (GET/PUT, validation, role), decisions (list,
since/limit, SSE follow), alerts, and decisions in the cluster event stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from aether.api.auth import required_role
from aether.api.server import ManagementServer
from aether.controller.types import AlertState, ControllerMemory, ControllerSync, Decision
from aether.kv.keys import BlueprintSlice, BlueprintValue, ScaleValue, ScalingRule
from controller_fakes import ControllerNode

pytestmark = pytest.mark.timeout(30)

A = "org.demo:a:1.0.0"
P = "/api/v1"


def node() -> ControllerNode:
    bp = BlueprintValue([BlueprintSlice(A, 2, scaling=ScalingRule(min=1, max=8, in_flight=4.0))])
    return ControllerNode({"blueprints/x": bp, f"scale/{A}": ScaleValue(3, "controller", 1.0, "", 2, None)})


@pytest.fixture
async def served() -> AsyncIterator[tuple[ControllerNode, str, aiohttp.ClientSession]]:
    n = node()
    await n.controller.start()
    srv = ManagementServer(n, host="127.0.0.1", port=0)
    await srv.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            yield n, srv.url, s
    finally:
        await srv.stop()
        await n.controller.stop()


async def test_status(served: Any) -> None:
    n, url, s = served
    n.plan = lambda obs: [{"kind": "scale_up", "artifact": A, "from_count": 3, "to_count": 4}]
    n.controller.tick()
    async with s.get(f"{url}{P}/controller/status") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["node_id"] == "node-1" and doc["running"] is True and doc["dry_run"] is False
    assert doc["steps"] == 1 and doc["step_seconds"] >= 0 and doc["avoided"] == []
    assert doc["config"]["scaling"]["tolerance"] == 0.1
    (art,) = doc["artifacts"]
    assert (art["artifact"], art["min"], art["max"], art["bounds_source"]) == (A, 2, 8, "operator")
    assert art["last_decision"]["kind"] == "scale_up"


async def test_config_get_put_and_validation(served: Any) -> None:
    n, url, s = served
    async with s.get(f"{url}{P}/controller/config") as r:
        doc = await r.json()
    assert doc["text"] == "" and doc["updated"] is None and doc["config"]["dry_run"] is False
    text = "dry_run = true\n[scaling]\nscale_up_cooldown = 2.0\n"
    toml = {"Content-Type": "application/toml"}
    async with s.put(f"{url}{P}/controller/config", data=text, headers=toml) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    assert doc["text"] == text and doc["by"] == "anonymous"
    assert doc["config"]["scaling"]["scale_up_cooldown"] == 2.0
    assert n.controller.config.dry_run
    async with s.put(f"{url}{P}/controller/config", json={"toml": "[health]\nfailures = 0\n"}) as r:
        assert r.status == 400
        problem = await r.json()
    assert "failures" in problem["detail"]
    inf = "[scaling]\nstable_window = inf\n"
    async with s.put(f"{url}{P}/controller/config", data=inf, headers=toml) as r:
        assert r.status == 400  # inf passed `> 0`: a window that never ends
        assert (await r.json())["detail"] == (
            "controller config: scaling.stable_window = inf is not a finite number: inf, -inf and nan "
            "are not accepted"
        )
    async with s.put(f"{url}{P}/controller/config", data="[[[", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 400 and "not valid TOML" in (await r.json())["detail"]
    async with s.put(f"{url}{P}/controller/config", json={"text": "x"}) as r:
        assert r.status == 400
    async with s.get(f"{url}{P}/controller/config") as r:
        assert (await r.json())["text"] == text  # the refused ones changed nothing
    assert required_role("PUT", f"{P}/controller/config") == "operate"
    assert required_role("GET", f"{P}/controller/status") == "read"


async def test_decisions_since_limit_and_stream(served: Any) -> None:
    n, url, s = served
    n.plan = lambda obs: [{"kind": "skip", "artifact": A, "rule": "tolerance"}]
    for _ in range(5):
        n.controller.tick()
    async with s.get(f"{url}{P}/controller/decisions", params={"since": "2", "limit": "2"}) as r:
        assert [d["seq"] for d in await r.json()] == [4, 5]
    for bad in ({"limit": "0"}, {"limit": "x"}, {"since": "-1"}, {"other": "1"}):
        async with s.get(f"{url}{P}/controller/decisions", params=bad) as r:
            assert r.status == 400, bad
    async with s.get(f"{url}{P}/controller/decisions/stream", params={"since": "3"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        seen: list[int] = []

        async def read() -> None:
            while len(seen) < 3:
                line = (await r.content.readline()).decode()
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:])["seq"])

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.2)
        n.controller.tick()  # a new decision arrives while following
        await asyncio.wait_for(reader, 5)
    assert seen == [4, 5, 6]


async def test_decisions_and_alerts_in_the_event_stream_and_alerts_endpoint(served: Any) -> None:
    n, url, s = served
    async with s.get(f"{url}{P}/events") as r:
        assert (await r.content.readline()).startswith(b"event: hello")
        n.plan = lambda obs: [{"kind": "alert_firing", "rule": "slow", "reason": "p99 above 100 ms"},
                              {"kind": "scale_up", "artifact": A, "to_count": 4}]
        n.controller.tick()
        events: list[tuple[str, dict[str, Any]]] = []
        kind = "hello"
        while len(events) < 2:
            line = (await asyncio.wait_for(r.content.readline(), 5)).decode().strip()
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind != "hello":
                events.append((kind, json.loads(line[6:])))
    assert [k for k, _ in events] == ["alert-firing", "controller-decision"]
    assert events[1][1]["kind"] == "scale_up" and events[1][1]["seq"] == 2
    # alerts come from the memory (synced to followers; here the leader's own core)
    n.cores[0].memory.alerts = {"slow{artifact=a}": AlertState("firing", 10.0, 150.0, {"artifact": "a"})}
    n.controller.memory = n.cores[0].memory
    async with s.get(f"{url}{P}/alerts") as r:
        doc = await r.json()
    assert (doc["firing"], doc["pending"], doc["node_id"]) == (1, 0, "node-1")
    assert doc["alerts"][0]["key"] == "slow{artifact=a}" and doc["alerts"][0]["state"] == "firing"


async def test_a_follower_answers_from_the_synced_copy(served: Any) -> None:
    n, url, s = served
    n.leader_view.leader = "node-2"
    n.controller.tick()  # not the leader: nothing runs
    mem = ControllerMemory(seq=7, avoided=["node-3"])
    d = Decision(7, 5.0, "avoid_node", "loop_lag", "x", node="node-3")
    n.controller.on_message("node-2", ControllerSync("node-2", 1, mem, [d]))
    async with s.get(f"{url}{P}/controller/status") as r:
        doc = await r.json()
    assert doc["running"] is False and doc["synced_from"] == "node-2" and doc["avoided"] == ["node-3"]
    assert doc["last_seq"] == 7 and doc["leader"] == "node-2"
    async with s.get(f"{url}{P}/controller/decisions") as r:
        assert [d["kind"] for d in await r.json()] == ["avoid_node"]
