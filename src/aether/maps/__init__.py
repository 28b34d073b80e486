"""The distributed map (docs/maps.md): replicated application state for slices.

Modules:

- `partitioning` (sans-IO): key -> partition, the leader's partition table (rendezvous ranking of
  the live nodes, so a joining or leaving node moves only its share), owners per map.
- `records` (sans-IO): the stored record (value or tombstone, version, expiry), version order,
  the merge rule and the evaluation of one operation against the current record.
- `storage`: the storage engines behind one interface: `MemoryStorage` and `SqliteStorage` (WAL);
  `logstorage`: `LogStorage`, the map in memory and every commit appended to a file.
- `messages`: node-to-node wire messages (tags 50-59).
- `service`: `MapService`, one per node: serves operations for the partitions this node is
  primary of, replicates to the owners, answers replication, sync, key and stats requests, syncs a
  partition before serving it as a new primary, and re-replicates to new replicas.
  It is also the node's `MapBackend` for slices: it routes each operation to the partition's
  primary and retries while the table changes.

May import `aether.core`, `aether.kv.keys` and `aether.transport` events; never deploy, invoke,
http or api.
"""

from aether.maps.messages import MAP_MESSAGE_TYPES, MapMessage
from aether.maps.partitioning import partition_of, plan_table
from aether.maps.service import MapService

__all__ = ["MAP_MESSAGE_TYPES", "MapMessage", "MapService", "partition_of", "plan_table"]
