"""Errors of the slice layer (definition, calls, packaging, loading, running).

Owns the exception types raised by `aether.slices`; imports only `aether.core.errors`.
Each error declares its HTTP `status` and invoke `wire_kind` (see `aether.core.errors`):
`BadRequest` and its subclasses -> 400 / bad_request, `UnknownEntry` -> 404 / unknown_entry,
`NoLocalInstance` -> 503 / no_instance, `InstanceStopping` -> 503 / shutting_down,
`InstanceOverloaded` -> 503 / overloaded (with
``Retry-After: 1``), `InjectedFault` -> 500 / injected_fault, a `SliceHttpError` -> its status /
``status:NNN``;
everything else is a server-side failure.
"""

from __future__ import annotations

from typing import ClassVar

from aether.core.errors import (
    KIND_INJECTED_FAULT,
    KIND_NO_INSTANCE,
    KIND_OVERLOADED,
    KIND_SHUTTING_DOWN,
    KIND_UNKNOWN_ENTRY,
    AetherError,
    BadRequest,
    Overloaded,
    StatusError,
    WireKind,
)


class SliceError(AetherError):
    """Base class of the slice layer's errors."""


class SliceDefinitionError(SliceError, TypeError):
    """A slice class, entry or route is declared wrongly; the message names class, method and problem."""


class EntryBadRequest(BadRequest):
    """A request payload does not fit the entry's request type.

    `entry` names the entry (`Class.method`), `field` the offending field path (e.g. `$.qty`)
    when the decoder reported one.
    """

    def __init__(self, message: str, *, entry: str, field: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry
        self.field = field


class UnknownEntry(SliceError):
    """The slice has no entry of that name (404, kind unknown_entry)."""

    status = 404
    wire_kind: ClassVar[WireKind] = KIND_UNKNOWN_ENTRY


class NoLocalInstance(SliceError):
    """No ACTIVE instance of the artifact on this node accepts calls (503, kind no_instance: the
    invoker retries on another node)."""

    status = 503
    wire_kind: ClassVar[WireKind] = KIND_NO_INSTANCE


class InstanceStopping(NoLocalInstance):
    """The artifact's instances on this node are draining (being deactivated or scaled away): they
    take no new calls (503, kind shutting_down: the invoker retries on another instance)."""

    wire_kind: ClassVar[WireKind] = KIND_SHUTTING_DOWN


class InstanceOverloaded(SliceError, Overloaded):
    """The instance runs `max_concurrency` calls and its queue holds `max_queue` more: the call is
    refused at once (503 with ``Retry-After: 1``, kind overloaded: the invoker tries another
    instance; docs/slices.md, *Concurrency limits*)."""

    status = 503
    wire_kind: ClassVar[WireKind] = KIND_OVERLOADED


class InjectedFault(SliceError):
    """A call to an instance failed on purpose: a fault injected on it (`SliceRuntime.inject_fault`,
    through the management API of a node started with ``--fault-injection``; Aether Forge and
    tests). 500, kind injected_fault (not retried: the instance failed, like an entry raising)."""

    status = 500
    wire_kind: ClassVar[WireKind] = KIND_INJECTED_FAULT


class SliceHttpError(SliceError, StatusError):
    """Raise from an entry to answer the caller with an HTTP status (4xx) and this message.

    The status travels with the error through remote calls and nested calls (a slice that lets a
    `Conflict` of a slice it called escape answers 409 too); the HTTP router answers with a problem
    document of that status whose ``detail`` is the message. Subclass it or pass `status`.
    """


class NotFound(SliceHttpError):
    """The thing the request names does not exist (404)."""

    status = 404


class Conflict(SliceHttpError):
    """The request conflicts with the current state, e.g. not enough stock (409)."""

    status = 409


class SliceCallError(SliceError):
    """A slice-to-slice call could not be encoded, sent or its answer decoded."""


class ResponseEncodeError(SliceError):
    """An entry returned a value that cannot be encoded as MessagePack."""


class ResponseTypeError(SliceError, StatusError):
    """An entry returned a value that does not fit its return annotation (HTTP 500: a bug of the
    slice, not of the caller). `entry`, `expected` and `actual` name the entry and the types."""

    status = 500

    def __init__(self, message: str, *, entry: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.entry = entry
        self.expected = expected
        self.actual = actual


class InvalidWheel(BadRequest):
    """A file is not a usable (slice or library) wheel; the message names the file and the problem."""


class WheelTooLarge(InvalidWheel):
    """A wheel would unpack to more bytes or files than the configured limit (a zip bomb guard);
    the message names the wheel, what it holds and the limit with the variable that sets it."""


class WheelRecordMismatch(InvalidWheel):
    """A wheel member is missing from its `RECORD` or does not match the hash (or size) recorded
    there: the wheel was changed after it was built. The message names the wheel and the member."""


class NotASliceWheel(InvalidWheel):
    """A wheel has no `aether.slices` entry point (it is a library wheel)."""


class ArtifactNotFound(SliceError):
    """The repository has no wheel for these coordinates; the message lists available versions."""


class SliceLoadError(SliceError):
    """A slice could not be loaded (missing artifact, library conflict, import failure, bad class)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SliceConflict(SliceLoadError):
    """The slice cannot share the node's interpreter: a library it needs conflicts with a version
    already loaded there, or its code's top-level module is already imported from another wheel
    (another version of the same slice). The runtime then runs it in a worker process."""


class SliceStartError(SliceError):
    """`start()` of an instance raised or timed out; `stop()` is not called for that instance."""

    def __init__(self, reason: str, *, instance: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.instance = instance


class SliceStateError(SliceError):
    """A SliceRuntime operation does not fit the artifact's current state (e.g. activate before load)."""
