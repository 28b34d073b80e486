"""The artifact repository's errors; each answers an HTTP client with its status (docs/repository.md)."""

from __future__ import annotations

from aether.core.errors import StatusError

__all__ = [
    "ArtifactConflict",
    "ArtifactMissing",
    "HashMismatch",
    "RepositoryError",
    "RepositoryUnavailable",
    "UploadTooLarge",
]


class RepositoryError(StatusError):
    """Base class of the repository's errors (400 unless a subclass says otherwise)."""

    status = 400


class HashMismatch(RepositoryError):
    """The uploaded bytes do not hash to the sha256 the client declared (400)."""


class UploadTooLarge(RepositoryError):
    """The upload is larger than the repository accepts (413)."""

    status = 413


class ArtifactConflict(RepositoryError):
    """The version exists with other content, or other coordinates claim it (409)."""

    status = 409


class ArtifactMissing(RepositoryError):
    """No such project, version or file in the cluster's repository (404)."""

    status = 404


class RepositoryUnavailable(RepositoryError):
    """The wheel's bytes could not be read from or written to the cluster (503): too few copies
    reachable, no quorum. `retry_after` (seconds) when trying again soon is worth it (an upload
    that waited its bound for the map: a partition being taken over); it answers ``Retry-After``."""

    status = 503

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def http_headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
