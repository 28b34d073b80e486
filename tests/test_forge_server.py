"""Forge's REST API (aether.forge.server) against a fake Forge: authentication, bodies, errors,
the dispatch of every control, and the OpenAPI document (valid, and naming what is served)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from aether.core.errors import StatusError
from aether.forge.app import Forge
from aether.forge.config import LoadConfig, Target
from aether.forge.errors import ForgeConflict as Conflict
from aether.forge.errors import NodeNotFound as NotFound
from aether.forge.load import FailedRequest, LoadGenerator
from aether.forge.server import (
    COOKIE,
    ROUTES,
    ActionResult,
    ForgeServer,
    LinkBody,
    SliceFailBody,
    StateAnswer,
    UpdateBody,
    build_forge_openapi,
)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeForge:
    max_rate = 1000.0

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.nodes = {"node-1", "node-2", "node-3"}

    def _node(self, node: str) -> None:
        if node not in self.nodes:
            raise NotFound(f"no node {node!r}; nodes: {', '.join(sorted(self.nodes))}")

    def state(self) -> StateAnswer:
        return StateAnswer({"leader": "node-1", "nodes": sorted(self.nodes)}, None)

    def series(self, since: float) -> list[Any]:
        self.calls.append(("series", since))
        return [{"t": since + 1}]

    def events(self, since: int) -> tuple[list[Any], int]:
        return [{"seq": since + 1, "message": "x"}], since + 1

    def failures(self, after: int) -> tuple[list[FailedRequest], int]:
        self.calls.append(("failures", after))
        return [], after

    async def node_action(self, node: str, action: str) -> ActionResult:
        self._node(node)
        self.calls.append((action, node))
        return ActionResult(message=f"{action} {node}", node=node)

    async def kill_leader(self) -> ActionResult:
        self.calls.append(("kill_leader",))
        return ActionResult(message="killed node-1", node="node-1")

    async def add_node(self) -> ActionResult:
        self.calls.append(("add",))
        return ActionResult(message="added node-4", node="node-4")

    async def remove_node(self, node: str) -> ActionResult:
        self._node(node)
        self.calls.append(("remove", node))
        return ActionResult(message=f"removed {node}", node=node)

    async def rolling_restart(self) -> ActionResult:
        if ("rolling",) in self.calls:
            raise Conflict("a rolling restart is already running")
        self.calls.append(("rolling",))
        return ActionResult(message="rolling restart started")

    async def partition(self, groups: list[list[str]]) -> ActionResult:
        for g in groups:
            for n in g:
                self._node(n)
        self.calls.append(("partition", groups))
        return ActionResult(message="partitioned")

    async def isolate(self, node: str) -> ActionResult:
        self._node(node)
        self.calls.append(("isolate", node))
        return ActionResult(message=f"isolated {node}")

    async def heal(self) -> ActionResult:
        self.calls.append(("heal",))
        return ActionResult(message="healed")

    async def set_link(self, src: str, dst: str, body: LinkBody) -> ActionResult:
        self.calls.append(("link", src, dst, body))
        return ActionResult(message="link set")

    async def fail_slice(self, artifact: str, body: SliceFailBody) -> ActionResult:
        self.calls.append(("fail", artifact, body))
        return ActionResult(message="failing")

    async def heal_slice(self, artifact: str) -> ActionResult:
        self.calls.append(("heal_slice", artifact))
        return ActionResult(message="healed")

    async def update(self, artifact: str, body: UpdateBody) -> ActionResult:
        if body.version == "9.9.9":  # what a node answers for a second rollout
            raise StatusError("a rollout of org.demo:place-order to 0.1.1 is active", status=409)
        self.calls.append(("update", artifact, body))
        return ActionResult(message=f"rollout of {artifact} to {body.version} started")

    def set_rate(self, rate: float) -> ActionResult:
        self.calls.append(("rate", rate))
        return ActionResult(message=f"rate {rate}")

    def ramp(self, to: float, seconds: float) -> ActionResult:
        self.calls.append(("ramp", to, seconds))
        return ActionResult(message="ramping")

    def pause(self) -> ActionResult:
        self.calls.append(("pause",))
        return ActionResult(message="paused")

    def resume(self) -> ActionResult:
        self.calls.append(("resume",))
        return ActionResult(message="resumed")

    def trace(self) -> bytes:
        raise Conflict("no load is configured")

    def replay(self, trace: bytes, speed: float) -> ActionResult:
        self.calls.append(("replay", trace, speed))
        return ActionResult(message="replaying")


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient[Any, Any], FakeForge]]:
    fake = FakeForge()
    client: TestClient[Any, Any] = TestClient(TestServer(ForgeServer(fake, TOKEN).app()))
    await client.start_server()
    try:
        yield client, fake
    finally:
        await client.close()


async def test_every_request_needs_the_token(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, fake = served
    for method, path in (("GET", "/api/state"), ("POST", "/api/nodes/node-2/kill"),
                         ("GET", "/static/index.html"), ("GET", "/api/openapi.json"), ("GET", "/nope")):
        resp = await client.request(method, path)
        assert resp.status == 401, (method, path)
        assert resp.content_type == "application/problem+json"
        assert "token" in (await resp.json())["detail"]
    resp = await client.get("/api/state", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    page = await client.get("/")
    assert page.status == 401 and "?token=" in await page.text()
    assert fake.calls == []


async def test_the_token_url_sets_a_strict_cookie(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, _ = served
    bad = await client.get("/?token=nope", allow_redirects=False)
    assert bad.status == 401
    resp = await client.get(f"/?token={TOKEN}", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/"
    cookie = resp.cookies[COOKIE]
    assert cookie.value == TOKEN and cookie["httponly"] and cookie["samesite"] == "Strict"
    page = await client.get("/", cookies={COOKIE: TOKEN})
    assert page.status == 200 and "<html" in (await page.text()).lower()
    state = await client.get("/api/state", cookies={COOKIE: TOKEN})
    assert state.status == 200 and (await state.json())["cluster"]["leader"] == "node-1"


async def test_a_write_from_another_origin_is_refused(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, fake = served
    for origin in ("http://evil.example", "null"):
        resp = await client.post("/api/nodes/node-2/kill", headers={**AUTH, "Origin": origin})
        assert resp.status == 403, origin
    assert fake.calls == []
    same = f"http://{client.host}:{client.port}"
    resp = await client.post("/api/nodes/node-2/kill", headers={**AUTH, "Origin": same})
    assert resp.status == 200 and fake.calls == [("kill", "node-2")]


async def test_controls_reach_the_forge(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, fake = served
    for action in ("kill", "crash", "stop", "restart"):
        resp = await client.post(f"/api/nodes/node-3/{action}", headers=AUTH)
        assert resp.status == 200
        assert await resp.json() == {"ok": True, "message": f"{action} node-3", "node": "node-3"}
    assert (await client.post("/api/leader/kill", headers=AUTH)).status == 200
    assert (await client.post("/api/nodes", headers=AUTH)).status == 201
    assert (await client.delete("/api/nodes/node-2", headers=AUTH)).status == 200
    assert (await client.post("/api/rolling-restart", headers=AUTH)).status == 202
    assert (await client.post("/api/network/partition", headers=AUTH,
                              json={"groups": [["node-1"], ["node-2", "node-3"]]})).status == 200
    assert (await client.post("/api/network/isolate/node-2", headers=AUTH)).status == 200
    assert (await client.post("/api/network/heal", headers=AUTH)).status == 200
    assert (await client.put("/api/network/links/node-1/node-2", headers=AUTH,
                             json={"delay_ms": 150, "loss": 0.1})).status == 200
    assert (await client.post("/api/slices/org.demo:place-order:0.1.0/fail", headers=AUTH,
                              json={"error_rate": 0.5})).status == 200
    assert (await client.post("/api/slices/org.demo:place-order:0.1.0/heal", headers=AUTH)).status == 200
    resp = await client.post("/api/slices/org.demo:place-order/update", headers=AUTH,
                             json={"version": "0.1.1", "strategy": "canary"})
    assert resp.status == 202 and "0.1.1" in (await resp.json())["message"]
    assert (await client.put("/api/load/rate", headers=AUTH, json={"rate": 120})).status == 200
    assert (await client.post("/api/load/ramp", headers=AUTH, json={"to": 300, "seconds": 5})).status == 200
    assert (await client.post("/api/load/pause", headers=AUTH)).status == 200
    assert (await client.post("/api/load/resume", headers=AUTH)).status == 200
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["kill", "crash", "stop", "restart", "kill_leader", "add", "remove", "rolling",
                     "partition", "isolate", "heal", "link", "fail", "heal_slice", "update", "rate", "ramp",
                     "pause", "resume"]
    link = next(c for c in fake.calls if c[0] == "link")
    assert link[1:3] == ("node-1", "node-2") and link[3].delay_ms == 150 and link[3].both_ways
    update = next(c for c in fake.calls if c[0] == "update")
    assert update[1] == "org.demo:place-order" and update[2] == UpdateBody(version="0.1.1", strategy="canary")
    fail = next(c for c in fake.calls if c[0] == "fail")
    assert fail[1] == "org.demo:place-order:0.1.0" and fail[2].error_rate == 0.5 and fail[2].node is None


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/api/nodes/node-9/kill", None, 404, "node-9"),
        ("POST", "/api/nodes/node-1/explode", None, 400, "explode"),
        ("PUT", "/api/load/rate", {"rate": -1}, 400, "rate"),
        ("PUT", "/api/load/rate", {"rate": 1e9}, 400, "rate"),
        ("PUT", "/api/load/rate", {"speed": 3}, 400, "speed"),
        ("PUT", "/api/network/links/node-1/node-2", {"loss": 1.5}, 400, "loss"),
        ("POST", "/api/network/partition", {"groups": "node-1"}, 400, "groups"),
        ("POST", "/api/network/partition", {"groups": [["node-7"]]}, 404, "node-7"),
        ("POST", "/api/slices/x:y:1/fail", {"error_rate": 2}, 400, "error_rate"),
        ("POST", "/api/slices/org.demo:place-order/update", {"version": " "}, 400, "version"),
        ("POST", "/api/slices/org.demo:place-order/update", {"version": "1.0.0", "strategy": "yolo"}, 400,
         "canary"),
        ("POST", "/api/slices/org.demo:place-order/update", {"to": "1.0.0"}, 400, "unknown field `to`"),
        ("POST", "/api/slices/org.demo:place-order/update", {"version": "9.9.9"}, 409, "is active"),
        ("GET", "/api/load/trace", None, 409, "no load"),
        ("GET", "/api/series?since=abc", None, 400, "since"),
        ("GET", "/api/load/failures?after=abc", None, 400, "after must be a whole number >= 0"),
        ("GET", "/api/load/failures?after=-1", None, 400, "after must be a whole number >= 0"),
        ("GET", "/api/load/failures?after=1.5", None, 400, "'1.5'"),
        ("GET", "/api/load/failures?after=", None, 400, "after must be a whole number >= 0"),
        ("GET", "/api/load/failures?after=%C2%B2", None, 400, "after must be"),  # a superscript two
        ("GET", "/api/load/failures?after=" + "9" * 5000, None, 400, "after must be"),
        ("GET", "/api/load/failures?after=1&after=2", None, 400, "'after' given more than once"),
        ("GET", "/api/load/failures?since=3", None, 400, "accepts: after"),
        ("GET", "/api/state?x=1", None, 400, "x"),
        ("GET", "/api/nothing-here", None, 404, "Not Found"),
    ],
)
async def test_bad_requests_get_problems_naming_the_issue(
    served: tuple[TestClient[Any, Any], FakeForge], method: str, path: str, body: Any, status: int,
    words: str,
) -> None:
    client, _ = served
    resp = await client.request(method, path, headers=AUTH, json=body)
    assert resp.status == status
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["status"] == status and words in problem["detail"]


async def test_a_bad_after_never_reaches_the_forge(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, fake = served
    assert (await client.get("/api/load/failures?after=x", headers=AUTH)).status == 400
    assert fake.calls == []
    resp = await client.get("/api/load/failures?after=0012", headers=AUTH)
    assert resp.status == 200 and await resp.json() == {"failures": [], "next": 12}
    assert fake.calls == [("failures", 12)]


def _load_forge(load: LoadGenerator | None) -> Forge:
    """The real Forge object (its cluster is not needed to answer about the load)."""
    return Forge(cast(Any, None), load, max_rate=100.0)


@pytest.fixture
async def load_served() -> AsyncIterator[tuple[TestClient[Any, Any], LoadGenerator]]:
    """The real server and Forge over a load generator that is not started: the tests record its
    requests' ends in its statistics as it does when answers come back."""
    config = LoadConfig(targets=[Target(name="place-order", path="/api/orders")])
    gen = LoadGenerator(config, lambda: ["127.0.0.1:4001"], clock=lambda: 1000.0)
    client: TestClient[Any, Any] = TestClient(TestServer(ForgeServer(_load_forge(gen), TOKEN).app()))
    await client.start_server()
    try:
        yield client, gen
    finally:
        await client.close()


