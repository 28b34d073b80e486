"""Wire messages of the Rabia engine (msgspec structs, integer tags 10-29).

The sender of a message is not carried in it: the transport knows which authenticated
peer link a frame arrived on and hands `(sender, msg)` to the engine.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Union

import msgspec


class BatchId(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Unique id of a batch: origin node, the origin's incarnation, and a sequence number."""

    origin: str
    inc: int
    seq: int


class Batch(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Commands proposed together. `ts` (origin clock, microseconds) orders the pending queue.

    `slot` is the slot its origin was deciding when it sealed the batch: replicas propose it
    together with the other pending batches from the next slot on (by then every replica has
    it, so their proposals agree). A *combined* batch (`combine`) is such a proposal: `parts`
    in order, no commands of its own, and an id derived from the parts' ids.
    """

    id: BatchId
    ts: int
    commands: list[bytes]
    slot: int = 0
    parts: list[Batch] = msgspec.field(default_factory=list)

    def order_key(self) -> tuple[int, str, int, int]:
        i = self.id
        return (self.ts, i.origin, i.inc, i.seq)

    def members(self) -> list[Batch]:
        """The batches this value commits, in order (itself, or the parts of a combined batch)."""
        return self.parts or [self]

    def size(self) -> int:
        """Bytes of commands it commits."""
        return sum(len(c) for b in self.members() for c in b.commands)


COMBINED_ORIGIN = "+"  # not a valid node id: combined batches never clash with a node's own
_id_encoder = msgspec.msgpack.Encoder()


def combine(batches: list[Batch]) -> Batch:
    """One proposal value for several batches (a single batch stands for itself).

    The id is a 128-bit hash of the parts' ids, so replicas that propose the same batches in
    the same order propose equal values, and different lists differ.
    """
    if len(batches) == 1:
        return batches[0]
    h = hashlib.blake2b(_id_encoder.encode([b.id for b in batches]), digest_size=16).digest()
    bid = BatchId(COMBINED_ORIGIN, int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big"))
    return Batch(bid, batches[0].ts, [], batches[0].slot, list(batches))


class Submit(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=10):
    """A new batch, broadcast by its origin so that every replica queues it."""

    batch: Batch


class Proposal(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=11):
    """The sender's one proposal for `slot` (None: it had nothing pending; combined: several)."""

    slot: int
    batch: Batch | None


class StateMsg(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=12):
    """Round 1 of a phase. `cand` names the majority-proposed batch when the sender knows it."""

    slot: int
    phase: int
    bit: int
    cand: BatchId | None = None


VOTE_UNDECIDED = 2  # the '?' vote


class VoteMsg(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=13):
    """Round 2 of a phase: 0, 1 or VOTE_UNDECIDED."""

    slot: int
    phase: int
    vote: int
    cand: BatchId | None = None


class Decision(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=14):
    """The decided value of `slot` (None: the slot commits nothing)."""

    slot: int
    batch: Batch | None


class ProposalReq(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=15):
    """Ask for the majority-proposed batch of `slot` (the asker decided 1 without having it)."""

    slot: int


class ProposalReply(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=16):
    slot: int
    cand: BatchId | None
    batch: Batch | None


class Entry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    slot: int
    batch: Batch | None


class CatchupReq(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=17):
    """Ask for decided entries from `from_slot` on (or a snapshot if they are collected).

    With `snapshot_slot`: send the piece at `offset` of the snapshot of that slot (one that is
    too large for one message travels in pieces, each asked for when the one before arrived).
    """

    from_slot: int
    snapshot_slot: int = 0
    offset: int = 0


class CatchupReply(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=18):
    """Decided entries (as many as fit one message), or a snapshot taken after `snapshot_slot` was
    applied: the whole of it, or (`total` > 0) the piece at `offset` of a snapshot of `total` bytes.
    """

    applied: int
    entries: list[Entry]
    snapshot_slot: int = 0
    snapshot: bytes | None = None
    total: int = 0
    offset: int = 0


RabiaMessage = Union[  # noqa: UP007 - msgspec needs a runtime Union object
    Submit, Proposal, StateMsg, VoteMsg, Decision, ProposalReq, ProposalReply, CatchupReq, CatchupReply
]


def slot_msg_key(msg: Proposal | StateMsg | VoteMsg) -> tuple[str, int]:
    """("p", 0), ("s", phase) or ("v", phase): what a replica may send at most one value of per slot."""
    if isinstance(msg, Proposal):
        return ("p", 0)
    return ("s" if isinstance(msg, StateMsg) else "v", msg.phase)


# --- records written to the local journal (never sent) --------------------------------------------


class SentRec(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    """A Proposal/StateMsg/VoteMsg this node sent; replayed after a restart so it never equivocates."""

    msg: Proposal | StateMsg | VoteMsg


class DecidedRec(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    """A slot this node applied."""

    slot: int
    batch: Batch | None


JournalRecord = Union[SentRec, DecidedRec]  # noqa: UP007


# --- membership: a command in the log that takes effect at a later slot --------------------------

# Commands whose first byte is this one are membership changes, run by the engine itself rather
# than by the state machine. 0xc1 is the one byte msgpack never uses, so no state machine command
# (a msgpack value) starts with it.
MEMBER_CHANGE_PREFIX = b"\xc1"
# A change committed in slot s governs slots from s + delay on (see docs/consensus.md).
ACTIVATION_DELAY = 2
MAX_ACTIVATION_DELAY = 64
MAX_NODE_ID = 128


class MemberChange(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Add or remove one member. `epoch` is the member-set epoch the request was checked against
    (-1: whatever is current when it commits); `delay` how many slots after its commit it takes
    effect (carried in the command so every replica, of any version, uses the same)."""

    op: str  # "add" | "remove"
    node: str
    address: str = ""
    epoch: int = -1
    delay: int = ACTIVATION_DELAY
    # the submitter's address book of the members (node id -> cluster address), kept with the
    # member set so that every node, and one that joins later, can reach every member
    addresses: dict[str, str] = {}


class MemberConfig(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A member set, numbered by `epoch`, that governs slots from `from_slot` on."""

    epoch: int
    from_slot: int
    members: list[str]
    addresses: dict[str, str] = {}


class MemberResult(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The outcome of a MemberChange: applied (`ok`, the new set and the slot it governs from)
    or refused (`error` says why; nothing changed)."""

    ok: bool
    error: str | None
    epoch: int
    members: list[str]
    from_slot: int


class EngineSnapshot(msgspec.Struct, array_like=True, gc=False):
    """What a snapshot holds: the applied slot, the state machine's bytes and the dedup table.

    `configs` are the member set in effect after `slot` and a pending one (committed, not yet in
    effect), if any. Snapshots written before membership changes existed have none: the member
    set is then the configured one.
    """

    slot: int
    members: list[str]
    state: bytes
    decided_ids: list[tuple[BatchId, int]]
    configs: list[MemberConfig] = []
    # The crc32 (4 bytes, big-endian) of the encoded snapshot up to this field, which is always
    # the last one (`seal_snapshot`, `check_snapshot`). Empty in a snapshot of an earlier version,
    # which has none; a trailing field, so an earlier version reads a sealed snapshot (a
    # downgraded node keeps its data directory) and ignores it.
    check: bytes = b""


class SnapshotDamaged(ValueError):
    """A snapshot's checksum does not match its bytes: something changed them after they were
    written (the disk, a copy, a hand edit)."""


_snapshot_encoder = msgspec.msgpack.Encoder()
_NO_CHECK = b"\xc4\x00"  # msgpack of `check` = b"" (bin 8 of length 0)
_CHECK_HEAD = b"\xc4\x04"  # msgpack of a 4-byte `check`, before its bytes


def seal_snapshot(snap: EngineSnapshot) -> bytes:
    """`snap` encoded with its checksum: the crc32 of everything before the `check` field, which
    encodes last. Encoded once and copied once (the checksum goes where the empty field was)."""
    snap.check = b""
    data = _snapshot_encoder.encode(snap)
    assert data.endswith(_NO_CHECK), "EngineSnapshot.check must be its last field"
    body = memoryview(data)[: -len(_NO_CHECK)]
    crc = zlib.crc32(body)
    return b"".join((body, _CHECK_HEAD, crc.to_bytes(4, "big")))


def check_snapshot(data: bytes, snap: EngineSnapshot) -> None:
    """Raise `SnapshotDamaged` unless `data` (which decoded to `snap`) matches the checksum it
    carries. A snapshot without one (written by an earlier version, or a peer of one) passes."""
    if not snap.check:
        return
    tail = len(_CHECK_HEAD) + 4
    if len(snap.check) != 4 or data[-tail:-4] != _CHECK_HEAD:
        raise SnapshotDamaged(f"its checksum field is malformed ({len(snap.check)} bytes, not 4)")
    stored = int.from_bytes(snap.check, "big")
    actual = zlib.crc32(memoryview(data)[:-tail])
    if actual != stored:
        raise SnapshotDamaged(
            f"its contents do not match their checksum (crc32 {actual:08x}, stored {stored:08x})"
        )
