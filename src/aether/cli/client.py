"""The CLI's view of the management-API client: `aether.client.management` (public, documented in
docs/agent-api.md), plus what only the CLI needs: `client_for`, which turns a `--connect` value
into a client and finds the CA of a local cluster started with `aether cluster start --tls`
(docs/cluster-security.md, *HTTPS*).

The names the command modules import from here (`ManagementClient`, `ApiError`, `ApiUnreachable`,
...) are those of `aether.client.management`, re-exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from aether.client.management import (
    DEFAULT_CONNECT,
    DEFAULT_TIMEOUT,
    SERVER_DEADLINE,
    Answer,
    ApiError,
    ApiNoAnswer,
    ApiTlsError,
    ApiUnreachable,
    AsyncManagementClient,
    ManagementClient,
    ServerEvent,
    StreamLost,
    parse_connect,
    parse_target,
)
from aether.core.types import Address

__all__ = [
    "DEFAULT_CLUSTER_DIR",
    "DEFAULT_CONNECT",
    "DEFAULT_TIMEOUT",
    "SERVER_DEADLINE",
    "Answer",
    "ApiError",
    "ApiNoAnswer",
    "ApiTlsError",
    "ApiUnreachable",
    "AsyncManagementClient",
    "ManagementClient",
    "ServerEvent",
    "StreamLost",
    "client_for",
    "local_cluster_ca",
    "parse_connect",
    "parse_target",
]

DEFAULT_CLUSTER_DIR = ".aether/cluster"  # same as aether.cli.local_cluster.DEFAULT_DIR


def local_cluster_ca(address: Address, directory: str | Path = DEFAULT_CLUSTER_DIR) -> str | None:
    """The CA certificate of the local cluster recorded in `directory` if it was started with
    TLS (`aether cluster start --tls`) and has a node whose management API is at `address`."""
    path = Path(directory) / "cluster.json"
    try:
        doc: Any = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("tls_ca"), str) or not doc["tls_ca"]:
        return None
    host = str(doc.get("host", "")).strip("[]")
    nodes: list[Any] = doc["nodes"] if isinstance(doc.get("nodes"), list) else []
    if address.host.strip("[]") != host and not (
        address.host in ("localhost",) and host in ("127.0.0.1", "::1")
    ):
        return None
    if any(isinstance(n, dict) and n.get("management_port") == address.port for n in nodes):
        ca = doc["tls_ca"]
        return ca if Path(ca).is_absolute() else str(Path(directory) / ca)
    return None


def client_for(
    target: str,
    *,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cluster_dir: str | Path = DEFAULT_CLUSTER_DIR,
) -> ManagementClient:
    """A client for a `--connect` value. `https://` means HTTPS and `http://` plain HTTP; a bare
    HOST:PORT means HTTPS if it is a node of the local cluster in `cluster_dir` started with
    TLS, plain HTTP otherwise. Over HTTPS the certificate is verified against the system trust
    store and `ca` (default: that local cluster's CA, if the address is one of its nodes)."""
    scheme, address = parse_target(target)
    if scheme != "http":
        found = local_cluster_ca(address, cluster_dir)
        if scheme is None and found is not None:
            scheme = "https"
        if ca is None:
            ca = found
    return ManagementClient(address, api_key=api_key, timeout=timeout, https=scheme == "https", ca=ca)
