"""Stored records, their order, and one operation evaluated against a record (sans-IO).

A record is a value or a tombstone (``value is None``) with a version ``(epoch, seq)`` — the
epoch is the table version at which the writing primary took over the partition, ``seq`` counts
that primary's writes in the partition — and an expiry in wall-clock milliseconds (0: never). A
tombstone expires `tombstone_ms` after the removal and is then purged. Replicas and syncs keep
the record with the higher version, so the order in which copies arrive does not matter.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = [
    "OP_CAS",
    "OP_GET",
    "OP_NAMES",
    "OP_PUT",
    "OP_REMOVE",
    "Outcome",
    "Record",
    "RecordMeta",
    "evaluate",
    "is_live",
    "meta_live",
    "newer",
]

OP_GET: Final = 0
OP_PUT: Final = 1
OP_REMOVE: Final = 2
OP_CAS: Final = 3
OP_NAMES: Final = {OP_GET: "get", OP_PUT: "put", OP_REMOVE: "remove", OP_CAS: "compare_and_set"}


class Record(msgspec.Struct, array_like=True, frozen=True, gc=False):
    value: bytes | None
    epoch: int
    seq: int
    expires: int = 0


class RecordMeta(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A stored record without its value (`MapStorage.scan_meta`): its version, its expiry and
    whether it is a tombstone."""

    epoch: int
    seq: int
    expires: int
    tombstone: bool


def is_live(rec: Record | None, now_ms: int) -> bool:
    return rec is not None and rec.value is not None and (rec.expires == 0 or rec.expires > now_ms)


def meta_live(meta: RecordMeta, now_ms: int) -> bool:
    """`is_live` of the record `meta` describes."""
    return not meta.tombstone and (meta.expires == 0 or meta.expires > now_ms)


def newer(a: Record, b: Record | None) -> bool:
    """True if `a` should replace `b`."""
    return b is None or (a.epoch, a.seq) > (b.epoch, b.seq)


class Outcome(msgspec.Struct, frozen=True):
    """What an operation does: `write` (None: nothing to store) and the answer to the caller
    (`value` for get, `ok` for remove and compare-and-set)."""

    write: Record | None
    value: bytes | None = None
    ok: bool = True


def evaluate(
    op: int,
    current: Record | None,
    *,
    value: bytes | None,
    expected: bytes | None,
    ttl_ms: int,
    now_ms: int,
    epoch: int,
    seq: int,
    tombstone_ms: int,
) -> Outcome:
    """Evaluate `op` on the current record of a key at the primary."""
    live = current.value if current is not None and is_live(current, now_ms) else None
    if op == OP_GET:
        return Outcome(None, live)
    if op == OP_PUT:
        if value is None:
            raise ValueError("put needs a value")
        return Outcome(Record(value, epoch, seq, now_ms + ttl_ms if ttl_ms > 0 else 0))
    if op == OP_REMOVE:
        if live is None:
            return Outcome(None, ok=False)
        return Outcome(Record(None, epoch, seq, now_ms + tombstone_ms))
    if op == OP_CAS:
        if live != expected:
            return Outcome(None, live, ok=False)
        if value is None:
            if live is None:
                return Outcome(None, ok=True)
            return Outcome(Record(None, epoch, seq, now_ms + tombstone_ms))
        return Outcome(Record(value, epoch, seq, now_ms + ttl_ms if ttl_ms > 0 else 0))
    raise ValueError(f"unknown map operation {op}")
