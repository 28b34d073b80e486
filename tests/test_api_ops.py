"""Management API operations endpoints: health, nodes and the server-sent event stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from aether.api.events import EventHub
from aether.api.server import ManagementServer
from aether.cluster.leader import LeaderChanged
from aether.core.errors import NotReady
from aether.core.status import KVEntry, MemberStatus, NodeStatus
from aether.kv.keys import BlueprintSlice, BlueprintValue, SliceStateValue
from aether.kv.machine import WatchEvent
from aether.kv.store import encode_value
from aether.transport import EventBus, PeerDown, PeerUp

pytestmark = pytest.mark.timeout(30)


class FakeKV:
    """`watch(prefix, cb)` like KVStore; `put`/`remove`/`reset` drive the callbacks."""

    def __init__(self) -> None:
        self.watches: dict[int, tuple[str, Callable[[WatchEvent], None]]] = {}
        self._n = 0
        self.rev = 0

    def watch(self, prefix: str, cb: Callable[[WatchEvent], None]) -> Callable[[], None]:
        self._n += 1
        wid = self._n
        self.watches[wid] = (prefix, cb)
        return lambda: self.watches.pop(wid, None)  # type: ignore[func-returns-value]

    def _emit(self, ev: WatchEvent) -> None:
        for prefix, cb in list(self.watches.values()):
            if ev.key.startswith(prefix) or ev.kind == "reset":
                cb(ev)

    def put(self, key: str, value: Any) -> None:
        self.rev += 1
        self._emit(WatchEvent("put", key, encode_value(key, value), self.rev))

    def remove(self, key: str) -> None:
        self.rev += 1
        self._emit(WatchEvent("remove", key, None, self.rev))


class FakeNode:
    def __init__(self, *, quorum: bool = True, leader: str | None = "node-1", events: bool = True) -> None:
        self.node_id = "node-1"
        self.quorum = quorum
        self.leader = leader
        self.fail_with: BaseException | None = None
        if events:
            self.bus = EventBus()
            self.kv = FakeKV()

    def status(self) -> NodeStatus:
        if self.fail_with is not None:
            raise self.fail_with
        return NodeStatus(
            node_id=self.node_id,
            leader=self.leader,
            quorum=self.quorum,
            nodes=[
                MemberStatus("node-1", "127.0.0.1:7000", "up"),
                MemberStatus("node-2", "127.0.0.1:7001", "up" if self.quorum else "down"),
                MemberStatus("node-3", "127.0.0.1:7002", "down"),
            ],
        )

    def kv_list(self, prefix: str) -> list[KVEntry]:
        return []


async def _server(node: FakeNode, **kw: Any) -> ManagementServer:
    srv = ManagementServer(node, host="127.0.0.1", port=0, **kw)
    await srv.start()
    return srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


# -- health and nodes -------------------------------------------------------------------------------


async def test_health_ready(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode())
    try:
        async with session.get(f"{srv.url}/api/v1/health") as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["status"] == "ok" and doc["live"] is True and doc["ready"] is True
        assert doc["node_id"] == "node-1" and doc["quorum"] is True and doc["leader"] == "node-1"
        assert isinstance(doc["time"], float)
    finally:
        await srv.stop()


async def test_health_without_quorum_is_503_but_live(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode(quorum=False, leader=None))
    try:
        async with session.get(f"{srv.url}/api/v1/health") as r:
            assert r.status == 503
            doc = json.loads(await r.read())
        assert doc["live"] is True and doc["ready"] is False and doc["quorum"] is False
        assert "quorum" in doc["reason"] and doc["detail"] == doc["reason"] and doc["status"] == 503
    finally:
        await srv.stop()


async def test_health_not_ready_node_is_503(session: aiohttp.ClientSession) -> None:
    node = FakeNode()
    node.fail_with = NotReady("still recovering")
    srv = await _server(node)
    try:
        async with session.get(f"{srv.url}/api/v1/health") as r:
            assert r.status == 503
            doc = json.loads(await r.read())
        assert doc["ready"] is False and doc["live"] is True and doc["reason"] == "still recovering"
    finally:
        await srv.stop()


async def test_nodes_list(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode())
    try:
        async with session.get(f"{srv.url}/api/v1/nodes") as r:
            assert r.status == 200
            doc = await r.json()
        NOWHERE = {"management": None, "http": None}  # the fakes publish no addresses
        assert doc == [
            {"id": "node-1", "address": "127.0.0.1:7000", "state": "up", "leader": True} | NOWHERE,
            {"id": "node-2", "address": "127.0.0.1:7001", "state": "up", "leader": False} | NOWHERE,
            {"id": "node-3", "address": "127.0.0.1:7002", "state": "down", "leader": False} | NOWHERE,
        ]
        async with session.get(f"{srv.url}/api/v1/nodes?x=1") as r:
            assert r.status == 400
    finally:
        await srv.stop()


async def test_events_endpoint_needs_router_and_kv(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode(events=False))
    try:
        async with session.get(f"{srv.url}/api/v1/events") as r:
            assert r.status == 404
    finally:
        await srv.stop()


# -- server-sent events ------------------------------------------------------------------------------


async def _read_event(resp: aiohttp.ClientResponse, *, comments: bool = False) -> dict[str, Any]:
    """The next event block as {id, event, data} (or {"comment": ...} if `comments`)."""
    block: dict[str, Any] = {}
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
        assert line, "stream ended"
        line = line.rstrip("\n")
        if not line:
            if block:
                return block
            continue
        if line.startswith(":"):
            if comments:
                return {"comment": line[1:].strip()}
            continue
        name, _, value = line.partition(": ")
        block[name] = json.loads(value) if name == "data" else value


async def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_events_arrive_in_order_with_ids(session: aiohttp.ClientSession) -> None:
    node = FakeNode()
    srv = await _server(node)
    try:
        async with session.get(f"{srv.url}/api/v1/events") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            hello = await _read_event(r)
            assert hello["event"] == "hello" and hello["data"]["node_id"] == "node-1"
            node.bus.publish(PeerUp("node-2"))
            node.bus.publish(PeerDown("node-3", "heartbeat timeout"))
            node.bus.publish(LeaderChanged("node-2", "node-1", False))
            node.kv.put("slices/node-2/org.demo:hello:1.0.0", SliceStateValue("FAILED", 12.5, "boom", [1, 2]))
            node.kv.remove("slices/node-2/org.demo:hello:1.0.0")
            node.kv.put("blueprints/demo", BlueprintValue([BlueprintSlice("org.demo:hello:1.0.0", 2)]))
            node.kv.remove("blueprints/demo")
            got = [await _read_event(r) for _ in range(7)]
    finally:
        await srv.stop()
    assert [g["event"] for g in got] == [
        "node-joined",
        "node-left",
        "leader-changed",
        "slice-state",
        "slice-removed",
        "blueprint-applied",
        "blueprint-deleted",
    ]
    ids = [int(g["id"]) for g in got]
    assert ids == list(range(ids[0], ids[0] + 7))
    assert all(g["data"]["type"] == g["event"] for g in got)
    assert got[0]["data"]["node"] == "node-2"
    assert got[1]["data"]["node"] == "node-3" and got[1]["data"]["reason"] == "heartbeat timeout"
    assert got[2]["data"]["leader"] == "node-2" and got[2]["data"]["previous"] == "node-1"
    s = got[3]["data"]
    assert (s["node"], s["artifact"], s["state"], s["reason"], s["instances"]) == (
        "node-2",
        "org.demo:hello:1.0.0",
        "FAILED",
        "boom",
        [1, 2],
    )
    assert got[4]["data"]["key"] == "slices/node-2/org.demo:hello:1.0.0"
    assert got[5]["data"]["id"] == "demo"
    assert got[5]["data"]["slices"][0]["artifact"] == "org.demo:hello:1.0.0"
    assert got[6]["data"]["id"] == "demo"


async def test_disconnect_unsubscribes(session: aiohttp.ClientSession) -> None:
    node = FakeNode()
    srv = await _server(node)
    try:
        assert srv.events is not None
        r = await session.get(f"{srv.url}/api/v1/events")
        await _read_event(r)
        assert srv.events.subscriber_count == 1
        r.close()
        await _wait_for(lambda: srv.events.subscriber_count == 0)
    finally:
        await srv.stop()
    # the hub let go of the bus and the store when the server stopped
    assert node.kv.watches == {}


async def test_heartbeat_comment(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode(), heartbeat=0.2)
    try:
        async with session.get(f"{srv.url}/api/v1/events") as r:
            await _read_event(r)
            assert await _read_event(r, comments=True) == {"comment": "keepalive"}
    finally:
        await srv.stop()


async def test_server_stop_ends_streams(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode())
    r = await session.get(f"{srv.url}/api/v1/events")
    await _read_event(r)
    await asyncio.wait_for(srv.stop(), 5)
    rest = await asyncio.wait_for(r.content.read(), 5)
    assert rest == b""
    r.close()


async def test_slow_subscriber_is_dropped_with_a_final_event() -> None:
    node = FakeNode()
    hub = EventHub(node, queue_size=3)  # type: ignore[arg-type]
    hub.start()
    slow, fast = hub.subscribe(), hub.subscribe()
    fast_got = []
    for i in range(5):
        node.bus.publish(PeerUp(f"node-{i}"))
        fast_got.append(await fast.next(1))
    assert hub.subscriber_count == 1  # the slow one is gone, the fast one stays
    got = [ev async for ev in slow]
    assert [e.type for e in got] == ["node-joined"] * 3 + ["dropped"]
    assert [e.id for e in got[:3]] == [1, 2, 3]
    assert got[3].data["last_id"] == 3 and "behind" in got[3].data["reason"]
    assert [e.id for e in fast_got if e] == [1, 2, 3, 4, 5]
    hub.stop()
    assert [e async for e in fast] == []
    assert node.kv.watches == {}


async def test_kv_reset_is_a_resync_event() -> None:
    node = FakeNode()
    hub = EventHub(node)  # type: ignore[arg-type]
    hub.start()
    sub = hub.subscribe()
    node.kv._emit(WatchEvent("reset", "", None, 9))
    got = [await sub.next(1), await sub.next(1)]
    assert sorted(e.data["prefix"] for e in got if e) == ["blueprints/", "slices/"]
    hub.stop()


async def test_a_blocked_slice_loop_is_a_slice_blocked_event() -> None:
    from aether.slices.isolation import SliceBlockedNotice

    node = FakeNode()
    hub = EventHub(node)  # type: ignore[arg-type]
    hub.start()
    sub = hub.subscribe()
    node.bus.publish(SliceBlockedNotice("node-2", "org.x:y:1.0.0", "nap", 0.61, "s.py:9 in nap", False))
    ev = await sub.next(1)
    assert ev is not None and ev.type == "slice-blocked"
    assert {k: ev.data[k] for k in ("node", "artifact", "entry", "seconds", "where", "quarantined")} == {
        "node": "node-2", "artifact": "org.x:y:1.0.0", "entry": "nap", "seconds": 0.61,
        "where": "s.py:9 in nap", "quarantined": False,
    }
    hub.stop()


# -- probes -----------------------------------------------------------------------------------------


async def test_livez_and_readyz_answer_without_the_key(session: aiohttp.ClientSession) -> None:
    srv = await _server(FakeNode(), api_key="k")
    try:
        async with session.get(f"{srv.url}/livez") as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["status"] == "ok" and doc["live"] is True and doc["node_id"] == "node-1"
        async with session.get(f"{srv.url}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["ready"] is True
        async with session.head(f"{srv.url}/readyz") as r:
            assert r.status == 200
        async with session.get(f"{srv.url}/api/v1/health") as r:  # the rest keeps the key
            assert r.status == 401
        async with session.get(f"{srv.url}/readyz?x=1") as r:  # still a strict endpoint
            assert r.status == 400
    finally:
        await srv.stop()


async def test_livez_needs_no_quorum_readyz_does(session: aiohttp.ClientSession) -> None:
    node = FakeNode(quorum=False, leader=None)
    node.fail_with = NotReady("still recovering")
    srv = await _server(node, api_key="k")
    try:
        async with session.get(f"{srv.url}/livez") as r:
            assert r.status == 200
        async with session.get(f"{srv.url}/readyz") as r:
            assert r.status == 503 and r.content_type == "application/problem+json"
            doc = json.loads(await r.read())
        assert doc["reason"] == "still recovering" and doc["live"] is True and doc["ready"] is False
        node.fail_with = None
        async with session.get(f"{srv.url}/readyz") as r:
            assert r.status == 503
            assert "no quorum" in json.loads(await r.read())["reason"]
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"http": None}, "the HTTP router is not running"),
        ({"journal_error": "disk full"}, "the consensus journal failed: disk full"),
        ({"store_write_failing_for": 3.0, "store_write_error": "commit timed out"},
         "writes to the cluster store have failed for 3 s: commit timed out"),
    ],
)
async def test_readyz_is_503_when_the_node_does_not_serve(
    session: aiohttp.ClientSession, change: dict[str, Any], reason: str
) -> None:
    import msgspec

    node = FakeNode()
    node.http = object()  # type: ignore[attr-defined]
    base = node.status()
    if "http" in change:
        node.http = None  # type: ignore[attr-defined]
    else:
        node.status = lambda: msgspec.structs.replace(base, **change)  # type: ignore[method-assign]
    srv = await _server(node)
    try:
        async with session.get(f"{srv.url}/readyz") as r:
            assert r.status == 503
            doc = json.loads(await r.read())
        assert doc["reason"].startswith(reason) and doc["quorum"] is True
        async with session.get(f"{srv.url}/api/v1/health") as r:  # health asks for quorum only
            assert r.status == 200
    finally:
        await srv.stop()
