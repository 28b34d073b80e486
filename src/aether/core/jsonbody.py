"""Safe decoding of JSON request bodies from outside (the HTTP router and the management API).

A body that is malformed, nested deeper than `MAX_JSON_DEPTH` levels, holds a number too large for
a float (``1e400``) or an integer that MessagePack cannot carry (outside ``-2**63 .. 2**64-1``) is
a `BadRequest` naming the problem and where it is; a body sent without a JSON content type is
`UnsupportedMediaType` (415). Nothing in here lets a hostile body raise anything else (msgspec's
own ``RecursionError`` on very deep input becomes the same `BadRequest`).

Cost: msgspec decodes; the depth check walks the decoded value only when the raw bytes hold more
than `MAX_JSON_DEPTH` brackets, and the integer check is a MessagePack encoding of the value (in
C) that walks it only when an integer does not fit, to say where.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from aether.core.errors import BadRequest, StatusError

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_JSON_DEPTH",
    "UnsupportedMediaType",
    "decode_json_body",
    "is_json_content_type",
    "require_json_content_type",
]

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted in a JSON body (the top-level value is level 1)."""
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1

_DEC = msgspec.json.Decoder()
_MSGPACK = msgspec.msgpack.Encoder()


class UnsupportedMediaType(StatusError):
    """A body was sent with a content type other than JSON (HTTP 415)."""

    status = 415


def is_json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters (``charset``) ignored."""
    if not value:
        return False
    mime = value.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def require_json_content_type(value: str | None, what: str = "the request body") -> None:
    """Raise `UnsupportedMediaType` unless `value` (the Content-Type header) is a JSON type."""
    if not is_json_content_type(value):
        got = f"Content-Type {value!r}" if value else "no Content-Type"
        raise UnsupportedMediaType(
            f"{what} must be JSON sent with 'Content-Type: application/json'; got {got}"
        )


def _too_deep() -> BadRequest:
    return BadRequest(f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep (arrays and objects)")


def decode_json_body(body: bytes) -> Any:
    """Decode a JSON body into builtins; `BadRequest` when malformed, too deep or out of range."""
    try:
        value = _DEC.decode(body)
    except RecursionError:
        raise _too_deep() from None
    except msgspec.DecodeError as e:  # includes ValidationError ("Number out of range" for 1e999)
        if "Number out of range" in str(e):
            _check_floats(body)  # raises, naming where (msgspec says `$[...]` inside an object)
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if len(body) > MAX_JSON_DEPTH and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        _check(value)  # depth first: the encoder below recurses too
    try:
        _MSGPACK.encode(value)
    except OverflowError:
        _check(value)  # raises, naming where
        raise  # unreachable unless the encoder and _check disagree: let the caller see it
    return value


class _Huge(str):
    """A number literal too large for a float (`_check_floats`)."""


def _huge_float(text: str) -> Any:
    f = float(text)
    return _Huge(text) if f in (_INF, -_INF) else f


_INF: Final = float("inf")
_FLOATS = msgspec.json.Decoder(float_hook=_huge_float)


def _check_floats(body: bytes) -> None:
    """Raise a `BadRequest` naming where a number too large for a float is (error path only)."""
    try:
        value = _FLOATS.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return  # something else is wrong too: the caller reports msgspec's message
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, dict):
            stack.extend((item, f"{path}.{k}") for k, item in v.items())
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, _Huge):
            shown = v if len(v) <= 40 else v[:37] + "..."
            raise BadRequest(
                f"number at `{path}` is out of range: {shown} is beyond what a 64-bit float holds "
                "(send it as a string)"
            )


def _check(value: Any) -> None:
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, dict):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            stack.extend((item, depth + 1, f"{path}.{k}") for k, item in v.items())
        elif isinstance(v, list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(v))
        elif type(v) is int and not INT_MIN <= v <= INT_MAX:
            raise BadRequest(
                f"number at `{path}` is out of range: a {v.bit_length()}-bit integer; integers must be "
                f"between -2**63 and 2**64-1 (send larger numbers as strings)"
            )
