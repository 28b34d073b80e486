"""The distributed-map endpoints of the management API against an in-process 3-node cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import pytest

from aether.core.maps import MapUnavailable
from maps_cluster import MapCluster

pytestmark = pytest.mark.timeout(90)

NODES = ["node-1", "node-2", "node-3"]


class Api:
    """JSON requests to each node's management API."""

    def __init__(self, cluster: MapCluster, session: aiohttp.ClientSession) -> None:
        self.cluster = cluster
        self.session = session

    def url(self, node: str, path: str) -> str:
        return f"http://127.0.0.1:{self.cluster.node(node).management.port}/api/v1{path}"

    async def call(
        self, method: str, path: str, body: Any = None, *, node: str = "node-1", raw: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else msgspec.json.encode(body))
        headers = {"Content-Type": "application/json"} if data is not None else {}
        async with self.session.request(
            method, self.url(node, path), data=data, headers=headers, params=params
        ) as r:
            text = await r.read()
            if r.status >= 400:
                assert r.content_type == "application/problem+json", text
                doc = msgspec.json.decode(text)
                assert doc["status"] == r.status and doc["detail"]
                return r.status, doc
            return r.status, msgspec.json.decode(text)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    c = MapCluster(tmp_path, 3)
    try:
        await c.start(*NODES, management=True)
        await c.wait_table(NODES)
        async with aiohttp.ClientSession() as s:
            yield Api(c, s)
    finally:
        await c.stop_all()


async def wait_defined(api: Api, name: str, present: bool = True) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while any((name in n.maps.engines) != present for n in api.cluster.nodes.values()):
        assert loop.time() < end, f"map {name} not {'defined' if present else 'removed'} everywhere"
        await asyncio.sleep(0.01)


def entry(name: str, key: str) -> str:
    return f"/maps/{name}/entries/{quote(key, safe='')}"


async def test_define_list_show_and_delete_maps(api: Api) -> None:
    status, doc = await api.call("GET", "/maps")
    assert status == 200
    assert doc["maps"] == [] and doc["members"] == NODES and doc["table_version"] >= 1

    status, doc = await api.call("POST", "/maps", {"name": "users"})
    assert status == 201
    assert doc == {
        "name": "users", "replicas": 3, "write_quorum": 2, "engine": "memory",
        "max_value_bytes": 1024 * 1024, "created": True,
    }
    status, doc = await api.call("POST", "/maps", {"name": "users"}, node="node-2")
    assert (status, doc["created"]) == (200, False)
    status, doc = await api.call("POST", "/maps", {"name": "users", "replicas": 2})
    assert status == 409 and "'users'" in doc["detail"] and "replicas=3" in doc["detail"]

    # write_quorum defaults to min(2, replicas); sqlite engine
    status, doc = await api.call(
        "POST", "/maps", {"name": "solo", "replicas": 1, "engine": "sqlite", "max_value_bytes": 100}
    )
    assert status == 201 and doc["write_quorum"] == 1 and doc["engine"] == "sqlite"
    await wait_defined(api, "users")
    await wait_defined(api, "solo")

    status, doc = await api.call("GET", "/maps", node="node-3")
    assert [m["name"] for m in doc["maps"]] == ["solo", "users"]
    assert doc["maps"][0] == {
        "name": "solo", "replicas": 1, "write_quorum": 1, "engine": "sqlite", "max_value_bytes": 100
    }

    status, doc = await api.call("GET", "/maps/users", node="node-2")
    assert status == 200
    assert (doc["name"], doc["replicas"], doc["write_quorum"], doc["engine"]) == ("users", 3, 2, "memory")
    assert doc["members"] == NODES and isinstance(doc["table_version"], int)
    assert [n["node"] for n in doc["nodes"]] == NODES
    assert sum(n["primary_partitions"] for n in doc["nodes"]) == api.cluster.node("node-1").maps.partitions
    assert all(n["entries"] == 0 and n["engine"] == "memory" for n in doc["nodes"])

    status, doc = await api.call("GET", "/maps/nope")
    assert status == 404 and "'nope'" in doc["detail"] and "users" in doc["detail"]
    status, doc = await api.call("GET", "/maps/Bad%20Name")
    assert status == 400 and "invalid map name" in doc["detail"]

    status, doc = await api.call("DELETE", "/maps/solo", node="node-3")
    assert (status, doc) == (200, {"name": "solo", "deleted": True})
    await wait_defined(api, "solo", present=False)
    status, doc = await api.call("DELETE", "/maps/solo")
    assert status == 404 and "'solo'" in doc["detail"]
    status, doc = await api.call("GET", "/maps")
    assert [m["name"] for m in doc["maps"]] == ["users"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"name": "Bad Name"}, "invalid map name"),
        ({"name": ""}, "invalid map name"),
        ({"name": "x", "replicas": 0}, "$.replicas"),
        ({"name": "x", "replicas": 10}, "$.replicas"),
        ({"name": "x", "replicas": 2, "write_quorum": 3}, "write_quorum must be between 1 and replicas (2)"),
        ({"name": "x", "engine": "disk"}, "$.engine"),
        ({"name": "x", "max_value_bytes": 0}, "$.max_value_bytes"),
        ({"name": "x", "replicas": "3"}, "$.replicas"),
        ({"name": "x", "bogus": 1}, "bogus"),
        ({"replicas": 3}, "name"),
        ([1, 2], "invalid map definition"),
    ],
)
async def test_invalid_definitions_are_400_naming_the_problem(api: Api, body: Any, problem: str) -> None:
    status, doc = await api.call("POST", "/maps", body)
    assert status == 400, doc
    assert problem in doc["detail"]


