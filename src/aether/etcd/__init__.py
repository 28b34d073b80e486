"""etcd v3 as a cluster state store: the client (foundation of issue 20).

This package owns the conversation with etcd: `EtcdClient` (asyncio, over etcd's gRPC-gateway JSON
API with aiohttp) with typed results, compare-and-set as a transaction on ``mod_revision``,
exactly-once writes by request ids recorded in the same transaction (`put_once`), prefix watches
that resume from the last seen revision after a reconnect (`Compacted` when that revision is
gone), leases, failover between endpoints, TLS and username/password auth, and the typed errors
of all that (`aether.etcd.errors`). Every key of an Aether cluster lives under
``/aether/{cluster}/`` (data under ``kv/``, request-id records under ``requests/``).

It sits beside `aether.kv` in the layers and imports only `aether.core`; the store interface that
puts `KVStore` and etcd behind one contract, and the node's wiring, build on it.
"""

from aether.etcd.client import EtcdClient, EtcdWatch, LeaseKeeper, WatchCursor, prefix_end
from aether.etcd.errors import (
    Compacted,
    EtcdAuthFailed,
    EtcdBadRequest,
    EtcdError,
    LeaseNotFound,
    StoreUnavailable,
)
from aether.etcd.types import CasResult, EtcdConfig, KeyValue, Lease, OnceResult, RangeResult, WatchEvent

__all__ = [
    "CasResult",
    "Compacted",
    "EtcdAuthFailed",
    "EtcdBadRequest",
    "EtcdClient",
    "EtcdConfig",
    "EtcdError",
    "EtcdWatch",
    "KeyValue",
    "Lease",
    "LeaseKeeper",
    "LeaseNotFound",
    "OnceResult",
    "RangeResult",
    "StoreUnavailable",
    "WatchCursor",
    "WatchEvent",
    "prefix_end",
]
