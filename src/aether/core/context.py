"""Context variables shared across layers: the request id and the idempotency key of the call
being served.

`current_request_id` is the id of the request being served. The invoker reads it to pass the id
on through nested calls and sets it where a call runs; slices read it (re-exported as
`aether.slices.current_request_id`). It lives here, in the lowest layer, so that both can use the
same variable without importing each other.

`current_idempotency_key` is the idempotency key of the logical call being served (docs/invocation.md,
*Idempotency keys*). It travels exactly where the request id travels: set by `enter_call` next to
the request id (the invoker on local calls, the invoke server on remote ones, the slice runtime in
the task that runs the entry), read by slices (``self.context.idempotency_key``). A call a slice
makes while serving one gets a key derived from it (`child_idempotency_key`): the parent's key, the
target, the entry and how many calls to that target and entry the parent made before, hashed. A
retried parent (same key) thus makes its nested calls with the same keys again.

A key the runtime made up for a logical call (no key given: `mint_idempotency_key`) starts with
`MINTED`, which a key given from outside cannot (`check_idempotency_key`), and so do the keys
derived from it. `idempotency_key_given` tells them apart: only the attempts of one logical call
share a made-up key, while a given key may come again in a later call (a client retrying an hour
later), so an entry that deduplicates needs to look for an earlier call's effects only then.

The trace context of the call (`aether.core.tracing.current_trace`, docs/invocation.md, *Trace
context*) travels beside them: `enter_call` sets it too when given.

`current_node_id`, `current_slice` and `current_instance` say where the code running now belongs,
for the log records it emits (`aether.core.logs`): the node sets its id while it starts its
components (the tasks they start inherit it), the slice runtime sets all three where an entry runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from contextvars import ContextVar, Token
from typing import Final

from aether.core.tracing import TraceContext, current_trace

__all__ = [
    "IDEMPOTENCY_KEY_MAX",
    "MINTED",
    "RandomHex",
    "check_call_key",
    "check_idempotency_key",
    "child_idempotency_key",
    "current_idempotency_key",
    "current_instance",
    "current_node_id",
    "current_request_id",
    "current_slice",
    "derive_idempotency_key",
    "enter_call",
    "exit_call",
    "idempotency_key_given",
    "mint_idempotency_key",
    "new_idempotency_key",
]

current_request_id: ContextVar[str | None] = ContextVar("aether_request_id", default=None)
"""The request id of the call being served (set by the runtime/invoker); propagated on `Slice.call`."""

current_idempotency_key: ContextVar[str | None] = ContextVar("aether_idempotency_key", default=None)
"""The idempotency key of the call being served (None outside a call); nested calls derive theirs."""


current_node_id: ContextVar[str | None] = ContextVar("aether_node_id", default=None)
"""The node the running code belongs to (set by `Node.start`, inherited by the tasks it starts)."""

current_slice: ContextVar[str | None] = ContextVar("aether_slice", default=None)
"""The coordinates (``group:artifact:version``) of the slice whose entry runs (None outside one)."""

current_instance: ContextVar[int | None] = ContextVar("aether_instance", default=None)
"""The instance id of the slice whose entry runs (None outside one)."""


class _ChildCalls:
    """How many nested calls to each (target, entry) the call with key `parent` has made so far.

    One per served call (set by `enter_call`): tasks the entry starts copy the context and so
    share it, and count in the order they start their calls."""

    __slots__ = ("counts", "parent")

    def __init__(self, parent: str) -> None:
        self.parent = parent
        self.counts: dict[tuple[str, str], int] = {}

    def next(self, target: str, method: str) -> int:
        key = (target, method)
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        return n


_child_calls: ContextVar[_ChildCalls | None] = ContextVar("aether_child_calls", default=None)

IDEMPOTENCY_KEY_MAX: Final = 128
_KEY_RE = re.compile(rf"[A-Za-z0-9._:@+=/-]{{1,{IDEMPOTENCY_KEY_MAX}}}")


def check_idempotency_key(key: str) -> str | None:
    """Why `key` is not a valid idempotency key (None: it is): 1-128 letters, digits or ``._:@+=/-``."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        return (
            f"must be 1-{IDEMPOTENCY_KEY_MAX} characters of letters, digits and . _ : @ + = / - (e.g. a UUID)"
        )
    return None


MINTED: Final = "~"
"""The first character of a key the runtime made up for a logical call, and of the keys derived
from one; not allowed in a key given from outside (`check_idempotency_key`)."""


