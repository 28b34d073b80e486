"""`aether.client`: the Python client libraries of a cluster.

`AetherClient` (`aether.client.client`) is the client of the replicated store: an external
program connects to any node's cluster port and reads/writes keys; the client fails over to the
next node at once when its node dies and retries pending requests there. Each request carries a
session (client id, sequence), so a retried write takes effect at most once.

`ManagementClient` and `AsyncManagementClient` (`aether.client.management`) are the typed clients
of a node's management API (HTTP/JSON, docs/agent-api.md); the `aether` command uses them.

May import `aether.core`, `aether.transport`, `aether.kv` (messages and key types) and the status
types of `aether.deploy` (the management client's answers). The names are imported on first use,
so importing one client does not import the other's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aether.client.client import AetherClient
    from aether.client.management import (
        ApiError,
        ApiNoAnswer,
        ApiTlsError,
        ApiUnreachable,
        AsyncManagementClient,
        ManagementClient,
        StreamLost,
    )

__all__ = [
    "AetherClient",
    "ApiError",
    "ApiNoAnswer",
    "ApiTlsError",
    "ApiUnreachable",
    "AsyncManagementClient",
    "ManagementClient",
    "StreamLost",
]


def __getattr__(name: str) -> Any:
    if name == "AetherClient":
        from aether.client.client import AetherClient

        return AetherClient
    if name in __all__:
        from aether.client import management

        return getattr(management, name)
    raise AttributeError(f"module 'aether.client' has no attribute {name!r}")
