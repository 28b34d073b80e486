"""Deterministic simulation of a Rabia cluster: seeded network, virtual clock, faults, clients.

The real `Engine` and `KVStateMachine` run unchanged; only the world around them is
simulated. Everything random comes from one `random.Random(seed)`, so a seed reproduces a
run exactly:

    python -m aether.testing.sim --seed 42 --profile engine -v

This is the fast engine-only profile. `aether.testing.nodesim` runs whole nodes (the real
runner, disk store and KV store); both share this command line:

    python -m aether.testing.sim --seeds 0:1000 --profile aggressive

Faults: message drops, duplicates, random delays (which reorder), partitions (majority /
minority, all-minority, flapping, asymmetric one-way), crashes (including in the middle of
an engine step, between persisting and sending) and restarts from the node's simulated disk.
Invariants are asserted while running (no two decisions for a slot, at most one non-'?'
vote value per (slot, phase)); at the end the run heals, every client must complete a final
operation (liveness), all replicas must hold identical state, and the client history must be
linearizable (checked by `aether.testing.lincheck`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import itertools
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from aether.consensus.engine import (
    Completed,
    Engine,
    EngineConfig,
    Failed,
    Installed,
    MembersChanged,
    MembershipRefused,
    Persist,
    SaveSnapshot,
    Send,
)
from aether.consensus.messages import (
    VOTE_UNDECIDED,
    BatchId,
    DecidedRec,
    JournalRecord,
    MemberChange,
    MemberResult,
    Proposal,
    RabiaMessage,
    SentRec,
    StateMsg,
    VoteMsg,
)
from aether.kv.machine import (
    UNKNOWN_SESSION,
    Cas,
    Get,
    KVStateMachine,
    Put,
    Remove,
    decode_result,
    encode_command,
    session_error_kind,
)
from aether.testing.lincheck import CheckResult, Op, check_history

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(RabiaMessage)
_jdec = msgspec.msgpack.Decoder(JournalRecord)
_mdec = msgspec.msgpack.Decoder(MemberResult)


_REJECTED = object()  # a definite failure: the command never took effect, so it is not in the history


class InvariantViolation(AssertionError):
    pass


@dataclass
class FaultProfile:
    drop: float = 0.0
    dup: float = 0.0
    delay_min: float = 0.0002
    delay_max: float = 0.003
    partitions: bool = False
    crashes: bool = False
    crash_mid_step: float = 0.0  # probability, per step of a node, of crashing part-way through it


@dataclass
class _Disk:
    snapshot: bytes | None = None
    journal: list[bytes] = field(default_factory=list)


@dataclass
class _ClientOp:
    client: int
    kind: str
    key: str
    value: Any
    expected: Any
    call: float
    node: str
    incarnation: int


class _SimNode:
    def __init__(self, sim: Simulation, node_id: str, *, spare: bool = False) -> None:
        self.sim = sim
        self.id = node_id
        self.disk = _Disk()
        self.incarnation = 0
        self.alive = False
        self.engine: Engine | None = None
        self.sm: KVStateMachine | None = None
        self.pending: dict[int, _ClientOp] = {}
        self.changes: dict[int, MemberChange] = {}  # membership changes submitted here
        # a spare joins later (`aether node --join`): it is told the member set then, and starts
        # as a learner with it; the others start with the configured set
        self.spare = spare
        self.join_members: list[str] | None = None
        if not spare:
            self.start()

    def start(self) -> None:
        self.incarnation += 1
        self.sm = KVStateMachine()
        members = self.join_members if self.spare else self.sim.members
        assert members is not None
        self.engine = Engine(
            self.id, members, self.sm, seed=b"sim", incarnation=self.incarnation,
            config=self.sim.engine_config, learner=self.spare,
        )
        records = [_jdec.decode(r) for r in self.disk.journal]
        self.engine.recover(self.disk.snapshot, records)
        self.alive = True
        self.pending = {}
        self.changes = {}

    def crash(self) -> None:
        self.alive = False
        self.engine = None
        for op in self.pending.values():
            self.sim.finish(op, None)
        self.pending = {}
        for ch in self.changes.values():
            self.sim.change_done(ch, None)
        self.changes = {}


class Simulation:
    """One seeded run. `run()` returns the history; raises InvariantViolation on a safety bug."""

    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        *,
        clients: int = 4,
        ops_per_client: int = 30,
        keys: int = 3,
        faults: FaultProfile | None = None,
        engine_config: EngineConfig | None = None,
        verbose: bool = False,
        spares: int = 0,
        reconfig: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.members = [f"n{i}" for i in range(1, nodes + 1)]  # the configured (initial) set
        # every node that may ever run: the configured members and spares that may join
        self.pool = [f"n{i}" for i in range(1, nodes + spares + 1)]
        self.reconfig = reconfig
        self.faults = faults or FaultProfile()
        self.engine_config = engine_config or EngineConfig(
            retransmit_after=0.02, commit_timeout=2.0, snapshot_every=40, retain_slots=30,
            catchup_entries=16, dedup_slots=100_000,
        )
        self.verbose = verbose
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.blocked: set[tuple[str, str]] = set()  # (from, to) pairs that drop everything
        self.nodes = {m: _SimNode(self, m, spare=m not in self.members) for m in self.pool}
        self.history: list[Op] = []
        self.decided: dict[int, BatchId | None] = {}
        self.votes: dict[tuple[int, int], int] = {}
        self.n_clients = clients
        self.ops_per_client = ops_per_client
        self.keys = [f"user/k{i}" for i in range(keys)]
        self._client_seq = [0] * clients
        # a client's session id; a new one (seq from 1) when the state machine no longer knows it
        self._client_session = [f"c{i}" for i in range(clients)]
        self._sessions_opened = itertools.count(1)
        self._client_done = [0] * clients
        self._client_busy = [False] * clients
        self._value_counter = itertools.count(1)
        self.final_phase = False
        self.final_ok: set[int] = set()
        self.steps = 0
        self.faults_on = True
        self.stats = {"delivered": 0, "dropped": 0, "crashes": 0, "partitions": 0, "indeterminate": 0,
                      "rejected": 0}
        # membership: the member set each slot's messages were sent to (one per slot, or the
        # replicas disagree on it), and what the changes did
        self.slot_members: dict[int, frozenset[str]] = {}
        self.epochs: dict[int, tuple[tuple[str, ...], int | None]] = {0: (tuple(self.members), None)}
        self.change_stats = {"ok": 0, "refused_by_log": 0, "refused_at_submit": 0, "unknown": 0,
                             "joined": 0}
        self.change_busy = False
        for a in self.members:
            for b in self.members:
                if a != b:
                    self.nodes[a].engine.peer_up(b, 0.0)  # type: ignore[union-attr]
        for m in self.members:
            self._drain(self.nodes[m])

    # --- scheduling -----------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{self.now:9.4f}] {msg}", file=sys.stderr)

    # --- network --------------------------------------------------------------------------------

    def connected(self, a: str, b: str) -> bool:
        return (
            self.nodes[a].alive and self.nodes[b].alive
            and (a, b) not in self.blocked and (b, a) not in self.blocked
        )

    def _send(self, src: _SimNode, to: str, data: bytes, inc: int) -> None:
        f = self.faults
        if (src.id, to) in self.blocked or not self.nodes[to].alive:
            self.stats["dropped"] += 1
            return
        if f.drop and self.rng.random() < f.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if f.dup and self.rng.random() < f.dup else 1
        for _ in range(copies):
            delay = self.rng.uniform(f.delay_min, f.delay_max)
            dst = self.nodes[to]
            dst_inc = dst.incarnation
            self.at(self.now + delay, lambda s=src.id, d=dst, di=dst_inc, x=data: self._deliver(s, d, di, x))

    def _deliver(self, sender: str, dst: _SimNode, dst_inc: int, data: bytes) -> None:
        if not dst.alive or dst.incarnation != dst_inc or (sender, dst.id) in self.blocked:
            self.stats["dropped"] += 1
            return
        self.stats["delivered"] += 1
        msg = _dec.decode(data)
        dst.engine.receive(sender, msg, self.now)  # type: ignore[union-attr]
        self._drain(dst)

    def _drain(self, node: _SimNode) -> None:
        eng = node.engine
        if eng is None:
            return
        actions = eng.take_actions()
        self.steps += 1
        cut = len(actions)
        f = self.faults
        if (
            f.crash_mid_step and f.crashes and actions and self.rng.random() < f.crash_mid_step
            and sum(1 for n in self.nodes.values() if n.alive) > 1
        ):
            cut = self.rng.randrange(len(actions))
        for i, a in enumerate(actions):
            if i == cut:
                self.log(f"{node.id} crashes mid-step after {i}/{len(actions)} actions")
                self.crash(node.id)
                return
            if isinstance(a, Send):
                data = _enc.encode(a.msg)
                if isinstance(a.msg, VoteMsg) and a.msg.vote != VOTE_UNDECIDED:
                    k = (a.msg.slot, a.msg.phase)
                    prev = self.votes.setdefault(k, a.msg.vote)
                    if prev != a.msg.vote:
                        raise InvariantViolation(
                            f"two non-? vote values in slot {k[0]} phase {k[1]} (seed {self.seed})"
                        )
                if a.to is None and isinstance(a.msg, (Proposal, StateMsg, VoteMsg)):
                    self._check_slot_members(node.id, a.msg.slot, a.group)
                targets = [a.to] if a.to is not None else list(a.group)
                for t in targets:
                    self._send(node, t, data, node.incarnation)
            elif isinstance(a, Persist):
                rec = a.record
                node.disk.journal.append(_enc.encode(rec))
                if isinstance(rec, DecidedRec):
                    self._check_decided(node.id, rec.slot, rec.batch.id if rec.batch else None)
            elif isinstance(a, SaveSnapshot):
                node.disk.snapshot = a.data
                node.disk.journal = [_enc.encode(r) for r in a.keep]
            elif isinstance(a, Completed):
                for tok, res in zip(a.tokens, a.results, strict=True):
                    op = node.pending.pop(tok, None)
                    if op is not None:
                        self.finish(op, decode_result(res))
                    ch = node.changes.pop(tok, None)
                    if ch is not None:
                        self.change_done(ch, _mdec.decode(res))
            elif isinstance(a, Failed):
                for tok in a.tokens:
                    op = node.pending.pop(tok, None)
                    if op is not None:
                        self.finish(op, _REJECTED if a.definite else None)
                    ch = node.changes.pop(tok, None)
                    if ch is not None:
                        self.change_done(ch, None)
            elif isinstance(a, Installed):
                self.log(f"{node.id} installed snapshot at slot {a.slot}")
            elif isinstance(a, MembersChanged):
                self._check_epoch(node.id, a.epoch, a.members)
                if a.pending is not None:
                    self._check_epoch(node.id, a.epoch + 1, a.pending, a.pending_from)
        _ = SentRec  # journal records are checked on recovery by Engine.recover

    def _check_slot_members(self, node: str, slot: int, group: tuple[str, ...]) -> None:
        """Every replica sends a slot's messages to the same member set, and only a member sends."""
        ms = frozenset(group) | {node}
        prev = self.slot_members.setdefault(slot, ms)
        if prev != ms:
            raise InvariantViolation(
                f"slot {slot}: {node} takes part with member set {sorted(ms)}, another replica with "
                f"{sorted(prev)} (seed {self.seed})"
            )

    def _check_epoch(self, node: str, epoch: int, members: tuple[str, ...], from_slot: int = 0) -> None:
        """Every replica gives one epoch the same member set (and a pending one the same slot)."""
        key = (members, from_slot) if from_slot else (members, None)
        prev = self.epochs.setdefault(epoch, key)
        if prev[0] != members or (from_slot and prev[1] is not None and prev[1] != from_slot):
            raise InvariantViolation(
                f"epoch {epoch}: {node} has member set {list(members)} from slot {from_slot}, another "
                f"replica {list(prev[0])} from slot {prev[1]} (seed {self.seed})"
            )
        if from_slot and prev[1] is None:
            self.epochs[epoch] = key

    def _check_decided(self, node: str, slot: int, bid: BatchId | None) -> None:
        if slot in self.decided:
            if self.decided[slot] != bid:
                raise InvariantViolation(
                    f"slot {slot} decided differently: {self.decided[slot]} vs {bid} on {node} "
                    f"(seed {self.seed})"
                )
        else:
            self.decided[slot] = bid

    # --- faults ---------------------------------------------------------------------------------

    def crash(self, nid: str) -> None:
        node = self.nodes[nid]
        if not node.alive:
            return
        self.stats["crashes"] += 1
        self.log(f"crash {nid}")
        node.crash()
        for m in self.pool:
            if m != nid and self.nodes[m].alive:
                self.nodes[m].engine.peer_down(nid, self.now)  # type: ignore[union-attr]
                self._drain(self.nodes[m])

    def restart(self, nid: str) -> None:
        node = self.nodes[nid]
        if node.alive or (node.spare and node.join_members is None):
            return
        self.log(f"restart {nid}")
        node.start()
        self._link_refresh()

    def _link_refresh(self) -> None:
        """Tell every live engine which peers it can reach now (as heartbeats would)."""
        for a in self.pool:
            na = self.nodes[a]
            if not na.alive:
                continue
            eng = na.engine
            assert eng is not None
            for b in self.pool:
                if a == b:
                    continue
                up = self.connected(a, b)
                if up and b not in eng._up:
                    eng.peer_up(b, self.now)
                elif not up and b in eng._up:
                    eng.peer_down(b, self.now)
            self._drain(na)

    def partition(self, groups: list[list[str]]) -> None:
        if not self.faults_on:
            return
        self.stats["partitions"] += 1
        self.blocked = set()
        for g in groups:
            for h in groups:
                if g is h:
                    continue
                for a in g:
                    for b in h:
                        self.blocked.add((a, b))
        self.log(f"partition {groups}")
        self._link_refresh()

    def one_way(self, a: str, b: str) -> None:
        if not self.faults_on:
            return
        self.stats["partitions"] += 1
        self.blocked = {(a, b)}
        self.log(f"one-way block {a}->{b}")
        self._link_refresh()

    def heal(self) -> None:
        if self.blocked:
            self.log("heal")
        self.blocked = set()
        self._link_refresh()

    def _schedule_faults(self, horizon: float) -> None:
        f = self.faults
        rng = self.rng
        t = 0.0
        while f.partitions or f.crashes:
            t += rng.uniform(0.05, 0.4)
            if t >= horizon:
                break
            kind = rng.random()
            if f.partitions and kind < 0.5:
                ms = self.started()
                rng.shuffle(ms)
                shape = rng.random()
                if shape < 0.4:  # majority / minority
                    k = len(ms) // 2
                    groups = [ms[:k], ms[k:]]
                elif shape < 0.6:  # all minority (no quorum anywhere)
                    groups = [[m] for m in ms] if len(ms) == 3 else [ms[:2], ms[2:4], ms[4:]]
                elif shape < 0.8:  # flapping: partition and heal quickly, several times
                    k = rng.randrange(1, len(ms))
                    groups = [ms[:k], ms[k:]]
                    for j in range(3):
                        self.at(t + 0.01 * (2 * j + 1), self.heal)
                        self.at(t + 0.01 * (2 * j + 2), lambda g=groups: self.partition(g))
                else:  # asymmetric
                    self.at(t, lambda a=ms[0], b=ms[1]: self.one_way(a, b))
                    self.at(t + rng.uniform(0.02, 0.2), self.heal)
                    continue
                self.at(t, lambda g=groups: self.partition(g))
                self.at(t + rng.uniform(0.02, 0.25), self.heal)
            elif f.crashes:
                victim = rng.choice(self.started())
                self.at(t, lambda v=victim: self._maybe_crash(v))
                self.at(t + rng.uniform(0.01, 0.3), lambda v=victim: self.restart(v))

    def _maybe_crash(self, nid: str) -> None:
        # Keep at most f crashed at a time most of the time; sometimes take down a majority.
        if not self.faults_on:
            return
        down = sum(1 for n in self.nodes.values() if not n.alive)
        f = (len(self.members) - 1) // 2
        if down < f or self.rng.random() < 0.15:
            self.crash(nid)

    def started(self) -> list[str]:
        """Nodes that run or ran: the configured members and the spares that joined."""
        return [m for m in self.pool if not self.nodes[m].spare or self.nodes[m].join_members is not None]

    # --- membership changes ---------------------------------------------------------------------

    def _schedule_changes(self, horizon: float) -> None:
        t = 0.03
        while True:
            t += self.rng.uniform(0.06, 0.3)
            if t >= horizon:
                break
            self.at(t, self._change_step)

    def join(self, nid: str, via: _SimNode) -> None:
        """Start a spare as `aether node --join` would: told `via`'s member set, as a learner."""
        node = self.nodes[nid]
        assert via.engine is not None
        node.join_members = list(via.engine.members)
        self.change_stats["joined"] += 1
        self.log(f"{nid} joins through {via.id} (told {node.join_members})")
        node.start()
        self._link_refresh()

    def _change_step(self) -> None:
        """Add or remove a member through a random member, sometimes with a fault right after."""
        if not self.faults_on:
            return
        rng = self.rng
        live = [m for m in self.pool if self.nodes[m].alive and self.nodes[m].engine.is_member]  # type: ignore[union-attr]
        if not live:
            return
        via = self.nodes[rng.choice(live)]
        eng = via.engine
        assert eng is not None
        members = list(eng.members)
        outside = [m for m in self.pool if m not in members]
        if outside and (len(members) <= 2 or (len(members) < 5 and rng.random() < 0.5)):
            nid = rng.choice(outside)
            target = self.nodes[nid]
            if target.spare and target.join_members is None:
                self.join(nid, via)
                # the operator adds it at once or a little later (caught up or not yet)
                wait = rng.choice([0.0, 0.0, rng.uniform(0.01, 0.3)])
                self.at(self.now + wait, lambda v=via, n=nid: self._submit_change(v, MemberChange("add", n)))
                return
            change = MemberChange("add", nid)
        else:
            change = MemberChange("remove", rng.choice(members))
        self._submit_change(via, change)

    def _submit_change(self, via: _SimNode, change: MemberChange) -> None:
        if not self.faults_on or not via.alive or via.engine is None:
            return
        rng = self.rng
        try:
            tok = via.engine.change_members(change, self.now)
        except MembershipRefused as e:
            self.change_stats["refused_at_submit"] += 1
            self.log(f"{via.id} refuses {change.op} {change.node}: {e}")
            return
        self.log(f"{via.id} submits {change.op} {change.node}")
        via.changes[tok] = change
        self._drain(via)
        r = rng.random()
        if r < 0.25:
            # a crash in the middle of the change: the node that took it, the node it is about, or
            # another one, before or after it commits
            victim = rng.choice([via.id, change.node, rng.choice(self.started())])
            self.at(self.now + rng.uniform(0.0, 0.01), lambda v=victim: self._crash_now(v))
            self.at(self.now + rng.uniform(0.05, 0.4), lambda v=victim: self.restart(v))
        elif r < 0.4:
            # a partition while the change commits
            ms = self.started()
            rng.shuffle(ms)
            k = rng.randrange(1, len(ms))
            self.partition([ms[:k], ms[k:]])
            self.at(self.now + rng.uniform(0.02, 0.25), self.heal)

    def _crash_now(self, nid: str) -> None:
        if self.faults_on:
            self.crash(nid)

    def change_done(self, change: MemberChange, result: MemberResult | None) -> None:
        if result is None:
            self.change_stats["unknown"] += 1
        elif result.ok:
            self.change_stats["ok"] += 1
            self.log(f"{change.op} {change.node} committed: {result.members} from slot {result.from_slot}")
        else:
            self.change_stats["refused_by_log"] += 1
            self.log(f"{change.op} {change.node} refused by the log: {result.error}")

    # --- clients --------------------------------------------------------------------------------

    def _client_step(self, c: int) -> None:
        if self._client_busy[c]:
            return
        if not self.final_phase and self._client_done[c] >= self.ops_per_client:
            return
        rng = self.rng
        live = [m for m in self.pool if self.nodes[m].alive]
        if not live:
            self.at(self.now + 0.01, lambda: self._client_step(c))
            return
        node = self.nodes[rng.choice(live)]
        key = rng.choice(self.keys)
        r = rng.random()
        value: Any = None
        expected: Any = None
        if r < 0.4:
            kind = "put"
            value = f"v{next(self._value_counter)}".encode()
            cmd: Any = Put(key, value)
        elif r < 0.75:
            kind = "get"
            cmd = Get(key)
        elif r < 0.92:
            kind = "cas"
            cur = node.sm.get(key) if node.sm is not None else None  # a plausible expectation
            expected = cur if rng.random() < 0.7 else None
            value = f"v{next(self._value_counter)}".encode()
            cmd = Cas(key, expected, value)
        else:
            kind = "remove"
            cmd = Remove(key)
        self._client_seq[c] += 1
        op = _ClientOp(c, kind, key, value, expected, self.now, node.id, node.incarnation)
        self._client_busy[c] = True
        eng = node.engine
        assert eng is not None
        command = encode_command(cmd, client=self._client_session[c], seq=self._client_seq[c])
        tok = eng.submit(command, self.now)
        node.pending[tok] = op
        self._drain(node)

    def finish(self, op: _ClientOp, result: Any) -> None:
        c = op.client
        refused = result is not None and result is not _REJECTED and session_error_kind(result.error)
        if refused == UNKNOWN_SESSION:
            # none of this session's earlier commands has been applied (they failed, or are still
            # in flight): this one was refused, not applied; go on in a new session
            self._client_session[c] = f"c{c}.{next(self._sessions_opened)}"
            self._client_seq[c] = 0
            result = _REJECTED
        if result is _REJECTED:
            self.stats["rejected"] += 1
        elif result is None:
            self.stats["indeterminate"] += 1
            self.history.append(
                Op(c, op.kind, op.key, op.value, op.expected, op.call, None, None)
            )
        else:
            if op.kind == "get":
                res: Any = result.value
            elif op.kind == "cas":
                res = result.ok
            else:
                res = None
            if op.kind in ("put", "remove", "get") and not result.ok:
                raise InvariantViolation(f"{op.kind} failed unexpectedly: {result.error} (seed {self.seed})")
            self.history.append(Op(c, op.kind, op.key, op.value, op.expected, op.call, self.now, res))
            if self.final_phase:
                self.final_ok.add(c)
        self._client_busy[c] = False
        if result is _REJECTED:  # back off, then try again (probably through another node)
            self.at(self.now + self.rng.uniform(0.01, 0.05), lambda: self._client_step(c))
            return
        self._client_done[c] += 1
        if self.final_phase and c in self.final_ok:
            return
        self.at(self.now + self.rng.uniform(0.0, 0.01), lambda: self._client_step(c))

    # --- running --------------------------------------------------------------------------------

    def _tick_all(self) -> None:
        for n in self.nodes.values():
            if n.alive:
                n.engine.tick(self.now)  # type: ignore[union-attr]
                self._drain(n)
        if self._events or not self._quiet():
            self.at(self.now + 0.01, self._tick_all)

    def _quiet(self) -> bool:
        return self.final_phase and len(self.final_ok) == self.n_clients

    def _run_until(self, t_end: float, stop: Callable[[], bool] | None = None) -> None:
        ev = self._events
        while ev and ev[0][0] <= t_end:
            t, _, fn = heapq.heappop(ev)
            self.now = t
            fn()
            if stop is not None and stop():
                return

    def run(self, horizon: float = 2.0, settle: float = 10.0) -> list[Op]:
        self.at(0.01, self._tick_all)
        for c in range(self.n_clients):
            self.at(self.rng.uniform(0.0, 0.02), lambda c=c: self._client_step(c))
        self._schedule_faults(horizon)
        if self.reconfig:
            self._schedule_changes(horizon)
        self._run_until(horizon)
        # heal everything, restart the crashed, and require every client to complete one more op
        self.faults = dataclasses.replace(self.faults, crashes=False, partitions=False, crash_mid_step=0.0)
        self.faults_on = False
        self.heal()
        for m in self.pool:
            self.restart(m)
        self._run_until(horizon + 1.0, lambda: not any(self._client_busy))
        self.final_phase = True
        for c in range(self.n_clients):
            if not self._client_busy[c]:
                self.at(self.now + 0.001, lambda c=c: self._client_step(c))
        self._run_until(horizon + 1.0 + settle, self._quiet)
        if not self._quiet():
            raise InvariantViolation(
                f"liveness: after healing, only {len(self.final_ok)}/{self.n_clients} clients completed an "
                f"operation within {settle}s of virtual time (seed {self.seed})"
            )
        self._check_convergence()
        return self.history

    def _check_convergence(self) -> None:
        # let the replicas exchange pending decisions, then compare
        t_end = self.now + 2.0
        while self.now < t_end:
            self._run_until(self.now + 0.05)
            slots = {n.engine.applied for n in self.nodes.values() if n.engine is not None}
            if len(slots) == 1 and not any(n.engine.pending_batches for n in self.nodes.values() if n.engine):
                break
            if not self._events:
                self.at(self.now + 0.01, self._tick_all)
        by_slot: dict[int, bytes] = {}
        for n in self.nodes.values():
            if n.engine is None and n.spare and n.join_members is None:
                continue  # a spare that never joined
            assert n.engine is not None and n.sm is not None
            snap = n.sm.snapshot()
            prev = by_slot.setdefault(n.engine.applied, snap)
            if prev != snap:
                raise InvariantViolation(
                    f"replicas at slot {n.engine.applied} hold different state (seed {self.seed})"
                )


