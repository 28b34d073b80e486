"""`MapCore`: one node's part of the distributed map as a deterministic state machine (sans-IO).

The core owns every decision of the map and does no I/O of its own: the adapter
(`aether.maps.service`) feeds it events — the partition table and map definitions from the
consensus store, peers going up and down, messages, operations of local callers, the passing of
time — and carries out the actions each call returns (`Send`, `Reply`, `Fail`, `WriteTable`).
Time comes in as arguments (`now`: monotonic seconds, `wall`: wall-clock milliseconds); the
storage engines are synchronous and handed in by the adapter. The seeded simulation
(`aether.testing.mapsim`) drives the same class.

Roles per partition `p` of the current `PartitionTable` (docs/maps.md has the full model):

- **Primary** (first owner). Serves `p` after taking it over at the current table version (its
  *epoch*): it asks every member for its copy with a *fence* (they then refuse older primaries'
  writes and read checks), merges the copies that the owners of `p`'s *active configuration* held
  since it became active — it needs ``R - W + 1`` of them, since every acknowledged write is on
  ``W`` — pushes to each current owner what it lacked until ``W - 1`` have it, and records its
  epoch as the active configuration (`Activate`: a compare-and-set of the table, which fails once
  a newer table exists). It takes `p` over again whenever `p`'s owners differ from the active
  configuration's. It evaluates every operation without yielding; a write is stored, sent to the
  replicas, and answered once ``W - 1`` acknowledged (unless the caller's node is one of them and
  ``W <= 2``: that replica answers its caller as it stores the copy, and the primary sends no
  answer); an unacknowledged write is resent until it is, never failed. A read, or an operation
  that writes nothing, waits until no write of its key is unacknowledged and until a *read check*
  started after it confirmed with ``W - 1`` replicas that no newer primary fenced them: a deposed
  primary cannot answer from stale data.
- **Replica**: applies writes and pushes unless fenced, answers read checks, raises its fence when
  it sees a newer epoch, and asks its primary for the active configuration's copy if it lacks it.
- **Any node** runs operations for local callers: sends each to the partition's primary (a direct
  call when that is itself) and retries with the *same* operation id until it gets an answer or
  `op_timeout` passes. Applied writes' ids travel with the records (kept `dedup_ms`), and the
  primary keeps one execution per id (retries join it, answered ones get the same answer), so a
  retry after a lost answer, a failover or a handover reports the first attempt's outcome.
- **Leader** (of the consensus store): keeps the table equal to the live members (a node counts as
  gone `down_grace` seconds after its link dropped, longer for one that keeps going down, and a
  member not heard from since this node started `start_grace` seconds after the start), checked
  on every change and every tick. A node that came up and is not in the table is planned in once
  it reported (a *table probe*: `ReadCheck.table`) that its store replica has the table the
  leader would replace, so that it knows at once the partitions the new table gives it; after
  `rejoin_wait` without such a report all the same, and a node of an earlier version (it cannot
  report) at once.

A node without a consensus quorum (`set_quorum(False)`) stops serving as primary. A node whose
storage fails (an engine raises: full disk, I/O error) stops serving that map, says why in every
answer, and asks to be left out of the table (`StorageHealth`) until a probe finds room on its
file system (`MapTimings.probe_room`) and its write commits.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aether.core.calls import RetryPolicy
from aether.core.maps import (
    MAX_CAS_BYTES,
    MapError,
    MapSpec,
    MapUnavailable,
    MapValueTooLarge,
    PartitionTable,
    UnknownMap,
)
from aether.maps.messages import (
    KIND_BAD_REQUEST,
    KIND_NOT_PRIMARY,
    KIND_UNAVAILABLE,
    KIND_UNKNOWN_MAP,
    TABLE_UNREPORTED,
    KeysRequest,
    KeysResponse,
    MapNodeStats,
    MapRequest,
    MapResponse,
    OpId,
    OpIds,
    Push,
    PushAck,
    ReadCheck,
    ReadCheckAck,
    Replicate,
    ReplicateAck,
    StatsRequest,
    StatsResponse,
    SyncChunk,
    SyncRequest,
)
from aether.maps.partitioning import DEFAULT_PARTITIONS, active_owners, owners_for, partition_of, plan_table
from aether.maps.records import OP_CAS, OP_GET, OP_NAMES, Outcome, Record, evaluate, meta_live, newer
from aether.maps.storage import MapStorage, no_space

__all__ = [
    "RETRY_REASONS",
    "Action",
    "Activate",
    "Answered",
    "Fail",
    "MapCore",
    "MapTimings",
    "Reply",
    "Send",
    "StorageHealth",
    "WriteTable",
]

_SYNC_CHUNK_ITEMS = 512  # records and operation ids per sync chunk, at most (and `batch_records`)
_SYNC_CHUNK_BYTES = 1024 * 1024
_FENCED_PUSH = "fenced: a newer primary took these partitions over"
_RECEIVED = 1024  # pushes in pieces applied lately, remembered so a resent last piece is acknowledged
_MAX_OUTCOMES = 50_000  # answers of operations that wrote nothing, kept for their retries
# what deleting a partition's copy costs besides its records, in records (`MapCore._drop_copies`):
# SQLite runs a few statements for it, as long as deleting about this many records
_DROP_PARTITION_COST = 16
_SLOW_TAKEOVER = 5.0  # seconds after which a takeover still under way is logged (once)
_MAX_PARKED = 10_000  # operations waiting at one primary for promotion, a key's writes or a check


# --- actions --------------------------------------------------------------------------------------


class Send(NamedTuple):
    peer: str
    msg: Any


class Reply(NamedTuple):
    """Local operation `op` finished: `value` (get, failed compare-and-set) and `ok`."""

    op: int
    value: bytes | None
    ok: bool


class Fail(NamedTuple):
    op: int
    error: MapError


class WriteTable(NamedTuple):
    """(Leader) compare-and-set the partition table from `expected` to `new`; report the outcome
    with `MapCore.table_written`."""

    expected: PartitionTable | None
    new: PartitionTable


class Activate(NamedTuple):
    """Record `version` as the active configuration of `partitions` in the partition table, with
    a compare-and-set that fails if the table is no longer at `version`; report the outcome with
    `MapCore.activated`."""

    version: int
    partitions: list[int]
    forced: tuple[int, ...] = ()
    """Of `partitions`, those taken over without owners that left (`PartitionTable.forced`)."""


class Answered(NamedTuple):
    """(Primary) the request `id` of `peer` needs no `MapResponse`: that node, a replica of the
    write, answered its caller itself when it stored its copy. Nothing is sent; the adapter ends
    what it keeps for the request (its trace span)."""

    peer: str
    id: int


class StorageHealth(NamedTuple):
    """This node's map storage failed (`reason`) or works again (None): the adapter records it
    where the leader's planner sees it (the table leaves out nodes whose storage failed)."""

    reason: str | None


Action = Send | Reply | Fail | WriteTable | Activate | StorageHealth | Answered


RETRY_REASONS = ("timeout", "refused", "unreachable")
"""Why an operation of a local caller was tried again (`MapCore.client_retries`): its primary did
not answer within the attempt timeout; answered that it is not (or not yet) the primary or that
the map is unavailable there; or no primary was known or reachable."""

_CLIENT_RETRY = RetryPolicy(timeout=5.0, attempt_timeout=1.0, backoff_min=0.02, backoff_max=0.5)


@dataclass(frozen=True)
class MapTimings:
    retry: RetryPolicy = _CLIENT_RETRY
    """Operations of local callers: retried (same id) with backoff while their primary is unknown,
    unreachable or not ready; one attempt waits `attempt_timeout` for the primary's answer; after
    `timeout` the operation fails with `MapUnavailable`."""
    resend_after: float = 0.5
    """Unacknowledged replication, pushes and read checks are resent after this."""
    sync_timeout: float = 2.0
    """A promotion's sync request that got no chunk for this long is sent again."""
    down_grace: float = 0.5
    """A member that went down counts as gone (the leader plans it out) this long after; one that
    keeps going down and coming back (a lagging node: its heartbeats come late on a loaded
    machine) twice as long for each other time it went down within `flap_window`, up to
    `flap_grace`: every table without it and back with it moves a share of the partitions over
    twice, adding to the load that makes it lag."""
    flap_window: float = 60.0
    flap_grace: float = 8.0
    start_grace: float = 2.0
    """A member (of the table or the member set) this node has not heard from since it started counts
    as live for this long after the start: nodes of a cluster started (or restarted) together come
    up within moments of each other, and a leader that planned them out of the table only to plan
    them back in would make every node take its partitions over twice."""
    rejoin_wait: float = 10.0
    """A node that comes up and is not in the partition table (it returns, or joins) is planned in
    once it reports (`ReadCheck.table`, a table probe) that its consensus store replica applied the
    table the leader would replace: planned in earlier, it would be given partitions while it does
    not know it, and they would be served by nobody until its replica caught up. A node that does
    not report that within this long of coming up is planned in all the same (logged); one of an
    earlier version (it cannot report) at once."""
    force_after: float = 10.0
    """A promotion that cannot hear enough previous owners because they left the table proceeds
    after this long (their unreplicated writes may be lost; it says so)."""
    gather_for: float = 0.5
    """A takeover's partitions that are synced while answers of owners are still on the way wait
    for them this long at most (from the takeover's start), so that the partitions those answers
    complete go on together (one push per owner and map, one activation: a consensus write);
    after it, each goes on as soon as it is synced (one short of copies holds up only itself)."""
    drop_after: float = 10.0
    tombstone_ms: int = 3_600_000
    dedup_ms: int = 60_000
    probe_after: float = 5.0
    """A map whose storage failed is probed again after this long."""
    probe_room: int = 16 * 1024 * 1024
    """A probe finds a map's storage working again only with at least this much free on its file
    system (when the engine can tell, `MapStorage.free_bytes`): room for the largest single write
    a node taken back in receives (a record of the largest value, 8 MiB, which travels alone)
    twice over (sqlite writes a commit to its write-ahead log, then into the database). The
    probe's own write is a few bytes: once a failed write was undone it fit on a disk still full,
    and the node was taken back in, failed at the takeover's first writes and went out again,
    every `probe_after`."""
    piece_bytes: int = 4 * 1024 * 1024
    """The most data (records, operation ids, deleted keys, keys) one push piece, one sync chunk or
    one keys answer carries; a single record larger than that travels alone. Well under the
    transport's `max_frame` (16 MiB) with a largest value (8 MiB) on top."""
    batch_records: int = 1000
    """The most records (or operation ids) one step of a node handles for a takeover, about: a
    copy for one replica goes in pushes of whole partitions of about this many records each (a
    partition with more goes alone), the next sent once the one before is acknowledged; an owner
    answers a sync this many records per step (`MapCore.more`), the node taking over merges an
    answer this many per step, and a node deletes the copies it drops this many per step. One
    push of a third of 20,000 keys kept the replica's event loop from answering heartbeats for
    0.1-0.2 s per push (and 0.1 s more for its commit), a sync's answer its owner's for 0.06-0.14
    s and its merge the new primary's for 0.07-0.2 s."""
    batch_bytes: int = 4 * 1024 * 1024
    """The most data (records, operation ids, deleted keys) one push of a copy carries, about: a
    copy for one replica goes in pushes of whole partitions within this (and `batch_records`); a
    partition with more goes alone, in pieces of `piece_bytes`. The primary builds a push whole
    and the replica keeps its pieces until the last one arrives: bounded by records alone, a push
    of 1,000 records of values up to `MapSpec.max_value_bytes` (1 MiB) was up to 1 GiB on each."""

    def __post_init__(self) -> None:
        if self.retry.attempt_timeout is None:
            raise ValueError("map operations need a per-attempt timeout (retry.attempt_timeout)")
        if self.piece_bytes < 1:
            raise ValueError(f"piece_bytes must be at least 1, not {self.piece_bytes}")
        if self.batch_records < 1:
            raise ValueError(f"batch_records must be at least 1, not {self.batch_records}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes must be at least 1, not {self.batch_bytes}")

    @property
    def op_timeout(self) -> float:
        """How long an operation is retried before it fails with `MapUnavailable`."""
        return self.retry.timeout

    @property
    def attempt_timeout(self) -> float:
        """How long one attempt waits for the primary's answer before retrying (same id)."""
        return self.retry.attempt_timeout or self.retry.timeout


# --- per-operation and per-partition state ----------------------------------------------------------


@dataclass(slots=True)
class _Target:
    """Who waits for an operation's answer: a peer's request (`peer`, request `id`) or a local op."""

    peer: str | None
    id: int


@dataclass(slots=True)
class _Op:
    """An operation as the primary serves it."""

    target: _Target
    oid: OpId
    name: str
    op: int
    key: str
    value: bytes | None
    expected: bytes | None
    ttl_ms: int
    partition: int
    extra: list[_Target] = field(default_factory=list)  # retries and duplicates of the same operation
    parked_at: float = 0.0  # when it started waiting for the partition's takeover
    checks: bool = False  # the caller's node makes the read check itself (`MapRequest.checks`)


@dataclass(slots=True)
class _Write:
    """A write waiting for replica acknowledgements."""

    serial: int
    name: str
    partition: int
    key: str
    rec: Record
    oid: OpId
    targets: list[_Target]
    need: int
    answer: bytes | None
    acked: set[str] = field(default_factory=set)
    sent: dict[str, float] = field(default_factory=dict)  # peer -> when last sent
    ids: dict[int, str] = field(default_factory=dict)  # message id -> peer
    done: bool = False  # acknowledged by the write quorum (its callers answered)


@dataclass(slots=True)
class _Check:
    """A read-check round of one partition and the operations it will answer."""

    id: int
    epoch: int
    ops: list[_Op]
    need: int
    acked: set[str] = field(default_factory=set)
    sent: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Primary:
    """This node as primary of one partition."""

    epoch: int
    seq: int = 0
    ready: bool = False
    parked: list[_Op] = field(default_factory=list)  # arrived before the promotion finished
    inflight: dict[tuple[str, str], int] = field(default_factory=dict)  # (map, key) -> unacked writes
    waiting: dict[tuple[str, str], list[_Op]] = field(default_factory=dict)  # reads behind unacked writes
    check: _Check | None = None  # the round in flight
    queued: list[_Op] = field(default_factory=list)  # for the next round


@dataclass(slots=True)
class _Promotion:
    """Collecting the partitions this node became primary of at `version`."""

    version: int
    parts: set[int]
    started: float
    asked: dict[int, tuple[str, str, float]] = field(default_factory=dict)  # sync id -> (peer, map, sent)
    answered: dict[str, set[str]] = field(default_factory=dict)  # map -> peers that answered fully
    holders: dict[str, dict[str, set[int]]] = field(default_factory=dict)  # map -> peer -> partitions held
    # sync id -> the items received so far that their chunk did not say the owner holds (merged once
    # the last chunk says which partitions count; those it holds are merged as they come)
    buffered: dict[int, list[tuple[int, str, Record]]] = field(default_factory=dict)
    buffered_ops: dict[int, OpIds] = field(default_factory=dict)  # sync id -> operation ids so kept
    have: dict[tuple[str, str], dict[tuple[int, str], tuple[int, int]]] = field(default_factory=dict)
    # (peer, map) -> the partitions of which `have` is that peer's whole copy: its answer came while
    # they were still syncing (a partition past its sync before that gets the whole copy pushed)
    covered: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    merged: int = 0
    merging: int = 0  # answers still being merged in batches (`MapCore._merge_answer`)
    # Each partition goes on alone: sync (`syncing`) -> push -> record the activation (`activating`)
    # -> serve (it leaves `parts`). One that waits for copies holds up no other.
    syncing: set[int] = field(default_factory=set)  # partitions still copying from their owners
    activating: set[int] = field(default_factory=set)  # partitions whose activation is being recorded
    pushed: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # map -> {(peer, partition)} acked
    forced: bool = False
    forced_parts: set[int] = field(default_factory=set)  # gone on without owners (`Activate.forced`)
    # When no owner of a partition has a copy that counts (a power cut of the whole cluster, or the
    # whole cluster away past the tombstone horizon: every copy distrusted), the takeover takes the
    # union of the copies that do not count instead of starting empty. Until it knows, it keeps
    # them aside (newest record of each key, and their operation ids): this node's own
    # (`untrusted`: read as they are deleted, `MapCore._settle`) and the owners' answers' records
    # of partitions they do not hold. A partition that leaves the takeover before it decided puts
    # them back as this node's copy (`MapCore._set_back`); one taken from them merges them a batch
    # per step (`unioning`, `MapCore._merge_union`) before it is pushed.
    untrusted: set[tuple[str, int]] = field(default_factory=set)  # (map, partition) of own copies so kept
    spare: dict[tuple[str, int], dict[str, Record]] = field(default_factory=dict)
    spare_ops: dict[tuple[str, int], dict[OpId, int]] = field(default_factory=dict)  # -> applied at (wall ms)
    union: set[tuple[str, int]] = field(default_factory=set)  # (map, partition) taken from `spare`
    # Copies that do not count, of owners a forced takeover went on without (`PartitionTable.forced`:
    # a split's minority side, a one-replica map's node down longer than `force_after`), that held
    # only configurations older than it and were not distrusted since (a power cut, an absence
    # past the tombstone horizon): `SyncChunk.kept`, this node's own among them. Those owners come
    # back with the writes they acknowledged meanwhile: their newer records and operation ids are
    # merged even when copies that count decide (`fresh`: taken from `late` alone, not from the
    # distrusted copies of `spare`, which may hold keys removed since, tombstones purged). (Not
    # those of any copy that does not count: a deposed primary's unacknowledged compare-and-set
    # merged so, its operation id with it, was reported done to its retry although a newer
    # compare-and-set, made without seeing it, had won: map simulation, profile pieces, seed 28.)
    late: dict[tuple[str, int], dict[str, Record]] = field(default_factory=dict)
    late_ops: dict[tuple[str, int], dict[OpId, int]] = field(default_factory=dict)
    fresh: set[tuple[str, int]] = field(default_factory=set)  # of `union`: from `late` alone
    own_late: set[tuple[str, int]] = field(default_factory=set)  # own copies read into `late` too
    unioning: set[int] = field(default_factory=set)  # partitions past their sync merging the union
    unioned: bool = False  # (logged once)
    # the copies this node can no longer trust are still being deleted (`MapCore._drop_later`):
    # it asks for no copy and moves on no partition before they are gone
    dropping: bool = False
    partial: bool = False  # some partitions serve while others are still taken over (logged once)
    warned: bool = False  # a takeover that takes long is logged once, saying what it waits for


