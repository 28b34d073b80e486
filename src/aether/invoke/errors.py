"""Errors the invoker raises to its callers, and the mapping of exceptions to response kinds.

Owns `InvokeError` and its subclasses and `classify` (exception -> wire kind), shared by the
`Invoker` (local calls) and the `InvokeServer` (remote calls) so both report a failure the same way.
May import `aether.core` and `aether.invoke.messages` only.
"""

from __future__ import annotations

from aether.core.errors import AetherError, BadRequest, StatusError
from aether.invoke.messages import (
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_NO_INSTANCE,
    KIND_SHUTTING_DOWN,
    KIND_UNKNOWN_ENTRY,
    kind_status,
    status_kind,
)

__all__ = [
    "EndpointUnavailable",
    "InvokeBadRequest",
    "InvokeError",
    "InvokeTimeout",
    "InvokerClosed",
    "NotDeployed",
    "PoisonRequest",
    "SliceAppError",
    "UnknownEntryError",
    "classify",
    "describe_exception",
    "error_text",
]


class InvokeError(AetherError):
    """Base class of the invoker's errors; says which call failed and how.

    `kind` is the response kind (see `aether.invoke.messages`), `node` the node that reported it
    (None when no attempt reached a node), `request_id` the call's tracing id.
    """

    def __init__(
        self,
        message: str,
        *,
        target: str = "",
        method: str = "",
        kind: str | None = None,
        node: str | None = None,
        request_id: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.target = target
        self.method = method
        self.kind = kind
        self.node = node
        self.request_id = request_id
        self.attempts = attempts


class InvokeTimeout(InvokeError):
    """The call did not succeed before its deadline; the message names target, method, attempts and
    the last error. The outcome is indeterminate: an attempt may have run."""


class InvokeBadRequest(InvokeError, BadRequest):
    """The target rejected the payload (it does not decode into the entry's argument type, or the
    entry raised `BadRequest`); `detail` is the target's own message (what an HTTP client reads)."""

    detail: str = ""


class UnknownEntryError(InvokeError):
    """The target artifact has no entry point of that name."""


class SliceAppError(InvokeError):
    """The entry point raised; the message includes the exception type and text.

    When the entry raised a `SliceHttpError` (NotFound, Conflict, ...), `status` is its HTTP status
    and `detail` its message (what the HTTP router answers with); otherwise `status` is None.
    """

    status: int | None = None
    detail: str = ""


class NotDeployed(InvokeError, StatusError):
    """Nothing in the cluster's store knows the target (no blueprint names the artifact, no node
    hosts it) or its ACTIVE instances have no such entry; raised at once, without retrying (404)."""

    status = 404


class EndpointUnavailable(InvokeError, StatusError):
    """The target is deployed (a blueprint names it) but no instance of it is ACTIVE anywhere yet,
    or all of them FAILED; raised at once instead of waiting for the deadline (503).

    `retry_after` (seconds) is set while an instance is starting (worth retrying soon), and None
    when every instance FAILED (the message gives the reason)."""

    status = 503
    retry_after: int | None = None


class PoisonRequest(InvokeError, StatusError):
    """Nodes went down (`Invoker.max_nodes_lost`, default 2) while running this call: it is not
    tried on more nodes, since the call itself may be what brings them down (502)."""

    status = 502


class InvokerClosed(InvokeError):
    """The invoker was closed (the node is stopping)."""


def _mro_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def classify(exc: BaseException) -> str:
    """The response kind for an exception raised by `LocalSlices.call`.

    ``NoLocalInstance`` -> no_instance, ``UnknownEntry`` -> unknown_entry, `BadRequest` ->
    bad_request (matched by class name along the MRO, so no import of the slices package is needed),
    anything else -> app_error. An `InvokeError` escaping an entry (a nested call it made failed) is
    the entry's own failure (app_error), except `InvokerClosed` (the node is stopping: shutting_down).
    """
    if isinstance(exc, InvokerClosed):
        return KIND_SHUTTING_DOWN
    if isinstance(exc, SliceAppError) and exc.status is not None:
        # A nested call answered with a status (e.g. 409) and the entry let it escape: same answer.
        return status_kind(exc.status)
    if isinstance(exc, InvokeError):
        # A nested call the entry made failed and the entry let it escape: the entry's own failure.
        return KIND_APP_ERROR
    names = _mro_names(exc)
    if isinstance(exc, StatusError):
        status = getattr(exc, "status", 500)
        return status_kind(status) if isinstance(status, int) and 400 <= status <= 599 else KIND_APP_ERROR
    if "NoLocalInstance" in names:
        return KIND_NO_INSTANCE
    if "UnknownEntry" in names or isinstance(exc, UnknownEntryError):
        return KIND_UNKNOWN_ENTRY
    if isinstance(exc, BadRequest):
        return KIND_BAD_REQUEST
    return KIND_APP_ERROR


def error_text(exc: BaseException, kind: str) -> str:
    """The ``error`` text of a response of `kind`: the bare message for ``status:NNN`` kinds (it is
    what the HTTP client reads), else ``"TypeName: text"``."""
    if kind_status(kind) is not None:
        return exc.detail if isinstance(exc, SliceAppError) else str(exc)
    if kind == KIND_BAD_REQUEST:
        return str(exc) or type(exc).__name__  # it names the field and the problem
    return describe_exception(exc)


def describe_exception(exc: BaseException) -> str:
    """``"TypeName: text"`` (or just the type name when the text is empty)."""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
