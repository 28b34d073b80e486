"""Node-to-node messages of the invoker (integer tags 40-49) and the response error kinds.

Owns the wire contract between an `Invoker` on the calling node and the `InvokeServer` on the node
that runs the chosen instance. May import only msgspec and `aether.core.errors` (where the response
kinds are defined, next to the errors that declare them), so any layer that assembles a transport
union can import it cheaply.

A request carries a per-caller correlation ``id`` (unique among that caller's in-flight calls), the
full coordinates of the chosen artifact, the entry point, the encoded argument, the tracing request
id, the time the caller still waits (``timeout_ms``) and the logical call's idempotency key (the
same on every attempt; "" from a sender that predates it), then the W3C ``traceparent`` and
``tracestate`` of the calling attempt ("" when the call is not traced; docs/invocation.md, *Trace
context*). The response echoes ``id`` and carries
either ``payload`` (success) or ``error`` + ``kind``. Fields are added only at the end, with
defaults, so messages of nodes of the previous version still decode.
"""

from __future__ import annotations

from typing import Final, Union

import msgspec

from aether.core.errors import (
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_DEADLINE,
    KIND_INDETERMINATE,
    KIND_INJECTED_FAULT,
    KIND_INTERRUPTED,
    KIND_NO_INSTANCE,
    KIND_OVERLOADED,
    KIND_SHUTTING_DOWN,
    KIND_STATUS_PREFIX,
    KIND_UNKNOWN_ENTRY,
    WireKind,
    kind_status,
    status_kind,
)

__all__ = [
    "INVOKE_MESSAGE_TYPES",
    "KIND_APP_ERROR",
    "KIND_BAD_REQUEST",
    "KIND_DEADLINE",
    "KIND_INDETERMINATE",
    "KIND_INJECTED_FAULT",
    "KIND_INTERRUPTED",
    "KIND_NO_INSTANCE",
    "KIND_OVERLOADED",
    "KIND_SHUTTING_DOWN",
    "KIND_STATUS_PREFIX",
    "KIND_UNKNOWN_ENTRY",
    "RETRYABLE_KINDS",
    "InvokeMessage",
    "InvokeRequest",
    "InvokeResponse",
    "WireKind",
    "kind_status",
    "oversized",
    "status_kind",
]

RETRYABLE_KINDS: Final = frozenset({KIND_NO_INSTANCE, KIND_OVERLOADED, KIND_SHUTTING_DOWN})


class InvokeRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=40):
    """Run `method` of `target` (full coordinates) on `payload` and answer with an `InvokeResponse`."""

    id: int
    target: str
    method: str
    payload: bytes
    request_id: str
    timeout_ms: int
    idempotency_key: str = ""
    traceparent: str = ""
    tracestate: str = ""


class InvokeResponse(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=41):
    """Answer to the `InvokeRequest` with the same `id`: `payload` on success, else `error` + `kind`."""

    id: int
    payload: bytes | None
    error: str | None
    kind: str | None


InvokeMessage = Union[InvokeRequest, InvokeResponse]  # noqa: UP007 - msgspec needs a runtime Union object
"""Add to the node's peer message union, e.g. ``Union[RabiaMessage, InvokeMessage]``."""

INVOKE_MESSAGE_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (InvokeRequest, InvokeResponse)
"""For ``isinstance(msg, INVOKE_MESSAGE_TYPES)`` when demultiplexing the transport's on_message."""


_SIZER = msgspec.msgpack.Encoder()
_ENVELOPE = 128  # more than msgpack adds around the fields of either message (headers, tag, ints)


def oversized(msg: InvokeRequest | InvokeResponse, limit: int) -> int | None:
    """The encoded size of `msg` when it is larger than `limit` bytes (the transport's ``max_frame``:
    a peer closes the link on a larger frame), else None. Cheap unless `msg` comes near the limit:
    the lengths of its fields bound its size, and only then is it encoded to measure it."""
    if isinstance(msg, InvokeRequest):
        text = (
            len(msg.target) + len(msg.method) + len(msg.request_id) + len(msg.idempotency_key)
            + len(msg.traceparent) + len(msg.tracestate)
        )  # fmt: skip
        bound = len(msg.payload) + 4 * text + _ENVELOPE  # (4: the most UTF-8 bytes of a character)
    else:
        text = len(msg.error or "") + len(msg.kind or "")
        bound = len(msg.payload or b"") + 4 * text + _ENVELOPE
    if bound <= limit:
        return None
    size = len(_SIZER.encode(msg))
    return size if size > limit else None
