"""`EtcdStore`: the cluster state store (`aether.kv.contract.ClusterStore`) on etcd v3.

**Local replica.** `start` reads every key under the cluster's prefix (one ``range``) into a cache,
then follows ONE watch from that read's revision + 1; `get_local`/`list_local` read the cache, as
`KVStore` reads its replica. Watch callbacks are called from that watch, in etcd's revision order,
after the cache holds the event: etcd's revisions are global, so every node sees the same sequence.
When the watch cannot resume (its revision was compacted: the node fell too far behind) the store
resyncs: it reads the prefix again, replaces the cache and calls every watcher with a ``reset``
event (as `KVStore` does after a snapshot install). A watch that loses its connection resumes from
the revision after the last event it delivered (`aether.etcd.client.EtcdWatch`), also after etcd was
unreachable for a while.

**Writes** are exactly-once across failover: each logical write gets a request id (this store's
random session id and a sequence number) and is one transaction that writes the key and the request
record (`EtcdClient.write_once`), so the client's retry on another endpoint after a lost answer
reports ``duplicate`` with the first write's revision instead of writing twice. Records are attached
to a short lease (`record_ttl`, renewed by granting a new one) so they expire. Compare-and-set
compares the stored VALUE inside the transaction (etcd's ``VALUE`` compare; ``CREATE == 0`` for
"absent"), exactly the semantics of `KVStore` (not the mod_revision of the cached value, which could
be stale). A write returns once this node's cache holds it (read-your-writes locally, as with
`KVStore`), or when its timeout passes (then the write stands; only the cache lags).

Revisions are etcd's: global over the whole etcd (other clusters' writes and request records use
revisions too), increasing but not contiguous.

**Errors**: etcd unreachable or without a quorum (`StoreUnavailable`), refusing our credentials
(`EtcdAuthFailed`), or not answering within the call's timeout become the project's `QuorumLost`
(503) and `CommitTimeout`, with the etcd endpoint in the message; bad keys and values are refused
with `BadRequest` by the same checks as `KVStore` (`aether.kv.contract.check_key` /
`encode_checked`) before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal, NoReturn

import msgspec

from aether.core.errors import BadRequest, CommitTimeout, QuorumLost
from aether.etcd.client import EtcdClient, EtcdWatch
from aether.etcd.errors import Compacted, EtcdAuthFailed, EtcdError, StoreUnavailable
from aether.etcd.types import EtcdConfig, OnceResult, RangeResult
from aether.etcd.types import WatchEvent as EtcdEvent
from aether.kv.contract import (
    ClusterStore,
    WatchCallback,
    WatchEvent,
    check_key,
    decode_value,
    encode_checked,
)
from aether.kv.keys import Key

__all__ = ["EtcdStore"]

_GRPC_NOT_FOUND = 5


class EtcdStore:
    """The `ClusterStore` of one node on etcd: a cache of the cluster's keys kept by one watch, and
    exactly-once writes. `start()` then `wait_synced()` before serving; `stop()` at the end.

    `client` may be given (tests); by default the store makes one from `config` and closes it.
    `record_ttl`: seconds the request records of exactly-once writes live (at least twice the
    longest a retry may take)."""

    def __init__(
        self,
        config: EtcdConfig,
        node_id: str,
        *,
        client: EtcdClient | None = None,
        record_ttl: int = 120,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.client = client or EtcdClient(config)
        self._own_client = client is None
        self.record_ttl = record_ttl
        self.log = logging.getLogger(f"aether.etcd.store.{node_id}")
        self._session = f"{node_id}-{secrets.token_hex(8)}"  # unique per store instance
        self._seq = itertools.count(1)
        self._cache: dict[str, bytes] = {}
        self._created: dict[str, int] = {}  # key -> its etcd create_revision (`created_local`)
        self.revision = 0  # the etcd revision the cache holds (at least)
        self.resyncs = 0  # full re-reads after the first (compaction)
        self._watches: dict[int, tuple[str, WatchCallback]] = {}
        self._ids = itertools.count(1)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watch: EtcdWatch | None = None
        self._next_rev: int | None = None  # where the watch resumes; None: read everything first
        self.watch_error: str | None = None  # why the watch is not connected (None when it is)
        self._reachable = True  # the last request answered (False after StoreUnavailable)
        self._lease: tuple[int, float] | None = None  # (id, monotonic time granted) for records
        self._lease_lock = asyncio.Lock()
        self.write_failures = 0
        self.failing_since: float | None = None
        self.last_write_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client and start filling the cache (in the background: etcd may be down)."""
        if self._task is not None:
            return
        await self.client.open()
        self._task = asyncio.get_running_loop().create_task(self._follow(), name=f"etcd-store-{self.node_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, fut in self._waiters:  # writes waiting for the cache: they stand, let them return
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        if self._own_client:
            await self.client.close()

    async def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until the cache holds the cluster's state (the first full read is in); raises
        `QuorumLost` naming the endpoints when etcd did not answer within `timeout`."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            raise QuorumLost(
                f"cluster store (etcd): could not read the cluster's state from "
                f"{', '.join(self.config.endpoints)} within {timeout:g}s"
                f"{f' ({self.watch_error})' if self.watch_error else ''}"
            ) from None

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def watch_connected(self) -> bool:
        return self._watch is not None and self._watch.endpoint is not None

    def has_quorum(self) -> bool:
        """The availability signal (what `KVStore`'s node reads from its quorum): the cache is
        synced, the watch is connected to a member, and the last request reached a member that
        could serve it."""
        return self.synced and self.watch_connected and self._reachable

    # -- the cache, kept by one watch ------------------------------------------------------------------

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                if self._next_rev is None:
                    snapshot = await self.client.range("")
                    self._install(snapshot)
                    self._next_rev = snapshot.revision + 1
                watch = self._watch = self.client.watch("", self._next_rev)
                try:
                    async for ev in watch:
                        self._apply(ev)
                        self._next_rev = watch.next_revision
                        failures = 0
                        self.watch_error = None
                finally:
                    self._watch = None
                    with contextlib.suppress(Exception):
                        await watch.aclose()
            except Compacted as e:
                self.log.warning("the watch fell behind a compaction (%s): reading everything again", e)
                self._next_rev = None
            except asyncio.CancelledError:
                raise
            except EtcdError as e:
                # unreachable (the watch gave up reconnecting for now), auth: retry, resuming
                self.watch_error = str(e)
                failures += 1
                self.log.warning("etcd watch: %s", e)
                await asyncio.sleep(min(2.0, 0.1 * failures))
            except Exception as e:
                self.watch_error = f"{type(e).__name__}: {e}"
                failures += 1
                self.log.exception("etcd watch failed")
                await asyncio.sleep(min(2.0, 0.1 * failures))

    def _install(self, snapshot: RangeResult) -> None:
        first = not self._synced.is_set()
        self._cache = {kv.key: kv.value for kv in snapshot.items}
        self._created = {kv.key: kv.create_revision for kv in snapshot.items}
        self.revision = max(self.revision, snapshot.revision)
        self._synced.set()
        self.watch_error = None
        self._wake()
        if first:
            return
        self.resyncs += 1
        for prefix, cb in list(self._watches.values()):
            try:
                cb(WatchEvent("reset", prefix, None, snapshot.revision))
            except Exception:
                self.log.exception("watch callback for prefix %r failed on reset", prefix)

    def _apply(self, ev: EtcdEvent) -> None:
        if ev.type == "delete":
            self._cache.pop(ev.key, None)
            self._created.pop(ev.key, None)
            event = WatchEvent("remove", ev.key, None, ev.mod_revision)
        else:
            self._cache[ev.key] = ev.value
            self._created[ev.key] = ev.create_revision
            event = WatchEvent("put", ev.key, ev.value, ev.mod_revision)
        self.revision = max(self.revision, ev.mod_revision)
        for prefix, cb in list(self._watches.values()):
            if ev.key.startswith(prefix):
                try:
                    cb(event)
                except Exception:
                    self.log.exception("watch callback for prefix %r failed", prefix)
        self._wake()

    def _wake(self) -> None:
        if not self._waiters:
            return
        keep = []
        for rev, fut in self._waiters:
            if rev <= self.revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((rev, fut))
        self._waiters = keep

    async def _until_cached(self, revision: int, timeout: float) -> None:
        """Wait (at most `timeout`) until the cache holds `revision`; the write stands either way."""
        if revision <= self.revision or timeout <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.log.warning(
                "the cache did not reach revision %d within %.1fs (watch: %s)",
                revision,
                timeout,
                self.watch_error or "connected",
            )

    # -- requests -------------------------------------------------------------------------------------

    async def _request(self, what: str, call: Callable[[], Any], timeout: float) -> Any:
        """Run one etcd call within `timeout`; map unavailability to `QuorumLost` / `CommitTimeout`
        and keep the write-failure counters."""
        try:
            out = await asyncio.wait_for(call(), timeout)
        except (StoreUnavailable, EtcdAuthFailed) as e:
            self._reachable = False
            self._failed(QuorumLost(f"cluster store (etcd) {what}: {e}"))
        except TimeoutError:
            self._reachable = False
            self._failed(
                CommitTimeout(
                    f"cluster store (etcd) {what}: no answer within {timeout:g}s (endpoint "
                    f"{self.client.endpoint}, of {', '.join(self.config.endpoints)}); outcome unknown: "
                    "check that etcd is running and has a quorum"
                )
            )
        self._reachable = True
        self.failing_since = None
        self.last_write_error = None
        return out

    def _failed(self, error: QuorumLost | CommitTimeout) -> NoReturn:
        self.write_failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.last_write_error = str(error)
        raise error

    async def _record_lease(self) -> int:
        async with self._lease_lock:
            now = time.monotonic()
            if self._lease is None or now - self._lease[1] > self.record_ttl / 2:
                lease = await self.client.grant(self.record_ttl)
                self._lease = (lease.id, now)
            return self._lease[0]

    async def _write(
        self,
        key: str,
        value: bytes | None,
        timeout: float,
        expect: Literal["any", "absent", "exists", "value"] = "any",
        expected_value: bytes = b"",
        request_id: str | None = None,
    ) -> OnceResult:
        request_id = request_id or f"{self._session}-{next(self._seq)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def attempt() -> OnceResult:
            for tries in (1, 2):
                lease = await self._record_lease()
                try:
                    return await self.client.write_once(
                        request_id,
                        key,
                        value,
                        expect=expect,
                        expected_value=expected_value,
                        record_lease=lease,
                    )
                except EtcdError as e:
                    # the records' lease expired (etcd was away longer than record_ttl): grant anew
                    if e.code != _GRPC_NOT_FOUND or tries == 2:
                        raise
                    self._lease = None
            raise AssertionError("unreachable")

        res: OnceResult = await self._request(f"write of {key!r}", attempt, timeout)
        # a delete of an absent key (CAS absent -> None) changes no key: no event to wait for
        if res.outcome != "conflict" and not (value is None and expect == "absent"):
            await self._until_cached(res.revision, deadline - loop.time())
        return res

    async def write_bytes(
        self,
        key: str,
        value: bytes | None,
        *,
        request_id: str,
        expect: Literal["any", "absent", "exists", "value"] = "any",
        expected_value: bytes = b"",
        timeout: float = 5.0,
    ) -> OnceResult:
        """A raw write (`value` None: delete) under the caller's `request_id`, for writes whose
        retries come from outside (the cluster-port clients' ``(client, seq)``): the same id written
        again, through any node, reports ``duplicate`` instead of writing twice. The key and value
        get the checks of `put`."""
        k = check_key(key)
        if value is not None:
            value = encode_checked(k, value)
        if expect == "value":
            expected_value = encode_checked(k, expected_value)
        return await self._write(k, value, timeout, expect, expected_value, request_id=f"c-{request_id}")

    # -- ClusterStore ----------------------------------------------------------------------------------

    async def put(self, key: Key | str, value: Any, timeout: float = 5.0) -> int:
        """Store `value` (a typed struct of the key's family); the etcd revision of the write."""
        k = check_key(key)
        res = await self._write(k, encode_checked(k, value), timeout)
        return res.revision

    async def remove(self, key: Key | str, timeout: float = 5.0) -> bool:
        """Remove `key`; True if it existed."""
        k = check_key(key)
        res = await self._write(k, None, timeout, expect="exists")
        return res.outcome != "conflict"

    async def compare_and_set(self, key: Key | str, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        """Set `key` to `new` iff it holds `expected` (None: absent; `new` None: remove), compared by
        value in one etcd transaction."""
        k = check_key(key)
        exp = None if expected is None else encode_checked(k, expected)
        nw = None if new is None else encode_checked(k, new)
        if exp is None:
            res = await self._write(k, nw, timeout, expect="absent")
        else:
            res = await self._write(k, nw, timeout, expect="value", expected_value=exp)
        return res.outcome != "conflict"

    async def get(self, key: Key | str, timeout: float = 5.0) -> Any:
        """A linearizable read (etcd's default range); None if absent."""
        k = check_key(key)
        kv = await self._request(f"read of {k!r}", lambda: self.client.get(k), timeout)
        return None if kv is None else decode_value(k, kv.value)

    def get_local(self, key: Key | str) -> Any:
        k = str(key)
        v = self._cache.get(k)
        return None if v is None else decode_value(k, v)

    def created_local(self, key: Key | str) -> int:
        """etcd's ``create_revision`` of `key` as this node's cache holds it; 0 when absent."""
        return self._created.get(str(key), 0)

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for k, v in sorted((k, v) for k, v in self._cache.items() if k.startswith(prefix)):
            try:
                out.append((k, decode_value(k, v)))
            except (msgspec.DecodeError, BadRequest):
                out.append((k, v))  # not written by Aether (or an unknown family): raw bytes
        return out

    def watch(self, prefix: str, callback: WatchCallback) -> Callable[[], None]:
        """Call `callback` for every put/remove under `prefix`, in etcd's revision order; a ``reset``
        event after a resync (re-read the prefix)."""
        wid = next(self._ids)
        self._watches[wid] = (prefix, callback)

        def cancel() -> None:
            self._watches.pop(wid, None)

        return cancel


_: type[ClusterStore] = EtcdStore  # mypy checks that EtcdStore implements the contract
