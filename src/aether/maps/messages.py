"""Node-to-node messages of the distributed map (integer tags 50-59 and 62-65).

A `MapRequest` asks the partition's primary to run one operation and is answered by a
`MapResponse` with the same ``id``. The primary sends each write as a `Replicate` to the other
owners, which answer `ReplicateAck`. A `SyncRequest` asks a node for every record of some
partitions of one map and is answered by `SyncChunk`s (the last has ``done``); a non-zero
``fence`` (sent by a new primary) makes the receiver refuse replication of older epochs for
those partitions. `KeysRequest`/`StatsRequest` are scatter requests of `keys()` (in pages) and
map stats. A new primary sends the merged state of its partitions to their replicas as `Push`
messages (answered by `PushAck`; one larger than `MapTimings.piece_bytes` in pieces), and
confirms before answering a read that no newer primary fenced it with a `ReadCheck` round
(answered by `ReadCheckAck`); the leader asks a node that came up which partition table it has
applied with a `ReadCheck` too (a *table probe*, `ReadCheck.table`). Every write carries the id
of the operation that made it (``origin``, ``rid``), so a retried operation is recognised at the
primary (see `aether.maps.core`).
May import only msgspec and `aether.maps.records`.
"""

from __future__ import annotations

from typing import Final, Union

import msgspec

from aether.maps.records import Record

__all__ = [
    "KIND_BAD_REQUEST",
    "KIND_NOT_PRIMARY",
    "KIND_UNAVAILABLE",
    "KIND_UNKNOWN_MAP",
    "MAP_MESSAGE_TYPES",
    "TABLE_UNREPORTED",
    "KeysRequest",
    "KeysResponse",
    "MapMessage",
    "MapNodeStats",
    "MapRequest",
    "MapResponse",
    "OpId",
    "Push",
    "PushAck",
    "ReadCheck",
    "ReadCheckAck",
    "Replicate",
    "ReplicateAck",
    "StatsRequest",
    "StatsResponse",
    "SyncChunk",
    "SyncRequest",
]

KIND_NOT_PRIMARY: Final = "not_primary"
"""The receiver is not (or no longer, or not yet) the partition's primary: retry after the table
changes. Nothing was applied."""
KIND_UNAVAILABLE: Final = "unavailable"
"""A write quorum did not acknowledge in time; the outcome is indeterminate."""
KIND_UNKNOWN_MAP: Final = "unknown_map"
KIND_BAD_REQUEST: Final = "bad_request"


class MapRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=50):
    id: int
    op: int
    map: str
    key: str
    value: bytes | None
    expected: bytes | None
    ttl_ms: int
    # the W3C trace context of the operation ("" untraced; docs/invocation.md, *Trace context*)
    traceparent: str = ""
    tracestate: str = ""
    checks: bool = False
    """The caller's node can make the read check of an operation that writes nothing itself
    (`MapResponse.check`); an older primary ignores this and checks with its replicas."""
    created: int = 0
    """The store revision that created the map's definition as the sender knows it (its identity: a
    map removed and created again has another; 0: unknown, or an older sender). A receiver that
    knows another refuses the message as if it did not know the map yet: the two must not mix the
    removed map's data with the new one's."""


class MapResponse(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=51):
    id: int
    value: bytes | None
    ok: bool
    error: str | None = None
    kind: str | None = None
    check: int = 0
    """Nonzero: the answer of an operation that wrote nothing, given before any read check; the
    caller's node (an owner of the partition) takes it only if no primary newer than this epoch
    fenced it, as a replica answers a `ReadCheck`."""


OpId = tuple[str, int]
"""An operation's identity: the node that started it and its request id there."""

OpIds = list[tuple[int, str, int, int]]
"""Applied operations of some partitions: ``(partition, origin, rid, applied_at_wall_ms)``."""


class Replicate(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=52):
    id: int
    map: str
    partition: int
    key: str
    record: Record
    origin: str = ""
    rid: int = 0
    created: int = 0
    """As `MapRequest.created`."""


class ReplicateAck(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=53):
    id: int
    ok: bool
    reason: str | None = None
    answered: bool = False
    """The write was the replica's own caller's (`Replicate.origin`), and the replica answered
    that caller itself: the primary sends it no `MapResponse` (an older primary ignores this)."""


class SyncRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=54):
    id: int
    map: str
    partitions: list[int]
    fence: int
    active: list[int] = []
    """Per partition, the version of its active configuration as the requester knows it."""
    split_ops: bool = False
    """The requester takes operation ids in every chunk (`SyncChunk.ops`), so they are spread over
    the chunks within the size budget; an earlier version takes them only from the last chunk,
    which then carries them all."""
    created: int = 0
    """As `MapRequest.created`."""


