"""Seeded simulation of whole nodes: the real runner, disk store, state machine and KV store.

`aether.testing.sim` drives the sans-IO `Engine` alone. This module runs what a node runs
around it, unchanged: `ConsensusRunner` (ticks, group commit, fail-stop), `DiskStore` over a
`SimFileSystem` (page cache vs. disk, power loss with torn tails, ENOSPC/EIO),
`KVStateMachine` (sessions) and `KVStore` (the node-internal writers' API). Only the world
around them is simulated, on one `VirtualTimeLoop` per seed: a network with seeded drops,
duplicates, delays/reordering and partitions (majority/minority, all-minority, flapping,
one-way, bridge), peer up/down reports as the transport's heartbeats would give them,
per-node clocks (skew, drift, forward jumps), and faults of whole nodes: kill (the page cache
survives), power loss (unsynced writes lost, the last record torn), a clean stop in the middle
of a slot, a full disk or an I/O error (the runner must fail-stop; the node is restarted later
on a healthy disk), long outages of two of five nodes, restarts of node-internal writers.
Everything random comes from one `random.Random(seed)`, so a seed reproduces a run exactly.

Invariants checked while it runs:

- on the wire, per sender and ACROSS its restarts: one proposal per slot, one STATE bit and
  one VOTE per (slot, phase); across senders at most one non-'?' vote value per (slot, phase)
  and one candidate per slot; a DECISION or catch-up entry names what the slot decided;
- nothing a replica sends for a slot goes out before its journal record is on disk;
- every replica journals the same batch for every slot it applies (DecidedRec records are
  decoded as they are appended, so every applied slot is compared, not just final states);
- the runner never logs an error and no callback on the loop raises.

At the end the world heals (message drops may stay, up to a third), every node restarts, and:
every client must finish (liveness), the pending queues must drain, all replicas must hold
identical state; the register history must be linearizable (`aether.testing.lincheck`) and
the list-append history consistent (`aether.testing.listappend`: no lost, duplicated or
reordered appends).

Profile `node-members` adds membership changes through the runner (`change_members`): members
removed and added back through a random member during the faults (kills and power loss in the
middle of a change included), with two more checks: every replica sends a slot's messages to the
same member set, and gives every epoch the same set; after healing every node is added back.

Clients: external session clients submit encoded commands to a node's runner (as the cluster
port does) and, on a timeout or a lost connection, resubmit the SAME command (same session and
sequence) through another node; node-internal writers append through the node's `KVStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import logging
import random
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from aether.consensus.engine import EngineConfig, MembersChanged, MembershipRefused
from aether.consensus.messages import (
    VOTE_UNDECIDED,
    Batch,
    CatchupReply,
    DecidedRec,
    Decision,
    EngineSnapshot,
    JournalRecord,
    MemberChange,
    Proposal,
    ProposalReply,
    RabiaMessage,
    SentRec,
    StateMsg,
    VoteMsg,
)
from aether.consensus.runner import ConsensusRunner
from aether.consensus.storage import DiskStore, JournalError, frame, scan_journal
from aether.core.errors import AetherError, CommitTimeout, QuorumLost
from aether.kv.machine import (
    Cas,
    Get,
    KVStateMachine,
    Put,
    Remove,
    Result,
    decode_result,
    encode_command,
)
from aether.kv.store import KVStore
from aether.testing.lincheck import CheckResult, check_history
from aether.testing.lincheck import Op as LinOp
from aether.testing.listappend import Append, Read, check_list_append, decode_list, encode_list
from aether.testing.simfs import SimFileSystem
from aether.testing.vloop import SimDeadlock, VirtualTimeLoop

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(RabiaMessage)
_jdec = msgspec.msgpack.Decoder(JournalRecord)
_snap_decoder = msgspec.msgpack.Decoder(EngineSnapshot)

WALL0 = 1_750_000_000.0  # virtual wall clock at t = 0 (seconds since the epoch)


class InvariantViolation(AssertionError):
    pass




# --- scenarios and profiles -------------------------------------------------------------------------


@dataclass
class Scenario:
    """Everything a seed varies, drawn from its profile with the seed's rng."""

    nodes: int = 3
    drop: float = 0.0
    dup: float = 0.0
    delay_min: float = 0.0002
    delay_max: float = 0.003
    spike: float = 0.0  # probability that a message takes 20-200 ms
    crash_on_send: float = 0.0  # probability, per broadcast, that the sender dies part-way through it
    partitions: bool = False
    part_gap: tuple[float, float] = (0.1, 0.6)
    part_len: tuple[float, float] = (0.05, 0.5)
    shapes: tuple[str, ...] = ("majority", "all_minority", "flapping", "one_way", "bridge")
    node_faults: bool = False
    fault_gap: tuple[float, float] = (0.1, 0.5)
    downtime: tuple[float, float] = (0.02, 0.4)
    kinds: dict[str, float] = field(default_factory=dict)  # fault kind -> weight
    majority_down: float = 0.1  # chance a fault may take down more than f nodes
    skew: float = 0.0  # max wall-clock skew (s)
    session_clients: int = 3
    ops_per_client: int = 6
    writers: bool = True  # node-internal writers (through KVStore)
    writer_ops: int = 3  # appends per node
    max_sessions: int = 10_000
    final_drop: float = 0.0  # drop rate left on after healing
    horizon: float = 2.0
    settle: float = 10.0  # after healing, some operation must succeed at least this often (liveness)
    settle_cap: float = 120.0  # and every client and writer must be done within this
    client_timeout: float = 0.6  # an attempt with no answer after this is resubmitted elsewhere
    client_backoff: bool = True  # each further attempt waits twice as long (up to 4 s)
    heartbeat_timeout: tuple[float, float] = (0.3, 0.6)  # how long until a silent peer is reported down
    op_deadline: float = 3.0  # during faults, an operation gives up (indeterminate) after this
    fsync_delay: tuple[float, float] = (0.0002, 0.002)
    tick: float = 0.01
    kv_sessions: str = "auto"  # "auto" | "legacy" (a mutant: one KVStore session for every incarnation)
    # membership changes through the log during the faults (members are removed and added back);
    # after healing every node is a member again
    member_changes: bool = False
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(
        retransmit_after=0.03, commit_timeout=1.5, snapshot_every=40, retain_slots=30,
        catchup_entries=16, dedup_slots=100_000,
    ))

    def describe(self) -> str:
        k = ",".join(f"{n}" for n, w in sorted(self.kinds.items()) if w > 0) if self.node_faults else "-"
        return (f"nodes={self.nodes} drop={self.drop:.2f} dup={self.dup:.2f} "
                f"delay<={self.delay_max * 1e3:.0f}ms "
                f"partitions={'y' if self.partitions else 'n'} faults={k} skew={self.skew:.2f} "
                f"clients={self.session_clients}x{self.ops_per_client} "
                f"writers={'y' if self.writers else 'n'} sessions={self.max_sessions} "
                f"final_drop={self.final_drop:.2f} horizon={self.horizon:.1f}s")


ALL_KINDS = {
    "kill": 3.0, "power": 3.0, "stop": 2.0, "enospc": 1.0, "eio": 1.0, "fsync_eio": 0.5,
    "clock_jump": 1.0, "writer_restart": 1.0, "long_outage": 1.0,
}


def _ci(rng: random.Random) -> Scenario:
    """The default CI mix: every fault family shows up, each seed a different blend."""
    nodes = 3 if rng.random() < 0.6 else 5
    kinds = {k: w for k, w in ALL_KINDS.items() if rng.random() < 0.6}
    return Scenario(
        nodes=nodes,
        drop=rng.choice([0.0, 0.01, 0.05, 0.15]),
        dup=rng.choice([0.0, 0.02, 0.1]),
        delay_max=rng.choice([0.002, 0.01, 0.04]),
        spike=rng.choice([0.0, 0.0, 0.01]),
        crash_on_send=rng.choice([0.0, 0.0, 0.002]),
        partitions=rng.random() < 0.6,
        part_len=(0.05, rng.choice([0.3, 1.0, 2.0])),
        node_faults=bool(kinds) and rng.random() < 0.75,
        kinds=kinds,
        skew=rng.choice([0.0, 0.05, 0.5]),
        session_clients=rng.randint(2, 4),
        ops_per_client=rng.randint(4, 7),
        writers=rng.random() < 0.7,
        final_drop=rng.choice([0.0, 0.0, 0.05, 0.25]),
        horizon=rng.uniform(1.5, 2.5),
    )


