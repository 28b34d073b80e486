"""The contract of the cluster state store (`aether.kv.contract.ClusterStore`), as test functions
every backend must pass. `tests/test_store_contract.py` runs them against the embedded Rabia store
(`KVStore` on an in-process 3-node consensus cluster) and against `EtcdStore` on a real 3-member
etcd, through the `store_cluster` fixture: a factory ``await make(n)`` of a `StoreCluster` of `n`
nodes of one backend, with the faults the contract talks about (fall behind, lose an answer, lose
the quorum) done the backend's way.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import pytest

from aether.core.errors import BadRequest, CommitTimeout, QuorumLost
from aether.kv.contract import ClusterStore, WatchEvent
from aether.kv.keys import BlueprintKey, BlueprintSlice, BlueprintValue

pytestmark = pytest.mark.timeout(60)


class StoreCluster(Protocol):
    """`n` nodes of one backend, each with its own `ClusterStore`."""

    stores: list[ClusterStore]
    error_names: str  # a regex the message of a quorum-loss error matches (what it names)

    def fall_behind(self, i: int) -> AbstractAsyncContextManager[None]:
        """Inside: node `i` misses what is written; on exit it is made to resync (a `reset`)."""
        ...

    def lose_next_answer(self, i: int) -> None:
        """The next write of node `i` is applied, its answer lost, and the write retried."""
        ...

    async def lose_quorum(self) -> None:
        """Node 0 can no longer reach a quorum (2 of 3 stopped)."""
        ...

    async def restore_quorum(self) -> None: ...


MakeCluster = Callable[[int], Awaitable[StoreCluster]]


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


def bp(name: str) -> BlueprintValue:
    return BlueprintValue([BlueprintSlice(f"org.example:{name}:1.0.0", 1)])


class Recorder:
    def __init__(self, store: ClusterStore, prefix: str) -> None:
        self.events: list[WatchEvent] = []
        self.cancel = store.watch(prefix, self.events.append)

    def changes(self) -> list[tuple[str, str, bytes | None, int]]:
        return [(e.kind, e.key, e.value, e.revision) for e in self.events if e.kind != "reset"]


async def test_typed_put_get_remove_and_local_reads(store_cluster: MakeCluster) -> None:
    c = await store_cluster(3)
    a, b = c.stores[0], c.stores[1]
    rev = await a.put(BlueprintKey("shop"), bp("cart"))
    assert isinstance(rev, int) and rev > 0
    assert await b.get(BlueprintKey("shop")) == bp("cart")  # linearizable, on another node
    assert await a.get("blueprints/shop") == bp("cart")
    assert a.get_local(BlueprintKey("shop")) == bp("cart")  # read-your-writes on the writer
    rev2 = await a.put("user/z", b"\x00raw")
    assert rev2 > rev
    await a.put("user/a", b"")
    for s in c.stores:
        await until(lambda s=s: s.get_local("user/a") == b"", what="the write on every replica")
        assert s.list_local("user/") == [("user/a", b""), ("user/z", b"\x00raw")]
        assert s.list_local("blueprints/") == [("blueprints/shop", bp("cart"))]
    assert await b.remove("user/z") is True
    assert b.get_local("user/z") is None
    assert await b.remove("user/z") is False
    assert await a.get("user/z") is None
    assert await a.get("user/never") is None and a.get_local("user/never") is None


async def test_bad_keys_and_values_are_refused_naming_the_problem(store_cluster: MakeCluster) -> None:
    c = await store_cluster(3)
    s = c.stores[0]
    for call in (
        lambda: s.put("nope/x", b"1"),
        lambda: s.remove("nope/x"),
        lambda: s.compare_and_set("nope/x", None, b"1"),
        lambda: s.get("nope/x"),
    ):
        with pytest.raises(BadRequest, match="nope/x") as e:
            await call()
        assert e.value.status == 400
    with pytest.raises(BadRequest, match=r"blueprints/shop.*must be BlueprintValue, not bytes"):
        await s.put(BlueprintKey("shop"), b"not a blueprint")
    with pytest.raises(BadRequest, match=r"user/x.*must be bytes"):
        await s.put("user/x", "text")
    with pytest.raises(BadRequest, match=r"user/big.*limit"):
        await s.put("user/big", b"x" * (1024 * 1024 + 1))
    with pytest.raises(BadRequest, match="1024"):
        await s.put("user/" + "k" * 1100, b"1")
    with pytest.raises(BadRequest, match=r"blueprints/shop.*must be BlueprintValue"):
        await s.compare_and_set(BlueprintKey("shop"), None, b"x")
    # nothing was written, and the store still works
    assert s.list_local("") == []
    assert await s.put("user/ok", b"1") > 0


async def test_compare_and_set_compares_the_value(store_cluster: MakeCluster) -> None:
    c = await store_cluster(3)
    s, other = c.stores[0], c.stores[2]
    k = "user/cas"
    assert await s.compare_and_set(k, None, b"v1") is True  # absent -> v1
    assert await other.compare_and_set(k, None, b"v2") is False  # not absent any more
    assert await other.compare_and_set(k, b"nope", b"v2") is False
    assert await other.compare_and_set(k, b"v1", b"v2") is True
    assert await s.get(k) == b"v2"
    await s.put(k, b"v2")  # the same value again: a CAS on the value still matches
    assert await s.compare_and_set(k, b"v2", b"v3") is True
    assert await s.compare_and_set(k, b"v3", None) is True  # new None removes
    assert await s.get(k) is None and s.get_local(k) is None
    assert await s.compare_and_set(k, b"v3", None) is False  # absent does not hold v3
    assert await s.compare_and_set(k, None, None) is True  # absent is absent: nothing written
    assert await s.get(k) is None
    await s.put(k, b"x")
    assert await s.compare_and_set(k, None, None) is False
    assert await s.compare_and_set(BlueprintKey("b"), None, bp("one")) is True  # typed values
    assert await s.compare_and_set(BlueprintKey("b"), bp("two"), bp("three")) is False
    assert await s.compare_and_set(BlueprintKey("b"), bp("one"), bp("three")) is True
    assert await s.get(BlueprintKey("b")) == bp("three")


async def test_concurrent_compare_and_set_from_every_node_exactly_one_wins(
    store_cluster: MakeCluster,
) -> None:
    c = await store_cluster(3)
    for round_ in range(3):
        k = f"user/leader-{round_}"
        won = await asyncio.gather(
            *(s.compare_and_set(k, None, f"node-{i}".encode()) for i, s in enumerate(c.stores))
        )
        assert sum(won) == 1, won
        winner = f"node-{won.index(True)}".encode()
        for s in c.stores:
            await until(lambda s=s, k=k, w=winner: s.get_local(k) == w, what="the winner on every replica")


async def test_watches_deliver_commit_order_identical_on_every_node(store_cluster: MakeCluster) -> None:
    c = await store_cluster(3)
    recs = [Recorder(s, "user/w/") for s in c.stores]
    outside = [Recorder(s, "user/x/") for s in c.stores]

    async def writer(i: int) -> None:
        s = c.stores[i]
        for n in range(6):
            await s.put(f"user/w/{i}", f"{i}.{n}".encode())
            if n % 3 == 2:
                await s.remove(f"user/w/{i}")
        await s.put("user/wx", b"not under the prefix")

    await asyncio.gather(*(writer(i) for i in range(3)))
    expected = 3 * (6 + 2)
    for r in recs:
        await until(lambda r=r: len(r.changes()) >= expected, what="every event on every node")
    await asyncio.sleep(0.2)  # nothing more arrives
    first = recs[0].changes()
    assert len(first) == expected
    for r in recs[1:]:
        assert r.changes() == first  # identical sequences, revisions included
    revisions = [rev for *_, rev in first]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert all(k.startswith("user/w/") for _, k, _, _ in first)
    assert all(not r.events for r in outside)
    for i in range(3):  # each writer's own order is kept
        mine = [(kind, v) for kind, k, v, _ in first if k == f"user/w/{i}"]
        assert mine == [
            ("put", b"%d.0" % i),
            ("put", b"%d.1" % i),
            ("put", b"%d.2" % i),
            ("remove", None),
            ("put", b"%d.3" % i),
            ("put", b"%d.4" % i),
            ("put", b"%d.5" % i),
            ("remove", None),
        ]
    recs[1].cancel()
    await c.stores[0].put("user/w/after", b"1")
    await until(lambda: len(recs[2].changes()) == expected + 1, what="the event after cancel")
    assert len(recs[1].changes()) == expected  # a cancelled watch hears nothing more


async def test_a_write_returns_after_the_writer_s_replica_and_watchers_have_it(
    store_cluster: MakeCluster,
) -> None:
    c = await store_cluster(3)
    for i, s in enumerate(c.stores):
        rec = Recorder(s, "user/ryw/")
        k = f"user/ryw/{i}"
        rev = await s.put(k, b"1")
        assert s.get_local(k) == b"1"
        assert rec.changes()[-1] == ("put", k, b"1", rev)
        assert await s.compare_and_set(k, b"1", b"2")
        assert s.get_local(k) == b"2"
        assert await s.remove(k)
        assert s.get_local(k) is None and rec.events[-1].kind == "remove"
        rec.cancel()


async def test_a_node_that_falls_behind_gets_a_reset_then_the_cluster_state(
    store_cluster: MakeCluster,
) -> None:
    c = await store_cluster(3)
    lagging = c.stores[2]
    await c.stores[0].put("user/r/gone", b"old")
    await until(lambda: lagging.get_local("user/r/gone") == b"old", what="the first write on node 2")
    rec = Recorder(lagging, "user/r/")
    async with c.fall_behind(2):
        for n in range(30):
            await c.stores[0].put(f"user/r/{n % 7}", b"%d" % n)
        await c.stores[1].remove("user/r/gone")
    await until(lambda: any(e.kind == "reset" for e in rec.events), what="a reset", timeout=15)
    reset = next(e for e in rec.events if e.kind == "reset")
    assert reset.key == "user/r/" and reset.value is None
    expected = c.stores[0].list_local("user/r/")
    await until(lambda: lagging.list_local("user/r/") == expected, what="the cluster's state on node 2")
    assert len(expected) == 7 and lagging.get_local("user/r/gone") is None
    # after the reset, changes are delivered as usual
    rev = await c.stores[1].put("user/r/new", b"1")
    await until(lambda: rec.changes()[-1:] == [("put", "user/r/new", b"1", rev)], what="events after reset")


async def test_a_key_s_creation_revision_tells_it_apart_from_one_removed_and_written_again(
    store_cluster: MakeCluster,
) -> None:
    """`created_local`: the revision that created the key's current value, the same on every node,
    kept by an overwrite, a new one after a removal and a new write, also on a node that saw
    neither but only a reset (the map service tells a map created again under the same name from
    the one it had this way)."""
    c = await store_cluster(3)
    a, lagging = c.stores[0], c.stores[2]
    assert a.created_local("user/c/k") == 0  # absent
    rev = await a.put("user/c/k", b"1")
    await until(lambda: all(s.get_local("user/c/k") == b"1" for s in c.stores), what="the write everywhere")
    assert [s.created_local("user/c/k") for s in c.stores] == [rev] * 3
    rev2 = await c.stores[1].put("user/c/k", b"2")  # overwritten: created then, still
    assert rev2 > rev
    await until(lambda: lagging.get_local("user/c/k") == b"2", what="the overwrite on node 2")
    assert [s.created_local("user/c/k") for s in c.stores] == [rev] * 3
    async with c.fall_behind(2):  # removed and written again with the same value, unseen by node 2
        await a.put("user/c/k", b"1")
        await a.remove("user/c/k")
        rev3 = await a.put("user/c/k", b"1")
    await until(lambda: lagging.created_local("user/c/k") == rev3, what="the new creation on node 2")
    assert lagging.get_local("user/c/k") == b"1" and a.created_local("user/c/k") == rev3 > rev2
    assert await a.compare_and_set("user/c/k", b"1", None)
    await until(lambda: lagging.get_local("user/c/k") is None, what="the removal on node 2")
    assert lagging.created_local("user/c/k") == 0


async def test_a_write_whose_answer_is_lost_is_applied_once(store_cluster: MakeCluster) -> None:
    c = await store_cluster(3)
    rec = Recorder(c.stores[1], "user/once/")
    c.lose_next_answer(0)
    # a CAS retried after it was applied: without exactly-once the retry would answer False
    assert await c.stores[0].compare_and_set("user/once/cas", None, b"1") is True
    c.lose_next_answer(0)
    rev = await c.stores[0].put("user/once/put", b"2")
    c.lose_next_answer(0)
    assert await c.stores[0].remove("user/once/cas") is True  # it existed when it was removed
    await until(lambda: len(rec.changes()) >= 3, what="the three writes on node 1")
    await asyncio.sleep(0.2)
    got = rec.changes()
    assert [(kind, k, v) for kind, k, v, _ in got] == [
        ("put", "user/once/cas", b"1"),
        ("put", "user/once/put", b"2"),
        ("remove", "user/once/cas", None),
    ]
    assert got[1][3] == rev  # the revision the retried write answered is the one it was applied at


async def test_quorum_loss_is_a_clear_503_and_writes_resume_after(store_cluster: MakeCluster) -> None:
    c = await store_cluster(3)
    s = c.stores[0]
    await s.put("user/q", b"1")
    assert s.write_failures == 0 and s.failing_since is None and s.last_write_error is None
    await c.lose_quorum()
    try:
        started = time.monotonic()
        with pytest.raises((QuorumLost, CommitTimeout)) as e:
            await s.put("user/q", b"2", timeout=2.0)
        assert time.monotonic() - started < 4.0
        assert e.value.status in (503, 504)
        assert e.value.args[0]
        assert re.search(c.error_names, str(e.value)), str(e.value)
        assert s.write_failures >= 1 and s.failing_since is not None
        assert s.last_write_error == str(e.value)
        assert s.get_local("user/q") == b"1"  # local reads still serve
    finally:
        await c.restore_quorum()
    end = time.monotonic() + 20
    while True:
        try:
            await s.put("user/q", b"3", timeout=3.0)
            break
        except (QuorumLost, CommitTimeout):
            if time.monotonic() > end:
                raise
    assert await s.get("user/q") == b"3"
    assert s.failing_since is None and s.last_write_error is None


CONTRACT_TESTS = [
    test_typed_put_get_remove_and_local_reads,
    test_bad_keys_and_values_are_refused_naming_the_problem,
    test_compare_and_set_compares_the_value,
    test_concurrent_compare_and_set_from_every_node_exactly_one_wins,
    test_watches_deliver_commit_order_identical_on_every_node,
    test_a_write_returns_after_the_writer_s_replica_and_watchers_have_it,
    test_a_node_that_falls_behind_gets_a_reset_then_the_cluster_state,
    test_a_key_s_creation_revision_tells_it_apart_from_one_removed_and_written_again,
    test_a_write_whose_answer_is_lost_is_applied_once,
    test_quorum_loss_is_a_clear_503_and_writes_resume_after,
]
