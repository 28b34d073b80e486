"""The MessagePack codec of slice calls, behind `aether.slices.api` (private).

Encoding of entry results and call requests, decoding of call answers as the caller's response
type, the `EntryBadRequest` messages that name the field a payload got wrong, and `CodecCache`:
the decoders (and proxy interfaces, `aether.slices._proxy`) built for the user types of one
loaded slice. The cache belongs to that slice (`LoadedSlice.codecs`, handed to its instances as
`SliceContext.codecs`) rather than to this module, so unloading a slice lets its classes go.

May import: `aether.core`, `aether.slices.errors`, msgspec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

import msgspec

from aether.slices.errors import EntryBadRequest, ResponseEncodeError, SliceCallError

__all__ = [
    "CodecCache",
    "decode_response",
    "encode_request",
    "encode_response",
    "type_name",
]

K = TypeVar("K")
V = TypeVar("V")

_ENCODER = msgspec.msgpack.Encoder()


class CodecCache:
    """Decoders and proxy specs built for the types of one loaded slice (bounded; thread-safe
    enough for its one slice thread: a lost race only builds an entry twice).

    Keys are user types (response types of `Slice.call`, map value types, proxy interfaces): a
    cache that outlived the slice would keep its classes, and through them its modules, alive.
    """

    def __init__(self, maxsize: int = 512) -> None:
        self.maxsize = maxsize
        self._items: dict[tuple[str, Any], Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, key: K, build: Callable[[K], V]) -> V:
        """The cached `build(key)` (built on first use); an unhashable key is built every time."""
        try:
            return cast(V, self._items[(kind, key)])
        except KeyError:
            pass
        except TypeError:  # unhashable type expression (e.g. Annotated with a dict): no cache
            return build(key)
        value = build(key)
        if len(self._items) >= self.maxsize:
            self._items.pop(next(iter(self._items)))  # the oldest
        self._items[(kind, key)] = value
        return value

    def decoder(self, tp: Any) -> msgspec.msgpack.Decoder[Any]:
        """A MessagePack decoder of `tp` (TypeError: msgspec does not support the type)."""
        return self.get("decoder", tp, msgspec.msgpack.Decoder)

    def clear(self) -> None:
        self._items.clear()


def decoder_for(tp: Any, codecs: CodecCache | None) -> msgspec.msgpack.Decoder[Any]:
    """A decoder of `tp`, from `codecs` when the caller has one (a slice), else built here."""
    return codecs.decoder(tp) if codecs is not None else msgspec.msgpack.Decoder(tp)


_FIELD_RE = re.compile(r"at `(\$[^`]*)`")
_MISSING_RE = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def _bad_request(qualname: str, message: str) -> EntryBadRequest:
    m = _FIELD_RE.search(message)
    fld = m.group(1) if m else None
    if fld is None:
        m2 = _MISSING_RE.search(message)
        fld = f"$.{m2.group(1)}" if m2 else None
    return EntryBadRequest(f"invalid request for entry {qualname}: {message}", entry=qualname, field=fld)


def _bad_param(qualname: str, name: str, e: Exception) -> EntryBadRequest:
    """A bare value for parameter `name` did not decode: report paths relative to `$.name`."""
    msg = str(e)
    msg = msg.replace("at `$", f"at `$.{name}", 1) if "at `$" in msg else f"{msg} - at `$.{name}`"
    return _bad_request(qualname, msg)


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")



def _is_map(payload: bytes) -> bool:
    first = payload[0]
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def encode_response(qualname: str, value: Any) -> bytes:
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ResponseEncodeError(f"entry {qualname} returned a value that cannot be encoded: {e}") from None



def encode_request(target: str, method: str, request: Any) -> bytes:
    try:
        return _ENCODER.encode(request)
    except (TypeError, ValueError, OverflowError) as e:
        raise SliceCallError(f"cannot encode the request for {target} {method}: {e}") from None


def decode_response(
    target: str, method: str, answer: bytes, response_type: Any, codecs: CodecCache | None = None
) -> Any:
    try:
        dec = decoder_for(response_type, codecs)
    except TypeError as e:
        raise SliceCallError(f"response type {type_name(response_type)} is not supported: {e}") from None
    try:
        return dec.decode(answer)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise SliceCallError(
            f"the answer of {target} {method} does not decode as {type_name(response_type)}: {e}"
        ) from None

