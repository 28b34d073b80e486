"""`KVStore`: the typed, asynchronous face of the replicated store on one node.

Writes and linearizable reads go through consensus; `get_local`/`list_local` read this
replica's applied state. Prefix watches are called synchronously, in commit order, after
each committed batch is applied — identical order on every node. After a snapshot install
(a lagging replica jumped ahead) watchers get a `reset` event and should re-read.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from aether.consensus.runner import ConsensusRunner
from aether.core.errors import BadRequest
from aether.kv.keys import Key, parse_key, value_type_for
from aether.kv.machine import (
    Cas,
    Get,
    KVStateMachine,
    Op,
    Put,
    Remove,
    Result,
    WatchEvent,
    decode_result,
    encode_command,
)

_enc = msgspec.msgpack.Encoder()
WatchCallback = Callable[[WatchEvent], None]


def encode_value(key: str, value: Any) -> bytes:
    """Encode a typed value for `key`'s family (bytes pass through for user keys)."""
    vt = value_type_for(key)
    if vt is bytes:
        if not isinstance(value, bytes):
            raise BadRequest(f"value for {key!r} must be bytes")
        return value
    if not isinstance(value, vt):
        raise BadRequest(f"value for {key!r} must be {vt.__name__}, not {type(value).__name__}")
    return _enc.encode(value)


def decode_value(key: str, data: bytes) -> Any:
    vt = value_type_for(key)
    if vt is bytes:
        return data
    return msgspec.msgpack.decode(data, type=vt)


class KVStore:
    def __init__(self, runner: ConsensusRunner, sm: KVStateMachine, node_id: str) -> None:
        self.runner = runner
        self.sm = sm
        self._client = f"kv-{node_id}"
        self._seq = itertools.count(1)
        self._watches: dict[int, tuple[str, WatchCallback]] = {}
        self._ids = itertools.count(1)
        self.log = logging.getLogger(f"aether.kv.{node_id}")
        runner.after_apply.append(self._dispatch)
        runner.on_installed.append(self._reset)

    # --- consensus operations -------------------------------------------------------------------

    async def _run(self, op: Op, timeout: float) -> Result:
        # node-internal writers use sessions too: a command is never applied twice
        cmd = encode_command(op, self._client, next(self._seq))
        (res,) = await self.runner.apply([cmd], timeout)
        return decode_result(res)

    @staticmethod
    def _key(key: Key | str) -> str:
        text = str(key)
        parse_key(text)
        return text

    async def put(self, key: Key | str, value: Any, timeout: float = 5.0) -> int:
        """Store `value` (a typed struct of the key's family) and return the new revision."""
        k = self._key(key)
        res = await self._run(Put(k, encode_value(k, value)), timeout)
        if not res.ok:
            raise BadRequest(res.error or "put rejected")
        return res.revision

    async def remove(self, key: Key | str, timeout: float = 5.0) -> bool:
        """Remove `key`; True if it existed."""
        res = await self._run(Remove(self._key(key)), timeout)
        return res.value is not None

    async def compare_and_set(self, key: Key | str, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        """Set `key` to `new` iff it currently holds `expected` (None means absent / remove)."""
        k = self._key(key)
        exp = None if expected is None else encode_value(k, expected)
        nw = None if new is None else encode_value(k, new)
        res = await self._run(Cas(k, exp, nw), timeout)
        if res.error:
            raise BadRequest(res.error)
        return res.ok

    async def get(self, key: Key | str, timeout: float = 5.0) -> Any:
        """Linearizable read through consensus; None if absent."""
        k = self._key(key)
        res = await self._run(Get(k), timeout)
        return None if res.value is None else decode_value(k, res.value)

    # --- local reads ----------------------------------------------------------------------------

    def get_local(self, key: Key | str) -> Any:
        k = str(key)
        v = self.sm.get(k)
        return None if v is None else decode_value(k, v)

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        out = []
        for k, v in self.sm.items(prefix):
            try:
                out.append((k, decode_value(k, v)))
            except (msgspec.DecodeError, BadRequest):
                out.append((k, v))
        return out

    # --- watches --------------------------------------------------------------------------------

    def watch(self, prefix: str, callback: WatchCallback) -> Callable[[], None]:
        """Call `callback` for every put/remove under `prefix`, in commit order."""
        wid = next(self._ids)
        self._watches[wid] = (prefix, callback)

        def cancel() -> None:
            self._watches.pop(wid, None)

        return cancel

    def _dispatch(self) -> None:
        events = self.sm.drain_events()
        if not events or not self._watches:
            return
        watches = list(self._watches.values())
        for ev in events:
            for prefix, cb in watches:
                if ev.key.startswith(prefix):
                    try:
                        cb(ev)
                    except Exception:
                        self.log.exception("watch callback for prefix %r failed", prefix)

    def _reset(self, slot: int) -> None:
        self.sm.drain_events()
        for prefix, cb in list(self._watches.values()):
            try:
                cb(WatchEvent("reset", prefix, None, self.sm.revision))
            except Exception:
                self.log.exception("watch callback for prefix %r failed on reset", prefix)
