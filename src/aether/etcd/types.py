"""The typed values of the etcd client: its configuration and the results of its operations
(`msgspec.Struct`), and the structs that decode etcd's gRPC-gateway JSON answers.

Keys given to and returned by the client are *relative*: the client stores them under
``/aether/{cluster}/kv/`` (see `EtcdConfig.cluster`). Values are bytes.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

import msgspec

from aether.core.config import ETCD_CLUSTER_NAME
from aether.core.errors import ConfigError

__all__ = [
    "CasResult",
    "EtcdConfig",
    "KeyValue",
    "Lease",
    "OnceResult",
    "RangeResult",
    "WatchEvent",
]



class EtcdConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where etcd is and how to talk to it. Invalid settings raise `ConfigError` naming the setting.

    `endpoints`: the client URLs of the etcd members (``http://host:2379`` or ``https://...``); the
    client fails over between them. `cluster`: the Aether cluster's name; all its keys live under
    ``/aether/{cluster}/`` so several clusters can share one etcd. `username`/`password`: etcd
    authentication (both or neither). `ca_file`: the CA that signed etcd's server certificates
    (https endpoints); `cert_file`/`key_file`: this client's certificate for etcd's
    ``--client-cert-auth``. `request_timeout`: the deadline of one operation, retries over the
    endpoints included; `attempt_timeout`: how long one endpoint gets before the next is tried.
    """

    endpoints: tuple[str, ...]
    cluster: str = "aether"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    request_timeout: float = 5.0
    attempt_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("etcd endpoints: give at least one (e.g. http://127.0.0.1:2379)")
        for url in self.endpoints:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(
                    f"etcd endpoint {url!r}: expected http://HOST:PORT or https://HOST:PORT (no path)"
                )
        if not ETCD_CLUSTER_NAME.match(self.cluster):
            raise ConfigError(
                f"etcd cluster name {self.cluster!r}: 1-63 letters, digits, '.', '_' or '-' "
                "(it becomes the key prefix /aether/NAME/)"
            )
        if (self.username is None) != (self.password is None):
            raise ConfigError("etcd username and password: give both or neither")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("etcd client certificate: give both cert_file and key_file, or neither")
        if self.request_timeout <= 0 or self.attempt_timeout <= 0:
            raise ConfigError("etcd request_timeout and attempt_timeout must be positive")

    @property
    def root(self) -> str:
        """The prefix of every key of this cluster: ``/aether/{cluster}/``."""
        return f"/aether/{self.cluster}/"


class KeyValue(msgspec.Struct, frozen=True):
    """One key as etcd holds it: `mod_revision` is the revision of its last write (what
    `compare_and_set` compares), `version` counts its writes since creation, `lease` is 0 when none."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class RangeResult(msgspec.Struct, frozen=True):
    """The keys under a prefix (sorted by key) as of store `revision`: watch from ``revision + 1``
    to see every later change exactly once."""

    items: list[KeyValue]
    revision: int


class CasResult(msgspec.Struct, frozen=True):
    """What `compare_and_set` did: `succeeded`, the store `revision` after it, and on failure the
    key's `current` value (None when it does not exist)."""

    succeeded: bool
    revision: int
    current: KeyValue | None = None


class OnceResult(msgspec.Struct, frozen=True):
    """What `put_once` did: ``applied`` (written now, at `revision`), ``duplicate`` (the request id
    was already recorded: the write happened before, at `revision`; nothing written now) or
    ``conflict`` (the key's mod_revision was not the expected one: nothing written; `current` holds
    the key, `revision` the store's revision)."""

    outcome: Literal["applied", "duplicate", "conflict"]
    revision: int
    current: KeyValue | None = None


class WatchEvent(msgspec.Struct, frozen=True):
    """A change under a watched prefix: ``put`` (with the new `value`) or ``delete`` (value empty);
    `mod_revision` is the revision of the change (events arrive in revision order)."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0  # of the key a put wrote (when it came from absent: `mod_revision`)


class Lease(msgspec.Struct, frozen=True):
    """An etcd lease: keys written with it are deleted when it expires (`ttl` seconds without a
    keepalive) or is revoked."""

    id: int
    ttl: int


# -- etcd's gRPC-gateway JSON (proto3 JSON: int64 as strings, bytes as base64, defaults omitted) ------


class WireHeader(msgspec.Struct):
    revision: int = 0
    member_id: int = 0


class WireKV(msgspec.Struct):
    key: bytes = b""
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


class WireError(msgspec.Struct):
    error: str = ""
    message: str = ""
    code: int = 0


class WireRange(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)
    kvs: list[WireKV] = msgspec.field(default_factory=list)
    count: int = 0
    more: bool = False


class WirePut(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)


class WireDelete(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)
    deleted: int = 0


class WireResponseOp(msgspec.Struct):
    response_range: WireRange | None = None
    response_put: WirePut | None = None
    response_delete_range: WireDelete | None = None


class WireTxn(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)
    succeeded: bool = False
    responses: list[WireResponseOp] = msgspec.field(default_factory=list)


class WireEvent(msgspec.Struct):
    type: str = "PUT"
    kv: WireKV = msgspec.field(default_factory=WireKV)


class WireWatch(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)
    watch_id: int = 0
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: list[WireEvent] = msgspec.field(default_factory=list)


class WireWatchLine(msgspec.Struct):
    """One line of the /v3/watch stream: a result or an error."""

    result: WireWatch | None = None
    error: WireError | None = None


class WireLease(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)
    ID: int = 0
    TTL: int = 0


class WireKeepAlive(msgspec.Struct):
    result: WireLease | None = None
    error: WireError | None = None


class WireAuth(msgspec.Struct):
    header: WireHeader = msgspec.field(default_factory=WireHeader)
    token: str = ""
