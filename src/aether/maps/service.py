"""`MapService`: one node's part of the distributed map, and the node's `MapBackend` for slices.

What it does, per partition `p` of the current `PartitionTable` (read from `maps/table`):

- **Primary** (first owner): runs operations one at a time per key without awaiting between
  reading and writing (so compare-and-set is atomic), stores the record, sends it as a `Replicate`
  to the other owners of the map and answers once ``write_quorum - 1`` of them acknowledged.
  When a table makes this node primary of `p`, it first *promotes*: it asks every live node for
  its records of `p` (a `SyncRequest` with ``fence`` = the new table version, which makes them
  refuse replication from the deposed primary) and merges them by version before serving. Every
  acknowledged write is on ``write_quorum`` nodes, so with one node lost, at least one copy is
  among the nodes asked.
- **Replica**: applies `Replicate`s whose epoch is not fenced, keeping the record with the higher
  version. A node that becomes a replica of `p` pulls `p` from the primary in the background
  (re-replication).
- **Leader**: computes the table from the live nodes (`plan_table`; a node counts as gone
  `down_grace` seconds after its link dropped) and writes it with compare-and-set.
- **Housekeeping** (every `housekeeping_interval`): purges expired values and old tombstones,
  drops partitions this node no longer owns once the table has been stable for `drop_after`
  seconds, and forgets replication acknowledgements that will never come.

As `MapBackend` (`map_get`, `map_put`, ...), it sends each operation to the partition's primary
(itself: a direct call) and retries while the table changes or the primary is unreachable, until
`op_timeout`; then it raises `MapUnavailable`.

Clocks: `now` (monotonic seconds) for timeouts, `wall_ms` (wall-clock milliseconds) for TTLs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from aether.core.maps import (
    MapContention,
    MapDefinitionConflict,
    MapSpec,
    MapUnavailable,
    MapValueTooLarge,
    PartitionTable,
    UnknownMap,
    check_key,
)
from aether.kv.keys import MapDefKey, MapTableKey
from aether.maps.messages import (
    KIND_BAD_REQUEST,
    KIND_NOT_PRIMARY,
    KIND_UNAVAILABLE,
    KIND_UNKNOWN_MAP,
    KeysRequest,
    KeysResponse,
    MapNodeStats,
    MapRequest,
    MapResponse,
    Replicate,
    ReplicateAck,
    StatsRequest,
    StatsResponse,
    SyncChunk,
    SyncRequest,
)
from aether.maps.partitioning import DEFAULT_PARTITIONS, owners_for, partition_of, plan_table
from aether.maps.records import (
    OP_CAS,
    OP_GET,
    OP_NAMES,
    OP_PUT,
    OP_REMOVE,
    Record,
    evaluate,
    is_live,
    newer,
)
from aether.maps.storage import Engine, open_engine
from aether.transport import MessageRouter, PeerDown, PeerUp

__all__ = ["MapService"]

_SYNC_CHUNK_ITEMS = 512
_DEF_ROUNDS = 5  # compare-and-set rounds of define/undefine before giving up (MapContention)
_SYNC_CHUNK_BYTES = 1024 * 1024


class KVLike(Protocol):
    def get_local(self, key: Any) -> Any: ...

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...

    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]: ...

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool: ...

    async def get(self, key: Any, timeout: float = 5.0) -> Any: ...


class Sender(Protocol):
    def send(self, peer: str, msg: object) -> bool: ...


class _NotPrimary(Exception):
    """This node cannot serve the operation now (not primary, fenced, no table): retry."""


class _PeerGone(Exception):
    """The peer went down or did not answer: the operation's outcome is unknown."""


class _AckWait:
    __slots__ = ("failed", "fut", "got", "need", "total")

    def __init__(self, fut: asyncio.Future[None], need: int, total: int) -> None:
        self.fut = fut
        self.need = need
        self.total = total
        self.got = 0
        self.failed = 0

    def update(self, ok: bool) -> None:
        if ok:
            self.got += 1
        else:
            self.failed += 1
        if self.fut.done():
            return
        if self.got >= self.need:
            self.fut.set_result(None)
        elif self.failed > self.total - self.need:
            self.fut.set_exception(_PeerGone(f"{self.failed} of {self.total} replicas refused or are down"))