def check_call_key(key: str) -> str | None:
    """`check_idempotency_key` for a key slice code passes to a call: it may also be a key the
    runtime made (its own call's, passed on), which keeps saying so."""
    if isinstance(key, str) and key.startswith(MINTED):
        return check_idempotency_key(key[1:])
    return check_idempotency_key(key)


def idempotency_key_given(key: str | None) -> bool:
    """Whether `key` was given from outside the runtime (a client's ``Idempotency-Key``, a key slice
    code chose) or derived from such a key: a later logical call may bring it again. False for a
    key the runtime made up for one logical call (`MINTED`), which only that call's attempts
    share. True for None (nothing known)."""
    return key is None or not key.startswith(MINTED)


def new_idempotency_key() -> str:
    """A fresh key for a logical call that has none: `MINTED` and 32 hex digits."""
    return MINTED + uuid.uuid4().hex


def mint_idempotency_key(ids: RandomHex) -> str:
    """`new_idempotency_key` from `ids` (the invoker's, on hot paths): `MINTED` and 32 hex digits."""
    return MINTED + ids.take(16)


class RandomHex:
    """Random hex strings for ids and keys on hot paths: `take(n)` gives 2*n hex digits of
    `os.urandom` bytes, read in blocks of `block` bytes (one system call per block instead of one
    per id: `uuid.uuid4()` per request was a tenth of the HTTP router's time). As random as
    `uuid4` (both are `os.urandom`); not thread-safe: one per owner, used from one thread (the
    router and the invoker each have their own, on the node's loop). A forked child must make its
    own (the node never forks: slice workers are new interpreters)."""

    __slots__ = ("_block", "_buf", "_pos")

    def __init__(self, block: int = 4096) -> None:
        if block < 16:
            raise ValueError("block must be at least 16 bytes")
        self._block = block
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> str:
        """`n` random bytes as 2*n hex digits (n <= block)."""
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            if n > self._block:
                raise ValueError(f"cannot take {n} bytes from blocks of {self._block}")
            self._buf = os.urandom(self._block)
            pos, end = 0, n
        self._pos = end
        return self._buf[pos:end].hex()


def derive_idempotency_key(parent: str, target: str, method: str, position: int) -> str:
    """The key of the `position`-th (0-based) call to `target`.`method` made while serving the call
    with key `parent`: 32 hex digits of SHA-256 over the four values, after `MINTED` when the
    parent's key was made up by the runtime. Deterministic: a retried parent reproduces its
    children's keys."""
    h = hashlib.sha256(f"{parent}\n{target}\n{method}\n{position}".encode())
    return ("" if idempotency_key_given(parent) else MINTED) + h.hexdigest()[:32]


def child_idempotency_key(target: str, method: str) -> str | None:
    """The key of a call to `target`.`method` made now, inside the call being served (None when no
    call with a key is being served: the invoker then makes a new one)."""
    parent = current_idempotency_key.get()
    if parent is None:
        return None
    calls = _child_calls.get()
    if calls is None or calls.parent != parent:  # a context that set the key without enter_call
        calls = _ChildCalls(parent)
        _child_calls.set(calls)
    return derive_idempotency_key(parent, target, method, calls.next(target, method))


CallTokens = tuple[
    Token[str | None] | None,
    Token[str | None] | None,
    Token[_ChildCalls | None] | None,
    Token[TraceContext | None] | None,
]


def enter_call(
    request_id: str | None, idempotency_key: str | None, trace: TraceContext | None = None
) -> CallTokens:
    """Set the request id, idempotency key and trace context of the call about to be served in the
    current context (each only when given), with a fresh count of nested calls; `exit_call` undoes it."""
    rid = current_request_id.set(request_id) if request_id is not None else None
    tc = current_trace.set(trace) if trace is not None else None
    if idempotency_key is None:
        return rid, None, None, tc
    return (
        rid,
        current_idempotency_key.set(idempotency_key),
        _child_calls.set(_ChildCalls(idempotency_key)),
        tc,
    )


def exit_call(tokens: CallTokens) -> None:
    """Undo `enter_call` (in the same context)."""
    rid, key, calls, tc = tokens
    if tc is not None:
        current_trace.reset(tc)
    if calls is not None:
        _child_calls.reset(calls)
    if key is not None:
        current_idempotency_key.reset(key)
    if rid is not None:
        current_request_id.reset(rid)
