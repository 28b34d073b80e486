"""Management API server: JSON shapes, problem documents, authentication, binding rules."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import aiohttp
import pytest

from aether.api.server import ManagementServer, is_loopback_host
from aether.core.errors import ConfigError, NotReady, QuorumLost, SessionConflict
from aether.core.status import KVEntry, MemberStatus, NodeStatus

pytestmark = pytest.mark.timeout(30)


class FakeNode:
    """A NodeView with fixed data; `fail_with` makes both calls raise."""

    def __init__(self, node_id: str = "node-1") -> None:
        self.node_id = node_id
        self.fail_with: BaseException | None = None
        self.prefixes: list[str] = []
        self.entries = [
            KVEntry("slices/node-2/org.demo:place-order:0.1.0", {"state": "ACTIVE", "ts": 17}),
            KVEntry("blueprints/demo-order:0.1.0", {"slices": [{"artifact": "a:b:1.0.0", "instances": 3}]}),
            KVEntry("slices/node-1/org.demo:place-order:0.1.0", {"state": "LOADING", "ts": 12}),
            KVEntry("endpoints/org.demo:place-order:0.1.0/run:1", "plain string"),
            KVEntry("odd/[bracket] key", 42),
        ]

    def status(self) -> NodeStatus:
        if self.fail_with is not None:
            raise self.fail_with
        return NodeStatus(
            node_id=self.node_id,
            leader="node-1",
            quorum=True,
            nodes=[
                MemberStatus("node-1", "127.0.0.1:7000", "up"),
                MemberStatus("node-2", "127.0.0.1:7001", "up"),
                MemberStatus("node-3", "127.0.0.1:7002", "down"),
            ],
            applied_slot=41,
            management_port=9000,
            cluster_port=7000,
            http_port=8080,
            pid=1234,
        )

    def kv_list(self, prefix: str) -> list[KVEntry]:
        if self.fail_with is not None:
            raise self.fail_with
        self.prefixes.append(prefix)
        return [e for e in self.entries if e.key.startswith(prefix)]


class AsyncFakeNode(FakeNode):
    """A NodeView whose methods return awaitables."""

    async def status(self) -> NodeStatus:  # type: ignore[override]
        await asyncio.sleep(0)
        return FakeNode.status(self)

    async def kv_list(self, prefix: str) -> list[KVEntry]:  # type: ignore[override]
        await asyncio.sleep(0)
        return FakeNode.kv_list(self, prefix)


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
async def server(node: FakeNode):
    srv = ManagementServer(node, host="127.0.0.1", port=0)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def get(session: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict[str, str], object]:
    async with session.get(url, **kw) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def assert_problem(body: object, status: int) -> dict:
    assert isinstance(body, dict)
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert body["title"] and body["detail"]
    return body


# -- endpoints ----------------------------------------------------------------------------------------


async def test_port_zero_binds_a_real_port(server: ManagementServer) -> None:
    assert server.port != 0
    assert server.url == f"http://127.0.0.1:{server.port}"


async def test_status_json_shape(server: ManagementServer, http: aiohttp.ClientSession) -> None:
    status, headers, body = await get(http, f"{server.url}/api/v1/status")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body == {
        "node_id": "node-1",
        "leader": "node-1",
        "quorum": True,
        "nodes": [
            {"id": "node-1", "address": "127.0.0.1:7000", "state": "up", "management": None, "http": None},
            {"id": "node-2", "address": "127.0.0.1:7001", "state": "up", "management": None, "http": None},
            {"id": "node-3", "address": "127.0.0.1:7002", "state": "down", "management": None, "http": None},
        ],
        "applied_slot": 41,
        "management_port": 9000,
        "cluster_port": 7000,
        "http_port": 8080,
        "pid": 1234,
        # what `aether doctor` compares with the store (defaults: this fake reports none)
        "local_instances": {},
        "loop_lag_max_ms": None,
        "journal_error": None,
        "store_write_failures": 0,
        "store_write_failing_for": None,
        "store_write_error": None,
        "slice_blocks": 0,
        # the cluster state store (the etcd endpoints and error only with store "etcd")
        "store": "rabia",
        "store_endpoints": [],
        "store_error": None,
        "not_member": None,  # a member (joining or removed: why it takes part in no decision)
    }


async def test_kv_listing_with_prefix_is_sorted_and_typed(
    server: ManagementServer, http: aiohttp.ClientSession, node: FakeNode
) -> None:
    status, _, body = await get(http, f"{server.url}/api/v1/kv", params={"prefix": "slices/"})
    assert status == 200
    assert body == {
        "prefix": "slices/",
        "entries": [
            {"key": "slices/node-1/org.demo:place-order:0.1.0", "value": {"state": "LOADING", "ts": 12}},
            {"key": "slices/node-2/org.demo:place-order:0.1.0", "value": {"state": "ACTIVE", "ts": 17}},
        ],
    }
    assert node.prefixes == ["slices/"]


async def test_kv_listing_without_prefix_lists_everything(
    server: ManagementServer, http: aiohttp.ClientSession, node: FakeNode
) -> None:
    status, _, body = await get(http, f"{server.url}/api/v1/kv")
    assert status == 200
    assert isinstance(body, dict)
    assert body["prefix"] == ""
    keys = [e["key"] for e in body["entries"]]
    assert keys == sorted(e.key for e in node.entries)
    values = {e["key"]: e["value"] for e in body["entries"]}
    assert values["odd/[bracket] key"] == 42
    assert values["endpoints/org.demo:place-order:0.1.0/run:1"] == "plain string"


async def test_kv_prefix_is_url_decoded(server: ManagementServer, http: aiohttp.ClientSession) -> None:
    status, _, body = await get(http, f"{server.url}/api/v1/kv?prefix=odd%2F%5Bbracket%5D%20")
    assert status == 200
    assert isinstance(body, dict)
    assert body["prefix"] == "odd/[bracket] "
    assert [e["key"] for e in body["entries"]] == ["odd/[bracket] key"]


async def test_async_node_view_is_awaited(http: aiohttp.ClientSession) -> None:
    async with ManagementServer(AsyncFakeNode("node-7"), host="127.0.0.1", port=0) as srv:
        status, _, body = await get(http, f"{srv.url}/api/v1/status")
        assert status == 200 and isinstance(body, dict) and body["node_id"] == "node-7"
        status, _, body = await get(http, f"{srv.url}/api/v1/kv?prefix=blue")
        assert status == 200 and isinstance(body, dict)
        assert [e["key"] for e in body["entries"]] == ["blueprints/demo-order:0.1.0"]


# -- errors -------------------------------------------------------------------------------------------


async def test_unknown_path_is_404_problem_naming_the_path(
    server: ManagementServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.url}/api/v1/nope") as r:
        assert r.status == 404
        assert r.headers["Content-Type"].startswith("application/problem+json")
        body = assert_problem(await r.json(content_type=None), 404)
    assert "/api/v1/nope" in body["detail"]
    assert body["title"] == "Not Found"


async def test_wrong_method_is_405_problem_with_allow(
    server: ManagementServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{server.url}/api/v1/status", data=b"{}") as r:
        assert r.status == 405
        assert "GET" in r.headers["Allow"]
        body = assert_problem(await r.json(content_type=None), 405)
    assert "POST" in body["detail"] and "/api/v1/status" in body["detail"]


@pytest.mark.parametrize(
    ("query", "needle"),
    [("?limit=3", "'limit'"), ("?prefix=a&prefix=b", "more than once")],
)
async def test_bad_query_params_are_400(
    server: ManagementServer, http: aiohttp.ClientSession, query: str, needle: str
) -> None:
    status, _, body = await get(http, f"{server.url}/api/v1/kv{query}")
    assert status == 400
    assert needle in assert_problem(body, 400)["detail"]


async def test_status_rejects_query_params(server: ManagementServer, http: aiohttp.ClientSession) -> None:
    status, _, body = await get(http, f"{server.url}/api/v1/status?verbose=1")
    assert status == 400
    assert "'verbose'" in assert_problem(body, 400)["detail"]


async def test_internal_error_is_500_without_traceback_and_logged(
    server: ManagementServer, http: aiohttp.ClientSession, node: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    node.fail_with = RuntimeError("secret-internal-detail")
    with caplog.at_level(logging.ERROR, logger="aether.api"):
        async with http.get(f"{server.url}/api/v1/status") as r:
            assert r.status == 500
            text = await r.text()
    body = assert_problem(json.loads(text), 500)
    assert "secret-internal-detail" not in text
    assert "Traceback" not in text
    assert "log" in body["detail"]
    logged = [rec for rec in caplog.records if rec.name == "aether.api" and rec.exc_info]
    assert logged, "the failure must be logged with its traceback"
    assert "secret-internal-detail" in str(logged[0].exc_info[1])


async def test_a_session_conflict_is_a_500_naming_it_not_a_400(
    server: ManagementServer, http: aiohttp.ClientSession, node: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    node.fail_with = SessionConflict("internal error: the store refused this node's command on 'maps/m2' "
                                     "(not applied): stale request sequence")
    with caplog.at_level(logging.ERROR, logger="aether.api"):
        status, _, body = await get(http, f"{server.url}/api/v1/kv?prefix=x")
    assert status == 500
    assert assert_problem(body, 500)["detail"] == str(node.fail_with)
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "aether.api"]
    assert any("stale request sequence" in m for m in logged)


@pytest.mark.parametrize("exc", [NotReady("catching up"), QuorumLost("no quorum: 1 of 3 nodes reachable")])
async def test_not_ready_and_quorum_lost_are_503(
    server: ManagementServer, http: aiohttp.ClientSession, node: FakeNode, exc: Exception
) -> None:
    node.fail_with = exc
    status, _, body = await get(http, f"{server.url}/api/v1/kv?prefix=x")
    assert status == 503
    assert assert_problem(body, 503)["detail"] == str(exc)


# -- authentication -----------------------------------------------------------------------------------


@pytest.fixture
async def keyed_server(node: FakeNode):
    srv = ManagementServer(node, host="127.0.0.1", port=0, api_key="s3cret-key")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic czNjcmV0LWtleQ=="},
        {"X-API-Key": "s3cret-key-and-more"},
    ],
)
async def test_missing_or_wrong_key_is_401(
    keyed_server: ManagementServer, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, resp_headers, body = await get(http, f"{keyed_server.url}/api/v1/status", headers=headers)
    assert status == 401
    assert "Bearer" in resp_headers["WWW-Authenticate"]
    assert "API key" in assert_problem(body, 401)["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "s3cret-key"},
        {"Authorization": "Bearer s3cret-key"},
        {"authorization": "bearer s3cret-key"},
    ],
)
async def test_right_key_is_accepted(
    keyed_server: ManagementServer, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, _, body = await get(http, f"{keyed_server.url}/api/v1/status", headers=headers)
    assert status == 200
    assert isinstance(body, dict) and body["node_id"] == "node-1"


async def test_auth_is_checked_before_routing(
    keyed_server: ManagementServer, http: aiohttp.ClientSession
) -> None:
    status, _, body = await get(http, f"{keyed_server.url}/api/v1/secret-path")
    assert status == 401
    assert "secret-path" not in assert_problem(body, 401)["detail"]


# -- binding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.10", "example.com", "localhost.evil"]
)
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize("key", [None, ""])
async def test_non_loopback_without_key_refuses_to_start(node: FakeNode, key: str | None) -> None:
    srv = ManagementServer(node, host="0.0.0.0", port=0, api_key=key)
    with pytest.raises(ConfigError, match="API key"):
        await srv.start()


async def test_non_loopback_with_key_starts_and_requires_it(
    node: FakeNode, http: aiohttp.ClientSession
) -> None:
    async with ManagementServer(node, host="0.0.0.0", port=0, api_key="k") as srv:
        url = f"http://127.0.0.1:{srv.port}/api/v1/status"
        assert (await get(http, url))[0] == 401
        assert (await get(http, url, headers={"X-API-Key": "k"}))[0] == 200


async def test_busy_port_raises_oserror_naming_it(node: FakeNode) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = ManagementServer(node, host="127.0.0.1", port=port)
        with pytest.raises(OSError, match=str(port)):
            await srv.start()


async def test_two_servers_in_one_process_and_stop_is_idempotent(http: aiohttp.ClientSession) -> None:
    a = ManagementServer(FakeNode("node-a"), host="127.0.0.1", port=0)
    b = ManagementServer(FakeNode("node-b"), host="127.0.0.1", port=0)
    await a.start()
    await b.start()
    try:
        assert a.port != b.port
        assert (await get(http, f"{a.url}/api/v1/status"))[2]["node_id"] == "node-a"  # type: ignore[index]
        assert (await get(http, f"{b.url}/api/v1/status"))[2]["node_id"] == "node-b"  # type: ignore[index]
    finally:
        await a.stop()
        await a.stop()
        await b.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, f"{a.url}/api/v1/status")
