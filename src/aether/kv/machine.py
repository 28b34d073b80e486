"""The KV state machine applied by consensus: commands, results, sessions, watch events.

Deterministic and free of I/O. Commands carry an optional client session `(client, seq)`:
a retried command (same client and sequence) returns the recorded result instead of running
twice, so a client that fails over to another node gets exactly-once effects.

Session rules (a session id must be unique per process incarnation of its writer):

- seq == 1 of an unknown session starts it; seq > last of a known session runs the command
  (gaps are allowed: a command may never have reached the log);
- seq == last with the same command (same op digest) answers the recorded result (a retry);
- seq == last with a different command is refused: "session conflict";
- seq < last is refused: "stale request sequence";
- seq != 1 of an unknown session (expired from the LRU, or never started) is refused:
  "unknown session", so a retry whose session was evicted can never run twice.

A refused command changes nothing (no revision, no session update). `session_error_kind`
classifies these errors for the layers above.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Union

import msgspec

from aether.core.errors import BadRequest
from aether.kv.contract import WatchEvent
from aether.kv.keys import KEY_FAMILIES, parse_key


class Get(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    key: str


class Put(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    key: str
    value: bytes


class Remove(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=3):
    key: str


class Cas(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=4):
    """Set `key` to `new` (None removes) iff its current value equals `expected` (None: absent)."""

    key: str
    expected: bytes | None
    new: bytes | None


Op = Union[Get, Put, Remove, Cas]  # noqa: UP007


class Command(msgspec.Struct, array_like=True, frozen=True, gc=False):
    op: Op
    client: str = ""
    seq: int = 0


class Result(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """`ok` is False for a failed CAS or a rejected command (then `error` says why).

    `value` is the value read (Get), the previous value (Put/Remove/Cas); `revision` is the
    store revision after the command.
    """

    ok: bool
    value: bytes | None = None
    revision: int = 0
    error: str | None = None


class _Snapshot(msgspec.Struct, array_like=True):
    revision: int
    items: list[tuple[str, bytes]]
    sessions: list[tuple[str, int, bytes]]  # (client, last seq, recorded result)
    # op digest of each session's last command, in `sessions` order; absent in snapshots
    # written before digests existed (those sessions then have an unknown digest, b"")
    session_digests: list[bytes] = []
    # the revision that created each key of `items` (in `items` order; 0: unknown); absent in
    # snapshots written before it was kept (then unknown for every key). A trailing field: a
    # replica of an earlier version decodes this snapshot and ignores it.
    created: list[int] = []


_cmd_decoder = msgspec.msgpack.Decoder(Command)
_result_decoder = msgspec.msgpack.Decoder(Result)
_snap_decoder = msgspec.msgpack.Decoder(_Snapshot)
_encoder = msgspec.msgpack.Encoder()

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024

# Prefixes of the session errors (Result.error); see the module docstring.
STALE_SEQUENCE = "stale request sequence"
SESSION_CONFLICT = "session conflict"
UNKNOWN_SESSION = "unknown session"
_SESSION_ERRORS = (STALE_SEQUENCE, SESSION_CONFLICT, UNKNOWN_SESSION)


def session_error_kind(error: str | None) -> str | None:
    """STALE_SEQUENCE, SESSION_CONFLICT or UNKNOWN_SESSION if `error` is a session refusal, else None.

    A session refusal means the command was not applied by this request."""
    if error:
        for kind in _SESSION_ERRORS:
            if error.startswith(kind):
                return kind
    return None


def op_digest(op: Op) -> bytes:
    """A short digest of the op (same on every replica: same code, same encoding)."""
    return hashlib.blake2b(_encoder.encode(op), digest_size=8).digest()


def encode_command(op: Op, client: str = "", seq: int = 0) -> bytes:
    return _encoder.encode(Command(op, client, seq))


def decode_result(data: bytes) -> Result:
    return _result_decoder.decode(data)


def validate_value(key: str, value: bytes) -> None:
    """Raise BadRequest unless `value` decodes as the value type of `key`'s family."""
    if len(value) > MAX_VALUE_BYTES:
        raise BadRequest(f"value for {key!r} is {len(value)} bytes; the limit is {MAX_VALUE_BYTES}")
    for fam in KEY_FAMILIES:
        if key.startswith(fam.prefix):  # type: ignore[attr-defined]
            vt = fam.value_type  # type: ignore[attr-defined]
            if vt is not bytes:
                try:
                    msgspec.msgpack.decode(value, type=vt)
                except msgspec.DecodeError as e:
                    raise BadRequest(f"value for {key!r} is not a valid {vt.__name__}: {e}") from None
            return


