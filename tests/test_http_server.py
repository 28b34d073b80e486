"""Tests of aether.http.server.HttpRouter over real loopback HTTP, with a fake KV store and invoker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from aether.http.server import HttpRouter
from aether.http.unrouted import Unrouted, unrouted
from aether.invoke.errors import (
    EndpointUnavailable,
    InvokeBadRequest,
    InvokeError,
    InvokerClosed,
    InvokeTimeout,
    PoisonRequest,
    SliceAppError,
    UnknownEntryError,
)
from aether.kv.keys import BlueprintSlice, BlueprintValue, RouteValue, SliceStateValue
from aether.kv.machine import WatchEvent

pytestmark = pytest.mark.timeout(30)

ART = "org.example:hello:1.0.0"


class FakeKV:
    def __init__(self, routes: dict[str, RouteValue]) -> None:
        self.data: dict[str, Any] = dict(routes)
        self.watchers: list[tuple[str, Callable[[Any], None]]] = []

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        item = (prefix, callback)
        self.watchers.append(item)
        return lambda: self.watchers.remove(item)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._emit(WatchEvent("put", key, msgspec.msgpack.encode(value), 1))

    def remove(self, key: str) -> None:
        self.data.pop(key, None)
        self._emit(WatchEvent("remove", key, None, 2))

    def reset(self, data: dict[str, RouteValue]) -> None:
        self.data = dict(data)
        self._emit(WatchEvent("reset", "routes/", None, 3))

    def _emit(self, ev: WatchEvent) -> None:
        for prefix, cb in list(self.watchers):
            if ev.kind == "reset" or ev.key.startswith(prefix):
                cb(ev)


class FakeInvoker:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.behaviour: Callable[[str, str, bytes], Any] = lambda t, m, p: msgspec.msgpack.encode(
            {"echo": msgspec.msgpack.decode(p) if p else None}
        )

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        self.calls.append(
            {
                "target": target,
                "method": method,
                "payload": payload,
                "request_id": request_id,
                "timeout": timeout,
            }
        )
        out = self.behaviour(target, method, payload)
        if isinstance(out, BaseException):
            raise out
        if asyncio.iscoroutine(out):
            out = await out
        assert isinstance(out, bytes)
        return out


ROUTES = {
    "routes/GET:/hello/{name}": RouteValue(ART, "greet", {"name": "path", "greeting": "query"}),
    "routes/POST:/api/orders": RouteValue(ART, "place", {"item": "body", "qty": "body"}),
    "routes/GET:/api/orders/{id}": RouteValue(ART, "get_order", {"id": "path", "x_tenant": "header"}),
    "routes/DELETE:/api/orders/{id}": RouteValue(ART, "cancel", {"id": "path"}),
    "routes/GET:/ping": RouteValue(ART, "ping", {}),
    "routes/POST:/raw": RouteValue(ART, "raw", {}),
}


class Env:
    def __init__(
        self, router: HttpRouter, kv: FakeKV, inv: FakeInvoker, session: aiohttp.ClientSession
    ) -> None:
        self.router, self.kv, self.inv, self.session = router, kv, inv, session

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.router.port}"

    async def req(self, method: str, path: str, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.request(method, self.base + path, **kw) as r:
            raw = await r.read()
            body = msgspec.json.decode(raw) if raw else None
            return r.status, body, r


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    kv = FakeKV(ROUTES)
    inv = FakeInvoker()
    router = HttpRouter("node-1", kv, inv, host="127.0.0.1", port=0, max_body=1024, request_timeout=2.0)
    await router.start()
    assert router.port > 0
    session = aiohttp.ClientSession()
    try:
        yield Env(router, kv, inv, session)
    finally:
        await session.close()
        await router.stop()
        assert kv.watchers == []


def assert_problem(status: int, body: Any, r: aiohttp.ClientResponse, expected: int, *needles: str) -> None:
    assert status == expected, body
    assert r.content_type == "application/problem+json"
    assert body["status"] == expected and body["type"] == "about:blank" and body["title"]
    for n in needles:
        assert n in body["detail"], (n, body["detail"])
    assert "Traceback" not in body["detail"]
    assert r.headers.get("X-Request-Id")


async def test_get_with_path_and_query_binding(env: Env) -> None:
    status, body, r = await env.req("GET", "/hello/J%C3%BCrgen%2Fx?greeting=Hi")
    assert status == 200 and r.content_type == "application/json"
    assert body == {"echo": {"name": "Jürgen/x", "greeting": "Hi"}}
    (call,) = env.inv.calls
    # the route's group:artifact, not its version: any live version serves it (rollout weights apply)
    assert call["target"] == "org.example:hello" and call["method"] == "greet" and call["timeout"] == 2.0
    assert call["request_id"] == r.headers["X-Request-Id"]


async def test_head_answers_the_get_route_without_a_body(env: Env) -> None:
    """HEAD falls back to the GET route; aiohttp's low-level server sends the head only."""
    async with env.session.head(env.base + "/ping") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert r.headers.get("X-Request-Id") and await r.read() == b""
    assert [c["method"] for c in env.inv.calls] == ["ping"]


