"""`MapService`: the asyncio adapter around `MapCore`, and the node's `MapBackend` for slices.

Everything the map decides happens in `aether.maps.core.MapCore` (sans-IO). This adapter:

- feeds it the consensus store's map definitions (`maps/defs/`), partition table (`maps/table`)
  and storage health (`maps/health/`) through watches; peer up/down events; map messages from the
  transport; the leader role and the quorum signal of this node; a tick every `tick_interval`;
- carries out its actions: sends messages, resolves the futures of callers' operations, writes
  the partition table (leader) and this node's storage health with compare-and-set/put;
- commits the storage engines (group commit): what the core stored in one event-loop turn is
  committed in one transaction per map at the end of the turn, and only then are the turn's
  actions carried out, so no write is acknowledged (to a caller, or to a primary by a replica)
  before it is durable. A failed commit fails every acknowledgement of the turn (`_unacknowledged`)
  and tells the core (`MapCore.storage_failed`);
- opens and deletes storage engines (I/O), and answers the scatter calls `keys()` and `stats()`;
- defines and removes maps (compare-and-set on the definition in the consensus store).

Tracing: with a tracer enabled, each operation a slice (or the node) makes is a span of kind client
(``map.get NAME`` ...) in the trace of the call being served (`aether.core.tracing.current_trace`);
it covers the hops to the partition's primary. The request to the primary carries the trace
context (`MapRequest.traceparent`); a primary that traces records a span of kind server
(``map.serve get NAME``) from the request to its answer.

Clocks: `now` (monotonic seconds) and `wall_ms` (wall-clock milliseconds, for TTLs) are
injectable; the seeded simulation passes its virtual clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from aether.core.calls import NoAnswer, PendingCalls, RetryPolicy
from aether.core.files import make_private_dirs, replace_private
from aether.core.maps import (
    MapContention,
    MapDefinitionConflict,
    MapSpec,
    MapUnavailable,
    PartitionTable,
    check_key,
)
from aether.core.tracing import (
    NOOP_TRACER,
    Span,
    TraceContext,
    Tracer,
    current_trace,
    parse_traceparent,
    trace_fields,
)
from aether.kv.keys import MapDefKey, MapHealthKey, MapTableKey
from aether.maps.core import (
    Activate,
    Answered,
    Fail,
    MapCore,
    MapTimings,
    Reply,
    Send,
    StorageHealth,
    WriteTable,
)
from aether.maps.messages import (
    KIND_NOT_PRIMARY,
    KeysRequest,
    KeysResponse,
    MapNodeStats,
    MapRequest,
    MapResponse,
    PushAck,
    ReadCheckAck,
    Replicate,
    ReplicateAck,
    StatsRequest,
    StatsResponse,
    SyncChunk,
)
from aether.maps.partitioning import DEFAULT_PARTITIONS, activate
from aether.maps.records import OP_CAS, OP_GET, OP_NAMES, OP_PUT, OP_REMOVE
from aether.maps.storage import (
    MapStorage,
    StorageDamaged,
    UnopenedStorage,
    definition_file,
    open_storage_engine,
    storage_files,
)
from aether.transport import EventBus, PeerDown, PeerUp

__all__ = ["MapService", "keys_gap"]

_OP_CODES = {name: code for code, name in OP_NAMES.items()}
"""`MapOpStarter` operation names (the core's `OP_NAMES`) -> the core's codes."""

# writes of this node's own records to the consensus store (activation, storage health): bounded
# rounds, paused with this policy's backoff
_STORE_RETRY = RetryPolicy(timeout=30.0, attempt_timeout=None, backoff_min=0.05, backoff_max=2.0)
_DEF_ROUNDS = 5  # compare-and-set rounds of define/undefine before giving up (MapContention)
_HOLD_FOR = 2.0  # how long an answer waits for our link to its requester to come up
_MAX_HELD = 10_000
_ANSWERS = (MapResponse, ReplicateAck, SyncChunk, PushAck, ReadCheckAck, KeysResponse, StatsResponse)
_MAX_SERVING = 4096  # spans of requests served here kept open at most (see _serve_span)
_ALIVE_FILE = "alive"
_BOOT_FILE = "boot"  # the machine's boot id when this node last ran (a different one: power cut possible)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None  # wall-clock ms of the last time this node had a quorum (tombstone horizon)


def _keys_request(i: int, *, name: str, prefix: str, after: str) -> KeysRequest:
    return KeysRequest(i, name, prefix, after)


class KVLike(Protocol):
    def get_local(self, key: Any) -> Any: ...

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...

    def created_local(self, key: Any) -> int: ...

    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]: ...

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool: ...

    async def get(self, key: Any, timeout: float = 5.0) -> Any: ...

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int: ...

    async def remove(self, key: Any, timeout: float = 5.0) -> bool: ...


class Sender(Protocol):
    def send(self, peer: str, msg: object) -> bool: ...


class MapService:
    def __init__(
        self,
        node_id: str,
        kv: KVLike,
        sender: Sender,
        data_dir: Path,
        *,
        bus: EventBus | None = None,
        is_leader: Callable[[], bool] = lambda: False,
        up_peers: Callable[[], Iterable[str]] = lambda: (),
        has_quorum: Callable[[], bool] = lambda: True,
        partitions: int = DEFAULT_PARTITIONS,
        timings: MapTimings | None = None,
        tick_interval: float = 0.05,
        now: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        incarnation: int | None = None,
        open_storage: Callable[[str, Path, str], MapStorage] = open_storage_engine,
        boot_id: Callable[[], str | None] = _boot_id,
        logger: logging.Logger | None = None,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        self.node_id = node_id
        self.tracer = tracer  # a span per operation when enabled (aether.core.tracing)
        self.kv = kv
        self.sender = sender
        self.data_dir = Path(data_dir)
        self.bus = bus
        self.is_leader = is_leader
        self.up_peers = up_peers
        self.has_quorum = has_quorum
        self.tick_interval = tick_interval
        self.now = now
        self.wall_ms = wall_ms
        self.open_storage = open_storage
        self.boot_id = boot_id
        # the machine restarted, or the node was away past the tombstone horizon, since the last run:
        # persisted copies count only where no owner has one that does (`_check_boot`, `_check_horizon`)
        self._distrust = False
        self._reopen_at: dict[str, float] = {}  # maps whose engine could not be opened: when to try again
        self._prepared = False
        # engines `prepare` opened off the loop: name -> (spec, definition identity, engine)
        self._preopened: dict[str, tuple[MapSpec, int, MapStorage]] = {}
        self.log = logger or logging.getLogger(f"aether.maps.{node_id}")
        self.core = MapCore(
            node_id, partitions=partitions, timings=timings, logger=self.log,
            incarnation=random.getrandbits(23) if incarnation is None else incarnation,
        )
        self.timings = self.core.t
        self._rng = random.Random(self.core.incarnation)  # backoff jitter (seeded in the simulation)
        # operations of local callers (answered by the core's Reply/Fail) and scatter calls to peers
        self._ops: PendingCalls[tuple[bytes | None, bool]] = PendingCalls()
        # Scatter call ids must not repeat across restarts (as the core's operation ids): a peer
        # holds its answers while its link to us is down, and would hand one meant for our previous
        # process to the call of this one with the same id.
        self._calls: PendingCalls[Any] = PendingCalls((self.core.incarnation & 0x7FFFFF) << 40 | 1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: list[Callable[[], None]] = []
        self._ticker: asyncio.Task[None] | None = None
        self._leader = False
        self._quorum = True
        self._closed = False
        self._health: str | None = None  # what this node last recorded under maps/health/
        self._health_wanted: str | None = None  # what it is to record there (the core's last StorageHealth)
        self._health_writer: asyncio.Task[None] | None = None  # the one task writing it
        self._alive_written = 0.0
        self._serving: dict[tuple[str, int], Span] = {}  # spans of traced requests being served here
        self._held: dict[str, list[tuple[float, object]]] = {}  # answers waiting for our link to a peer
        self._batch: list[Any] | None = None  # this turn's actions, carried out after its commit
        self._more_handle: asyncio.Handle | None = None  # the core's next batch of work (`MapCore.more`)
        self.commits = 0  # group commits (for tests and the benchmarks)

    # --- views used by the API, the CLI and tests -----------------------------------------------------------

    @property
    def table(self) -> PartitionTable | None:
        return self.core.table

    @property
    def specs(self) -> dict[str, MapSpec]:
        return self.core.specs

    @property
    def engines(self) -> dict[str, MapStorage]:
        return self.core.engines

    @property
    def partitions(self) -> int:
        return self.core.partitions

    @property
    def syncing(self) -> int:
        """Partitions this node is taking over as primary (not serving yet)."""
        return sum(1 for prim in self.core.prims.values() if not prim.ready)

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before the node's links are up: the start-up checks of the data directory, and the
        persistent engines of the maps this node's replica knows opened in a worker thread.
        Opening replays a log engine's file (0.3-0.5 s for 20,000 keys written a few times over):
        done on the event loop while the links were up, it kept the node from answering its peers'
        heartbeats right after a restart, they took it for down and the partition table changed
        twice. `start` uses the engines opened here (and opens, on the loop, what was not)."""
        if self._prepared:
            return
        self._prepared = True
        self._check_horizon()
        self._check_boot()
        for key, spec in self.kv.list_local(MapDefKey.prefix):
            if not isinstance(spec, MapSpec) or spec.engine == "memory":
                continue
            name = key[len(MapDefKey.prefix):]
            created = self._identity(name)
            try:
                engine = await asyncio.to_thread(self._open_engine, name, spec, created)
            except Exception:  # (`start` tries again on the loop, and says why)
                continue
            self._preopened[name] = (spec, created, engine)

    def _close_preopened(self) -> None:
        for _spec, _created, engine in self._preopened.values():
            with contextlib.suppress(Exception):
                engine.close()
        self._preopened.clear()

    async def start(self) -> None:
        if not self._prepared:  # (the node prepares first; a service started alone, as before)
            self._prepared = True
            self._check_horizon()
            self._check_boot()
        now = self.now()
        for p in self.up_peers():
            if p != self.node_id:
                self._run(self.core.peer_up(p, now))
        for key, spec in self.kv.list_local(MapDefKey.prefix):
            if isinstance(spec, MapSpec):
                self._define(key[len(MapDefKey.prefix):], spec)
        self._unsubscribe.append(self.kv.watch(MapDefKey.prefix, self._on_def_event))
        self._unsubscribe.append(self.kv.watch(str(MapTableKey()), self._on_table_event))
        self._unsubscribe.append(self.kv.watch(MapHealthKey.prefix, self._on_health_event))
        self._load_health()
        table = self.kv.get_local(MapTableKey())
        if isinstance(table, PartitionTable):
            self._run(self.core.set_table(table, self.now()))
        if self.bus is not None:
            self._unsubscribe.append(self.bus.subscribe(PeerUp, lambda ev: self.peer_up(ev.node_id)))
            self._unsubscribe.append(self.bus.subscribe(PeerDown, lambda ev: self.peer_down(ev.node_id)))
        if self.kv.get_local(MapHealthKey(self.node_id)) is not None and not self.core.broken:
            self._want_health(None)  # recorded by an earlier incarnation
        self._close_preopened()  # (of maps whose definition changed since)
        self._ticker = asyncio.create_task(self._ticking())
        self.replan()

    async def stop(self) -> None:
        self._closed = True
        for cancel in self._unsubscribe:
            cancel()
        self._unsubscribe.clear()
        tasks = list(self._tasks) + ([self._ticker] if self._ticker else [])
        for t in tasks:
            t.cancel()
        if self._more_handle is not None:
            self._more_handle.cancel()
            self._more_handle = None
        await asyncio.gather(*tasks, return_exceptions=True)
        self._commit()
        self._close_preopened()
        for calls in (self._ops, self._calls):
            calls.fail_all(lambda: MapUnavailable(f"node {self.node_id} is stopping"))
        for engine in self.core.engines.values():
            engine.close()
        self.core.engines.clear()

    def _spawn(self, coro: Any) -> asyncio.Task[Any] | None:
        if self._closed:  # stopping: its tasks are cancelled, none may start now and outlive it
            coro.close()
            return None
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("map task failed", exc_info=task.exception())

    async def _ticking(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.tick_interval)
            try:
                self._tick()
            except Exception:
                self.log.exception("map tick failed")

    def _tick(self) -> None:
        now, wall = self.now(), self.wall_ms()
        leader = self.is_leader()
        if leader != self._leader:
            self._leader = leader
            self._run(self.core.set_leader(leader, now))
        quorum = self.has_quorum()
        if quorum != self._quorum:
            self._quorum = quorum
            self._run(self.core.set_quorum(quorum, now, wall))
        if quorum and now - self._alive_written >= 10.0:
            self._alive_written = now
            self._write_alive(wall)
        if self._held:
            for peer in [p for p, held in self._held.items() if now - held[-1][0] > _HOLD_FOR]:
                del self._held[peer]
        if self._reopen_at:
            self._reopen(now)
        self._run(self.core.tick(now, wall))

    # --- the tombstone horizon across restarts --------------------------------------------------------------

    def _check_horizon(self) -> None:
        """A node that was down longer than the tombstone horizon keeps its persistent copies but
        does not count them (as after a power cut, `_check_boot`): keys removed meanwhile, their
        tombstones purged by the nodes that ran, must not come back from them, so the other owners'
        copies that count decide. When no owner has one (the whole cluster was down that long: it
        missed no removal), a takeover takes the union of the copies (`MapCore._synced`). It
        deleted its files: a whole cluster down past the horizon lost every persistent map."""
        path = self.data_dir / _ALIVE_FILE
        try:
            last = int(path.read_text().strip())
        except (OSError, ValueError):
            return
        gone_ms = self.wall_ms() - last
        if gone_ms >= self.timings.tombstone_ms:
            self._distrust = True
            self.log.warning(
                "this node was away for %.0f s, longer than the tombstone horizon (%.0f s): its map "
                "copies count only if no other owner has one that does",
                gone_ms / 1000, self.timings.tombstone_ms / 1000,
            )

    def _check_boot(self) -> None:
        """A persistent copy counts towards a takeover only if it holds every write this node
        acknowledged. SQLite (``synchronous=NORMAL``) keeps them across a crash of the process but
        not across a power cut: after the machine restarted, the copies stay but count for nothing
        until a takeover gives them again."""
        current = self.boot_id()
        if current is None:
            return
        path = self.data_dir / _BOOT_FILE
        try:
            last = path.read_text().strip()
        except OSError:
            last = None
        if last is not None and last != current:
            self._distrust = True
            self.log.warning(
                "the machine restarted since this node ran: its map copies count only if no other owner "
                "has one that does"
            )
        try:
            make_private_dirs(self.data_dir)
            replace_private(path, f"{current}\n".encode())
        except OSError as e:
            self.log.warning("cannot record the boot id: %s", e)

    def _write_alive(self, wall: int) -> None:
        try:
            make_private_dirs(self.data_dir)
            replace_private(self.data_dir / _ALIVE_FILE, f"{wall}\n".encode())
        except OSError as e:
            self.log.warning("cannot record the map liveness time: %s", e)

    # --- actions --------------------------------------------------------------------------------------------

    def _run(self, actions: list[Any]) -> None:
        """Carry out the core's `actions`; if the core stored something not committed yet, at the
        end of this loop turn, after the commit (and so do all actions until then, in order).
        Work the core does in batches (`MapCore.busy`) goes on in the next loop turn."""
        if self._batch is not None:
            self._batch.extend(actions)
        elif not any(engine.pending for engine in self.core.engines.values()):
            self._carry_out(actions)
        else:
            self._batch = list(actions)
            try:
                asyncio.get_running_loop().call_soon(self._commit)
            except RuntimeError:  # no loop running (a synchronous caller): commit now
                self._commit()
        if self._more_handle is None and self.core.busy and not self._closed:
            try:
                self._more_handle = asyncio.get_running_loop().call_soon(self._more)
            except RuntimeError:  # (no loop: the next call with one goes on)
                pass

    def _more(self) -> None:
        """The core's next batch of work: one per loop turn, so that heartbeats, other messages
        and timers are served in between (a big takeover's steps kept the loop for 0.1-0.8 s)."""
        self._more_handle = None
        if self._closed:
            return
        try:
            self._run(self.core.more(self.now(), self.wall_ms()))
        except Exception:
            self.log.exception("map work failed")

    def _commit(self) -> None:
        """Commit every engine with pending writes, then carry out the actions that waited."""
        actions, self._batch = self._batch, None
        if actions is None:
            return
        failed: list[tuple[str, BaseException]] = []
        for name, engine in list(self.core.engines.items()):
            if engine.pending:
                try:
                    engine.commit()
                except Exception as e:  # sqlite3 errors, OSError...: the turn's writes are undone
                    failed.append((name, e))
        self.commits += 1
        if failed:
            names = {name for name, _ in failed}
            why = f"{self.node_id}: committing map writes failed ({failed[0][1]})"
            # an activation waits for the held configurations committed in its turn: not recorded
            # in the table when they did not commit (the core hears it was not, as for a table
            # that moved on)
            refused = [a for a in actions if isinstance(a, Activate)]
            actions = [
                _unacknowledged(a, why) for a in actions
                if not (isinstance(a, Send) and isinstance(a.msg, Replicate) and a.msg.map in names)
                and not isinstance(a, Activate)
            ]
            for name, error in failed:
                actions += self.core.storage_failed(name, error, self.now())
            for a in refused:
                actions += self.core.activated(a.version, a.partitions, False, self.now())
        self._carry_out(actions)

    def _carry_out(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                if self._serving and isinstance(a.msg, MapResponse):
                    span = self._serving.pop((a.peer, a.msg.id), None)
                    if span is not None:
                        if a.msg.error is not None:
                            span.set_error(a.msg.kind or "error", a.msg.error)
                        span.end()
                if not self.sender.send(a.peer, a.msg) and isinstance(a.msg, _ANSWERS):
                    # the request came on the peer's link while ours to it is not up yet: answer
                    # once it is (requests themselves are sent again by the core)
                    held = self._held.setdefault(a.peer, [])
                    if len(held) < _MAX_HELD:
                        held.append((self.now(), a.msg))
            elif isinstance(a, Reply):
                self._ops.resolve(a.op, None, (a.value, a.ok))
            elif isinstance(a, Fail):
                self._ops.fail(a.op, a.error)
            elif isinstance(a, WriteTable):
                self._spawn(self._write_table(a.expected, a.new))
            elif isinstance(a, Activate):
                self._spawn(self._activate(a.version, a.partitions, a.forced))
            elif isinstance(a, StorageHealth):
                self._want_health(a.reason)
            elif isinstance(a, Answered):  # the caller's node answered it: no response to send
                span = self._serving.pop((a.peer, a.id), None) if self._serving else None
                if span is not None:
                    span.end()

    async def _write_table(self, expected: PartitionTable | None, new: PartitionTable) -> None:
        try:
            ok = await self.kv.compare_and_set(MapTableKey(), expected, new)
        except Exception as e:  # no quorum, timeout: planned again
            self.log.warning("cannot write the partition table: %s", e)
            ok = False
        if ok:
            self.log.info("leader wrote partition table v%d for %s", new.version, ", ".join(new.members))
        self._run(self.core.table_written(ok, self.now()))

    async def _activate(self, version: int, parts: list[int], forced: tuple[int, ...] = ()) -> None:
        """Record `version` as the active configuration of `parts` (and as the last forced takeover
        of `forced`: `PartitionTable.forced`), unless the table moved on."""
        ok = False
        for attempt in range(20):
            current = self.kv.get_local(MapTableKey())
            if not isinstance(current, PartitionTable) or current.version != version:
                break
            try:
                if await self.kv.compare_and_set(MapTableKey(), current, activate(current, parts, forced)):
                    ok = True
                    break
            except Exception as e:  # no quorum or a timeout: the outcome is unknown, so ask again
                self.log.info("cannot record taking over %d partitions at v%d: %s", len(parts), version, e)
                await asyncio.sleep(_STORE_RETRY.backoff(attempt, self._rng))
                continue
            # another primary recorded its partitions meanwhile: read the table again, soon
            await asyncio.sleep(_STORE_RETRY.backoff(attempt, self._rng) / 5)
        self._run(self.core.activated(version, parts, ok, self.now()))

    def _want_health(self, reason: str | None) -> None:
        """Record `reason` under maps/health/ (None: remove the record). One task writes it, always
        the latest wanted: a write retried after a newer one (each with its own task, a record of a
        failure, backing off longer, landed after the removal that followed it) would undo it."""
        self._health_wanted = reason
        if self._health_writer is None:
            self._health_writer = self._spawn(self._record_health())

    async def _record_health(self) -> None:
        """Write `_health_wanted` until it is written, however long the store has no quorum (the
        leader plans with the record: given up, it stayed wrong until the node restarted)."""
        try:
            attempt = 0
            while True:
                reason = self._health_wanted
                try:
                    if reason is None:
                        await self.kv.remove(MapHealthKey(self.node_id))
                    else:
                        await self.kv.put(MapHealthKey(self.node_id), reason)
                except Exception as e:
                    if attempt % 10 == 0:
                        self.log.warning("cannot record this node's map storage health (tried %d times): %s",
                                         attempt + 1, e)
                    attempt += 1
                    await asyncio.sleep(_STORE_RETRY.backoff(attempt, self._rng))
                    continue
                self._health = reason
                if self._health_wanted == reason:
                    return
                attempt = 0  # it changed meanwhile: record the latest
        finally:
            self._health_writer = None

    # --- consensus store events -----------------------------------------------------------------------------

    def _define(self, name: str, spec: MapSpec, *, new: bool = False) -> None:
        old = self.core.specs.get(name)
        created = self._identity(name)
        known = self.core.created.get(name, 0)
        replaced = old is not None and created != 0 and known != 0 and created != known
        if replaced:  # removed and created again while this node saw only a reset: the old map goes
            self.log.warning(
                "map %r was removed and created again (this node did not see it go): its copy here "
                "is dropped and its partitions taken over again from the other owners", name,
            )  # fmt: skip
            self._undefine(name)
            old = None
        engine: MapStorage | None = None
        pre = self._preopened.pop(name, None)
        if pre is not None and (pre[0].engine != spec.engine or pre[1] != created):
            with contextlib.suppress(Exception):
                pre[2].close()
            pre = None
        if name not in self.core.engines or (old is not None and old.engine != spec.engine):
            try:
                engine = pre[2] if pre is not None else self._open_engine(name, spec, created)
                pre = None
            except Exception as e:  # a full disk, a permission: broken here until it opens
                self.log.error(
                    "map %r: cannot open its %s storage (%s: %s): this node does not serve the map "
                    "and tries again every %g s", name, spec.engine, type(e).__name__, e,
                    self.timings.probe_after,
                )  # fmt: skip
                engine = UnopenedStorage(e)
                self._reopen_at[name] = self.now() + self.timings.probe_after
        if pre is not None:  # (not needed after all)
            with contextlib.suppress(Exception):
                pre[2].close()
        new = new and not replaced
        now = self.now()
        self._run(self.core.define(name, spec, engine, now, new=new, replaced=replaced, created=created))

    def _identity(self, name: str) -> int:
        """The identity of map `name`'s definition: the store revision that created it (0: unknown)."""
        return self.kv.created_local(MapDefKey(name))

    def _claim_files(self, name: str, created: int) -> None:
        """Make map `name`'s files those of its current definition (`created_local` of its key, in
        `NAME.def` beside them): files of a map of that name that was removed while this node did
        not see it go (down meanwhile) are deleted first, never opened for the new one. Files
        without that record (an earlier version wrote them), or a definition whose creation this
        node's store does not know, are taken as they are."""
        if not created:
            return
        marker = definition_file(self.data_dir, name)
        try:
            found = int(marker.read_text().strip())
        except FileNotFoundError:
            found = 0
        except (OSError, ValueError) as e:
            self.log.warning("map %r: %s unreadable (%s): its files are taken as they are", name, marker, e)
            found = 0
        if found == created:
            return
        if found:
            stale = [p for p in storage_files(self.data_dir, name) if p != marker and p.exists()]
            if stale:
                self.log.warning(
                    "map %r: its files here belong to a map of that name that was removed while this "
                    "node did not see it go: deleted (%s)", name, ", ".join(str(p) for p in stale),
                )  # fmt: skip
            for path in stale:
                path.unlink(missing_ok=True)
        make_private_dirs(self.data_dir)
        # synced: after a power cut an old record would have the new map's files taken for the
        # removed one's and deleted
        replace_private(marker, b"%d\n" % created, sync=True)

    def _open_engine(self, name: str, spec: MapSpec, created: int) -> MapStorage:
        if spec.engine != "memory":
            self._claim_files(name, created)
        try:
            engine = self.open_storage(spec.engine, self.data_dir, name)
        except StorageDamaged as e:
            aside = e.set_aside(f".damaged-{self.wall_ms()}")
            self.log.error(
                "map %r: %s; moved to %s: this node starts the map empty and gets its copies "
                "from the other owners", name, e, ", ".join(str(p) for p in aside),
            )
            engine = self.open_storage(spec.engine, self.data_dir, name)
        if self._distrust:
            try:
                for p in engine.held():
                    engine.set_held(p, set())
            except BaseException:
                engine.close()  # (its lock with it: trying again must be able to open it)
                raise
        return engine

    def _reopen(self, now: float) -> None:
        """Try again to open the engines that could not be opened (`UnopenedStorage`); one that
        opens replaces the stand-in, and the map's storage probe brings the map back."""
        for name, when in list(self._reopen_at.items()):
            engine, spec = self.core.engines.get(name), self.core.specs.get(name)
            if not isinstance(engine, UnopenedStorage) or spec is None:
                del self._reopen_at[name]
                continue
            if now < when:
                continue
            try:
                opened = self._open_engine(name, spec, self.core.created.get(name, 0))
            except Exception as e:
                self._reopen_at[name] = now + self.timings.probe_after
                why = f"{type(e).__name__}: {e}"
                self.log.warning("map %r: its storage still cannot be opened (%s)", name, why)
                continue
            del self._reopen_at[name]
            self.log.warning("map %r: its storage opened", name)
            self._run(self.core.define(name, spec, opened, now))

    def _undefine(self, name: str) -> None:
        engine, actions = self.core.undefine(name, self.now())
        self._run(actions)
        if engine is not None:
            try:
                for p in engine.partitions():
                    engine.drop(p)
                engine.close()
            except Exception as e:  # a full disk, an I/O error: the map goes all the same
                self.log.warning("map %r: removing its copies failed (%s: %s); deleting its files",
                                 name, type(e).__name__, e)
                with contextlib.suppress(Exception):
                    engine.close()
            for path in storage_files(self.data_dir, name):
                path.unlink(missing_ok=True)

    def _on_def_event(self, ev: Any) -> None:
        if ev.kind == "reset":
            current = {k[len(MapDefKey.prefix):]: v for k, v in self.kv.list_local(MapDefKey.prefix)}
            for name in list(self.core.specs):
                if name not in current:
                    self._undefine(name)
            for name, spec in current.items():
                if isinstance(spec, MapSpec):
                    self._define(name, spec, new=True)
            return
        name = ev.key[len(MapDefKey.prefix):]
        if ev.kind == "put":
            try:
                spec = msgspec.msgpack.decode(ev.value, type=MapSpec)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.log.warning("ignoring malformed map definition %s: %s", ev.key, e)
                return
            self._define(name, spec, new=True)
        elif ev.kind == "remove":
            self._undefine(name)

    def _on_table_event(self, ev: Any) -> None:
        if ev.kind == "reset":
            table = self.kv.get_local(MapTableKey())
            if isinstance(table, PartitionTable):
                self._run(self.core.set_table(table, self.now(), reset=True))
        elif ev.kind == "put":
            try:
                table = msgspec.msgpack.decode(ev.value, type=PartitionTable)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.log.error("ignoring malformed partition table: %s", e)
                return
            self._run(self.core.set_table(table, self.now()))

    def _load_health(self) -> None:
        nodes = [k[len(MapHealthKey.prefix):] for k, _ in self.kv.list_local(MapHealthKey.prefix)]
        self._run(self.core.set_excluded(nodes, self.now()))

    def _on_health_event(self, ev: Any) -> None:
        self._load_health()

    # --- membership -----------------------------------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        held = self._held.pop(peer, [])
        now = self.now()
        for t, msg in held:
            if now - t <= _HOLD_FOR:
                self.sender.send(peer, msg)
        self._run(self.core.peer_up(peer, now))

    def peer_down(self, peer: str) -> None:
        self._calls.fail_peer(peer, lambda: MapUnavailable(f"{peer} went down"))
        self._run(self.core.peer_down(peer, self.now()))

    def set_members(self, members: Iterable[str]) -> None:
        """The committed member set: partitions are planned onto members only."""
        if self._closed:
            return
        self._run(self.core.set_members(members, self.now()))

    def replan(self, delay: float = 0.0) -> None:
        """(Leader) check the table against the live members now (`delay` is kept for callers;
        the core checks on every tick anyway)."""
        if self._closed:
            return
        self._leader = self.is_leader()
        self._run(self.core.set_leader(self._leader, self.now()))

    def live_members(self) -> list[str]:
        return self.core.live_members(self.now())

    def member_set(self) -> list[str]:
        """The cluster's member set as this node knows it (`set_members`), sorted; empty before the
        node said. The partition table holds only the live ones: a member down is out of it."""
        return sorted(self.core.members or ())

    # --- messages -------------------------------------------------------------------------------------------

    def dispatch(self, sender: str, msg: Any) -> None:
        """The transport callback for map messages (ignored once stopped: the node stops its
        transport after its maps, and the engines are closed)."""
        if self._closed:
            return
        if isinstance(msg, KeysResponse | StatsResponse):
            self._calls.resolve(msg.id, sender, msg)
            return
        if isinstance(msg, MapRequest) and msg.traceparent and self.tracer.enabled:
            self._serve_span(sender, msg)
        self._run(self.core.receive(sender, msg, self.now(), self.wall_ms()))

    def _serve_span(self, sender: str, msg: MapRequest) -> None:
        """Start the span of a traced request from `sender`; ended by its `MapResponse` (`_run`)."""
        parent = parse_traceparent(msg.traceparent, msg.tracestate)
        if parent is None:
            return
        if len(self._serving) >= _MAX_SERVING:  # requests the core dropped unanswered: end them
            for old in self._serving.values():
                old.end()
            self._serving.clear()
        verb = OP_NAMES.get(msg.op, str(msg.op))
        span = self.tracer.start_span(
            f"map.serve {verb} {msg.map}", parent, "server",
            {"aether.map": msg.map, "aether.map.operation": verb, "aether.peer.node": sender,
             "aether.node.id": self.node_id},
        )  # fmt: skip
        previous = self._serving.pop((sender, msg.id), None)  # a retry of the same request
        if previous is not None:
            previous.end()
        self._serving[(sender, msg.id)] = span

    # --- the MapBackend (any node) --------------------------------------------------------------------------

    async def _op(
        self, name: str, op: int, key: str, value: bytes | None = None, expected: bytes | None = None,
        ttl: float | None = None,
    ) -> tuple[bytes | None, bool]:
        check_key(name, key)
        await self._require(name)
        if self.tracer.enabled:
            return await self._traced_op(name, op, key, value, expected, ttl)
        return await self._submit(name, op, key, value, expected, ttl, current_trace.get())

    async def _traced_op(
        self, name: str, op: int, key: str, value: bytes | None, expected: bytes | None, ttl: float | None
    ) -> tuple[bytes | None, bool]:
        verb = OP_NAMES.get(op, str(op))
        span = self.tracer.start_span(
            f"map.{verb} {name}", current_trace.get(), "client",
            {"aether.map": name, "aether.map.operation": verb, "aether.node.id": self.node_id},
        )  # fmt: skip
        try:
            return await self._submit(name, op, key, value, expected, ttl, span.context)
        except BaseException as exc:
            span.record_error(exc)
            raise
        finally:
            span.end()

    async def _submit(
        self, name: str, op: int, key: str, value: bytes | None, expected: bytes | None, ttl: float | None,
        trace: TraceContext | None = None,
    ) -> tuple[bytes | None, bool]:
        op_id, _ = self._start(name, op, key, value, expected, ttl, trace)
        return await self._ops.wait(op_id)

    def _start(
        self, name: str, op: int, key: str, value: bytes | None, expected: bytes | None, ttl: float | None,
        trace: TraceContext | None,
    ) -> tuple[int, asyncio.Future[tuple[bytes | None, bool]]]:
        self._check_open()
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        op_id, fut = self._ops.open(None)  # the core retries, fails over and keeps the deadline
        try:
            now, wall = self.now(), self.wall_ms()
            tf = trace_fields(trace)
            self._run(self.core.submit(op_id, name, op, key, value, expected, ttl_ms, now, wall, tf))
        except BaseException:
            self._ops.discard(op_id)
            raise
        return op_id, fut

    def _check_open(self) -> None:
        """Raise `MapUnavailable` once stopped: nothing would answer (no ticks, engines closed)."""
        if self._closed:
            raise MapUnavailable(f"node {self.node_id} is stopping")

    def start_op(
        self, name: str, op: str, key: str, value: bytes | None, expected: bytes | None,
        ttl: float | None, trace: TraceContext | None,
    ) -> asyncio.Future[tuple[bytes | None, bool]] | None:
        """`MapOpStarter.start_op` (the slices on threads call it on the node's loop): the operation
        `_op` runs, without its coroutines and task. None when it needs them: the tracer is on (the
        operation's span) or this node has not seen the map defined yet (`_require` asks consensus)."""
        if self.tracer.enabled or name not in self.core.specs:
            return None
        check_key(name, key)
        op_id, fut = self._start(name, _OP_CODES[op], key, value, expected, ttl, trace)
        fut.add_done_callback(functools.partial(self._forget_op, op_id))
        return fut

    def _forget_op(self, op_id: int, _fut: asyncio.Future[Any]) -> None:
        self._ops.discard(op_id)  # as `PendingCalls.wait` does when it ends

    async def _require(self, name: str) -> None:
        """Raise `UnknownMap` unless map `name` is defined. A name this replica does not know yet is
        looked up through consensus first: a map just defined through another node is usable here at
        once (its definition may not have reached this replica when the call comes)."""
        if name in self.core.specs:
            return
        try:
            found = await self.kv.get(MapDefKey(name))
        except Exception:  # no quorum, a timeout: the local answer stands
            found = None
        if found is not None:
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.0  # the replica has it now; the watch hands it to the core
            while name not in self.core.specs and loop.time() < until:
                await asyncio.sleep(0.01)
        self.core.spec(name)

    def require_map(self, name: str) -> None:
        """Raise `UnknownMap` (saying how to define it) unless map `name` is defined."""
        self.core.spec(name)

    def map_owned_here(self, name: str, key: str) -> bool:
        """`SliceMap.owned_here`: whether this node is the primary of `key` now (`MapCore.primary_here`;
        reads only: the slice loops' threads call it)."""
        return self.core.primary_here(name, key)

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

    async def _call(self, peer: str, request: Callable[[int], Any], timeout: float) -> Any:
        rid, _ = self._calls.open(peer)
        if not self.sender.send(peer, request(rid)):
            self._calls.discard(rid)
            raise MapUnavailable(f"{peer} is not reachable")
        try:
            return await self._calls.wait(rid, timeout)
        except NoAnswer:
            raise MapUnavailable(f"{peer} did not answer within {timeout:g}s") from None

    async def map_keys(self, name: str, prefix: str = "") -> list[str]:
        """Every live key with `prefix`, asked from the primaries of all partitions. Raises
        `MapUnavailable` naming the partitions no reachable primary serves (never a partial list)."""
        await self._require(name)
        self._check_open()
        if not self.tracer.enabled:
            return await self._keys(name, prefix)
        span = self.tracer.start_span(
            f"map.keys {name}", current_trace.get(), "client",
            {"aether.map": name, "aether.map.operation": "keys", "aether.node.id": self.node_id},
        )  # fmt: skip
        try:
            return await self._keys(name, prefix)
        except BaseException as exc:
            span.record_error(exc)
            raise
        finally:
            span.end()

    async def _keys(self, name: str, prefix: str) -> list[str]:
        deadline = self.now() + self.timings.op_timeout
        while True:
            keys: set[str] = set()
            covered: set[int] = set()
            problems: dict[str, str] = {}
            try:
                local, parts = self.core.local_keys(name, prefix, self.wall_ms())
                keys.update(local)
                covered.update(parts)
            except MapUnavailable as e:
                problems[self.node_id] = str(e)
            table = self.core.table
            peers = sorted(m for m in (table.members if table else []) if m != self.node_id)
            results = await asyncio.gather(
                *(self._peer_keys(p, name, prefix) for p in peers), return_exceptions=True,
            )
            for peer, r in zip(peers, results, strict=True):
                if isinstance(r, BaseException):
                    problems[peer] = str(r)
                    continue
                got, served, error = r
                if error is not None:
                    problems[peer] = error
                keys.update(got)
                covered.update(served)
            missing = self.core.partitions - len(covered)
            if table is not None and missing == 0:
                return sorted(keys)
            if self.now() >= deadline:
                raise MapUnavailable(
                    f"map {name!r}: keys() could not list {missing} of {self.core.partitions} partitions; "
                    f"by primary: {keys_gap(table, self.core.partitions, covered, problems)}"
                )
            await asyncio.sleep(0.1)

    async def _peer_keys(self, peer: str, name: str, prefix: str) -> tuple[list[str], set[int], str | None]:
        """The keys with `prefix` that `peer` serves as primary, asked page by page (each answer
        within `MapTimings.piece_bytes`), the partitions every page covered (one that moved
        meanwhile does not count), and the error of an answer. A node of an earlier version
        answers the whole list at once."""
        keys: list[str] = []
        parts: set[int] | None = None
        after = ""
        while True:
            page = functools.partial(_keys_request, name=name, prefix=prefix, after=after)
            r = await self._call(peer, page, self.timings.attempt_timeout)
            if not isinstance(r, KeysResponse):
                raise MapUnavailable(f"unexpected answer {type(r).__name__}")
            if r.error is not None:
                return keys, set(), r.error
            keys.extend(r.keys)
            parts = set(r.partitions) if parts is None else parts & set(r.partitions)
            if not r.more or not r.keys:
                return keys, parts, None
            after = r.keys[-1]

    async def stats(self, name: str) -> list[MapNodeStats]:
        """Every live node's view of map `name` (this node first)."""
        out = [self.core.local_stats(name, self.now())]
        peers = sorted(m for m in self.core.up if m != self.node_id)
        results = await asyncio.gather(
            *(self._call(peer, lambda i: StatsRequest(i, name), 2.0) for peer in peers),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, StatsResponse) and r.stats is not None:
                out.append(r.stats)
        return out

    # --- definitions (management) ---------------------------------------------------------------------------

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


def _unacknowledged(action: Any, why: str) -> Any:
    """`action` without the acknowledgement it carries (its turn's commit failed): a local
    caller's result becomes `MapUnavailable`, a remote caller's answer a refusal it retries
    elsewhere, a replica's acknowledgement of a write or a push a refusal (resent later)."""
    if isinstance(action, Reply):
        return Fail(action.op, MapUnavailable(why))
    if isinstance(action, Send):
        msg = action.msg
        if isinstance(msg, MapResponse) and msg.error is None:
            return Send(action.peer, MapResponse(msg.id, None, False, why, KIND_NOT_PRIMARY))
        if isinstance(msg, ReplicateAck) and msg.ok:
            return Send(action.peer, ReplicateAck(msg.id, False, why))
        if isinstance(msg, PushAck) and msg.ok:
            # (a piece's refusal still names its stream and the piece expected: without them the
            # primary takes it for the answer of a node of an earlier version)
            return Send(action.peer, msgspec.structs.replace(msg, ok=False, reason=why))
    return action


def keys_gap(
    table: PartitionTable | None, partitions: int, covered: set[int], problems: dict[str, str]
) -> str:
    """What a `keys()` round lacks, per primary (in `table`) of the partitions no answer covered:
    the node's error, or that it answered without serving them. It named the nodes with an error
    only, so a round where the reachable primaries were still taking their partitions over (or
    this node had no quorum) read 'could not reach the primaries of 1024 of 1024 partitions
    (node-3: node-3 went down)', node-3 being the primary of a third of them."""
    if table is None:
        return "no partition table yet"
    counts: dict[str, int] = {}
    for p in range(partitions):
        if p not in covered:
            node = table.primary(p)
            counts[node] = counts.get(node, 0) + 1
    out = [
        f"{node}, {n} partition(s): "
        + (problems.get(node) or "answered without serving them (taking them over, or no quorum)")
        for node, n in sorted(counts.items())
    ]
    out += [f"{node}: {why}" for node, why in sorted(problems.items()) if node not in counts]
    return "; ".join(out)


def _describe(spec: object) -> str:
    return spec.describe() if isinstance(spec, MapSpec) else repr(spec)

