"""The errors of the etcd client: each names the endpoint(s) involved and what to do about it.

Every error is an `aether.core.errors.AetherError` with an HTTP `status` (so `problem_for` answers
with it) and a short `kind` that callers match on instead of the class when they only have the
problem document (``etcd_unavailable``, ``etcd_compacted`` ...).
"""

from __future__ import annotations

from typing import ClassVar

from aether.core.errors import AetherError, BadRequest

__all__ = [
    "Compacted",
    "EtcdAuthFailed",
    "EtcdBadRequest",
    "EtcdError",
    "LeaseNotFound",
    "StoreUnavailable",
]


class EtcdError(AetherError):
    """An error etcd answered that has no more specific type (500: look at the etcd logs).

    `endpoint` is the etcd endpoint that answered (or was tried last), `code` the gRPC status code
    etcd gave (None when the failure was not an answer of etcd)."""

    status: int | None = 500
    kind: ClassVar[str] = "etcd_error"

    def __init__(self, message: str, *, endpoint: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.code = code


class StoreUnavailable(EtcdError):
    """No etcd endpoint answered within the deadline, or etcd has no quorum (503).

    `indeterminate` is True when a write was sent but its answer was lost: it may have been
    applied. Writes made with `EtcdClient.put_once` can be retried safely; others cannot."""

    status = 503
    kind: ClassVar[str] = "etcd_unavailable"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        code: int | None = None,
        indeterminate: bool = False,
    ) -> None:
        super().__init__(message, endpoint=endpoint, code=code)
        self.indeterminate = indeterminate

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class Compacted(EtcdError):
    """A watch (or a read at an old revision) asked for a revision etcd has compacted away: the
    caller must read everything again (a full resync) and watch from that read's revision + 1.

    `revision` is etcd's compaction revision: the oldest revision still readable."""

    status = 410
    kind: ClassVar[str] = "etcd_compacted"

    def __init__(self, revision: int, *, endpoint: str | None = None, requested: int | None = None) -> None:
        asked = f" (asked for revision {requested})" if requested is not None else ""
        super().__init__(
            f"etcd has compacted its history up to revision {revision}{asked}: "
            "read the whole prefix again and watch from that read's revision + 1",
            endpoint=endpoint,
            code=11,
        )
        self.revision = revision
        self.requested = requested


class EtcdBadRequest(EtcdError, BadRequest):
    """The request was invalid: an empty key, a value that is not bytes, a bad revision, or one etcd
    itself refused as an invalid argument (400). Not retryable: fix the input."""

    status = 400
    kind: ClassVar[str] = "etcd_bad_request"


class EtcdAuthFailed(EtcdError):
    """etcd refused the configured credentials (or requires some and none are configured), or the
    user lacks permission on the cluster's prefix: 503 for Aether's callers, since the node cannot
    use its store; the message says which setting to check."""

    status = 503
    kind: ClassVar[str] = "etcd_auth"


class LeaseNotFound(EtcdError):
    """The lease expired or was revoked (404): keys attached to it are gone; grant a new one."""

    status = 404
    kind: ClassVar[str] = "etcd_lease_not_found"

    def __init__(self, lease_id: int, *, endpoint: str | None = None) -> None:
        super().__init__(
            f"etcd lease {lease_id:x} has expired or was revoked (its keys are deleted): grant a new lease",
            endpoint=endpoint,
            code=5,
        )
        self.lease_id = lease_id
