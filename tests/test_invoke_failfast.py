"""Fail fast (issue 11, item 5): a call with no known endpoint answers at once, in process.

`StoreCatalog` reads real store values (`BlueprintValue`, `SliceStateValue`, `EndpointValue`)
from a dict standing in for the replica; the `Invoker` is wired with it and a registry/transport
that know no instance. The real-process test is in tests/test_http_strict_process.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aether.core.errors import StatusError
from aether.invoke import EndpointUnavailable, Invoker, InvokeTimeout, NotDeployed, StoreCatalog
from aether.invoke.catalog import ACTIVE, FAILED, STARTING, UNKNOWN_ARTIFACT, UNKNOWN_ENTRY
from aether.kv.keys import BlueprintSlice, BlueprintValue, EndpointValue, SliceStateValue

pytestmark = pytest.mark.timeout(20)

ART = "org.example:hello:0.1.0"


class Store:
    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = dict(data or {})

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))


class NoSlices:
    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        raise AssertionError("no local call expected")

    def has_room(self, target: str, method: str) -> bool:
        return False  # (no local instance)

    def local_instances(self, target: str) -> list[int]:
        return []


class EmptyRegistry:
    def instances(self, target: str, method: str) -> list[Any]:
        return []


class NoPeers:
    up_peers: frozenset[str] = frozenset()

    def send(self, peer: str, msg: object) -> bool:
        return False


def blueprint(*arts: str) -> BlueprintValue:
    return BlueprintValue([BlueprintSlice(a, 1) for a in arts])


def test_catalog_states() -> None:
    store = Store()
    cat = StoreCatalog(store)
    state, detail = cat.presence("org.example:nothing", "greet")
    assert state == UNKNOWN_ARTIFACT and "not deployed" in detail and "org.example:nothing" in detail

    store.data["blueprints/b"] = blueprint(ART)
    state, detail = cat.presence("org.example:hello", "greet")
    assert state == STARTING and "not placed yet" in detail
    store.data[f"slices/node-2/{ART}"] = SliceStateValue("LOADING", 1.0)
    state, detail = cat.presence(ART, "greet")
    assert state == STARTING and "LOADING on node-2" in detail

    store.data[f"slices/node-2/{ART}"] = SliceStateValue("FAILED", 1.0, reason="start() raised")
    state, detail = cat.presence("org.example:hello", "greet")
    assert state == FAILED and "start() raised" in detail
    # one FAILED, another being placed again: still starting, and the detail keeps the reason
    store.data[f"slices/node-3/{ART}"] = SliceStateValue("LOAD", 1.0)
    state, detail = cat.presence("org.example:hello", "greet")
    assert state == STARTING and "FAILED on node-2 (start() raised)" in detail and "LOAD on node-3" in detail
    del store.data[f"slices/node-3/{ART}"]

    store.data[f"slices/node-2/{ART}"] = SliceStateValue("ACTIVE", 1.0)
    store.data[f"endpoints/{ART}/greet:0"] = EndpointValue("node-2", "ACTIVE")
    assert cat.presence("org.example:hello", "greet") == (ACTIVE, "")
    assert cat.presence(ART, "greet") == (ACTIVE, "")
    state, detail = cat.presence("org.example:hello", "grete")
    assert state == UNKNOWN_ENTRY and "'grete'" in detail and "greet" in detail
    # a longer artifact name sharing the prefix is another artifact
    assert cat.presence("org.example:hell", "greet")[0] == UNKNOWN_ARTIFACT
    # another version is not this version
    assert cat.presence("org.example:hello:0.2.0", "greet")[0] == UNKNOWN_ARTIFACT


def _invoker(store: Store, timeout: float = 10.0) -> Invoker:
    return Invoker(
        "node-1", NoSlices(), EmptyRegistry(), NoPeers(), default_timeout=timeout, catalog=StoreCatalog(store)
    )


async def _timed(inv: Invoker, target: str, method: str) -> tuple[BaseException, float]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(Exception) as info:
        await inv.invoke(target, method, b"")
    return info.value, loop.time() - t0


async def test_unknown_artifact_and_entry_are_404_at_once() -> None:
    store = Store()
    inv = _invoker(store)
    err, took = await _timed(inv, "org.example:nothing", "greet")
    assert isinstance(err, NotDeployed) and isinstance(err, StatusError) and err.status == 404
    assert took < 0.5, took
    assert "attempt" not in str(err) and "not deployed" in str(err)

    store.data["blueprints/b"] = blueprint(ART)
    store.data[f"endpoints/{ART}/greet:0"] = EndpointValue("node-2", "ACTIVE")
    err, took = await _timed(inv, "org.example:hello", "nope")
    assert isinstance(err, NotDeployed) and err.status == 404 and "no entry 'nope'" in str(err)
    assert took < 0.5, took
    assert inv.stats.failed == 2


async def test_starting_and_every_instance_failed_are_503_with_retry_after_at_once() -> None:
    """Every instance FAILED answered without Retry-After, as if final; the leader starts FAILED
    instances again after a backoff (docs/deployment.md), so both states say Retry-After: 1."""
    store = Store(
        {"blueprints/b": blueprint(ART), f"slices/node-2/{ART}": SliceStateValue("ACTIVATING", 1.0)}
    )
    inv = _invoker(store)
    err, took = await _timed(inv, "org.example:hello", "greet")
    assert isinstance(err, EndpointUnavailable) and err.status == 503 and err.retry_after == 1
    assert "ACTIVATING on node-2" in str(err) and took < 0.5

    store.data[f"slices/node-2/{ART}"] = SliceStateValue("FAILED", 1.0, reason="boom")
    err, _ = await _timed(inv, "org.example:hello", "greet")
    assert isinstance(err, EndpointUnavailable) and err.retry_after == 1 and "boom" in str(err)
    assert "every instance FAILED" in str(err) and "again after a backoff" in str(err)


async def test_active_endpoint_on_a_down_node_still_waits() -> None:
    """An endpoint ACTIVE in the store on a node that is not up: the call waits (failover), as before."""
    store = Store(
        {"blueprints/b": blueprint(ART), f"endpoints/{ART}/greet:0": EndpointValue("node-3", "ACTIVE")}
    )
    inv = _invoker(store, timeout=0.3)
    err, took = await _timed(inv, "org.example:hello", "greet")
    assert isinstance(err, InvokeTimeout) and took >= 0.29