def profile_for(seed: int) -> tuple[int, FaultProfile]:
    """The node count and fault mix a CI seed runs with (varied deterministically by seed)."""
    rng = random.Random(seed * 7919 + 1)
    nodes = 3 if rng.random() < 0.6 else 5
    prof = FaultProfile(
        drop=rng.choice([0.0, 0.01, 0.05, 0.15]),
        dup=rng.choice([0.0, 0.02, 0.1]),
        delay_min=0.0002,
        delay_max=rng.choice([0.002, 0.01, 0.05]),
        partitions=rng.random() < 0.6,
        crashes=rng.random() < 0.6,
        crash_mid_step=rng.choice([0.0, 0.002, 0.01]),
    )
    return nodes, prof


def run_seed(seed: int, nodes: int | None = None, verbose: bool = False) -> tuple[Simulation, CheckResult]:
    n, prof = profile_for(seed)
    sim = Simulation(seed, nodes or n, faults=prof, verbose=verbose)
    history = sim.run()
    return sim, check_history(history)


def run_member_seed(
    seed: int, nodes: int | None = None, verbose: bool = False
) -> tuple[Simulation, CheckResult]:
    """Profile 'members': the engine profile's faults plus membership changes during the run
    (adds of spares that join, removals, re-adds; crashes and partitions right after some)."""
    n, prof = profile_for(seed)
    sim = Simulation(seed, nodes or n, faults=prof, verbose=verbose, spares=2, reconfig=True)
    history = sim.run()
    return sim, check_history(history)