class KVStateMachine:
    """Key -> bytes map with a revision counter, client sessions and a watch-event outbox."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self.data: dict[str, bytes] = {}
        self.revision = 0
        # key -> the revision at which it got its current value from absent (`created_revision`)
        self.created: dict[str, int] = {}
        # client -> (last seq, op digest of that command, its recorded result), least recent first
        self.sessions: OrderedDict[str, tuple[int, bytes, bytes]] = OrderedDict()
        self.max_sessions = max_sessions
        self.events: list[WatchEvent] = []
        self.resets = 0  # incremented when restored from a snapshot

    # StateMachine protocol -----------------------------------------------------------------------

    def apply(self, command: bytes) -> bytes:
        try:
            cmd = _cmd_decoder.decode(command)
        except msgspec.DecodeError as e:
            return _encoder.encode(Result(False, None, self.revision, f"malformed command: {e}"))
        if not cmd.client:
            return _encoder.encode(self._run(cmd.op))
        client, seq = cmd.client, cmd.seq
        digest = op_digest(cmd.op)
        prev = self.sessions.get(client)
        if prev is None:
            if seq != 1:
                return self._refuse(
                    f"{UNKNOWN_SESSION}: client {client!r} seq {seq} does not continue a known session "
                    "(it expired from the session table or never started); not applied; "
                    "a new session must start at seq 1"
                )
        elif seq <= prev[0]:
            self.sessions.move_to_end(client)
            if seq < prev[0]:
                return self._refuse(
                    f"{STALE_SEQUENCE}: client {client!r} seq {seq} is below the session's last seq "
                    f"{prev[0]}; not applied"
                )
            if prev[1] != digest:
                # never answer a different command from the cache: that would acknowledge a
                # write that was not applied
                if not prev[1]:  # restored from a snapshot written before digests existed
                    return self._refuse(
                        f"{SESSION_CONFLICT}: client {client!r} seq {seq} was recorded without a "
                        "command digest, so a retry cannot be told from a different command; not applied"
                    )
                return self._refuse(
                    f"{SESSION_CONFLICT}: client {client!r} seq {seq} was already used for a "
                    "different command; not applied (session ids must be unique per process)"
                )
            return prev[2]
        out = _encoder.encode(self._run(cmd.op))
        self.sessions[client] = (seq, digest, out)
        self.sessions.move_to_end(client)
        if len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return out

    def _refuse(self, error: str) -> bytes:
        return _encoder.encode(Result(False, None, self.revision, error))

    def _run(self, op: Op) -> Result:
        key = op.key
        try:
            if len(key.encode()) > MAX_KEY_BYTES:
                raise BadRequest(f"key longer than {MAX_KEY_BYTES} bytes")
            parse_key(key)
            if isinstance(op, Put):
                validate_value(key, op.value)
            elif isinstance(op, Cas) and op.new is not None:
                validate_value(key, op.new)
        except BadRequest as e:
            return Result(False, None, self.revision, str(e))
        data = self.data
        cur = data.get(key)
        if isinstance(op, Get):
            return Result(True, cur, self.revision)
        if isinstance(op, Put):
            self._set(key, op.value)
            return Result(True, cur, self.revision)
        if isinstance(op, Remove):
            if cur is not None:
                self._set(key, None)
            return Result(True, cur, self.revision)
        # Cas
        if cur != op.expected:
            return Result(False, cur, self.revision)
        if op.new is not None or cur is not None:
            self._set(key, op.new)
        return Result(True, cur, self.revision)

    def _set(self, key: str, value: bytes | None) -> None:
        self.revision += 1
        if value is None:
            del self.data[key]
            self.created.pop(key, None)
            self.events.append(WatchEvent("remove", key, None, self.revision))
        else:
            if key not in self.data:
                self.created[key] = self.revision
            self.data[key] = value
            self.events.append(WatchEvent("put", key, value, self.revision))

    def snapshot(self) -> bytes:
        return _encoder.encode(
            _Snapshot(
                self.revision,
                list(self.data.items()),  # insertion order is the same on every replica
                [(c, s, r) for c, (s, _, r) in self.sessions.items()],
                [d for _, d, _ in self.sessions.values()],
                [self.created.get(k, 0) for k in self.data],
            )
        )

    def restore(self, data: bytes) -> None:
        snap = _snap_decoder.decode(data)
        self.revision = snap.revision
        self.data = dict(snap.items)
        created = snap.created
        if len(created) != len(snap.items):  # an old snapshot: every key's creation unknown
            created = [0] * len(snap.items)
        self.created = {k: r for (k, _), r in zip(snap.items, created, strict=True) if r}
        digests = snap.session_digests
        if len(digests) != len(snap.sessions):  # an old snapshot: digests unknown
            digests = [b""] * len(snap.sessions)
        self.sessions = OrderedDict(
            (c, (s, d, r)) for (c, s, r), d in zip(snap.sessions, digests, strict=True)
        )
        self.events.clear()
        self.resets += 1

    # local reads -------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def created_revision(self, key: str) -> int:
        """The revision at which `key` got its current value from absent: a key removed and
        written again has a new one, a key overwritten keeps it. 0 when absent, or unknown (a key
        restored from a snapshot of an earlier version, which did not keep it)."""
        return self.created.get(key, 0)

    def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def drain_events(self) -> list[WatchEvent]:
        ev = self.events
        self.events = []
        return ev