@dataclass(slots=True)
class _PushState:
    """A push to a replica, resent until acknowledged (or the partition is no longer ours). One
    larger than `MapTimings.piece_bytes` is `pieces`, sent one at a time: `at` is the piece in
    flight, sent again until acknowledged, and the next follows its acknowledgement."""

    peer: str
    name: str
    parts: list[int]
    sent: float
    pieces: list[Push]
    promotion: _Promotion | None
    at: int = 0
    warned: bool = False  # the peer answered a piece as an earlier version does (logged once)
    # the partitions pushed next, once this push is acknowledged (`MapTimings.batch_records`), and
    # what the peer reported holding (None: whole copies) with its keys per partition
    rest: list[int] = field(default_factory=list)
    known: dict[tuple[int, str], tuple[int, int]] | None = None
    reported: dict[int, list[str]] | None = None

    @property
    def msg(self) -> Push:
        return self.pieces[self.at]


@dataclass(slots=True)
class _Incoming:
    """A push arriving in pieces (`Push.stream`), kept until its last piece arrives."""

    name: str
    epoch: int
    parts: list[int]
    full: bool
    heard: float  # when its last piece arrived (one not heard of for `drop_after` is dropped)
    next: int = 0  # the piece expected next
    items: list[tuple[int, str, Record]] = field(default_factory=list)
    ops: OpIds = field(default_factory=list)
    deletes: list[tuple[int, str]] = field(default_factory=list)


@dataclass(slots=True)
class _ClientOp:
    """An operation of a local caller, retried until answered or `deadline`."""

    op_id: int
    rid: int
    name: str
    op: int
    key: str
    value: bytes | None
    expected: bytes | None
    ttl_ms: int
    deadline: float
    attempts: int = 0
    peer: str | None = None  # the primary the current attempt went to (None: not in flight)
    attempt_until: float = 0.0
    retry_at: float = 0.0
    last: str = "no partition table yet"
    trace: tuple[str, str] = ("", "")  # (traceparent, tracestate) sent with each attempt
    why: str = ""  # why the last attempt ended without an answer (`RETRY_REASONS`): the next is a retry



def _record_size(key: str, rec: Record) -> int:
    """About the encoded size of a record with its key and partition (an upper bound for keys)."""
    return len(key.encode()) + (len(rec.value) if rec.value is not None else 0) + 40


def _op_size(op: tuple[int, str, int, int]) -> int:
    """About the encoded size of an applied operation's id (`OpIds` entry)."""
    return len(op[1]) + 32


# --- the core ----------------------------------------------------------------------------------------


def _newest_held(versions: set[int] | None, active: int) -> int:
    """The newest of the configurations a copy `versions` that could have been active (none newer
    than the partition's `active` one: a takeover replaced before its activation left its version
    in the copy, never to be active); 0: none."""
    return max((v for v in versions or () if v <= active), default=0)