class SyncChunk(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=55):
    id: int
    items: list[tuple[int, str, Record]]
    done: bool
    error: str | None = None
    ops: OpIds = []
    held: list[int] = []
    """(Last chunk) the partitions whose copy this node has held since the requested active
    configuration became active; only those count towards the requester's quorum."""
    holds: list[int] | None = None
    """Of the partitions this chunk carries records or operation ids of, those whose copy the
    sender held (as `held` says) when it sent the chunk: the requester merges those at once
    instead of keeping the whole answer until the last chunk says which partitions count. None:
    a node of an earlier version (the requester keeps its chunks until the last)."""
    kept: list[tuple[int, int]] | None = None
    """(Last chunk) of the partitions not in `held`, those whose copy held an earlier
    configuration and was not distrusted since (after a power cut, or an absence past the
    tombstone horizon), with the newest configuration it held: when that is older than the last
    forced takeover of the partition (`PartitionTable.forced`), the requester merges their newer
    records even when copies that count decide (an owner a forced takeover went on without comes
    back with what it acknowledged). None: a node of an earlier version (its copies that do not
    count are merged only when none counts, as before)."""


class KeysRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=56):
    id: int
    map: str
    prefix: str
    after: str | None = None
    """A page of the keys after this one ("": the first page), within the size budget
    (`KeysResponse.more`). None (an earlier version): every key in one answer, or an error when
    they exceed the budget."""


class KeysResponse(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=57):
    id: int
    keys: list[str]
    error: str | None = None
    partitions: list[int] = []
    """The partitions the answer covers (those the node serves as primary)."""
    more: bool = False
    """(A page) keys after the last of these follow: ask again with it as `KeysRequest.after`."""


class MapNodeStats(msgspec.Struct, frozen=True):
    """One node's view of one map (what `aether map stats` shows per node)."""

    node: str
    engine: str
    entries: int
    bytes: int
    primary_partitions: int
    replica_partitions: int
    syncing_partitions: int
    pending_acks: int
    """Replication messages sent by this node as primary and not acknowledged yet."""
    oldest_pending_ms: int
    """Age of the oldest of them (0 when none): the replication lag."""


class StatsRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=58):
    id: int
    map: str


class StatsResponse(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=59):
    id: int
    stats: MapNodeStats | None
    error: str | None = None


class Push(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=62):
    """Records (and applied operation ids) of some partitions a primary sends to a replica.

    A push larger than the size budget travels in pieces (`stream` nonzero), one at a time, each
    sent once the previous one is acknowledged. The replica keeps the pieces and applies them
    together when the last arrives: it deletes what the push does not hold (`full`) and counts as
    holding the partitions only then. A piece leaves `partitions` empty and names them in
    `covers`: a node of an earlier version (which ignores the trailing fields) refuses a piece
    with records or operation ids (they name partitions the push does not) and takes nothing from
    one without; it never applies a piece as the whole push, and its acknowledgement (without
    `PushAck.stream`) does not count."""

    id: int
    map: str
    epoch: int
    """The sender's primary epoch for these partitions: a replica fenced by a newer one refuses."""
    partitions: list[int]
    items: list[tuple[int, str, Record]]
    ops: OpIds = []
    deletes: list[tuple[int, str]] = []
    """Keys the replica reported that the primary does not hold."""
    full: bool = False
    """The items are the whole of these partitions: the replica deletes what else it holds."""
    stream: int = 0
    """Nonzero: this is piece `piece` of the push `stream` (the id of its first piece). 0: the
    whole push is this message."""
    piece: int = 0
    last: bool = False
    """(A piece) the last one: the replica applies the push."""
    covers: list[int] = []
    """(A piece) the partitions of the push."""
    created: int = 0
    """As `MapRequest.created`."""


class PushAck(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=63):
    id: int
    ok: bool
    reason: str | None = None
    stream: int = 0
    """(The answer to a piece) its `Push.stream`: an earlier version answers 0."""
    next: int = 0
    """(The answer to a piece) the piece the replica expects next; after a refusal because it
    lacks earlier pieces (it restarted, or dropped a push it heard nothing of for long), the
    sender goes back to it."""


class ReadCheck(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=64):
    """Is `epoch` still the newest primary epoch of `partition` this replica knows?

    With `table` nonzero it is a *table probe* instead (`partition` -1, `epoch` 0): the leader
    asks a node that came up whether its consensus store replica has applied partition table
    version `table` (the one the leader would replace by planning the node in). The node answers
    at once with the version it has, and again once it has `table`. A node of an earlier version
    ignores the trailing field and answers ``no partition -1`` without changing anything."""

    id: int
    partition: int
    epoch: int
    table: int = 0


TABLE_UNREPORTED: Final = -1
"""`ReadCheckAck.table` of an answer that does not report a table (an earlier version's)."""


class ReadCheckAck(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=65):
    id: int
    ok: bool
    reason: str | None = None
    table: int = TABLE_UNREPORTED
    """(The answer to a table probe) the partition table version this node has applied (0: none
    yet); `TABLE_UNREPORTED` from a node of an earlier version."""


MapMessage = Union[  # noqa: UP007 - msgspec needs a runtime Union object
    MapRequest, MapResponse, Replicate, ReplicateAck, SyncRequest, SyncChunk,
    KeysRequest, KeysResponse, StatsRequest, StatsResponse, Push, PushAck, ReadCheck, ReadCheckAck,
]
MAP_MESSAGE_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    MapRequest, MapResponse, Replicate, ReplicateAck, SyncRequest, SyncChunk,
    KeysRequest, KeysResponse, StatsRequest, StatsResponse, Push, PushAck, ReadCheck, ReadCheckAck,
)