def repro_command(seed: int, profile: str = "engine") -> str:
    return f"python -m aether.testing.sim --seed {seed} --profile {profile} -v"


def _parse_range(text: str) -> range:
    a, _, b = text.partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (seeds A to B-1), got {text!r}") from None
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}")
    return range(lo, hi)


def run_one(
    seed: int, profile: str, *, verbose: bool = False, nodes: int | None = None,
    setup: Callable[[Any], None] | None = None,
) -> tuple[bool, str, str]:
    """Run one seed of a profile: (ok, failure kind, message). Kinds: safety, liveness, history."""
    if profile in ("engine", "members"):
        try:
            runner = run_seed if profile == "engine" else run_member_seed
            sim, res = runner(seed, nodes, verbose)
        except InvariantViolation as e:
            kind = "liveness" if "liveness" in str(e) else "safety"
            return False, kind, str(e)
        if not res.ok:
            return False, "history", f"history not linearizable: {res.explanation}"
        ok_ops = sum(1 for o in sim.history if o.ret is not None)
        extra = f" changes={sim.change_stats} epochs={len(sim.epochs)}" if sim.reconfig else ""
        return True, "", (f"nodes={len(sim.members)} ops={len(sim.history)} completed={ok_ops} "
                          f"slots={max(sim.decided, default=0)} stats={sim.stats}{extra}")
    from aether.testing.nodesim import run_node_seed

    out = run_node_seed(seed, profile, verbose=verbose, nodes=nodes, setup=setup)
    w = out.world
    if out.ok:
        extra = f" changes={w.member_stats} epochs={len(w.epochs)}" if w.sc.member_changes else ""
        return True, "", (f"nodes={len(w.members)} slots={max(w.decided, default=0)} ops={len(w.history)} "
                          f"appends={len(w.appends)} stats={w.stats}{extra}")
    err = out.error or ""
    kind = "liveness" if err.startswith("liveness") else "history" if "history" in err[:40] else "safety"
    return False, kind, err


