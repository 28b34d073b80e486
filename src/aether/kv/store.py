"""`KVStore`: the typed, asynchronous face of the replicated store on one node.

Writes and linearizable reads go through consensus; `get_local`/`list_local` read this
replica's applied state. Prefix watches are called synchronously, in commit order, after
each committed batch is applied — identical order on every node. After a snapshot install
(a lagging replica jumped ahead) watchers get a `reset` event and should re-read.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from aether.core.errors import BadRequest, CommitTimeout, QuorumLost, SessionConflict
from aether.kv.contract import WatchCallback, WatchEvent, decode_value, encode_value
from aether.kv.keys import Key, parse_key
from aether.kv.machine import (
    UNKNOWN_SESSION,
    Cas,
    Get,
    KVStateMachine,
    Op,
    Put,
    Remove,
    Result,
    decode_result,
    encode_command,
    session_error_kind,
)


class _Incarnation(Protocol):
    @property
    def incarnation(self) -> int: ...


class Replicator(Protocol):
    """What `KVStore` needs of the consensus adapter (`aether.consensus.runner.ConsensusRunner` on a
    node): commit commands, and call back after each applied step and after a snapshot install.
    The node passes its runner; kv does not import consensus (they are independent layers)."""

    after_apply: list[Callable[[], None]]
    on_installed: list[Callable[[int], None]]

    @property
    def engine(self) -> _Incarnation: ...

    async def apply(self, commands: Sequence[bytes], timeout: float = ...) -> list[bytes]: ...


class KVStore:
    """The `ClusterStore` (aether.kv.contract) over the embedded Rabia consensus.

    `session` overrides the client session id of this node's writes (tests, simulation); by
    default it is unique per process incarnation, `kv-{node_id}-{engine incarnation}`. It must
    never be reused by another process: the replicated session table outlives processes, and a
    reused (session, seq) would be refused as stale or as a conflict."""

    def __init__(
        self, runner: Replicator, sm: KVStateMachine, node_id: str, *, session: str | None = None
    ) -> None:
        self.runner = runner
        self.sm = sm
        self._session = session or f"kv-{node_id}-{runner.engine.incarnation}"
        self._client = self._session  # the current session (a new one if the store forgot it)
        self._seq = itertools.count(1)
        self._renewals = itertools.count(1)
        self._watches: dict[int, tuple[str, WatchCallback]] = {}
        self._ids = itertools.count(1)
        self.log = logging.getLogger(f"aether.kv.{node_id}")
        # write outcomes, for the node status (`aether doctor`): failures since start, and since
        # when (monotonic) writes keep failing with which error (None after a success)
        self.write_failures = 0
        self.failing_since: float | None = None
        self.last_write_error: str | None = None
        runner.after_apply.append(self._dispatch)
        runner.on_installed.append(self._reset)

    # --- consensus operations -------------------------------------------------------------------

    async def _run(self, op: Op, timeout: float) -> Result:
        """Commit `op` and return its result; raises `SessionConflict` if the store refused the
        command's session, `BadRequest` for any other error the result carries."""
        # node-internal writers use sessions too: a command is never applied twice
        client = self._client
        res = await self._submit(op, client, next(self._seq), timeout)
        if session_error_kind(res.error) == UNKNOWN_SESSION:
            # The store no longer knows our session: it was evicted from the session table, or
            # none of its earlier commands has been applied (they failed, or are still pending).
            # The refused command was certainly not applied: KVStore never resubmits a command
            # under the same (session, seq), so no earlier attempt of it exists that could have
            # run before the session was forgotten. Resubmitting it once is therefore safe.
            # It goes in a one-off session (seq 1 always starts a session, whatever else is in
            # flight), and later commands use a new session too, starting at seq 1.
            if self._client == client:
                self._client = f"{self._session}.{next(self._renewals)}"
                self._seq = itertools.count(1)
            self.log.info("the store forgot session %s; resubmitting in a new one", client)
            res = await self._submit(op, f"{self._session}.{next(self._renewals)}", 1, timeout)
        if res.error is not None:
            if session_error_kind(res.error) is not None:
                self.log.error("the store refused our command on %s: %s", op.key, res.error)
                raise SessionConflict(f"internal error: the store refused this node's command on "
                                      f"{op.key!r} (not applied): {res.error}")
            raise BadRequest(res.error)
        return res

    async def _submit(self, op: Op, client: str, seq: int, timeout: float) -> Result:
        try:
            (res,) = await self.runner.apply([encode_command(op, client, seq)], timeout)
        except (QuorumLost, CommitTimeout) as e:
            self.write_failures += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.last_write_error = str(e) or type(e).__name__
            raise
        self.failing_since = None
        self.last_write_error = None
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
        return res.ok  # False: the current value is not `expected` (errors raise in _run)

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

    def created_local(self, key: Key | str) -> int:
        return self.sm.created_revision(str(key))

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
