"""The Rabia engine: a deterministic, sans-IO state machine (see shared RABIA.md).

It consumes `submit`, `receive`, `tick`, `peer_up`/`peer_down` events, each with the
current time passed in, and appends actions to `self.actions` (drained by the caller with
`take_actions`): messages to send, records to persist *before* the sends that follow them,
snapshots to save, and client commands completed or failed. It has no sockets, clocks,
threads or randomness of its own, so a seeded simulation can drive it exactly.

One slot is decided at a time (no pipelining). Per slot:

1. every replica proposes the head of its pending queue (batches ordered by origin
   timestamp, then id); proposals carry the batch, so a batch seen in any proposal joins
   every queue;
2. after W = n - f proposals: state 1 with candidate m if one batch has >= M = n//2+1 of
   them, else state 0;
3. phases of two rounds: STATE (vote b if b has >= M states, else '?') then VOTE (decide b
   if a non-'?' b has >= D = f+1 votes; else adopt a seen b; else the common coin, which is
   the same on every replica for (slot, phase));
4. decide 1 -> commit m (fetched from peers if missing), 0 -> commit nothing.

Membership changes are commands in the log (`change_members`): one committed in slot s
governs slots from s + delay on, so the member set of a slot, and the thresholds derived from
it, follow from the log before that slot and are the same on every replica (docs/consensus.md,
"Membership changes"). A node outside the set in effect is a learner: it only pulls decisions.

A replica answers messages about an already-decided slot with DECISION, catches up from
peers with decided entries or a snapshot, journals what it sends so that a restarted
replica repeats rather than contradicts itself, and garbage-collects old slots.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from aether.consensus.messages import (
    COMBINED_ORIGIN,
    MAX_ACTIVATION_DELAY,
    MAX_NODE_ID,
    MEMBER_CHANGE_PREFIX,
    VOTE_UNDECIDED,
    Batch,
    BatchId,
    CatchupReply,
    CatchupReq,
    DecidedRec,
    Decision,
    EngineSnapshot,
    Entry,
    JournalRecord,
    MemberChange,
    MemberConfig,
    MemberResult,
    Proposal,
    ProposalReply,
    ProposalReq,
    SentRec,
    SnapshotDamaged,
    StateMsg,
    Submit,
    VoteMsg,
    check_snapshot,
    combine,
    seal_snapshot,
    slot_msg_key,
)


class StateMachine(Protocol):
    """Deterministic application state fed by committed commands, in commit order."""

    def apply(self, command: bytes) -> bytes:
        """Apply one command and return its encoded result. Must never raise for bad input."""
        ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


# --- actions ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Send `msg` to `to`, or when `to` is None to `group`: every other member of the member set
    in effect for the slot in progress when the engine emitted it."""

    to: str | None
    msg: object
    group: tuple[str, ...] = ()


@dataclass(slots=True)
class Persist:
    """Append a journal record; must be durable (per fsync policy) before later Sends go out."""

    record: JournalRecord


@dataclass(slots=True)
class SaveSnapshot:
    """Atomically replace the local snapshot, then start a journal holding only `keep`.

    `keep` are the records of what this replica already sent for the slot in progress: they
    must survive the snapshot, or a restart could send different values in that slot.
    """

    slot: int
    data: bytes
    keep: list[JournalRecord] = field(default_factory=list)


@dataclass(slots=True)
class Completed:
    """Commands submitted here were committed and applied; `results[i]` belongs to `tokens[i]`."""

    tokens: list[int]
    results: list[bytes]
    slot: int


@dataclass(slots=True)
class Failed:
    """Commands submitted here will not be answered; their outcome is indeterminate."""

    tokens: list[int]
    reason: str  # "quorum" | "timeout" | "indeterminate" | "member" | "too_large" (definite)
    definite: bool = False  # True: the commands never left this node and will never take effect


@dataclass(slots=True)
class Installed:
    """The state machine was replaced by a snapshot taken at `slot` (watchers must resync)."""

    slot: int


@dataclass(slots=True)
class MembersChanged:
    """The member set in effect, or a pending one, changed (a change committed or took effect, or
    a snapshot was installed). `members` governs the slot in progress; `pending` (if any) governs
    slots from `pending_from` on. `addresses` are those the log gave for members it added."""

    epoch: int
    members: tuple[str, ...]
    pending: tuple[str, ...] | None
    pending_from: int
    addresses: dict[str, str]


@dataclass(slots=True)
class SnapshotRefused:
    """A snapshot `sender` sent in catch-up (taken at `slot`) was refused, not installed: it cannot
    be decoded or does not match its checksum (`reason` says which). The engine asks again (another
    peer if one is up); the adapter logs it."""

    sender: str
    slot: int
    reason: str


class MembershipRefused(Exception):
    """A membership change this replica will not submit (the message says why)."""


Action = Send | Persist | SaveSnapshot | Completed | Failed | Installed | MembersChanged | SnapshotRefused


DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The largest message the engine sends by default: the transport's default ``max_frame``."""

