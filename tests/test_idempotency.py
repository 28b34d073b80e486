"""Idempotency keys end to end in one process, policies published with endpoints, and the order
demo's deduplicated reservations (issue 17).

- an HTTP request's ``Idempotency-Key`` header reaches the slice (`HttpRouter` -> `Invoker` -> a
  real `SliceRuntime`: the entry reads ``self.context.idempotency_key`` on its own loop), and a
  call the slice makes gets the key derived from it;
- `NodeDeploymentManager` publishes each entry's effective policy (code + blueprint) in its
  endpoints, refuses a blueprint policy for an entry the slice lacks, and `EndpointRegistry` hands
  the policy to the invoker;
- `SliceMap.put_if_absent`;
- the order demo's ``reserve`` retried by the invoker after its node went down mid-call (on the
  in-memory network of tests/test_invoke.py) takes the stock once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.context import (
    MINTED,
    RandomHex,
    check_call_key,
    check_idempotency_key,
    derive_idempotency_key,
    idempotency_key_given,
    new_idempotency_key,
)
from aether.core.policy import EntryPolicy
from aether.deploy.endpoints import EndpointRegistry
from aether.deploy.node_manager import NodeDeploymentManager, UnknownEntryPolicy
from aether.http.server import HttpRouter
from aether.invoke import Invoker
from aether.kv.keys import EndpointValue, RouteValue
from aether.kv.machine import WatchEvent
from aether.slices import describe_slice
from aether.slices.loader import ImportSpace
from aether.slices.maps import SliceMap
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import LocalMaps, build_slice_wheel, isolated_imports
from test_http_server import ART as HELLO
from test_http_server import FakeInvoker, FakeKV
from test_invoke import FakeNet, served_by
from test_invoke_policy import PolicyRegistry, until

pytestmark = pytest.mark.timeout(30)

KEYS = "org.example:keys:1.0.0"
KEYS_SOURCE = """
from aether.slices import Slice, entry, route, current_idempotency_key

class Keys(Slice):
    @route("GET", "/keys")
    async def whoami(self) -> dict:
        return {"key": self.context.idempotency_key, "var": current_idempotency_key.get(),
                "rid": self.context.request_id, "given": self.context.idempotency_key_given}

    @route("GET", "/nested")
    async def nested(self) -> list:
        first = await self.call("org.example:keys", "whoami", None, dict)
        second = await self.call("org.example:keys", "whoami", None, dict)
        return [self.context.idempotency_key, first["key"], second["key"], first["given"]]

    @entry(idempotent=False)
    async def charge(self) -> str:
        return "charged"
