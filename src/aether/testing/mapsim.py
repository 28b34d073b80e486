"""Seeded simulation of the distributed map: real `MapService`s (and their `MapCore`s) on one
`VirtualTimeLoop`, with a simulated network, consensus store and storage.

What runs unchanged: `MapService` (the asyncio adapter) and `MapCore` on every node, the storage
engines (`MemoryStorage`; a node's engine survives a kill when the profile makes it persistent,
as sqlite does; in the ``log`` profile the real `LogStorage` on each node's simulated file system,
`aether.testing.simfs`, reopened from it at every start), and every message encoded and decoded
with msgspec as the transport does.

What is simulated, from one `random.Random(seed)`:

- the network: one FIFO link per ordered pair of nodes, as a TCP connection is. Links go down
  (partitions of every shape: isolate one node, split into majority/minority, one-way cuts,
  flapping) and a link that goes down loses what was in flight on it; the nodes learn it after a
  detection delay (`peer_down`/`peer_up`, as the transport's heartbeats report). Messages are
  delayed (and, rarely, delivered twice).
- the consensus store: one linearizable authority. A node reaches it only while it can reach a
  majority (else its writes fail with a quorum error, and its `has_quorum` is False); each node
  sees the committed changes through its own watch, in commit order, after a delay (a node cut
  off sees them when it is back; sometimes as a `reset`).
- nodes: killed and restarted (a memory engine comes back empty, a persistent one with its data),
  storage that fails for a while (every write raises, as a full disk does), the leader among them;
  with the log engine also power cuts (the file falls back to what was fsynced plus a random,
  maybe torn, part of the rest, and the node restarts as on a rebooted machine: it distrusts its
  copies until a takeover gives them again); a power cut of every node at once (``blackout``,
  their disks having every write: no owner has a copy that counts, every takeover takes the union
  of the copies) while nodes stall and flap, so newer tables replace takeovers before they decide.

- maps removed and created again under the same name and settings (``recreate``) while a node
  is stalled, its watch then seeing both or only a reset: the new map is another register per key
  (an operation overlapping the re-creation is unchecked, a write of unknown outcome may have
  reached either map).

Clients run get/put/remove/compare-and-set on a few keys through random live nodes and record a
history (unique values per write). Checked at the end, after the world heals: the history is
linearizable per key (`aether.testing.lincheck`; an operation that failed with `MapUnavailable`
is indeterminate), a final read of every key through every node agrees, every owner of a
partition holds the same records as its primary (replicas converge), and no callback raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from aether.core.calls import RetryPolicy
from aether.core.errors import CommitTimeout, QuorumLost
from aether.core.maps import MapError, MapSpec, MapUnavailable
from aether.kv.keys import MapDefKey
from aether.maps.core import MapTimings
from aether.maps.logstorage import LogStorage
from aether.maps.messages import MapMessage
from aether.maps.partitioning import owners_for
from aether.maps.service import MapService
from aether.maps.storage import MemoryStorage
from aether.testing.lincheck import CheckResult, Op, check_history
from aether.testing.simfs import SimFileSystem
from aether.testing.vloop import SimDeadlock, VirtualTimeLoop

__all__ = ["MapWorld", "Outcome", "profile_names", "run_map_seed"]

MAP = "m"
MAP2 = "m2"
PARTITIONS = 16
# one decoder for every delivered message: `msgspec.msgpack.decode(data, type=MapMessage)` looks the
# Union's type information up again on each call (about 20 us, against 0.6 us with a Decoder), a
# third of a seed's CPU time (the other simulators decode with Decoders too)
_map_msg_decoder = msgspec.msgpack.Decoder(MapMessage)


class SimViolation(AssertionError):
    pass


@dataclass
class Profile:
    nodes: int = 3
    replicas: int = 3
    write_quorum: int = 2
    persistent: bool = False
    engine: str = "memory"  # or "log": the real LogStorage on a simulated file system (persistent)
    duration: float = 30.0
    clients: int = 4
    keys: int = 4
    kinds: dict[str, float] = field(default_factory=dict)
    fault_gap: tuple[float, float] = (1.0, 4.0)
    duplicate: float = 0.0
    stagger: float = 0.0  # nodes start one by one within this many seconds (a real cluster start)
    slow_store: float = 0.0  # chance that a store write takes up to 0.5 s, and half of those time out
    # after committing (the caller cannot know the outcome, as with a real consensus timeout)
    piece_bytes: int = 0  # `MapTimings.piece_bytes` (0: the default): small, pushes go in many pieces
    batch_records: int = 0  # `MapTimings.batch_records` (0: the default): small, a copy goes in many pushes
    batch_bytes: int = 0  # `MapTimings.batch_bytes` (0: the default): small, so are pushes of big records

    def describe(self) -> str:
        faults = ",".join(sorted(self.kinds)) or "none"
        engine = "log" if self.engine == "log" else "persistent" if self.persistent else "memory"
        pieces = f" piece_bytes={self.piece_bytes}" if self.piece_bytes else ""
        pieces += f" batch_records={self.batch_records}" if self.batch_records else ""
        pieces += f" batch_bytes={self.batch_bytes}" if self.batch_bytes else ""
        return f"nodes={self.nodes} R={self.replicas} W={self.write_quorum} {engine} faults={faults}{pieces}"


def _crash(rng: random.Random) -> Profile:
    return Profile(nodes=rng.choice([3, 5]), persistent=rng.random() < 0.5, kinds={"kill": 1.0, "flap": 1.0})


def _partitions(rng: random.Random) -> Profile:
    return Profile(nodes=rng.choice([3, 5]), kinds={"isolate": 1.0, "split": 1.0, "oneway": 0.5, "flap": 1.0},
                   duplicate=0.01)


def _disk(rng: random.Random) -> Profile:
    return Profile(nodes=rng.choice([3, 4]), persistent=True, kinds={"disk": 1.0, "kill": 0.5})


def _disks(rng: random.Random) -> Profile:
    """Every node's disk fills, one after the other (the table leaves each out in turn, until the
    last one owns every partition), and has room again in any order, the pauses sometimes longer
    than a takeover waits (`force_after`): nothing acknowledged may be lost. (Seen on real nodes:
    every acknowledged write of the persistent maps was.)"""
    return Profile(nodes=rng.choice([3, 4]), persistent=True, engine=rng.choice(["memory", "log"]),
                   duration=40.0, fault_gap=(1.0, 3.0), kinds={"disks": 1.0, "flap": 0.2})


def _mixed(rng: random.Random) -> Profile:
    return Profile(
        nodes=rng.choice([3, 4, 5]), persistent=rng.random() < 0.5, duplicate=0.01,
        kinds={"kill": 1.0, "isolate": 1.0, "split": 0.5, "flap": 1.0, "disk": 0.3, "add": 0.5},
    )


def _startup(rng: random.Random) -> Profile:
    """A cluster starting: nodes come up one by one while the first tables are written and
    taken over, the map is defined right after, and callers start at once."""
    return Profile(nodes=rng.choice([3, 4, 5]), persistent=rng.random() < 0.5, duration=10.0,
                   stagger=rng.uniform(0.02, 0.5), kinds={"flap": 0.3, "stall": 0.5}, slow_store=0.1)


def _restart(rng: random.Random) -> Profile:
    """The whole cluster stopped and started again on its data (`aether cluster stop` + `start`);
    new maps are defined right after each start."""
    return Profile(nodes=rng.choice([3, 4, 5]), persistent=True, fault_gap=(1.0, 3.0),
                   kinds={"restart": 1.0, "flap": 0.3, "stall": 0.5}, slow_store=0.1)


def _recreate(rng: random.Random) -> Profile:
    """Maps removed and created again under the same name with the same settings while a node is
    stalled (its watch then sees both, or only a reset, when it resumes), with kills and flaps: a
    node must never take the removed map's copy for the new map's."""
    return Profile(nodes=rng.choice([3, 4, 5]), fault_gap=(0.5, 2.5),
                   kinds={"recreate": 1.0, "kill": 0.4, "flap": 0.4, "stall": 0.3})


def _blackout(rng: random.Random) -> Profile:
    """A power cut of the whole cluster (every node restarts as on a rebooted machine, its disk
    having every write it acknowledged) and the nodes coming back one by one, again and again,
    with stalls and flaps: every takeover goes on from the union of the copies that do not count,
    some replaced by newer tables before they decide. (Not with kills: a node whose process stops
    while its takeover holds its own copy aside loses it, docs/maps.md, Limits.)"""
    return Profile(nodes=rng.choice([3, 4, 5]), persistent=True, fault_gap=(1.0, 3.0),
                   kinds={"blackout": 1.0, "flap": 0.5, "stall": 0.7}, slow_store=0.1)


def _log(rng: random.Random) -> Profile:
    """The log engine on each node's simulated disk: kills, power cuts, full disks (writes fail
    and, with the page cache full, partly), whole-cluster restarts; snapshots every few KiB."""
    return Profile(nodes=rng.choice([3, 4, 5]), persistent=True, engine="log", fault_gap=(1.0, 3.0),
                   kinds={"power": 1.0, "kill": 0.5, "disk": 0.5, "restart": 0.3, "flap": 0.5})


def _pieces(rng: random.Random) -> Profile:
    """Pushes, sync chunks and keys answers within a budget of a few hundred bytes, and a copy in
    pushes of a record or three, or of a few hundred bytes (`batch_bytes`): every copy a takeover
    or a returning replica gets travels in many pushes and pieces, under kills, cuts, duplicated
    messages, full disks and a joining node."""
    return Profile(
        nodes=rng.choice([3, 4, 5]), persistent=rng.random() < 0.5, duplicate=0.01, keys=8,
        piece_bytes=rng.choice([200, 400]), batch_records=rng.choice([1, 3, 50]),
        batch_bytes=rng.choice([150, 600]),
        kinds={"kill": 1.0, "isolate": 1.0, "split": 0.5, "flap": 1.0, "disk": 0.3, "add": 0.5},
    )


def _lag(rng: random.Random) -> Profile:
    """Nodes whose loops lag (a loaded machine): each stalls for longer than heartbeats allow, so
    the others see it go (the leader plans it out) and come back, again and again, for longer in
    all than a takeover waits for owners that left (`force_after`), each absence shorter than
    that, every step of its work slow (its copies answered a record or three at a time, each
    step 0.1-0.4 s); up to a minority of the nodes at once. Nothing acknowledged may be lost: an
    owner that only lagged has not left."""
    return Profile(nodes=rng.choice([3, 5, 5]), persistent=rng.random() < 0.5, duration=40.0,
                   batch_records=rng.choice([1, 3]), fault_gap=(0.5, 2.0), kinds={"lag": 1.0, "flap": 0.3})


_PROFILES: dict[str, Callable[[random.Random], Profile]] = {
    "crash": _crash, "partitions": _partitions, "disk": _disk, "disks": _disks, "mixed": _mixed,
    "startup": _startup, "restart": _restart, "log": _log, "recreate": _recreate, "pieces": _pieces,
    "blackout": _blackout, "lag": _lag,
}


def profile_names() -> list[str]:
    return sorted(_PROFILES)


# --- the consensus store ---------------------------------------------------------------------------


@dataclass
class _Event:
    kind: str
    key: str
    value: bytes | None


class SimStore:
    """A linearizable key-value authority; nodes see commits through `NodeKV` views."""

    def __init__(self, world: MapWorld) -> None:
        self.world = world
        self.data: dict[str, Any] = {}
        self.log: list[tuple[str, str, Any]] = []  # (kind, key, value) in commit order
        self.created: dict[str, int] = {}  # key -> the revision (log length) that created it

    def commit(self, kind: str, key: str, value: Any) -> None:
        self.log.append((kind, key, value))
        if kind == "put":
            if key not in self.data:
                self.created[key] = len(self.log)
            self.data[key] = value
        else:
            self.data.pop(key, None)
            self.created.pop(key, None)
        for view in self.world.views.values():
            view.notify()


class NodeKV:
    """One node's view of the store: a local copy that follows the commit log with a delay."""

    def __init__(self, world: MapWorld, node: str) -> None:
        self.world = world
        self.node = node
        self.local: dict[str, Any] = {}
        self.created: dict[str, int] = {}  # of the local copy's keys (`created_local`)
        self.applied = 0
        self.jump_next = False  # the next catch-up jumps to the current state (a reset), however near
        self.watches: list[tuple[str, Callable[[Any], None]]] = []
        self._scheduled = False

    # reads of the local copy
    def get_local(self, key: Any) -> Any:
        return self.local.get(str(key))

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.local.items() if k.startswith(prefix))

    def created_local(self, key: Any) -> int:
        return self.created.get(str(key), 0)

    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        entry = (prefix, callback)
        self.watches.append(entry)

        def cancel() -> None:
            with contextlib.suppress(ValueError):
                self.watches.remove(entry)
        return cancel

    def notify(self) -> None:
        if self._scheduled or not self.world.store_reachable(self.node):
            return
        self._scheduled = True
        w = self.world
        lag = w.nodes[self.node].slow * w.rng.uniform(5.0, 15.0)  # (a lagging node applies late too)
        w.loop.call_later(w.rng.uniform(0.001, 0.02) + lag, self._catch_up)

    def _catch_up(self) -> None:
        self._scheduled = False
        w = self.world
        if not w.nodes[self.node].running or not w.store_reachable(self.node):
            return
        if w.loop.time() < w.nodes[self.node].paused_until:
            self._scheduled = True
            w.loop.call_at(w.nodes[self.node].paused_until + 0.001, self._catch_up)
            return
        log = w.store.log
        if self.jump_next or (len(log) - self.applied > 3 and w.rng.random() < 0.3):
            self.jump_next = False
            # fell behind: jump to the current state and tell the watchers to re-read (a reset)
            self.local = dict(w.store.data)
            self.created = dict(w.store.created)
            self.applied = len(log)
            for prefix, cb in list(self.watches):
                w.guard(cb, _Reset(prefix))
            return
        while self.applied < len(log):
            kind, key, value = log[self.applied]
            self.applied += 1
            if kind == "put":
                if key not in self.local:
                    self.created[key] = self.applied
                self.local[key] = value
            else:
                self.local.pop(key, None)
                self.created.pop(key, None)
            data = msgspec.msgpack.encode(value) if kind == "put" else None
            for prefix, cb in list(self.watches):
                if key.startswith(prefix):
                    w.guard(cb, _Event(kind, key, data))

    # writes through the authority
    async def _reach(self) -> None:
        w = self.world
        await asyncio.sleep(w.rng.uniform(0.001, 0.01))
        if w.profile.slow_store and w.rng.random() < w.profile.slow_store:
            await asyncio.sleep(w.rng.uniform(0.05, 0.5))
        if not w.store_reachable(self.node):
            await asyncio.sleep(0.5)
            raise QuorumLost(f"{self.node} cannot reach a majority")

    async def _committed(self) -> None:
        """After a commit: sometimes the answer is lost (a timeout whose write did commit)."""
        w = self.world
        if w.profile.slow_store and w.rng.random() < w.profile.slow_store / 2:
            await asyncio.sleep(w.rng.uniform(0.1, 1.0))
            raise CommitTimeout(f"{self.node}: no answer in time (outcome unknown)")

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        await self._reach()
        k = str(key)
        if self.world.store.data.get(k) != expected:
            return False
        self.world.store.commit("put" if new is not None else "remove", k, new)
        await self._committed()
        return True

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int:
        await self._reach()
        self.world.store.commit("put", str(key), value)
        await self._committed()
        return 0

    async def remove(self, key: Any, timeout: float = 5.0) -> bool:
        await self._reach()
        k = str(key)
        had = k in self.world.store.data
        self.world.store.commit("remove", k, None)
        await self._committed()
        return had

    async def get(self, key: Any, timeout: float = 5.0) -> Any:
        await self._reach()
        return self.world.store.data.get(str(key))


