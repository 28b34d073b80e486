"""Node-to-node messages of the invoker (integer tags 40-49) and the response error kinds.

Owns the wire contract between an `Invoker` on the calling node and the `InvokeServer` on the node
that runs the chosen instance. May import only msgspec (no other `aether` module), so any layer
that assembles a transport union can import it cheaply.

A request carries a per-caller correlation ``id`` (unique among that caller's in-flight calls), the
full coordinates of the chosen artifact, the entry point, the encoded argument, the tracing request
id and the time the caller still waits (``timeout_ms``). The response echoes ``id`` and carries
either ``payload`` (success) or ``error`` + ``kind``.
"""

from __future__ import annotations

from typing import Final, Union

import msgspec

__all__ = [
    "INVOKE_MESSAGE_TYPES",
    "KIND_APP_ERROR",
    "KIND_BAD_REQUEST",
    "KIND_DEADLINE",
    "KIND_NO_INSTANCE",
    "KIND_OVERLOADED",
    "KIND_SHUTTING_DOWN",
    "KIND_STATUS_PREFIX",
    "KIND_UNKNOWN_ENTRY",
    "RETRYABLE_KINDS",
    "InvokeMessage",
    "InvokeRequest",
    "InvokeResponse",
    "kind_status",
    "status_kind",
]

KIND_NO_INSTANCE: Final = "no_instance"
"""The node has no ACTIVE instance of the artifact (any more): retry on another instance."""
KIND_BAD_REQUEST: Final = "bad_request"
"""The payload did not decode into the entry's argument type: not retryable."""
KIND_UNKNOWN_ENTRY: Final = "unknown_entry"
"""The artifact has no such entry point: not retryable."""
KIND_APP_ERROR: Final = "app_error"
"""The entry raised; ``error`` is ``"ExceptionType: text"``: not retryable."""
KIND_OVERLOADED: Final = "overloaded"
"""The node has too many calls in flight: retry elsewhere/later."""
KIND_SHUTTING_DOWN: Final = "shutting_down"
"""The node is stopping its invoke server: retry elsewhere."""
KIND_DEADLINE: Final = "deadline"
"""The call did not finish within ``timeout_ms`` (the caller's remaining time): not retryable."""

KIND_STATUS_PREFIX: Final = "status:"
"""``status:NNN``: the entry raised a `SliceHttpError` (e.g. NotFound -> ``status:404``); ``error`` is its
message. Not retryable; the HTTP router answers with that status."""


def status_kind(status: int) -> str:
    """The response kind of an entry that answered with HTTP `status` (``status:404``)."""
    return f"{KIND_STATUS_PREFIX}{status}"


def kind_status(kind: str | None) -> int | None:
    """The HTTP status carried by a ``status:NNN`` kind, else None."""
    if kind is None or not kind.startswith(KIND_STATUS_PREFIX):
        return None
    try:
        n = int(kind[len(KIND_STATUS_PREFIX) :])
    except ValueError:
        return None
    return n if 400 <= n <= 599 else None


RETRYABLE_KINDS: Final = frozenset({KIND_NO_INSTANCE, KIND_OVERLOADED, KIND_SHUTTING_DOWN})


class InvokeRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=40):
    """Run `method` of `target` (full coordinates) on `payload` and answer with an `InvokeResponse`."""

    id: int
    target: str
    method: str
    payload: bytes
    request_id: str
    timeout_ms: int


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