"""


class NoPeers:
    up_peers: frozenset[str] = frozenset()

    def send(self, peer: str, msg: object) -> bool:
        return False


class NoEndpoints:
    def instances(self, target: str, method: str) -> list[Any]:
        return []


class Forward:
    """The runtime's `SliceCaller`: the invoker, built after the runtime (like the node's)."""

    invoker: Invoker

    async def invoke(self, target: str, method: str, payload: bytes, **kw: Any) -> bytes:
        return await self.invoker.invoke(target, method, payload, **kw)


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture(params=["auto", "process"])  # in the node's interpreter, and in a worker process
async def router(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    repo = Repository(tmp_path / "repo")
    repo.deploy(build_slice_wheel(tmp_path / "w", KEYS, KEYS_SOURCE, "Keys"))
    fwd = Forward()
    isolation = request.param
    runtime = SliceRuntime(
        "node-1", repo, tmp_path / "data", fwd, space=ImportSpace(), isolation_for=lambda a: isolation
    )
    fwd.invoker = Invoker("node-1", runtime, NoEndpoints(), NoPeers())
    a = Artifact.parse(KEYS)
    await runtime.load(a)
    await runtime.activate(a, [0])
    kv = FakeKV({
        "routes/GET:/keys": RouteValue(KEYS, "whoami", {}),
        "routes/GET:/nested": RouteValue(KEYS, "nested", {}),
    })  # fmt: skip
    http = HttpRouter("node-1", kv, fwd.invoker, host="127.0.0.1", port=0)
    await http.start()
    try:
        async with aiohttp.ClientSession() as s:
            yield http.url, s
    finally:
        await http.stop()
        await runtime.deactivate(a)
        await runtime.unload(a)


async def test_the_idempotency_key_header_reaches_the_slice(
    router: tuple[str, aiohttp.ClientSession],
) -> None:
    url, s = router
    key = "3f2b9c1e-0d4a-4c51-9a77-5e8f1b2c3d4e"
    async with s.get(f"{url}/keys", headers={"Idempotency-Key": key, "X-Request-Id": "rid-1"}) as r:
        assert r.status == 200
        assert await r.json() == {"key": key, "var": key, "rid": "rid-1", "given": True}
    # without the header, every request gets a key of its own, made up (so the slice knows that no
    # earlier call can have had it)
    got = []
    for _ in range(2):
        async with s.get(f"{url}/keys") as r:
            body = await r.json()
            assert body["given"] is False
            got.append(body["key"])
    assert got[0] != got[1] and all(k.startswith(MINTED) and len(k) == 33 for k in got)


async def test_calls_a_slice_makes_derive_their_keys_from_its_key(
    router: tuple[str, aiohttp.ClientSession],
) -> None:
    url, s = router
    async with s.get(f"{url}/nested", headers={"Idempotency-Key": "order-7"}) as r:
        assert r.status == 200
        parent, first, second, given = await r.json()
    assert parent == "order-7" and given is True  # derived from a given key: given too
    assert first == derive_idempotency_key("order-7", "org.example:keys", "whoami", 0)
    assert second == derive_idempotency_key("order-7", "org.example:keys", "whoami", 1)
    # the same request again (a client retry) makes the same nested keys
    async with s.get(f"{url}/nested", headers={"Idempotency-Key": "order-7"}) as r:
        assert await r.json() == [parent, first, second, True]
    # a made-up key's children are made up as well
    async with s.get(f"{url}/nested") as r:
        parent, first, second, given = await r.json()
    assert parent.startswith(MINTED) and given is False
    assert first == derive_idempotency_key(parent, "org.example:keys", "whoami", 0)
    assert first.startswith(MINTED) and second.startswith(MINTED) and len(first) == 33


def test_made_up_keys_are_marked_and_clients_cannot_mark_theirs() -> None:
    assert new_idempotency_key().startswith(MINTED) and not idempotency_key_given(new_idempotency_key())
    assert idempotency_key_given("order-7") and idempotency_key_given(None)
    assert check_idempotency_key(MINTED + "abc") is not None  # a client cannot pass one off as made up
    assert check_call_key(MINTED + "abc") is None  # slice code may pass its call's key on
    assert check_call_key(MINTED + "has space") is not None and check_call_key("ok-key") is None
    assert not derive_idempotency_key(MINTED + "abc", "t", "m", 0).startswith(MINTED * 2)


def test_random_hex_gives_distinct_hex_ids_across_blocks() -> None:
    """The router's and invoker's id source: 2n hex digits per take, distinct, also across the
    refills of its urandom block (a block of 32 bytes holds two 16-byte keys only)."""
    ids = RandomHex(block=32)
    keys = [ids.take(16) for _ in range(200)]
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
    assert len(set(keys)) == 200
    short = ids.take(8)
    assert len(short) == 16 and short not in {k[:16] for k in keys}
    with pytest.raises(ValueError, match="cannot take 33 bytes"):
        ids.take(33)
    with pytest.raises(ValueError, match="at least 16"):
        RandomHex(block=8)


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "ä", "~made-up"])
async def test_a_bad_idempotency_key_header_is_a_400_naming_it(
    router: tuple[str, aiohttp.ClientSession], bad: str
) -> None:
    url, s = router
    async with s.get(f"{url}/keys", headers={"Idempotency-Key": bad}) as r:
        assert r.status == 400
        body = await r.json(content_type=None)
        assert body["detail"].startswith("Idempotency-Key header: must be 1-128 characters")


# --- policies published with the endpoints -----------------------------------------------------------


class DictKV:
    """The part of `KVStore` the node manager's publishing and the registry use."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.watchers: list[tuple[str, Callable[[WatchEvent], None]]] = []

    def get_local(self, key: object) -> Any:
        return self.data.get(str(key))

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def watch(self, prefix: str, cb: Callable[[WatchEvent], None]) -> Callable[[], None]:
        self.watchers.append((prefix, cb))
        return lambda: None

    async def put(self, key: object, value: Any) -> None:
        self.data[str(key)] = value
        for prefix, cb in self.watchers:
            if str(key).startswith(prefix):
                cb(WatchEvent("put", str(key), msgspec.msgpack.encode(value), 1))

    async def compare_and_set(self, key: object, expected: Any, new: Any) -> bool:
        if self.data.get(str(key)) != expected:
            return False
        if new is None:
            self.data.pop(str(key), None)
        else:
            await self.put(key, new)
        return True


class InfoStore:
    def __init__(self, info: Any) -> None:
        self._info = info

    def info(self, a: Artifact) -> Any:
        return self._info

    async def activate(self, a: Artifact, ids: list[int]) -> None:
        pass


