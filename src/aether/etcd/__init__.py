"""etcd v3 as a cluster state store: the client (foundation of issue 20).

This package owns the conversation with etcd: `EtcdClient` (asyncio, over etcd's gRPC-gateway JSON
API with aiohttp) with typed results, compare-and-set as a transaction on ``mod_revision``,
exactly-once writes by request ids recorded in the same transaction (`put_once`), prefix watches
that resume from the last seen revision after a reconnect (`Compacted` when that revision is
gone), leases, failover between endpoints, TLS and username/password auth, and the typed errors
of all that (`aether.etcd.errors`). Every key of an Aether cluster lives under
``/aether/{cluster}/`` (data under ``kv/``, request-id records under ``requests/``).

`EtcdStore` (`aether.etcd.store`) is the etcd backend of the cluster state store interface
(`aether.kv.contract.ClusterStore`): a cache of the cluster's keys kept by one watch, exactly-once
writes, the same errors as the embedded Rabia store. The package sits in the layer above `aether.kv`
and imports only `aether.core`, `aether.kv.contract` and `aether.kv.keys` (never the Rabia backend).
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
from aether.etcd.store import EtcdStore
from aether.etcd.types import CasResult, EtcdConfig, KeyValue, Lease, OnceResult, RangeResult, WatchEvent

__all__ = [
    "CasResult",
    "Compacted",
    "EtcdAuthFailed",
    "EtcdBadRequest",
    "EtcdClient",
    "EtcdConfig",
    "EtcdError",
    "EtcdStore",
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
