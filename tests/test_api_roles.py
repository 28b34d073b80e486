"""Roles and API keys on the management API, in process (a dict stands in for the KV store)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from aether.api.auth import ROLES, Principal, required_role
from aether.api.server import ManagementServer
from aether.core.status import KVEntry
from aether.kv.keys import ApiKeyValue, parse_key
from test_api import FakeNode

pytestmark = pytest.mark.timeout(30)

BOOT = "bootstrap-key"


class DictKV:
    """The KeyStore part of a KVStore over a dict (keys parsed as the real store parses them)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get_local(self, key: Any) -> Any:
        return self.data.get(str(key))

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        k = str(parse_key(str(key)))
        if self.data.get(k) != expected:
            return False
        self.data[k] = new
        return True

    async def remove(self, key: Any, timeout: float = 5.0) -> bool:
        return self.data.pop(str(key), None) is not None


class KVNode(FakeNode):
    def __init__(self) -> None:
        super().__init__()
        self.kv = DictKV()

    def kv_list(self, prefix: str) -> list[KVEntry]:
        out = super().kv_list(prefix)
        out += [KVEntry(k, {"role": v.role}) for k, v in self.kv.list_local(prefix)]
        return out


@pytest.fixture
async def srv():
    node = KVNode()
    s = ManagementServer(node, host="127.0.0.1", port=0, api_key=BOOT)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, srv: ManagementServer, method: str, path: str,
               key: str | None = BOOT, body: Any = None) -> tuple[int, Any]:
    headers = {} if key is None else {"X-API-Key": key}
    async with http.request(method, f"{srv.url}{path}", headers=headers, json=body) as r:
        return r.status, await r.json(content_type=None)


async def make_key(http: aiohttp.ClientSession, srv: ManagementServer, name: str, role: str) -> str:
    status, doc = await call(http, srv, "POST", "/api/v1/keys", body={"name": name, "role": role})
    assert status == 201, doc
    assert doc["name"] == name and doc["role"] == role
    assert doc["key"].startswith(f"{name}.")
    return str(doc["key"])


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/api/v1/status", "read"),
        ("HEAD", "/api/v1/events", "read"),
        ("GET", "/metrics", "read"),
        ("GET", "/api/v1/maps/m/entries/k", "read"),
        ("POST", "/api/v1/deploy", "operate"),
        ("POST", "/api/v1/scale", "operate"),
        ("POST", "/api/v1/undeploy", "operate"),
        ("POST", "/api/v1/blueprints", "operate"),
        ("DELETE", "/api/v1/blueprints/bp", "operate"),
        ("PUT", "/api/v1/maps/m/entries/a/b", "operate"),
        ("POST", "/api/v1/invoke/g:a:1/run", "operate"),
        ("GET", "/api/v1/keys", "admin"),
        ("POST", "/api/v1/keys", "admin"),
        ("DELETE", "/api/v1/keys/k", "admin"),
        ("GET", "/api/v1/audit", "admin"),
        ("POST", "/api/v1/members", "admin"),  # writes the table does not name: admin
        ("POST", "/api/v1/deployX", "admin"),
        ("PUT", "/api/v1/status", "admin"),
    ],
)
def test_route_role_table(method: str, path: str, role: str) -> None:
    assert required_role(method, path) == role


def test_roles_are_ordered() -> None:
    assert [Principal("k", r).allows("operate") for r in ROLES] == [False, True, True]


async def test_read_key_reads_but_cannot_write(srv: ManagementServer, http: aiohttp.ClientSession) -> None:
    key = await make_key(http, srv, "reader", "read")
    assert (await call(http, srv, "GET", "/api/v1/status", key))[0] == 200
    status, doc = await call(http, srv, "POST", "/api/v1/deploy", key, {"artifact": "g:a:1", "instances": 1})
    assert status == 403
    assert doc["status"] == 403 and "needs the 'operate' role" in doc["detail"]
    assert "'reader'" in doc["detail"]
    status, doc = await call(http, srv, "POST", "/api/v1/keys", key, {"name": "x", "role": "admin"})
    assert status == 403 and "'admin' role" in doc["detail"]
    assert "x" not in {k["name"] for k in srv.keys.list()}


async def test_operate_key_passes_operate_routes_not_admin(
    srv: ManagementServer, http: aiohttp.ClientSession
) -> None:
    key = await make_key(http, srv, "ops", "operate")
    # FakeNode has no deployment routes: past the role check, the router answers 404
    assert (await call(http, srv, "POST", "/api/v1/deploy", key, {"artifact": "g:a:1"}))[0] == 404
    assert (await call(http, srv, "GET", "/api/v1/keys", key))[0] == 403


