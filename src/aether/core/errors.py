"""Error types raised across layer boundaries, and what each one answers.

Every error says where it is defined how it is reported (like h11's `error_status_hint`):

- `status`: the HTTP status it answers with (None: an unexpected failure, answered 500 with a generic
  detail and logged with its traceback). `aether.core.problem.problem_for` turns any exception into
  the problem document the HTTP router, the management API and the CLI all use.
- `wire_kind`: the kind of the invoke response when the error escapes a slice entry (one of the
  `WireKind` values below); a `StatusError` travels as ``status:NNN`` instead, so the caller's
  router answers with the same status. `response_kind()` gives the kind of one error, and
  `wire_kind_of` that of any exception.
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal

__all__ = [
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
    "AetherError",
    "BadRequest",
    "CommitTimeout",
    "ConfigError",
    "Forbidden",
    "NotReady",
    "Overloaded",
    "QuorumLost",
    "RequestTimeout",
    "SessionConflict",
    "StatusError",
    "Unauthorized",
    "WireKind",
    "kind_status",
    "status_kind",
    "wire_kind_of",
]

# -- the kinds of an invoke response (aether.invoke.messages re-exports them) -----------------------

WireKind = Literal[
    "no_instance", "bad_request", "unknown_entry", "app_error", "overloaded", "shutting_down", "deadline",
    "injected_fault", "indeterminate", "interrupted",
]
"""The fixed kinds of a failed invoke response; ``status:NNN`` (see `status_kind`) is the other form."""

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

KIND_INJECTED_FAULT: Final = "injected_fault"
"""The call failed on purpose: a fault injected on the instance (management API ``/api/v1/faults``,
nodes started with ``--fault-injection``, for Aether Forge and tests): not retryable, like app_error."""

KIND_INDETERMINATE: Final = "indeterminate"
"""The entry let an `IndeterminateOutcome` of a call it made escape: a call to an entry that is not
idempotent may or may not have taken effect. Not retryable (retrying the entry would repeat that
call); the caller gets `IndeterminateOutcome` too (docs/invocation.md)."""

KIND_INTERRUPTED: Final = "interrupted"
"""The executing node stopped the call while it ran (its invoke server's `stop` gave up waiting):
it may have partly run. Retried elsewhere only when the entry is idempotent."""

KIND_STATUS_PREFIX: Final = "status:"
"""``status:NNN``: the entry raised an error with an HTTP status (e.g. NotFound -> ``status:404``);
``error`` is its message. Not retryable; the HTTP router answers with that status."""


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


def _is_error_status(status: object) -> bool:
    return isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599


def wire_kind_of(exc: BaseException) -> str:
    """The invoke response kind of `exc` escaping an entry: its `response_kind()` (an `AetherError`),
    else its `wire_kind` attribute, else ``app_error``. Duck-typed, so errors of any layer (and test
    doubles) declare theirs without this module knowing them."""
    if isinstance(exc, AetherError):
        return exc.response_kind()
    kind = getattr(exc, "wire_kind", KIND_APP_ERROR)
    return kind if isinstance(kind, str) else KIND_APP_ERROR


# -- the errors ---------------------------------------------------------------------------------------


class AetherError(Exception):
    """Base class of every error Aether raises on purpose.

    `status` is the HTTP status it answers with; None (the default) means it has no answer of its own
    and is an internal failure (500, generic detail, logged with the traceback). `wire_kind` is its
    invoke response kind (`response_kind()` may refine it per instance: ``status:NNN``).
    """

    status: int | None = None
    wire_kind: ClassVar[WireKind] = KIND_APP_ERROR

    def response_kind(self) -> str:
        """The kind of the invoke response when this error escapes a slice entry."""
        return self.wire_kind

    def http_headers(self) -> dict[str, str]:
        """Headers to send with the error's answer (``Retry-After``, ``WWW-Authenticate``...)."""
        return {}


class QuorumLost(AetherError):
    """A write could not be committed because this node cannot reach a quorum (503).

    The outcome of a request that failed this way is indeterminate: it may still commit
    later if its batch had already reached other nodes.
    """

    status = 503


class CommitTimeout(AetherError):
    """A write did not commit within its deadline (outcome indeterminate): 504."""

    status = 504


class NotReady(AetherError):
    """The node is still recovering or catching up and cannot serve this yet (503)."""

    status = 503


class Overloaded(AetherError):
    """Too many calls: the callee refused this one at once rather than queue it (503, kind
    overloaded: the invoker tries another instance). Answered with ``Retry-After`` (`retry_after`
    seconds, default 1)."""

    status = 503
    wire_kind: ClassVar[WireKind] = KIND_OVERLOADED
    retry_after: int | None = 1

    def http_headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class BadRequest(AetherError):
    """Input from outside failed validation; the message names the problem (400, kind bad_request)."""

    status = 400
    wire_kind: ClassVar[WireKind] = KIND_BAD_REQUEST


class TooLarge(BadRequest):
    """Input larger than a limit the message names (413, kind bad_request): not applied, and
    retrying it unchanged fails the same way."""

    status = 413


class SessionConflict(AetherError):
    """The store refused a command because of its client session: the (client, seq) was already
    used for a different command, is below the session's last sequence, or continues a session
    the store no longer knows (expired from its session table).

    The outcome is known: this request was not applied. It is an internal error (a writer reused
    a session id, or lost track of its session), not a problem with the caller's input: 500, with
    its message (it says the request was not applied).
    """

    status = 500


class ConfigError(AetherError):
    """Node or cluster configuration is invalid; the message names the setting."""


class StatusError(AetherError):
    """An error that answers an HTTP client with `status` (class default or given) and its message.

    Slice code raises the `aether.slices` subclasses (`NotFound`, `Conflict`, ...); the invoker
    carries the status across nodes (kind ``status:NNN``) and the HTTP router answers with it.
    """

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            if not 400 <= status <= 599:
                raise ValueError(f"status must be an HTTP error status (400-599), not {status}")
            self.status = status

    def response_kind(self) -> str:
        return status_kind(self.status) if _is_error_status(self.status) else KIND_APP_ERROR


class Unauthorized(StatusError):
    """The request carries no valid credential (missing, malformed, unknown or revoked key): 401."""

    status = 401

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="aether"'}


class Forbidden(StatusError):
    """The credential is valid but its role does not allow the operation: 403. `required_role`
    names the role the operation needs."""

    status = 403

    def __init__(self, message: str, *, required_role: str) -> None:
        super().__init__(message)
        self.required_role = required_role


class RequestTimeout(StatusError):
    """The client did not send its request (body) in time: 408."""

    status = 408
