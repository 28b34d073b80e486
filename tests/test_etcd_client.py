"""`aether.etcd.EtcdClient` against a real 3-member etcd (Debian's etcd-server, `tests/etcd_cluster.py`):
keys, compare-and-set, exactly-once writes, watches (order, resume after a member is killed,
compaction), leases, failover, TLS, auth and bad input. Skips when /usr/bin/etcd is missing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aether.core.errors import ConfigError
from aether.core.problem import problem_for
from aether.etcd import (
    Compacted,
    EtcdAuthFailed,
    EtcdBadRequest,
    EtcdClient,
    EtcdConfig,
    LeaseNotFound,
    StoreUnavailable,
    WatchCursor,
    WatchEvent,
    prefix_end,
)
from conftest import free_ports
from etcd_cluster import HAVE_ETCD, MISSING, EtcdCluster, EtcdTls, etcd_cluster, running_etcd

__all__ = ["etcd_cluster"]  # the module-scoped fixture


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def etcd(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:
    """A client of the shared cluster under a cluster name of its own (so tests do not see each other)."""
    async with EtcdClient(EtcdConfig(endpoints=etcd_cluster.endpoints, cluster=_name())) as client:
        yield client


async def collect(watch: AsyncIterator[WatchEvent], n: int, timeout: float = 10.0) -> list[WatchEvent]:
    out: list[WatchEvent] = []

    async def run() -> None:
        async for ev in watch:
            out.append(ev)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


# -- sans-IO and input checks (no etcd needed) ----------------------------------------------------------


def test_prefix_end() -> None:
    assert prefix_end(b"/aether/a/kv/") == b"/aether/a/kv0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == b"\0"


def test_watch_cursor_skips_what_it_delivered_and_starts_from_now() -> None:
    c = WatchCursor(0)
    c.created(41)
    assert c.next_revision == 42
    evs = [
        WatchEvent("put", "a", b"1", 42),
        WatchEvent("put", "b", b"1", 42),
        WatchEvent("delete", "a", b"", 43),
    ]
    assert c.accept(evs) == evs
    assert c.next_revision == 44
    c.created(50)  # a reconnect does not move the cursor
    assert c.next_revision == 44
    assert c.accept([*evs, WatchEvent("put", "c", b"2", 44)]) == [WatchEvent("put", "c", b"2", 44)]


def test_bad_config_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        EtcdConfig(endpoints=())
    with pytest.raises(ConfigError, match="expected http://HOST:PORT"):
        EtcdConfig(endpoints=("127.0.0.1:2379",))
    with pytest.raises(ConfigError, match="cluster name"):
        EtcdConfig(endpoints=("http://127.0.0.1:2379",), cluster="a/b")
    with pytest.raises(ConfigError, match="username and password"):
        EtcdConfig(endpoints=("http://127.0.0.1:2379",), username="u")
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        EtcdConfig(endpoints=("https://127.0.0.1:2379",), cert_file="c.pem")


async def test_bad_input_is_refused_before_anything_is_sent() -> None:
    (port,) = free_ports(1)  # nothing listens: a request sent would fail as unavailable, not bad input
    async with EtcdClient(EtcdConfig(endpoints=(f"http://127.0.0.1:{port}",))) as c:
        with pytest.raises(EtcdBadRequest, match="must not be empty") as e:
            await c.put("", b"x")
        assert e.value.status == 400 and e.value.kind == "etcd_bad_request"
        assert problem_for(e.value).status == 400
        with pytest.raises(EtcdBadRequest, match="must be bytes, not str: encode it"):
            await c.put("k", "text")  # type: ignore[arg-type]
        with pytest.raises(EtcdBadRequest, match="must be a str, not int"):
            await c.get(7)  # type: ignore[arg-type]
        with pytest.raises(EtcdBadRequest, match="expected_mod_revision must be an int >= 0"):
            await c.compare_and_set("k", -1, b"x")
        with pytest.raises(EtcdBadRequest, match="request id must not be empty"):
            await c.put_once("", "k", b"x")
        with pytest.raises(EtcdBadRequest, match="ttl must be an int >= 1"):
            await c.grant(0)
        with pytest.raises(EtcdBadRequest, match="start_revision"):
            c.watch("", -3)


async def test_unreachable_etcd_is_a_503_naming_the_endpoints() -> None:
    ports = free_ports(2)
    endpoints = tuple(f"http://127.0.0.1:{p}" for p in ports)
    config = EtcdConfig(endpoints=endpoints, request_timeout=0.5, attempt_timeout=0.2)
    async with EtcdClient(config) as c:
        with pytest.raises(StoreUnavailable) as e:
            await c.get("k")
    assert e.value.status == 503 and e.value.kind == "etcd_unavailable"
    assert all(ep in str(e.value) for ep in endpoints)
    assert "check that etcd is running" in str(e.value)
    problem = problem_for(e.value)
    assert problem.status == 503 and endpoints[0] in problem.detail


# -- against the real cluster --------------------------------------------------------------------------


async def test_put_get_range_delete_under_the_cluster_prefix(
    etcd: EtcdClient, etcd_cluster: EtcdCluster
) -> None:
    r1 = await etcd.put("apps/a", b"1")
    r2 = await etcd.put("apps/b", b"2")
    await etcd.put("nodes/n1", b"up")
    assert r2 > r1 > 0
    a = await etcd.get("apps/a")
    assert a is not None and (a.key, a.value, a.mod_revision, a.version) == ("apps/a", b"1", r1, 1)
    assert await etcd.get("apps/none") is None

    listed = await etcd.range("apps/")
    assert [(kv.key, kv.value) for kv in listed.items] == [("apps/a", b"1"), ("apps/b", b"2")]
    assert listed.revision >= r2
    assert [kv.key for kv in (await etcd.range()).items] == ["apps/a", "apps/b", "nodes/n1"]

    # another cluster name shares the etcd but not the keys; the keys live under /aether/{cluster}/kv/
    async with EtcdClient(EtcdConfig(endpoints=etcd_cluster.endpoints, cluster=_name())) as other:
        assert (await other.range()).items == []
    raw = etcd_cluster.etcdctl("get", "--prefix", "--keys-only", f"/aether/{etcd.config.cluster}/")
    assert raw.split() == [f"/aether/{etcd.config.cluster}/kv/{k}" for k in ("apps/a", "apps/b", "nodes/n1")]

    assert await etcd.delete("apps/a") is True
    assert await etcd.delete("apps/a") is False
    assert await etcd.get("apps/a") is None


async def test_compare_and_set_on_mod_revision(etcd: EtcdClient) -> None:
    created = await etcd.compare_and_set("leader", 0, b"n1")  # 0: only if absent
    assert created.succeeded
    again = await etcd.compare_and_set("leader", 0, b"n2")
    assert not again.succeeded
    assert again.current is not None and again.current.value == b"n1"
    assert again.current.mod_revision == created.revision

    moved = await etcd.compare_and_set("leader", created.revision, b"n2")
    assert moved.succeeded and moved.revision > created.revision
    stale = await etcd.compare_and_set("leader", created.revision, b"n3")
    assert not stale.succeeded and stale.current is not None and stale.current.value == b"n2"
    kv = await etcd.get("leader")
    assert kv is not None and kv.value == b"n2"


async def test_concurrent_compare_and_set_exactly_one_wins(
    etcd: EtcdClient, etcd_cluster: EtcdCluster
) -> None:
    base = await etcd.put("counter", b"0")
    n = 8
    endpoints = etcd_cluster.endpoints
    clients = [
        EtcdClient(EtcdConfig(endpoints=endpoints[i % 3 :] + endpoints[: i % 3], cluster=etcd.config.cluster))
        for i in range(n)
    ]
    for c in clients:
        await c.open()
    try:
        results = await asyncio.gather(
            *(c.compare_and_set("counter", base, f"w{i}".encode()) for i, c in enumerate(clients))
        )
    finally:
        for c in clients:
            await c.close()
    winners = [i for i, r in enumerate(results) if r.succeeded]
    assert len(winners) == 1, results
    kv = await etcd.get("counter")
    assert kv is not None and kv.value == f"w{winners[0]}".encode()
    assert all(r.current is not None and r.current.value == kv.value for r in results if not r.succeeded)


async def test_put_once_writes_once_per_request_id(etcd: EtcdClient) -> None:
    first = await etcd.put_once("req-1", "orders/1", b"placed")
    assert first.outcome == "applied"
    retry = await etcd.put_once("req-1", "orders/1", b"placed again")  # the retry of a lost answer
    assert retry.outcome == "duplicate" and retry.revision == first.revision
    kv = await etcd.get("orders/1")
    assert kv is not None and kv.value == b"placed" and kv.mod_revision == first.revision

    conflict = await etcd.put_once("req-2", "orders/1", b"x", expected_mod_revision=0)
    assert conflict.outcome == "conflict" and conflict.current is not None
    assert conflict.current.value == b"placed"
    cas = await etcd.put_once("req-3", "orders/1", b"paid", expected_mod_revision=first.revision)
    assert cas.outcome == "applied"
    assert (
        await etcd.put_once("req-3", "orders/1", b"paid", expected_mod_revision=first.revision)
    ).outcome == ("duplicate")
    # the request records are not data: a listing of the cluster's keys does not show them
    assert [kv.key for kv in (await etcd.range()).items] == ["orders/1"]


async def test_two_watchers_see_the_same_events_in_revision_order(
    etcd: EtcdClient, etcd_cluster: EtcdCluster
) -> None:
    start = (await etcd.range()).revision + 1
    other = EtcdClient(EtcdConfig(endpoints=etcd_cluster.endpoints[::-1], cluster=etcd.config.cluster))
    await other.open()
    try:
        w1, w2 = etcd.watch("m/", start), other.watch("m/", start)

        async def write(worker: int) -> None:
            for i in range(10):
                await etcd.put(f"m/{worker}/{i % 3}", f"{worker}-{i}".encode())
                if i % 4 == 3:
                    await etcd.delete(f"m/{worker}/{i % 3}")

        await asyncio.gather(*(write(w) for w in range(3)))
        await etcd.put("elsewhere", b"not watched")
        n = 3 * (10 + 2)
        got1, got2 = await asyncio.gather(collect(w1, n), collect(w2, n))
        await w1.aclose()
        await w2.aclose()
    finally:
        await other.close()
    assert got1 == got2
    revisions = [e.mod_revision for e in got1]
    assert revisions == sorted(revisions) and len(set(revisions)) == n
    assert sum(e.type == "delete" for e in got1) == 6
    assert all(e.key.startswith("m/") for e in got1)


async def test_watch_resumes_after_its_member_is_killed(etcd: EtcdClient, etcd_cluster: EtcdCluster) -> None:
    start = (await etcd.range()).revision + 1
    watch = etcd.watch("r/", start)
    writer = EtcdClient(EtcdConfig(endpoints=etcd_cluster.endpoints, cluster=etcd.config.cluster))
    await writer.open()
    killed: int | None = None
    try:
        for i in range(10):
            await writer.put(f"r/{i}", b"before")
        got = await collect(watch, 10)
        assert watch.endpoint is not None
        killed = etcd_cluster.index_of(watch.endpoint)
        etcd_cluster.kill(killed)
        # written while the watch is down (it is not iterated, so it cannot reconnect before they
        # commit): only a resume from the revision after the last event delivered sees them
        for i in range(10, 20):
            await writer.put(f"r/{i}", b"after")
        got += await collect(watch, 10)
        assert watch.reconnects >= 1 and watch.endpoint != etcd_cluster.endpoint(killed)
        await writer.put("r/last", b"")
        got += await collect(watch, 1)  # a doubled event would come before this one
    finally:
        await watch.aclose()
        await writer.close()
        if killed is not None:
            etcd_cluster.restart(killed)
    assert [e.key for e in got] == [*(f"r/{i}" for i in range(20)), "r/last"]
    revisions = [e.mod_revision for e in got]
    assert revisions == sorted(set(revisions))


async def test_lease_expiry_deletes_keys_and_a_keeper_keeps_them(etcd: EtcdClient) -> None:
    short = await etcd.grant(1)
    kept = await etcd.grant(1)
    await etcd.put("nodes/gone", b"x", lease=short.id)
    await etcd.put("nodes/alive", b"y", lease=kept.id)
    keeper = etcd.keep_alive(kept, interval=0.25)
    try:
        for _ in range(60):
            if await etcd.get("nodes/gone") is None:
                break
            await asyncio.sleep(0.1)
        assert await etcd.get("nodes/gone") is None
        assert (await etcd.get("nodes/alive")) is not None and not keeper.lost.is_set()
        with pytest.raises(LeaseNotFound) as e:
            await etcd.keepalive(short.id)
        assert e.value.status == 404
    finally:
        await keeper.stop(revoke=True)
    assert await etcd.get("nodes/alive") is None

    # a keeper whose lease is revoked elsewhere reports it lost
    other = await etcd.grant(5)
    keeper = etcd.keep_alive(other, interval=0.05)
    await etcd.revoke(other.id)
    await asyncio.wait_for(keeper.lost.wait(), 3)
    assert isinstance(keeper.error, LeaseNotFound)
    await keeper.stop()
    await etcd.revoke(other.id)  # already gone: not an error


async def test_failover_when_the_first_endpoint_is_down(etcd_cluster: EtcdCluster) -> None:
    (dead,) = free_ports(1)
    config = EtcdConfig(endpoints=(f"http://127.0.0.1:{dead}", *etcd_cluster.endpoints), cluster=_name())
    async with EtcdClient(config) as c:
        await c.put("k", b"v")
        assert c.endpoint != config.endpoints[0]
        kv = await c.get("k")
        assert kv is not None and kv.value == b"v"


async def test_quorum_loss_is_a_clear_503_and_writes_resume_after(etcd_cluster: EtcdCluster) -> None:
    config = EtcdConfig(
        endpoints=etcd_cluster.endpoints, cluster=_name(), request_timeout=1.5, attempt_timeout=0.5
    )
    async with EtcdClient(config) as c:
        await c.put("k", b"1")
        etcd_cluster.kill(1)
        etcd_cluster.kill(2)
        try:
            with pytest.raises(StoreUnavailable, match="has a quorum") as e:
                await c.put("k", b"2")
            assert e.value.status == 503
            with pytest.raises(StoreUnavailable):
                await c.get("k")  # a linearizable read needs the quorum too
        finally:
            etcd_cluster.restart(1)
            etcd_cluster.restart(2)
        await c.put("k", b"3")
        kv = await c.get("k")
        assert kv is not None and kv.value == b"3"


async def test_watch_from_a_compacted_revision_raises_compacted(etcd: EtcdClient) -> None:
    old = await etcd.put("c/a", b"1")
    now = await etcd.put("c/a", b"2")
    await etcd.compact(now)
    watch = etcd.watch("c/", old)
    with pytest.raises(Compacted) as e:
        await asyncio.wait_for(watch.__anext__(), 5)
    assert e.value.revision == now and e.value.requested == old
    assert e.value.status == 410 and "read the whole prefix again" in str(e.value)
    # a resync: read everything, watch from after that read
    snapshot = await etcd.range("c/")
    assert [kv.value for kv in snapshot.items] == [b"2"]
    watch = etcd.watch("c/", snapshot.revision + 1)
    await etcd.put("c/a", b"3")
    (ev,) = await collect(watch, 1)
    assert (ev.type, ev.value) == ("put", b"3")
    await watch.aclose()


# -- TLS and auth: one single-member etcd each ----------------------------------------------------------


@pytest.mark.skipif(not HAVE_ETCD, reason=MISSING)
async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    tls = EtcdTls.make(tmp_path / "tls")
    with running_etcd(tmp_path / "etcd", 1, tls=tls) as cluster:
        config = EtcdConfig(
            endpoints=cluster.endpoints,
            ca_file=str(tls.ca),
            cert_file=str(tls.client_cert),
            key_file=str(tls.client_key),
        )
        async with EtcdClient(config) as c:
            await c.put("k", b"secure")
            kv = await c.get("k")
            assert kv is not None and kv.value == b"secure"
        # without a client certificate etcd refuses the connection: a clear 503, not a hang
        bare = EtcdConfig(
            endpoints=cluster.endpoints, ca_file=str(tls.ca), request_timeout=1, attempt_timeout=0.5
        )
        async with EtcdClient(bare) as c:
            with pytest.raises(StoreUnavailable, match=cluster.endpoints[0]):
                await c.get("k")


@pytest.mark.skipif(not HAVE_ETCD, reason=MISSING)
async def test_auth_and_token_refresh(tmp_path: Path) -> None:
    with running_etcd(tmp_path, 1, extra=("--auth-token-ttl=1",)) as cluster:
        cluster.etcdctl("user", "add", "root:rootpw")
        cluster.etcdctl("user", "add", "aether:s3cret")
        cluster.etcdctl("role", "add", "aether")
        cluster.etcdctl("role", "grant-permission", "aether", "--prefix=true", "readwrite", "/aether/auth/")
        cluster.etcdctl("user", "grant-role", "aether", "aether")
        cluster.etcdctl("auth", "enable")
        base = {"endpoints": cluster.endpoints, "cluster": "auth", "request_timeout": 2.0}

        async with EtcdClient(EtcdConfig(**base, username="aether", password="s3cret")) as c:
            await c.put("k", b"v")
            assert c.authentications == 1
            await asyncio.sleep(2.5)  # the simple token expires after 1 s unused
            kv = await c.get("k")
            assert kv is not None and kv.value == b"v"
            assert c.authentications == 2
            watch = c.watch("", kv.mod_revision)  # watches carry the token too
            (ev,) = await collect(watch, 1)
            assert (ev.key, ev.value) == ("k", b"v")
            await watch.aclose()

        async with EtcdClient(EtcdConfig(**base, username="aether", password="wrong")) as c:
            with pytest.raises(EtcdAuthFailed, match="check the etcd username/password"):
                await c.get("k")
        async with EtcdClient(EtcdConfig(**base)) as c:
            with pytest.raises(EtcdAuthFailed, match="requires authentication"):
                await c.get("k")
        other = {**base, "cluster": "other"}
        async with EtcdClient(EtcdConfig(**other, username="aether", password="s3cret")) as c:
            with pytest.raises(EtcdAuthFailed, match="needs read-write on the prefix /aether/other/") as e:
                await c.get("k")
            assert e.value.status == 503