def profile_names() -> list[str]:
    from aether.testing.nodesim import PROFILES

    return ["engine", "members", *PROFILES]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run seeded simulations and check them. Profile 'engine' drives the Engine alone "
        "(fast); the others run whole nodes (runner, disk store, KV store) with faults.",
    )
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="run one seed")
    which.add_argument("--seeds", type=_parse_range, help="run seeds A..B-1 (A:B) and print a summary")
    ap.add_argument("--profile", default="ci", choices=profile_names(), help="fault profile (default: ci)")
    ap.add_argument("--nodes", type=int, default=None, help="override the node count the seed picks")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the fault schedule as it runs")
    ap.add_argument("--mutant", default=None, help="run with a deliberately broken component "
                    "(see aether.testing.mutants; 'list' lists them)")
    a = ap.parse_args(argv)
    from aether.testing.mutants import MUTANTS

    if a.mutant == "list":
        for m in MUTANTS.values():
            print(f"{m.name:20} [{m.profile}] {m.breaks}")
        return 0
    mutant = MUTANTS[a.mutant] if a.mutant else None
    ctx = mutant.patch() if mutant else contextlib.nullcontext()
    setup = mutant.setup if mutant else None
    with ctx:
        return _run(a, setup)


def _run(a: argparse.Namespace, setup: Callable[[Any], None] | None) -> int:
    if a.seed is not None:
        ok, _, msg = run_one(a.seed, a.profile, verbose=a.verbose, nodes=a.nodes, setup=setup)
        if ok:
            print(f"seed={a.seed} profile={a.profile} {msg}")
            print("OK")
            return 0
        print(f"FAIL seed={a.seed} profile={a.profile}: {msg}")
        return 1
    import time

    counts = {"ok": 0, "safety": 0, "liveness": 0, "history": 0}
    t0 = time.perf_counter()
    for seed in a.seeds:
        ok, kind, msg = run_one(seed, a.profile, nodes=a.nodes, setup=setup)
        if ok:
            counts["ok"] += 1
            continue
        counts[kind] += 1
        first = msg.splitlines()[0] if msg else ""
        mut = f" --mutant {a.mutant}" if a.mutant else ""
        print(f"FAIL seed={seed} profile={a.profile} [{kind}] {first[:300]}\n  reproduce: "
              f"{repro_command(seed, a.profile)}{mut}", flush=True)
    dt = time.perf_counter() - t0
    n = len(a.seeds)
    failed = n - counts["ok"]
    print(f"profile={a.profile} seeds={a.seeds.start}:{a.seeds.stop} ran={n} ok={counts['ok']} "
          f"failed={failed} "
          f"(safety={counts['safety']} liveness={counts['liveness']} history={counts['history']}) "
          f"in {dt:.1f}s ({n / dt:.1f} seeds/s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