# Encoded bytes a batch costs beyond its commands: each command's bin header (at most 5 bytes),
# and per batch its id (origin up to MAX_NODE_ID bytes), timestamps and list headers.
_COMMAND_OVERHEAD = 5
_BATCH_OVERHEAD = MAX_NODE_ID + 128
_MESSAGE_OVERHEAD = 1024  # a message's own fields around its batches or snapshot piece


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Limits and timers of one replica (the same on every replica).

    ``max_message_bytes`` is the largest message the engine sends (the transport's ``max_frame``):
    a command larger than ``max_batch_bytes`` is refused at `Engine.submit` (``Failed`` with reason
    ``too_large``), so a batch, a proposal and a decision hold at most ``max_batch_bytes`` of
    commands; a catch-up reply carries as many decided entries as fit, and a snapshot that does not
    fit travels in pieces. The batch limits must leave such a message room (checked here).
    """

    max_batch_commands: int = 4096
    max_batch_bytes: int = 4 * 1024 * 1024
    max_inflight_batches: int = 2  # own batches sealed but not decided; the rest accumulate
    max_proposal_batches: int = 64  # pending batches one proposal combines (bytes: max_batch_bytes)
    retain_slots: int = 4096  # decided entries kept in memory for catch-up by entries
    dedup_slots: int = 50_000  # how long a decided batch id is remembered
    snapshot_every: int = 2000  # minimum slots between local snapshots (the first one is staggered)
    retransmit_after: float = 0.05
    # A Proposal/STATE/VOTE that arrives this soon after this replica decided its slot, from a
    # sender not yet past the deciding phase, is not answered with DECISION: the messages that
    # let the sender decide are on their way (see `_answer_stale`)
    stale_answer_grace: float = 0.025
    commit_timeout: float = 1.5
    max_future_slots: int = 64
    catchup_entries: int = 512
    catchup_interval: float = 0.05
    idle_sync_interval: float = 1.0  # an idle replica asks its peers what it missed this often
    learner_sync_interval: float = 0.2  # a non-member asks the members what it missed this often
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # a snapshot coming in pieces from a peer that sent none for this long is given up (asked anew)
    snapshot_piece_timeout: float = 5.0

    def __post_init__(self) -> None:
        need = self.largest_value_bytes() + _MESSAGE_OVERHEAD
        if need > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must hold the largest proposal the batch "
                f"limits allow ({need} bytes: max_batch_bytes={self.max_batch_bytes}, max_batch_commands="
                f"{self.max_batch_commands}, max_proposal_batches={self.max_proposal_batches})"
            )

    def largest_value_bytes(self) -> int:
        """An upper bound of the encoded size of one proposal value (a batch, or combined ones)."""
        batches = self.max_proposal_batches
        commands = batches * self.max_batch_commands
        return self.max_batch_bytes + commands * _COMMAND_OVERHEAD + (batches + 1) * _BATCH_OVERHEAD

    @property
    def snapshot_piece_bytes(self) -> int:
        """The bytes of a snapshot one catch-up reply carries at most."""
        return self.max_message_bytes - _MESSAGE_OVERHEAD


def entry_bytes(batch: Batch | None) -> int:
    """An upper bound of the encoded size of a decided entry holding `batch`."""
    if batch is None:
        return 32
    parts = batch.members()
    commands = sum(len(b.commands) for b in parts)
    return batch.size() + commands * _COMMAND_OVERHEAD + (len(parts) + 1) * _BATCH_OVERHEAD


def coin(seed: bytes, slot: int, phase: int) -> int:
    """The common coin: identical on every replica for (slot, phase), independent of timing."""
    h = hashlib.blake2b(seed + slot.to_bytes(8, "big") + phase.to_bytes(4, "big"), digest_size=8)
    return h.digest()[0] & 1


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(EngineSnapshot)


@dataclass(slots=True)
class _SnapshotIn:
    """A snapshot arriving in pieces (`CatchupReply.total`): from whom, of which slot, so far."""

    sender: str
    slot: int
    total: int
    data: bytearray
    at: float  # when the last piece came


@dataclass(slots=True)
class _Phase:
    states: dict[str, tuple[int, BatchId | None]] = field(default_factory=dict)
    votes: dict[str, tuple[int, BatchId | None]] = field(default_factory=dict)
    sent_state: bool = False
    voted: bool = False


@dataclass(slots=True)
class _SlotState:
    slot: int
    started: bool = False
    started_at: float = 0.0
    my_proposal: Batch | None = None
    proposals: dict[str, Batch | None] = field(default_factory=dict)
    exchanged: bool = False
    phase: int = 0
    state: int = 0
    cand: BatchId | None = None
    phases: dict[int, _Phase] = field(default_factory=dict)
    decided: bool = False
    decided_bit: int = 0
    decided_phase: int = 0
    tell_laggards: bool = False  # decided by our own rounds: tell peers that went past the phase
    fetch_sent_at: float = -1.0
    last_progress: float = 0.0
    last_retransmit: float = 0.0
    max_phase_from: dict[str, int] = field(default_factory=dict)
    known: dict[BatchId, Batch] = field(default_factory=dict)

    def ph(self, p: int) -> _Phase:
        x = self.phases.get(p)
        if x is None:
            x = self.phases[p] = _Phase()
        return x


class Engine:
    """One Rabia replica. Not thread-safe; drive it from one task."""

    def __init__(
        self,
        node_id: str,
        members: Sequence[str],
        state_machine: StateMachine,
        *,
        seed: bytes = b"aether",
        incarnation: int = 0,
        config: EngineConfig | None = None,
        clock_offset: float = 0.0,
        learner: bool = False,
    ) -> None:
        if node_id not in members and not learner:
            raise ValueError(f"node {node_id!r} is not among members {list(members)}")
        if not members:
            raise ValueError("the member set is empty")
        self.node_id = node_id
        # The member set governing each slot: configs[0] is in effect for the slot in progress,
        # configs[1] (if any) is a committed change that takes effect at its from_slot. The set
        # given here is epoch 0; the snapshot and the log replace it (`recover`).
        self._configs: list[MemberConfig] = [MemberConfig(0, 1, sorted(set(members)), {})]
        self.members: tuple[str, ...] = ()
        self.peers: tuple[str, ...] = ()
        self.is_member = False
        self.n = self.f = self.W = self.M = self.D = 0
        self._set_quorums()
        n = self.n
        self.sm = state_machine
        self.seed = seed
        self.incarnation = incarnation
        # Batches are ordered by their origin's `now + clock_offset` (a wall clock when the adapter
        # passes a monotonic `now` and offset = wall - monotonic), so replicas on different
        # machines order them fairly. Timers only ever use differences of `now`.
        self.clock_offset = clock_offset
        self.cfg = config or EngineConfig()
        self.actions: list[Action] = []

        self.applied = 0  # last applied slot; slot numbers start at 1
        self.log: dict[int, Batch | None] = {}  # recent decided entries
        self.decided_ids: dict[BatchId, int] = {}
        self._queue: dict[BatchId, Batch] = {}
        self._heap: list[tuple[tuple[int, str, int, int], BatchId]] = []
        self._cur = _SlotState(1)
        self._future: dict[int, list[tuple[str, object]]] = {}
        self._future_count = 0
        self._decided_ahead: dict[int, Batch | None] = {}
        self._forced: dict[tuple[str, int], StateMsg | VoteMsg | Proposal] = {}
        self._forced_slot = 0
        # what this replica sent in the current slot (or, after a restart, had sent before it)
        self._sent_cur: dict[tuple[str, int], SentRec] = {}
        # hybrid logical clock for batch timestamps: never behind any timestamp seen, so a replica
        # whose clock runs ahead does not push its batches behind everyone else's for good
        self._hlc = 0

        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._open: list[tuple[int, bytes, float]] = []  # (token, command, submitted at)
        self._open_bytes = 0
        self._inflight: dict[BatchId, tuple[list[int], float]] = {}
        # Own batches sealed by this incarnation and not decided yet, whether or not anyone still
        # waits for them: a batch whose commands timed out stays queued on every replica and may
        # still commit, so it keeps its place in the in-flight budget until it is decided.
        self._own_queued: set[BatchId] = set()
        self._up: set[str] = set()
        self._last_stale_reply: dict[str, tuple[int, float]] = {}
        # (slot, deciding phase, time) of the last slot decided by our own rounds (see _answer_stale)
        self._own_decision: tuple[int, int, float] = (0, 0, -1e18)
        self._last_catchup: dict[str, float] = {}
        self._last_idle_sync = 0.0
        self._sync_replies: set[str] = set()
        self._last_learner_sync = -1e18
        self._learner_turn = 0
        self.peer_applied: dict[str, int] = {}  # slots each asker had applied, by its CatchupReq
        # A snapshot larger than one message travels in pieces: the one this replica serves (slot,
        # bytes; kept while the entries after it are, so every asker gets the same), and the one
        # it receives (from one peer at a time).
        self._snap_out: tuple[int, bytes] | None = None
        self._snap_in: _SnapshotIn | None = None
        # A node joining with a member set it was told (not the one the log started from) must
        # not replay the log from slot 1 on top of it: it waits for a snapshot, which carries the
        # member set of its slot. `recover` clears this when a local snapshot exists.
        self._needs_snapshot = learner
        # Local snapshots: staggered across replicas so they never all pause at once, and no
        # more often than the journal has grown by half the last snapshot's size (amortized).
        idx = self.members.index(node_id) if node_id in self.members else 0
        self._snap_due = self.cfg.snapshot_every + (self.cfg.snapshot_every * idx) // n
        self._snap_slots = 0
        self._snap_bytes = 0
        self._snap_size = 0
        self.synced = n == 1
        self.stats = {
            "slots": 0, "null_slots": 0, "phases": 0, "snapshots_installed": 0, "retransmits": 0,
            "fetches": 0, "catchup_requests": 0, "slow_slots": 0, "commands": 0, "exchange_seals": 0,
            "snapshots_refused": 0,
        }

    # --- inspection -----------------------------------------------------------------------------

    @property
    def slot(self) -> int:
        """The slot currently being decided."""
        return self._cur.slot

    @property
    def has_quorum(self) -> bool:
        """This replica is a member and reaches a majority of the member set (itself included)."""
        return self.is_member and sum(1 for p in self.peers if p in self._up) + 1 >= self.M

    @property
    def epoch(self) -> int:
        return self._configs[0].epoch

    @property
    def awaiting_snapshot(self) -> bool:
        """A node started with a member set it was told (`--join`) that has no snapshot yet: the set
        it holds is its guess (itself included), not the cluster's, until a member sends one."""
        return self._needs_snapshot

    @property
    def pending_config(self) -> MemberConfig | None:
        """A committed member change that has not taken effect yet."""
        return self._configs[1] if len(self._configs) > 1 else None

    def member_addresses(self) -> dict[str, str]:
        """Addresses the log gave for members it added (current and pending sets)."""
        out: dict[str, str] = {}
        for c in self._configs:
            out.update(c.addresses)
        return out

    def members_for(self, slot: int) -> tuple[str, ...]:
        """The member set governing `slot` (for the slot in progress or later)."""
        cfg = self._configs[0]
        for c in self._configs[1:]:
            if c.from_slot <= slot:
                cfg = c
        return tuple(cfg.members)

    @property
    def pending_batches(self) -> int:
        return len(self._queue)

    def take_actions(self) -> list[Action]:
        out = self.actions
        self.actions = []
        return out

    # --- recovery -------------------------------------------------------------------------------

    def recover(self, snapshot: bytes | None, records: Iterable[JournalRecord]) -> None:
        """Restore from the local snapshot and journal (call before any other input).

        Raises `SnapshotDamaged` if the snapshot does not match its checksum (nothing is restored)."""
        if snapshot is not None:
            self._install_snapshot_bytes(snapshot, emit=False, verify=True)
            self._needs_snapshot = False
        sent: list[SentRec] = []
        for rec in records:
            if isinstance(rec, DecidedRec):
                if rec.slot == self.applied + 1:
                    self._apply(rec.slot, rec.batch, persist=False)
            else:
                sent.append(rec)
        self._cur = _SlotState(self.applied + 1)
        nxt = self.applied + 1
        for s in sent:
            m = s.msg
            if m.slot != nxt:
                continue
            key = slot_msg_key(m)
            self._forced[key] = m
            self._sent_cur[key] = s
        self._forced_slot = nxt if self._forced else 0
        # take_actions() after recover() holds nothing to send (the adapter reads the member set)
        self.actions = [a for a in self.actions if not isinstance(a, (Persist, MembersChanged))]

    # --- inputs ---------------------------------------------------------------------------------

    def submit(self, command: bytes, now: float) -> int:
        """Queue one command for commit; returns a token named later by Completed/Failed."""
        token = next(self._tokens)
        if len(command) > self.cfg.max_batch_bytes:
            self.actions.append(Failed([token], "too_large", definite=True))
            return token
        if not self.is_member:
            self.actions.append(Failed([token], "member", definite=True))
            return token
        if not self.has_quorum:
            self.actions.append(Failed([token], "quorum", definite=True))
            return token
        self._open.append((token, command, now))
        self._open_bytes += len(command)
        self._maybe_seal(now)
        self._progress(now)
        return token

    def submit_many(self, commands: Sequence[bytes], now: float) -> list[int]:
        tokens = [next(self._tokens) for _ in commands]
        limit = self.cfg.max_batch_bytes
        ok = [(t, c) for t, c in zip(tokens, commands, strict=True) if len(c) <= limit]
        if len(ok) < len(tokens):  # refused alone: the others go ahead
            large = [t for t, c in zip(tokens, commands, strict=True) if len(c) > limit]
            self.actions.append(Failed(large, "too_large", definite=True))
            if not ok:
                return tokens
        if not self.is_member:
            self.actions.append(Failed([t for t, _ in ok], "member", definite=True))
            return tokens
        if not self.has_quorum:
            self.actions.append(Failed([t for t, _ in ok], "quorum", definite=True))
            return tokens
        for t, c in ok:
            self._open.append((t, c, now))
            self._open_bytes += len(c)
        self._maybe_seal(now)
        self._progress(now)
        return tokens

    def check_change(self, change: MemberChange) -> str | None:
        """Why this replica would refuse to submit `change` now, or None.

        Beyond what the log itself refuses (see `_apply_change`), it refuses a change that
        the members this replica reaches could not carry: the new set needs W = n - f live
        members to decide anything, and a node being added must be reachable.
        """
        if not self.is_member:
            return f"node {self.node_id} is not a member; send the change to a member"
        pend = self.pending_config
        if pend is not None:
            return (f"another member change is pending (epoch {pend.epoch}, in effect from slot "
                    f"{pend.from_slot}); try again once it took effect")
        new, why = _changed_members(self._configs[0], change)
        if new is None:
            return why
        n = len(new)
        need = n - (n - 1) // 2
        live = [m for m in new if m == self.node_id or m in self._up]
        if change.op == "add" and change.node not in self._up:
            return (f"node {change.node} cannot be reached from {self.node_id}; start it "
                    "(aether node --join) first")
        if len(live) < need:
            return (f"the member set {sorted(new)} needs {need} live members to make progress; only "
                    f"{sorted(live)} are reachable from {self.node_id}")
        return None

    def change_members(self, change: MemberChange, now: float) -> int:
        """Submit a membership change (a token like `submit`'s; the result is a `MemberResult`).

        Raises MembershipRefused (with the reason) if `check_change` refuses it. The change is
        checked against the current epoch, so one that races another commits as refused.
        """
        why = self.check_change(change)
        if why is not None:
            raise MembershipRefused(why)
        change = msgspec.structs.replace(change, epoch=self.epoch)
        return self.submit(MEMBER_CHANGE_PREFIX + _snapshot_encoder.encode(change), now)

    def peer_up(self, peer: str, now: float) -> None:
        if peer == self.node_id or peer in self._up:
            return
        self._up.add(peer)
        # Learn whether we are behind, and let the peer see our current slot.
        self._send(peer, self._catchup_req(peer))
        self._last_catchup[peer] = now
        self._retransmit_to(peer)
        self._maybe_seal(now)
        self._progress(now)

    def peer_down(self, peer: str, now: float) -> None:
        if peer not in self._up:
            return
        self._up.discard(peer)
        if self._snap_in is not None and self._snap_in.sender == peer:
            self._snap_in = None  # its pieces stopped: whoever answers next sends a whole one
        if not self.has_quorum:
            self._fail_all("quorum" if self.is_member else "member")

    def tick(self, now: float) -> None:
        """Timers: retransmission, catch-up, commit timeouts. Call every ~10-50 ms."""
        cur = self._cur
        cfg = self.cfg
        if self._inflight:
            expired = [b for b, (_, t0) in self._inflight.items() if now - t0 > cfg.commit_timeout]
            for bid in expired:
                tokens, _ = self._inflight.pop(bid)
                why = "timeout" if self.has_quorum else "quorum" if self.is_member else "member"
                self.actions.append(Failed(tokens, why))
            if expired:
                self._maybe_seal(now)
        if self._open and now - self._open[0][2] > cfg.commit_timeout:
            # waited behind an own batch that is still undecided: never sent, will never be
            k = 0
            while k < len(self._open) and now - self._open[k][2] > cfg.commit_timeout:
                k += 1
            stale = self._open[:k]
            del self._open[:k]
            self._open_bytes -= sum(len(c) for _, c, _ in stale)
            self.actions.append(Failed([t for t, _, _ in stale], "timeout", definite=True))
        if self._open and not self.has_quorum:
            self._fail_all("quorum")
        out = self._snap_out
        if out is not None and not self._snapshot_servable(out[0]):
            self._snap_out = None  # the entries after it are gone: a later asker gets a new one
        idle = now - max(cur.last_progress, cur.last_retransmit)
        if (cur.started or cur.proposals) and idle > cfg.retransmit_after:
            cur.last_retransmit = now
            self.stats["retransmits"] += 1
            for p in sorted(self._up):
                self._retransmit_to(p)
            if cur.decided and cur.decided_bit == 1:
                self._fetch(now, force=True)
        if self._future and idle > cfg.retransmit_after:
            # peers are ahead and we are stuck: fetch what they decided
            first = self._future[min(self._future)]
            if first:
                self._request_catchup(first[0][0], now)
        if not self.is_member:
            # A learner (a node being added, or one that was removed) takes part in no slot; it
            # pulls what the members decided, so that it has caught up when its slot comes.
            # one peer at a time (in turn), so a joiner far behind costs one snapshot per interval
            if self._up and now - self._last_learner_sync >= cfg.learner_sync_interval:
                self._last_learner_sync = now
                ups = sorted(self._up)
                self._learner_turn += 1
                self._request_catchup(ups[self._learner_turn % len(ups)], now)
        elif not self.synced:
            for p in sorted(self._up):
                if p not in self._sync_replies:
                    self._request_catchup(p, now)
        elif (not cur.started and not cur.proposals and not cur.phases and not self._queue
              and now - self._last_idle_sync >= cfg.idle_sync_interval):
            # Idle: peers that decided a slot without us (our messages or theirs were lost) send
            # nothing more until the next write, so ask them, or a quiet cluster would leave this
            # replica (and what watches it) a slot behind indefinitely (found by the simulation)
            self._last_idle_sync = now
            for p in sorted(self._up):
                self._request_catchup(p, now)
        self._progress(now)

    def receive(self, sender: str, msg: object, now: float) -> None:
        """Handle one message from another node (slot messages count only from members)."""
        if sender == self.node_id:
            return
        if isinstance(msg, Submit):
            self._enqueue(msg.batch)
            self._progress(now)
            return
        if isinstance(msg, CatchupReq):
            self._on_catchup_req(sender, msg)
            return
        if isinstance(msg, CatchupReply):
            self._on_catchup_reply(sender, msg, now)
            return
        if isinstance(msg, ProposalReq):
            self._on_proposal_req(sender, msg)
            return
        slot: int = msg.slot  # type: ignore[attr-defined]
        if slot <= self.applied:
            if isinstance(msg, (Proposal, StateMsg, VoteMsg)):
                self._answer_stale(sender, slot, -1 if isinstance(msg, Proposal) else msg.phase, now)
            return
        if isinstance(msg, Decision):
            if slot == self._cur.slot:
                self._adopt_decision(msg.batch, now)
            else:
                self._decided_ahead[slot] = msg.batch
                self._request_catchup(sender, now)
            self._progress(now)
            return
        if isinstance(msg, ProposalReply):
            if slot == self._cur.slot:
                self._on_proposal_reply(msg, now)
            return
        if slot > self._cur.slot:
            if slot - self._cur.slot > self.cfg.max_future_slots or self._future_count > 10_000:
                self._request_catchup(sender, now)
                return
            self._future.setdefault(slot, []).append((sender, msg))
            self._future_count += 1
            return
        self._on_slot_msg(sender, msg, now)
        self._progress(now)

    # --- the slot protocol ----------------------------------------------------------------------

    def _on_slot_msg(self, sender: str, msg: object, now: float) -> None:
        cur = self._cur
        if not self.is_member or sender not in self.peers:
            return  # only the members of this slot's member set take part in it
        if cur.decided:
            # We decided but wait for the batch: still tell fast peers what we know.
            if isinstance(msg, (StateMsg, VoteMsg)) and msg.cand is not None:
                self._learn_cand(msg.cand)
            return
        if isinstance(msg, Proposal):
            if sender in cur.proposals:
                return
            cur.proposals[sender] = msg.batch
            if msg.batch is not None:
                cur.known[msg.batch.id] = msg.batch
                self._enqueue(msg.batch)
        elif isinstance(msg, StateMsg):
            ph = cur.ph(msg.phase)
            if sender in ph.states or msg.bit not in (0, 1):
                return
            ph.states[sender] = (msg.bit, msg.cand)
            if msg.cand is not None:
                self._learn_cand(msg.cand)
            self._note_phase(sender, msg.phase)
        elif isinstance(msg, VoteMsg):
            ph = cur.ph(msg.phase)
            if sender in ph.votes or msg.vote not in (0, 1, VOTE_UNDECIDED):
                return
            ph.votes[sender] = (msg.vote, msg.cand)
            if msg.cand is not None:
                self._learn_cand(msg.cand)
            self._note_phase(sender, msg.phase)

    def _note_phase(self, sender: str, phase: int) -> None:
        mp = self._cur.max_phase_from
        if phase > mp.get(sender, -1):
            mp[sender] = phase

    def _learn_cand(self, cand: BatchId) -> None:
        cur = self._cur
        if cur.cand is None:
            cur.cand = cand

    def _start_slot(self, now: float) -> None:
        cur = self._cur
        cur.started = True
        cur.started_at = now
        cur.last_progress = now
        forced = self._forced.get(("p", 0)) if self._forced_slot == cur.slot else None
        if isinstance(forced, Proposal):
            batch = forced.batch
            if batch is not None:
                self._enqueue(batch)
        else:
            batch = self._proposal_value(cur.slot)
        cur.my_proposal = batch
        cur.proposals[self.node_id] = batch
        if batch is not None:
            cur.known[batch.id] = batch
        self._send_slot_msg(Proposal(cur.slot, batch))

    def _send_slot_msg(self, msg: Proposal | StateMsg | VoteMsg) -> None:
        rec = SentRec(msg)
        self._sent_cur[slot_msg_key(msg)] = rec
        self.actions.append(Persist(rec))
        self.actions.append(Send(None, msg, self.peers))

    def _progress(self, now: float) -> None:
        """Advance as far as the information at hand allows."""
        if self._needs_snapshot:
            return
        while True:
            cur = self._cur
            if cur.decided:
                if cur.decided_bit == 0:
                    self._finish_slot(None, now)
                    continue
                batch = self._find_cand_batch()
                if batch is None:
                    self._fetch(now)
                    return
                self._finish_slot(batch, now)
                continue
            if not cur.started:
                ahead = self._decided_ahead.pop(cur.slot, _MISSING)
                if ahead is not _MISSING:
                    self._adopt_decision(ahead, now)  # type: ignore[arg-type]
                    continue
                if not self.is_member or self._needs_snapshot:
                    return  # a learner only takes decisions (Decision, catch-up)
                pend = self.pending_config
                if pend is not None and pend.from_slot > cur.slot:
                    # a committed change waits for its slot: run slots (NULL ones if idle) so
                    # that it takes effect without waiting for the next write
                    pass
                elif not (self._queue or cur.proposals or cur.phases):
                    self._maybe_seal(now)
                    if not self._queue:
                        return
                self._start_slot(now)
            if not self._step_rounds(now):
                return

    def _step_rounds(self, now: float) -> bool:
        """Evaluate thresholds once; True if something changed."""
        cur = self._cur
        W, M, D = self.W, self.M, self.D
        if not cur.exchanged:
            if len(cur.proposals) < W:
                return False
            if self._open:
                self._seal_at_exchange(now)
            cur.exchanged = True
            counts: dict[BatchId, int] = {}
            for b in cur.proposals.values():
                if b is not None:
                    counts[b.id] = counts.get(b.id, 0) + 1
            best = max(counts.items(), key=lambda kv: kv[1], default=None)
            if best is not None and best[1] >= M:
                cur.state = 1
                cur.cand = best[0]
            else:
                cur.state = 0
            cur.phase = 0
            self._send_state(now)
            return True
        p = cur.phase
        ph = cur.ph(p)
        if not ph.sent_state:
            self._send_state(now)
            return True
        if not ph.voted:
            if len(ph.states) < W:
                return False
            c1 = sum(1 for b, _ in ph.states.values() if b == 1)
            c0 = len(ph.states) - c1
            vote = 1 if c1 >= M else 0 if c0 >= M else VOTE_UNDECIDED
            forced = self._forced.get(("v", p)) if self._forced_slot == cur.slot else None
            if isinstance(forced, VoteMsg):
                vote = forced.vote
            ph.voted = True
            cand = cur.cand if vote == 1 else None
            self._send_slot_msg(VoteMsg(cur.slot, p, vote, cand))
            ph.votes[self.node_id] = (vote, cand)
            cur.last_progress = now
            return True
        if len(ph.votes) < W:
            return False
        c = [0, 0]
        for v, _ in ph.votes.values():
            if v != VOTE_UNDECIDED:
                c[v] += 1
        self.stats["phases"] += 1
        cur.last_progress = now
        for bit in (0, 1):
            if c[bit] >= D:
                cur.decided = True
                cur.decided_bit = bit
                cur.decided_phase = p
                cur.tell_laggards = True  # once the slot's record is written (`_finish_slot`)
                return True
        if c[1] > 0:
            nxt = 1
        elif c[0] > 0:
            nxt = 0
        else:
            nxt = coin(self.seed, cur.slot, p)
        cur.phase = p + 1
        cur.state = nxt
        self._send_state(now)
        return True

    def _send_state(self, now: float) -> None:
        cur = self._cur
        p = cur.phase
        ph = cur.ph(p)
        bit = cur.state
        forced = self._forced.get(("s", p)) if self._forced_slot == cur.slot else None
        if isinstance(forced, StateMsg):
            bit = forced.bit
            if forced.cand is not None:
                self._learn_cand(forced.cand)
        cur.state = bit
        ph.sent_state = True
        cand = cur.cand if bit == 1 else None
        ph.states[self.node_id] = (bit, cand)
        cur.last_progress = now
        self._send_slot_msg(StateMsg(cur.slot, p, bit, cand))

    def _tell_laggards(self, batch: Batch | None) -> None:
        """Peers already past the deciding phase did not decide in it: tell them directly."""
        cur = self._cur
        for peer, mp in sorted(cur.max_phase_from.items()):
            if mp > cur.decided_phase:
                self._send(peer, Decision(cur.slot, batch))

    def _find_cand_batch(self) -> Batch | None:
        cur = self._cur
        if cur.cand is None:
            return None
        b = cur.known.get(cur.cand) or self._queue.get(cur.cand)
        return b

    def _fetch(self, now: float, force: bool = False) -> None:
        cur = self._cur
        if not force and cur.fetch_sent_at >= 0 and now - cur.fetch_sent_at < self.cfg.retransmit_after:
            return
        cur.fetch_sent_at = now
        self.stats["fetches"] += 1
        self.actions.append(Send(None, ProposalReq(cur.slot), self.peers))

    def _on_proposal_req(self, sender: str, msg: ProposalReq) -> None:
        if msg.slot <= self.applied:
            if msg.slot in self.log:
                self._send(sender, Decision(msg.slot, self.log[msg.slot]))
            return
        if msg.slot == self._cur.slot:
            cur = self._cur
            self._send(sender, ProposalReply(cur.slot, cur.cand, self._find_cand_batch()))

    def _on_proposal_reply(self, msg: ProposalReply, now: float) -> None:
        cur = self._cur
        if msg.cand is not None:
            self._learn_cand(msg.cand)
            if msg.batch is not None and msg.batch.id == cur.cand:
                cur.known[msg.batch.id] = msg.batch
        self._progress(now)

    def _adopt_decision(self, batch: Batch | None, now: float) -> None:
        cur = self._cur
        cur.decided = True
        if batch is None:
            cur.decided_bit = 0
        else:
            cur.decided_bit = 1
            cur.cand = batch.id
            cur.known[batch.id] = batch

    def _finish_slot(self, batch: Batch | None, now: float) -> None:
        slot = self._cur.slot
        if self._cur.started and now - self._cur.started_at > 0.02:
            self.stats["slow_slots"] += 1
        self._apply(slot, batch, persist=True)
        if self._cur.tell_laggards:
            self._tell_laggards(batch)  # after the slot's record: a decision sent is on our disk
            self._own_decision = (slot, self._cur.decided_phase, now)
        self._new_slot(now)

    def _new_slot(self, now: float) -> None:
        self._cur = _SlotState(self.applied + 1, last_progress=now)
        self._sent_cur.clear()
        if self._forced and self._forced_slot < self._cur.slot:
            self._forced.clear()
            self._forced_slot = 0
        buffered = self._future.pop(self._cur.slot, None)
        # drop anything older than the new slot
        for s in [s for s in self._future if s < self._cur.slot]:
            self._future_count -= len(self._future.pop(s))
        for s in [s for s in self._decided_ahead if s < self._cur.slot]:
            del self._decided_ahead[s]
        self._maybe_seal(now)
        if buffered:
            self._future_count -= len(buffered)
            for sender, m in buffered:
                if isinstance(m, Decision):
                    self._adopt_decision(m.batch, now)
                else:
                    self._on_slot_msg(sender, m, now)

    def _apply(self, slot: int, batch: Batch | None, *, persist: bool) -> None:
        assert slot == self.applied + 1, (slot, self.applied)
        self.applied = slot
        self.stats["slots"] += 1
        self.log[slot] = batch
        old = slot - self.cfg.retain_slots
        if old in self.log:
            del self.log[old]
        if batch is None:
            self.stats["null_slots"] += 1
        else:
            sm = self.sm
            for part in batch.members():
                if part.id in self.decided_ids:
                    continue
                self.decided_ids[part.id] = slot
                self._queue.pop(part.id, None)
                self.stats["commands"] += len(part.commands)
                results = [
                    self._apply_change(slot, c) if c[:1] == MEMBER_CHANGE_PREFIX else sm.apply(c)
                    for c in part.commands
                ]
                mine = self._inflight.pop(part.id, None)
                if mine is not None:
                    self.actions.append(Completed(mine[0], results, slot))
        pend = self.pending_config
        if pend is not None and pend.from_slot <= slot + 1:
            self._activate(pend)  # the next slot is the change's first: it takes effect
        if persist:
            # after the answer: the answer depends on the votes that decided the slot (journalled
            # before it), not on this record, which only spares a restart re-running the slot
            self.actions.append(Persist(DecidedRec(slot, batch)))
        if slot % 1024 == 0:
            horizon = slot - self.cfg.dedup_slots
            if horizon > 0:
                self.decided_ids = {k: v for k, v in self.decided_ids.items() if v >= horizon}
        if persist:
            self._snap_slots += 1
            if batch is not None:
                self._snap_bytes += batch.size()
            if self._snap_slots >= self._snap_due and self._snap_bytes * 2 >= self._snap_size:
                data = self._snapshot_bytes()
                self._snap_due = self.cfg.snapshot_every
                self._snap_slots = self._snap_bytes = 0
                self._snap_size = len(data)
                self.actions.append(SaveSnapshot(slot, data))

    # --- membership ----------------------------------------------------------------------------

    def _set_quorums(self) -> None:
        """Thresholds and peers from the member set in effect (configs[0])."""
        members = tuple(self._configs[0].members)
        self.members = members
        self.peers = tuple(m for m in members if m != self.node_id)
        self.is_member = self.node_id in members
        n = len(members)
        f = (n - 1) // 2
        self.n, self.f = n, f
        self.W = n - f
        self.M = n // 2 + 1
        self.D = f + 1
        if n == 1 and self.is_member:
            self.synced = True

    def _members_changed(self) -> None:
        cur, pend = self._configs[0], self.pending_config
        self.actions.append(MembersChanged(
            cur.epoch, tuple(cur.members), tuple(pend.members) if pend else None,
            pend.from_slot if pend else 0, self.member_addresses(),
        ))

    def _fail_unsent_removed(self) -> None:
        """This replica was removed: what was never sent never will be (sent batches may still
        commit), so its callers are told at once."""
        unsent = [t for t, _, _ in self._open]
        self._open.clear()
        self._open_bytes = 0
        if unsent:
            self.actions.append(Failed(unsent, "member", definite=True))

    def _activate(self, cfg: MemberConfig) -> None:
        was_member = self.is_member
        self._configs = [cfg]
        self._set_quorums()
        self._members_changed()
        if was_member and not self.is_member:
            self._fail_unsent_removed()
        elif self.is_member and not self.has_quorum:
            self._fail_all("quorum")

    def _apply_change(self, slot: int, command: bytes) -> bytes:
        """Run a MemberChange committed in `slot` (deterministic: the same on every replica)."""
        cur = self._configs[0]
        pend = self.pending_config

        def refuse(why: str) -> bytes:
            return _snapshot_encoder.encode(MemberResult(False, why, cur.epoch, list(cur.members), 0))

        try:
            change = _change_decoder.decode(command[1:])
        except msgspec.DecodeError as e:
            return refuse(f"malformed member change: {e}")
        if pend is not None:
            return refuse(f"another member change is pending (epoch {pend.epoch}, in effect from "
                          f"slot {pend.from_slot})")
        if change.epoch >= 0 and change.epoch != cur.epoch:
            return refuse(f"the member set changed (epoch {change.epoch} -> {cur.epoch}) since the "
                          "change was checked; check it again")
        new, why = _changed_members(cur, change)
        if new is None:
            return refuse(why)
        delay = min(max(change.delay, 1), MAX_ACTIVATION_DELAY)
        known = {**cur.addresses, **change.addresses}
        addresses = {m: a for m, a in known.items() if m in new and isinstance(a, str)}
        if change.op == "add" and change.address:
            addresses[change.node] = change.address
        cfg = MemberConfig(cur.epoch + 1, slot + delay, sorted(new), addresses)
        self._configs = [cur, cfg]
        self._members_changed()
        return _snapshot_encoder.encode(MemberResult(True, None, cfg.epoch, cfg.members, cfg.from_slot))

    # --- queue and batching ---------------------------------------------------------------------

    def _enqueue(self, batch: Batch) -> None:
        if batch.parts:
            for part in batch.parts:
                if not part.parts:  # a combined batch only ever holds plain ones
                    self._enqueue(part)
            return
        if batch.ts > self._hlc:
            self._hlc = batch.ts
        bid = batch.id
        if bid in self._queue or bid in self.decided_ids:
            return
        self._queue[bid] = batch
        heapq.heappush(self._heap, (batch.order_key(), bid))

    def _head(self) -> Batch | None:
        heap = self._heap
        while heap:
            bid = heap[0][1]
            b = self._queue.get(bid)
            if b is not None:
                return b
            heapq.heappop(heap)
        return None

    def _proposal_value(self, slot: int) -> Batch | None:
        """What to propose in `slot`: every pending batch sealed before it, oldest first, combined.

        Batches sealed in `slot` itself wait for the next one (a replica that starts the slot
        may not have them yet, and differing proposals decide nothing); if nothing older is
        pending, the oldest batch alone (an idle cluster answers its first command at once).
        """
        cfg = self.cfg
        ready = [b for b in self._queue.values() if b.slot < slot]
        if not ready:
            return self._head()
        if len(ready) > cfg.max_proposal_batches:
            ready = heapq.nsmallest(cfg.max_proposal_batches, ready, key=Batch.order_key)
        else:
            ready.sort(key=Batch.order_key)
        size = 0
        for k, b in enumerate(ready):
            size += b.size()
            if k and size > cfg.max_batch_bytes:
                ready = ready[:k]
                break
        return combine(ready)

    def _own_in_flight(self) -> int:
        """Own batches still queued (undecided), including those nobody waits for any more."""
        own = self._own_queued
        if own:
            done = [b for b in own if b not in self._queue]
            for b in done:
                own.discard(b)
        return max(len(own), len(self._inflight))

    def _maybe_seal(self, now: float, extra: int = 0) -> None:
        """Seal the open commands into a batch if the in-flight budget (plus `extra`) allows."""
        if not self._open or self._own_in_flight() >= self.cfg.max_inflight_batches + extra:
            return
        if self._cur.exchanged and not self._cur.decided:
            # Late in a slot: a batch sealed now might reach a peer only after it proposed in
            # the next slot, and differing proposals decide nothing. Seal when this slot ends.
            return
        if not self.has_quorum:
            return
        cfg = self.cfg
        cut = 0
        size = 0
        for _, c, _ in self._open:
            if cut >= cfg.max_batch_commands or (cut and size + len(c) > cfg.max_batch_bytes):
                break
            size += len(c)
            cut += 1
        take = self._open[:cut]
        del self._open[:cut]
        self._open_bytes -= sum(len(c) for _, c, _ in take)
        bid = BatchId(self.node_id, self.incarnation, next(self._seq))
        ts = max(int((now + self.clock_offset) * 1_000_000), self._hlc + 1)
        self._hlc = ts
        batch = Batch(bid, ts, [c for _, c, _ in take], self._cur.slot)
        self._inflight[bid] = ([t for t, _, _ in take], now)
        self._own_queued.add(bid)
        self._enqueue(batch)
        self.actions.append(Send(None, Submit(batch), self.peers))

    def _seal_at_exchange(self, now: float) -> None:
        """The last moment a batch may be sealed for proposal in the next slot: just before this
        replica's exchange completes (and its Submit leaves before the STATE that follows).

        Under load the in-flight budget is spent by the batch sealed when the previous slot
        ended, so the commands that clients send right after their answers (early in a slot)
        used to wait for that slot to end and were proposed a slot later: three slots from
        answer to answer. They are sealed here as one batch beyond the budget. Not when this
        replica is behind (a peer already voted, or W - 1 peers sent their STATE): the others
        may then decide the slot before this batch reaches them and propose differently in the
        next one, which would commit nothing.
        """
        ph0 = self._cur.phases.get(0)
        if ph0 is not None and (ph0.votes or len(ph0.states) >= self.W - 1):
            return
        before = len(self._own_queued)
        self._maybe_seal(now, extra=1)
        if len(self._own_queued) > before:
            self.stats["exchange_seals"] += 1

    def _fail_all(self, reason: str) -> None:
        unsent = [t for t, _, _ in self._open]
        self._open.clear()
        self._open_bytes = 0
        if unsent:
            self.actions.append(Failed(unsent, reason, definite=True))
        tokens: list[int] = []
        for toks, _ in self._inflight.values():
            tokens.extend(toks)
        self._inflight.clear()
        if tokens:
            self.actions.append(Failed(tokens, reason))

    # --- helpers --------------------------------------------------------------------------------

    def _send(self, to: str, msg: object) -> None:
        self.actions.append(Send(to, msg))

    def _retransmit_to(self, peer: str) -> None:
        cur = self._cur
        if not cur.started or peer not in self.peers:
            return
        self._send(peer, Proposal(cur.slot, cur.my_proposal))
        for p in sorted(cur.phases):
            ph = cur.phases[p]
            mine = ph.states.get(self.node_id)
            if mine is not None:
                self._send(peer, StateMsg(cur.slot, p, mine[0], mine[1]))
            v = ph.votes.get(self.node_id)
            if v is not None:
                self._send(peer, VoteMsg(cur.slot, p, v[0], v[1]))

    def _answer_stale(self, sender: str, slot: int, phase: int, now: float) -> None:
        """Answer a Proposal/STATE/VOTE (of `phase`; -1 for a Proposal) for a decided `slot`.

        Not at once when it is about the slot this replica has just decided by its own rounds,
        from a phase up to the deciding one: the sender is then at most a round behind, and the
        messages that let it decide (ours among them) are already on their way over FIFO links.
        Answering would send it the whole batch once more per late message (with 5 replicas,
        about two such answers per replica and slot, nearly all of them arriving after their
        receiver had decided anyway). A sender that went past the deciding phase is answered at
        once (it did not decide in it); one that really is stuck (its messages or ours were
        lost) retransmits after `retransmit_after` idle and is answered then.
        """
        own = self._own_decision
        if slot == own[0] and phase <= own[1] and now - own[2] < self.cfg.stale_answer_grace:
            return
        last = self._last_stale_reply.get(sender)
        if last is not None and last[0] == slot and now - last[1] < self.cfg.retransmit_after:
            return
        self._last_stale_reply[sender] = (slot, now)
        if slot in self.log:
            self._send(sender, Decision(slot, self.log[slot]))
        else:
            self._on_catchup_req(sender, CatchupReq(slot))

    def _request_catchup(self, peer: str, now: float) -> None:
        inc = self._snap_in
        if inc is not None:
            if inc.slot <= self.applied or now - inc.at > self.cfg.snapshot_piece_timeout:
                self._snap_in = inc = None  # overtaken, or its sender stopped answering
            else:
                peer = inc.sender  # a snapshot is coming in pieces: ask its sender for the next one
        last = self._last_catchup.get(peer, -1e18)
        if now - last < self.cfg.catchup_interval:
            return
        self._last_catchup[peer] = now
        self.stats["catchup_requests"] += 1
        self._send(peer, self._catchup_req(peer))

    def _catchup_req(self, peer: str) -> CatchupReq:
        """What to ask `peer`: the next piece of the snapshot it is sending, else what we miss."""
        inc = self._snap_in
        if inc is not None and inc.sender == peer:
            return CatchupReq(self._catchup_from(), inc.slot, len(inc.data))
        return CatchupReq(self._catchup_from())

    def _on_catchup_req(self, sender: str, msg: CatchupReq) -> None:
        start = msg.from_slot
        # how far the asker has applied (a learner's progress, for adapters that add members)
        self.peer_applied[sender] = max(start - 1, 0)
        out = self._snap_out
        if msg.snapshot_slot and out is not None and out[0] == msg.snapshot_slot and msg.offset < len(out[1]):
            self._send_snapshot(sender, out, msg.offset)
            return
        # (a piece of a snapshot no longer served: answered as a new request, the asker starts over)
        if start > self.applied:
            self._send(sender, CatchupReply(self.applied, []))
            return
        if start in self.log or start > self.applied:
            end = min(self.applied, start + self.cfg.catchup_entries - 1)
            room = self.cfg.max_message_bytes - _MESSAGE_OVERHEAD
            entries: list[Entry] = []
            for s in range(start, end + 1):
                batch = self.log[s]
                size = entry_bytes(batch)
                if entries and size > room:
                    break  # the rest in the next reply (the asker asks again while behind)
                room -= size
                entries.append(Entry(s, batch))
            self._send(sender, CatchupReply(self.applied, entries))
        else:
            self._send_snapshot(sender, self._served_snapshot(), 0)

    def _snapshot_servable(self, slot: int) -> bool:
        """A snapshot of `slot` still brings an asker up to date: the entries after it are kept."""
        return slot == self.applied or slot + 1 in self.log

    def _served_snapshot(self) -> tuple[int, bytes]:
        """The snapshot to send an asker: the one being served in pieces while it can be, else a new
        one (kept for the pieces that follow if it does not fit one message)."""
        out = self._snap_out
        if out is not None and self._snapshot_servable(out[0]):
            return out
        out = (self.applied, self._snapshot_bytes())
        self._snap_out = out if len(out[1]) > self.cfg.snapshot_piece_bytes else None
        return out

    def _send_snapshot(self, to: str, out: tuple[int, bytes], offset: int) -> None:
        slot, data = out
        piece = self.cfg.snapshot_piece_bytes
        if offset == 0 and len(data) <= piece:
            self._send(to, CatchupReply(self.applied, [], slot, data))
        else:
            chunk = data[offset : offset + piece]
            self._send(to, CatchupReply(self.applied, [], slot, chunk, len(data), offset))

    def _on_snapshot_piece(self, sender: str, msg: CatchupReply, now: float) -> bytes | None:
        """Take one piece of a snapshot; the whole snapshot once this was its last piece, else None
        (the next piece is asked for; a duplicate or stray piece is ignored)."""
        if msg.snapshot_slot <= self.applied or not msg.snapshot:
            return None
        inc = self._snap_in
        if msg.offset == 0 and (
            inc is None
            or (inc.sender == sender and inc.slot != msg.snapshot_slot)  # the sender started over
            or inc.sender not in self._up
            or now - inc.at > self.cfg.snapshot_piece_timeout
        ):
            inc = self._snap_in = _SnapshotIn(sender, msg.snapshot_slot, msg.total, bytearray(), now)
        if (
            inc is None or inc.sender != sender or inc.slot != msg.snapshot_slot or inc.total != msg.total
            or msg.offset != len(inc.data) or len(inc.data) + len(msg.snapshot) > inc.total
        ):
            return None
        inc.data += msg.snapshot
        inc.at = now
        if len(inc.data) < inc.total:
            self._last_catchup[sender] = now
            self._send(sender, CatchupReq(self._catchup_from(), inc.slot, len(inc.data)))
            return None
        self._snap_in = None
        return bytes(inc.data)

    def _catchup_from(self) -> int:
        # slot 0 is never held as an entry: asking for it gets a snapshot
        return 0 if self._needs_snapshot else self.applied + 1

    def _on_catchup_reply(self, sender: str, msg: CatchupReply, now: float) -> None:
        snapshot = msg.snapshot
        if msg.total:
            snapshot = self._on_snapshot_piece(sender, msg, now)
            if snapshot is None:
                return
        snap: EngineSnapshot | None = None
        if snapshot is not None and msg.snapshot_slot > self.applied:
            # checked before anything changes: a snapshot that is refused leaves this replica as it
            # was (a joiner still waiting for one), and it asks again
            snap = self._checked_peer_snapshot(sender, msg.snapshot_slot, snapshot, now)
            if snap is None:
                return
        if self._needs_snapshot:
            if snap is None or msg.snapshot_slot <= 0:
                return
            self._needs_snapshot = False
        if not self.synced and sender in self.peers:  # a majority of the members answered
            self._sync_replies.add(sender)
            if len(self._sync_replies) + 1 >= self.M:
                self.synced = True
        if snap is not None and snapshot is not None:
            self._install_snapshot(snap, snapshot, emit=True)
            self._new_slot(now)
        advanced = False
        for e in msg.entries:
            if e.slot == self.applied + 1:
                self._apply(e.slot, e.batch, persist=True)
                advanced = True
        if advanced:
            self._new_slot(now)
        if msg.applied > self.applied:
            # more to fetch
            self._last_catchup.pop(sender, None)
            self._request_catchup(sender, now)
        self._progress(now)

    def _snapshot_bytes(self) -> bytes:
        snap = EngineSnapshot(
            self.applied, list(self.members), self.sm.snapshot(), list(self.decided_ids.items()),
            list(self._configs),
        )
        return seal_snapshot(snap)

    def _checked_peer_snapshot(
        self, sender: str, slot: int, data: bytes, now: float
    ) -> EngineSnapshot | None:
        """The snapshot of `slot` that `sender` sent, decoded and checked against its checksum; None
        if it is refused (`SnapshotRefused`, then asked again: from another peer if one is up, in
        turn, else from `sender` when the timers next ask). A snapshot of a peer of an earlier
        version carries no checksum and is taken unchecked."""
        try:
            snap = _snapshot_decoder.decode(data)
            check_snapshot(data, snap)
            if snap.slot != slot:
                raise SnapshotDamaged(f"it holds slot {snap.slot}, not the slot {slot} it was sent as")
        except (msgspec.DecodeError, SnapshotDamaged) as e:
            why = f"the snapshot cannot be decoded ({e})" if isinstance(e, msgspec.DecodeError) else (
                f"the snapshot is damaged: {e}")
            self.stats["snapshots_refused"] += 1
            self.actions.append(SnapshotRefused(sender, slot, why))
            others = sorted(p for p in self._up if p != sender)
            turn = self.stats["snapshots_refused"]
            self._request_catchup(others[turn % len(others)] if others else sender, now)
            return None
        return snap

    def _install_snapshot_bytes(self, data: bytes, *, emit: bool, verify: bool = False) -> None:
        """Install a snapshot; with `verify` (the local file) its checksum is checked first."""
        snap = _snapshot_decoder.decode(data)
        if verify:
            check_snapshot(data, snap)
        self._install_snapshot(snap, data, emit=emit)

    def _install_snapshot(self, snap: EngineSnapshot, data: bytes, *, emit: bool) -> None:
        """Install `snap`, decoded (and checked) from `data`."""
        self.sm.restore(snap.state)
        self.applied = snap.slot
        if snap.configs:
            # the log's member set (a snapshot of before membership changes has none: the
            # configured set stands)
            was_member = self.is_member
            self._configs = list(snap.configs)
            pend = self.pending_config
            if pend is not None and pend.from_slot <= snap.slot + 1:
                self._configs = [pend]
            self._set_quorums()
            self._members_changed()
            if was_member and not self.is_member:
                self._fail_unsent_removed()
        self.log.clear()
        self.decided_ids = {k: v for k, v in snap.decided_ids}
        for bid in [b for b in self._queue if b in self.decided_ids]:
            del self._queue[bid]
        lost = [bid for bid in self._inflight if bid in self.decided_ids]
        for bid in lost:
            tokens, _ = self._inflight.pop(bid)
            self.actions.append(Failed(tokens, "indeterminate"))
        if emit:
            self.stats["snapshots_installed"] += 1
            self.actions.append(Installed(snap.slot))
            self.actions.append(SaveSnapshot(snap.slot, data))

    def snapshot_now(self) -> SaveSnapshot:
        """A snapshot of the current applied state (for a clean shutdown).

        It keeps what this replica sent in the slot in progress, so the replica repeats rather
        than contradicts itself after the restart.
        """
        return SaveSnapshot(self.applied, self._snapshot_bytes(), self.kept_records())

    def kept_records(self) -> list[JournalRecord]:
        """The journal records a snapshot taken now must carry over (the slot in progress)."""
        if self._cur.slot != self.applied + 1:
            return []
        return [r for r in self._sent_cur.values() if r.msg.slot == self._cur.slot]


_MISSING = object()
_change_decoder = msgspec.msgpack.Decoder(MemberChange)


def _changed_members(cur: MemberConfig, change: MemberChange) -> tuple[list[str] | None, str]:
    """The member set `change` makes of `cur`, or (None, why it is refused)."""
    node = change.node
    if change.op == "add":
        if not node or len(node) > MAX_NODE_ID or node == COMBINED_ORIGIN or not node.isprintable():
            return None, f"invalid node id {node!r}"
        if node in cur.members:
            return None, f"node {node} is already a member"
        return [*cur.members, node], ""
    if change.op == "remove":
        if node not in cur.members:
            return None, f"node {node!r} is not a member (members: {', '.join(cur.members)})"
        if len(cur.members) == 1:
            return None, f"node {node} is the last member; a cluster cannot remove all its members"
        return [m for m in cur.members if m != node], ""
    return None, f"unknown member change {change.op!r} (expected 'add' or 'remove')"