def load_keys_class(tmp_path: Path) -> Any:
    wheel = build_slice_wheel(tmp_path / "w2", KEYS, KEYS_SOURCE, "Keys", module="keys_slice_cls")
    sys.path.insert(0, str(tmp_path / "unpacked"))
    import zipfile

    zipfile.ZipFile(wheel).extractall(tmp_path / "unpacked")
    import keys_slice_cls  # type: ignore[import-not-found]

    return keys_slice_cls.Keys


async def test_endpoints_carry_the_effective_policy_to_the_registry(tmp_path: Path) -> None:
    info = describe_slice(load_keys_class(tmp_path))
    kv = DictKV()
    registry = EndpointRegistry(kv)  # type: ignore[arg-type]
    registry.start()
    overrides = {"whoami": EntryPolicy(timeout=2.0, retries=1)}
    m = NodeDeploymentManager(kv, "node-1", InfoStore(info), policies_for=lambda a: overrides)  # type: ignore[arg-type]
    await m._activate(Artifact.parse(KEYS), KEYS, [0, 1])
    assert kv.get_local(f"endpoints/{KEYS}/charge:0") == EndpointValue(
        "node-1", "ACTIVE", EntryPolicy(idempotent=False)
    )
    assert kv.get_local(f"endpoints/{KEYS}/whoami:1").policy == EntryPolicy(timeout=2.0, retries=1)
    assert kv.get_local(f"endpoints/{KEYS}/nested:0").policy is None  # the defaults: nothing stored
    (ep,) = [e for e in registry.instances("org.example:keys", "charge") if e.instance == 0]
    assert ep.policy == EntryPolicy(idempotent=False)


async def test_registry_answers_follow_every_change_of_the_endpoints() -> None:
    """`instances` answers are remembered per (artifact, method) (the invoker asks on every call):
    a put, a remove and a reset must each show at once, and a caller changing its list must not
    change the next answer."""
    kv = DictKV()
    registry = EndpointRegistry(kv)  # type: ignore[arg-type]
    registry.start()
    (_, on_event), *_ = kv.watchers
    name = "org.example:keys"
    assert registry.instances(name, "whoami") == []
    await kv.put(f"endpoints/{KEYS}/whoami:0", EndpointValue("node-1", "ACTIVE"))
    first = registry.instances(name, "whoami")
    assert [(e.node_id, e.instance) for e in first] == [("node-1", 0)]
    first.clear()  # the caller's copy
    await kv.put(f"endpoints/{KEYS}/whoami:1", EndpointValue("node-2", "ACTIVE"))
    both = [("node-1", 0), ("node-2", 1)]
    assert [(e.node_id, e.instance) for e in registry.instances(name, "whoami")] == both
    assert len(registry.instances(KEYS, "whoami")) == 2
    await kv.put(f"endpoints/{KEYS}/whoami:1", EndpointValue("node-2", "STARTING"))
    assert [e.instance for e in registry.instances(name, "whoami")] == [0]
    on_event(WatchEvent("remove", f"endpoints/{KEYS}/whoami:0", None, 2))
    assert registry.instances(name, "whoami") == [] and registry.instances(KEYS, "whoami") == []
    kv.data = {f"endpoints/{KEYS}/whoami:3": EndpointValue("node-3", "ACTIVE")}  # after a snapshot
    on_event(WatchEvent("reset", "", None, 3))
    assert [e.instance for e in registry.instances(name, "whoami")] == [3]


async def test_a_blueprint_policy_for_a_missing_entry_fails_the_activation(tmp_path: Path) -> None:
    info = describe_slice(load_keys_class(tmp_path))
    kv = DictKV()
    m = NodeDeploymentManager(  # type: ignore[arg-type]
        kv, "node-1", InfoStore(info), policies_for=lambda a: {"refund": EntryPolicy(retries=1)}
    )
    with pytest.raises(
        UnknownEntryPolicy,
        match=r"'refund'.*not an entry of org.example:keys:1.0.0; its "
        r"entries: charge, nested, whoami",
    ):
        await m._activate(Artifact.parse(KEYS), KEYS, [0])
    assert kv.list_local("endpoints/") == []


# --- SliceMap.put_if_absent ----------------------------------------------------------------------------


async def test_put_if_absent_writes_once_and_answers_the_value_there() -> None:
    now = [0.0]
    m: SliceMap[dict[str, int]] = SliceMap(LocalMaps(["m"], clock=lambda: now[0]), "m", dict[str, int])
    assert await m.put_if_absent("k", {"v": 1}, ttl=10) is None
    assert await m.put_if_absent("k", {"v": 2}) == {"v": 1}
    assert await m.get("k") == {"v": 1}
    results = await asyncio.gather(*(m.put_if_absent("c", {"v": i}) for i in range(10)))
    assert results.count(None) == 1 and await m.get("c") == {"v": results.index(None)}
    now[0] = 11.0  # expired: absent again
    assert await m.put_if_absent("k", {"v": 3}) is None