async def test_malformed_requests(api: Api) -> None:
    status, doc = await api.call("POST", "/maps", raw=b"{not json")
    assert status == 400 and "not valid JSON" in doc["detail"]
    status, doc = await api.call("POST", "/maps", raw=b"  ")
    assert status == 400 and "needs a JSON body" in doc["detail"]
    status, doc = await api.call("GET", "/maps", params={"x": "1"})
    assert status == 400 and "unknown query parameter 'x'" in doc["detail"]
    status, doc = await api.call("POST", "/maps", raw=b" " * (1024 * 1024 + 1))
    assert status == 413 and "1048576-byte limit" in doc["detail"]
    status, doc = await api.call("PATCH", "/maps/users")
    assert status == 405


async def test_entries_as_json(api: Api) -> None:
    status, _ = await api.call("POST", "/maps", {"name": "cache", "max_value_bytes": 64})
    assert status == 201
    await wait_defined(api, "cache")

    status, doc = await api.call("PUT", entry("cache", "k1"), {"a": [1, 2.5, None, True], "b": "x"})
    assert status == 200
    assert doc == {"map": "cache", "key": "k1", "bytes": len(msgspec.msgpack.encode(
        {"a": [1, 2.5, None, True], "b": "x"})), "ttl": None}
    for node in NODES:  # any node answers; the value is stored as MessagePack
        assert await api.call("GET", entry("cache", "k1"), node=node) == (
            200, {"a": [1, 2.5, None, True], "b": "x"}
        )
    raw = await api.cluster.node("node-2").maps.map_get("cache", "k1")
    assert msgspec.msgpack.decode(raw) == {"a": [1, 2.5, None, True], "b": "x"}

    # a stored null is a value (200), an absent key is 404
    assert (await api.call("PUT", entry("cache", "nothing"), raw=b"null"))[0] == 200
    assert await api.call("GET", entry("cache", "nothing")) == (200, None)
    status, doc = await api.call("GET", entry("cache", "absent"), node="node-3")
    assert status == 404 and "'absent'" in doc["detail"] and "'cache'" in doc["detail"]

    # keys with '/' (percent-encoded or not) and other characters
    assert (await api.call("PUT", entry("cache", "user/1"), "alice", node="node-2"))[0] == 200
    assert (await api.call("PUT", "/maps/cache/entries/user/2", "bob"))[0] == 200
    assert (await api.call("PUT", entry("cache", "sp ace?&"), 7))[0] == 200
    assert await api.call("GET", "/maps/cache/entries/user/1") == (200, "alice")
    assert await api.call("GET", entry("cache", "sp ace?&")) == (200, 7)
    status, doc = await api.call("GET", "/maps/cache/keys", params={"prefix": "user/"}, node="node-3")
    assert (status, doc) == (200, {"map": "cache", "prefix": "user/", "keys": ["user/1", "user/2"]})
    status, doc = await api.call("GET", "/maps/cache/keys")
    assert doc["keys"] == ["k1", "nothing", "sp ace?&", "user/1", "user/2"]

    # remove
    status, doc = await api.call("DELETE", entry("cache", "user/1"), node="node-3")
    assert (status, doc) == (200, {"map": "cache", "key": "user/1", "removed": True})
    status, doc = await api.call("DELETE", entry("cache", "user/1"))
    assert status == 404 and "'user/1'" in doc["detail"]
    assert (await api.call("GET", entry("cache", "user/1")))[0] == 404

    # stats count the entries on the nodes that hold them
    status, doc = await api.call("GET", "/maps/cache")
    assert max(n["entries"] for n in doc["nodes"]) >= 1


