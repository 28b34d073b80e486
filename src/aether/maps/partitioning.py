"""Keys to partitions and partitions to nodes (sans-IO).

A key's partition is ``crc32(utf-8 key) % partitions``. The owners of a partition are all live
members ranked by rendezvous (highest random weight) hashing of ``(partition, node)``: removing a
node only promotes the next-ranked node in the partitions it owned, and adding one only moves the
partitions where it ranks high, so a change moves about ``1/n`` of the ownership.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence

import msgspec

from aether.core.maps import PartitionTable

__all__ = [
    "DEFAULT_PARTITIONS", "activate", "active_owners", "owners_for", "partition_of", "plan_table", "rank",
]

DEFAULT_PARTITIONS = 1024


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


def _weight(partition: int, node: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{partition}|{node}".encode(), digest_size=8).digest(), "big")


def rank(partition: int, members: Sequence[str]) -> list[str]:
    """`members` ordered by rendezvous weight for `partition` (ties by name, for determinism)."""
    return sorted(members, key=lambda n: (-_weight(partition, n), n))


def plan_table(
    previous: PartitionTable | None, live: Sequence[str], partitions: int = DEFAULT_PARTITIONS
) -> PartitionTable | None:
    """The table for the `live` nodes, or None when `previous` already describes them."""
    members = sorted(set(live))
    if not members:
        return None
    if previous is not None and previous.members == members and previous.partitions == partitions:
        return None
    index = {m: i for i, m in enumerate(members)}
    owners = [[index[n] for n in rank(p, members)] for p in range(partitions)]
    version = previous.version + 1 if previous is not None else 1
    active = [0] * partitions
    configs: dict[int, list[str]] = {}
    if previous is not None and len(previous.active) == partitions:
        active = list(previous.active)
        configs = {v: previous.configs[v] for v in set(active) if v in previous.configs}
    activations = previous.activations if previous is not None else 0
    forced = list(previous.forced) if previous is not None and len(previous.forced) == partitions else []
    return PartitionTable(version, partitions, members, owners, active, configs, activations, forced)


def activate(table: PartitionTable, parts: Iterable[int], forced: Iterable[int] = ()) -> PartitionTable:
    """`table` with its own version recorded as the active configuration of `parts`, and as the
    last forced takeover (`PartitionTable.forced`) of those of them in `forced`."""
    active = list(table.active) if len(table.active) == table.partitions else [0] * table.partitions
    for p in parts:
        active[p] = table.version
    configs = dict(table.configs)
    configs[table.version] = list(table.members)
    configs = {v: configs[v] for v in set(active) if v in configs}
    marked = list(table.forced)
    for p in forced:
        if len(marked) != table.partitions:
            marked = [0] * table.partitions
        marked[p] = table.version
    return msgspec.structs.replace(
        table, active=active, configs=configs, activations=table.activations + 1, forced=marked
    )


def active_owners(table: PartitionTable, partition: int, replicas: int) -> list[str] | None:
    """The owners of `partition` in its active configuration (None: it was never taken over)."""
    if len(table.active) != table.partitions:
        return None
    version = table.active[partition]
    members = table.configs.get(version)
    if not version or not members:
        return None
    return rank(partition, members)[: max(1, min(replicas, len(members)))]


def owners_for(table: PartitionTable, partition: int, replicas: int) -> list[str]:
    """The nodes holding `partition` of a map with `replicas` copies (primary first; capped by size)."""
    ranked = table.owners[partition]
    return [table.members[i] for i in ranked[: max(1, min(replicas, len(ranked)))]]