def _aggressive(rng: random.Random) -> Scenario:
    """Heavy drops, long partitions, frequent crashes, power loss and disk faults."""
    return Scenario(
        nodes=3 if rng.random() < 0.5 else 5,
        drop=rng.uniform(0.1, 0.35),
        dup=rng.choice([0.02, 0.1, 0.2]),
        delay_max=rng.choice([0.005, 0.02, 0.06]),
        spike=rng.choice([0.0, 0.02]),
        crash_on_send=rng.choice([0.0, 0.003, 0.01]),
        partitions=True,
        part_gap=(0.05, 0.4),
        part_len=(0.05, rng.choice([1.0, 2.0, 3.0])),
        node_faults=True,
        fault_gap=(0.05, 0.35),
        kinds=dict(ALL_KINDS),
        majority_down=0.2,
        skew=rng.choice([0.05, 0.5, 2.0]),
        session_clients=rng.randint(3, 5),
        ops_per_client=rng.randint(5, 8),
        writers=True,
        writer_ops=3,
        final_drop=rng.uniform(0.25, 0.35),
        horizon=rng.uniform(3.0, 5.0),
        settle=15.0,
    )


def _disk(rng: random.Random) -> Scenario:
    """Restarts of every kind: kill, power loss, clean stop mid-slot, ENOSPC/EIO, torn tails."""
    return Scenario(
        nodes=3 if rng.random() < 0.7 else 5,
        drop=rng.choice([0.0, 0.02]),
        delay_max=rng.choice([0.002, 0.01]),
        crash_on_send=rng.choice([0.0, 0.005, 0.02]),
        node_faults=True,
        fault_gap=(0.03, 0.25),
        downtime=(0.02, 0.2),
        kinds={"kill": 2.0, "power": 4.0, "stop": 3.0, "enospc": 1.5, "eio": 1.5, "fsync_eio": 1.0},
        majority_down=0.3,
        fsync_delay=(0.0005, 0.005),
        session_clients=3,
        ops_per_client=6,
        horizon=rng.uniform(1.5, 2.5),
    )


def _partitions(rng: random.Random) -> Scenario:
    """Partitions lasting up to seconds, of every shape, with drops and skewed clocks."""
    return Scenario(
        nodes=3 if rng.random() < 0.5 else 5,
        drop=rng.choice([0.0, 0.05, 0.15]),
        dup=rng.choice([0.0, 0.05]),
        delay_max=rng.choice([0.003, 0.02]),
        partitions=True,
        part_gap=(0.05, 0.3),
        part_len=(0.2, 3.0),
        skew=rng.choice([0.0, 0.5]),
        kinds={"clock_jump": 1.0},
        node_faults=rng.random() < 0.5,
        session_clients=3,
        ops_per_client=6,
        final_drop=rng.choice([0.0, 0.3]),
        horizon=rng.uniform(3.0, 5.0),
    )


def _five(rng: random.Random) -> Scenario:
    """Five nodes, two of them down for long stretches, the rest under drops and crashes."""
    return Scenario(
        nodes=5,
        drop=rng.choice([0.0, 0.05, 0.15]),
        delay_max=0.01,
        node_faults=True,
        fault_gap=(0.1, 0.5),
        downtime=(0.5, 2.5),
        kinds={"long_outage": 4.0, "kill": 1.0, "power": 1.0, "stop": 1.0},
        majority_down=0.05,
        session_clients=3,
        ops_per_client=6,
        horizon=rng.uniform(3.0, 4.5),
    )


def _sessions(rng: random.Random) -> Scenario:
    """Clients retrying through other nodes, writers restarting, clocks jumping (session table)."""
    return Scenario(
        nodes=3 if rng.random() < 0.6 else 5,
        drop=rng.choice([0.05, 0.15, 0.3]),
        dup=0.05,
        delay_max=rng.choice([0.01, 0.05]),
        partitions=rng.random() < 0.5,
        node_faults=True,
        kinds={"kill": 1.0, "writer_restart": 3.0, "clock_jump": 2.0, "stop": 1.0},
        session_clients=rng.randint(3, 5),
        ops_per_client=7,
        client_timeout=rng.choice([0.1, 0.3, 0.6]),
        final_drop=rng.choice([0.0, 0.25]),
        horizon=rng.uniform(2.0, 3.0),
    )


def _eviction(rng: random.Random) -> Scenario:
    """A small session table (LRU of 6-12 sessions) against 5 clients and up to 5 node writers, with
    retries: sessions are evicted while in use and while their commands are being resent.

    (A table smaller than the sessions in use at once starves them all: every client's second
    command finds its session evicted, which is a configuration no cluster runs with.)"""
    s = _sessions(rng)
    s.max_sessions = rng.randint(6, 12)
    s.session_clients = 5
    return s


def _members(rng: random.Random) -> Scenario:
    """The CI mix with membership changes through the runner while it runs: members removed and
    added back (through a random member), under kills, power loss, clean stops, disk faults and
    partitions; every node is a member again after healing."""
    s = _ci(rng)
    s.member_changes = True
    s.node_faults = True
    s.kinds = {**s.kinds, "kill": 2.0, "power": 2.0, "stop": 1.0}
    return s


PROFILES: dict[str, Callable[[random.Random], Scenario]] = {
    "ci": _ci, "aggressive": _aggressive, "disk": _disk, "partitions": _partitions,
    "five": _five, "sessions": _sessions, "eviction": _eviction, "node-members": _members,
}


# --- simulated disk store, transport and node --------------------------------------------------------


