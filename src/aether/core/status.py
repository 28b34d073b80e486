"""Typed status values a node reports through the management API."""

from __future__ import annotations

import msgspec


class MemberStatus(msgspec.Struct, frozen=True):
    """One configured cluster member as seen by the reporting node."""

    id: str
    address: str  # cluster address, HOST:PORT
    state: str  # "up" | "down" (self is always "up"); "unknown" on a joining node (not linked yet)
    management: str | None = None  # [https://]HOST:PORT of its management API, as it published it
    http: str | None = None  # [https://]HOST:PORT of its HTTP router


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
    # what `aether doctor` compares with the store (absent on older nodes):
    # ACTIVE instance ids accepting calls on this node, per artifact coordinates
    local_instances: dict[str, list[int]] = {}
    # largest event-loop lag in the last 10 s, milliseconds (`aether.node.looplag`)
    loop_lag_max_ms: float | None = None
    # the consensus journal failed (the replica stopped writing): the error, else None
    journal_error: str | None = None
    # writes through consensus by this node: failures since start, and the last failure
    # (seconds ago, error) unless a write succeeded after it
    store_write_failures: int = 0
    store_write_failing_for: float | None = None
    store_write_error: str | None = None
    # slice event loops found blocked past the limit since start (each also a `slice-blocked` event)
    slice_blocks: int = 0
    # the cluster state store: "rabia" (embedded) or "etcd", with the etcd endpoints, and why it
    # cannot take writes now (etcd unreachable or without quorum), else None (`aether doctor`)
    store: str = "rabia"
    store_endpoints: list[str] = []
    store_error: str | None = None
    # why this node takes part in no decision, else None: joining (`--join`, not added yet: its
    # `nodes` are then the members it was told, state "unknown", without itself) or removed
    not_member: str | None = None


class KVEntry(msgspec.Struct, frozen=True):
    """One key of the replicated store, value decoded to JSON-able data."""

    key: str
    value: object