async def test_keys_are_the_utf8_of_the_percent_decoded_path(api: Api) -> None:
    """An escape that does not decode as UTF-8 (`%FF`, an encoded surrogate `%ED%B2%80`) is a 400
    naming the problem. aiohttp kept it as it was: `entries/%FF` wrote the key '%FF', which is also
    what `entries/%25FF` names, so two URLs wrote one key. And a key with a line break (which a slice
    may write) could not be reached: the route's `.+` stops at it (404 'no such endpoint')."""
    await api.call("POST", "/maps", {"name": "cache"})
    await wait_defined(api, "cache")
    for raw in ("%FF", "a%ED%B2%80b", "ok/%C3"):
        for method in ("PUT", "GET", "DELETE"):
            status, doc = await api.call(method, f"/maps/cache/entries/{raw}", 1 if method == "PUT" else None)
            assert status == 400, (method, raw, doc)
            assert doc["detail"].startswith("map 'cache': the key is not UTF-8 once percent-decoded"), doc
    assert (await api.call("GET", "/maps/cache/keys"))[1]["keys"] == []  # nothing was written
    # '%FF' as a key is written %25FF, and only that URL names it
    assert (await api.call("PUT", entry("cache", "%FF"), "percent"))[0] == 200
    assert await api.call("GET", "/maps/cache/entries/%25FF", node="node-2") == (200, "percent")
    assert (await api.call("GET", "/maps/cache/entries/%FF"))[0] == 400
    # UTF-8 escapes and a line break
    assert (await api.call("PUT", "/maps/cache/entries/caf%C3%A9", "utf8"))[0] == 200
    assert await api.call("GET", entry("cache", "café")) == (200, "utf8")
    status, doc = await api.call("PUT", entry("cache", "two\nlines"), "nl", node="node-3")
    assert (status, doc["key"]) == (200, "two\nlines")
    assert await api.call("GET", entry("cache", "two\nlines")) == (200, "nl")
    assert (await api.call("GET", "/maps/cache/keys"))[1]["keys"] == ["%FF", "café", "two\nlines"]
    assert (await api.call("DELETE", entry("cache", "two\nlines")))[0] == 200
    # a prefix that is not UTF-8 is a 400 too: it was read as U+FFFD and listed nothing
    status, doc = await api.call("GET", "/maps/cache/keys?prefix=%FF")
    assert status == 400 and doc["detail"].startswith("query parameter 'prefix' is not UTF-8"), doc
    status, doc = await api.call("PUT", entry("cache", "k") + "?ttl=1%FF", 1)
    assert status == 400 and "'ttl' is not UTF-8" in doc["detail"], doc
    status, doc = await api.call("GET", "/maps/cache/keys?prefix=%25FF")
    assert (status, doc["keys"]) == (200, ["%FF"])
    status, doc = await api.call("GET", "/maps/cache/keys?prefix=caf%C3%A9")
    assert (status, doc["keys"]) == (200, ["café"])


