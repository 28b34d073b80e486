"""Topology events a `Transport` publishes on its `EventBus`.

These are in-process values, never sent over the wire. Subscribe to `TransportEvent` to get all
of them, or to one concrete class.
"""

from __future__ import annotations

import msgspec

__all__ = ["DuplicateNode", "PeerDown", "PeerUp", "QuorumChanged", "TransportEvent"]


class TransportEvent(msgspec.Struct, frozen=True):
    """Base class of every transport event."""


class PeerUp(TransportEvent, frozen=True):
    """Our link to `node_id` is established and the peer is alive."""

    node_id: str


class PeerDown(TransportEvent, frozen=True):
    """`node_id` stopped being up; `reason` says why (link lost, heartbeat timeout, removed, ...)."""

    node_id: str
    reason: str


class QuorumChanged(TransportEvent, frozen=True):
    """`Transport.has_quorum()` flipped. `up` is the set of up peers (this node excluded)."""

    has_quorum: bool
    up: frozenset[str]


class DuplicateNode(TransportEvent, frozen=True):
    """Members keep refusing this node's hello because its id is already running in the cluster, as
    another process at the member's address (`messages.DUPLICATE_NODE`): this process is a second
    one with that id and must stop. `refused_by` is the member that said so last, `reason` its words."""

    refused_by: str
    reason: str
