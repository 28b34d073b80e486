"""Wire types of the management API that are not in `aether.core.status` (msgspec only).

Kept free of aiohttp so that clients (the CLI) can decode answers without importing the server.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from aether.core.problem import Problem
from aether.core.status import KVEntry

__all__ = [
    "Health", "KVListing", "KeyInfo", "KeyRevoked", "Live", "NewKey", "NodeEntry", "Problem", "Unready",
]


class KVListing(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/kv?prefix=P`."""

    prefix: str
    entries: list[KVEntry]


class Health(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/health` when the node is ready (has quorum)."""

    status: Literal["ok"]
    live: bool
    ready: bool
    node_id: str
    quorum: bool
    leader: str | None
    time: float


class Live(msgspec.Struct, frozen=True):
    """Answer of `GET /livez`: the process is alive."""

    status: Literal["ok"]
    live: bool
    node_id: str
    time: float


class Unready(msgspec.Struct, frozen=True):
    """A problem document extended with the health fields (`GET /api/v1/health`, 503)."""

    type: str
    title: str
    status: Literal[503]
    detail: str
    live: bool
    ready: Literal[False]
    reason: str
    node_id: str
    quorum: bool
    leader: str | None
    time: float


class NodeEntry(msgspec.Struct, frozen=True):
    """One configured member (`GET /api/v1/nodes`)."""

    id: str
    address: Annotated[str, msgspec.Meta(description="cluster HOST:PORT")]
    state: Literal["up", "down", "unknown"]  # unknown: as a joining node sees the members
    leader: bool
    management: Annotated[
        str | None, msgspec.Meta(description="its management API, [https://]HOST:PORT, as it published it")
    ] = None
    http: Annotated[str | None, msgspec.Meta(description="its HTTP router, [https://]HOST:PORT")] = None


class KeyInfo(msgspec.Struct, frozen=True):
    """A stored API key as `GET /api/v1/keys` lists it (never its hash or secret)."""

    name: str
    role: Literal["read", "operate", "admin"]
    created: float


class NewKey(msgspec.Struct, frozen=True):
    """Answer of `POST /api/v1/keys`: the key itself is shown this once."""

    name: str
    role: Literal["read", "operate", "admin"]
    created: float
    key: str


class KeyRevoked(msgspec.Struct, frozen=True):
    name: str
    revoked: Literal[True]