# --- the order demo: a retried reserve takes the stock once --------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "examples" / "order_demo"


async def test_a_reserve_retried_after_its_node_went_down_takes_the_stock_once() -> None:
    for p in ("order-domain", "inventory-service"):
        if str(DEMO / p) not in sys.path:
            sys.path.insert(0, str(DEMO / p))
    import order_domain as d
    from inventory_service import InventoryService

    from aether.slices import SliceContext, invoke_entry

    maps = LocalMaps(["stock"])
    inventory: dict[str, InventoryService] = {}
    for node in ("B", "C"):
        obj = InventoryService()
        coords = Artifact.parse("org.demo:inventory-service:0.1.0")
        obj.context = SliceContext(coords, node, 1, logging.getLogger("test"), {}, None, maps)  # type: ignore[arg-type]
        await obj.start()
        inventory[node] = obj
    policy = describe_slice(InventoryService).entries["reserve"].policy
    assert policy.is_idempotent
    net = FakeNet()
    net.registry = PolicyRegistry()  # type: ignore[assignment]
    hold = asyncio.Event()
    ran: list[tuple[str, str | None]] = []

    def handler_for(node: str) -> Any:
        async def reserve(_node: str, payload: bytes) -> bytes:
            ran.append((node, inventory[node].context.idempotency_key))
            out = await invoke_entry(inventory[node], "reserve", payload)
            if node == "B":
                await hold.wait()  # B took the stock, then its node goes down before answering
            return node.encode() + b":" + out

        return reserve

    for node in ("A", "B", "C"):
        net.add(node).slices.handlers["reserve"] = handler_for(node)
    for node in ("B", "C"):
        net.nodes[node].slices.active.add("org.demo:inventory-service:0.1.0")
        net.registry.add(node, "reserve", "org.demo:inventory-service:0.1.0", policy=policy)
    line = d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(4))
    payload = msgspec.msgpack.encode(d.ReserveStock("ORD-77", [line]))
    call = asyncio.create_task(
        net.nodes["A"].invoker.invoke("org.demo:inventory-service", "reserve", payload, timeout=5.0)
    )

    def reserved() -> int:
        raw, _ttl = maps.data["stock"]["PROD-ABC123"]
        return msgspec.msgpack.decode(raw, type=d.StockLevel).reserved

    await until(lambda: reserved() == 4)  # B took the stock (and holds its answer)
    net.kill("B")
    answer = await call
    assert served_by(answer) == "C" and [n for n, _ in ran] == ["B", "C"]
    assert ran[0][1] == ran[1][1] is not None  # the retry carried the same key
    level = await inventory["C"].get_stock("PROD-ABC123")
    assert (level.available, level.reserved) == (96, 4)  # taken once
    assert inventory["C"].duplicates == 1
    levels = msgspec.msgpack.decode(answer.split(b":", 1)[1], type=list[d.StockLevel])
    assert levels == [d.StockLevel("PROD-ABC123", 96, 4)]  # what the first attempt answered
    hold.set()


# --- the router and the management API take the header alike -----------------------------------------


class KeyInvoker(FakeInvoker):
    """Records the idempotency key each call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str | None] = []

    async def invoke(self, target: str, method: str, payload: bytes, **kw: Any) -> bytes:
        self.keys.append(kw.pop("idempotency_key", None))
        return await super().invoke(target, method, payload, **kw)


async def test_the_router_and_the_management_api_pass_the_header_on_alike() -> None:
    from aether.api.server import ManagementServer
    from test_api_errors import _InvokeNode

    inv = KeyInvoker()
    kv = FakeKV({"routes/GET:/hello/{name}": RouteValue(HELLO, "greet", {"name": "path"})})
    router = HttpRouter("node-1", kv, inv, host="127.0.0.1", port=0)
    await router.start()
    api = ManagementServer(_InvokeNode(inv), host="127.0.0.1", port=0)
    await api.start()
    calls = (("GET", f"{router.url}/hello/ann"), ("POST", f"{api.url}/api/v1/invoke/{HELLO}/greet"))
    try:
        async with aiohttp.ClientSession() as s:
            for method, url in calls:
                async with s.request(method, url, headers={"Idempotency-Key": "k-1"}) as r:
                    assert r.status == 200, await r.text()
                async with s.request(method, url) as r:
                    assert r.status == 200
                async with s.request(method, url, headers={"Idempotency-Key": "no spaces"}) as r:
                    assert r.status == 400
                    detail = (await r.json(content_type=None))["detail"]
                    assert detail.startswith("Idempotency-Key header: must be 1-128 characters"), detail
    finally:
        await api.stop()
        await router.stop()
    assert inv.keys == ["k-1", None, "k-1", None]  # None: the invoker makes one
