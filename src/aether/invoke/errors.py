"""Errors the invoker raises to its callers, and the mapping of exceptions to response kinds.

Owns `InvokeError` and its subclasses and `classify` (exception -> wire kind), shared by the
`Invoker` (local calls) and the `InvokeServer` (remote calls) so both report a failure the same way.
Each error declares its HTTP `status` and its `wire_kind` where it is defined (see
`aether.core.errors`); `aether.core.problem.problem_for` turns them into answers.
May import `aether.core` and `aether.invoke.messages` only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aether.core.errors import (
    AetherError,
    BadRequest,
    Overloaded,
    StatusError,
    WireKind,
    status_kind,
    wire_kind_of,
)
from aether.invoke.messages import (
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_INDETERMINATE,
    KIND_INTERRUPTED,
    KIND_NO_INSTANCE,
    kind_status,
)

__all__ = [
    "EndpointUnavailable",
    "IndeterminateOutcome",
    "InvokeBadRequest",
    "InvokeError",
    "InvokeOverloaded",
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

    A call that failed answers 502 (the failure is the callee's) unless a subclass says otherwise;
    escaping an entry (a nested call it made failed) it is that entry's own failure (app_error).
    """

    status: int | None = 502
    wire_kind: ClassVar[WireKind] = KIND_APP_ERROR

    def response_kind(self) -> str:
        return self.wire_kind  # not the `StatusError` status of a subclass: the entry's own failure

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
    the last error. The outcome is indeterminate: an attempt may have run.

    504, or 503 when its `kind` is ``no_instance`` (no ACTIVE instance could take the call: the last
    attempt found none, or there was none to try)."""

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = 503 if self.kind == KIND_NO_INSTANCE else 504


class InvokeBadRequest(InvokeError, BadRequest):
    """The target rejected the payload (it does not decode into the entry's argument type, or the
    entry raised `BadRequest`); `detail` is the target's own message (what an HTTP client reads): 400."""

    status = 400
    detail: str = ""


class UnknownEntryError(InvokeError):
    """The target artifact has no entry point of that name: 404, like `NotDeployed` (the other way
    the same absence is found)."""

    status = 404


class SliceAppError(InvokeError):
    """The entry point raised; the message includes the exception type and text.

    When the entry raised a `SliceHttpError` (NotFound, Conflict, ...), its `kind` is ``status:NNN``,
    `status` that HTTP status and `detail` its message (what the HTTP router answers with); otherwise
    `status` is 502 (the callee failed).
    """

    detail: str = ""

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        carried = kind_status(self.kind)
        if carried is not None:
            self.status = carried

    def response_kind(self) -> str:
        # a nested call answered with a status (e.g. 409) and the entry let it escape: same answer
        if kind_status(self.kind) is not None and self.status is not None:
            return status_kind(self.status)
        return KIND_APP_ERROR


class NotDeployed(InvokeError, StatusError):
    """Nothing in the cluster's store knows the target (no blueprint names the artifact, no node
    hosts it) or its ACTIVE instances have no such entry; raised at once, without retrying (404)."""

    status = 404


class EndpointUnavailable(InvokeError, StatusError):
    """The target is deployed (a blueprint names it) but no instance of it is ACTIVE anywhere yet,
    or all of them FAILED; raised at once instead of waiting for the deadline (503).

    `retry_after` (seconds, ``Retry-After``) is 1 in both cases: an instance is starting, or the
    cluster starts the FAILED ones again after their backoff (the message gives the reasons)."""

    status = 503
    retry_after: int | None = 1

    def http_headers(self) -> dict[str, str]:
        """``Retry-After`` (unless `retry_after` is None)."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InvokeOverloaded(InvokeError, Overloaded):
    """Every instance the call could go to refused it at once because its queue was full
    (`max_concurrency` and `max_queue` in the blueprint): 503 with ``Retry-After: 1``, raised after
    one round over the candidates instead of waiting for the deadline. Escaping an entry (a nested
    call), it answers that entry's caller 503 too (kind ``status:503``, not retried elsewhere: the
    capacity that is missing is the nested slice's)."""

    status = 503

    def response_kind(self) -> str:
        return status_kind(503)


class PoisonRequest(InvokeError, StatusError):
    """Nodes went down, or answered `interrupted` (the worker process running it died), while
    running this call, `Invoker.max_nodes_lost` times (default 2): it is not tried on more nodes,
    since the call itself may be what brings them down (502)."""

    status = 502


_EXPLAINED = "may or may not have taken effect"


class IndeterminateOutcome(InvokeError, StatusError):
    """A call to an entry declared ``idempotent=False`` failed after an attempt that may have
    reached it (the node running it went down, it did not answer within its timeout, or it was
    stopped mid-call): it may or may not have taken effect, and the invoker did not repeat it.
    502 (the callee's side failed; the client must find out or retry with the same idempotency
    key), kind ``indeterminate`` (also on the wire, when it escapes an entry: that entry's caller
    gets `IndeterminateOutcome` too and does not retry it, which would repeat the nested call).
    The message says so in words."""

    status = 502
    wire_kind: ClassVar[WireKind] = KIND_INDETERMINATE

    def __init__(self, message: str, *, key_given: bool = True, **kw: Any) -> None:
        # key_given False: the call's key was made up by the runtime (the client sent no
        # Idempotency-Key), so no retry can bring it again: "retry with the same header" was no advice
        if _EXPLAINED not in message:  # (a nested call's message explains it already)
            how = (
                "retry with the same Idempotency-Key header" if key_given
                else "this request carried no Idempotency-Key header, so a retry would be a new call "
                "to it: send one, the same on every retry"
            )
            message = (
                f"{message}; the call {_EXPLAINED} and was not repeated (an entry declared not "
                "idempotent is never run twice for one call); retrying is safe only where the entry "
                f"deduplicates by idempotency key: {how}"
            )
        super().__init__(message, **kw)

    def response_kind(self) -> str:
        return KIND_INDETERMINATE


class InvokerClosed(InvokeError):
    """The invoker was closed (the node is stopping): 503. Escaping an entry (a nested call found its
    node stopping), kind interrupted: the entry ran, perhaps in part, so its caller repeats it
    elsewhere only if it is idempotent."""

    status = 503
    wire_kind: ClassVar[WireKind] = KIND_INTERRUPTED


def classify(exc: BaseException) -> str:
    """The response kind for an exception raised by `LocalSlices.call`: what the exception declares
    (`aether.core.errors.wire_kind_of`). ``NoLocalInstance`` -> no_instance, ``UnknownEntry`` ->
    unknown_entry, `BadRequest` -> bad_request, a `StatusError` -> ``status:NNN``, anything else ->
    app_error. An `InvokeError` escaping an entry (a nested call it made failed) is the entry's own
    failure (app_error), except `InvokerClosed` (the node stopped it mid-run: interrupted) and a
    `SliceAppError` that carries a status (the same ``status:NNN``).
    """
    return wire_kind_of(exc)


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