async def test_admin_key_manages_keys(srv: ManagementServer, http: aiohttp.ClientSession) -> None:
    admin = await make_key(http, srv, "root2", "admin")
    await make_key(http, srv, "r", "read")
    status, keys = await call(http, srv, "GET", "/api/v1/keys", admin)
    assert status == 200
    assert [(k["name"], k["role"]) for k in keys] == [("r", "read"), ("root2", "admin")]
    assert all(set(k) == {"name", "role", "created"} for k in keys)  # never a hash or a key


async def test_stored_record_is_a_salted_scrypt_hash(
    srv: ManagementServer, http: aiohttp.ClientSession
) -> None:
    import hashlib

    key = await make_key(http, srv, "h", "read")
    rec = srv.keys.kv.get_local("auth/keys/h")  # type: ignore[union-attr]
    assert isinstance(rec, ApiKeyValue)
    secret = key.split(".", 1)[1]
    assert secret.encode() not in rec.hash and secret.encode() not in rec.salt
    assert len(rec.salt) == 16 and (rec.n, rec.r, rec.p) == (2**14, 8, 1)
    assert rec.hash == hashlib.scrypt(secret.encode(), salt=rec.salt, n=rec.n, r=rec.r, p=rec.p, dklen=32)
    key2 = await make_key(http, srv, "h2", "read")
    rec2 = srv.keys.kv.get_local("auth/keys/h2")  # type: ignore[union-attr]
    assert rec2.salt != rec.salt and key2 != key


async def test_wrong_secret_unknown_name_and_revoked_key_are_401(
    srv: ManagementServer, http: aiohttp.ClientSession
) -> None:
    key = await make_key(http, srv, "gone", "operate")
    name, secret = key.split(".", 1)
    for bad in (f"{name}.{secret[:-1]}x", f"other.{secret}", name, f"{name}.", "a.b.c"):
        status, doc = await call(http, srv, "GET", "/api/v1/status", bad)
        assert status == 401, bad
        assert "API key" in doc["detail"]
    assert (await call(http, srv, "GET", "/api/v1/status", key))[0] == 200  # now cached
    status, doc = await call(http, srv, "DELETE", f"/api/v1/keys/{name}")
    assert status == 200 and doc == {"name": name, "revoked": True}
    assert (await call(http, srv, "GET", "/api/v1/status", key))[0] == 401  # the cache does not outlive it
    # re-created under the same name: the old key stays refused
    new = await make_key(http, srv, name, "read")
    assert (await call(http, srv, "GET", "/api/v1/status", key))[0] == 401
    assert (await call(http, srv, "GET", "/api/v1/status", new))[0] == 200
    assert (await call(http, srv, "DELETE", "/api/v1/keys/nobody"))[0] == 404


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "bad name", "role": "read"}, 400, "invalid key name"),
        ({"name": "a.b", "role": "read"}, 400, "invalid key name"),
        ({"name": "ok", "role": "root"}, 400, "unknown role 'root'"),
        ({"name": "bootstrap", "role": "read"}, 400, "reserved"),
        ({"name": "ok"}, 400, "role"),
        ({"name": "ok", "role": "read", "extra": 1}, 400, "extra"),
    ],
)
async def test_bad_key_requests_are_400_naming_the_problem(
    srv: ManagementServer, http: aiohttp.ClientSession, body: dict, status: int, needle: str
) -> None:
    got, doc = await call(http, srv, "POST", "/api/v1/keys", body=body)
    assert got == status and needle in doc["detail"], doc


async def test_duplicate_name_is_409(srv: ManagementServer, http: aiohttp.ClientSession) -> None:
    await make_key(http, srv, "dup", "read")
    status, doc = await call(http, srv, "POST", "/api/v1/keys", body={"name": "dup", "role": "admin"})
    assert status == 409 and "revoke it first" in doc["detail"]
    assert srv.keys.kv.get_local("auth/keys/dup").role == "read"  # type: ignore[union-attr]


async def test_kv_listing_hides_key_records_below_admin(
    srv: ManagementServer, http: aiohttp.ClientSession
) -> None:
    reader = await make_key(http, srv, "rr", "read")
    _, doc = await call(http, srv, "GET", "/api/v1/kv", reader)
    assert not [e for e in doc["entries"] if e["key"].startswith("auth/")]
    _, doc = await call(http, srv, "GET", "/api/v1/kv")
    assert [e["key"] for e in doc["entries"] if e["key"].startswith("auth/")] == ["auth/keys/rr"]


async def test_without_a_node_key_roles_are_not_enforced(http: aiohttp.ClientSession) -> None:
    node = KVNode()
    async with ManagementServer(node, host="127.0.0.1", port=0) as s:
        async with http.post(f"{s.url}/api/v1/keys", json={"name": "k", "role": "read"}) as r:
            assert r.status == 201
            key = (await r.json())["key"]
        async with http.post(f"{s.url}/api/v1/keys", json={"name": "k2", "role": "read"},
                             headers={"X-API-Key": key}) as r:
            assert r.status == 201  # a loopback node without a key has no authentication at all
