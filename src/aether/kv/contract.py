"""The cluster state store as everything above the consensus layer sees it (SPEC §2.4).

`ClusterStore` is the one interface: typed get/put/remove/compare-and-set, local reads of this
node's replica, and prefix watches delivering puts and removes in commit order, the same order on
every node, with a ``reset`` event when a watcher must re-read (a lagging replica jumped ahead by a
snapshot). `aether.kv.store.KVStore` implements it over the embedded Rabia consensus,
`aether.etcd.store.EtcdStore` on etcd (tests/store_contract.py is the suite both pass); deploy,
controller, repository, the management API and the router see only this module (an import
contract in pyproject.toml keeps it so), so another backend can stand in for it.

The typed value codec lives here too: every backend stores the same bytes for a key family's
value (msgpack of its struct; user keys are raw bytes); and the input checks every backend makes
(`check_key`, `encode_checked`, with the limits the Rabia state machine enforces).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from aether.core.errors import BadRequest
from aether.kv.keys import Key, parse_key, value_type_for

_enc = msgspec.msgpack.Encoder()

MAX_KEY_BYTES = 1024
"""The longest key (UTF-8 bytes) any backend accepts (`aether.kv.machine` enforces the same)."""
MAX_VALUE_BYTES = 1024 * 1024
"""The largest encoded value any backend accepts (`aether.kv.machine` enforces the same)."""


class WatchEvent(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A put or remove, in commit order (`value` is None for removes); or ``reset`` (`key` is the
    watched prefix): what the watcher saw may be stale, read the prefix again."""

    kind: str  # "put" | "remove" | "reset"
    key: str
    value: bytes | None
    revision: int


WatchCallback = Callable[[WatchEvent], None]


class ClusterStore(Protocol):
    """The replicated store of one node. Writes raise `QuorumLost` / `CommitTimeout` (503, the
    outcome of a timed-out write is unknown) or `BadRequest` (a bad key or value); each write is
    applied at most once, also when the backend retries it on another member."""

    write_failures: int  # writes that failed since start
    failing_since: float | None  # monotonic time since when writes keep failing (None after a success)
    last_write_error: str | None

    async def put(self, key: Key | str, value: Any, timeout: float = 5.0) -> int:
        """Store `value` (the key family's struct, bytes for user keys); the new revision."""
        ...

    async def remove(self, key: Key | str, timeout: float = 5.0) -> bool:
        """Remove `key`; True if it existed."""
        ...

    async def compare_and_set(self, key: Key | str, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        """Set `key` to `new` iff it holds `expected` (None: absent; `new` None: remove it)."""
        ...

    async def get(self, key: Key | str, timeout: float = 5.0) -> Any:
        """A linearizable read; None if absent."""
        ...

    def get_local(self, key: Key | str) -> Any:
        """This node's replica (no round trip; may lag the cluster); None if absent."""
        ...

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        """Every (key, decoded value) under `prefix` in this node's replica, sorted by key."""
        ...

    def created_local(self, key: Key | str) -> int:
        """The store revision at which `key` got its current value from absent, in this node's
        replica: the same on every node, kept when the key is overwritten, a new (higher) one when
        it was removed and written again, so it tells a key re-created from the one that was there
        (also to a watcher that saw only a ``reset``). 0 when absent or unknown (the Rabia store:
        a key restored from a snapshot of an earlier version)."""
        ...

    def watch(self, prefix: str, callback: WatchCallback) -> Callable[[], None]:
        """Call `callback` for every put/remove under `prefix`, in commit order; returns cancel."""
        ...


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
    """The typed value of `key`'s family stored as `data`."""
    vt = value_type_for(key)
    if vt is bytes:
        return data
    return msgspec.msgpack.decode(data, type=vt)


def check_key(key: Key | str) -> str:
    """The key as text; `BadRequest` naming the problem unless it is a valid key of a known family
    no longer than `MAX_KEY_BYTES` (the checks the Rabia state machine makes, for other backends)."""
    text = str(key)
    parse_key(text)
    if len(text.encode()) > MAX_KEY_BYTES:
        raise BadRequest(f"key {text[:40]!r}... longer than {MAX_KEY_BYTES} bytes")
    return text


def encode_checked(key: str, value: Any) -> bytes:
    """`encode_value`, then `BadRequest` if the encoding exceeds `MAX_VALUE_BYTES`."""
    data = encode_value(key, value)
    if len(data) > MAX_VALUE_BYTES:
        raise BadRequest(f"value for {key!r} is {len(data)} bytes; the limit is {MAX_VALUE_BYTES}")
    return data