async def test_request_id_is_echoed_or_generated(env: Env) -> None:
    _, _, r = await env.req("GET", "/ping", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    assert env.inv.calls[-1]["request_id"] == "abc-123"
    _, _, r = await env.req("GET", "/ping", headers={"X-Request-Id": "bad id with spaces"})
    generated = r.headers["X-Request-Id"]
    assert generated != "bad id with spaces" and len(generated) == 16
    _, _, r2 = await env.req("GET", "/ping")
    assert r2.headers["X-Request-Id"] not in ("", generated)
    _, _, r3 = await env.req("GET", "/nothing", headers={"X-Request-Id": "trace-9"})
    assert r3.headers["X-Request-Id"] == "trace-9"


async def test_no_bindings_and_no_body_sends_empty_payload_and_str_answer_is_json_string(env: Env) -> None:
    env.inv.behaviour = lambda t, m, p: msgspec.msgpack.encode("pong")
    status, body, _ = await env.req("GET", "/ping")
    assert status == 200 and body == "pong"
    assert env.inv.calls[-1]["payload"] == b""


async def test_post_body_binding_and_header_binding(env: Env) -> None:
    status, body, _ = await env.req("POST", "/api/orders", json={"item": "pen", "qty": 2})
    assert status == 200 and body == {"echo": {"item": "pen", "qty": 2}}
    status, body, _ = await env.req("GET", "/api/orders/42", headers={"X-Tenant": "acme"})
    assert status == 200 and body == {"echo": {"id": "42", "x_tenant": "acme"}}


async def test_non_utf8_bytes_in_a_bound_header_are_400_not_500(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.router.port)
    writer.write(b"GET /api/orders/42 HTTP/1.1\r\nHost: x\r\nX-Tenant: ac\xffme\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", raw[:300]
    assert "header 'x_tenant' is not valid UTF-8" in msgspec.json.decode(body)["detail"]
    assert env.inv.calls == []
    assert not [r for r in caplog.records if r.exc_info]


async def test_whole_body_passed_when_route_has_no_bindings(env: Env) -> None:
    status, body, _ = await env.req(
        "POST", "/raw", data=b'[1, "two"]', headers={"Content-Type": "application/json"}
    )
    assert status == 200 and body == {"echo": [1, "two"]}


async def test_malformed_json_is_400_and_slice_not_called(env: Env) -> None:
    status, body, r = await env.req(
        "POST", "/api/orders", data=b'{"item": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(status, body, r, 400, "not valid JSON")
    status, body, r = await env.req(
        "POST", "/api/orders", data=b"[1]", headers={"Content-Type": "application/json"}
    )
    assert_problem(status, body, r, 400, "object with fields item, qty")
    assert env.inv.calls == []


async def test_strict_input_unknown_names_depth_numbers_content_type(env: Env) -> None:
    """Issue 11, item 6: each is answered before the slice is called, naming the problem."""
    status, body, r = await env.req("POST", "/api/orders", json={"item": "pen", "qty": 2, "zzz": 1})
    assert_problem(status, body, r, 400, "unknown field 'zzz'", "accepts: item, qty")
    status, body, r = await env.req("GET", "/hello/Ann?greeting=Hi&lang=de")
    assert_problem(status, body, r, 400, "unknown query parameter 'lang'", "accepts: greeting")
    json_h = {"Content-Type": "application/json"}
    status, body, r = await env.req("POST", "/raw", data=b"[" * 500 + b"]" * 500, headers=json_h)
    assert_problem(status, body, r, 400, "nested more than 64 levels")
    status, body, r = await env.req(
        "POST", "/api/orders", data=b'{"item": "pen", "qty": 1' + b"0" * 40 + b"}", headers=json_h
    )
    assert_problem(status, body, r, 400, "`$.qty` is out of range")
    for headers in ({"Content-Type": "text/plain"}, {}):
        status, body, r = await env.req(
            "POST", "/api/orders", data=b'{"item": "pen", "qty": 2}', headers=headers
        )
        assert_problem(status, body, r, 415, "Content-Type: application/json")
    assert env.inv.calls == []


async def test_wrong_type_reported_by_slice_is_400_naming_field(env: Env) -> None:
    env.inv.behaviour = lambda t, m, p: InvokeBadRequest(
        f"bad request to {t}.{m} on node-1 (request r): invalid request for entry Orders.place: "
        "Expected `int`, got `str` - at `$.qty`",
        kind="bad_request",
    )
    status, body, r = await env.req("POST", "/api/orders", json={"item": "pen", "qty": "many"})
    assert_problem(status, body, r, 400, "$.qty", "Expected `int`")


async def test_oversized_body_is_413(env: Env) -> None:
    status, body, r = await env.req(
        "POST", "/raw", data=b"1" * 2000, headers={"Content-Type": "application/json"}
    )
    assert_problem(status, body, r, 413, "1024")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"1" * 300

    status, body, r = await env.req("POST", "/raw", data=chunks())
    assert_problem(status, body, r, 413, "1024")
    assert env.inv.calls == []


async def test_unknown_route_is_404_naming_method_and_path(env: Env) -> None:
    status, body, r = await env.req("GET", "/no/such/thing")
    assert_problem(status, body, r, 404, "GET /no/such/thing")


async def test_unknown_route_without_quorum_is_503_not_404(env: Env) -> None:
    """Found by Forge: a node that just joined answered 404 "no route" for the cluster's routes
    while it was still catching up (its route table incomplete). Without quorum it cannot know,
    so it says so: 503 with Retry-After; known routes are still served."""
    quorum = [False]
    env.router.has_quorum = lambda: quorum[0]
    status, body, r = await env.req("GET", "/no/such/thing")
    assert_problem(status, body, r, 503, "GET /no/such/thing", "node-1 has no quorum")
    assert r.headers["Retry-After"] == "1"
    status, _, _ = await env.req("GET", "/ping")
    assert status == 200  # a route it knows is served
    quorum[0] = True
    status, body, r = await env.req("GET", "/no/such/thing")
    assert_problem(status, body, r, 404, "GET /no/such/thing")


LATE = "org.example:late:1.0.0"


def test_unrouted_lists_deployed_artifacts_whose_routes_cannot_be_known_yet() -> None:
    """`aether.http.unrouted`: wanted by a blueprint, no route in the table, and no node got as
    far as activating it (nor failed past loading: its routes were claimed, or it has none)."""
    def bps(*arts: tuple[str, int]) -> list[tuple[str, Any]]:
        return [("blueprints/b", BlueprintValue([BlueprintSlice(a, n) for a, n in arts]))]

    def st(state: str, reason: str | None = None) -> SliceStateValue:
        return SliceStateValue(state, 1.0, reason)

    assert unrouted(bps((LATE, 1)), [], set()) == [Unrouted("org.example:late", ())]  # not placed
    assert unrouted(bps((LATE, 0)), [], set()) == []  # not wanted
    assert unrouted(bps((LATE, 1)), [], {"org.example:late"}) == []  # a route (of any version) calls it
    loading = [(f"slices/n2/{LATE}", st("LOADING")), (f"slices/n1/{LATE}", st("LOADED"))]
    (u,) = unrouted(bps((LATE, 1)), loading, set())
    assert u.states == (("n1", "LOADED", None), ("n2", "LOADING", None)) and not u.failed
    failed = [(f"slices/n1/{LATE}", st("FAILED", "load failed: ImportError: x")),
              (f"slices/n2/{LATE}", st("FAILED", "load timed out after 60.0s"))]  # fmt: skip
    (u,) = unrouted(bps((LATE, 1)), failed, set())
    assert u.failed
    for past_loading in ("ACTIVE", "DEACTIVATE", "DEACTIVATING"):  # got as far as claiming routes
        assert unrouted(bps((LATE, 1)), [*loading, (f"slices/n3/{LATE}", st(past_loading))], set()) == []
    # ACTIVATING is written just before the node claims the routes: not yet known (else a 404 between)
    (u,) = unrouted(bps((LATE, 1)), [(f"slices/n3/{LATE}", st("ACTIVATING"))], set())
    assert u.states == (("n3", "ACTIVATING", None),)
    started = (f"slices/n3/{LATE}", st("FAILED", "activate failed: start() raised: boom"))
    assert unrouted(bps((LATE, 1)), [*failed, started], set()) == []
    # another version loading counts for the artifact; other artifacts' keys do not
    other = [(f"slices/n1/{ART}", st("LOADING")), ("slices/n1/org.example:late:2.0.0", st("LOADING"))]
    (u,) = unrouted(bps((LATE, 1)), other, set())
    assert u.states == (("n1", "LOADING", None),)


async def test_unknown_path_while_a_deployed_slice_has_not_declared_its_routes_is_503(env: Env) -> None:
    """Found by an audit: a deployed slice's routes are known only from its class, so while its
    wheel loads (or fails to import) its paths answered 404 "no route". The route table may lack
    the path then: 503 with Retry-After: 1 naming the slice and why; known routes still served;
    404 again as soon as the store shows its routes can be known (the cached answer follows the
    watches of blueprints/ and slices/)."""
    env.kv.put("blueprints/late", BlueprintValue([BlueprintSlice(LATE, 1)]))
    env.kv.put(f"slices/node-2/{LATE}", SliceStateValue("LOADING", 1.0))
    status, body, r = await env.req("GET", "/late/x")
    assert_problem(status, body, r, 503, "no route for GET /late/x yet", "org.example:late is still loading",
                   "LOADING on node-2")  # fmt: skip
    assert r.headers["Retry-After"] == "1"
    status, _, _ = await env.req("GET", "/ping")
    assert status == 200  # a route it knows is served
    failed = SliceStateValue("FAILED", 1.0, "load failed: ImportError: no late_slice")
    env.kv.put(f"slices/node-2/{LATE}", failed)
    status, body, r = await env.req("GET", "/late/x")
    assert_problem(status, body, r, 503, "org.example:late failed to load", "node-2: load failed: Import")
    assert r.headers["Retry-After"] == "1"  # the cluster loads it again after a backoff
    env.kv.put(f"slices/node-2/{LATE}", SliceStateValue("ACTIVE", 1.0))  # active, and no route: it has none
    status, body, r = await env.req("GET", "/late/x")
    assert_problem(status, body, r, 404, "no route for GET /late/x")
    env.kv.put(f"slices/node-2/{LATE}", SliceStateValue("LOADED", 1.0))
    assert (await env.req("GET", "/late/x"))[0] == 503
    env.kv.remove("blueprints/late")
    assert (await env.req("GET", "/late/x"))[0] == 404


async def test_route_of_a_slice_with_no_active_instance_is_503_with_why(env: Env) -> None:
    """The router's side of a deployed slice that does not serve (its route is kept in the table,
    docs/deployment.md): the invoker's fail fast decides, the router answers its 503 with the
    detail (why) and Retry-After: 1 (starting, or FAILED and started again); the route's entry is
    what was called."""
    starting = EndpointUnavailable(
        "call org.example:hello.greet (request r): org.example:hello has no ACTIVE instance serving "
        "'greet' yet (FAILED on node-2 (activate failed: start() raised: boom), LOAD on node-3)",
        kind="no_instance",
    )
    starting.retry_after = 1
    env.inv.behaviour = lambda t, m, p: starting
    status, body, r = await env.req("GET", "/hello/ann")
    assert_problem(status, body, r, 503, "no ACTIVE instance", "start() raised: boom")
    assert r.headers["Retry-After"] == "1"
    call = env.inv.calls[-1]
    assert (call["target"], call["method"]) == ("org.example:hello", "greet")
    failed = EndpointUnavailable(
        "call org.example:hello.greet (request r): org.example:hello is deployed but every instance "
        "FAILED (node-2: activate failed: start() raised: boom)",
        kind="no_instance",
    )
    env.inv.behaviour = lambda t, m, p: failed
    status, body, r = await env.req("GET", "/hello/ann")
    assert_problem(status, body, r, 503, "every instance FAILED", "node-2: activate failed: start() raised")
    assert r.headers["Retry-After"] == "1"  # the cluster starts FAILED instances again
    status, body, r = await env.req("GET", "/hello")  # not a route: still 404
    assert_problem(status, body, r, 404, "GET /hello")


async def test_wrong_method_is_405_with_allow(env: Env) -> None:
    status, body, r = await env.req("PUT", "/api/orders/7")
    assert_problem(status, body, r, 405, "PUT")
    assert r.headers["Allow"] == "DELETE, GET, HEAD"


async def test_bad_path_encoding_is_400(env: Env) -> None:
    status, body, r = await env.req(
        "GET",
        "/hello/%FF",
    )
    assert_problem(status, body, r, 400, "UTF-8")


@pytest.mark.parametrize(
    ("exc", "expected", "needle"),
    [
        (
            SliceAppError("org.example:hello:1.0.0.greet raised ValueError: boom", kind="app_error"),
            502,
            "boom",
        ),
        # 404 like NotDeployed and the management API (was 502 before issue 13)
        (UnknownEntryError("unknown entry point greet", kind="unknown_entry"), 404, "misconfigured"),
        (
            InvokeTimeout(
                "call x.greet (request r) did not succeed within 2s after 0 attempt(s); last error: "
                "no ACTIVE instance of x with entry 'greet' is reachable",
                kind="no_instance",
            ),
            503,
            "no ACTIVE instance",
        ),
        (
            InvokeTimeout(
                "call x.greet (request r) did not succeed within 2s after 3 attempt(s); last error: "
                "node-2: no_instance: NoLocalInstance",
                kind="no_instance",
            ),
            503,
            "no_instance",
        ),
        # the kind decides, not the text
        (InvokeTimeout("call x.greet: last error: no ACTIVE instance (old text)"), 504, "old text"),
        (PoisonRequest("nodes node-2, node-3 went down running it", kind="app_error"), 502, "went down"),
        (InvokeError("call x.greet failed (weird): ?", kind="weird"), 502, "weird"),
        (InvokeTimeout("call x.greet did not finish before its deadline", kind="deadline"), 504, "deadline"),
        (
            InvokeTimeout("call x.greet did not succeed within 2s; last error: node-2: not reachable"),
            504,
            "not reachable",
        ),
        (InvokerClosed("invoker of node node-1 is closed"), 503, "shutting down"),
        (RuntimeError("secret internals"), 500, "internal error"),
    ],
)
async def test_invoke_errors_map_to_statuses(
    env: Env, exc: BaseException, expected: int, needle: str
) -> None:
    env.inv.behaviour = lambda t, m, p: exc
    status, body, r = await env.req("GET", "/hello/ann")
    assert_problem(status, body, r, expected, needle)
    assert "secret internals" not in body["detail"]


@pytest.mark.parametrize("status", [404, 409, 422])
async def test_entry_status_errors_keep_their_status_and_message(env: Env, status: int) -> None:
    err = SliceAppError(f"x.greet answered {status}: order ORD-1 is unknown", kind=f"status:{status}")
    err.status, err.detail = status, "order ORD-1 is unknown"
    env.inv.behaviour = lambda t, m, p: err
    got, body, r = await env.req("GET", "/hello/ann")
    assert_problem(got, body, r, status, "order ORD-1 is unknown")
    assert body["detail"] == "order ORD-1 is unknown"


async def test_answer_not_json_representable_is_502(env: Env) -> None:
    env.inv.behaviour = lambda t, m, p: b"\xc1"  # never-used MessagePack byte
    status, body, r = await env.req("GET", "/hello/ann")
    assert_problem(status, body, r, 502, "cannot be represented as JSON")


async def test_a_request_in_flight_when_the_router_stops_is_answered(env: Env) -> None:
    """A node stopping (a rolling restart) closed the router first and gave requests in flight
    1 s before aborting their connections, while the slices behind them drain for 5 s: a call of
    2 s failed with a reset connection. The router now waits as long as the slices drain
    (`shutdown_timeout`, 5 s) and stops taking new connections at once."""

    async def slow() -> bytes:
        await asyncio.sleep(2.0)
        return msgspec.msgpack.encode("done")

    env.inv.behaviour = lambda t, m, p: slow()
    pending = asyncio.ensure_future(env.req("GET", "/ping"))
    while not env.inv.calls:
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await env.router.stop()
    status, body, _ = await pending
    assert (status, body) == (200, "done")
    assert loop.time() - t0 < 4.0  # once answered, not the whole timeout
    with pytest.raises(aiohttp.ClientConnectionError):  # no new requests meanwhile
        await env.req("GET", "/ping")


async def test_routes_follow_watch_events_and_reset(env: Env) -> None:
    status, _, _ = await env.req("GET", "/new/1")
    assert status == 404
    env.kv.put("routes/GET:/new/{n}", RouteValue(ART, "fresh", {"n": "path"}))
    status, body, _ = await env.req("GET", "/new/1")
    assert status == 200 and body == {"echo": {"n": "1"}}
    assert env.inv.calls[-1]["method"] == "fresh"
    env.kv.put("routes/GET:/new/{n}", RouteValue("other:art:2", "fresher", {"n": "path"}))
    await env.req("GET", "/new/2")
    assert env.inv.calls[-1]["target"] == "other:art" and env.inv.calls[-1]["method"] == "fresher"
    env.kv.remove("routes/GET:/new/{n}")
    status, _, _ = await env.req("GET", "/new/1")
    assert status == 404
    env.kv.reset({"routes/GET:/only": RouteValue(ART, "only", {})})
    status, _, _ = await env.req("GET", "/only")
    assert status == 200
    status, _, _ = await env.req("GET", "/ping")
    assert status == 404


async def test_invalid_route_record_is_skipped_not_fatal(env: Env) -> None:
    env.kv.put("routes/GET:/bad/{x}", RouteValue(ART, "m", {"x": "query"}))
    status, _, _ = await env.req("GET", "/bad/1")
    assert status == 404
    status, _, _ = await env.req("GET", "/ping")
    assert status == 200


async def test_slow_invoke_respects_concurrency(env: Env) -> None:
    async def slow() -> bytes:
        await asyncio.sleep(0.2)
        return msgspec.msgpack.encode(1)

    env.inv.behaviour = lambda t, m, p: slow()
    results = await asyncio.gather(*(env.req("GET", f"/hello/n{i}") for i in range(20)))
    assert [s for s, _, _ in results] == [200] * 20


async def test_garbage_request_does_not_crash_server(env: Env) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.router.port)
    writer.write(b"\x00\xffNOT HTTP\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(1000), 5)
    writer.close()
    status, _, _ = await env.req("GET", "/ping")
    assert status == 200


async def test_slow_client_gets_408_and_does_not_block_others(env: Env) -> None:
    """A client that announces a body and never sends it is answered 408 after request_timeout
    (2 s here); other requests are served meanwhile."""
    import time

    reader, writer = await asyncio.open_connection("127.0.0.1", env.router.port)
    try:
        writer.write(
            b"POST /raw HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        t0 = time.monotonic()
        for _ in range(5):  # the router keeps serving while that body never arrives
            status, _, _ = await env.req("GET", "/ping")
            assert status == 200
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert 1.5 < time.monotonic() - t0 < 8
    finally:
        writer.close()
    status, _, _ = await env.req("GET", "/ping")
    assert status == 200
