"""`ClusterFigures`: what one node knows of the cluster at scrape time (membership, leader, consensus,
maps, slice lifecycle, routes), for the Prometheus exposition (`aether.metrics.prometheus`).

The node fills it from its components when `/metrics` is scraped (`MetricsService.cluster`): the
components keep plain counters (the consensus engine's ``stats``, the runner's commit-latency
`Histogram`, the leader manager's ``changes``) and nothing here runs on their hot paths. It is a
value read once per scrape, never sent between nodes.
"""

from __future__ import annotations

import msgspec

__all__ = ["ClusterFigures", "MapFigures"]


class MapFigures(msgspec.Struct, frozen=True):
    """One distributed map on this node (`MapCore.local_stats`)."""

    map: str
    entries: int
    bytes: int
    primary_partitions: int
    replica_partitions: int
    syncing_partitions: int
    pending_acks: int
    """Replication messages this node (as primary) sent and got no acknowledgement for yet."""
    replication_lag_seconds: float
    """Age of the oldest of them (0 when none): how far the replicas are behind."""
    retries: dict[str, int] = {}
    """Attempts of this node's callers' operations after one that got no answer, by why
    (`aether.maps.core.RETRY_REASONS`: timeout, refused, unreachable), since the node started."""


class ClusterFigures(msgspec.Struct, frozen=True):
    """One node's view of the cluster, read at scrape time."""

    members: int
    """Members of the member set in effect, as this node knows it."""
    reachable_members: int
    """Members this node reaches now, itself included."""
    quorum: bool
    """This node reaches a majority of the members (writes can commit)."""
    is_leader: bool
    leader_changes: int
    """How often the leader this node sees changed since it started."""
    slots: int
    """Consensus slots this node applied since it started (null slots included)."""
    null_slots: int
    commands: int
    """Commands in the slots it applied."""
    applied_slot: int
    commit_buckets: list[tuple[float, int]]
    """The commit-latency histogram: cumulative ``(upper bound s, count)``, the last bound ``inf``."""
    commit_seconds: float
    """The sum of the commit latencies."""
    slices: dict[str, int]
    """Slices on this node per lifecycle state (every state, zeros included)."""
    routes: int
    """HTTP routes in this node's route table."""
    maps: list[MapFigures] = []
    invoke: dict[str, int] = {}
    """The invoker's counters since the node started (`InvokerStats.as_dict`: calls, succeeded,
    failed, attempts, local_attempts, remote_attempts, retries, indeterminate, skipped_open)."""