class MapService:
    def __init__(
        self,
        node_id: str,
        kv: KVLike,
        sender: Sender,
        data_dir: Path,
        *,
        router: MessageRouter | None = None,
        is_leader: Callable[[], bool] = lambda: False,
        up_peers: Callable[[], Iterable[str]] = lambda: (),
        partitions: int = DEFAULT_PARTITIONS,
        op_timeout: float = 5.0,
        ack_timeout: float = 2.0,
        sync_timeout: float = 5.0,
        down_grace: float = 0.5,
        drop_after: float = 10.0,
        tombstone_ms: int = 3_600_000,
        housekeeping_interval: float = 1.0,
        now: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        logger: logging.Logger | None = None,
    ) -> None:
        self.node_id = node_id
        self.kv = kv
        self.sender = sender
        self.data_dir = Path(data_dir)
        self.is_leader = is_leader
        self.up_peers = up_peers
        self.partitions = partitions
        self.op_timeout = op_timeout
        self.ack_timeout = ack_timeout
        self.sync_timeout = sync_timeout
        self.down_grace = down_grace
        self.drop_after = drop_after
        self.tombstone_ms = tombstone_ms
        self.housekeeping_interval = housekeeping_interval
        self.now = now
        self.wall_ms = wall_ms
        self.log = logger or logging.getLogger(f"aether.maps.{node_id}")

        self.specs: dict[str, MapSpec] = {}
        self.engines: dict[str, Engine] = {}
        self.table: PartitionTable | None = None
        self.table_changed_at = 0.0
        self.fence = [0] * partitions
        self.epoch = [0] * partitions  # table version at which this node became primary (0: not primary)
        self.seq = [0] * partitions
        self._ready: dict[int, asyncio.Event] = {}  # partitions being promoted
        self._table_event = asyncio.Event()
        self._spec_event = asyncio.Event()

        self.up: set[str] = set()
        self._down_since: dict[str, float] = {}
        self._up_events: dict[str, asyncio.Event] = {}
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._chunks: dict[int, tuple[asyncio.Queue[SyncChunk | None], str]] = {}
        self._acks: dict[int, tuple[_AckWait, str, float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: list[Callable[[], None]] = []
        self._replan_handle: asyncio.Handle | None = None
        self._replan_due = 0.0
        self._housekeeper: asyncio.Task[None] | None = None
        self._purge_cursor = 0
        self._closed = False
        self.router = router

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.up.update(p for p in self.up_peers() if p != self.node_id)  # links up before we subscribed
        for key, spec in self.kv.list_local(MapDefKey.prefix):
            if isinstance(spec, MapSpec):
                self._define(key[len(MapDefKey.prefix) :], spec)
        self._unsubscribe.append(self.kv.watch(MapDefKey.prefix, self._on_def_event))
        self._unsubscribe.append(self.kv.watch(str(MapTableKey()), self._on_table_event))
        table = self.kv.get_local(MapTableKey())
        if isinstance(table, PartitionTable):
            self._set_table(table)
        if self.router is not None:
            self._unsubscribe.append(self.router.subscribe(PeerUp, lambda ev: self.peer_up(ev.node_id)))
            self._unsubscribe.append(self.router.subscribe(PeerDown, lambda ev: self.peer_down(ev.node_id)))
        self._housekeeper = asyncio.create_task(self._housekeeping())
        self.replan()

    async def stop(self) -> None:
        self._closed = True
        for cancel in self._unsubscribe:
            cancel()
        self._unsubscribe.clear()
        if self._replan_handle is not None:
            self._replan_handle.cancel()
        tasks = list(self._tasks) + ([self._housekeeper] if self._housekeeper else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fut, _ in self._calls.values():
            if not fut.done():
                fut.set_exception(_PeerGone("node stopping"))
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("map task failed", exc_info=task.exception())

    # --- definitions and the table --------------------------------------------------------------

    def _define(self, name: str, spec: MapSpec) -> None:
        old = self.specs.get(name)
        self.specs[name] = spec
        if name not in self.engines or (old is not None and old.engine != spec.engine):
            if name in self.engines:
                self.engines.pop(name).close()
            self.engines[name] = open_engine(spec.engine, self.data_dir, name)
            if self.table is not None:
                self._pull_new_replicas(None, self.table, only=name)
        self._spec_event.set()
        self._spec_event = asyncio.Event()

    def _on_def_event(self, ev: Any) -> None:
        if ev.kind == "reset":
            current = {k[len(MapDefKey.prefix) :]: v for k, v in self.kv.list_local(MapDefKey.prefix)}
            for name in list(self.specs):
                if name not in current:
                    self._undefine(name)
            for name, spec in current.items():
                if isinstance(spec, MapSpec):
                    self._define(name, spec)
            return
        name = ev.key[len(MapDefKey.prefix) :]
        if ev.kind == "put":
            try:
                spec = msgspec.msgpack.decode(ev.value, type=MapSpec)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.log.warning("ignoring malformed map definition %s: %s", ev.key, e)
                return
            self._define(name, spec)
        elif ev.kind == "remove":
            self._undefine(name)

    def _undefine(self, name: str) -> None:
        self.specs.pop(name, None)
        engine = self.engines.pop(name, None)
        if engine is not None:
            for p in engine.partitions():
                engine.drop(p)
            engine.close()
            path = self.data_dir / f"{name}.sqlite"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    def _on_table_event(self, ev: Any) -> None:
        if ev.kind == "reset":
            table = self.kv.get_local(MapTableKey())
            if isinstance(table, PartitionTable):
                self.table = None  # a reset may have skipped versions: re-promote everything
                self._set_table(table)
        elif ev.kind == "put":
            try:
                table = msgspec.msgpack.decode(ev.value, type=PartitionTable)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.log.error("ignoring malformed partition table: %s", e)
                return
            self._set_table(table)
        else:
            return
        # A leader checks the table it now sees against the live members: one that planned from a
        # stale local table (a restarted leader before it caught up) found nothing to change and
        # would otherwise leave the newer table, written meanwhile by another leader, in place.
        self.replan()

    def _set_table(self, new: PartitionTable) -> None:
        old = self.table
        if old is not None and new.version <= old.version:
            return
        if new.partitions != self.partitions:
            self.log.error(
                "partition table has %d partitions, this node is configured for %d; ignoring it",
                new.partitions, self.partitions,
            )
            return
        self.table = new
        self.table_changed_at = self.now()
        promote: list[int] = []
        for p in range(new.partitions):
            if new.primary(p) == self.node_id:
                if old is None or old.primary(p) != self.node_id or self.epoch[p] == 0:
                    self.epoch[p] = new.version
                    self.seq[p] = 0
                    if p not in self._ready:
                        self._ready[p] = asyncio.Event()
                    promote.append(p)
            else:
                self.epoch[p] = 0
                ev = self._ready.pop(p, None)
                if ev is not None:
                    ev.set()  # waiters re-check and find they must go elsewhere
        self.log.info(
            "partition table v%d: %d members, primary of %d partitions (%d to promote)",
            new.version, len(new.members), sum(1 for p in range(new.partitions) if self.epoch[p]),
            len(promote),
        )
        if promote:
            self._spawn(self._promote(new.version, promote))
        self._pull_new_replicas(old, new)
        self._table_event.set()
        self._table_event = asyncio.Event()

    def _pull_new_replicas(
        self, old: PartitionTable | None, new: PartitionTable, only: str | None = None
    ) -> None:
        """Start pulling the partitions this node became a replica of, from their primaries."""
        for name, spec in self.specs.items():
            if only is not None and name != only:
                continue
            by_primary: dict[str, list[int]] = {}
            for p in range(new.partitions):
                owners = owners_for(new, p, spec.replicas)
                if self.node_id not in owners[1:]:
                    continue
                if old is not None and self.node_id in owners_for(old, p, spec.replicas):
                    continue
                by_primary.setdefault(owners[0], []).append(p)
            for primary, parts in by_primary.items():
                self._spawn(self._pull(primary, name, parts))

    async def _pull(self, primary: str, name: str, parts: list[int]) -> None:
        """Copy `parts` of map `name` from their primary; on failure retry with the then current
        primaries of the partitions this node still replicates."""
        for attempt in range(20):
            try:
                n = await self._sync_from(primary, name, parts, fence=0)
                self.log.debug(
                    "re-replicated %d records of %d partitions of %s from %s", n, len(parts), name, primary
                )
                return
            except (_PeerGone, TimeoutError) as e:
                self.log.info("re-replication of %s from %s incomplete (%s); retrying", name, primary, e)
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
            table, spec = self.table, self.specs.get(name)
            if table is None or spec is None:
                return
            still = [p for p in parts if self.node_id in owners_for(table, p, spec.replicas)[1:]]
            if not still:
                return
            by_primary: dict[str, list[int]] = {}
            for p in still:
                by_primary.setdefault(table.primary(p), []).append(p)
            (primary, parts), *rest = by_primary.items()
            for other, other_parts in rest:
                self._spawn(self._pull(other, name, other_parts))
        self.log.warning("gave up re-replicating %d partitions of %s", len(parts), name)

    async def _promote(self, version: int, parts: list[int]) -> None:
        """Collect `parts` from every live node before serving them as primary at `version`."""
        table = self.table
        assert table is not None
        # every member of the table was live when the leader wrote it: wait for links still coming up
        peers = [m for m in table.members if m != self.node_id]
        started = self.now()
        todo = [(name, peer) for name in list(self.specs) for peer in peers]
        merged = 0
        failed: list[tuple[str, str]] = []
        for _round in range(3):
            results = await asyncio.gather(
                *(self._sync_from(peer, name, parts, fence=version) for name, peer in todo),
                return_exceptions=True,
            )
            merged += sum(r for r in results if isinstance(r, int))
            failed = [job for job, r in zip(todo, results, strict=True) if isinstance(r, BaseException)]
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, _PeerGone | TimeoutError):
                    self.log.error("promotion sync failed", exc_info=r)
            # a peer that is still up and still a member may hold acknowledged writes: ask again;
            # one that went down is given up (the leader removes it from the table)
            current = self.table
            todo = [
                (name, peer) for name, peer in failed
                if peer in self.up and current is not None and peer in current.members
                and any(self.epoch[p] == version for p in parts)
            ]
            if not todo:
                break
            self.log.warning("promotion sync at v%d: asking %s again", version, sorted({p for _, p in todo}))
        ready_now = 0
        for p in parts:
            if self.epoch[p] == version:
                ev = self._ready.pop(p, None)
                if ev is not None:
                    ev.set()
                ready_now += 1
        self.log.info(
            "primary of %d partitions at v%d after syncing %d records from %d peers in %.0f ms%s",
            ready_now, version, merged, len(peers), (self.now() - started) * 1000,
            f" ({len(failed)} sync(s) incomplete)" if failed else "",
        )

    async def _sync_from(self, peer: str, name: str, parts: list[int], *, fence: int) -> int:
        rid = next(self._ids)
        queue: asyncio.Queue[SyncChunk | None] = asyncio.Queue()
        self._chunks[rid] = (queue, peer)
        merged = 0
        try:
            if not self.sender.send(peer, SyncRequest(rid, name, parts, fence)):
                await self._wait_up(peer, self.sync_timeout)
                if not self.sender.send(peer, SyncRequest(rid, name, parts, fence)):
                    raise _PeerGone(f"{peer} is not up")
            while True:
                async with asyncio.timeout(self.sync_timeout):
                    chunk = await queue.get()
                if chunk is None:
                    raise _PeerGone(f"{peer} went down during the sync")
                if chunk.error is not None:
                    raise _PeerGone(f"{peer}: {chunk.error}")
                engine = self.engines.get(name)
                if engine is not None:
                    for p, key, rec in chunk.items:
                        if newer(rec, engine.get(p, key)):
                            engine.put(p, key, rec)
                            merged += 1
                if chunk.done:
                    return merged
        finally:
            self._chunks.pop(rid, None)

    # --- membership and the leader's planning -----------------------------------------------------

    def peer_up(self, peer: str) -> None:
        self.up.add(peer)
        self._down_since.pop(peer, None)
        waiter = self._up_events.pop(peer, None)
        if waiter is not None:
            waiter.set()
        self.replan()

    async def _wait_up(self, peer: str, timeout: float) -> None:
        if peer in self.up:
            return
        ev = self._up_events.setdefault(peer, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await ev.wait()
        except TimeoutError:
            raise _PeerGone(f"{peer} did not come up within {timeout:g}s") from None

    def peer_down(self, peer: str) -> None:
        self.up.discard(peer)
        self._down_since[peer] = self.now()
        for fut, node in list(self._calls.values()):
            if node == peer and not fut.done():
                fut.set_exception(_PeerGone(f"{peer} went down"))
        for queue, node in list(self._chunks.values()):
            if node == peer:
                queue.put_nowait(None)
        for rid, (wait, node, _) in list(self._acks.items()):
            if node == peer:
                del self._acks[rid]
                wait.update(False)
        self.replan(delay=self.down_grace)

    def live_members(self) -> list[str]:
        now = self.now()
        gone = {n for n, t in self._down_since.items() if now - t >= self.down_grace}
        members = (self.up | {self.node_id} | set(self._down_since)) - gone
        return sorted(members)

    def replan(self, delay: float = 0.0) -> None:
        """(Leader) write a new table if the live members changed; after `delay` seconds."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._replan_handle is not None:
            if self._replan_due <= due:
                return  # an earlier run is already scheduled
            self._replan_handle.cancel()
        self._replan_due = due
        self._replan_handle = loop.call_later(delay, lambda: self._spawn(self._replan_now()))

    async def _replan_now(self) -> None:
        self._replan_handle = None
        if self._closed or not self.is_leader():
            return
        current = self.kv.get_local(MapTableKey())
        current = current if isinstance(current, PartitionTable) else None
        now = self.now()
        pending = [t + self.down_grace - now for t in self._down_since.values() if now - t < self.down_grace]
        if pending:  # a lost node's grace is not over yet (timers may fire a little early): look again
            self.replan(delay=min(pending) + 0.01)
        new = plan_table(current, self.live_members(), self.partitions)
        if new is None:
            return
        try:
            ok = await self.kv.compare_and_set(MapTableKey(), current, new)
        except Exception as e:  # no quorum, timeout: try again later
            self.log.warning("cannot write the partition table: %s", e)
            ok = False
        if ok:
            self.log.info("leader wrote partition table v%d for %s", new.version, ", ".join(new.members))
        else:
            self.replan(delay=0.2)

    # --- serving operations (primary) -------------------------------------------------------------

    def _spec(self, name: str) -> MapSpec:
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise UnknownMap(
                f"map {name!r} is not defined (defined maps: {known}); declare it in a blueprint "
                f"[maps.{name}] section or with `aether map create {name}`"
            )
        return spec

    async def execute(
        self, name: str, op: int, key: str, value: bytes | None, expected: bytes | None, ttl_ms: int
    ) -> tuple[bytes | None, bool]:
        """Run one operation as this partition's primary; raises `_NotPrimary` to redirect."""
        spec = self._spec(name)
        if value is not None and len(value) > spec.max_value_bytes:
            raise MapValueTooLarge(
                f"map {name!r} key {key!r}: value of {len(value)} bytes exceeds the map's limit of "
                f"{spec.max_value_bytes} bytes"
            )
        table = self.table
        if table is None:
            raise _NotPrimary("no partition table yet")
        p = partition_of(key, table.partitions)
        ready = self._ready.get(p)
        if ready is not None:
            async with asyncio.timeout(self.sync_timeout + 1.0):
                await ready.wait()
            table = self.table
            assert table is not None
        if table.primary(p) != self.node_id or self.epoch[p] == 0:
            raise _NotPrimary(f"{self.node_id} is not the primary of partition {p}")
        if self.epoch[p] < self.fence[p]:
            raise _NotPrimary(f"{self.node_id} was deposed as primary of partition {p}")
        engine = self.engines[name]
        out = evaluate(
            op, engine.get(p, key), value=value, expected=expected, ttl_ms=ttl_ms, now_ms=self.wall_ms(),
            epoch=self.epoch[p], seq=self.seq[p] + 1, tombstone_ms=self.tombstone_ms,
        )
        if out.write is None:
            return out.value, out.ok
        self.seq[p] += 1
        engine.put(p, key, out.write)
        owners = owners_for(table, p, spec.replicas)
        others = owners[1:]
        need = min(spec.write_quorum, len(owners)) - 1
        if others:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            wait = _AckWait(fut, need, len(others))
            now = self.now()
            for peer in others:
                rid = next(self._ids)
                if self.sender.send(peer, Replicate(rid, name, p, key, out.write)):
                    self._acks[rid] = (wait, peer, now)
                else:
                    wait.update(False)
            if need > 0:
                try:
                    async with asyncio.timeout(self.ack_timeout):
                        await fut
                except (TimeoutError, _PeerGone) as e:
                    raise MapUnavailable(
                        f"map {name!r} key {key!r}: {OP_NAMES[op]} got {wait.got} of {need} replica "
                        f"acknowledgement(s) ({e or 'timed out'}); the write may or may not persist"
                    ) from None
            elif not fut.done():
                fut.cancel()
        return out.value, out.ok

    # --- peer messages ------------------------------------------------------------------------------

    def dispatch(self, sender: str, msg: Any) -> None:
        """The transport callback for map messages."""
        if isinstance(msg, Replicate):
            self._on_replicate(sender, msg)
        elif isinstance(msg, ReplicateAck):
            entry = self._acks.pop(msg.id, None)
            if entry is not None:
                entry[0].update(msg.ok)
        elif isinstance(msg, MapRequest):
            self._spawn(self._serve_request(sender, msg))
        elif isinstance(msg, MapResponse | KeysResponse | StatsResponse):
            call = self._calls.get(msg.id)
            if call is not None and call[1] == sender and not call[0].done():
                call[0].set_result(msg)
        elif isinstance(msg, SyncRequest):
            self._spawn(self._serve_sync(sender, msg))
        elif isinstance(msg, SyncChunk):
            entry2 = self._chunks.get(msg.id)
            if entry2 is not None and entry2[1] == sender:
                entry2[0].put_nowait(msg)
        elif isinstance(msg, KeysRequest):
            try:
                keys = self.local_keys(msg.map, msg.prefix)
                self._answer(sender, KeysResponse(msg.id, keys))
            except UnknownMap as e:
                self._answer(sender, KeysResponse(msg.id, [], str(e)))
        elif isinstance(msg, StatsRequest):
            try:
                self._answer(sender, StatsResponse(msg.id, self.local_stats(msg.map)))
            except UnknownMap as e:
                self._answer(sender, StatsResponse(msg.id, None, str(e)))

    def _answer(self, peer: str, msg: object) -> None:
        """Send an answer; if our link to `peer` is not up yet (it reached us on its own link, which
        came up first), send it once the link is up, within `sync_timeout`."""
        if not self.sender.send(peer, msg):
            self._spawn(self._answer_later(peer, msg))

    async def _answer_later(self, peer: str, msg: object) -> None:
        try:
            await self._wait_up(peer, self.sync_timeout)
        except _PeerGone:
            return
        self.sender.send(peer, msg)

    def _on_replicate(self, sender: str, msg: Replicate) -> None:
        engine = self.engines.get(msg.map)
        if engine is None:
            self._spawn(self._replicate_later(sender, msg))
            return
        if msg.record.epoch < self.fence[msg.partition]:
            self._answer(sender, ReplicateAck(msg.id, False, "fenced: a newer primary took over"))
            return
        if newer(msg.record, engine.get(msg.partition, msg.key)):
            engine.put(msg.partition, msg.key, msg.record)
        self._answer(sender, ReplicateAck(msg.id, True))

    async def _replicate_later(self, sender: str, msg: Replicate) -> None:
        """The map's definition has not reached this node yet (it commits everywhere at once): wait."""
        try:
            async with asyncio.timeout(1.0):
                while msg.map not in self.engines:
                    await self._spec_event.wait()
        except TimeoutError:
            self._answer(sender, ReplicateAck(msg.id, False, f"unknown map {msg.map!r}"))
            return
        self._on_replicate(sender, msg)

    async def _serve_request(self, sender: str, req: MapRequest) -> None:
        try:
            value, ok = await self.execute(req.map, req.op, req.key, req.value, req.expected, req.ttl_ms)
            resp = MapResponse(req.id, value, ok)
        except (_NotPrimary, TimeoutError) as e:
            resp = MapResponse(req.id, None, False, str(e) or "not ready", KIND_NOT_PRIMARY)
        except UnknownMap as e:
            resp = MapResponse(req.id, None, False, str(e), KIND_UNKNOWN_MAP)
        except MapValueTooLarge as e:
            resp = MapResponse(req.id, None, False, str(e), KIND_BAD_REQUEST)
        except MapUnavailable as e:
            resp = MapResponse(req.id, None, False, str(e), KIND_UNAVAILABLE)
        except Exception as e:
            self.log.exception("map request %s on %s failed", OP_NAMES.get(req.op, req.op), req.map)
            resp = MapResponse(req.id, None, False, f"{type(e).__name__}: {e}", KIND_UNAVAILABLE)
        self._answer(sender, resp)

    async def _serve_sync(self, sender: str, req: SyncRequest) -> None:
        if req.fence:
            for p in req.partitions:
                if 0 <= p < self.partitions and self.fence[p] < req.fence:
                    self.fence[p] = req.fence
        else:  # a replica pulling from us as primary: answer once we have everything ourselves
            waits = [ev.wait() for p in req.partitions if (ev := self._ready.get(p)) is not None]
            if waits:
                try:
                    async with asyncio.timeout(self.sync_timeout + 1.0):
                        await asyncio.gather(*waits)
                except TimeoutError:
                    pass
        engine = self.engines.get(req.map)
        if engine is None:
            self._answer(sender, SyncChunk(req.id, [], True))
            return
        items: list[tuple[int, str, Record]] = []
        size = 0
        for p in req.partitions:
            for key, rec in engine.scan(p):
                items.append((p, key, rec))
                size += len(key) + (len(rec.value) if rec.value else 0) + 16
                if len(items) >= _SYNC_CHUNK_ITEMS or size >= _SYNC_CHUNK_BYTES:
                    if not self.sender.send(sender, SyncChunk(req.id, items, False)):
                        try:
                            await self._wait_up(sender, self.sync_timeout)
                        except _PeerGone:
                            return
                        if not self.sender.send(sender, SyncChunk(req.id, items, False)):
                            return
                    items, size = [], 0
                    await asyncio.sleep(0)  # let other work run between chunks
        self._answer(sender, SyncChunk(req.id, items, True))

    # --- local views ----------------------------------------------------------------------------------

    def local_keys(self, name: str, prefix: str) -> list[str]:
        """Live keys with `prefix` in the partitions this node is primary of."""
        self._spec(name)
        engine = self.engines[name]
        now = self.wall_ms()
        out: list[str] = []
        for p in engine.partitions():
            if self.epoch[p] == 0:
                continue
            out.extend(k for k, rec in engine.scan(p) if k.startswith(prefix) and is_live(rec, now))
        return out

    def local_stats(self, name: str) -> MapNodeStats:
        spec = self._spec(name)
        engine = self.engines[name]
        table = self.table
        primary = replica = 0
        if table is not None:
            for p in range(table.partitions):
                owners = owners_for(table, p, spec.replicas)
                if owners[0] == self.node_id:
                    primary += 1
                elif self.node_id in owners:
                    replica += 1
        now = self.now()
        pending = [t for (_, _, t) in self._acks.values()]
        return MapNodeStats(
            node=self.node_id, engine=spec.engine, entries=engine.entries, bytes=engine.bytes,
            primary_partitions=primary, replica_partitions=replica, syncing_partitions=len(self._ready),
            pending_acks=len(pending), oldest_pending_ms=int((now - min(pending)) * 1000) if pending else 0,
        )

    # --- housekeeping -----------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.housekeeping_interval)
            try:
                self.housekeep()
            except Exception:
                self.log.exception("map housekeeping failed")

    def housekeep(self) -> None:
        now = self.now()
        wall = self.wall_ms()
        # purge expired values and tombstones, 64 partitions per round
        step = 64
        parts = range(self._purge_cursor, min(self._purge_cursor + step, self.partitions))
        self._purge_cursor = 0 if parts.stop >= self.partitions else parts.stop
        for engine in self.engines.values():
            engine.purge(parts, wall)
        # drop partitions this node no longer owns
        table = self.table
        if table is not None and now - self.table_changed_at >= self.drop_after:
            for name, engine in self.engines.items():
                spec = self.specs[name]
                for p in engine.partitions():
                    if self.node_id not in owners_for(table, p, spec.replicas):
                        engine.drop(p)
        # acknowledgements that will never come
        limit = max(30.0, self.ack_timeout * 5)
        for rid, (wait, _peer, t) in list(self._acks.items()):
            if now - t > limit:
                del self._acks[rid]
                wait.update(False)

    # --- the MapBackend (any node) ----------------------------------------------------------------

    async def _call(self, peer: str, msg: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._calls[msg.id] = (fut, peer)
        try:
            if not self.sender.send(peer, msg):
                raise _PeerGone(f"{peer} is not up")
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise _PeerGone(f"{peer} did not answer within {timeout:g}s") from None
        finally:
            self._calls.pop(msg.id, None)

    async def _op(
        self, name: str, op: int, key: str, value: bytes | None = None, expected: bytes | None = None,
        ttl: float | None = None,
    ) -> tuple[bytes | None, bool]:
        check_key(name, key)
        self._spec(name)
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        deadline = self.now() + self.op_timeout
        ambiguous = False
        attempts = 0
        last = "no partition table yet"
        while True:
            attempts += 1
            table = self.table
            if table is not None:
                p = partition_of(key, table.partitions)
                primary = table.primary(p)
                try:
                    if primary == self.node_id:
                        result = await self.execute(name, op, key, value, expected, ttl_ms)
                    else:
                        remaining = max(0.05, deadline - self.now())
                        req = MapRequest(next(self._ids), op, name, key, value, expected, ttl_ms)
                        resp: MapResponse = await self._call(primary, req, remaining)
                        if resp.kind is None:
                            result = (resp.value, resp.ok)
                        elif resp.kind == KIND_NOT_PRIMARY:
                            raise _NotPrimary(f"{primary}: {resp.error}")
                        elif resp.kind == KIND_UNKNOWN_MAP:
                            raise UnknownMap(resp.error or f"unknown map {name!r}")
                        elif resp.kind == KIND_BAD_REQUEST:
                            raise MapValueTooLarge(resp.error or "bad request")
                        else:
                            raise MapUnavailable(resp.error or "unavailable")
                    if ambiguous and not result[1] and op == OP_CAS and result[0] == value:
                        return value, True  # our earlier attempt applied it before its answer was lost
                    return result
                except (_NotPrimary, TimeoutError) as e:
                    last = f"partition {p}: {e or 'primary not ready'}"
                except _PeerGone as e:
                    last = f"partition {p}: {e}"
                    ambiguous = ambiguous or op != OP_GET
            remaining = deadline - self.now()
            if remaining <= 0:
                raise MapUnavailable(
                    f"map {name!r} key {key!r}: {OP_NAMES[op]} failed after {attempts} attempt(s) in "
                    f"{self.op_timeout:g}s; last error: {last}"
                )
            # wait for a table change or a short backoff, whichever is first
            wait_table = self._table_event.wait()
            try:
                async with asyncio.timeout(min(remaining, 0.05 * min(attempts, 10))):
                    await wait_table
            except TimeoutError:
                pass

    def require_map(self, name: str) -> None:
        """Raise `UnknownMap` (saying how to define it) unless map `name` is defined."""
        self._spec(name)

    async def map_get(self, name: str, key: str) -> bytes | None:
        return (await self._op(name, OP_GET, key))[0]

    async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._op(name, OP_PUT, key, value, None, ttl)

    async def map_remove(self, name: str, key: str) -> bool:
        return (await self._op(name, OP_REMOVE, key))[1]

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, new: bytes | None, *, ttl: float | None = None
    ) -> bool:
        return (await self._op(name, OP_CAS, key, new, expected, ttl))[1]

    async def map_keys(self, name: str, prefix: str = "") -> list[str]:
        self._spec(name)
        keys = set(self.local_keys(name, prefix))
        members = self.table.members if self.table else []
        peers = [m for m in members if m != self.node_id and m in self.up]
        results = await asyncio.gather(
            *(self._call(p, KeysRequest(next(self._ids), name, prefix), self.op_timeout) for p in peers),
            return_exceptions=True,
        )
        for peer, r in zip(peers, results, strict=True):
            if isinstance(r, KeysResponse):
                if r.error is not None:
                    raise UnknownMap(r.error)
                keys.update(r.keys)
            elif isinstance(r, BaseException):
                raise MapUnavailable(f"map {name!r}: keys() could not reach {peer}: {r}")
        return sorted(keys)

    async def stats(self, name: str) -> list[MapNodeStats]:
        """Every live node's view of map `name` (this node first)."""
        out = [self.local_stats(name)]
        peers = sorted(m for m in self.up if m != self.node_id)
        results = await asyncio.gather(
            *(self._call(peer, StatsRequest(next(self._ids), name), 2.0) for peer in peers),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, StatsResponse) and r.stats is not None:
                out.append(r.stats)
        return out

    # --- definitions (management) -----------------------------------------------------------------

    async def define(self, name: str, spec: MapSpec) -> bool:
        """Create map `name` (True), or confirm an identical definition exists (False).

        Raises `MapDefinitionConflict` if it exists with other settings."""
        spec.validate(name)
        key = MapDefKey(name)
        for _ in range(_DEF_ROUNDS):
            current = self.kv.get_local(key)
            if current is None:
                if await self.kv.compare_and_set(key, None, spec):
                    return True
                continue  # written (or written and removed) meanwhile: our replica is current now
            if current == spec:
                return False
            raise MapDefinitionConflict(
                f"map {name!r} already exists with other settings ({_describe(current)}); "
                f"wanted {_describe(spec)}"
            )
        raise MapContention(f"map {name!r} kept changing while it was being defined; try again")

    async def undefine(self, name: str) -> bool:
        """Remove map `name`'s definition; False if there is none (read through consensus)."""
        key = MapDefKey(name)
        current = self.kv.get_local(key)
        if current is None:
            # maybe defined through another node a moment ago: a linearizable read decides
            current = await self.kv.get(key)
        for _ in range(_DEF_ROUNDS):
            if current is None:
                return False
            if await self.kv.compare_and_set(key, current, None):
                return True
            current = self.kv.get_local(key)  # changed meanwhile; our replica is current now
        raise MapContention(f"map {name!r} kept changing while it was being removed; try again")


def _describe(spec: object) -> str:
    if not isinstance(spec, MapSpec):
        return repr(spec)
    return f"replicas={spec.replicas} write_quorum={spec.write_quorum} engine={spec.engine}"