class MapCore:
    def __init__(
        self,
        node_id: str,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        timings: MapTimings | None = None,
        incarnation: int = 0,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self._rng = rng or random.Random(incarnation)  # backoff jitter (seeded: the core stays deterministic)
        self.partitions = partitions
        self.t = timings or MapTimings()
        self.log = logger or logging.getLogger(f"aether.maps.{node_id}")
        # Operation ids must not repeat across incarnations of this node (a restarted node's ids
        # would match the previous incarnation's applied ones): `incarnation` is random per start.
        self._rids = itertools.count((incarnation & 0x7FFFFF) << 40 | 1)
        # Nor may the ids of messages to peers (Replicate, SyncRequest, Push, ReadCheck): a peer
        # holds its answers while its link to us is down and sends them when it is up again, so
        # answers to our previous incarnation's messages would be taken for this one's. (Half way
        # up the incarnation's range: apart from the operation ids above, though no answer is
        # looked up among both.)
        self._ids = itertools.count((incarnation & 0x7FFFFF) << 40 | 1 << 39 | 1)
        self._serials = itertools.count(1)
        self._now = 0.0
        self._started: float | None = None  # the first `now` this core was given
        self._wall = 0

        self.specs: dict[str, MapSpec] = {}
        # map -> the store revision that created its definition (its identity; 0: unknown), sent
        # with its messages: a peer that knows another definition under the name refuses them
        self.created: dict[str, int] = {}
        self.engines: dict[str, MapStorage] = {}
        self.broken: dict[str, str] = {}  # map -> why its storage failed
        self._damaged: set[str] = set()  # maps broken since the last heal by more than a full disk
        self._broken_at: dict[str, float] = {}
        self.table: PartitionTable | None = None
        self._owners_table: PartitionTable | None = None  # the table `_owners_memo` is for
        self._owners_memo: dict[int, list[list[str] | None]] = {}  # replicas -> owners per partition
        self._active_table: PartitionTable | None = None  # the table `_active_memo` is for
        self._active_memo: dict[tuple[int, int], list[str] | None] = {}  # (partition, replicas) -> owners
        self.table_changed_at = 0.0
        # (map, partition) -> the active configurations whose data this node has held since they
        # became active (it took the partition over at that version, or acknowledged that takeover's
        # push): its copy counts towards a takeover's quorum only for those
        self.held: dict[tuple[str, int], set[int]] = {}
        # maps this node learned while running (`define` with `new`): it refused their writes until
        # it held them, so an empty copy of one holds every configuration whose takeover this
        # process acknowledged, also one acknowledged after it learned the map (`_hold_learned`)
        self._learned: set[str] = set()
        self.fence = [0] * partitions  # the newest primary epoch this node knows, per partition
        self.prims: dict[int, _Primary] = {}
        self._promotions: list[_Promotion] = []
        self._tracked: dict[int, _Write] = {}  # serial -> write not yet on every owner
        self._msg_write: dict[int, _Write] = {}  # Replicate id -> write
        self._pending: dict[OpId, _Write] = {}  # op id -> its write while callers wait for it
        # One execution per operation id: an operation waiting (for a takeover, a key's writes or a
        # read check) collects the retries of its caller, and an answered one that wrote nothing
        # answers them the same way (writes are found in `ops`).
        self._inprogress: dict[OpId, _Op] = {}
        # op id -> (value, ok, the epoch of an answer given before its read check, else 0)
        self._outcomes: OrderedDict[OpId, tuple[bytes | None, bool, int]] = OrderedDict()
        self._pushes: dict[int, _PushState] = {}  # the id of the piece in flight -> its push
        self._incoming: dict[tuple[str, int], _Incoming] = {}  # (sender, stream) -> pieces kept so far
        self._received: OrderedDict[tuple[str, int], str] = OrderedDict()  # pushes in pieces applied -> map
        self._checks: dict[int, tuple[int, _Check]] = {}  # ReadCheck id -> (partition, round)
        self.ops: dict[str, dict[int, dict[OpId, int]]] = {}  # map -> partition -> applied op id -> wall ms
        self.has_quorum = True
        self._quorum_lost_wall: int | None = None

        self.up: set[str] = set()
        self._down_since: dict[str, float] = {}
        self._downs: dict[str, deque[float]] = {}  # peer -> when it went down (`_grace`)
        self.excluded: set[str] = set()  # nodes whose map storage failed (left out of the table)
        self.members: set[str] | None = None  # the member set, once the node says (None: everyone up)
        self.is_leader = False
        # (leader) peers that came up and are not in the table: planned in once they report having
        # the table it would replace (`_ready_to_join`)
        self._up_at: dict[str, float] = {}  # peer -> when it came up (this time)
        self._peer_table: dict[str, int] = {}  # peer -> the table version it reported since then
        self._probing: dict[str, tuple[int, float]] = {}  # peer -> (version asked for, when)
        self._probe_ids: dict[int, str] = {}  # ids of table probes in flight -> their peer
        self._joining: dict[str, str] = {}  # peer -> what was logged about its wait ("held", "in")
        # (any node) table probes to answer once this node has the version they ask for
        self._table_waiters: dict[str, tuple[int, int]] = {}  # asker -> (probe id, version)
        self._writing_table = False
        self._table_retry_at = 0.0

        self.client: dict[int, _ClientOp] = {}
        self._client_by_rid: dict[int, int] = {}
        # map -> reason -> attempts of local callers' operations after one that got no answer
        self.client_retries: dict[str, dict[str, int]] = {}
        self._out: list[Action] = []
        # work in batches of `MapTimings.batch_records`, a batch per `more` (jobs take turns)
        self._jobs: deque[Iterator[bool]] = deque()
        # copies being deleted (`_drop_later`): map -> partition -> whether the core held it (its
        # engine's record of that goes with the copy); the core counts them as gone already
        self._dropping: dict[str, dict[int, bool]] = {}
        self._drops_running = False  # the job deleting them (`_drop_copies`) is under way
        # copies set back by takeovers replaced before they decided (`_set_back`), still to be
        # written to their engines: map -> partition -> (records, operation ids). Written a batch
        # per step (`_write_backs`), at once when anything reads or writes the partition first
        # (`_settle`), or taken whole by this node's next takeover of it (`_start_promotion`)
        self._back: dict[str, dict[int, tuple[dict[str, Record], dict[OpId, int]]]] = {}
        self._backs_running = False
        self._purge_cursor = 0
        self._last_housekeeping = 0.0
        self._last_pull = 0.0

    # --- plumbing -------------------------------------------------------------------------------------------

    def _clock(self, now: float, wall: int | None = None) -> None:
        self._now = now
        if self._started is None:
            self._started = now
        if wall is not None:
            self._wall = wall

    @property
    def busy(self) -> bool:
        """Work waits for `more`: the adapter calls it, a loop turn apart (other messages and
        timers in between), until it is done."""
        return bool(self._jobs)

    def more(self, now: float, wall: int) -> list[Action]:
        """The next batch of the work waiting (`busy`): a sync's answer, the merge of one, the
        deletion of copies this node no longer trusts or owns."""
        self._clock(now, wall)
        if self._jobs:
            job = self._jobs.popleft()
            if next(job, False):
                self._jobs.append(job)
        return self._take()

    def _run_job(self, job: Iterator[bool]) -> None:
        """Run `job`'s first batch now, the rest later (`more`): a job yields True after each."""
        if next(job, False):
            self._jobs.append(job)

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, peer: str, msg: Any) -> None:
        self._out.append(Send(peer, msg))

    def _answer(self, target: _Target, value: bytes | None, ok: bool) -> None:
        if target.peer is None:
            self._client_result(target.id, value, ok, None, None)
        else:
            self._send(target.peer, MapResponse(target.id, value, ok))

    def _refuse(self, target: _Target, kind: str, error: str) -> None:
        if target.peer is None:
            self._client_result(target.id, None, False, kind, error)
        else:
            self._send(target.peer, MapResponse(target.id, None, False, error, kind))

    def _answer_op(self, op: _Op, value: bytes | None, ok: bool) -> None:
        """Answer every caller of `op` and remember the outcome (a late duplicate gets the same)."""
        if self._inprogress.get(op.oid) is op:
            del self._inprogress[op.oid]
        self._keep_outcome(op.oid, value, ok, 0)
        for t in (op.target, *op.extra):
            self._answer(t, value, ok)

    def _keep_outcome(self, oid: OpId, value: bytes | None, ok: bool, check: int) -> None:
        self._outcomes[oid] = (value, ok, check)
        while len(self._outcomes) > _MAX_OUTCOMES:
            self._outcomes.popitem(last=False)

    def _refuse_op(self, op: _Op, kind: str, error: str) -> None:
        if self._inprogress.get(op.oid) is op:
            del self._inprogress[op.oid]
        for t in (op.target, *op.extra):
            self._refuse(t, kind, error)

    def _broken_why(self, name: str) -> str:
        return f"{self.node_id}: {self.broken.get(name, f'map {name!r} storage failed')}"

    def _put(self, name: str, p: int, key: str, rec: Record) -> bool:
        """Store `rec`; on a storage failure mark the map broken and return False."""
        if self._dropping or self._back:
            self._settle(name, p)
        try:
            self.engines[name].put(p, key, rec)
            return True
        except Exception as e:  # sqlite3 errors, OSError, MemoryError...: the engine is unusable now
            self._storage_failed(name, e)
            return False

    def _get(self, name: str, p: int, key: str) -> tuple[bool, Record | None]:
        if self._dropping or self._back:
            self._settle(name, p)
        try:
            return True, self.engines[name].get(p, key)
        except Exception as e:
            self._storage_failed(name, e)
            return False, None

    def _owners(self, name: str, p: int) -> list[str]:
        assert self.table is not None
        return self._owners_in(self.table, p, self.specs[name].replicas)

    def _owners_in(self, table: PartitionTable, p: int, replicas: int) -> list[str]:
        """`owners_for`, remembered per table (asked for every operation and, per partition, by
        the housekeeping every second): the same list each time, which callers do not change."""
        if table is not self._owners_table:
            self._owners_table = table
            self._owners_memo = {}
        lists = self._owners_memo.get(replicas)
        if lists is None:
            lists = self._owners_memo[replicas] = [None] * table.partitions
        owners = lists[p]
        if owners is None:
            owners = lists[p] = owners_for(table, p, replicas)
        return owners

    def _active_owners(self, table: PartitionTable, p: int, replicas: int) -> list[str] | None:
        """`active_owners`, remembered per table (a takeover asks for each partition it still syncs,
        on every answer and every tick): the same list each time, which callers do not change."""
        if table is not self._active_table:
            self._active_table = table
            self._active_memo = {}
        key = (p, replicas)
        if key not in self._active_memo:
            self._active_memo[key] = active_owners(table, p, replicas)
        return self._active_memo[key]

    def _need(self, name: str, owners: list[str]) -> int:
        """Acknowledgements a primary needs from replicas (write quorum minus itself)."""
        return min(self.specs[name].write_quorum, len(owners)) - 1

    # --- definitions ----------------------------------------------------------------------------------------

    def define(
        self, name: str, spec: MapSpec, engine: MapStorage | None, now: float, *, new: bool = False,
        replaced: bool = False, created: int | None = None,
    ) -> list[Action]:
        """Map `name` is defined as `spec`; `engine` is its storage (None: keep the current one).

        `new`: the definition was committed while this node was running; partitions whose owners
        for this map differ from their active configuration's are taken over again. (Copies count
        per partition, for every map: a node that did not know a map yet refused its writes, so it
        never acknowledged one it does not hold.)

        `replaced`: the map this node knew under `name` was removed and created again (another
        `created`) without this node seeing it (a watch reset), and `engine` is a new, empty one.
        Its copy counts for nothing, and the partitions it serves are taken over again from the
        other owners.

        `created`: the store revision that created the definition (its identity, 0 unknown; None
        keeps the one known). Messages about the map carry it, and a peer that knows another
        refuses them, so a node that has not caught up with a removal and creation again neither
        serves nor sends the removed map's data for the new one, nor takes the new one's."""
        self._clock(now)
        table = self.table
        self.specs[name] = spec
        if created is not None:
            self.created[name] = created
        if engine is not None:
            for p in list(self._dropping.get(name, ())):  # (deleted from the engine they are in)
                self._settle(name, p)
            old = self.engines.pop(name, None)
            if old is not None and old is not engine:
                old.close()
                self._forget_aside(name)
            self.engines[name] = engine
            self.ops[name] = {}
            self._drop_incoming(name)  # pieces of pushes into the engine it had
            self._learned.discard(name)
            for (n, q) in [k for k in self.held if k[0] == name]:
                del self.held[(n, q)]
            try:
                for q, versions in engine.held().items():
                    self.held[(name, q)] = set(versions)
                self.ops[name] = engine.ops_index()
                if new:
                    # a map this node learns while running: it refused the map's writes until now,
                    # so an empty copy holds all it acknowledged, as its takeovers' partitions do
                    filled = engine.partitions()
                    for (n, q), versions in list(self.held.items()):
                        if n == "" and q not in filled:
                            for v in versions:
                                self._hold(name, q, v)
                    self._learned.add(name)
            except Exception as e:
                self._storage_failed(name, e)
        for prom in self._promotions:
            if self.table is None:
                break
            if prom.syncing:  # partitions still copying copy it too
                peers = (set(self.table.members) | self.up) - {self.node_id}
                self._ask(prom, [(peer, name) for peer in sorted(peers)])
            if prom.parts - prom.syncing and engine is not None and name not in self.broken:
                # partitions past their sync: the map was committed after the table they serve, so
                # no owner can hold writes of it from an older configuration; push it (empty or not)
                # too, or their takeover would wait for its acknowledgements forever
                self._start_push(prom)
        if replaced and table is not None:
            why = f"map {name!r} was removed and created again"
            self._step_down_all([(p, why) for p in list(self.prims)])
            mine = {p for p in range(table.partitions) if table.primary(p) == self.node_id}
            if mine:
                self._start_promotion(table.version, mine)
        elif new and table is not None:
            # a map with more replicas than the others may have owners the active configurations
            # do not name: take those partitions over again
            again = {p for p, prim in self.prims.items() if prim.ready and self._unrecorded(table, p)}
            self._step_down_all(
                (p, f"map {name!r} has owners of partition {p} not recorded yet") for p in sorted(again)
            )
            if again:
                self._start_promotion(table.version, again)
        return self._take()

    def undefine(self, name: str, now: float) -> tuple[MapStorage | None, list[Action]]:
        """Map `name` was removed: forget it and return its engine for the adapter to delete, and
        the actions that answer what still waited for the map (`UnknownMap` for its callers: once
        forgotten, nothing here may read its definition or its engine again)."""
        self._clock(now)
        why = f"map {name!r} was removed while the operation waited"
        for prim in self.prims.values():
            ops = [op for op in prim.parked if op.name == name]
            prim.parked = [op for op in prim.parked if op.name != name]
            ops += [op for op in prim.queued if op.name == name]
            prim.queued = [op for op in prim.queued if op.name != name]
            for mk in [k for k in prim.waiting if k[0] == name]:
                ops += prim.waiting.pop(mk)
            for mk in [k for k in prim.inflight if k[0] == name]:
                del prim.inflight[mk]
            if prim.check is not None:
                ops += [op for op in prim.check.ops if op.name == name]
                prim.check.ops = [op for op in prim.check.ops if op.name != name]
            for op in ops:
                self._refuse_op(op, KIND_UNKNOWN_MAP, why)
        for w in [w for w in self._tracked.values() if w.name == name]:
            targets, w.targets = w.targets, []
            for t in targets:
                self._refuse(t, KIND_UNKNOWN_MAP, why)
        for c in [c for c in self.client.values() if c.name == name]:
            self._finish(c, Fail(c.op_id, UnknownMap(why)))
        self._forget_aside(name)
        self.specs.pop(name, None)
        self.created.pop(name, None)
        self._learned.discard(name)
        self.ops.pop(name, None)
        self.broken.pop(name, None)
        self._damaged.discard(name)
        for key in [k for k in self.held if k[0] == name]:
            del self.held[key]
        for sid in [k for k, w in self._tracked.items() if w.name == name]:
            self._untrack(self._tracked[sid])
        for rid in [k for k, ps in self._pushes.items() if ps.name == name]:
            del self._pushes[rid]
        self._drop_incoming(name)
        self._dropping.pop(name, None)  # (the adapter deletes the whole engine)
        return self.engines.pop(name, None), self._take()

    def primary_here(self, name: str, key: str) -> bool:
        """Whether this node is the primary of `key`'s partition of map `name` in the partition
        table it knows now: a hint (the table changes as nodes come and go; False while there is
        none, or for a map not defined here). Reads only, so a slice loop's thread may ask."""
        table = self.table
        if table is None or name not in self.specs:
            return False
        return table.primary(partition_of(key, table.partitions)) == self.node_id

    def spec(self, name: str) -> MapSpec:
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise UnknownMap(
                f"map {name!r} is not defined (defined maps: {known}); declare it in a blueprint "
                f"[maps.{name}] section or with `aether map create {name}`"
            )
        return spec

    # --- the table ------------------------------------------------------------------------------------------

    def set_table(self, new: PartitionTable, now: float, *, reset: bool = False) -> list[Action]:
        """A partition table committed in the consensus store (the same version again: only its
        active configurations changed)."""
        self._clock(now)
        old = self.table
        if new.partitions != self.partitions:
            self.log.error(
                "partition table has %d partitions, this node is configured for %d; ignoring it",
                new.partitions, self.partitions,
            )
            return self._take()
        if old is not None and new.version < old.version:
            return self._take()
        self.table = new
        if old is not None and new.version == old.version:
            for prom in list(self._promotions):
                if prom.version == new.version and prom.activating:
                    done = {p for p in prom.activating if new.active[p] == new.version}
                    self._activated(prom, done)
            return self._take()
        self.table_changed_at = now
        for asker, (pid, version) in list(self._table_waiters.items()):
            if new.version >= version:
                del self._table_waiters[asker]
                self._send(asker, ReadCheckAck(pid, True, None, new.version))
        promote: set[int] = set()
        down: list[tuple[int, str]] = []
        for p in range(new.partitions):
            if new.primary(p) != self.node_id:
                if p in self.prims:
                    down.append((p, f"{new.primary(p)} is primary of partition {p} since v{new.version}"))
            elif p not in self.prims or not self.prims[p].ready or self._unrecorded(new, p):
                # (a takeover still under way can only be recorded at the version it started at)
                down.append((p, f"{self.node_id} takes partition {p} over again at table v{new.version}"))
                promote.add(p)
        self._step_down_all(down, advance=False)  # (every takeover moves on next)
        for prom in list(self._promotions):
            self._set_back(prom, promote & prom.parts)
            prom.parts -= promote
            prom.syncing -= promote
            self._advance(prom)
        if promote:
            self._start_promotion(new.version, promote)
        for w in list(self._tracked.values()):
            self._retarget(w)
        self.log.info(
            "partition table v%d: %d members, primary of %d partitions (%d to take over)",
            new.version, len(new.members),
            sum(1 for p in range(new.partitions) if new.primary(p) == self.node_id),
            len(promote),
        )
        self._retry_clients()
        self._plan()
        return self._take()

    def _unrecorded(self, table: PartitionTable, p: int) -> bool:
        """Whether the owners of `p` (of any map) differ from those of its active configuration: a
        primary that keeps `p` takes it over again, so that they hold it before it is recorded."""
        return any(
            active_owners(table, p, spec.replicas) != self._owners_in(table, p, spec.replicas)
            for spec in self.specs.values()
        )

    def _retarget(self, w: _Write) -> None:
        if w.name not in self.specs or w.partition not in self.prims:
            self._untrack(w)
            return
        owners = self._owners(w.name, w.partition)
        w.need = self._need(w.name, owners)
        w.acked &= set(owners)
        self._maybe_complete(w)

    def _start_promotion(self, version: int, parts: set[int]) -> None:
        for p in parts:
            self.prims[p] = _Primary(epoch=version)
            self.fence[p] = max(self.fence[p], version)
        # The partition's data is what the owners of its active configuration hold. A copy this
        # node did not hold as one of them, and that was distrusted since (a power cut, an absence
        # past the tombstone horizon: it holds no configuration), may hold keys removed since whose
        # tombstones were purged: drop it first.
        # When no owner has a copy that counts, though, the copies that do not are all there is
        # (`_Promotion.spare`): this node's own ones are read as they are deleted, unless they were
        # being deleted already (the node forgot its data: out of date or damaged).
        prom = _Promotion(version, set(parts), self._now, syncing=set(parts))
        for name, spec in self.specs.items():
            engine = self.engines.get(name)
            if engine is None or name in self.broken:
                continue
            dropping = self._dropping.get(name, {})
            for p in parts:
                if not self._trusted(p, spec, name):
                    back = self._take_back(name, p)  # (set back by the takeover this one replaces)
                    t = self.table
                    active = t.active[p] if t is not None and len(t.active) == t.partitions else 0
                    newest = _newest_held(self.held.get((name, p)), active)  # (0: distrusted, never held)
                    kept = bool(newest) and self._forced_over(p, newest)
                    if kept and back is None and p not in dropping:
                        # It stays as it is: the copies that count are merged into it and its
                        # newer records win, as those of the others' copies that held one do
                        # (`_Promotion.late`: an owner a forced takeover went on without). Deleted
                        # first and kept in memory until the takeover decided, it was lost when the
                        # process stopped meanwhile.
                        continue
                    if p not in dropping and (kept or self._active_owner(self.node_id, name, p)):
                        prom.untrusted.add((name, p))
                        records, ops = back or ({}, {})
                        for oid, at in (self.ops.get(name, {}).get(p) or {}).items():
                            ops[oid] = max(at, ops.get(oid, at))
                        if records:
                            prom.spare[(name, p)] = records
                        if ops:
                            prom.spare_ops[(name, p)] = ops
                        if kept:
                            prom.own_late.add((name, p))
                            if records:
                                prom.late[(name, p)] = dict(records)
                            if ops:
                                prom.late_ops[(name, p)] = dict(ops)
                    self._drop_later(name, p)
        self._promotions.append(prom)
        if self._dropping:  # (its first batch now: all of them, if they are few)
            prom.dropping = True
            self._start_drops()
        else:
            self._ask(prom)
            self._advance(prom)

    def _ask(self, prom: _Promotion, only: Iterable[tuple[str, str]] | None = None) -> None:
        """Send sync requests (with the fence) for the promotion's partitions still syncing."""
        table = self.table
        if table is None or not prom.syncing or prom.dropping:
            return
        parts = sorted(prom.syncing)
        if only is None:
            peers = (set(table.members) | self.up) - {self.node_id}
            only = [(peer, name) for name in self.specs for peer in sorted(peers)]
        for peer, name in only:
            if peer not in self.up or name not in self.specs:
                continue
            rid = next(self._ids)
            prom.asked[rid] = (peer, name, self._now)
            active = [table.active[p] if len(table.active) == table.partitions else 0 for p in parts]
            self._send(peer, SyncRequest(
                rid, name, parts, prom.version, active, split_ops=True, created=self.created.get(name, 0)
            ))

    def _holds(self, name: str, p: int, version: int) -> bool:
        return version in self.held.get((name, p), ())

    def _hold(self, name: str, p: int, version: int) -> None:
        """This node's copy of partition `p` of map `name` (""; the partition itself) holds the
        configuration active since `version`: kept with the data (`MapStorage.set_held`)."""
        versions = self.held.setdefault((name, p), set())
        if version in versions:
            return
        versions.add(version)
        while len(versions) > 8:
            versions.discard(min(versions))
        self._persist_held(name, p)

    def _unhold(self, name: str, p: int) -> None:
        if self.held.pop((name, p), None) is not None:
            self._persist_held(name, p)

    def _persist_held(self, name: str, p: int) -> None:
        engine = self.engines.get(name) if name else None
        if engine is not None and name not in self.broken:
            try:
                engine.set_held(p, self.held.get((name, p), set()))
            except Exception as e:
                self._storage_failed(name, e)

    def _drop_later(self, name: str, p: int) -> None:
        """Delete this node's copy of partition `p` of map `name`: at once as far as the core goes
        (it holds no configuration, no operation ids: it counts for no takeover), from the engine
        a batch of `MapTimings.batch_records` records per step (`_drop_copies`). Meanwhile nothing
        reads what is left of it: a takeover asks for no copy until every copy is deleted
        (`_Promotion.dropping`), and whatever else reads or writes the partition deletes it first
        (`_settle`): a sync's answer, a push, a replicated write. All at once, a table that made a
        node drop ~340 partitions held its loop 0.03-0.1 s."""
        held = self.held.pop((name, p), None) is not None
        self.ops.get(name, {}).pop(p, None)
        self._take_back(name, p)  # (forgotten with it)
        parts = self._dropping.setdefault(name, {})
        parts[p] = parts.get(p, False) or held

    def _start_drops(self) -> None:
        if self._dropping and not self._drops_running:
            self._drops_running = True
            self._run_job(self._drop_copies())

    def _drop_copies(self) -> Iterator[bool]:
        """Delete the copies `_drop_later` left in the engines, about `batch_records` records per
        step (a partition counts as `_DROP_PARTITION_COST` records more: its statements cost that
        much in SQLite), then move on the takeovers that waited for it."""
        n = 0
        while self._dropping:
            if n >= self.t.batch_records:
                yield True
                n = 0
                continue  # (what is left may have changed meanwhile)
            name, parts = next(iter(self._dropping.items()))
            n += _DROP_PARTITION_COST + self._settle(name, next(iter(parts)))
        self._drops_running = False
        for prom in list(self._promotions):
            if prom.dropping:
                prom.dropping = False
                self._ask(prom)
                self._advance(prom)

    def _settle(self, name: str, p: int) -> int:
        """Delete from its engine the copy of `p` of map `name` that `_drop_later` left there, if
        it did, or write back the copy `_set_back` left to write (`_write_backs`); the number of
        records deleted or written."""
        back = self._take_back(name, p)
        if back is not None:
            return self._write_back(name, p, back)
        parts = self._dropping.get(name)
        if parts is None or p not in parts:
            return 0
        held = parts.pop(p)
        if not parts:
            del self._dropping[name]
        engine = self.engines.get(name)
        if engine is None:
            return 0
        if held:
            self._persist_held(name, p)
        try:
            for prom in self._promotions:
                if (name, p) in prom.untrusted and p in prom.syncing:
                    items = [(p, key, rec) for key, rec in engine.scan(p)]
                    self._keep_aside(prom, name, items, late=(name, p) in prom.own_late)
            return engine.drop(p)
        except Exception as e:
            self._storage_failed(name, e)
            return 0

    def _settle_all(self, name: str, parts: Iterable[int]) -> None:
        """`_settle` each of `parts` (before reading or writing their copies as a whole)."""
        if name in self._dropping or name in self._back:
            for p in parts:
                self._settle(name, p)

    def _active_owner(self, node: str, name: str, p: int) -> bool:
        """Whether `node` is an owner of partition `p`'s active configuration (for map `name`)."""
        spec, table = self.specs.get(name), self.table
        if spec is None or table is None:
            return False
        return node in (self._active_owners(table, p, spec.replicas) or ())

    def _keep_aside(
        self, prom: _Promotion, name: str, items: Iterable[tuple[int, str, Record]], *,
        spare: bool = True, late: bool = False,
    ) -> None:
        """Keep `items`, records of copies that do not count, in case no owner has one that does
        (`spare`: `_Promotion.spare`), and (`late`: of copies that held a configuration,
        `_Promotion.late`) to merge their newer records in any case: the newest record of each
        key."""
        for p, key, rec in items:
            if p in prom.syncing:
                for keep, store in ((spare, prom.spare), (late, prom.late)):
                    if keep:
                        kept = store.setdefault((name, p), {})
                        if newer(rec, kept.get(key)):
                            kept[key] = rec

    def _keep_ops_aside(
        self, prom: _Promotion, name: str, ops: OpIds, *, spare: bool = True, late: bool = False,
    ) -> None:
        """Keep `ops`, operation ids of copies that do not count, with their records
        (`_Promotion.spare_ops`, `late_ops`): a retry whose id is only there is recognised after a
        union."""
        for p, origin, rid, at in ops:
            if p in prom.syncing:
                for keep, store in ((spare, prom.spare_ops), (late, prom.late_ops)):
                    if keep:
                        kept = store.setdefault((name, p), {})
                        kept[(origin, rid)] = max(at, kept.get((origin, rid), at))

    def _merge_union(self, prom: _Promotion, parts: set[int]) -> Iterator[bool]:
        """Merge into this node's copy the union of the copies that do not count of `parts` (past
        their sync, no owner had a copy that counts: `_synced`), `MapTimings.batch_records`
        records and operation ids per step, then push them. All at once, the union of a big
        partition kept the loop for as long as its size. A partition that leaves the takeover
        meanwhile puts what is left of it back (`_set_back`) and is merged no further; one whose
        map fails here keeps what is left (it waits, as a sync does, to leave the table)."""
        budget = self.t.batch_records
        n = 0
        merged: set[int] = set()
        for p in sorted(parts):
            whole = True
            for name in list(self.specs):
                key = (name, p)
                if key not in prom.union:
                    continue
                spare = prom.spare.setdefault(key, {})
                ops = prom.spare_ops.setdefault(key, {})
                while spare or ops:
                    if n >= budget:
                        yield True
                        n = 0
                    if p not in prom.unioning or prom.spare.get(key) is not spare:
                        break  # (set back: `_set_back`)
                    if name in self.broken or name not in self.engines:
                        whole = False
                        break
                    if spare:
                        k, rec = spare.popitem()
                        n += 1
                        ok, current = self._get(name, p, k)
                        if ok and newer(rec, current) and self._put(name, p, k, rec):
                            prom.merged += 1
                        continue
                    batch: OpIds = []
                    while ops and len(batch) < budget - n:
                        (origin, rid), at = ops.popitem()
                        batch.append((p, origin, rid, at))
                    n += len(batch)
                    self._merge_ops(name, batch)
                if p in prom.unioning and not spare and not ops:
                    prom.spare.pop(key, None)
                    prom.spare_ops.pop(key, None)
                    prom.union.discard(key)
                elif p in prom.unioning:
                    whole = False
            if whole and p in prom.unioning:
                merged.add(p)
        prom.unioning -= merged
        if merged and prom in self._promotions:
            self._start_push(prom)
            self._advance(prom)

    def _set_back(self, prom: _Promotion, parts: Iterable[int]) -> None:
        """`parts` leave `prom` (a newer table, a newer primary's fence, the node dropping its
        copies) before it took them over from the copies it set aside: this node's own copy that it
        set aside is its copy again (not deleted, if its deletion had not come yet; else put back,
        with the other owners' records kept with it, newest of each key, and their operation ids:
        `_back`, written a batch per step), one that counts for nothing, as before the takeover.
        The next takeover of them, here or on another node, reads it again. It used to be
        forgotten with the takeover: the writes only it had were lost."""
        for p in parts:
            if p not in prom.syncing and p not in prom.unioning:
                continue  # (decided: what it took is in this node's copy)
            prom.unioning.discard(p)
            for name in {n for n, q in itertools.chain(prom.spare, prom.untrusted, prom.late) if q == p}:
                key = (name, p)
                spare = prom.spare.pop(key, {})
                ops = prom.spare_ops.pop(key, {})
                prom.late.pop(key, None)
                prom.late_ops.pop(key, None)
                prom.fresh.discard(key)
                prom.own_late.discard(key)
                prom.union.discard(key)
                if key not in prom.untrusted:
                    continue  # (the owners' copies are still theirs)
                prom.untrusted.discard(key)
                if name not in self.engines or name in self.broken:
                    continue
                dropping = self._dropping.get(name)
                if dropping is not None and p in dropping:  # not deleted yet: it stays
                    if dropping.pop(p):
                        self._persist_held(name, p)
                    if not dropping:
                        del self._dropping[name]
                if spare or ops:
                    records, ids = self._back.setdefault(name, {}).setdefault(p, ({}, {}))
                    for k, rec in spare.items():
                        if newer(rec, records.get(k)):
                            records[k] = rec
                    for oid, at in ops.items():
                        ids[oid] = max(at, ids.get(oid, at))
        if self._back and not self._backs_running:
            # (from the next step on: a takeover of them that starts in this one, at a newer
            # table, takes them as they are instead, `_start_promotion`)
            self._backs_running = True
            self._jobs.append(self._write_backs())

    def _take_back(self, name: str, p: int) -> tuple[dict[str, Record], dict[OpId, int]] | None:
        """What `_set_back` left to write of partition `p` of map `name` (None: nothing), no
        longer left."""
        parts = self._back.get(name)
        if parts is None or p not in parts:
            return None
        back = parts.pop(p)
        if not parts:
            del self._back[name]
        return back

    def _write_back(self, name: str, p: int, back: tuple[dict[str, Record], dict[OpId, int]]) -> int:
        """Write `back` (records, newest of each key, and operation ids) into this node's copy of
        `p` (one that does not count); the number of records and ids written."""
        engine = self.engines.get(name)
        records, ids = back
        if engine is None or name in self.broken:
            return 0
        try:
            for k, rec in records.items():
                if newer(rec, engine.get(p, k)):
                    engine.put(p, k, rec)
            if ids:
                engine.add_ops([(p, origin, rid, at) for (origin, rid), at in ids.items()])
        except Exception as e:
            self._storage_failed(name, e)
            return 0
        by_p = self.ops.setdefault(name, {}).setdefault(p, {})
        by_p.update(ids)
        return len(records) + len(ids)

    def _write_backs(self) -> Iterator[bool]:
        """Write the copies `_set_back` left, about `batch_records` records and operation ids per
        step: a takeover replaced with many partitions set aside, all written back at once, kept
        the loop as long as the node's share of the map."""
        budget = self.t.batch_records
        n = 0
        while self._back:
            if n >= budget:
                yield True
                n = 0
                continue  # (what is left may have changed meanwhile)
            name, parts = next(iter(self._back.items()))
            p, (records, ids) = next(iter(parts.items()))
            batch: tuple[dict[str, Record], dict[OpId, int]] = ({}, {})
            while records and n + len(batch[0]) < budget:
                k, rec = records.popitem()
                batch[0][k] = rec
            while ids and n + len(batch[0]) + len(batch[1]) < budget:
                oid, at = ids.popitem()
                batch[1][oid] = at
            if not records and not ids:
                self._take_back(name, p)
            n += max(1, self._write_back(name, p, batch))
        self._backs_running = False

    def _forget_aside(self, name: str) -> None:
        """Map `name` was removed, or its engine replaced: what takeovers set aside of it is not
        the map's any more."""
        self._back.pop(name, None)
        for prom in self._promotions:
            for store in (prom.spare, prom.spare_ops, prom.late, prom.late_ops):
                for key in [k for k in store if k[0] == name]:
                    del store[key]
            prom.untrusted = {k for k in prom.untrusted if k[0] != name}
            prom.union = {k for k in prom.union if k[0] != name}
            prom.fresh = {k for k in prom.fresh if k[0] != name}
            prom.own_late = {k for k in prom.own_late if k[0] != name}

    def _trusted(self, p: int, spec: MapSpec, name: str) -> bool:
        """Whether this node's copy of `p` counts as one of its active configuration's."""
        table = self.table
        assert table is not None
        owners = self._active_owners(table, p, spec.replicas)
        if owners is None or self.node_id not in owners:
            return False
        return self._holds(name, p, table.active[p])

    def _synced(self, prom: _Promotion, p: int) -> bool:
        """Enough owners of `p`'s active configuration answered for every map (every acknowledged
        write is on ``W`` of them), or those missing left the table `force_after` ago (then it says
        which writes may be lost)."""
        table = self.table
        assert table is not None
        prom.forced_parts.discard(p)
        for name, spec in self.specs.items():
            if name in self.broken:
                return False  # it cannot hold this map's copy: it waits to leave the table
            owners = self._active_owners(table, p, spec.replicas)
            if owners is None:
                continue  # never taken over: nothing was written
            need = len(owners) - min(spec.write_quorum, len(owners)) + 1
            answered = prom.answered.get(name, set())
            holders = prom.holders.get(name, {})
            prom.union.discard((name, p))
            prom.fresh.discard((name, p))
            late = bool(prom.late.get((name, p)) or prom.late_ops.get((name, p)))
            others = [o for o in owners if o != self.node_id]
            have = sum(1 for o in others if p in holders.get(o, ()))
            if self._trusted(p, spec, name):
                have += 1
            if have >= need:
                if late:  # (the newer records of copies that held a configuration: `_Promotion.late`)
                    prom.union.add((name, p))
                    prom.fresh.add((name, p))
                continue
            # Owners that answered without the copy (they restarted, or lost their disk) or left the
            # table: after `force_after` it goes on without them (they may come back with it from
            # a split), saying that writes only they had may be lost. When every owner answered
            # (the whole configuration restarted, some copies lost), nothing more can come back:
            # it goes on at once.
            lost = [o for o in others if o in answered and p not in holders.get(o, ())]
            if self.node_id in owners and not self._trusted(p, spec, name):
                lost.append(self.node_id)
            # (an owner left out only because its map storage failed has not left: it keeps its
            # copy and comes back with it once its disk has room, and it may hold the only copies
            # that count, when every owner's disk filled in turn: going on without it lost them)
            # (an owner the table left out that this node saw up within `force_after`, or sees up
            # now, has not left either: its loop lagged, its heartbeats came late and the leader
            # planned it out, but it keeps its copy and answers once it keeps up. Going on without
            # it lost every write only it and another such owner had acknowledged: a repository's
            # chunks, on a machine at load 11, after 48 tables in 10 minutes.)
            left = [
                o for o in others if o not in answered and o not in table.members and not self._storage_out(o)
                and self._away_for(o) >= self.t.force_after
            ]
            # Every owner it could still hear from is waited for: one of them may hold the only
            # other copy of a write (it used to go on once the owners gone and those without a copy
            # made up for the copies short, without an owner that had only not answered yet)
            all_answered = all(o in answered for o in others)
            waited = self._now - prom.started >= self.t.force_after
            if all_answered or (waited and all(o in answered or o in left for o in others)):
                if left:  # (recorded in the table: their copies are merged when they come back)
                    prom.forced_parts.add(p)
                if have == 0 and (late or prom.spare.get((name, p)) or prom.spare_ops.get((name, p))):
                    # No copy that counts anywhere (every owner's machine restarted, or the whole
                    # cluster was away past the tombstone horizon): the copies that do not are all
                    # that is left of the partition. Starting empty lost every acknowledged write.
                    prom.union.add((name, p))
                    if not prom.unioned:
                        prom.unioned = True
                        self.log.warning(
                            "partition %d of map %r: no owner has a copy that counts (all restarted "
                            "after a power cut, or were away past the tombstone horizon): taken over from "
                            "the union of their copies; the newest writes may be missing and removed keys "
                            "may come back",
                            p, name,
                        )
                    continue
                if late:
                    prom.union.add((name, p))
                    prom.fresh.add((name, p))
                if not prom.forced:
                    prom.forced = True
                    self.log.warning(
                        "partition %d of map %r: owner(s) %s lost their copy or left the cluster before "
                        "this node could copy from them; writes acknowledged only by them may be lost",
                        p, name, ", ".join(lost + left),
                    )
                continue
            return False
        return True

    def _forced_over(self, p: int, newest: int) -> bool:
        """Whether a copy of `p` that held configurations up to `newest` (and was not distrusted
        since) is one a forced takeover of `p` went on without (`PartitionTable.forced`)."""
        table = self.table
        return table is not None and len(table.forced) == table.partitions and newest < table.forced[p]

    def _newcomers(self, p: int) -> set[str]:
        """The owners of `p` in the table that are not owners of its active configuration (of any
        map): nodes that come back, or join."""
        table = self.table
        out: set[str] = set()
        if table is None:
            return out
        for spec in self.specs.values():
            active = self._active_owners(table, p, spec.replicas)
            if active is not None:
                out.update(o for o in self._owners_in(table, p, spec.replicas) if o not in active)
        return out

    def _away_for(self, node: str) -> float:
        """How long `node` has been out of this node's reach without a break (0 while it is up;
        one never heard from: since this core started)."""
        if node in self.up:
            return 0.0
        since = self._down_since.get(node, self._started)
        return self._now - since if since is not None else 0.0

    def _advance(self, prom: _Promotion) -> None:
        """Move a promotion on, partition by partition: sync -> push -> record the activation ->
        serve. A partition goes on once it is synced itself: one whose owners are short of copies
        (two of three cut off: it waits `force_after`) holds up no other (it used to hold the whole
        takeover, every partition unavailable for those 10 s). While answers are still on the way,
        for `MapTimings.gather_for` at most, the synced ones wait for the partitions those answers
        complete, to go on with them (one push per owner and map, one activation)."""
        if prom.dropping:
            return  # (moved on once the copies it does not trust are deleted: `_drop_copies`)
        union: set[int] = set()
        if prom.syncing and self.table is not None:
            synced = {p for p in prom.syncing if self._synced(prom, p)}
            gathering = bool(prom.asked or prom.merging) and self._now - prom.started < self.t.gather_for
            if gathering:
                # (a partition that an owner comes back to waits for that owner's answer too: it
                # may bring the newer records of a copy that does not count, `_Promotion.late`, as
                # of an owner a forced takeover went on without; taken after the sync, its copy was
                # pushed over)
                pending = {peer for peer, _n, _t in prom.asked.values()}
                synced = {p for p in synced if not (joining := self._newcomers(p)) or not (
                    prom.merging or joining & pending)}
            if synced and (synced == prom.syncing or not gathering):
                # (from now on nothing more is merged into them: what they push is what they serve)
                prom.syncing -= synced
                union = {p for name, p in prom.union if p in synced}
                for key in [k for k in prom.union if k[1] in synced]:
                    late, late_ops = prom.late.pop(key, {}), prom.late_ops.pop(key, {})
                    if key in prom.fresh:  # (copies that count decided: of the others, the fresh ones)
                        prom.spare[key], prom.spare_ops[key] = late, late_ops
                        continue
                    spare = prom.spare.setdefault(key, {})
                    for k, rec in late.items():
                        if newer(rec, spare.get(k)):
                            spare[k] = rec
                    ops = prom.spare_ops.setdefault(key, {})
                    for oid, at in late_ops.items():
                        ops[oid] = max(at, ops.get(oid, at))
                stores = (prom.spare, prom.spare_ops, prom.late, prom.late_ops)
                for key in [k for k in itertools.chain(*stores) if k[1] in synced]:
                    if key not in prom.union:  # (a copy that counts decided: these are forgotten)
                        prom.spare.pop(key, None)
                        prom.spare_ops.pop(key, None)
                        prom.late.pop(key, None)
                        prom.late_ops.pop(key, None)
                prom.unioning |= union
                if not prom.syncing:  # answers still on the way are of no use any more
                    prom.asked.clear()
                    prom.buffered.clear()
                    prom.buffered_ops.clear()
                self._start_push(prom)
        done = [
            p for p in prom.parts
            if p not in prom.syncing and p not in prom.unioning and p not in prom.activating
            and self._pushed(prom, p)
        ]
        if done:
            prom.activating.update(done)
            # This copy holds the configuration before the table says it is active: committed in
            # this turn, before the service records the activation (which it does not when the
            # turn's commit failed). Held only after, a full disk at that commit left the table
            # naming this node's copy as the one that counts while the copy on its disk did not
            # say so: once back, it answered without it, and the partition was taken over without
            # any copy (every acknowledged write of it lost).
            for p in done:
                for name in ["", *(n for n in self.specs if n not in self.broken)]:
                    self._hold(name, p, prom.version)
            self._out.append(Activate(
                prom.version, sorted(done), tuple(sorted(p for p in done if p in prom.forced_parts))
            ))
        if union:  # (last: its first batch may move this takeover on, all of it if it is small)
            self._run_job(self._merge_union(prom, union))
        if not prom.parts:
            if prom in self._promotions:
                self._promotions.remove(prom)
            for ps in self._pushes.values():
                if ps.promotion is prom:
                    ps.promotion = None  # the other replicas still get it (resent until acknowledged)

    def activated(self, version: int, parts: list[int], ok: bool, now: float) -> list[Action]:
        """The outcome of an `Activate` (False: the table moved on; a newer table decides)."""
        self._clock(now)
        for prom in list(self._promotions):
            if prom.version == version:
                if ok:
                    self._activated(prom, set(parts) & prom.activating)
                else:
                    prom.activating -= set(parts)
        return self._take()

    def _activated(self, prom: _Promotion, parts: set[int]) -> None:
        for p in parts:
            for name in ["", *(n for n in self.specs if n not in self.broken)]:
                self._hold(name, p, prom.version)
            prom.activating.discard(p)
            prom.parts.discard(p)
            self._ready(p)
        if parts and not prom.parts:
            self.log.info(
                "serving as primary at v%d after merging %d records in %.0f ms%s", prom.version, prom.merged,
                (self._now - prom.started) * 1000, " (forced)" if prom.forced else "",
            )
        elif parts and not prom.partial:
            prom.partial = True
            self.log.info(
                "serving %d partition(s) as primary at v%d after %.0f ms; %d more still being taken over: %s",
                len(parts), prom.version, (self._now - prom.started) * 1000, len(prom.parts),
                self._takeover_status(min(prom.syncing or prom.parts)),
            )
        self._advance(prom)

    def _start_push(self, prom: _Promotion) -> None:
        """Send each replica of the promoted partitions past their sync what it lacked (once per
        replica, map and partition)."""
        table = self.table
        assert table is not None
        sent = {
            (ps.peer, ps.name, p) for ps in self._pushes.values() if ps.promotion is prom
            for p in itertools.chain(ps.parts, ps.rest)
        }
        synced = sorted(prom.parts - prom.syncing - prom.unioning)
        for name, replicas in self._push_targets():
            done = prom.pushed.get(name, set())
            by_peer: dict[str, list[int]] = {}
            for p in synced:
                for peer in self._owners_in(table, p, replicas)[1:]:
                    if (peer, p) not in done and (peer, name, p) not in sent:
                        by_peer.setdefault(peer, []).append(p)
            for peer, parts in by_peer.items():
                covered = prom.covered.get((peer, name), set())
                whole = [p for p in parts if p not in covered]
                known = [p for p in parts if p in covered]  # what differs from what it said it holds
                if whole:
                    self._push(peer, name, whole, prom.version, prom, None)
                if known:
                    self._push(peer, name, known, prom.version, prom, prom.have.get((peer, name), {}))

    def _push_targets(self) -> list[tuple[str, int]]:
        """The maps a takeover pushes (name, replicas), and the partition itself (name ""): its
        owners acknowledging the takeover is what makes their copies count later, also for maps
        defined afterwards."""
        out = [
            (n, spec.replicas) for n, spec in self.specs.items() if n not in self.broken and n in self.engines
        ]
        widest = max([spec.replicas for spec in self.specs.values()], default=MapSpec().replicas)
        return [*out, ("", widest)]

    @staticmethod
    def _differing(
        engine: MapStorage, p: int, known: dict[tuple[int, str], tuple[int, int]],
    ) -> Iterator[tuple[str, Record | None]]:
        """Every key of partition `p` of `engine`, with its record if its version is not the one
        `known` names (None if it is): the versions are read alone, a value only to be sent."""
        for key, meta in engine.scan_meta(p):
            if known.get((p, key)) == (meta.epoch, meta.seq):
                yield key, None
            else:
                yield key, engine.get(p, key)

    def _push(
        self, peer: str, name: str, parts: list[int], epoch: int, prom: _Promotion | None,
        known: dict[tuple[int, str], tuple[int, int]] | None,
        reported: dict[int, list[str]] | None = None,
    ) -> None:
        """Make `peer`'s copy of `parts` of map `name` equal to this node's: the whole of them, or
        (`known`: what `peer` reported holding) what differs. Map "": only the takeover itself.
        The partitions go in pushes within about `MapTimings.batch_records` records and
        `MapTimings.batch_bytes` bytes each (whole partitions; the first alone may exceed them),
        the next once the one before is acknowledged (`_PushState.rest`); a push larger than
        `MapTimings.piece_bytes` goes in pieces (`Push.stream`)."""
        items: list[tuple[int, str, Record]] = []
        deletes: list[tuple[int, str]] = []
        # the keys `peer` reported per partition (looked through once per chain of pushes: once
        # per partition, it was partitions x keys, 1.5 s of a blocked loop for 500 partitions of
        # 20,000 keys)
        if reported is None:
            reported = {}
            for q, key in known or ():
                reported.setdefault(q, []).append(key)
        order = sorted(parts)
        taken: list[int] = []
        scanned = 0
        size = 0  # what the push carries so far (as `_pieces` counts it)
        by_p = self.ops.get(name, {})
        try:
            for p in order if name else ():
                # a partition that would take the push past a bound starts the next one (read no
                # further than that: the first of a push goes whole, whatever its size)
                engine = self.engines[name]
                self._settle_all(name, (p,))
                mine: set[str] = set()
                its: list[tuple[int, str, Record]] = []
                n = 0
                more = sum(_op_size((p, o, r, at)) for (o, r), at in by_p.get(p, {}).items())
                over = False
                # against `known`: the versions alone, and the value of each record that differs
                # (reading every value to send a few held the loop 1-2.6 s on 512 KiB values)
                records = engine.scan(p) if known is None else self._differing(engine, p, known)
                for key, rec in records:
                    mine.add(key)
                    n += 1
                    if rec is not None:
                        its.append((p, key, rec))
                        more += _record_size(key, rec)
                    if taken and (scanned + n > self.t.batch_records or size + more > self.t.batch_bytes):
                        over = True
                        break
                if not over:
                    gone = [(p, key) for key in reported.get(p, ()) if key not in mine]
                    more += sum(len(key.encode()) + 16 for _p, key in gone)
                    over = bool(taken) and size + more > self.t.batch_bytes
                if over:
                    break
                taken.append(p)
                items.extend(its)
                deletes.extend(gone)
                scanned += n
                size += more
        except Exception as e:
            self._storage_failed(name, e)
            return
        if not name:
            taken = order
        rid = next(self._ids)
        ops = self._ops_of(name, taken)
        pieces = self._pieces(rid, name, epoch, taken, items, ops, deletes, known is None)
        rest = order[len(taken):]
        self._pushes[rid] = _PushState(
            peer, name, taken, self._now, pieces, prom, rest=rest, known=known, reported=reported
        )
        if peer in self.up:
            self._send(peer, pieces[0])

    def _pieces(
        self, rid: int, name: str, epoch: int, parts: list[int], items: list[tuple[int, str, Record]],
        ops: OpIds, deletes: list[tuple[int, str]], full: bool,
    ) -> list[Push]:
        """The push as one message if it fits `piece_bytes`, else in pieces of at most that much
        (a record larger than that alone in its piece): the first piece's id is the stream's."""
        budget = self.t.piece_bytes
        sizes = [_record_size(k, r) for _p, k, r in items]
        total = sum(sizes) + sum(_op_size(o) for o in ops) + sum(len(k.encode()) + 16 for _p, k in deletes)
        if total <= budget:
            created = self.created.get(name, 0)
            return [Push(rid, name, epoch, parts, items, ops, deletes, full, created=created)]
        chunks: list[tuple[list[tuple[int, str, Record]], OpIds, list[tuple[int, str]]]] = []
        cur: tuple[list[tuple[int, str, Record]], OpIds, list[tuple[int, str]]] = ([], [], [])
        size = 0

        def room(n: int) -> None:
            nonlocal cur, size
            if size and size + n > budget:
                chunks.append(cur)
                cur, size = ([], [], []), 0
            size += n

        for item, n in zip(items, sizes, strict=True):
            room(n)
            cur[0].append(item)
        for op in ops:
            room(_op_size(op))
            cur[1].append(op)
        for d in deletes:
            room(len(d[1].encode()) + 16)
            cur[2].append(d)
        chunks.append(cur)
        last = len(chunks) - 1
        return [
            Push(rid if i == 0 else next(self._ids), name, epoch, [], its, its_ops, its_deletes, full,
                 stream=rid, piece=i, last=i == last, covers=parts, created=self.created.get(name, 0))
            for i, (its, its_ops, its_deletes) in enumerate(chunks)
        ]

    def _pushed(self, prom: _Promotion, p: int) -> bool:
        assert self.table is not None
        return not self._push_missing(prom, p)

    def _ready(self, p: int) -> None:
        prim = self.prims.get(p)
        if prim is None or prim.ready:
            return
        prim.ready = True
        # Versions must never repeat: a node restarted while the table still names it primary
        # takes over again at the same epoch, and its previous incarnation's writes (merged by
        # now, from its own disk or the replicas) may carry any sequence number. Start above all
        # of them, and above a wall-clock base for writes that only an unreachable copy holds.
        top = self._wall * 1000
        for name, engine in self.engines.items():
            if name in self.broken:
                continue
            self._settle_all(name, (p,))
            try:
                top = max([top, *(m.seq for _k, m in engine.scan_meta(p) if m.epoch == prim.epoch)])
            except Exception as e:
                self._storage_failed(name, e)
        prim.seq = max(prim.seq, top)
        parked, prim.parked = prim.parked, []
        for op in parked:
            self._serve(op)

    def _answer_parked(self, now: float) -> None:
        """Operations that waited half an attempt for a takeover are refused saying what it waits
        for: their callers retry (same id) and, if it never ends, their error says why."""
        limit = self.t.attempt_timeout / 2
        for p, prim in self.prims.items():
            if prim.ready or not prim.parked or now - prim.parked[0].parked_at < limit:
                continue
            why = self._takeover_status(p)
            waited = [op for op in prim.parked if now - op.parked_at >= limit]
            prim.parked = [op for op in prim.parked if now - op.parked_at < limit]
            for op in waited:
                self._refuse_op(op, KIND_NOT_PRIMARY, why)

    def _takeover_status(self, p: int) -> str:
        """What the takeover of partition `p` waits for (for errors and logs)."""
        for prom in self._promotions:
            if p not in prom.parts:
                continue
            head = (f"{self.node_id} is taking partition {p} over at v{prom.version} "
                    f"(for {self._now - prom.started:.1f} s)")
            if p in prom.syncing:
                asked = sorted({f"{peer} ({n or 'the partition'})" for peer, n, _ in prom.asked.values()})
                if asked:
                    return f"{head}: copying from its owners, waiting for {', '.join(asked)}"
                missing = self._unheard_owners(prom, p)
                if missing:
                    return f"{head}: copying from its owners, waiting for {'; '.join(missing)}"
                return f"{head}: copying from its owners, too few of which hold the active copy yet"
            if p in prom.unioning:
                return f"{head}: merging the copies of its owners, none of which counts"
            if p in prom.activating:
                return f"{head}: recording the takeover in the partition table"
            missing = self._push_missing(prom, p)
            return f"{head}: waiting for its owners to acknowledge the copy of {', '.join(missing) or '?'}"
        return f"partition {p} is not served by {self.node_id} yet"

    def _unheard_owners(self, prom: _Promotion, p: int) -> list[str]:
        """The owners of `p`'s active configuration (of any map) that have not answered the takeover
        and are not asked now, with why (for `_takeover_status`)."""
        table = self.table
        if table is None:
            return []
        out: dict[str, str] = {}
        for name, spec in self.specs.items():
            answered = prom.answered.get(name, set())
            for o in self._active_owners(table, p, spec.replicas) or ():
                if o == self.node_id or o in answered or o in out:
                    continue
                if self._storage_out(o):
                    out[o] = f"{o} (its map storage failed; it keeps its copy)"
                elif o in self.up:
                    out[o] = f"{o} (up; asked again)"
                else:
                    away = self._away_for(o)
                    if o in table.members:
                        why = ""
                    elif away >= self.t.force_after:
                        why = ": left, its writes may be lost"
                    else:
                        why = f"; gone without once out of reach {self.t.force_after:g} s without a break"
                    out[o] = f"{o} (out of reach for {away:.1f} s{why})"
        return list(out.values())

    def _push_missing(self, prom: _Promotion, p: int) -> list[str]:
        """The maps (`the partition` for the map "") whose push to the owners of `p` lacks
        acknowledgements: the takeover of `p` waits for them."""
        table = self.table
        if table is None:
            return []
        out = []
        for name, replicas in self._push_targets():
            owners = self._owners_in(table, p, replicas)
            default_need = min(MapSpec().write_quorum, len(owners)) - 1
            need = self._need(name, owners) if name else default_need
            got = prom.pushed.get(name, set())
            if sum(1 for o in owners[1:] if (o, p) in got) < need:
                out.append(repr(name) if name else "the partition")
        return out

    def _step_down(self, p: int, why: str) -> None:
        """Stop serving `p` as primary: refuse what waits (callers retry with the same id and the
        new primary, which has this node's copy, recognises applied writes)."""
        self._step_down_all([(p, why)])

    def _step_down_all(self, parts: Iterable[tuple[int, str]], *, advance: bool = True) -> None:
        """`_step_down` of each (partition, why) at once: the takeovers they leave move on once,
        after all of them (`advance`; else the caller moves every takeover on). One at a time,
        each moved every takeover on over its remaining partitions: a node fenced off ~340
        partitions at once (a restart on a stale table) blocked its loop 0.6-0.8 s in that."""
        gone: dict[int, str] = {}
        ops: list[tuple[_Op, str]] = []
        for p, why in parts:
            prim = self.prims.pop(p, None)
            if prim is None:
                continue
            gone[p] = why
            self.log.debug("stops serving partition %d: %s", p, why)
            ops.extend((op, why) for op in prim.parked)
            ops.extend((op, why) for op in prim.queued)
            for lst in prim.waiting.values():
                ops.extend((op, why) for op in lst)
            if prim.check is not None:
                ops.extend((op, why) for op in prim.check.ops)
                self._checks.pop(prim.check.id, None)
        if not gone:
            return
        for w in [w for w in self._tracked.values() if w.partition in gone]:
            why = gone[w.partition]
            ops_targets, w.targets = w.targets, []
            for t in ops_targets:
                self._refuse(t, KIND_NOT_PRIMARY, why)
            self._untrack(w)
        # a push of a partition gone is dropped (its pieces carry that partition's records): the
        # takeover pushes its other partitions, and those queued after it, again (nothing else
        # would: a takeover pushes when partitions finish their sync, and these had; they waited
        # for acknowledgements that never came). A push of no takeover is pulled again.
        again: list[_Promotion] = []
        for rid, ps in list(self._pushes.items()):
            if not gone.keys().isdisjoint(ps.parts):
                del self._pushes[rid]
                if ps.promotion is not None and ps.promotion not in again:
                    again.append(ps.promotion)
            elif not gone.keys().isdisjoint(ps.rest):
                ps.rest = [p for p in ps.rest if p not in gone]
        for prom in list(self._promotions):
            if not gone.keys().isdisjoint(prom.parts):
                self._set_back(prom, gone.keys() & prom.parts)
                prom.parts.difference_update(gone)
                prom.syncing.difference_update(gone)
                if advance:
                    self._advance(prom)
        if advance:  # (else the caller takes every partition left over again: set_table)
            for prom in again:
                if prom in self._promotions:
                    self._start_push(prom)
        for op, why in ops:
            self._refuse_op(op, KIND_NOT_PRIMARY, why)

    # --- membership and the leader's planning ---------------------------------------------------------------

    def peer_up(self, peer: str, now: float) -> list[Action]:
        self._clock(now)
        if peer not in self.up:
            self._forget_join(peer)
            self._up_at[peer] = now
        self.up.add(peer)
        self._down_since.pop(peer, None)
        for prom in self._promotions:
            if prom.syncing:
                asked = {(pe, n) for pe, n, _ in prom.asked.values()}
                self._ask(prom, [
                    (peer, name) for name in self.specs
                    if peer not in prom.answered.get(name, set()) and (peer, name) not in asked
                ])
        self._resend(only=peer)
        self._plan()
        return self._take()

    def peer_down(self, peer: str, now: float) -> list[Action]:
        self._clock(now)
        self.up.discard(peer)
        self._down_since[peer] = now
        downs = self._downs.setdefault(peer, deque())
        while downs and now - downs[0] >= self.t.flap_window:
            downs.popleft()
        downs.append(now)
        if len(downs) > 8:
            downs.popleft()
        if len(downs) == 3 and self.is_leader:
            self.log.warning(
                "%s went down %d times in %.0f s (its loop lags, or its network flaps): planned out "
                "of the partition table only %.1f s after it goes down from now on (at most %.0f s)",
                peer, len(downs), now - downs[0], self._grace(peer), self.t.flap_grace,
            )
        self._forget_join(peer)
        self._up_at.pop(peer, None)
        self._table_waiters.pop(peer, None)
        for c in self.client.values():
            if c.peer == peer:
                c.peer = None
                c.last = f"{peer} went down"
                c.retry_at = now
        for prom in self._promotions:
            for rid in [r for r, (pe, _n, _t) in prom.asked.items() if pe == peer]:
                del prom.asked[rid]  # asked again when it is back
        return self._take()

    def set_leader(self, is_leader: bool, now: float) -> list[Action]:
        self._clock(now)
        self.is_leader = is_leader
        self._plan()
        return self._take()

    def set_members(self, nodes: Iterable[str], now: float) -> list[Action]:
        """The cluster's member set (changed through the consensus log): the leader's table holds
        only members, so partitions move onto an added node and off a removed one."""
        self._clock(now)
        self.members = set(nodes)
        self._plan()
        return self._take()

    def set_excluded(self, nodes: Iterable[str], now: float) -> list[Action]:
        """Nodes whose map storage failed: the leader's table leaves them out."""
        self._clock(now)
        self.excluded = set(nodes)
        self._plan()
        return self._take()

    def set_quorum(self, has_quorum: bool, now: float, wall: int) -> list[Action]:
        """Whether this node's consensus store has a quorum; without one it serves nothing as
        primary. Back after longer than the tombstone horizon, it drops its copies (removed keys
        whose tombstones were purged meanwhile must not come back) and is refilled by the cluster."""
        self._clock(now, wall)
        lost = self._quorum_lost_wall
        if has_quorum and not self.has_quorum and lost is not None and wall - lost >= self.t.tombstone_ms:
            self.forget_data(f"cut off for {(wall - lost) / 1000:.0f}s")
        if not has_quorum and self.has_quorum:
            self._quorum_lost_wall = wall
        self.has_quorum = has_quorum
        return self._take()

    def forget_data(self, why: str) -> None:
        """Drop every copy this node holds (out of date beyond the tombstone horizon, or after its
        storage failed with more than a full disk: bad bytes, an I/O error) and take its
        partitions over again from the other owners."""
        self.log.warning("dropping this node's map copies (%s); they are copied back from the cluster", why)
        self._step_down_all([(p, f"{self.node_id} copies its map data again") for p in list(self.prims)])
        self._back.clear()  # (what takeovers set aside goes too)
        # (deleted from the engines a batch per step, as a takeover's untrusted copies are: the
        # whole map at once held the loop as long as its size)
        for name, engine in self.engines.items():
            try:
                for p in sorted(engine.partitions()):
                    self._drop_later(name, p)
                engine.purge_ops(range(self.partitions), 2**62)
            except Exception as e:
                self._storage_failed(name, e)
        for by_p in self.ops.values():
            by_p.clear()
        self._drop_incoming()  # pushes of which some pieces arrived before: they would be applied as a whole
        for name, p in list(self.held):  # its copies count again only for takeovers from now on
            if name in self.engines:
                self._drop_later(name, p)  # (its record of holding it goes with the copy)
            else:
                self._unhold(name, p)
        self._start_drops()
        # (this process acknowledged writes of those maps, maybe at a configuration whose push of
        # the partition is still to come: their emptied copies count again only once pushed)
        self._learned.clear()
        table = self.table
        if table is not None:
            mine = {p for p in range(table.partitions) if table.primary(p) == self.node_id}
            if mine:
                self._start_promotion(table.version, mine)

    def _storage_out(self, node: str) -> bool:
        """Whether `node` is a cluster member that the table leaves out because its map storage
        failed (`set_excluded`): it still holds its copies."""
        return node in self.excluded and (self.members is None or node in self.members)

    def _grace(self, node: str) -> float:
        """How long after going down `node` counts as gone (`MapTimings.down_grace`, longer for a
        node that flaps)."""
        downs = self._downs.get(node, ())
        return min(self.t.flap_grace, self.t.down_grace * 2.0 ** max(0, len(downs) - 1))

    def live_members(self, now: float) -> list[str]:
        gone = {n for n, t in self._down_since.items() if now - t >= self._grace(n)}
        live = (self.up | {self.node_id} | set(self._down_since)) - gone - self.excluded
        if self._started is not None and now - self._started < self.t.start_grace:
            # not heard from since this node started (not down either): still coming up, probably
            known = set(self.members or ()) | set(self.table.members if self.table is not None else ())
            live |= known - self.up - set(self._down_since) - self.excluded
        if self.members is not None:
            live &= self.members
        return sorted(live)

    def _plan(self) -> None:
        if not (self.is_leader and self.has_quorum) or self._writing_table:
            return
        if self._now < self._table_retry_at:
            return
        live = self.live_members(self._now)
        table = self.table
        if table is not None:
            live = [n for n in live if n in table.members or self._ready_to_join(n, table.version)]
        if not live:
            return
        new = plan_table(table, live, self.partitions)
        if new is None:
            return
        self._writing_table = True
        self._out.append(WriteTable(self.table, new))

    def _ready_to_join(self, node: str, version: int) -> bool:
        """(Leader) whether `node`, live and not in the table (version `version`), is to be planned
        in: its store replica has that table (it reported it), it cannot report (an earlier
        version), or it did not report within `rejoin_wait` of coming up. Else it is asked (a
        table probe, sent again every `resend_after`) and left out for now."""
        if node == self.node_id:
            return True
        if node not in self.up:
            return False  # (a member not heard from yet, or gone within `down_grace`): it cannot report
        seen = self._peer_table.get(node)
        waited = self._now - self._up_at.get(node, self._now)
        said = self._joining.get(node)
        if seen == TABLE_UNREPORTED:
            if said != "in":
                self.log.info("%s does not report which partition table it has (an earlier version): "
                              "planning it in without waiting for it", node)
        elif seen is not None and seen >= version:
            if said != "in":
                self.log.info("%s has partition table v%d (%.2f s after it came up): planning it in",
                              node, seen, waited)
        elif waited >= self.t.rejoin_wait:
            if said != "in":
                self.log.warning(
                    "%s came up %.1f s ago and has not reported partition table v%d (%s): planning it "
                    "in all the same; the partitions it gets are served once its store replica has the "
                    "new table", node, waited, version,
                    "nothing reported" if seen is None else f"it has v{seen}",
                )
        else:
            probe = self._probing.get(node)
            if probe is None or probe[0] != version or self._now - probe[1] >= self.t.resend_after:
                pid = next(self._ids)
                self._probe_ids[pid] = node
                self._probing[node] = (version, self._now)
                self._send(node, ReadCheck(pid, -1, 0, version))
            if said is None:
                self._joining[node] = "held"
                self.log.info(
                    "%s is up and not in partition table v%d: planned in once its store replica has that "
                    "table (it has %s; at most %g s)", node, version,
                    "not said" if seen is None else f"v{seen}", self.t.rejoin_wait,
                )
            return False
        self._joining[node] = "in"
        self._probing.pop(node, None)
        for pid in [i for i, n in self._probe_ids.items() if n == node]:
            del self._probe_ids[pid]
        return True

    def _forget_join(self, peer: str) -> None:
        """What the leader knew about `peer`'s table (it went down, or came up again: ask anew)."""
        self._peer_table.pop(peer, None)
        self._probing.pop(peer, None)
        self._joining.pop(peer, None)
        for pid in [i for i, n in self._probe_ids.items() if n == peer]:
            del self._probe_ids[pid]

    def _on_table_probe(self, sender: str, msg: ReadCheck) -> None:
        """The leader asks which partition table this node has; answered now, and again once it has
        the version asked for."""
        have = self.table.version if self.table is not None else 0
        self._send(sender, ReadCheckAck(msg.id, have >= msg.table, None, have))
        if have < msg.table:
            self._table_waiters[sender] = (msg.id, msg.table)
        else:
            self._table_waiters.pop(sender, None)

    def _on_table_report(self, sender: str, msg: ReadCheckAck) -> None:
        if self._probe_ids.get(msg.id) != sender:
            return
        seen = self._peer_table.get(sender)
        if msg.table == TABLE_UNREPORTED or seen is None or msg.table > seen:
            self._peer_table[sender] = msg.table
        self._plan()

    def table_written(self, ok: bool, now: float) -> list[Action]:
        """The outcome of a `WriteTable` (False: another table won, or no quorum: plan again later)."""
        self._clock(now)
        self._writing_table = False
        if not ok:
            self._table_retry_at = now + 0.2
        return self._take()

    # --- operations of local callers ------------------------------------------------------------------------

    def submit(
        self, op_id: int, name: str, op: int, key: str, value: bytes | None, expected: bytes | None,
        ttl_ms: int, now: float, wall: int, trace: tuple[str, str] = ("", ""),
    ) -> list[Action]:
        """Start operation `op_id` of a local caller; it ends with a `Reply` or a `Fail`. `trace`
        (traceparent, tracestate) goes with each request to the partition's primary."""
        self._clock(now, wall)
        rid = next(self._rids)
        deadline = now + self.t.op_timeout
        c = _ClientOp(op_id, rid, name, op, key, value, expected, ttl_ms, deadline, trace=trace)
        self.client[op_id] = c
        self._client_by_rid[rid] = op_id
        spec = self.specs.get(name)
        limit = spec.max_value_bytes if spec is not None else None
        large = None
        if limit is not None:  # (no generator: this runs for every operation)
            if value is not None and len(value) > limit:
                large = value
            elif expected is not None and len(expected) > limit:
                large = expected
        if spec is not None and large is not None:
            # refused here, not by the primary: the request would carry it to another node first (and
            # one over max_frame could not travel at all); an expected value that large matches nothing
            what = "value" if large is value else "expected value"
            self._client_result(op_id, None, False, KIND_BAD_REQUEST, (
                f"map {name!r} key {key!r}: {what} of {len(large)} bytes exceeds the map's limit of "
                f"{spec.max_value_bytes} bytes"
            ))
            return self._take()
        if value is not None and expected is not None and len(value) + len(expected) > MAX_CAS_BYTES:
            # both travel in one request to the primary: two values of 8 MiB cannot
            self._client_result(op_id, None, False, KIND_BAD_REQUEST, (
                f"map {name!r} key {key!r}: a compare-and-set's expected value ({len(expected)} bytes) and "
                f"new value ({len(value)} bytes) together exceed {MAX_CAS_BYTES} bytes (they travel in one "
                "message between nodes)"
            ))
            return self._take()
        self._attempt(c)
        return self._take()

    def _attempt(self, c: _ClientOp) -> None:
        if c.why:  # a retry: counted by why the attempt before it got no answer
            counts = self.client_retries.setdefault(c.name, dict.fromkeys(RETRY_REASONS, 0))
            counts[c.why] += 1
            c.why = ""
        table = self.table
        if table is None:
            c.retry_at = self._now + self.t.retry.backoff(c.attempts, self._rng)
            c.why = "unreachable"
            return
        c.attempts += 1
        p = partition_of(c.key, table.partitions)
        primary = table.primary(p)
        if primary == self.node_id:
            c.peer = self.node_id
            c.attempt_until = self._now + self.t.attempt_timeout
            self._serve(_Op(_Target(None, c.op_id), (self.node_id, c.rid), c.name, c.op, c.key, c.value,
                            c.expected, c.ttl_ms, p))
        elif primary in self.up:
            c.peer = primary
            c.attempt_until = self._now + self.t.attempt_timeout
            req = MapRequest(c.rid, c.op, c.name, c.key, c.value, c.expected, c.ttl_ms, *c.trace, True,
                             self.created.get(c.name, 0))
            self._send(primary, req)
        else:
            c.peer = None
            c.last = f"partition {p}: its primary {primary} is not reachable"
            c.retry_at = self._now + self.t.retry.backoff(c.attempts - 1, self._rng)
            c.why = "unreachable"

    def _client_result(
        self, op_id: int, value: bytes | None, ok: bool, kind: str | None, error: str | None
    ) -> None:
        c = self.client.get(op_id)
        if c is None:
            return
        if kind is None:
            self._finish(c, Reply(op_id, value, ok))
        elif kind == KIND_UNKNOWN_MAP:
            self._finish(c, Fail(op_id, UnknownMap(error or f"unknown map {c.name!r}")))
        elif kind == KIND_BAD_REQUEST:
            self._finish(c, Fail(op_id, MapValueTooLarge(error or "bad request")))
        else:  # not primary / unavailable: retry with the same id after a short pause
            c.peer = None
            c.last = error or kind
            c.why = "refused"
            c.retry_at = self._now + self.t.retry.backoff(c.attempts - 1, self._rng)

    def _finish(self, c: _ClientOp, action: Action) -> None:
        self.client.pop(c.op_id, None)
        self._client_by_rid.pop(c.rid, None)
        self._out.append(action)

    def _retry_clients(self) -> None:
        for c in self.client.values():
            if c.peer is None:
                c.retry_at = min(c.retry_at, self._now)

    # --- messages -------------------------------------------------------------------------------------------

    def receive(self, sender: str, msg: Any, now: float, wall: int) -> list[Action]:
        self._clock(now, wall)
        if isinstance(msg, Replicate):
            self._on_replicate(sender, msg)
        elif isinstance(msg, ReplicateAck):
            self._on_replicate_ack(sender, msg)
        elif isinstance(msg, MapRequest):
            p = partition_of(msg.key, self.partitions)
            if (why := self._other_definition(msg.map, msg.created)) is not None:
                self._send(sender, MapResponse(msg.id, None, False, why, KIND_NOT_PRIMARY))
                return self._take()
            self._serve(_Op(_Target(sender, msg.id), (sender, msg.id), msg.map, msg.op, msg.key, msg.value,
                            msg.expected, msg.ttl_ms, p, checks=msg.checks))
        elif isinstance(msg, MapResponse):
            op_id = self._client_by_rid.get(msg.id)
            c = self.client.get(op_id) if op_id is not None else None
            if c is not None and c.peer == sender and (not msg.check or self._checked(sender, c, msg.check)):
                self._client_result(c.op_id, msg.value, msg.ok, msg.kind, msg.error)
        elif isinstance(msg, ReadCheck):
            self._on_read_check(sender, msg)
        elif isinstance(msg, ReadCheckAck):
            self._on_read_check_ack(sender, msg)
        elif isinstance(msg, SyncRequest):
            self._serve_sync(sender, msg)
        elif isinstance(msg, SyncChunk):
            self._on_chunk(sender, msg)
        elif isinstance(msg, Push):
            self._on_push(sender, msg)
        elif isinstance(msg, PushAck):
            self._on_push_ack(sender, msg)
        elif isinstance(msg, KeysRequest):
            try:
                keys, parts = self.local_keys(msg.map, msg.prefix, wall)
                self._send(sender, self._keys_page(msg, keys, parts))
            except MapError as e:
                self._send(sender, KeysResponse(msg.id, [], str(e)))
        elif isinstance(msg, StatsRequest):
            try:
                self._send(sender, StatsResponse(msg.id, self.local_stats(msg.map, now)))
            except MapError as e:
                self._send(sender, StatsResponse(msg.id, None, str(e)))
        return self._take()

    def _keys_page(self, req: KeysRequest, keys: list[str], parts: list[int]) -> KeysResponse:
        """The answer to `req`: the keys after `req.after` in order, as many as `piece_bytes` holds
        (at least one), and whether more follow. A request of an earlier version (no `after`) gets
        every key, or an error naming the limit if they exceed it."""
        budget = self.t.piece_bytes
        keys.sort()
        if req.after is None:
            size = sum(len(k.encode()) + 2 for k in keys)
            if size > budget:
                return KeysResponse(req.id, [], (
                    f"{self.node_id}: the {len(keys)} keys of map {req.map!r} with prefix {req.prefix!r} "
                    f"it serves ({size} bytes) exceed the {budget} bytes of one answer to a node of an "
                    "earlier version, which cannot ask for them in pages: use a longer prefix, or ask "
                    "through an upgraded node"
                ))
            return KeysResponse(req.id, keys, None, parts)
        start = bisect.bisect_right(keys, req.after) if req.after else 0
        page: list[str] = []
        size = 0
        for k in itertools.islice(keys, start, None):
            n = len(k.encode()) + 2
            if page and size + n > budget:
                return KeysResponse(req.id, page, None, parts, more=True)
            page.append(k)
            size += n
        return KeysResponse(req.id, page, None, parts)

    # --- serving operations (primary) -----------------------------------------------------------------------

    def _serve(self, op: _Op) -> None:
        """Run `op` as primary of its partition, or refuse it so that the caller retries."""
        spec = self.specs.get(op.name)
        if spec is None:
            # the caller's node knows the map (it checks first): this node has not seen its
            # definition yet, so the caller tries again
            self._refuse_op(op, KIND_NOT_PRIMARY, f"{self.node_id} does not know map {op.name!r} yet")
            return
        if op.value is not None and len(op.value) > spec.max_value_bytes:
            self._refuse_op(op, KIND_BAD_REQUEST, (
                f"map {op.name!r} key {op.key!r}: value of {len(op.value)} bytes exceeds the map's "
                f"limit of {spec.max_value_bytes} bytes"
            ))
            return
        p = op.partition
        prim = self.prims.get(p)
        if prim is None or self.table is None:
            self._refuse_op(op, KIND_NOT_PRIMARY, f"{self.node_id} is not the primary of partition {p}")
            return
        if op.name in self.broken:
            self._refuse_op(op, KIND_UNAVAILABLE, self._broken_why(op.name))
            return
        if not self.has_quorum:
            why = f"{self.node_id} has no quorum (it sees no majority of the cluster)"
            self._refuse_op(op, KIND_NOT_PRIMARY, why)
            return
        if not prim.ready:
            if len(prim.parked) >= _MAX_PARKED:
                self._refuse_op(op, KIND_NOT_PRIMARY, f"partition {p} is still being taken over")
            else:
                op.parked_at = self._now
                prim.parked.append(op)
            return
        # a retry of an operation under way joins it; of one answered, gets the same answer
        running = self._inprogress.get(op.oid)
        if running is not None:
            running.extra.append(op.target)
            return
        if op.oid in self._outcomes:
            value, ok, check = self._outcomes[op.oid]
            if check and op.target.peer is not None:  # (given unchecked: the caller's node checks it)
                self._send(op.target.peer, MapResponse(op.target.id, value, ok, check=check))
            else:
                self._answer(op.target, value, ok)
            return
        # a retry of an applied write reports the first attempt's outcome
        if op.oid in self.ops.get(op.name, {}).get(p, {}):
            pending = self._pending.get(op.oid)
            if pending is not None:
                pending.targets.append(op.target)
            else:
                self._answer(op.target, op.value if op.op == OP_CAS else None, True)
            return
        self._inprogress[op.oid] = op
        if op.op == OP_GET:
            self._observe(prim, op)
            return
        self._evaluate(prim, op)

    def _evaluate(self, prim: _Primary, op: _Op) -> None:
        """Evaluate `op` against the current record: store and replicate a write, or answer
        (through `_observe`) an operation that writes nothing."""
        ok, current = self._get(op.name, op.partition, op.key)
        if not ok:
            self._refuse_op(op, KIND_UNAVAILABLE, self._broken_why(op.name))
            return
        out = evaluate(
            op.op, current, value=op.value, expected=op.expected, ttl_ms=op.ttl_ms, now_ms=self._wall,
            epoch=prim.epoch, seq=prim.seq + 1, tombstone_ms=self.t.tombstone_ms,
        )
        if out.write is None:
            return self._observe(prim, op, out.value, out.ok)
        if not self._put(op.name, op.partition, op.key, out.write):
            self._refuse_op(op, KIND_UNAVAILABLE, self._broken_why(op.name))
            return
        prim.seq += 1
        self._merge_ops(op.name, [(op.partition, op.oid[0], op.oid[1], self._wall)])
        owners = self._owners(op.name, op.partition)
        answer = op.value if op.op == OP_CAS else None
        self._inprogress.pop(op.oid, None)  # from now on a write: retries find it in `ops`
        w = _Write(next(self._serials), op.name, op.partition, op.key, out.write, op.oid,
                   [op.target, *op.extra],
                   self._need(op.name, owners), answer)
        key = (op.name, op.key)
        prim.inflight[key] = prim.inflight.get(key, 0) + 1
        self._pending[op.oid] = w
        self._tracked[w.serial] = w
        for peer in owners[1:]:
            self._replicate(w, peer)
        self._maybe_complete(w)

    def _replicate(self, w: _Write, peer: str) -> None:
        if peer not in self.up:
            return
        mid = next(self._ids)
        w.ids[mid] = peer
        w.sent[peer] = self._now
        self._msg_write[mid] = w
        self._send(peer, Replicate(mid, w.name, w.partition, w.key, w.rec, w.oid[0], w.oid[1],
                                   self.created.get(w.name, 0)))

    def _on_replicate_ack(self, sender: str, msg: ReplicateAck) -> None:
        w = self._msg_write.pop(msg.id, None)
        if w is None or w.ids.pop(msg.id, None) != sender:
            return
        if not msg.ok:
            if msg.reason and msg.reason.startswith("fenced"):
                self._step_down(w.partition, f"{sender} refused the write: {msg.reason}")
            return  # storage trouble at the replica: resent later, or the table leaves it out
        w.acked.add(sender)
        if msg.answered:  # the replica was the caller's node and answered it (`_answer_own`)
            for t in [t for t in w.targets if t.peer == sender]:
                w.targets.remove(t)
                self._out.append(Answered(sender, t.id))
        self._maybe_complete(w)

    def _maybe_complete(self, w: _Write) -> None:
        if not w.done and len(w.acked) >= w.need:
            w.done = True
            targets, w.targets = w.targets, []
            if self._pending.get(w.oid) is w:
                del self._pending[w.oid]
            prim = self.prims.get(w.partition)
            if prim is not None:
                self._settled(prim, (w.name, w.key))
            for t in targets:
                self._answer(t, w.answer, True)
        if (
            w.done and w.name in self.specs and self.table is not None
            and set(self._owners(w.name, w.partition)[1:]) <= w.acked
        ):
            self._untrack(w)

    def _untrack(self, w: _Write) -> None:
        self._tracked.pop(w.serial, None)
        for mid in w.ids:
            self._msg_write.pop(mid, None)
        w.ids.clear()
        if self._pending.get(w.oid) is w:
            del self._pending[w.oid]
            prim = self.prims.get(w.partition)
            if prim is not None:
                self._settled(prim, (w.name, w.key))

    def _settled(self, prim: _Primary, key: tuple[str, str]) -> None:
        """One write of `key` is no longer pending: release what waited for all of them."""
        n = prim.inflight.get(key, 0) - 1
        if n > 0:
            prim.inflight[key] = n
            return
        prim.inflight.pop(key, None)
        for op in prim.waiting.pop(key, []):
            self._observe(prim, op)

    def _observe(self, prim: _Primary, op: _Op, value: bytes | None = None, ok: bool = True) -> None:
        """Answer an operation that writes nothing once no write of its key is pending and a read
        check started after it succeeded (it is then evaluated again)."""
        key = (op.name, op.key)
        if prim.inflight.get(key):
            prim.waiting.setdefault(key, []).append(op)
            return
        owners = self._owners(op.name, op.partition)
        need = self._need(op.name, owners)
        if need <= 0:
            self._answer_now(prim, op)
            return
        if need == 1 and op.checks and not op.extra and op.target.peer in owners[1:]:
            self._answer_unchecked(prim, op)
            return
        if len(prim.queued) >= _MAX_PARKED:
            self._refuse_op(op, KIND_NOT_PRIMARY, f"too many reads waiting at partition {op.partition}")
            return
        prim.queued.append(op)
        if prim.check is None:
            self._start_check(op.partition, prim)

    def _answer_unchecked(self, prim: _Primary, op: _Op) -> None:
        """Answer `op` (it writes nothing; its caller's node is an owner and one confirmation is
        enough) at once, with this primary's epoch: the caller's node makes the read check itself
        (`_checked`), two messages earlier than a check round would end. Kept as the operation's
        outcome with that epoch: a copy of the request, or a retry, gets the same answer, again to be
        checked by the caller's node (which refuses it if a newer primary fenced it, and tries the
        next primary). It was not kept, and ran again: a compare-and-set answered False, its request
        delivered twice with a remove in between, wrote its value the second time (map simulation,
        profile partitions, seed 40)."""
        out = self._evaluate_again(prim, op)
        if out is None:
            return
        if self._inprogress.get(op.oid) is op:
            del self._inprogress[op.oid]
        self._keep_outcome(op.oid, out.value, out.ok, prim.epoch)
        assert op.target.peer is not None
        self._send(op.target.peer, MapResponse(op.target.id, out.value, out.ok, check=prim.epoch))

    def _checked(self, sender: str, c: _ClientOp, epoch: int) -> bool:
        """The read check of an answer `sender` gave at `epoch` before checking (`MapResponse.check`),
        made here as a replica answers a `ReadCheck`: taken unless a newer primary fenced this node
        (then the operation is tried again, at the partition's primary as this node knows it)."""
        p = partition_of(c.key, self.partitions)
        if self.fence[p] > epoch:
            why = f"{sender} answered from epoch {epoch} of partition {p}; epoch {self.fence[p]} took it over"
            self._client_result(c.op_id, None, False, KIND_NOT_PRIMARY, why)
            return False
        self._raise_fence(p, epoch)
        return True

    def _start_check(self, p: int, prim: _Primary) -> None:
        ops, prim.queued = prim.queued, []
        owners: list[str] = []
        need = 0
        for name in {op.name for op in ops}:
            o = self._owners(name, p)
            owners = o if len(o) > len(owners) else owners
            need = max(need, self._need(name, o))
        check = _Check(next(self._ids), prim.epoch, ops, need)
        prim.check = check
        self._checks[check.id] = (p, check)
        for peer in owners[1:]:
            check.sent[peer] = -1e9
            if peer in self.up:
                check.sent[peer] = self._now
                self._send(peer, ReadCheck(check.id, p, prim.epoch))

    def _on_read_check(self, sender: str, msg: ReadCheck) -> None:
        if msg.table:
            self._on_table_probe(sender, msg)
            return
        p = msg.partition
        if not 0 <= p < self.partitions:
            self._send(sender, ReadCheckAck(msg.id, False, f"no partition {p}"))
        elif self.fence[p] > msg.epoch:
            why = f"fenced: epoch {self.fence[p]} took partition {p} over"
            self._send(sender, ReadCheckAck(msg.id, False, why))
        else:
            self._raise_fence(p, msg.epoch)
            self._send(sender, ReadCheckAck(msg.id, True))

    def _on_read_check_ack(self, sender: str, msg: ReadCheckAck) -> None:
        if msg.id in self._probe_ids:
            self._on_table_report(sender, msg)
            return
        entry = self._checks.get(msg.id)
        if entry is None:
            return
        p, check = entry
        if sender not in check.sent:
            return
        if not msg.ok:
            if msg.reason and msg.reason.startswith("fenced"):
                self._step_down(p, f"{sender}: {msg.reason}")
            return
        check.acked.add(sender)
        if len(check.acked) < check.need:
            return
        del self._checks[msg.id]
        prim = self.prims.get(p)
        if prim is None or prim.check is not check:
            return
        prim.check = None
        for op in check.ops:
            if prim.inflight.get((op.name, op.key)):
                prim.waiting.setdefault((op.name, op.key), []).append(op)  # a write overtook it
            else:
                self._answer_now(prim, op)
        if prim.queued and prim.check is None:
            self._start_check(p, prim)

    def _answer_now(self, prim: _Primary, op: _Op) -> None:
        """Evaluate an operation that wrote nothing again and answer it."""
        out = self._evaluate_again(prim, op)
        if out is not None:
            self._answer_op(op, out.value, out.ok)

    def _evaluate_again(self, prim: _Primary, op: _Op) -> Outcome | None:
        """The outcome of an operation that wrote nothing, evaluated again now. None when it is
        taken care of otherwise: refused (the storage failed), or run as a write (it would write
        now: the key changed meanwhile)."""
        ok, current = self._get(op.name, op.partition, op.key)
        if not ok:
            self._refuse_op(op, KIND_UNAVAILABLE, self._broken_why(op.name))
            return None
        out = evaluate(
            op.op, current, value=op.value, expected=op.expected, ttl_ms=op.ttl_ms, now_ms=self._wall,
            epoch=prim.epoch, seq=prim.seq + 1, tombstone_ms=self.t.tombstone_ms,
        )
        if out.write is not None:
            self._evaluate(prim, op)
            return None
        return out

    # --- replicas -------------------------------------------------------------------------------------------

    def _raise_fence(self, p: int, epoch: int) -> None:
        if epoch > self.fence[p]:
            self.fence[p] = epoch
            prim = self.prims.get(p)
            if prim is not None and prim.epoch < epoch:
                self._step_down(p, f"a newer primary (epoch {epoch}) took partition {p} over")

    def _other_definition(self, name: str, created: int) -> str | None:
        """Why a message about map `name` with definition identity `created` (0: unknown) is not
        about the map this node knows under that name (None: it is, or either is unknown)."""
        mine = self.created.get(name, 0)
        if not created or not mine or created == mine:
            return None
        return (
            f"{self.node_id} knows another definition of map {name!r} (created at revision {mine}, "
            f"not {created}): it was removed and created again, and one of the two has not caught up"
        )

    def _on_replicate(self, sender: str, msg: Replicate) -> None:
        p = msg.partition
        if msg.map not in self.engines or not 0 <= p < self.partitions:
            self._send(sender, ReplicateAck(msg.id, False, f"unknown map {msg.map!r} on {self.node_id}"))
            return
        if (why := self._other_definition(msg.map, msg.created)) is not None:
            self._send(sender, ReplicateAck(msg.id, False, why))
            return
        if msg.map in self.broken:
            self._send(sender, ReplicateAck(msg.id, False, self._broken_why(msg.map)))
            return
        if msg.record.epoch < self.fence[p]:
            why = f"fenced: epoch {self.fence[p]} took partition {p} over"
            self._send(sender, ReplicateAck(msg.id, False, why))
            return
        self._raise_fence(p, msg.record.epoch)
        if not self._holds(msg.map, p, msg.record.epoch):
            # it acknowledges writes only on top of the takeover's copy (the push, resent until it
            # arrives): a node that answers a later takeover without the copy acknowledged nothing
            why = f"{self.node_id} has no copy of partition {p} from its takeover at v{msg.record.epoch} yet"
            self._send(sender, ReplicateAck(msg.id, False, why))
            return
        ok, current = self._get(msg.map, p, msg.key)
        if ok and newer(msg.record, current):
            ok = self._put(msg.map, p, msg.key, msg.record)
        if not ok:
            self._send(sender, ReplicateAck(msg.id, False, self._broken_why(msg.map)))
            return
        if msg.origin:
            self._merge_ops(msg.map, [(p, msg.origin, msg.rid, self._wall)])
        answered = msg.origin == self.node_id and self._answer_own(sender, msg)
        self._send(sender, ReplicateAck(msg.id, True, None, answered))

    def _answer_own(self, sender: str, msg: Replicate) -> bool:
        """The write `msg` (stored here) is one of this node's callers' and went to primary
        `sender`: with a write quorum of at most 2, the primary's copy (it replicates only what it
        stored) and this one are a quorum, so the caller is answered now, one message earlier than
        by the primary's `MapResponse` (which the acknowledgement tells it to leave out). The answer
        is the primary's for a write: the value of a compare-and-set, nothing for the others."""
        op_id = self._client_by_rid.get(msg.rid)
        c = self.client.get(op_id) if op_id is not None else None
        if c is None or c.peer != sender or c.name != msg.map or c.key != msg.key or c.op == OP_GET:
            return False
        spec = self.specs.get(c.name)
        if spec is None or spec.write_quorum > 2:
            return False
        self._client_result(c.op_id, c.value if c.op == OP_CAS else None, True, None, None)
        return True

    def _on_push(self, sender: str, msg: Push) -> None:
        if msg.stream:
            self._on_piece(sender, msg)
            return
        if not msg.map:  # the takeover of these partitions, without data
            if any(not 0 <= p < self.partitions or self.fence[p] > msg.epoch for p in msg.partitions):
                self._send(sender, PushAck(msg.id, False, _FENCED_PUSH))
                return
            for p in msg.partitions:
                self._raise_fence(p, msg.epoch)
                self._hold("", p, msg.epoch)
            self._hold_learned(msg.partitions, msg.epoch)
            self._send(sender, PushAck(msg.id, True))
            return
        why: str | None = self._push_refused(
            msg.map, msg.epoch, msg.partitions, msg.items, msg.ops, msg.created
        )
        if why is None:
            why = self._apply_push(
                msg.map, msg.epoch, msg.partitions, msg.items, msg.ops, msg.deletes, msg.full
            )
        self._send(sender, PushAck(msg.id, why is None, why))

    def _hold_learned(self, parts: list[int], version: int) -> None:
        """This node acknowledges the takeover of `parts` at `version` (the push of the partition
        itself): the maps it learned while running hold that configuration where their copy is
        empty, as `define` makes them hold the takeovers acknowledged before. Until now it refused
        their writes there (it did not hold them), so the empty copy holds all it acknowledged.
        Otherwise it would count only once the primary answered its request for the copy (`_pull`,
        every 2 s), and a primary that died first would leave a copy too few for the next
        takeover (which then waits `force_after`)."""
        for name in sorted(self._learned):
            engine = self.engines.get(name)
            if engine is None or name in self.broken:
                continue
            self._settle_all(name, parts)
            try:
                filled = engine.partitions()
            except Exception as e:
                self._storage_failed(name, e)
                continue
            for p in parts:
                if p not in filled:
                    self._hold(name, p, version)

    def _push_refused(
        self, name: str, epoch: int, partitions: list[int], items: list[tuple[int, str, Record]], ops: OpIds,
        created: int,
    ) -> str | None:
        """Why a push (or a piece of one) of map `name` (its definition `created`) is refused, or None."""
        if name not in self.engines:
            return f"unknown map {name!r} on {self.node_id}"
        if (other := self._other_definition(name, created)) is not None:
            return other
        if name in self.broken:
            return self._broken_why(name)
        parts = set(partitions)
        if any(p not in parts for p, _k, _r in items) or any(p not in parts for p, *_ in ops):
            return "records of partitions the push does not name"
        if any(not 0 <= p < self.partitions or self.fence[p] > epoch for p in parts):
            return _FENCED_PUSH
        return None

    def _apply_push(
        self, name: str, epoch: int, partitions: list[int], items: list[tuple[int, str, Record]], ops: OpIds,
        deletes: list[tuple[int, str]], full: bool,
    ) -> str | None:
        """Apply a whole push (checked by `_push_refused`): None, or why it failed (the storage)."""
        parts = set(partitions)
        for p in parts:
            self._raise_fence(p, epoch)
        self._settle_all(name, parts)
        # The push is the primary's copy as of its takeover at `epoch`: it replaces what this node
        # holds, except records written since the takeover (epoch `epoch`, newer by sequence).
        def replaced(current: Record | None) -> bool:
            return current is None or current.epoch < epoch
        engine = self.engines[name]
        try:
            if full:
                pushed = {(p, key) for p, key, _r in items}
                for p in parts:  # (the versions alone: the values are not needed)
                    for key, held in list(engine.scan_meta(p)):
                        if (p, key) not in pushed and held.epoch < epoch:
                            engine.delete(p, key)
            for p, key in deletes:
                if p in parts and replaced(engine.get(p, key)):
                    engine.delete(p, key)
            for p, key, rec in items:
                current = engine.get(p, key)
                if replaced(current) or newer(rec, current):
                    engine.put(p, key, rec)
        except Exception as e:
            self._storage_failed(name, e)
            return self._broken_why(name)
        self._merge_ops(name, ops)
        for p in parts:
            self._hold(name, p, epoch)
        return None

    def _on_piece(self, sender: str, msg: Push) -> None:
        """A piece of a push: kept until the last one arrives, then the push is applied as a whole
        (its deletions and the claim to hold the partitions wait for every piece). A piece this
        node lacks the pieces before of (it restarted, or dropped the push) is refused with the
        piece it expects (`PushAck.next`): the sender goes back to it."""
        key = (sender, msg.stream)

        def ack(ok: bool, why: str | None, nxt: int) -> None:
            self._send(sender, PushAck(msg.id, ok, why, msg.stream, nxt))

        # (refused first: a push applied here whose map failed since, its writes undone, is no
        # longer held; nor is one applied before the node dropped its copies, which forgets it)
        why = self._push_refused(msg.map, msg.epoch, msg.covers, msg.items, msg.ops, msg.created)
        if why is not None:
            self._incoming.pop(key, None)
            ack(False, why, 0)
            return
        if key in self._received:  # applied already: the acknowledgement of the last piece was lost
            ack(True, None, msg.piece + 1)
            return
        inc = self._incoming.get(key)
        if inc is None:
            if msg.piece:
                ack(False, f"missing pieces: {self.node_id} has no piece of push {msg.stream} before "
                           f"piece {msg.piece}", 0)
                return
            # a push of the same partitions started again, here or by a newer primary, replaces one
            # still arriving: its sender gave that one up
            covers = set(msg.covers)
            for k, other in list(self._incoming.items()):
                if other.name == msg.map and other.epoch <= msg.epoch and covers.intersection(other.parts):
                    del self._incoming[k]
            inc = self._incoming[key] = _Incoming(msg.map, msg.epoch, list(msg.covers), msg.full, self._now)
        if msg.piece < inc.next:  # sent again (its acknowledgement was lost): kept already
            ack(True, None, inc.next)
            return
        if msg.piece > inc.next:
            why = f"missing pieces: {self.node_id} expects piece {inc.next} of push {msg.stream}"
            ack(False, why, inc.next)
            return
        inc.items.extend(msg.items)
        inc.ops.extend(msg.ops)
        inc.deletes.extend(msg.deletes)
        inc.next += 1
        inc.heard = self._now
        if not msg.last:
            ack(True, None, inc.next)
            return
        del self._incoming[key]
        why = self._apply_push(inc.name, inc.epoch, inc.parts, inc.items, inc.ops, inc.deletes, inc.full)
        if why is None:
            self._received[key] = inc.name
            while len(self._received) > _RECEIVED:
                self._received.popitem(last=False)
        ack(why is None, why, inc.next)

    def _drop_incoming(self, name: str | None = None) -> None:
        """Forget pushes still arriving in pieces, and those applied (of map `name`; None: all):
        the copy they went into is gone."""
        for k in [k for k, inc in self._incoming.items() if name is None or inc.name == name]:
            del self._incoming[k]
        for k in [k for k, n in self._received.items() if name is None or n == name]:
            del self._received[k]

    def _on_push_ack(self, sender: str, msg: PushAck) -> None:
        ps = self._pushes.get(msg.id)
        if ps is None or ps.peer != sender:
            return
        pieces = msg.stream != 0 or ps.msg.stream != 0
        if pieces and msg.stream != ps.msg.stream:
            # a node of an earlier version: it takes no pieces (it refuses them, or ignores them)
            if not ps.warned:
                ps.warned = True
                self.log.warning(
                    "%s cannot take the copy of partitions %s of map %r in pieces (it runs an earlier "
                    "version?): it gets no copy of them from this node until it is upgraded",
                    sender, ps.parts, ps.name,
                )
            return  # resent after resend_after
        if not msg.ok:
            if msg.reason and msg.reason.startswith("fenced"):
                self._step_down_all(
                    (p, f"{sender}: {msg.reason}") for p in ps.parts
                    if (prim := self.prims.get(p)) is not None and prim.epoch <= ps.msg.epoch
                )
            elif pieces and msg.reason and msg.reason.startswith("missing pieces"):
                self._next_piece(ps, msg.id, min(max(msg.next, 0), len(ps.pieces) - 1))
            return  # resent after resend_after (storage trouble at the replica)
        if ps.at + 1 < len(ps.pieces):
            self._next_piece(ps, msg.id, ps.at + 1)
            return
        del self._pushes[msg.id]
        prom = ps.promotion
        if prom is not None:
            prom.pushed.setdefault(ps.name, set()).update((sender, p) for p in ps.parts)
        if ps.rest:  # the next partitions of the copy
            self._push(ps.peer, ps.name, ps.rest, ps.msg.epoch, prom, ps.known, ps.reported)
        if prom is not None:
            self._advance(prom)

    def _next_piece(self, ps: _PushState, acked: int, at: int) -> None:
        """Send piece `at` of push `ps` (after the acknowledgement or refusal of piece id `acked`)."""
        del self._pushes[acked]
        ps.at = at
        ps.sent = self._now
        self._pushes[ps.msg.id] = ps
        if ps.peer in self.up:
            self._send(ps.peer, ps.msg)

    def _merge_ops(self, name: str, ops: OpIds) -> None:
        """Remember applied operations (in memory, and with the data: `MapStorage.add_ops`)."""
        engine = self.engines.get(name)
        if engine is not None and ops and name not in self.broken:
            self._settle_all(name, {op[0] for op in ops})
            try:
                engine.add_ops(list(ops))
            except Exception as e:
                self._storage_failed(name, e)
        by_p = self.ops.setdefault(name, {})
        for p, origin, rid, at in ops:
            by_p.setdefault(p, {})[(origin, rid)] = at

    def _ops_of(self, name: str, parts: Iterable[int]) -> OpIds:
        by_p = self.ops.get(name, {})
        return [(p, o, r, at) for p in parts for (o, r), at in by_p.get(p, {}).items()]

    # --- syncs ----------------------------------------------------------------------------------------------

    def _serve_sync(self, sender: str, req: SyncRequest) -> None:
        parts = [p for p in req.partitions if 0 <= p < self.partitions]
        if (why := self._other_definition(req.map, req.created)) is not None:
            self._send(sender, SyncChunk(req.id, [], True, why))
            return
        if not req.fence:  # a replica without a copy asks its primary for one
            mine = [p for p in parts if (prim := self.prims.get(p)) is not None and prim.ready]
            engine = self.engines.get(req.map)
            if engine is not None and req.map not in self.broken and self.table is not None:
                by_epoch: dict[int, list[int]] = {}
                for p in mine:
                    pushing = any(
                        ps.peer == sender and ps.name == req.map and (p in ps.parts or p in ps.rest)
                        for ps in self._pushes.values()
                    )
                    if sender in self._owners(req.map, p)[1:] and not pushing:
                        by_epoch.setdefault(self.prims[p].epoch, []).append(p)
                for epoch, ps_ in by_epoch.items():
                    self._push(sender, req.map, ps_, epoch, None, None)
            return
        if req.fence:
            for p in parts:
                self._raise_fence(p, req.fence)
        engine = self.engines.get(req.map)
        if engine is None:  # its definition has not reached this node yet: asked again soon
            why = f"{self.node_id} does not know map {req.map!r} yet"
            self._send(sender, SyncChunk(req.id, [], True, why))
            return
        if req.map in self.broken:
            self._send(sender, SyncChunk(req.id, [], True, self._broken_why(req.map)))
            return
        self._run_job(self._answer_sync(sender, req, parts, engine))

    def _answer_sync(
        self, sender: str, req: SyncRequest, parts: list[int], engine: MapStorage
    ) -> Iterator[bool]:
        """Send the answer to `req` (the fences raised, the map known and working here): its
        chunks, `MapTimings.batch_records` records and operation ids per step. All at once, a third
        of 20,000 keys kept the loop 0.06-0.14 s. Between steps the copy may change only by what a
        primary at the fence or above writes (the fence refuses the rest), each record as it was
        when it was read; if the map's engine or definition changes, or its storage fails, the
        answer ends with an error instead (the asker asks again)."""
        items: list[tuple[int, str, Record]] = []
        ops: OpIds = []
        size = 0
        limit = min(_SYNC_CHUNK_BYTES, self.t.piece_bytes)
        budget = self.t.batch_records
        count = min(_SYNC_CHUNK_ITEMS, budget)  # records and operation ids per chunk
        active = dict(zip(req.partitions, req.active, strict=False))

        def chunk(
            done: bool = False, held: list[int] | None = None, kept: list[tuple[int, int]] | None = None
        ) -> SyncChunk:
            carried = {q for q, _k, _r in items} | {op[0] for op in ops}
            holds = sorted(q for q in carried if active.get(q) and self._holds(req.map, q, active[q]))
            return SyncChunk(req.id, items, done, None, ops, held or [], holds, kept)

        n = 0
        for p in parts:
            if n >= budget:
                n = 0
                if (yield from self._answer_pause(sender, req, engine)):
                    return
            self._settle_all(req.map, (p,))  # (what this node no longer trusts it does not send)
            try:
                for key, rec in engine.scan(p):
                    items.append((p, key, rec))
                    n += 1
                    size += _record_size(key, rec)
                    if len(items) >= count or size >= limit:
                        self._send(sender, chunk())
                        items, size = [], 0
            except Exception as e:
                self._storage_failed(req.map, e)
                self._send(sender, SyncChunk(req.id, [], True, self._broken_why(req.map)))
                return
        if req.split_ops:  # the applied operations' ids too, within the budget (else all in the last chunk)
            for op in self._ops_of(req.map, parts):
                if n >= budget:
                    n = 0
                    if (yield from self._answer_pause(sender, req, engine)):
                        return
                m = _op_size(op)
                if size and (size + m > limit or len(items) + len(ops) >= count):
                    self._send(sender, chunk())
                    items, ops, size = [], [], 0
                ops.append(op)
                size += m
                n += 1
        else:
            ops = self._ops_of(req.map, parts)
        held = [p for p in parts if active.get(p) and self._holds(req.map, p, active[p])]
        kept = [
            (p, newest) for p in parts
            if p not in held and (newest := _newest_held(self.held.get((req.map, p)), active.get(p, 0)))
        ]
        self._send(sender, chunk(True, held, kept))

    def _answer_pause(
        self, sender: str, req: SyncRequest, engine: MapStorage
    ) -> Generator[bool, None, bool]:
        """End a step of a sync answer (`_answer_sync`); after it, True when the answer cannot go
        on (its error sent: `_answer_gone`)."""
        yield True
        if (why := self._answer_gone(req, engine)) is not None:
            self._send(sender, SyncChunk(req.id, [], True, why))
            return True
        return False

    def _answer_gone(self, req: SyncRequest, engine: MapStorage) -> str | None:
        """Why a sync answer in progress cannot go on (None: it can)."""
        if self.engines.get(req.map) is not engine:
            return f"map {req.map!r} changed on {self.node_id} while it answered"
        if (why := self._other_definition(req.map, req.created)) is not None:
            return why
        if req.map in self.broken:
            return self._broken_why(req.map)
        return None

    def _on_chunk(self, sender: str, msg: SyncChunk) -> None:
        for prom in self._promotions:
            entry = prom.asked.get(msg.id)
            if entry is None:
                continue
            peer, name, _t = entry
            if peer != sender:
                return
            if msg.error is not None:
                # not an answer: asked again after `resend_after` (tick re-asks after sync_timeout)
                prom.asked[msg.id] = (peer, name, self._now - self.t.sync_timeout + self.t.resend_after)
                self.log.debug(
                    "taking over at v%d: %s could not send map %r: %s", prom.version, peer, name, msg.error
                )
                return
            prom.asked[msg.id] = (peer, name, self._now)  # progress: not timed out
            have = prom.have.setdefault((peer, name), {})
            buffered = prom.buffered.setdefault(msg.id, [])
            # The partitions the owner held when it sent the chunk count (`SyncChunk.holds`): their
            # records are merged now, one chunk per step, and the others' kept until the last chunk
            # says which count (an owner of an earlier version says nothing: all of them kept).
            now = self._held_by(prom, peer, name, msg.holds) if msg.holds else None
            # (only partitions still syncing: one past its sync pushes and serves what it merged)
            for p, key, rec in msg.items:
                if p in prom.syncing:
                    have[(p, key)] = (rec.epoch, rec.seq)
                    if now is not None and p in now:
                        ok, current = self._get(name, p, key)
                        if ok and newer(rec, current) and self._put(name, p, key, rec):
                            prom.merged += 1
                    else:
                        buffered.append((p, key, rec))
            if msg.ops:  # (every chunk may carry some: `SyncRequest.split_ops`)
                if now:
                    self._merge_ops(name, [op for op in msg.ops if op[0] in now])
                prom.buffered_ops.setdefault(msg.id, []).extend(
                    op for op in msg.ops if op[0] in prom.syncing and not (now and op[0] in now)
                )
            if not msg.done:
                return
            del prom.asked[msg.id]
            items = prom.buffered.pop(msg.id, [])
            ops = prom.buffered_ops.pop(msg.id, [])
            late = {p for p, newest in msg.kept or () if self._forced_over(p, newest)}
            self._run_job(self._merge_answer(prom, peer, name, msg.held, items, ops, late))
            return

    def _held_by(self, prom: _Promotion, peer: str, name: str, claimed: list[int]) -> set[int] | None:
        """The partitions still syncing of which `peer`'s copy counts (it says it holds them, and
        it is an owner of their active configuration: copies of other nodes, or of an owner that
        lost its copy, do not count); None: the map cannot take copies here now."""
        spec = self.specs.get(name)
        table = self.table
        if name not in self.engines or name in self.broken or spec is None or table is None:
            return None
        return {
            p for p in claimed
            if p in prom.syncing and peer in (self._active_owners(table, p, spec.replicas) or ())
        }

    def _merge_answer(
        self, prom: _Promotion, peer: str, name: str, claimed: list[int],
        items: list[tuple[int, str, Record]], ops: OpIds, late_parts: Iterable[int] = (),
    ) -> Iterator[bool]:
        """Merge what `peer`'s answer for map `name` left to its end (the records of partitions its
        chunks did not say it holds, `SyncChunk.holds`) into this node's copy, then count its copy
        and move the takeover on: `MapTimings.batch_records` records and operation ids per step
        (all at once, a third of 20,000 keys kept the loop 0.07-0.2 s). Meanwhile the takeover's
        synced partitions wait for it as for an answer on the way (`_Promotion.merging`); a
        partition past its sync before a batch takes nothing more from it (what it pushes is what
        it serves), and a takeover that ended takes nothing more at all."""
        prom.merging += 1
        late = set(late_parts)
        try:
            budget = self.t.batch_records
            held = self._held_by(prom, peer, name, claimed)
            n = 0
            for p, key, rec in items:
                if n >= budget:
                    yield True
                    n = 0
                    if prom not in self._promotions:
                        return
                    held = self._held_by(prom, peer, name, claimed)
                n += 1
                if held is not None and p in held:
                    ok, current = self._get(name, p, key)
                    if ok and newer(rec, current) and self._put(name, p, key, rec):
                        prom.merged += 1
                elif held is not None:
                    self._keep_aside(
                        prom, name, [(p, key, rec)], spare=self._active_owner(peer, name, p), late=p in late
                    )
            for i in range(0, len(ops), budget):
                if n >= budget:
                    yield True
                    n = 0
                    if prom not in self._promotions:
                        return
                    held = self._held_by(prom, peer, name, claimed)
                batch = ops[i:i + budget]
                n += len(batch)
                if held is not None:
                    self._merge_ops(name, [op for op in batch if op[0] in held])
                    for op in batch:
                        if op[0] not in held:
                            spare = self._active_owner(peer, name, op[0])
                            self._keep_ops_aside(prom, name, [op], spare=spare, late=op[0] in late)
        finally:
            prom.merging -= 1
        if held is not None:
            prom.holders.setdefault(name, {})[peer] = held
        prom.answered.setdefault(name, set()).add(peer)
        # (the request named every partition still syncing, and each chunk's records of them
        # are in `have`: for those, a push can send only what differs)
        prom.covered.setdefault((peer, name), set()).update(prom.syncing)
        self._advance(prom)

    # --- time -----------------------------------------------------------------------------------------------

    def tick(self, now: float, wall: int) -> list[Action]:
        self._clock(now, wall)
        silent: dict[tuple[str, str], int] = {}  # (map, primary) -> attempts it left unanswered
        for c in list(self.client.values()):
            if now >= c.deadline:
                self._finish(c, Fail(c.op_id, MapUnavailable(
                    f"map {c.name!r} key {c.key!r}: {OP_NAMES[c.op]} got no answer after {c.attempts} "
                    f"attempt(s) in {self.t.op_timeout:g}s; last error: {c.last}"
                    + ("" if c.op == OP_GET else "; the write may or may not have been applied")
                )))
            elif c.peer is not None and now >= c.attempt_until:
                c.last = f"{c.peer} did not answer within {self.t.attempt_timeout:g}s"
                silent[(c.name, c.peer)] = silent.get((c.name, c.peer), 0) + 1
                c.peer = None
                c.why = "timeout"
                self._attempt(c)
            elif c.peer is None and now >= c.retry_at:
                self._attempt(c)
        for (name, peer), n in silent.items():
            self.log.info(
                "map %r: %d operation(s) got no answer from %s within %gs; retried (same ids)",
                name, n, peer, self.t.attempt_timeout,
            )
        self._resend()
        self._pull()
        self._answer_parked(now)
        for prom in list(self._promotions):
            if not prom.warned and now - prom.started >= _SLOW_TAKEOVER:
                prom.warned = True
                some = min(prom.syncing or prom.parts, default=None)
                if some is not None:
                    self.log.warning("%s (and %d more partitions)", self._takeover_status(some),
                                     len(prom.parts) - 1)
            if prom.syncing:
                stale = [rid for rid, (_pe, _n, t) in prom.asked.items() if now - t >= self.t.sync_timeout]
                again = [prom.asked.pop(rid)[:2] for rid in stale]
                self._ask(prom, again)
            self._advance(prom)
        self._plan()
        if now - self._last_housekeeping >= 1.0:
            self._last_housekeeping = now
            self._housekeep()
        return self._take()

    def _pull(self) -> None:
        """As a replica, ask primaries for the copies of the active configuration this node lacks
        (after a restart, or a push that did not arrive), at most every `resend_after`."""
        table = self.table
        if table is None or len(table.active) != table.partitions or not self.has_quorum:
            return
        if self._now - self._last_pull < self.t.resend_after * 4:
            return
        self._last_pull = self._now
        for name, spec in self.specs.items():
            if name in self.broken or name not in self.engines:
                continue
            by_primary: dict[str, list[int]] = {}
            for p in range(table.partitions):
                active = table.active[p]
                owners = self._owners_in(table, p, spec.replicas)
                if not active or self.node_id not in owners[1:] or self._holds(name, p, active):
                    continue
                if owners[0] in self.up:
                    by_primary.setdefault(owners[0], []).append(p)
            for primary, parts in by_primary.items():
                created = self.created.get(name, 0)
                self._send(primary, SyncRequest(next(self._ids), name, parts, 0, [], created=created))

    def _resend(self, only: str | None = None) -> None:
        """Resend replication, pushes and read checks still waiting for an answer."""
        if self.table is None:
            return

        def due(peer: str, sent: float) -> bool:
            if peer not in self.up:
                return False
            return peer == only if only is not None else self._now - sent >= self.t.resend_after

        for w in list(self._tracked.values()):
            if w.partition not in self.prims or w.name not in self.specs:
                continue
            for peer in self._owners(w.name, w.partition)[1:]:
                if peer not in w.acked and due(peer, w.sent.get(peer, -1e9)):
                    self._replicate(w, peer)
        for ps in self._pushes.values():
            if due(ps.peer, ps.sent):
                ps.sent = self._now
                self._send(ps.peer, ps.msg)
        for p, check in list(self._checks.values()):
            for peer, t in list(check.sent.items()):
                if peer not in check.acked and due(peer, t):
                    check.sent[peer] = self._now
                    self._send(peer, ReadCheck(check.id, p, check.epoch))

    # --- storage failures -----------------------------------------------------------------------------------

    def storage_failed(self, name: str, error: BaseException, now: float) -> list[Action]:
        """The service could not commit what map `name` stored since its last commit (all of it
        is undone; see `aether.maps.storage`): the map is broken here, as after a failed write,
        and its writes still waiting for replicas are refused so that their callers try again
        (with the same operation id, at the partition's next primary)."""
        self._clock(now)
        self._storage_failed(name, error)
        why = self._broken_why(name)
        for w in [w for w in self._tracked.values() if w.name == name]:
            targets, w.targets = w.targets, []
            for t in targets:
                self._refuse(t, KIND_NOT_PRIMARY, why)
            self._untrack(w)
        return self._take()

    def _storage_failed(self, name: str, e: BaseException) -> None:
        if name in self.broken:
            return
        reason = f"map {name!r} storage failed ({type(e).__name__}: {e}); this node stopped serving it"
        self.broken[name] = reason
        if not no_space(e):
            self._damaged.add(name)  # not only a full disk: its copies are not trusted once it works
        self._broken_at[name] = self._now
        self.log.error("%s", reason)
        self._out.append(StorageHealth(reason))

    def _probe(self) -> None:
        for name in list(self.broken):
            if self._now - self._broken_at[name] < self.t.probe_after:
                continue
            self._broken_at[name] = self._now
            engine = self.engines.get(name)
            if engine is not None:
                try:
                    free = engine.free_bytes()
                    if free is not None and free < self.t.probe_room:
                        self.log.warning(
                            "map %r storage still failing: %d bytes free on its file system, fewer "
                            "than the %d a node taken back in may need at once",
                            name, free, self.t.probe_room,
                        )  # fmt: skip
                        continue
                    engine.put(self.partitions - 1, "\x00probe", Record(None, 0, 0, 1))
                    engine.delete(self.partitions - 1, "\x00probe")
                    engine.commit()  # a write counts only once committed (a full disk fails here)
                except Exception as e:
                    self.log.warning("map %r storage still failing: %s", name, e)
                    continue
            del self.broken[name]
            self.log.warning("map %r storage works again", name)
            if self.broken and name not in self._damaged and engine is not None:
                # Others still fail: it serves again at once, from what its engine committed. Its
                # failed commits were undone whole, records, held configurations and operation ids
                # alike; this process's memory of the latter two was not: a retry of a write whose
                # commit failed was answered as done from it, and the write was lost (map
                # simulation, profile disks, seed 20: a put acknowledged, the next read None).
                self._reload(name, engine)
            if not self.broken:
                if self._damaged:  # bad bytes or an I/O error: what the engines hold may be wrong
                    self._damaged.clear()
                    self.forget_data("its storage failed and may have missed writes")
                else:  # a full disk only: its failed commits were undone whole
                    self._storage_healed()
                self._out.append(StorageHealth(None))

    def _reload(self, name: str, engine: MapStorage) -> None:
        """Take map `name`'s held configurations and operation ids from its engine again (what it
        committed), forgetting what this process kept of them beside it."""
        try:
            held = engine.held()
            ops = engine.ops_index()
        except Exception as e:
            self._storage_failed(name, e)
            return
        for key in [k for k in self.held if k[0] == name]:
            del self.held[key]
        for q, versions in held.items():
            self.held[(name, q)] = set(versions)
        self.ops[name] = ops

    def _storage_healed(self) -> None:
        """Every map's storage works again after a full disk (`no_space`): go on from what the
        engines committed, as a restarted process does, and take this node's partitions over again.

        A failed commit undid its whole turn (records, held configurations and operation ids
        alike), and while a map was broken here this node acknowledged none of its writes; so its
        committed copies hold every write they acknowledged and count as they did, and what they
        missed the other owners have (a takeover merges it). It used to drop them ("it may have
        missed writes"): when every owner's disk filled at once, each dropped its copies and every
        acknowledged write was lost. What this process kept beside its engines is forgotten: the
        held configurations in memory (one whose commit failed is not in its engine), the
        operation ids answered, pushes of which only pieces arrived, its primaries."""
        self.log.warning(
            "map storage works again: this node goes on from the map copies it had committed and "
            "takes its partitions over again"
        )
        self._step_down_all([(p, f"{self.node_id}'s map storage works again") for p in list(self.prims)])
        self._drop_incoming()  # pushes of which some pieces arrived before: they would be applied as a whole
        self.held.clear()
        self._learned.clear()
        for name, engine in self.engines.items():
            try:
                for q, versions in engine.held().items():
                    self.held[(name, q)] = set(versions)
                self.ops[name] = engine.ops_index()
            except Exception as e:
                self._storage_failed(name, e)
        table = self.table
        if table is not None:
            mine = {p for p in range(table.partitions) if table.primary(p) == self.node_id}
            if mine:
                self._start_promotion(table.version, mine)

    # --- local views ----------------------------------------------------------------------------------------

    def local_keys(self, name: str, prefix: str, wall: int) -> tuple[list[str], list[int]]:
        """Live keys with `prefix` in the partitions this node serves as primary, and those partitions."""
        self.spec(name)
        if name in self.broken:
            raise MapUnavailable(self._broken_why(name))
        engine = self.engines[name]
        parts = sorted(p for p, prim in self.prims.items() if prim.ready) if self.has_quorum else []
        out: list[str] = []
        for p in parts:
            out.extend(k for k, m in engine.scan_meta(p) if k.startswith(prefix) and meta_live(m, wall))
        return out, parts

    def retry_counts(self, name: str) -> dict[str, int]:
        """How often operations of this node's callers on map `name` were tried again, by why
        (every one of `RETRY_REASONS`, zeros included), since the core started."""
        counts = self.client_retries.get(name, {})
        return {reason: counts.get(reason, 0) for reason in RETRY_REASONS}

    def local_stats(self, name: str, now: float) -> MapNodeStats:
        spec = self.spec(name)
        engine = self.engines[name]
        table = self.table
        primary = replica = 0
        if table is not None:
            for p in range(table.partitions):
                owners = self._owners_in(table, p, spec.replicas)
                if owners[0] == self.node_id:
                    primary += 1
                elif self.node_id in owners:
                    replica += 1
        pending = [min(w.sent.values()) for w in self._tracked.values() if w.name == name and w.sent]
        return MapNodeStats(
            node=self.node_id, engine=spec.engine, entries=engine.entries, bytes=engine.bytes,
            primary_partitions=primary, replica_partitions=replica,
            syncing_partitions=sum(1 for prim in self.prims.values() if not prim.ready),
            pending_acks=len(pending), oldest_pending_ms=int((now - min(pending)) * 1000) if pending else 0,
        )

    # --- housekeeping ---------------------------------------------------------------------------------------

    def _housekeep(self) -> None:
        step = 64
        parts = range(self._purge_cursor, min(self._purge_cursor + step, self.partitions))
        self._purge_cursor = 0 if parts.stop >= self.partitions else parts.stop
        for name, engine in self.engines.items():
            if name not in self.broken:
                try:
                    engine.purge(parts, self._wall)
                except Exception as e:
                    self._storage_failed(name, e)
        horizon = self._wall - self.t.dedup_ms
        for name, engine in self.engines.items():
            if name not in self.broken:
                try:
                    engine.purge_ops(parts, horizon)
                except Exception as e:
                    self._storage_failed(name, e)
        for by_p in self.ops.values():
            for p in parts:
                done = by_p.get(p)
                if done:
                    for oid in [o for o, at in done.items() if at < horizon and o not in self._pending]:
                        del done[oid]
        for k, inc in list(self._incoming.items()):
            # a push in pieces whose sender went quiet (it went down, or gave the push up) or that a
            # newer primary fenced: forgotten (a piece that comes after all is refused as missing)
            quiet = self._now - inc.heard >= self.t.drop_after
            if quiet or any(self.fence[p] > inc.epoch for p in inc.parts):
                del self._incoming[k]
        table = self.table
        if table is not None and self._now - self.table_changed_at >= self.t.drop_after:
            for name, engine in self.engines.items():
                if name in self.broken:
                    continue
                spec = self.specs[name]
                # (kept while this node is an owner of the partition's active configuration: its
                # copy may be one a takeover needs, until the new owners' is recorded active. Left
                # out of the table because its disk was full, the last owner of every partition
                # dropped the only copies that counted while the takeover waited for them.)
                try:
                    gone = [
                        p for p in engine.partitions()
                        if self.node_id not in self._owners_in(table, p, spec.replicas)
                        and self.node_id not in (self._active_owners(table, p, spec.replicas) or ())
                    ]
                except Exception as e:
                    self._storage_failed(name, e)
                    continue
                for p in gone:
                    self._drop_later(name, p)
            self._start_drops()
        self._probe()
