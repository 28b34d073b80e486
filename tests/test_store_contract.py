"""The store contract (`tests/store_contract.py`) against both backends: the embedded Rabia store
(3 `KVStore`s over in-process `ConsensusRunner`s on an in-memory network and file system) and
`EtcdStore` (3 stores on a real 3-member etcd, `tests/etcd_cluster.py`, one cluster name per test),
plus what only the etcd backend has (its availability signal, resume after a member is killed)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import store_contract
from aether.consensus.engine import EngineConfig
from aether.consensus.runner import ConsensusRunner
from aether.consensus.storage import DiskStore
from aether.core.errors import QuorumLost
from aether.etcd import EtcdConfig, EtcdStore
from aether.etcd.client import _Lost
from aether.kv.contract import MAX_KEY_BYTES, MAX_VALUE_BYTES, ClusterStore
from aether.kv.machine import MAX_KEY_BYTES as MACHINE_MAX_KEY
from aether.kv.machine import MAX_VALUE_BYTES as MACHINE_MAX_VALUE
from aether.kv.machine import KVStateMachine
from aether.kv.store import KVStore
from aether.testing.simfs import SimFileSystem
from etcd_cluster import EtcdCluster, etcd_cluster
from store_contract import StoreCluster, until

__all__ = ["etcd_cluster"]  # the module-scoped fixture


# -- the Rabia backend: an in-process consensus cluster ------------------------------------------------


class LocalNet:
    """Delivers consensus messages between in-process runners on the event loop; a node in `cut`
    neither sends nor receives (its peers see it down)."""

    def __init__(self) -> None:
        self.runners: dict[str, ConsensusRunner] = {}
        self.cut: set[str] = set()

    def sender(self, me: str) -> Any:
        net = self

        class Sender:
            def send(self, peer: str, msg: Any) -> bool:
                if me in net.cut or peer in net.cut or peer not in net.runners:
                    return False
                asyncio.get_running_loop().call_soon(net.runners[peer].on_message, me, msg)
                return True

            def broadcast(self, msg: Any, to: Sequence[str] | None = None) -> None:
                for peer in to if to is not None else list(net.runners):
                    if peer != me:
                        self.send(peer, msg)

        return Sender()

    def isolate(self, nid: str) -> None:
        self.cut.add(nid)
        for other, r in self.runners.items():
            if other != nid:
                r.peer_down(nid)
                self.runners[nid].peer_down(other)

    def heal(self, nid: str) -> None:
        self.cut.discard(nid)
        for other, r in self.runners.items():
            if other != nid and other not in self.cut:
                r.peer_up(nid)
                self.runners[nid].peer_up(other)


class RabiaCluster:
    error_names = "quorum|commit"

    def __init__(self, n: int) -> None:
        self.ids = [f"n{i + 1}" for i in range(n)]
        self.net = LocalNet()
        # small retention, so a replica that misses 30 writes catches up by a snapshot install
        cfg = EngineConfig(retain_slots=8, snapshot_every=10, dedup_slots=2048)
        self.stores: list[ClusterStore] = []
        self.kvs: list[KVStore] = []
        for nid in self.ids:
            runner = ConsensusRunner(
                nid,
                self.ids,
                KVStateMachine(),
                DiskStore(Path(f"/sim/{nid}"), fs=SimFileSystem()),
                seed=b"contract",
                config=cfg,
            )
            runner.recover()
            self.net.runners[nid] = runner
            kv = KVStore(runner, runner.engine.sm, nid)  # type: ignore[arg-type]
            self.kvs.append(kv)
            self.stores.append(kv)

    async def start(self) -> None:
        for nid, r in self.net.runners.items():
            r.start(self.net.sender(nid))
        for nid, r in self.net.runners.items():
            for other in self.ids:
                if other != nid:
                    r.peer_up(other)

    async def stop(self) -> None:
        for r in self.net.runners.values():
            await r.stop()

    @contextlib.asynccontextmanager
    async def fall_behind(self, i: int) -> AsyncIterator[None]:
        self.net.isolate(self.ids[i])
        try:
            yield
        finally:
            self.net.heal(self.ids[i])

    def lose_next_answer(self, i: int) -> None:
        runner = self.net.runners[self.ids[i]]
        apply = runner.apply

        async def applied_twice(commands: Sequence[bytes], timeout: float = 5.0) -> list[bytes]:
            # the command commits but its answer is lost; the same command (same session and
            # sequence number) is sent again, which is what a retry after a failover sends
            runner.apply = apply  # type: ignore[method-assign]
            await apply(commands, timeout)
            return await apply(commands, timeout)

        runner.apply = applied_twice  # type: ignore[method-assign]

    async def lose_quorum(self) -> None:
        self.net.isolate(self.ids[1])
        self.net.isolate(self.ids[2])

    async def restore_quorum(self) -> None:
        self.net.heal(self.ids[1])
        self.net.heal(self.ids[2])


# -- the etcd backend: EtcdStores on a real 3-member etcd --------------------------------------------------


class EtcdStores:
    error_names = r"etcd.*127\.0\.0\.1:\d+"

    def __init__(self, etcd: EtcdCluster, n: int) -> None:
        self.etcd = etcd
        self.name = f"c-{uuid.uuid4().hex[:10]}"  # one cluster name per test: tests do not meet
        eps = etcd.endpoints
        self.etcd_stores = [
            EtcdStore(
                EtcdConfig(
                    # each node prefers another member
                    endpoints=tuple(eps[(i + j) % len(eps)] for j in range(len(eps))),
                    cluster=self.name,
                    request_timeout=1.5,
                    attempt_timeout=0.5,
                ),
                f"n{i + 1}",
            )
            for i in range(n)
        ]
        self.stores: list[ClusterStore] = list(self.etcd_stores)

    async def start(self) -> None:
        for s in self.etcd_stores:
            await s.start()
        for s in self.etcd_stores:
            await s.wait_synced()

    async def stop(self) -> None:
        for s in self.etcd_stores:
            await s.stop()

    @contextlib.asynccontextmanager
    async def fall_behind(self, i: int) -> AsyncIterator[None]:
        s = self.etcd_stores[i]
        assert s._task is not None
        s._task.cancel()  # the node stops following etcd; its watch would resume where it stopped
        with contextlib.suppress(asyncio.CancelledError):
            await s._task
        try:
            yield
        finally:
            # ... but etcd compacts its history meanwhile: the resume finds it gone, and resyncs
            now = (await self.etcd_stores[0].client.range("")).revision
            await self.etcd_stores[0].client.compact(now)
            s._task = asyncio.get_running_loop().create_task(s._follow())

    def lose_next_answer(self, i: int) -> None:
        client = self.etcd_stores[i].client
        post = client._post_once

        async def answer_lost(endpoint: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
            if path != "kv/txn":
                return await post(endpoint, path, body, timeout)
            client._post_once = post  # type: ignore[method-assign]
            await post(endpoint, path, body, timeout)  # applied by etcd...
            raise _Lost(endpoint, "answer lost (test)", sent=True)  # ...and the answer lost

        client._post_once = answer_lost  # type: ignore[method-assign]

    async def lose_quorum(self) -> None:
        self.etcd.kill(1)
        self.etcd.kill(2)

    async def restore_quorum(self) -> None:
        await asyncio.to_thread(self.etcd.restart, 1)
        await asyncio.to_thread(self.etcd.restart, 2)


@pytest.fixture(params=["rabia", "etcd"])
async def store_cluster(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[int], Any]]:
    made: list[RabiaCluster | EtcdStores] = []

    async def make(n: int) -> StoreCluster:
        c: RabiaCluster | EtcdStores
        if request.param == "rabia":
            c = RabiaCluster(n)
        else:
            c = EtcdStores(request.getfixturevalue("etcd_cluster"), n)
        made.append(c)
        await c.start()
        return c

    yield make
    for c in made:
        await c.stop()


for _test in store_contract.CONTRACT_TESTS:
    globals()[_test.__name__] = _test


# -- what the contract does not say, of each backend ---------------------------------------------------------


def test_both_backends_enforce_the_same_limits() -> None:
    assert (MAX_KEY_BYTES, MAX_VALUE_BYTES) == (MACHINE_MAX_KEY, MACHINE_MAX_VALUE)


async def test_etcd_store_availability_and_resume_after_its_member_is_killed(
    etcd_cluster: EtcdCluster,
) -> None:
    c = EtcdStores(etcd_cluster, 2)
    await c.start()
    try:
        a, b = c.etcd_stores
        await until(lambda: a.has_quorum() and b.has_quorum(), what="both stores available")
        rec = store_contract.Recorder(b, "user/")
        await a.put("user/k", b"1")
        # b's watch is connected to member 1: kill it; b resumes on another member, no reset
        etcd_cluster.kill(1)
        try:
            for n in range(2, 6):
                await a.put("user/k", b"%d" % n)
            await until(lambda: b.get_local("user/k") == b"5", what="b caught up after failover")
        finally:
            await asyncio.to_thread(etcd_cluster.restart, 1)
        assert [v for _, _, v, _ in rec.changes()] == [b"1", b"2", b"3", b"4", b"5"]
        assert b.resyncs == 0 and not any(e.kind == "reset" for e in rec.events)
        # a store whose etcd is gone says so, and writes fail with the endpoints named
        etcd_cluster.kill(0)
        etcd_cluster.kill(2)
        try:
            with pytest.raises(QuorumLost):
                await a.put("user/k", b"6", timeout=5.0)
            assert not a.has_quorum()
        finally:
            await asyncio.to_thread(etcd_cluster.restart, 0)
            await asyncio.to_thread(etcd_cluster.restart, 2)
        await until(lambda: b.watch_connected, what="b's watch back")
    finally:
        await c.stop()


async def test_etcd_store_waits_for_etcd_and_names_it_when_it_does_not_come(tmp_path: Path) -> None:
    from conftest import free_ports

    (port,) = free_ports(1)
    s = EtcdStore(
        EtcdConfig(endpoints=(f"http://127.0.0.1:{port}",), request_timeout=0.5, attempt_timeout=0.2), "n1"
    )
    await s.start()
    try:
        with pytest.raises(QuorumLost, match=f"127.0.0.1:{port}"):
            await s.wait_synced(timeout=1.5)
        assert not s.has_quorum()
        with pytest.raises(QuorumLost, match=f"127.0.0.1:{port}") as e:
            await s.put("user/a", b"1", timeout=2.0)
        assert e.value.status == 503 and s.write_failures == 1
    finally:
        await s.stop()


class SlowWatch:
    """An `EtcdWatch` whose events arrive `delay` seconds late (a lagging watch stream)."""

    def __init__(self, watch: Any, delay: float) -> None:
        self.watch = watch
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.watch, name)

    def __aiter__(self) -> SlowWatch:
        return self

    async def __anext__(self) -> Any:
        ev = await self.watch.__anext__()
        await asyncio.sleep(self.delay)
        return ev


async def test_an_etcd_write_returns_once_the_writer_s_cache_has_it(etcd_cluster: EtcdCluster) -> None:
    c = EtcdStores(etcd_cluster, 1)
    (s,) = c.etcd_stores
    watch = s.client.watch
    s.client.watch = lambda *a, **kw: SlowWatch(watch(*a, **kw), 0.3)  # type: ignore[method-assign]
    await c.start()
    try:
        await s.put("user/a", b"1")
        assert s.get_local("user/a") == b"1"  # the put waited for its event
        assert await s.compare_and_set("user/a", None, None) is False
        assert await s.compare_and_set("user/b", None, None) is True  # changes nothing: no wait
        assert await s.remove("user/a") is True
        assert s.get_local("user/a") is None
    finally:
        await c.stop()


async def test_etcd_request_records_hang_on_a_lease_that_is_renewed_and_replaced_when_gone(
    etcd_cluster: EtcdCluster,
) -> None:
    c = EtcdStores(etcd_cluster, 1)
    (s,) = c.etcd_stores
    s.record_ttl = 2  # a new lease every second
    await c.start()
    try:
        await s.put("user/a", b"1")
        assert s._lease is not None
        first = s._lease[0]
        await s.put("user/a", b"2")
        assert s._lease[0] == first
        await asyncio.sleep(1.1)
        await s.put("user/a", b"3")
        assert s._lease[0] != first
        # the lease is gone (etcd was away longer than its TTL): a new one, and the write goes through
        await s.client.revoke(s._lease[0])
        gone = s._lease[0]
        assert await s.compare_and_set("user/a", b"3", b"4") is True
        assert s._lease[0] != gone and await s.get("user/a") == b"4"
    finally:
        await c.stop()
