"""The KV state machine applied by consensus: commands, results, sessions, watch events.

Deterministic and free of I/O. Commands carry an optional client session `(client, seq)`:
a retried command (same client and sequence) returns the recorded result instead of running
twice, so a client that fails over to another node gets exactly-once effects.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Union

import msgspec

from aether.core.errors import BadRequest
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


class WatchEvent(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A put or remove, in commit order. `value` is None for removes."""

    kind: str  # "put" | "remove"
    key: str
    value: bytes | None
    revision: int


class _Snapshot(msgspec.Struct, array_like=True):
    revision: int
    items: list[tuple[str, bytes]]
    sessions: list[tuple[str, int, bytes]]


_cmd_decoder = msgspec.msgpack.Decoder(Command)
_result_decoder = msgspec.msgpack.Decoder(Result)
_snap_decoder = msgspec.msgpack.Decoder(_Snapshot)
_encoder = msgspec.msgpack.Encoder()

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024


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
        self.sessions: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.max_sessions = max_sessions
        self.events: list[WatchEvent] = []
        self.resets = 0  # incremented when restored from a snapshot

    # StateMachine protocol -----------------------------------------------------------------------

    def apply(self, command: bytes) -> bytes:
        try:
            cmd = _cmd_decoder.decode(command)
        except msgspec.DecodeError as e:
            return _encoder.encode(Result(False, None, self.revision, f"malformed command: {e}"))
        if cmd.client:
            prev = self.sessions.get(cmd.client)
            if prev is not None and cmd.seq <= prev[0]:
                self.sessions.move_to_end(cmd.client)
                if cmd.seq == prev[0]:
                    return prev[1]
                return _encoder.encode(Result(False, None, self.revision, "stale request sequence"))
        out = _encoder.encode(self._run(cmd.op))
        if cmd.client:
            self.sessions[cmd.client] = (cmd.seq, out)
            self.sessions.move_to_end(cmd.client)
            if len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return out

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
            self.events.append(WatchEvent("remove", key, None, self.revision))
        else:
            self.data[key] = value
            self.events.append(WatchEvent("put", key, value, self.revision))

    def snapshot(self) -> bytes:
        return _encoder.encode(
            _Snapshot(
                self.revision,
                list(self.data.items()),  # insertion order is the same on every replica
                [(c, s, r) for c, (s, r) in self.sessions.items()],
            )
        )

    def restore(self, data: bytes) -> None:
        snap = _snap_decoder.decode(data)
        self.revision = snap.revision
        self.data = dict(snap.items)
        self.sessions = OrderedDict((c, (s, r)) for c, s, r in snap.sessions)
        self.events.clear()
        self.resets += 1

    # local reads -------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def drain_events(self) -> list[WatchEvent]:
        ev = self.events
        self.events = []
        return ev
