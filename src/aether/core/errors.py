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
