"""Typed status values a node reports through the management API."""

from __future__ import annotations

import msgspec


class MemberStatus(msgspec.Struct, frozen=True):
    """One configured cluster member as seen by the reporting node."""

    id: str
    address: str  # cluster address, HOST:PORT
    state: str  # "up" | "down" (self is always "up")


class NodeStatus(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/status`."""

    node_id: str
    leader: str | None
    quorum: bool
    nodes: list[MemberStatus]
    applied_slot: int = 0
    management_port: int = 0
    cluster_port: int = 0
    http_port: int = 0
    pid: int = 0


class KVEntry(msgspec.Struct, frozen=True):
    """One key of the replicated store, value decoded to JSON-able data."""

    key: str
    value: object
