"""Error types raised across layer boundaries."""

from __future__ import annotations


class AetherError(Exception):
    """Base class of every error Aether raises on purpose."""


class QuorumLost(AetherError):
    """A write could not be committed because this node cannot reach a quorum.

    The outcome of a request that failed this way is indeterminate: it may still commit
    later if its batch had already reached other nodes.
    """


class CommitTimeout(AetherError):
    """A write did not commit within its deadline (outcome indeterminate)."""


class NotReady(AetherError):
    """The node is still recovering or catching up and cannot serve this yet."""


class BadRequest(AetherError):
    """Input from outside failed validation; the message names the problem."""


class SessionConflict(AetherError):
    """The store refused a command because of its client session: the (client, seq) was already
    used for a different command, is below the session's last sequence, or continues a session
    the store no longer knows (expired from its session table).

    The outcome is known: this request was not applied. It is an internal error (a writer reused
    a session id, or lost track of its session), not a problem with the caller's input.
    """


class ConfigError(AetherError):
    """Node or cluster configuration is invalid; the message names the setting."""


class StatusError(AetherError):
    """An error that answers an HTTP client with `status` (class default or given) and its message.

    Slice code raises the `aether.slices` subclasses (`NotFound`, `Conflict`, ...); the invoker
    carries the status across nodes and the HTTP router answers with it.
    """

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            if not 400 <= status <= 599:
                raise ValueError(f"status must be an HTTP error status (400-599), not {status}")
            self.status = status


class Unauthorized(StatusError):
    """The request carries no valid credential (missing, malformed, unknown or revoked key): 401."""

    status = 401


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