class CheckedStore(DiskStore):
    """The real `DiskStore`, reporting what it journals to the invariant checks.

    A decided slot counts once its record is on disk (or a snapshot covers it): it is checked
    against every other replica's then, before the sends and answers that waited for it go out.
    A decision that never reached the disk was never acted on outside this process (a power cut
    may take it back, and the replica may then decide that slot otherwise, which is fine).
    """

    def __init__(self, node: SimNode, gen: int) -> None:
        super().__init__(Path(f"/sim/{node.id}/consensus"), "always", fs=node.fs)
        self._node = node
        self._gen_of_node = gen
        # (kind, slot, phase) of a SentRec -> (journal file, offset, framed record) once appended
        self.marks: dict[tuple[str, int, int], tuple[object, int, bytes]] = {}
        # DecidedRecs written but not yet known to be on disk: (journal file, offset, frame, record)
        self.pending: list[tuple[object, int, bytes, DecidedRec]] = []
        self.snap_slot = 0

    def _on_disk(self, f: object, pos: int, fr: bytes) -> bool:
        cur = self._node.fs.files.get(self.journal_path)
        return cur is f and cur is not None and cur.durable[pos:pos + len(fr)] == fr

    def confirm(self) -> None:
        """Check the decisions that are durable now against the other replicas'."""
        if not self.pending:
            return
        w = self._node.world
        rest = []
        for f, pos, fr, rec in self.pending:
            if rec.slot <= self.snap_slot or self._on_disk(f, pos, fr):
                w.check_decided(self._node.id, rec.slot, rec.batch)
            else:
                rest.append((f, pos, fr, rec))
        self.pending = rest

    def load(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        snap, records = super().load()
        if snap is not None:
            self.snap_slot = _snap_decoder.decode(snap).slot
        f = self._node.fs.files.get(self.journal_path)
        for off, p in records:
            rec = _jdec.decode(p)
            if isinstance(rec, DecidedRec):
                self.pending.append((f, off, frame(p), rec))
        self.confirm()
        return snap, records

    def when_durable(self, callback: Callable[[BaseException | None], None], *, start: bool = True) -> bool:
        def checked(err: BaseException | None) -> None:
            if err is None:
                self.confirm()
            callback(err)

        return super().when_durable(checked, start=start)

    def append(self, payloads: list[bytes]) -> None:
        fs = self._node.fs
        f = fs.files.get(self.journal_path)
        before = len(f.data) if f is not None else 0
        try:
            super().append(payloads)
        except JournalError:
            # a write that fails part-way (a full disk) can leave whole records behind, which the
            # replica applies again after a restart
            f = fs.files.get(self.journal_path)
            written, _ = scan_journal(bytes(f.data[before:]) if f is not None else b"")
            for off, p in written:
                rec = _jdec.decode(p)
                if isinstance(rec, DecidedRec):
                    self.pending.append((f, before + off, frame(p), rec))
            raise
        f = fs.files.get(self.journal_path)
        frames = [frame(p) for p in payloads]
        pos = (len(f.data) if f is not None else 0) - sum(len(x) for x in frames)
        for p, fr in zip(payloads, frames, strict=True):
            rec = _jdec.decode(p)
            if isinstance(rec, DecidedRec):
                self.pending.append((f, pos, fr, rec))
            else:
                self.marks[_msg_key(rec.msg)] = (f, pos, fr)
            pos += len(fr)

    def save_snapshot(self, data: bytes, keep: list[bytes] | None = None) -> None:
        # Before the real save: it releases the sends that waited (synchronously, once the new files
        # are durable). Slots up to the snapshot's are decided for good, so what was sent in them
        # cannot change any more; the kept records are in the new, fsynced journal.
        snap_slot = max(self.snap_slot, _snap_decoder.decode(data).slot)
        marks: dict[tuple[str, int, int], tuple[object, int, bytes]] = {}
        for p in keep or []:
            rec = _jdec.decode(p)
            if isinstance(rec, SentRec):
                marks[_msg_key(rec.msg)] = (_KEPT, 0, b"")
        self.snap_slot, self.marks = snap_slot, marks
        self.confirm()
        self.pending = [x for x in self.pending if x[3].slot > snap_slot]
        super().save_snapshot(data, keep)

    def is_durable(self, msg: Proposal | StateMsg | VoteMsg) -> bool:
        if msg.slot <= self.snap_slot:
            return True
        mark = self.marks.get(_msg_key(msg))
        if mark is None:
            return False
        if mark[0] is _KEPT:
            return True
        return self._on_disk(*mark)


_KEPT = object()


def _msg_key(m: Proposal | StateMsg | VoteMsg) -> tuple[str, int, int]:
    if isinstance(m, Proposal):
        return ("p", m.slot, 0)
    if isinstance(m, StateMsg):
        return ("s", m.slot, m.phase)
    return ("v", m.slot, m.phase)


class SimTransport:
    """The runner's `PeerSender` for one incarnation of a node."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.dead = False

    def send(self, peer: str, msg: Any) -> bool:
        if self.dead:
            return False
        w = self.node.world
        w.on_wire(self.node, msg)
        w.net_send(self.node.id, peer, _enc.encode(msg))
        return True

    def broadcast(self, msg: Any, to: Sequence[str] | None = None) -> None:
        if self.dead:
            return
        node = self.node
        w = node.world
        w.on_wire(node, msg)
        data = _enc.encode(msg)
        peers = [m for m in (w.members if to is None else to) if m != node.id]
        if to is not None and isinstance(msg, (Proposal, StateMsg, VoteMsg)):
            w.check_slot_members(node.id, msg.slot, to)
        cut = len(peers)
        if w.sc.crash_on_send and w.faults_on and w.rng.random() < w.sc.crash_on_send:
            cut = w.rng.randrange(len(peers))
        for i, p in enumerate(peers):
            if i == cut:
                w.log(f"{node.id} dies part-way through a broadcast ({i}/{len(peers)} sent)")
                w.crash(node, "kill")
                return
            w.net_send(node.id, p, data)


class _Quiet(logging.Logger):
    """A logger (not registered globally) that turns error records into simulation failures."""

    def __init__(self, world: World, name: str) -> None:
        super().__init__(name, logging.DEBUG if world.verbose else logging.WARNING)
        self.world = world
        self.propagate = False

    def handle(self, record: logging.LogRecord) -> None:
        w = self.world
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            msg += f": {record.exc_info[1]!r}"
        if record.levelno >= logging.ERROR and not w.expected_error(self.name, msg):
            w.errors.append(f"{self.name}: {msg}")
        if w.verbose:
            w.log(f"log {self.name} {record.levelname}: {msg}")


class SimNode:
    """One cluster member: its disk survives restarts; runner, stores and writers do not."""

    def __init__(self, world: World, node_id: str) -> None:
        self.world = world
        self.id = node_id
        rng = world.rng
        self.fs = SimFileSystem(schedule=self._schedule_fsync)
        self.gen = 0
        self.up = False
        self.failing = False  # runner failed (disk fault): the process is exiting
        self.runner: ConsensusRunner | None = None
        self.store: CheckedStore | None = None
        self.sm: KVStateMachine | None = None
        self.kv: KVStore | None = None
        self.transport: SimTransport | None = None
        self.reported: set[str] = set()  # peers this incarnation was told are up
        self.pending_link: set[str] = set()
        self.conns: list[asyncio.Future[Result]] = []  # client attempts waiting on this incarnation
        self.writer: asyncio.Task[None] | None = None
        self.writer_gen = 0
        # clocks: an arbitrary monotonic base, a skewed wall clock, a small drift
        self.mono_off = rng.uniform(0.0, 10_000.0)
        self.wall_off = rng.uniform(-world.sc.skew, world.sc.skew) if world.sc.skew else 0.0
        self.rate = 1.0 + (rng.uniform(-5e-4, 5e-4) if world.sc.skew else 0.0)
        self.restart_handle: asyncio.TimerHandle | None = None
        self.stopping = False

    def _schedule_fsync(self, delay: float, fn: Callable[[], None]) -> None:
        lo, hi = self.world.sc.fsync_delay
        self.world.loop.call_later(delay + self.world.rng.uniform(lo, hi), fn)

    def clock(self) -> float:
        return self.world.loop.time() * self.rate + self.mono_off

    def wall(self) -> float:
        return WALL0 + self.world.loop.time() * self.rate + self.wall_off

    def start(self) -> None:
        w = self.world
        self.gen += 1
        gen = self.gen
        self.fs.fail_writes = None
        self.fs.fail_fsync = None
        self.fs.capacity = None
        self.sm = KVStateMachine(max_sessions=w.sc.max_sessions)
        self.store = w.make_store(self, gen)
        self.runner = ConsensusRunner(
            self.id, w.members, self.sm, self.store, seed=b"sim", config=w.sc.engine,
            tick_interval=w.sc.tick, logger=_Quiet(w, f"runner.{self.id}.{gen}"),
            clock=self.clock, wall=self.wall,
        )
        self.runner.on_fatal.append(lambda e, g=gen: w.on_fatal(self, g, e))
        self.runner.on_members.append(lambda ev: w.check_epoch(self.id, ev))
        self.runner.recover()
        self.transport = SimTransport(self)
        self.runner.start(self.transport)
        self.up = True
        self.failing = False
        self.reported = set()
        self.pending_link = set()
        self.kv = self._make_kv(0)
        self.writer_gen = 0
        w.log(f"start {self.id} gen {gen} at slot {self.runner.engine.applied} "
              f"(incarnation {self.runner.engine.incarnation})")
        if w.sc.writers:
            self.start_writer()

    def _make_kv(self, writer_gen: int) -> KVStore:
        assert self.runner is not None and self.sm is not None
        if self.world.sc.kv_sessions == "legacy":
            # the old bug, as a mutant: one session id for every incarnation, seq from 1 each time
            return KVStore(self.runner, self.sm, self.id, session=f"kv-{self.id}")
        if writer_gen == 0:
            return KVStore(self.runner, self.sm, self.id)  # its own session: kv-{id}-{incarnation}
        inc = self.runner.engine.incarnation
        return KVStore(self.runner, self.sm, self.id, session=f"kv-{self.id}-{inc}-w{writer_gen}")

    def start_writer(self) -> None:
        w = self.world
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
        kv = self.kv if self.writer_gen == 0 else self._make_kv(self.writer_gen)
        assert kv is not None
        self.writer = w.spawn(w.internal_writer(self, kv, self.gen, self.writer_gen))
        self.writer_gen += 1

    def stop_process(self) -> None:
        """The process is gone: nothing more is sent, answered or scheduled by it."""
        self.up = False
        if self.transport is not None:
            self.transport.dead = True
        r = self.runner
        if r is not None:
            r._stopped = True
            if r._tick_task is not None:
                r._tick_task.cancel()
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        conns, self.conns = self.conns, []
        for f in conns:
            if not f.done():
                f.set_exception(ConnectionError(f"{self.id} went away"))


# --- the world -------------------------------------------------------------------------------------


_INDET = object()  # outcome unknown
_REJECTED = object()  # definitely not applied


@dataclass
class _ListOp:
    client: str
    key: str
    elem: int
    call: float
    cas_tried: bool = False


class World:
    """One seeded run of a simulated cluster (see the module docstring)."""

    def __init__(self, seed: int, scenario: Scenario, *, verbose: bool = False, profile: str = "") -> None:
        self.seed = seed
        self.profile = profile
        self.sc = scenario
        self.rng = random.Random(seed)
        self.verbose = verbose
        self.loop = VirtualTimeLoop()
        self.members = [f"n{i}" for i in range(1, scenario.nodes + 1)]
        self.f = (scenario.nodes - 1) // 2
        self.blocked: set[tuple[str, str]] = set()
        self.faults_on = True
        self.healed = False
        self.drop = scenario.drop
        self.errors: list[str] = []
        self.violations: list[str] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.stats = {"sent": 0, "delivered": 0, "dropped": 0, "kills": 0, "power_losses": 0, "stops": 0,
                      "disk_faults": 0, "fatal": 0, "partitions": 0, "clock_jumps": 0, "writer_restarts": 0,
                      "retries": 0, "indeterminate": 0, "max_queue": 0, "session_refusals": 0}
        # invariant state
        self.sent_vals: dict[tuple[str, str, int, int], object] = {}
        self.votes: dict[tuple[int, int], int] = {}
        self.cands: dict[int, object] = {}
        self.decided: dict[int, Batch | None] = {}
        # workloads
        self.reg_keys = ["user/r0", "user/r1"]
        self.list_keys = ["user/l0", "user/l1", "user/l2"]
        self.history: list[LinOp] = []
        self.appends: list[Append] = []
        self.reads: list[Read] = []
        self._elems = itertools.count(1)
        self._values = itertools.count(1)
        self.clients_done = 0
        self.writers_left: dict[str, int] = {}
        self.nodes: dict[str, SimNode] = {}
        self.loop.set_exception_handler(self._on_loop_error)
        self.store_factory: Callable[[SimNode, int], CheckedStore] = CheckedStore
        self.check_durable_sends = True
        self.allow_errors: list[str] = []
        self.main_task: asyncio.Task[None] | None = None
        self.closing = False
        self.last_success = 0.0  # when a client or writer operation last succeeded
        # membership: the member set each slot's messages went to, and each epoch's set
        self.slot_members: dict[int, frozenset[str]] = {}
        self.epochs: dict[int, tuple[str, ...]] = {0: tuple(self.members)}
        self.member_stats = {"ok": 0, "refused_by_log": 0, "refused_at_submit": 0, "unknown": 0}
        self._change_tasks: list[asyncio.Task[bool]] = []

    # --- plumbing ---------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{self.loop.time():9.4f}] {msg}", file=sys.stderr)

    def now(self) -> float:
        return self.loop.time()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self.tasks.append(t)
        if len(self.tasks) > 64:
            self.tasks = [x for x in self.tasks if not x.done()]
        return t

    def make_store(self, node: SimNode, gen: int) -> CheckedStore:
        return self.store_factory(node, gen)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        msg = ctx.get("message", "")
        if isinstance(exc, InvariantViolation) or self.violations:
            return  # already recorded where it was raised
        self.errors.append(f"{msg}: {exc!r}" if exc else msg)

    def expected_error(self, logger: str, msg: str) -> bool:
        # the runner logs CRITICAL when the journal fails; that is the fail-stop we provoke
        return "consensus stops" in msg or any(a in msg for a in self.allow_errors)

    def violation(self, msg: str) -> None:
        self.violations.append(msg)
        self.log(f"VIOLATION {msg}")
        if len(self.violations) == 1 and self.main_task is not None:
            self.main_task.cancel()  # stop the run: the first violation is the report
        raise InvariantViolation(msg)

    # --- invariants -------------------------------------------------------------------------------

    def on_wire(self, node: SimNode, msg: Any) -> None:
        self.stats["sent"] += 1
        s = node.id
        if node.runner is not None and node.runner.failed is not None:
            self.violation(f"{s} sent {type(msg).__name__} after its journal failed (no fail-stop)")
        if isinstance(msg, (Proposal, StateMsg, VoteMsg)):
            if isinstance(msg, Proposal):
                k = (s, "p", msg.slot, 0)
                val: object = None if msg.batch is None else msg.batch.id
            elif isinstance(msg, StateMsg):
                k = (s, "s", msg.slot, msg.phase)
                val = msg.bit
            else:
                k = (s, "v", msg.slot, msg.phase)
                val = msg.vote
            prev = self.sent_vals.setdefault(k, val)
            if prev != val:
                self.violation(f"{s} equivocated: sent {k[1]!r} {prev!r} and then {val!r} for slot {k[2]} "
                               f"phase {k[3]} (now in generation {node.gen})")
            if self.check_durable_sends and node.store is not None and not node.store.is_durable(msg):
                self.violation(f"{s} sent {type(msg).__name__} for slot {msg.slot} before its journal record "
                               "was durable")
            if isinstance(msg, VoteMsg) and msg.vote != VOTE_UNDECIDED:
                pv = self.votes.setdefault((msg.slot, msg.phase), msg.vote)
                if pv != msg.vote:
                    self.violation(f"two non-? vote values in slot {msg.slot} phase {msg.phase}")
            cand = getattr(msg, "cand", None)
            if cand is not None:
                pc = self.cands.setdefault(msg.slot, cand)
                if pc != cand:
                    self.violation(f"two candidates named in slot {msg.slot}: {pc} and {cand} (by {s})")
        elif isinstance(msg, Decision):
            self.check_decided(s, msg.slot, msg.batch, "decision")
        elif isinstance(msg, CatchupReply):
            for e in msg.entries:
                self.check_decided(s, e.slot, e.batch, "catch-up")
        elif isinstance(msg, ProposalReply) and msg.cand is not None:
            pc = self.cands.setdefault(msg.slot, msg.cand)
            if pc != msg.cand:
                self.violation(f"{s} answered a proposal request for slot {msg.slot} naming {msg.cand}, "
                               f"not the candidate {pc}")

    def check_slot_members(self, node: str, slot: int, group: Any) -> None:
        """Every replica sends a slot's messages to the same member set (itself included)."""
        ms = frozenset(group) | {node}
        prev = self.slot_members.setdefault(slot, ms)
        if prev != ms:
            self.violation(f"slot {slot}: {node} takes part with member set {sorted(ms)}, another "
                           f"replica with {sorted(prev)}")

    def check_epoch(self, node: str, ev: MembersChanged) -> None:
        """Every replica gives an epoch the same member set."""
        for epoch, members in ((ev.epoch, ev.members), (ev.epoch + 1, ev.pending)):
            if members is None:
                continue
            prev = self.epochs.setdefault(epoch, members)
            if prev != members:
                self.violation(f"epoch {epoch}: {node} has members {list(members)}, another replica "
                               f"{list(prev)}")

    async def member_driver(self) -> None:
        """Remove members and add them back through a random member while the faults go on."""
        rng = self.rng
        while self.faults_on:
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            live = [n for n in self.nodes.values() if n.up and not n.failing and n.runner is not None
                    and n.runner.failed is None and n.runner.engine.is_member]
            if not self.faults_on or not live:
                continue
            via = rng.choice(live)
            assert via.runner is not None
            members = list(via.runner.engine.members)
            outside = [m for m in self.members if m not in members]
            if outside and (len(members) <= 2 or rng.random() < 0.5):
                change = MemberChange("add", rng.choice(outside))
            elif len(members) > 1:
                change = MemberChange("remove", rng.choice(members))
            else:
                continue
            self._change_tasks.append(self.spawn(self._change(via, change)))

    async def _change(self, via: SimNode, change: MemberChange) -> bool:
        runner = via.runner
        if runner is None:
            return False
        try:
            res = await runner.change_members(change, timeout=1.5)
        except MembershipRefused as e:
            self.member_stats["refused_at_submit"] += 1
            self.log(f"{via.id} refuses {change.op} {change.node}: {e}")
            return False
        except (QuorumLost, CommitTimeout, JournalError) as e:
            self.member_stats["unknown"] += 1
            self.log(f"{change.op} {change.node} through {via.id}: outcome unknown ({e})")
            return False
        key = "ok" if res.ok else "refused_by_log"
        self.member_stats[key] += 1
        self.log(f"{change.op} {change.node} through {via.id}: {res}")
        return res.ok

    async def restore_members(self) -> None:
        """After healing: add back every node that is not a member, until all agree on that.

        A change submitted before healing may still commit afterwards (its waiter timed out, its
        batch is still queued): done only once every queue is empty and every replica is at the
        same slot with every node a member."""
        await asyncio.gather(*self._change_tasks, return_exceptions=True)
        t0 = self.now()
        while True:
            engines = [n.runner.engine for n in self.nodes.values() if n.up and n.runner is not None]
            full = [e for e in engines if set(e.members) == set(self.members) and e.pending_config is None]
            quiet = not any(e.pending_batches for e in engines) and len({e.applied for e in engines}) == 1
            if len(full) == len(self.nodes) and quiet:
                return
            if self.now() - t0 > self.sc.settle_cap:
                self.violation("liveness: the member set was not restored after healing: " +
                               ", ".join(f"{e.node_id}={list(e.members)}" for e in engines))
            members = [e for e in engines if e.is_member]
            top = max(members, key=lambda e: (e.epoch, e.applied), default=None)
            if top is not None and top.pending_config is None:
                missing = [m for m in self.members if m not in top.members]
                if missing:
                    await self._change(self.nodes[top.node_id], MemberChange("add", missing[0]))
            await asyncio.sleep(0.1)

    def check_decided(self, node: str, slot: int, batch: Batch | None, how: str = "journal") -> None:
        """A decision on `node`'s disk (how="journal") or on the wire: the same everywhere."""
        if slot in self.decided:
            prev = self.decided[slot]
            if prev != batch:
                self.violation(
                    f"slot {slot}: {node} has {_bdesc(batch)} ({how}), others applied {_bdesc(prev)}"
                )
        elif how == "journal":
            self.decided[slot] = batch
        else:
            self.violation(f"{node} sent a decision for slot {slot} that is on nobody's disk ({how})")

    # --- network ----------------------------------------------------------------------------------

    def net_send(self, src: str, dst: str, data: bytes) -> None:
        sc = self.sc
        rng = self.rng
        node = self.nodes[dst]
        if (src, dst) in self.blocked or not node.up:
            self.stats["dropped"] += 1
            return
        if self.drop and rng.random() < self.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if sc.dup and rng.random() < sc.dup else 1
        for _ in range(copies):
            delay = rng.uniform(sc.delay_min, sc.delay_max)
            if sc.spike and rng.random() < sc.spike:
                delay += rng.uniform(0.02, 0.2)
            self.loop.call_later(delay, self._deliver, src, node, node.gen, data)

    def _deliver(self, src: str, node: SimNode, gen: int, data: bytes) -> None:
        if not node.up or node.gen != gen or (src, node.id) in self.blocked:
            self.stats["dropped"] += 1
            return
        self.stats["delivered"] += 1
        assert node.runner is not None
        node.runner.on_message(src, _dec.decode(data))

    def visible(self, peer: str, observer: str) -> bool:
        """Would `observer`'s transport see `peer` up (heartbeats from peer arrive)?"""
        return self.nodes[peer].up and (peer, observer) not in self.blocked

    def topology_changed(self) -> None:
        """Schedule the peer up/down reports the transports would give after this change."""
        rng = self.rng
        for o in self.members:
            obs = self.nodes[o]
            if not obs.up:
                continue
            for p in self.members:
                if p == o or p in obs.pending_link:
                    continue
                want = self.visible(p, o)
                if want == (p in obs.reported):
                    continue
                if want:
                    delay = rng.uniform(0.01, 0.2)  # redial and handshake
                elif not self.nodes[p].up:
                    delay = rng.uniform(0.0005, 0.005)  # connection reset
                else:
                    delay = rng.uniform(*self.sc.heartbeat_timeout)
                obs.pending_link.add(p)
                self.loop.call_later(delay, self._link_check, obs, obs.gen, p)

    def _link_check(self, obs: SimNode, gen: int, p: str) -> None:
        if not obs.up or obs.gen != gen:
            return
        obs.pending_link.discard(p)
        want = self.visible(p, obs.id)
        assert obs.runner is not None
        if want and p not in obs.reported:
            obs.reported.add(p)
            obs.runner.peer_up(p)
        elif not want and p in obs.reported:
            obs.reported.discard(p)
            obs.runner.peer_down(p)
        self.topology_changed()

    # --- node faults ------------------------------------------------------------------------------

    def crash(self, node: SimNode, how: str) -> None:
        """kill (process crash: the page cache survives) or power loss (unsynced writes lost)."""
        if not node.up:
            return
        slot = node.runner.engine.applied if node.runner else "-"
        self.log(f"{how} {node.id} (gen {node.gen}, slot {slot})")
        node.stop_process()
        node.fs.crash()
        if how == "power":
            self.stats["power_losses"] += 1
            node.fs.power_loss(self.rng)
        else:
            self.stats["kills"] += 1
        self.topology_changed()

    async def clean_stop(self, node: SimNode) -> None:
        if not node.up or node.runner is None:
            return
        self.stats["stops"] += 1
        self.log(f"clean stop {node.id} (gen {node.gen}, slot {node.runner.engine.applied}, "
                 f"in slot {node.runner.engine.slot})")
        runner = node.runner
        node.stop_process()
        runner._stopped = False  # stop() below does the orderly shutdown
        self.topology_changed()
        node.stopping = True
        try:
            await runner.stop()
        finally:
            node.stopping = False
        node.fs.crash()

    def on_fatal(self, node: SimNode, gen: int, exc: BaseException) -> None:
        if node.gen != gen or not node.up:
            return
        self.stats["fatal"] += 1
        self.log(f"{node.id} fails: {exc}")
        node.failing = True
        # the node process exits (page cache survives); it is restarted later on a healed disk
        self.loop.call_soon(self._exit_after_fatal, node, gen)

    def _exit_after_fatal(self, node: SimNode, gen: int) -> None:
        if node.gen != gen or not node.up:
            return
        self.crash(node, "kill")
        self.schedule_restart(node)

    def schedule_restart(self, node: SimNode, delay: float | None = None) -> None:
        if delay is None:
            delay = self.rng.uniform(*self.sc.downtime)
        gen = node.gen
        if node.restart_handle is not None:
            node.restart_handle.cancel()
        node.restart_handle = self.loop.call_later(delay, self._restart, node, gen)

    def _restart(self, node: SimNode, gen: int) -> None:
        if node.up or node.gen != gen:
            return
        node.restart_handle = None
        node.start()
        self.topology_changed()

    def down_count(self) -> int:
        return sum(1 for n in self.nodes.values() if not n.up or n.failing)

    async def node_fault_driver(self) -> None:
        sc = self.sc
        rng = self.rng
        kinds = [(k, w) for k, w in sorted(sc.kinds.items()) if w > 0]
        if sc.nodes < 5:
            kinds = [(k, w) for k, w in kinds if k != "long_outage"]
        if not kinds:
            return
        total = sum(w for _, w in kinds)
        while True:
            await asyncio.sleep(rng.uniform(*sc.fault_gap))
            if not self.faults_on:
                return
            x = rng.uniform(0, total)
            kind = kinds[-1][0]
            for k, wt in kinds:
                x -= wt
                if x <= 0:
                    kind = k
                    break
            victim = self.nodes[rng.choice(self.members)]
            if kind == "clock_jump":
                # a suspended VM: the monotonic clock jumps forward; the wall clock too, or NTP steps
                # it back (which only matters to the next incarnation)
                j = rng.uniform(0.2, 3.0)
                victim.mono_off += j
                victim.wall_off += j if rng.random() < 0.7 else -rng.uniform(0.1, 2.0)
                self.stats["clock_jumps"] += 1
                self.log(f"clock of {victim.id} jumps forward {j:.2f}s")
                continue
            if kind == "writer_restart":
                if victim.up and sc.writers:
                    self.stats["writer_restarts"] += 1
                    self.log(f"writer on {victim.id} restarts")
                    victim.start_writer()
                continue
            if kind == "long_outage":
                if self.down_count() > 0:
                    continue
                pair = rng.sample(self.members, 2)
                for nid in pair:
                    n = self.nodes[nid]
                    self.crash(n, rng.choice(["kill", "power"]))
                    self.schedule_restart(n, rng.uniform(1.0, 3.0))
                continue
            if not victim.up or victim.failing:
                continue
            if self.down_count() >= self.f and rng.random() >= sc.majority_down:
                continue
            if kind in ("kill", "power"):
                self.crash(victim, kind)
                self.schedule_restart(victim)
            elif kind == "stop":
                await self.clean_stop(victim)
                self.schedule_restart(victim)
            else:
                self.stats["disk_faults"] += 1
                fs = victim.fs
                if kind == "enospc":
                    if rng.random() < 0.5:
                        fs.fail_writes = errno.ENOSPC
                    else:  # full part-way through a record: a torn tail
                        fs.capacity = fs._used() + rng.randrange(1, 64)
                elif kind == "eio":
                    fs.fail_writes = errno.EIO
                else:
                    fs.fail_fsync = errno.EIO
                self.log(f"disk of {victim.id}: {kind}")

    async def partition_driver(self) -> None:
        sc = self.sc
        rng = self.rng
        while True:
            await asyncio.sleep(rng.uniform(*sc.part_gap))
            if not self.faults_on:
                return
            shape = rng.choice(sc.shapes)
            ms = list(self.members)
            rng.shuffle(ms)
            dur = rng.uniform(*sc.part_len)
            if shape == "majority":
                k = len(ms) // 2
                self.set_blocked(_split([ms[:k], ms[k:]]), shape)
            elif shape == "all_minority":
                groups = [[m] for m in ms] if len(ms) == 3 else [ms[:2], ms[2:4], ms[4:]]
                self.set_blocked(_split(groups), shape)
            elif shape == "one_way":
                # one node's outgoing links (or a single link) drop everything; the way back works
                one = rng.random() < 0.5
                self.set_blocked({(ms[0], ms[1])} if one else {(ms[0], b) for b in ms[1:]}, shape)
            elif shape == "bridge":
                # two sides that only reach each other through one node
                k = len(ms) // 2
                left, bridge, right = ms[:k], ms[k], ms[k + 1:]
                self.set_blocked(_split([left, right]), f"bridge via {bridge}")
            else:  # flapping
                k = rng.randrange(1, len(ms))
                blocked = _split([ms[:k], ms[k:]])
                end = self.now() + dur
                while self.now() < end and self.faults_on:
                    self.set_blocked(blocked, "flap")
                    await asyncio.sleep(rng.uniform(0.01, 0.15))
                    self.set_blocked(set(), "flap heal")
                    await asyncio.sleep(rng.uniform(0.01, 0.15))
                continue
            await asyncio.sleep(dur)
            if not self.faults_on:
                return
            self.set_blocked(set(), "heal")

    def set_blocked(self, blocked: set[tuple[str, str]], what: str) -> None:
        if blocked:
            self.stats["partitions"] += 1
        self.blocked = blocked
        self.log(f"network: {what} {sorted(blocked) if blocked else ''}")
        self.topology_changed()

    # --- clients ----------------------------------------------------------------------------------

    def _pick_node(self, avoid: str | None) -> SimNode | None:
        live = [n for n in self.members if self.nodes[n].up and not self.nodes[n].failing]
        if avoid is not None and len(live) > 1 and avoid in live:
            live.remove(avoid)
        return self.nodes[self.rng.choice(live)] if live else None

    async def command(self, client: SessionClient, op: Any) -> Any:
        """Run one command for `client`, resubmitting the same bytes through other nodes until an
        answer (a `Result`), or `_INDET` / `_REJECTED` once the deadline passes during faults.

        A new session opens with a read (seq 1, not part of the history): seq 1 is the one command
        a state machine that forgot the session (evicted it) would run again, so it must be one
        whose repetition is harmless, like `AetherClient`'s lane opening."""
        if client.seq == 0:
            opened = await self._command(client, Get(op.key))
            if not isinstance(opened, Result):
                return opened
        return await self._command(client, op)

    async def _command(self, client: SessionClient, op: Any) -> Any:
        client.seq += 1
        cmd = encode_command(op, client.session, client.seq)
        deadline = self.now() + self.sc.op_deadline
        maybe_applied = False
        node: SimNode | None = None
        attempts = 0
        stay = False
        while True:
            if self.closing:
                raise asyncio.CancelledError  # (wait_for may swallow a cancellation)
            if not self.healed and self.now() > deadline:
                # like AetherClient, which drops a lane after a failure: the next command starts a
                # new session (the state machine refuses seq > 1 of a session it never saw start)
                client.new_session()
                return _INDET if maybe_applied else _REJECTED
            if not (stay and node is not None and node.up and not node.failing):
                node = self._pick_node(node.id if node is not None else None)
            stay = False
            if node is None:
                await asyncio.sleep(self.rng.uniform(0.02, 0.1))
                continue
            attempts += 1
            if attempts > 1:
                self.stats["retries"] += 1
            assert node.runner is not None
            fut = node.runner.submit([cmd])[0]
            cf: asyncio.Future[Result] = self.loop.create_future()
            node.conns.append(cf)
            fut.add_done_callback(lambda f, n=node, g=node.gen, c=cf: _relay(f, n, g, c))
            # a client that waits longer after each attempt without an answer (no livelock when
            # commits take longer than its first timeout)
            backoff = 2 ** min(attempts - 1, 4) if self.sc.client_backoff else 1
            wait = min(self.sc.client_timeout * backoff, 4.0) * self.rng.uniform(1.0, 1.3)
            try:
                res = await asyncio.wait_for(cf, wait)
            except TimeoutError:
                maybe_applied = True
                self.log(f"{client.session} seq {client.seq}: no answer from {node.id}, resubmitting")
                continue
            except ConnectionError:
                maybe_applied = True
                await asyncio.sleep(self.rng.uniform(0.005, 0.05))
                continue
            except QuorumLost as e:
                if "not applied" not in str(e):
                    maybe_applied = True
                await asyncio.sleep(self.rng.uniform(0.01, 0.1))
                continue
            except CommitTimeout:
                # the node answered "not committed in time": like AetherClient, ask it again at once
                maybe_applied = True
                stay = True
                continue
            except (JournalError, AetherError):
                maybe_applied = True
                await asyncio.sleep(self.rng.uniform(0.01, 0.1))
                continue
            finally:
                with contextlib.suppress(ValueError):
                    node.conns.remove(cf)
            if res.error is not None:
                if self.sc.max_sessions < 1000:
                    self.stats["session_refusals"] += 1
                    client.new_session()
                    return _INDET
                self.violation(f"{client.session} seq {client.seq}: {type(op).__name__} on {op.key} answered "
                               f"with an error: {res.error}")
            return res

    async def session_client(self, client: SessionClient) -> None:
        rng = self.rng
        for i in range(self.sc.ops_per_client + 1):
            final = i == self.sc.ops_per_client
            if final:  # one more operation once the world has healed
                while not self.healed:
                    if self.closing:
                        raise asyncio.CancelledError  # (a swallowed cancellation must not wait forever)
                    await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            if rng.random() < 0.5:
                await self.register_op(client)
            else:
                await self.list_append_session(client)
        self.clients_done += 1

    async def register_op(self, client: SessionClient) -> None:
        rng = self.rng
        key = rng.choice(self.reg_keys)
        r = rng.random()
        value: Any = None
        expected: Any = None
        if r < 0.4:
            kind = "put"
            value = f"v{next(self._values)}".encode()
            op: Any = Put(key, value)
        elif r < 0.7:
            kind = "get"
            op = Get(key)
        elif r < 0.92:
            kind = "cas"
            node = self.nodes[rng.choice(self.members)]
            cur = node.sm.get(key) if node.sm is not None else None  # a plausible expectation
            expected = cur if rng.random() < 0.7 else None
            value = f"v{next(self._values)}".encode()
            op = Cas(key, expected, value)
        else:
            kind = "remove"
            op = Remove(key)
        call = self.now()
        res = await self.command(client, op)
        if res is _REJECTED:
            return
        if res is _INDET:
            self.stats["indeterminate"] += 1
            self.history.append(LinOp(client.idx, kind, key, value, expected, call, None, None))
            return
        assert isinstance(res, Result)
        if kind in ("put", "remove", "get") and not res.ok:
            self.violation(f"{kind} {key} failed: {res.error}")
        self.last_success = self.now()
        out: Any = res.value if kind == "get" else res.ok if kind == "cas" else None
        self.history.append(LinOp(client.idx, kind, key, value, expected, call, self.now(), out))

    async def list_append_session(self, client: SessionClient) -> None:
        key = self.rng.choice(self.list_keys)
        op = _ListOp(client.session, key, next(self._elems), self.now())
        while not self.closing:
            t0 = self.now()
            res = await self.command(client, Get(key))
            if not isinstance(res, Result):
                if not self.healed and self.now() - op.call > self.sc.op_deadline:
                    self._end_append(op, "maybe" if op.cas_tried else "fail")
                    return
                continue
            cur = res.value
            self.reads.append(Read(client.session, key, self.as_list(key, cur), t0, self.now()))
            new = encode_list([*decode_list(cur), op.elem])
            t0 = self.now()
            op.cas_tried = True
            res = await self.command(client, Cas(key, cur, new))
            if res is _INDET:
                self._end_append(op, "maybe")
                return
            if res is _REJECTED:
                continue
            assert isinstance(res, Result)
            if res.ok:
                self._end_append(op, "ok")
                return
            self.reads.append(Read(client.session, key, self.as_list(key, res.value), t0, self.now()))
            if not self.healed and self.now() - op.call > self.sc.op_deadline:
                self._end_append(op, "fail")
                return

    def as_list(self, key: str, data: bytes | None) -> tuple[int, ...]:
        try:
            return decode_list(data)
        except ValueError:
            self.violation(f"read of list {key} returned {data!r}, which no client wrote there")
            raise

    def _end_append(self, op: _ListOp, status: str) -> None:
        if status == "ok":
            self.last_success = self.now()
        if status == "maybe":
            self.stats["indeterminate"] += 1
        self.appends.append(Append(op.client, op.key, op.elem, op.call,
                                   self.now() if status == "ok" else None, status))

    async def internal_writer(self, node: SimNode, kv: KVStore, gen: int, wgen: int) -> None:
        """A node-internal component appending through the node's KVStore (dies with the node)."""
        rng = self.rng
        who = f"w-{node.id}.{gen}.{wgen}"
        while self.writers_left.get(node.id, 0) > 0 and not self.closing:
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            key = rng.choice(self.list_keys)
            op = _ListOp(who, key, next(self._elems), self.now())
            status = "fail"
            refused = False
            try:
                while not self.closing:
                    t0 = self.now()
                    try:
                        cur = await kv.get(key, timeout=1.0)
                    except (CommitTimeout, QuorumLost, JournalError):
                        await asyncio.sleep(rng.uniform(0.02, 0.1))
                        if not self.healed and self.now() - op.call > self.sc.op_deadline:
                            break
                        continue
                    except AetherError as e:
                        refused = self._writer_refused(who, "get", e)
                        break
                    self.reads.append(Read(who, key, self.as_list(key, cur), t0, self.now()))
                    new = encode_list([*decode_list(cur), op.elem])
                    op.cas_tried = True
                    try:
                        ok = await kv.compare_and_set(key, cur, new, timeout=1.0)
                    except QuorumLost as e:
                        if "not applied" in str(e):
                            await asyncio.sleep(rng.uniform(0.02, 0.1))
                            continue
                        status = "maybe"
                        break
                    except (CommitTimeout, JournalError):
                        status = "maybe"
                        break
                    except AetherError as e:
                        refused = self._writer_refused(who, "compare_and_set", e)
                        status = "maybe"
                        break
                    if ok:
                        status = "ok"
                        break
                    if not self.healed and self.now() - op.call > self.sc.op_deadline:
                        break
            except asyncio.CancelledError:
                self._end_append(op, "maybe" if op.cas_tried else "fail")
                self.writers_left[node.id] -= 1
                raise
            self._end_append(op, status)
            self.writers_left[node.id] -= 1
            if refused:  # its session was evicted: the component starts over with a new KVStore
                self.loop.call_soon(self._restart_writer, node, gen)
                return

    def _writer_refused(self, who: str, what: str, e: Exception) -> bool:
        """A KVStore command was refused: a bug, unless its session may have been evicted."""
        if self.sc.max_sessions < 1000:
            self.stats["session_refusals"] += 1
            self.log(f"{who}: KVStore.{what} refused ({e}); the writer starts a new session")
            return True
        self.violation(f"{who}: KVStore.{what} refused: {e}")
        return True

    def _restart_writer(self, node: SimNode, gen: int) -> None:
        if node.up and node.gen == gen and not self.closing:
            node.start_writer()

    # --- running ----------------------------------------------------------------------------------

    async def main(self) -> None:
        sc = self.sc
        for m in self.members:
            self.nodes[m] = SimNode(self, m)
            self.writers_left[m] = sc.writer_ops if sc.writers else 0
        for m in self.members:
            self.nodes[m].start()
        self.topology_changed()
        drivers = []
        if sc.partitions:
            drivers.append(self.spawn(self.partition_driver()))
        if sc.node_faults:
            drivers.append(self.spawn(self.node_fault_driver()))
        if sc.member_changes:
            drivers.append(self.spawn(self.member_driver()))
        self.spawn(self.sampler())
        clients = [SessionClient(i) for i in range(sc.session_clients)]
        ctasks = [self.spawn(self.session_client(c)) for c in clients]
        await asyncio.sleep(sc.horizon)
        # heal: no new faults, the network whole again, every node up on a healthy disk
        self.faults_on = False
        for d in drivers:
            d.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        while any(n.stopping for n in self.nodes.values()):
            await asyncio.sleep(0.01)
        self.drop = sc.final_drop
        self.log(f"heal (drops stay at {self.drop:.2f})")
        self.set_blocked(set(), "heal")
        for n in self.nodes.values():
            if n.restart_handle is not None:
                n.restart_handle.cancel()
                n.restart_handle = None
            if n.failing and n.up:
                self.crash(n, "kill")
            if not n.up:
                n.start()
            n.fs.fail_writes = n.fs.fail_fsync = None
            n.fs.capacity = None
        self.topology_changed()
        self.healed = True
        if sc.member_changes:
            await self.restore_members()
        t_heal = self.now()
        for n in self.nodes.values():
            if sc.writers:
                self.writers_left[n.id] = max(self.writers_left[n.id], 1)
            if sc.writers and (n.writer is None or n.writer.done()) and self.writers_left[n.id] > 0:
                n.start_writer()
        # liveness: every client and writer finishes
        while True:
            writers_busy = any(self.writers_left[m] > 0 for m in self.members)
            if all(t.done() for t in ctasks) and not writers_busy:
                break
            since = self.now() - max(t_heal, self.last_success)
            if since > sc.settle or self.now() - t_heal > sc.settle_cap:
                self.violation(self._liveness_report(t_heal, ctasks))
            await asyncio.sleep(0.05)
        for t in ctasks:
            t.result()
        # convergence: queues drain, every replica at the same slot with the same state
        t_done = self.now()
        while True:
            engines = [n.runner.engine for n in self.nodes.values() if n.runner is not None]
            applied = {e.applied for e in engines}
            if len(applied) == 1 and not any(e.pending_batches for e in engines):
                break
            if self.now() - t_done > sc.settle_cap:
                self.violation("liveness: the backlog did not drain after the clients finished: " +
                               self._engines_report())
            await asyncio.sleep(0.05)
        self.stats["vtime_ms"] = int(self.now() * 1000)
        snaps = {n.id: n.sm.snapshot() for n in self.nodes.values() if n.sm is not None}
        if len(set(snaps.values())) != 1:
            self.violation("replicas at the same slot hold different state")

    async def sampler(self) -> None:
        """Watch the pending queues (the backlog must stay bounded and drain)."""
        while not self.closing:
            await asyncio.sleep(0.1)
            up = [n.runner.engine for n in self.nodes.values() if n.up and n.runner is not None]
            q = max((e.pending_batches for e in up), default=0)
            if q > self.stats["max_queue"]:
                self.stats["max_queue"] = q

    def _engines_report(self) -> str:
        parts = []
        for n in self.nodes.values():
            if n.runner is None:
                continue
            e = n.runner.engine
            c = e._cur
            prop = "-" if c.my_proposal is None else f"{c.my_proposal.id.origin}/{c.my_proposal.id.seq}"
            parts.append(
                f"{n.id}: up={n.up} applied={e.applied} slot={e.slot} queue={e.pending_batches} "
                f"inflight={len(e._inflight)} open={len(e._open)} peers_up={sorted(e._up)} "
                f"started={c.started} proposal={prop} proposals={len(c.proposals)} phase={c.phase} "
                f"decided={c.decided} future={sorted(e._future)}"
            )
        return "; ".join(parts)

    def _liveness_report(self, t_heal: float, ctasks: list[asyncio.Task[None]]) -> str:
        busy = sum(1 for t in ctasks if not t.done())
        writers = [m for m in self.members if self.writers_left[m] > 0]
        return (f"liveness: {self.now() - t_heal:.1f}s after healing, {busy} clients and the writers on "
                f"{writers} are not done, and no operation succeeded in the last "
                f"{self.now() - max(t_heal, self.last_success):.1f}s; " + self._engines_report())

    def run(self) -> None:
        quiet = logging.getLogger("aether.consensus.storage")
        old = quiet.level
        quiet.setLevel(logging.CRITICAL + 1 if not self.verbose else logging.DEBUG)
        try:
            main = self.main_task = self.loop.create_task(self.main())
            try:
                self.loop.run_until_complete(main)
            except SimDeadlock as e:
                raise InvariantViolation(f"deadlock: {e}") from None
            except (asyncio.CancelledError, InvariantViolation):
                if not self.violations:
                    raise
            except Exception as e:  # a client or driver saw something impossible (e.g. a non-list)
                if not self.violations:
                    self.violations.append(f"simulation error: {e!r}")
            finally:
                self._shutdown()
        finally:
            quiet.setLevel(old)
        if self.violations:
            raise InvariantViolation(self.violations[0])
        if self.errors:
            raise InvariantViolation(f"error on the loop or in a runner log: {self.errors[0]}")

    def _shutdown(self) -> None:
        self.faults_on = False  # fault drivers end even if a cancellation was swallowed
        self.closing = True
        for n in self.nodes.values():
            if n.up:
                n.stop_process()
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def check(self) -> tuple[CheckResult, list[str]]:
        """After `run()`: the register history's linearizability and the list-append problems."""
        lin = check_history(self.history)
        some = next(iter(self.nodes.values()))
        assert some.sm is not None
        final = {k: list(decode_list(some.sm.get(k))) for k in self.list_keys}
        problems = check_list_append(self.appends, self.reads, final)
        return lin, problems

    def fingerprint(self) -> str:
        """A digest of the whole run (identical for identical runs of one seed)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr(self.rng.getstate()).encode())
        h.update(repr(self.loop.time() if not self.loop.is_closed() else 0).encode())
        h.update(repr(sorted(self.stats.items())).encode())
        h.update(repr([(a.elem, a.status) for a in self.appends]).encode())
        return h.hexdigest()


class SessionClient:
    """An external client with one session (it may start a new one after an eviction)."""

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.n = 0
        self.session = f"c{idx}"
        self.seq = 0

    def new_session(self) -> None:
        self.n += 1
        self.session = f"c{self.idx}.{self.n}"
        self.seq = 0


def _relay(f: asyncio.Future[bytes], node: SimNode, gen: int, cf: asyncio.Future[Result]) -> None:
    """Pass a runner's answer to the client, unless the process that owes it is gone."""
    if f.cancelled():
        return
    exc = f.exception()  # retrieve it either way
    if cf.done() or not node.up or node.gen != gen:
        return
    if exc is not None:
        cf.set_exception(exc)
    else:
        cf.set_result(decode_result(f.result()))


def _split(groups: list[list[str]]) -> set[tuple[str, str]]:
    out = set()
    for g in groups:
        for h in groups:
            if g is not h:
                out.update((a, b) for a in g for b in h)
    return out


def _bdesc(b: Batch | None) -> str:
    return "NULL" if b is None else f"batch {b.id.origin}/{b.id.inc}/{b.id.seq} ({len(b.commands)} cmds)"


# --- entry points ------------------------------------------------------------------------------------


def scenario_for(seed: int, profile: str) -> Scenario:
    rng = random.Random(f"{profile}:{seed}")
    return PROFILES[profile](rng)


@dataclass
class Outcome:
    seed: int
    profile: str
    ok: bool
    error: str | None
    world: World


def run_node_seed(
    seed: int, profile: str = "ci", *, verbose: bool = False, nodes: int | None = None,
    setup: Callable[[World], None] | None = None,
) -> Outcome:
    """Run one seed of `profile` and check everything; never raises for a failed check."""
    sc = scenario_for(seed, profile)
    if nodes is not None:
        sc = replace(sc, nodes=nodes)
    w = World(seed, sc, verbose=verbose, profile=profile)
    if verbose:
        print(f"seed {seed} profile {profile}: {sc.describe()}", file=sys.stderr)
    if setup is not None:
        setup(w)
    try:
        w.run()
    except InvariantViolation as e:
        return Outcome(seed, profile, False, str(e), w)
    lin, problems = w.check()
    if not lin.ok:
        why = "timed out" if lin.timed_out else "not linearizable"
        return Outcome(seed, profile, False, f"register history {why}: {lin.explanation}", w)
    if problems:
        return Outcome(seed, profile, False, "list-append history: " + "; ".join(problems), w)
    return Outcome(seed, profile, True, None, w)
