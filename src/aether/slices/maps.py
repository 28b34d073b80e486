"""The slice-side API of the distributed map: `Slice.map(name, Type)` -> `SliceMap`.

Owns `MapBackend` (what the runtime implements: byte values, one call per operation) and
`SliceMap` (typed values through the same MessagePack struct codec as slice calls, key checks,
and `update`, a compare-and-set loop). May import `aether.core` and msgspec only; the runtime hands
a slice its backend through `SliceContext.maps`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast, runtime_checkable

import msgspec

from aether.core.maps import (
    MAX_TTL,
    MapContention,
    MapError,
    MapTtlError,
    MapValueDecodeError,
    MapValueTypeError,
    check_key,
)

if TYPE_CHECKING:
    from aether.core.tracing import TraceContext
    from aether.slices._codec import CodecCache

__all__ = ["MapBackend", "MapOp", "MapOpStarter", "SliceMap"]

V = TypeVar("V")
_ENCODER = msgspec.msgpack.Encoder()


@runtime_checkable
class MapBackend(Protocol):
    """The runtime's distributed map, values as MessagePack bytes (implemented by `aether.maps`).

    A backend may also offer `require_map(name)`, raising `UnknownMap` for an undefined map
    (`Slice.map` calls it), and `map_owned_here(name, key)` (`SliceMap.owned_here`). Every
    operation raises `UnknownMap` for an undefined map,
    `MapValueTooLarge` / `MapKeyError` for bad input and `MapUnavailable` when the data cannot be
    reached in time.
    """

    async def map_get(self, name: str, key: str) -> bytes | None: ...

    async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None: ...

    async def map_remove(self, name: str, key: str) -> bool: ...

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, new: bytes | None, *, ttl: float | None = None
    ) -> bool: ...

    async def map_keys(self, name: str, prefix: str = "") -> list[str]: ...


MapOp = Literal["get", "put", "remove", "compare_and_set"]


@runtime_checkable
class MapOpStarter(Protocol):
    """A `MapBackend` that can also start an operation without a coroutine of its own (the
    node's map service, for the slices on threads: no task per operation on the node's loop)."""

    def start_op(
        self, name: str, op: MapOp, key: str, value: bytes | None, expected: bytes | None,
        ttl: float | None, trace: TraceContext | None,
    ) -> asyncio.Future[tuple[bytes | None, bool]] | None:
        """Start `op` (for "compare_and_set" `value` is the new value); its future ends with
        ``(value read, ok)`` as the backend's operation answers. None: it cannot start this one so
        (the caller uses the `MapBackend` methods). Raises what the operation raises for bad input."""
        ...


def _type_name(t: Any) -> str:
    return getattr(t, "__qualname__", None) or repr(t)


class SliceMap(Generic[V]):
    """One named map seen from slice code, with values of type `V` (a msgspec-encodable type).

    ``get`` answers None for a missing (or expired) key. ``put`` with ``ttl`` (seconds) makes the
    key expire. ``compare_and_set(key, expected, new)`` writes `new` only if the current value
    equals `expected` (None: the key is absent; `new` None removes the key) and says whether it did;
    values are compared by their encoding. ``put_if_absent(key, value)`` writes only a missing key
    and answers the value already there (None: it wrote). ``update`` retries a read-modify-write
    until it wins.
    """

    def __init__(
        self,
        backend: MapBackend,
        name: str,
        value_type: type[V] | Any = Any,
        *,
        codecs: CodecCache | None = None,
    ) -> None:
        self.name = name
        self.value_type = value_type
        self._backend = backend
        # the decoder comes from the slice's own cache (`Slice.map` passes `context.codecs`): a
        # module-level cache keyed by `value_type` would keep an unloaded slice's classes alive
        self._decoder: msgspec.msgpack.Decoder[Any] = (
            codecs.decoder(value_type) if codecs is not None else msgspec.msgpack.Decoder(value_type)
        )

    def __repr__(self) -> str:
        return f"<SliceMap {self.name!r} of {_type_name(self.value_type)}>"

    def _encode(self, value: V) -> bytes:
        try:
            return _ENCODER.encode(value)
        except (TypeError, msgspec.EncodeError) as e:
            raise MapError(f"map {self.name!r}: cannot encode a {type(value).__name__}: {e}") from None

    def _encode_new(self, key: str, value: V) -> bytes:
        """`value` encoded to be written, once it reads back as the map's type: a value of another
        type was stored, and every read of the key then failed `MapValueDecodeError`."""
        raw = self._encode(value)
        if self.value_type is not Any:
            try:
                self._decoder.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise MapValueTypeError(
                    f"map {self.name!r} key {key!r}: the value ({type(value).__name__}) is not a "
                    f"{_type_name(self.value_type)}: {e}; nothing was written"
                ) from None
        return raw

    def _decode(self, key: str, raw: bytes) -> V:
        try:
            return cast(V, self._decoder.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise MapValueDecodeError(
                f"map {self.name!r} key {key!r}: the stored value does not decode as "
                f"{_type_name(self.value_type)}: {e}"
            ) from None

    def owned_here(self, key: str) -> bool:
        """Whether this node holds the primary copy of `key` now, as far as it knows: its writes
        are then decided here, one network hop fewer each way. A hint for placing work near its data
        (which of several keys an instance writes); it changes as nodes join and leave, and is
        False where the runtime cannot tell (a slice in a worker process, a backend without it)."""
        check_key(self.name, key)
        owned = getattr(self._backend, "map_owned_here", None)
        return bool(owned(self.name, key)) if owned is not None else False

    async def get(self, key: str) -> V | None:
        check_key(self.name, key)
        raw = await self._backend.map_get(self.name, key)
        return None if raw is None else self._decode(key, raw)

    async def put(self, key: str, value: V, *, ttl: float | None = None) -> None:
        check_key(self.name, key)
        _check_ttl(self.name, ttl)
        await self._backend.map_put(self.name, key, self._encode_new(key, value), ttl=ttl)

    async def remove(self, key: str) -> bool:
        """Remove `key`; True if it was present."""
        check_key(self.name, key)
        return await self._backend.map_remove(self.name, key)

    async def compare_and_set(
        self, key: str, expected: V | None, new: V | None, *, ttl: float | None = None
    ) -> bool:
        check_key(self.name, key)
        _check_ttl(self.name, ttl)
        exp = None if expected is None else self._encode(expected)
        val = None if new is None else self._encode_new(key, new)
        return await self._backend.map_compare_and_set(self.name, key, exp, val, ttl=ttl)

    async def put_if_absent(self, key: str, value: V, *, ttl: float | None = None) -> V | None:
        """Write `value` unless `key` holds one: None when this call wrote it, else the value already
        there (which may be `value` itself, written by an earlier attempt of the same call whose
        answer was lost). Atomic (`compare_and_set` from absent); the building block of
        deduplication by idempotency key (docs/maps.md, *Deduplicating retried calls*)."""
        check_key(self.name, key)
        _check_ttl(self.name, ttl)
        val = self._encode_new(key, value)
        for _ in range(100):  # absent, taken, then gone again (removed or expired) every round: give up
            if await self._backend.map_compare_and_set(self.name, key, None, val, ttl=ttl):
                return None
            raw = await self._backend.map_get(self.name, key)
            if raw is not None:
                return self._decode(key, raw)
        raise MapContention(f"map {self.name!r} key {key!r}: put_if_absent kept racing with removals")

    async def keys(self, prefix: str = "") -> list[str]:
        """Every key starting with `prefix`, sorted (a scan of every partition: not for hot paths)."""
        if not isinstance(prefix, str):
            raise MapError(f"map {self.name!r}: the key prefix must be a string")
        return sorted(await self._backend.map_keys(self.name, prefix))

    async def update(
        self,
        key: str,
        fn: Callable[[V | None], V | None],
        *,
        max_attempts: int = 1000,
        budget: float = 5.0,
    ) -> V | None:
        """Apply `fn(current) -> new` atomically (compare-and-set loop); returns the value written.

        `fn` may raise to abort (nothing is written); returning None removes the key. After a lost
        round the next one waits a random pause that grows with each loss (up to 50 ms), so writers
        on every node get their turn on a contended key. Raises `MapContention` (HTTP 503) when
        other writers won for `budget` seconds or `max_attempts` rounds.
        """
        check_key(self.name, key)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise MapError(f"map {self.name!r}: max_attempts must be a whole number of at least 1, not "
                           f"{max_attempts!r}")  # fmt: skip
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
            raise MapError(f"map {self.name!r}: budget must be a positive number of seconds, not {budget!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        for attempt in range(max_attempts):
            raw = await self._backend.map_get(self.name, key)
            current = None if raw is None else self._decode(key, raw)
            new = fn(current)
            val = None if new is None else self._encode_new(key, new)
            if raw is None and val is None:
                return None
            if await self._backend.map_compare_and_set(self.name, key, raw, val):
                return new
            if loop.time() >= deadline:
                break
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))
        raise MapContention(
            f"map {self.name!r} key {key!r}: update lost to other writers {attempt + 1} times "
            f"in {budget - max(0.0, deadline - loop.time()):.1f}s; try again later"
        )


def _check_ttl(name: str, ttl: float | None) -> None:
    if ttl is None:
        return
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise MapTtlError(f"map {name!r}: ttl must be a number of seconds, not {type(ttl).__name__} {ttl!r}")
    if not 0 < ttl <= MAX_TTL:  # also false for NaN
        raise MapTtlError(
            f"map {name!r}: ttl must be more than 0 and at most {MAX_TTL:g} seconds (ten years), not {ttl!r}"
        )