async def test_ttl(api: Api) -> None:
    await api.call("POST", "/maps", {"name": "sessions"})
    await wait_defined(api, "sessions")
    # 1 s: the read before the expiry must not lose to a stall of a loaded machine (0.3 s could)
    status, doc = await api.call("PUT", entry("sessions", "s"), {"u": 1}, params={"ttl": "1"})
    assert (status, doc["ttl"]) == (200, 1.0)
    assert await api.call("GET", entry("sessions", "s")) == (200, {"u": 1})
    await asyncio.sleep(1.2)
    assert (await api.call("GET", entry("sessions", "s")))[0] == 404
    for bad in ("abc", "0", "-1", "nan", "inf", "1e12"):
        status, doc = await api.call("PUT", entry("sessions", "s"), 1, params={"ttl": bad})
        assert status == 400 and "ttl" in doc["detail"] and repr(bad) in doc["detail"], (bad, doc)
    status, doc = await api.call("PUT", entry("sessions", "s"), 1, params={"ttl_ms": "5"})
    assert status == 400 and "'ttl_ms'" in doc["detail"]


async def test_entry_errors(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    await api.call("POST", "/maps", {"name": "small", "max_value_bytes": 16})
    await wait_defined(api, "small")

    # unknown map: 404 naming it, for every entry operation
    for method, path in [
        ("GET", entry("nope", "k")), ("PUT", entry("nope", "k")), ("DELETE", entry("nope", "k")),
        ("GET", "/maps/nope/keys"),
    ]:
        status, doc = await api.call(method, path, 1 if method == "PUT" else None)
        assert status == 404 and "'nope'" in doc["detail"], (method, path, doc)
    status, doc = await api.call("GET", entry("NOPE!", "k"))
    assert status == 400 and "invalid map name" in doc["detail"]

    # oversized value (the map's max_value_bytes), from any node
    for node in NODES:
        status, doc = await api.call("PUT", entry("small", f"big-{node}"), "x" * 100, node=node)
        assert status == 400 and "exceeds the map's limit of 16 bytes" in doc["detail"], doc
    # bad key: longer than 1024 bytes
    status, doc = await api.call("PUT", entry("small", "k" * 1025), 1)
    assert status == 400 and "longer than 1024 bytes" in doc["detail"]
    # bad JSON, no body, a body beyond the API's limit
    status, doc = await api.call("PUT", entry("small", "k"), raw=b"{'a': 1}")
    assert status == 400 and "not valid JSON" in doc["detail"] and "'k'" in doc["detail"]
    status, doc = await api.call("PUT", entry("small", "k"), raw=b"")
    assert status == 400 and "needs a JSON body" in doc["detail"]
    status, doc = await api.call("PUT", entry("small", "k"), raw=b"1" * (1024 * 1024 + 1))
    assert status == 413 and "limit" in doc["detail"]

    # stored values without a JSON form (written by slices as MessagePack): 502 naming the key
    maps = api.cluster.node("node-1").maps
    await maps.map_put("small", "bin", msgspec.msgpack.encode({"data": b"\x00\x01"}))
    await maps.map_put("small", "intkey", msgspec.msgpack.encode({1: "one"}))
    await maps.map_put("small", "garbage", b"\xc1")
    status, doc = await api.call("GET", entry("small", "bin"), node="node-2")
    assert status == 502 and "'bin'" in doc["detail"] and "$.data is binary data" in doc["detail"]
    status, doc = await api.call("GET", entry("small", "intkey"))
    assert status == 502 and "'intkey'" in doc["detail"] and "int key" in doc["detail"]
    status, doc = await api.call("GET", entry("small", "garbage"))
    assert status == 502 and "'garbage'" in doc["detail"] and "not MessagePack" in doc["detail"]

    # the map is unavailable (no primary or quorum in time): 503 with the service's message
    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise MapUnavailable("map 'small' key 'k': get failed after 3 attempt(s)")

    monkeypatch.setattr(maps, "map_get", unavailable)
    status, doc = await api.call("GET", entry("small", "k"))
    assert status == 503 and "get failed" in doc["detail"]