@dataclass
class _Reset:
    prefix: str
    kind: str = "reset"
    key: str = ""
    value: bytes | None = None


# --- storage ---------------------------------------------------------------------------------------


class FaultyEngine(MemoryStorage):
    """A memory engine whose writes can be made to fail (a full disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def put(self, partition: int, key: str, rec: Any) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        super().put(partition, key, rec)


# --- nodes -------------------------------------------------------------------------------------------


class SimNode:
    def __init__(self, world: MapWorld, node_id: str) -> None:
        self.world = world
        self.id = node_id
        self.running = False
        self.service: MapService | None = None
        self.gen = 0
        self.engines: dict[str, FaultyEngine] = {}  # survive restarts when persistent
        self.fs = SimFileSystem()  # the log engine's files (the page cache survives a kill)
        self.rebooted = False  # a power cut since the last start: the service distrusts its copies
        # its consensus replica (journal): what it had applied when it stopped, kept across restarts
        self.replica: tuple[int, dict[str, Any], dict[str, int]] | None = None
        self.paused_until = 0.0  # a stalled process (CPU starvation, a long pause): nothing runs
        self.slow = 0.0  # a lagging process: each step of work (`MapService._more`) takes this long
        self.skew = world.rng.uniform(-0.5, 0.5)

    def open_storage(self, kind: str, directory: Path, name: str) -> FaultyEngine | LogStorage:
        if self.world.profile.engine == "log":
            path = Path("/sim") / self.id / "maps" / f"{name}.log"
            return LogStorage(path, files=self.fs, background=False, compact_min_bytes=4096)
        if not self.world.profile.persistent or name not in self.engines:
            self.engines[name] = FaultyEngine()
        return self.engines[name]

    def start(self) -> None:
        w = self.world
        self.gen += 1
        self.running = True
        view = NodeKV(w, self.id)
        if self.replica is not None:  # a restart: its replica recovers what it had, then catches up
            applied, local, created = self.replica
            view.applied, view.local, view.created = applied, dict(local), dict(created)
        else:
            view.local = dict(w.store.data) if w.store_reachable(self.id) else dict(view.local)
            view.created = dict(w.store.created) if w.store_reachable(self.id) else {}
            view.applied = len(w.store.log) if w.store_reachable(self.id) else 0
        w.views[self.id] = view
        svc = MapService(
            self.id, view, SimSender(w, self.id), Path("/nonexistent") / self.id,
            is_leader=lambda: w.is_leader(self.id), up_peers=lambda: w.up_view(self.id),
            has_quorum=lambda: w.has_quorum(self.id), partitions=PARTITIONS, timings=w.timings,
            now=w.loop.time, wall_ms=lambda: int((w.loop.time() + 1_700_000_000 + self.skew) * 1000),
            incarnation=w.rng.getrandbits(23), open_storage=self.open_storage, boot_id=lambda: None,
            logger=w.logger(self.id),
        )
        svc._distrust, self.rebooted = self.rebooted, False  # (what `_check_boot` finds on a real machine)
        svc._check_horizon = lambda: None  # type: ignore[method-assign]  # no files in the simulation
        svc._write_alive = lambda wall: None  # type: ignore[method-assign]
        svc._claim_files = lambda name, created: None  # type: ignore[method-assign]  # (no maps are removed here)
        tick = svc._tick
        svc._tick = lambda: None if w.loop.time() < self.paused_until else tick()  # type: ignore[method-assign]
        more = svc._more

        due = [False]

        def paused_more() -> None:  # a stalled node does no work either: it goes on when it resumes
            if w.loop.time() < self.paused_until:
                svc._more_handle = w.loop.call_at(self.paused_until + 0.001, paused_more)
                return
            if self.slow and not due[0]:  # (a lagging one takes its time over each step)
                due[0] = True
                svc._more_handle = w.loop.call_later(self.slow, paused_more)
                return
            due[0] = False
            more()

        svc._more = paused_more  # type: ignore[method-assign]
        self.service = svc
        w.spawn(svc.start())
        view.notify()
        w.log(f"start {self.id} (gen {self.gen})")

    def kill(self) -> None:
        self.fs.crash()  # open files are gone (the page cache stays): nothing more is written
        svc = self.service
        self.running = False
        self.service = None
        view = self.world.views.pop(self.id, None)
        if view is not None:
            self.replica = (view.applied, dict(view.local), dict(view.created))
        if svc is not None:
            svc._closed = True
            for t in list(svc._tasks) + ([svc._ticker] if svc._ticker else []):
                t.cancel()
            svc._ops.fail_all(lambda: MapUnavailable(f"{self.id} was killed"))
        self.world.log(f"kill {self.id}")


class SimSender:
    def __init__(self, world: MapWorld, node: str) -> None:
        self.world = world
        self.node = node

    def send(self, peer: str, msg: object) -> bool:
        return self.world.net_send(self.node, peer, msg)


# --- the world ------------------------------------------------------------------------------------------


class _Quiet(logging.Logger):
    """Collects errors (a violation unless expected) and drops the rest unless verbose."""

    def __init__(self, world: MapWorld, name: str) -> None:
        super().__init__(name, logging.DEBUG if world.verbose else logging.WARNING)
        self.world = world

    def handle(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if self.world.verbose:
            print(f"{self.world.loop.time():9.3f} {self.name}: {msg}", file=sys.stderr)
        if record.levelno >= logging.ERROR and "storage failed" not in msg:
            self.world.errors.append(f"{self.name}: {msg}")


class MapWorld:
    def __init__(self, seed: int, profile_name: str = "mixed", *, verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.profile = _PROFILES[profile_name](self.rng)
        self.verbose = verbose
        self.loop = VirtualTimeLoop()
        self.timings = MapTimings(
            retry=RetryPolicy(timeout=3.0, attempt_timeout=1.0, backoff_min=0.02, backoff_max=0.5),
            force_after=6.0, drop_after=8.0, probe_after=2.0,
            **({"piece_bytes": self.profile.piece_bytes} if self.profile.piece_bytes else {}),
            **({"batch_records": self.profile.batch_records} if self.profile.batch_records else {}),
            **({"batch_bytes": self.profile.batch_bytes} if self.profile.batch_bytes else {}),
        )
        self.store = SimStore(self)
        self.views: dict[str, NodeKV] = {}
        self.ids = [f"node-{i + 1}" for i in range(self.profile.nodes)]
        self.members = list(self.ids)  # nodes that exist (joined) so far
        if "add" in self.profile.kinds:
            self.members = self.ids[:-1]
        self.nodes = {nid: SimNode(self, nid) for nid in self.ids}
        self.links: set[tuple[str, str]] = set()  # directed pairs that are cut
        self.view_up: dict[str, set[str]] = {nid: set() for nid in self.ids}  # what each node was told
        self.queues: dict[tuple[str, str], int] = {}  # generation per directed link (a cut loses in flight)
        self._link_at: dict[tuple[str, str], float] = {}  # when the last message sent on a link arrives
        self.history: list[Op] = []
        self.maps = [MAP]  # defined so far
        # a map removed and created again is another map: its keys' histories are apart
        # (`_hkey`); an operation that overlaps a window from the removal until every running
        # node's store replica has the new definition is not checked (a read) or indeterminate in
        # the new map (a write: it may have reached either)
        self.epochs: dict[str, int] = {}
        self.windows: list[list[Any]] = []  # [map, start, end or None]
        self.errors: list[str] = []
        self.violations: list[str] = []
        self.trace: list[str] = []
        self.faults_on = True
        self.stats: dict[str, int] = {"ops": 0, "ok": 0, "indeterminate": 0, "faults": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deferred = 0
        self._disk_settled_at = 0.0  # until then no memory-engine node is killed (see `fault`)
        self._power_settled_at = 0.0  # until then no other power cut (see `fault`)
        self._loggers: dict[str, _Quiet] = {}
        self.loop.set_exception_handler(self._on_loop_error)

    # --- plumbing -------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.trace.append(f"{self.loop.time():8.3f} {msg}")
        if self.verbose:
            print(f"{self.loop.time():9.3f} ** {msg}", file=sys.stderr)

    def logger(self, node: str) -> logging.Logger:
        if node not in self._loggers:
            self._loggers[node] = _Quiet(self, f"maps.{node}")
        return self._loggers[node]

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            self.errors.append(f"task failed: {t.exception()!r}")

    def guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            self.errors.append(f"callback raised: {e!r}")

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        self.errors.append(f"loop: {ctx.get('message')} {ctx.get('exception')!r}")

    # --- connectivity ---------------------------------------------------------------------------------------
    def connected(self, a: str, b: str) -> bool:
        return (a, b) not in self.links and (b, a) not in self.links \
            and self.nodes[a].running and self.nodes[b].running

    def store_reachable(self, node: str) -> bool:
        """A node reaches the consensus store while it can reach a majority of the members."""
        if not self.nodes[node].running:
            return False
        n = sum(1 for m in self.members if m == node or self.connected(node, m))
        return n >= len(self.members) // 2 + 1

    def up_view(self, node: str) -> list[str]:
        return sorted(self.view_up[node])

    def has_quorum(self, node: str) -> bool:
        """As the transport says: this node sees a majority of the members up (itself included)."""
        return self.nodes[node].running and len(self.view_up[node]) + 1 >= len(self.members) // 2 + 1

    def is_leader(self, node: str) -> bool:
        """As the leader election says: the lowest id among the nodes this one sees up, with quorum."""
        return self.has_quorum(node) and node == min([node, *self.view_up[node]])

    def topology_changed(self) -> None:
        """Tell nodes about links that went down or up, after a detection delay."""
        for a in self.ids:
            for b in self.ids:
                if a == b:
                    continue
                up = self.connected(a, b) and b in self.members and a in self.members
                if up != (b in self.view_up[a]):
                    if not up:
                        self.queues[(b, a)] = self.queues.get((b, a), 0) + 1  # in flight is lost
                        self.queues[(a, b)] = self.queues.get((a, b), 0) + 1
                    delay = self.rng.uniform(0.05, 0.6) if not up else self.rng.uniform(0.01, 0.1)
                    self.loop.call_later(delay, self._report, a, b, self.nodes[a].gen)
        for view in self.views.values():
            view.notify()

    def _report(self, a: str, b: str, gen: int) -> None:
        node = self.nodes[a]
        if not node.running or node.gen != gen or node.service is None:
            return
        up = self.connected(a, b) and b in self.members and a in self.members
        if up == (b in self.view_up[a]):
            return
        svc = node.service
        if up:
            self.view_up[a].add(b)
            self.guard(svc.peer_up, b)
        else:
            self.view_up[a].discard(b)
            self.guard(svc.peer_down, b)

    def net_send(self, src: str, dst: str, msg: object) -> bool:
        if dst not in self.view_up[src] or dst not in self.nodes:
            return False
        data = msgspec.msgpack.encode(msg)
        gen = self.queues.get((src, dst), 0)
        # FIFO per link, as a TCP connection is: a message is not delivered before one sent earlier
        # on the same link (a random delay alone let a later message overtake an earlier one)
        at = self.loop.time() + self.rng.uniform(0.0005, 0.005)
        at = max(at, self._link_at.get((src, dst), 0.0) + 1e-6)
        self._link_at[(src, dst)] = at
        self.loop.call_at(at, self._deliver, src, dst, data, gen, self.nodes[dst].gen)
        if self.profile.duplicate and self.rng.random() < self.profile.duplicate:
            self.loop.call_at(at + 0.001, self._deliver, src, dst, data, gen, self.nodes[dst].gen)
        return True

    def _deliver(self, src: str, dst: str, data: bytes, gen: int, dst_gen: int) -> None:
        node = self.nodes[dst]
        if self.queues.get((src, dst), 0) != gen or not node.running or node.gen != dst_gen:
            return  # the link went down meanwhile (in-flight data is lost), or the node restarted
        if not self.connected(src, dst) or (src not in self.view_up[dst] and dst not in self.view_up[src]):
            return
        if self.loop.time() < node.paused_until:  # stalled: it reads its socket later, in order
            self._deferred += 1
            self.loop.call_at(node.paused_until + self._deferred * 1e-7, self._deliver, src, dst, data, gen,
                              dst_gen)
            return
        msg = _map_msg_decoder.decode(data)
        if node.service is not None:
            self.guard(node.service.dispatch, src, msg)

    # --- the run --------------------------------------------------------------------------------------------
    async def main(self) -> None:
        if self.profile.stagger:
            order = list(self.members)
            self.rng.shuffle(order)
            for nid in order:
                self.nodes[nid].start()
                self.log(f"start {nid}")
                self.topology_changed()
                await asyncio.sleep(self.rng.uniform(0.0, self.profile.stagger))
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
        else:
            for nid in self.members:
                self.nodes[nid].start()
            self.topology_changed()
            # defined once the first table is in use (as a blueprint applied to a running cluster)
            await asyncio.sleep(0.5)
        self.store.commit("put", str(MapDefKey(MAP)), MapSpec(
            replicas=self.profile.replicas, write_quorum=self.profile.write_quorum, engine="memory"))
        await asyncio.sleep(0.5)
        self.spawn(self.define_later())
        clients = [self.spawn(self.client(i)) for i in range(self.profile.clients)]
        faults = self.spawn(self.faults())
        await asyncio.sleep(self.profile.duration)
        self.faults_on = False
        await asyncio.gather(faults, return_exceptions=True)
        self.heal()
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await self.settle()

    async def define_later(self) -> None:
        """A second map, defined while the cluster runs (takeovers may be under way)."""
        await asyncio.sleep(self.rng.uniform(1.0, self.profile.duration / 2))
        self.store.commit("put", str(MapDefKey(MAP2)), MapSpec(replicas=self.profile.replicas,
                                                               write_quorum=self.profile.write_quorum))
        self.log(f"define {MAP2}")
        self.maps.append(MAP2)

    def heal(self) -> None:
        self.links.clear()
        for nid in self.ids:
            if nid not in self.members:
                self.members.append(nid)
            if not self.nodes[nid].running:
                self.nodes[nid].start()
            for e in self.nodes[nid].engines.values():
                e.full = False
            self.nodes[nid].fs.fail_writes = None
        self.topology_changed()
        self.log("heal")

    async def settle(self) -> None:
        """After healing: the table covers every node, every primary serves, replicas converge,
        and a final read of each key through every node agrees."""
        deadline = self.loop.time() + 40.0
        while True:
            await asyncio.sleep(0.5)
            problem = self._settled()
            if problem is None:
                break
            if self.loop.time() > deadline:
                raise SimViolation(f"no convergence 40 s after healing: {problem}")
        for name in self.maps:
            for k in range(self.profile.keys):
                key = f"k{k}"
                seen = {}
                for nid in self.ids:
                    svc = self.nodes[nid].service
                    assert svc is not None
                    t0 = self.loop.time()
                    try:
                        v = await svc.map_get(name, key)
                    except MapError as e:
                        raise SimViolation(f"final read of {name}/{key} through {nid} failed: {e}") from None
                    client = 1000 + self.ids.index(nid)
                    hkey = self._hkey(name, key)
                    self.history.append(Op(client, "get", hkey, None, None, t0, self.loop.time(), v))
                    seen[nid] = v
                if len(set(seen.values())) != 1:
                    raise SimViolation(f"final reads of {name}/{key} disagree: {seen}")

    def _settled(self) -> str | None:
        table = None
        for nid in self.ids:
            svc = self.nodes[nid].service
            if svc is None or svc.table is None:
                return f"{nid} has no table"
            if table is None:
                table = svc.table
            elif svc.table.version != table.version:
                return f"tables differ: {nid} v{svc.table.version} vs v{table.version}"
            if svc.syncing:
                return f"{nid} still takes {svc.syncing} partitions over"
            if svc.core._tracked:
                return f"{nid} has {len(svc.core._tracked)} writes not on every owner"
            if svc.core.client:  # cancelled callers' operations still run (indeterminate ones)
                return f"{nid} has {len(svc.core.client)} operations in flight"
        assert table is not None
        if sorted(table.members) != sorted(self.ids):
            return f"table v{table.version} has members {table.members}"
        # replicas hold what their primary holds
        for name in self.maps:
            for p in range(PARTITIONS):
                owners = owners_for(table, p, self.profile.replicas)
                prim = self.nodes[owners[0]].service
                assert prim is not None
                ref = dict(prim.engines[name].scan(p)) if name in prim.engines else {}
                for o in owners[1:]:
                    svc = self.nodes[o].service
                    assert svc is not None
                    mine = dict(svc.engines[name].scan(p)) if name in svc.engines else {}
                    live_ref = {k: r for k, r in ref.items() if r.value is not None}
                    live_mine = {k: r for k, r in mine.items() if r.value is not None}
                    if live_ref != live_mine:
                        diff = sorted(set(live_ref) ^ set(live_mine))[:3] or sorted(live_ref)[:3]
                        return f"{name} partition {p}: replica {o} differs from primary {owners[0]}: {diff}"
        return None

    async def client(self, idx: int) -> None:
        n = 0
        rng = random.Random(self.rng.getrandbits(32))
        while True:
            await asyncio.sleep(rng.uniform(0.005, 0.05))
            running = [nid for nid in self.ids if self.nodes[nid].running and self.nodes[nid].service]
            if not running:
                continue
            nid = rng.choice(running)
            svc = self.nodes[nid].service
            assert svc is not None
            name = rng.choice(self.maps)
            key = f"k{rng.randrange(self.profile.keys)}"
            hkey = self._hkey(name, key)
            epoch0 = self.epochs.get(name, 0)
            if name not in svc.specs:
                continue  # this node has not seen the definition yet (UnknownMap before anything)
            n += 1
            value = f"c{idx}-{n}".encode()
            kind = rng.choices(["get", "put", "cas", "remove"], [4, 3, 3, 1])[0]
            written = value if kind in ("put", "cas") else None
            expected: bytes | None = None
            t0 = self.loop.time()
            self.stats["ops"] += 1
            try:
                if kind == "get":
                    result: Any = await svc.map_get(name, key)
                elif kind == "put":
                    await svc.map_put(name, key, value)
                    result = None
                elif kind == "remove":
                    result = await svc.map_remove(name, key)
                else:
                    # expect what a read (any recent one) saw, sometimes absent
                    expected = rng.choice([self._recent(hkey), None])
                    result = await svc.map_compare_and_set(name, key, expected, value)
            except MapError as e:
                if not isinstance(e, MapUnavailable) and not self._overlaps(name, t0):
                    self.violations.append(f"client {idx}: {kind} {hkey} failed unexpectedly: {e!r}")
                    continue
                if kind == "get":
                    continue
                self.stats["indeterminate"] += 1
                self._unsure(Op(idx, kind, hkey, written, expected, t0, None, None), name, key, epoch0)
                continue
            except asyncio.CancelledError:
                self.history.append(Op(idx, kind, hkey, value if kind in ("put", "cas") else None,
                                       expected, t0, None, None))
                raise
            if self._overlaps(name, t0):  # the map was removed and created again meanwhile
                if kind != "get":
                    self._unsure(Op(idx, kind, hkey, written, expected, t0, None, None), name, key, epoch0)
                continue
            self.stats["ok"] += 1
            self.history.append(Op(idx, kind, hkey, value if kind in ("put", "cas") else None,
                                   expected, t0, self.loop.time(), result))

    def _hkey(self, name: str, key: str, epoch: int | None = None) -> str:
        """The history's name of `key` of map `name` as it is defined now (or was in `epoch`)."""
        if epoch is None:
            epoch = self.epochs.get(name, 0)
        return f"{name}/{key}" if not epoch else f"{name}#{epoch}/{key}"

    def _unsure(self, op: Op, name: str, key: str, epoch0: int) -> None:
        """Record write `op` (its outcome unknown, `epoch0` the map's when it began) as one that may
        have taken effect in the map as it was, in any map created again since, or not at all."""
        for epoch in range(epoch0, self.epochs.get(name, 0) + 1):
            self.history.append(dataclasses.replace(op, key=self._hkey(name, key, epoch)))

    def _overlaps(self, name: str, t0: float) -> bool:
        """Whether an operation on `name` from `t0` until now overlaps a window of its re-creation."""
        return any(w[0] == name and (w[2] is None or w[2] >= t0) for w in self.windows)

    async def _recreate(self, name: str) -> None:
        """Remove map `name` and create it again with the same settings, maybe while a node is
        stalled (then its replica sees it late, maybe only as a reset); the window ends once every
        running node's replica has the new definition."""
        rng = self.rng
        key = str(MapDefKey(name))
        spec = self.store.data.get(key)
        running = [n for n in self.members if self.nodes[n].running]
        if spec is None or not running:
            return
        victim = rng.choice(running)
        window: list[Any] = [name, self.loop.time(), None]
        self.windows.append(window)
        self.nodes[victim].paused_until = self.loop.time() + rng.uniform(0.3, 2.0)
        view = self.views.get(victim)
        if view is not None and rng.random() < 0.6:
            view.jump_next = True
        self.log(f"recreate {name} (stall {victim} until {self.nodes[victim].paused_until:.3f})")
        self.store.commit("remove", key, None)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        self.store.commit("put", key, spec)
        self.epochs[name] = self.epochs.get(name, 0) + 1
        index = len(self.store.log)
        deadline = self.loop.time() + 30.0
        while self.loop.time() < deadline:
            views = [self.views.get(n) for n in self.ids if self.nodes[n].running]
            if all(v is not None and v.applied >= index for v in views):
                break
            await asyncio.sleep(0.05)
        window[2] = self.loop.time()
        self.log(f"{name} recreated (epoch {self.epochs[name]})")

    def _recent(self, key: str) -> bytes | None:
        for op in reversed(self.history[-50:]):
            if op.key == key and op.ret is not None and op.kind == "get" and op.result is not None:
                return op.result  # type: ignore[return-value]
        return None

    async def faults(self) -> None:
        kinds = self.profile.kinds
        if not kinds:
            return
        names, weights = list(kinds), list(kinds.values())
        while self.faults_on:
            await asyncio.sleep(self.rng.uniform(*self.profile.fault_gap))
            if not self.faults_on:
                break
            kind = self.rng.choices(names, weights)[0]
            self.stats["faults"] += 1
            await self.fault(kind)

    def _holding_aside(self, running: list[str]) -> bool:
        """Whether a node's takeover may hold its own copy aside in memory only (deleted from its
        engine until the takeover decides, or written back a batch per step): stopping its process
        then loses that copy (docs/maps.md, Limits), a fault beyond what the map promises."""
        for n in running:
            svc = self.nodes[n].service
            if svc is not None and (svc.core._promotions or svc.core._back):
                return True
        return False

    async def _stop_and_start_all(
        self, running: list[str], rng: random.Random, what: str, gap: float, *, rebooted: bool = False
    ) -> None:
        """Stop every running node at once (`rebooted`: as after a power cut), then start every
        member again in a random order, up to `gap` seconds apart."""
        for n in running:
            self.nodes[n].kill()
            if rebooted:
                self.nodes[n].rebooted = True
        self.topology_changed()
        self.log(what)
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        order = list(self.members)
        rng.shuffle(order)
        for n in order:
            self.nodes[n].start()
            self.topology_changed()
            await asyncio.sleep(rng.uniform(0.0, gap))

    async def fault(self, kind: str) -> None:
        rng = self.rng
        running = [n for n in self.members if self.nodes[n].running]
        # a node whose storage failed drops its copies and gets them back from the other owners:
        # killing one of those (memory engines) before that is a second fault, beyond what R
        # copies survive (the takeover says "writes acknowledged only by them may be lost")
        settled = self.profile.persistent or self.loop.time() >= self._disk_settled_at
        if kind == "kill" and len(running) > len(self.members) // 2 + 1 - 1 and settled:
            victim = rng.choice(running)
            self.nodes[victim].kill()
            self.topology_changed()
            await asyncio.sleep(rng.uniform(0.2, 3.0))
            self.nodes[victim].start()
            self.topology_changed()
        elif kind == "restart":
            await self._stop_and_start_all(running, rng, "every node stopped", 0.3)
            await asyncio.sleep(rng.uniform(0.0, 0.8))
            name = f"r{self.stats['faults']}"
            self.store.commit("put", str(MapDefKey(name)), MapSpec(
                replicas=self.profile.replicas, write_quorum=self.profile.write_quorum))
            self.log(f"define {name}")
            self.maps.append(name)
        elif kind == "blackout" and not self._holding_aside(running):
            # (every disk had everything: no tail lost, but the copies no longer count)
            await self._stop_and_start_all(running, rng, "power cut of every node", 0.5, rebooted=True)
        elif kind == "recreate":
            await self._recreate(rng.choice(self.maps))
        elif kind == "stall" and running:
            victim = rng.choice(running)
            self.nodes[victim].paused_until = self.loop.time() + rng.uniform(0.2, 2.0)
            self.log(f"stall {victim} until {self.nodes[victim].paused_until:.3f}")
        elif kind == "lag" and running:
            await self._lag(rng, running)
        elif kind == "isolate":
            victim = rng.choice(self.members)
            self._cut([[victim], [m for m in self.members if m != victim]], f"isolate {victim}")
            await asyncio.sleep(rng.uniform(0.2, 4.0))
            self._uncut()
        elif kind == "split":
            shuffled = list(self.members)
            rng.shuffle(shuffled)
            k = rng.randrange(1, len(shuffled))
            self._cut([shuffled[:k], shuffled[k:]], f"split {shuffled[:k]} | {shuffled[k:]}")
            await asyncio.sleep(rng.uniform(0.2, 4.0))
            self._uncut()
        elif kind == "oneway":
            a, b = rng.sample(self.members, 2)
            self.links.add((a, b))
            self.log(f"cut {a} -> {b}")
            self.topology_changed()
            await asyncio.sleep(rng.uniform(0.2, 3.0))
            self._uncut()
        elif kind == "flap":
            a, b = rng.sample(self.members, 2)
            self.links.add((a, b))
            self.log(f"flap {a} - {b}")
            self.topology_changed()
            await asyncio.sleep(rng.uniform(0.01, 0.3))
            self._uncut()
        elif kind == "power" and running and self.loop.time() >= self._power_settled_at:
            # one power cut at a time: a second owner losing its unsynced tail before the first got
            # its copies again would be two faults, beyond what unsynced copies promise
            victim = rng.choice(running)
            node = self.nodes[victim]
            node.kill()
            node.fs.power_loss(rng)
            node.rebooted = True
            self.log(f"power cut of {victim}")
            self.topology_changed()
            await asyncio.sleep(rng.uniform(0.2, 3.0))
            node.start()
            self.topology_changed()
            self._power_settled_at = self.loop.time() + 2 * self.timings.probe_after + 4.0
        elif kind == "disk":
            victim = rng.choice(running) if running else None
            if victim is None:
                return
            engines = self.nodes[victim].engines.values()
            for e in engines:
                e.full = True
            self.nodes[victim].fs.fail_writes = errno.ENOSPC
            self.log(f"disk of {victim} full")
            await asyncio.sleep(rng.uniform(0.5, 4.0))
            for e in self.nodes[victim].engines.values():
                e.full = False
            self.nodes[victim].fs.fail_writes = None
            self.log(f"disk of {victim} has space again")
            self._disk_settled_at = self.loop.time() + 2 * self.timings.probe_after + 4.0
        elif kind == "disks":
            order = list(running)
            rng.shuffle(order)
            for victim in order:
                self._disk_full(victim, True)
                await asyncio.sleep(rng.uniform(0.1, 2.0))
            rng.shuffle(order)
            for victim in order:
                await asyncio.sleep(rng.uniform(0.5, self.timings.force_after + 4.0))
                self._disk_full(victim, False)
            self._disk_settled_at = self.loop.time() + 2 * self.timings.probe_after + 4.0
        elif kind == "add":
            missing = [n for n in self.ids if n not in self.members]
            if missing:
                nid = missing[0]
                self.members.append(nid)
                self.nodes[nid].start()
                self.log(f"add {nid}")
                self.topology_changed()

    async def _lag(self, rng: random.Random, running: list[str]) -> None:
        """Up to a minority of the nodes lag together for 1.2-2.5 `force_after`: every step of
        their work slow, stalled and out of the others' reach for 0.3-2 s at a time (heartbeats
        late: the others see them go), back for 0.2-1 s in between."""
        victims = rng.sample(running, min(len(running), rng.randint(1, (len(self.members) - 1) // 2)))
        end = self.loop.time() + rng.uniform(1.2, 2.5) * self.timings.force_after
        self.log(f"lag {victims} for {end - self.loop.time():.1f} s")
        others = [m for m in self.members if m not in victims]
        for v in victims:
            self.nodes[v].slow = rng.uniform(0.1, 0.4)
        while self.loop.time() < end:
            pause = rng.uniform(0.3, 2.0)
            for v in victims:
                self.nodes[v].paused_until = self.loop.time() + pause
            self._cut([[v] for v in victims] + [others], f"{victims} stalled for {pause:.2f} s")
            await asyncio.sleep(pause)
            self._uncut()
            await asyncio.sleep(rng.uniform(0.2, 1.0))
        for v in victims:
            self.nodes[v].slow = 0.0
        self.log(f"{victims} keep up again")

    def _disk_full(self, node: str, full: bool) -> None:
        for e in self.nodes[node].engines.values():
            e.full = full
        self.nodes[node].fs.fail_writes = errno.ENOSPC if full else None
        self.log(f"disk of {node} {'full' if full else 'has space again'}")

    def _cut(self, groups: list[list[str]], what: str) -> None:
        for g in groups:
            for h in groups:
                if g is h:
                    continue
                for a in g:
                    for b in h:
                        self.links.add((a, b))
        self.log(what)
        self.topology_changed()

    def _uncut(self) -> None:
        self.links.clear()
        self.log("links restored")
        self.topology_changed()

    def run(self) -> None:
        main = self.loop.create_task(self.main())
        try:
            self.loop.run_until_complete(main)
        except SimDeadlock as e:
            self.violations.append(f"deadlock: {e}")
        except SimViolation as e:
            self.violations.append(str(e))
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def check(self) -> CheckResult:
        return check_history(self.history)


@dataclass
class Outcome:
    seed: int
    ok: bool
    problem: str
    stats: dict[str, int]
    describe: str
    trace: list[str]


def _no_read_check(core: Any, prim: Any, op: Any, value: Any = None, ok: bool = True) -> None:
    core._answer_now(prim, op)  # answers without waiting for writes or confirming it is primary


def _no_owner_quorum(core: Any, prom: Any, p: int) -> bool:
    return True  # serves without copies from the active configuration's owners


def _no_quorum_check(core: Any, has_quorum: bool, now: float, wall: int) -> list[Any]:
    return core._take()  # keeps serving as primary without a quorum


def _no_definition_identity(svc: Any, name: str) -> int:
    return 0  # a map created again is taken for the removed one


MUTANTS: dict[str, list[tuple[str, Callable[..., Any]]]] = {
    "no-owner-quorum": [("_synced", _no_owner_quorum)],
    "stale-primary": [("_observe", _no_read_check), ("set_quorum", _no_quorum_check)],
    "no-quorum-check": [("set_quorum", _no_quorum_check)],
    "no-definition-identity": [("MapService._identity", _no_definition_identity)],
}
"""Deliberate bugs (`--mutant`): the checks must catch each (tests/test_map_simulation.py)."""


def run_map_seed(
    seed: int, profile: str = "mixed", *, verbose: bool = False, mutant: str | None = None
) -> Outcome:
    from unittest import mock

    from aether.maps.core import MapCore

    world = MapWorld(seed, profile, verbose=verbose)
    with contextlib.ExitStack() as stack:
        for attr, fn in MUTANTS[mutant] if mutant is not None else []:
            owner: Any = MapService if attr.startswith("MapService.") else MapCore
            stack.enter_context(mock.patch.object(owner, attr.rpartition(".")[2], fn))
        world.run()
    problem = ""
    if world.violations:
        problem = world.violations[0]
    elif world.errors:
        problem = f"error: {world.errors[0]}"
    else:
        res = world.check()
        if not res.ok:
            problem = f"not linearizable: {res.explanation}"
    return Outcome(seed, not problem, problem, dict(world.stats), world.profile.describe(), world.trace)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="seeded simulation of the distributed map")
    ap.add_argument("--seeds", default="1:20", help="A:B (half-open) or one seed")
    ap.add_argument("--profile", default="mixed", choices=profile_names())
    ap.add_argument("--mutant", choices=sorted(MUTANTS), help="run with a deliberate bug")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if ":" in args.seeds:
        a, b = (int(x) for x in args.seeds.split(":"))
        seeds = range(a, b)
    else:
        seeds = range(int(args.seeds), int(args.seeds) + 1)
    failed = 0
    for seed in seeds:
        out = run_map_seed(seed, args.profile, verbose=args.verbose, mutant=args.mutant)
        status = "ok" if out.ok else "FAIL"
        print(f"seed {seed} [{out.describe}] {status} ops={out.stats['ops']} ok={out.stats['ok']} "
              f"indeterminate={out.stats['indeterminate']} faults={out.stats['faults']}"
              + ("" if out.ok else f"\n  {out.problem}"), flush=True)
        failed += not out.ok
    print(f"{len(seeds) - failed}/{len(seeds)} seeds ok")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