async def test_the_failures_after_a_number_come_oldest_first_with_next(
    load_served: tuple[TestClient[Any, Any], LoadGenerator],
) -> None:
    client, gen = load_served
    stats = gen.core.stats

    async def failures(query: str = "") -> Any:
        resp = await client.get(f"/api/load/failures{query}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    assert await failures() == {"failures": [], "next": 0}
    stats.finished("place-order", "127.0.0.1:4001", None, 0.01, 1000.0)  # a success: not kept
    stats.finished("place-order", "127.0.0.1:4001", "503", 0.02, 1001.0, detail="map 'orders': no answer")
    stats.finished("place-order", None, "error:no_node", None, 1002.0, detail="no address to send to")
    stats.finished("place-order", "127.0.0.1:4002", "500", 0.03, 1003.5, detail="<b>boom</b> & more")
    everything = await failures()
    assert everything == {"next": 3, "failures": [
        {"seq": 1, "t": 1001.0, "target": "place-order", "node": "127.0.0.1:4001", "cause": "503",
         "detail": "map 'orders': no answer"},
        {"seq": 2, "t": 1002.0, "target": "place-order", "node": None, "cause": "error:no_node",
         "detail": "no address to send to"},
        {"seq": 3, "t": 1003.5, "target": "place-order", "node": "127.0.0.1:4002", "cause": "500",
         "detail": "<b>boom</b> & more"},
    ]}
    assert await failures("?after=0") == everything
    assert await failures("?after=1") == {"failures": everything["failures"][1:], "next": 3}
    assert await failures("?after=3") == {"failures": [], "next": 3}
    # an `after` beyond the latest (the page saw an earlier generator): nothing, and `next` says so
    assert await failures("?after=50") == {"failures": [], "next": 3}


async def test_the_failures_keep_the_latest_only(
    load_served: tuple[TestClient[Any, Any], LoadGenerator],
) -> None:
    client, gen = load_served
    for i in range(250):
        gen.core.stats.finished("place-order", "127.0.0.1:4001", "503", 0.01, 1000.0 + i, detail=f"n{i}")
    answer = await (await client.get("/api/load/failures?after=10", headers=AUTH)).json()
    assert [f["seq"] for f in answer["failures"]] == list(range(51, 251)) and answer["next"] == 250
    answer = await (await client.get("/api/load/failures?after=249", headers=AUTH)).json()
    assert answer == {"failures": [{"seq": 250, "t": 1249.0, "target": "place-order",
                                    "node": "127.0.0.1:4001", "cause": "503", "detail": "n249"}],
                      "next": 250}


async def test_the_failures_without_load_are_a_conflict() -> None:
    client: TestClient[Any, Any] = TestClient(TestServer(ForgeServer(_load_forge(None), TOKEN).app()))
    await client.start_server()
    try:
        resp = await client.get("/api/load/failures?after=0", headers=AUTH)
        assert resp.status == 409 and resp.content_type == "application/problem+json"
        assert "no load is configured" in (await resp.json())["detail"]
        bad = await client.get("/api/load/failures?after=no", headers=AUTH)  # checked first
        assert bad.status == 400 and "after" in (await bad.json())["detail"]
    finally:
        await client.close()


async def test_a_trace_is_replayed_at_the_speed_asked(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, fake = served
    trace = b'{"start": 0, "targets": ["a"]}\n[3]\n[4]\n'
    resp = await client.post("/api/load/replay?speed=2", headers=AUTH, data=trace)
    assert resp.status == 200 and fake.calls == [("replay", trace, 2.0)]
    for path, body, words in (("/api/load/replay", b"", "needs a trace"),
                              ("/api/load/replay?speed=0", trace, "speed")):
        resp = await client.post(path, headers=AUTH, data=body)
        assert resp.status == 400 and words in (await resp.json())["detail"]


async def test_a_second_rolling_restart_conflicts(served: tuple[TestClient[Any, Any], FakeForge]) -> None:
    client, _ = served
    assert (await client.post("/api/rolling-restart", headers=AUTH)).status == 202
    resp = await client.post("/api/rolling-restart", headers=AUTH)
    assert resp.status == 409 and "already" in (await resp.json())["detail"]


async def test_the_body_is_bounded_before_anything_else(
    served: tuple[TestClient[Any, Any], FakeForge],
) -> None:
    client, fake = served
    resp = await client.put("/api/load/rate", headers={**AUTH, "Content-Type": "application/json"},
                            data=b'{"rate": 1' + b" " * 100_000 + b"}")
    assert resp.status == 413
    assert fake.calls == []


async def test_openapi_is_valid_and_names_every_served_route(
    served: tuple[TestClient[Any, Any], FakeForge],
) -> None:
    client, _ = served
    resp = await client.get("/api/openapi.json", headers=AUTH)
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)
    assert doc == build_forge_openapi()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    declared = {(r.method, r.path.replace("{{", "{").replace("}}", "}")) for r in ROUTES}
    assert declared <= documented
    assert ("GET", "/api/openapi.json") in documented
    # every control of the page is in the document
    for path in ("/api/nodes/{id}/{action}", "/api/leader/kill", "/api/network/partition",
                 "/api/network/links/{src}/{dst}", "/api/slices/{artifact}/fail", "/api/load/rate",
                 "/api/load/ramp", "/api/load/pause", "/api/load/resume", "/api/rolling-restart",
                 "/api/load/failures"):
        assert path in doc["paths"], path
