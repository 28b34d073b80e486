"""Distributed map vocabulary shared by slices (the API) and `aether.maps` (the implementation).

Owns `MapSpec` (a map's replication and storage settings, as stored under `maps/defs/{name}`),
the validation of map names and keys, and the map errors slice code may catch. Imports only
`aether.core.errors` and msgspec.
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

from aether.core.errors import AetherError, BadRequest, StatusError

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_CAS_BYTES",
    "MAX_KEY_BYTES",
    "MAX_TTL",
    "MapContention",
    "MapDefinitionConflict",
    "MapError",
    "MapKeyError",
    "MapSpec",
    "MapTtlError",
    "MapUnavailable",
    "MapValueDecodeError",
    "MapValueTooLarge",
    "MapValueTypeError",
    "PartitionTable",
    "StorageEngine",
    "UnknownMap",
    "check_key",
    "check_map_name",
]

StorageEngine = Literal["memory", "log", "sqlite"]
MAX_KEY_BYTES: Final = 1024
MAX_TTL: Final = 10 * 365 * 24 * 3600.0
"""The longest `ttl` a write may give, in seconds (ten years)."""
DEFAULT_MAX_VALUE_BYTES: Final = 1024 * 1024
MAX_VALUE_BYTES_LIMIT: Final = 8 * 1024 * 1024
"""Values travel in one transport frame (16 MiB at most)."""
MAX_CAS_BYTES: Final = 16 * 1024 * 1024 - 64 * 1024
"""A compare-and-set carries its expected and its new value in one message between nodes (16 MiB
at most, with its key and the map's name): together they may not exceed this (two values at
`MAX_VALUE_BYTES_LIMIT` do)."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")


class MapError(AetherError):
    """Base class of the distributed map's errors."""


class UnknownMap(MapError):
    """No map of that name is defined in the cluster (HTTP 404)."""

    status = 404


class MapDefinitionConflict(MapError, StatusError):
    """A map of that name already exists with different settings (HTTP 409)."""

    status = 409


class MapKeyError(MapError, BadRequest):
    """A key is empty, not a string, not encodable as UTF-8 (a lone surrogate), or longer than
    `MAX_KEY_BYTES` (UTF-8)."""


class MapTtlError(MapError, BadRequest):
    """A `ttl` that is not a number of seconds above 0 and at most `MAX_TTL` (ten years)."""


class MapValueTooLarge(MapError, BadRequest):
    """An encoded value is larger than the map's `max_value_bytes`."""


class MapValueDecodeError(MapError):
    """A stored value does not decode as the type the caller asked for."""


class MapValueTypeError(MapError):
    """A value slice code writes is not of the map's type (`Slice.map(name, Type)`): refused before
    it is stored, where every later read of the key would fail `MapValueDecodeError`."""


class MapUnavailable(MapError, StatusError):
    """The partition's primary or a write quorum could not be reached in time (HTTP 503).

    The outcome of a write that failed this way is indeterminate."""

    status = 503


class MapContention(MapError, StatusError):
    """A compare-and-set loop (`SliceMap.update`, defining or removing a map) kept losing to other
    writers (HTTP 503)."""

    status = 503


class MapSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one map is replicated and stored.

    `replicas` copies of every key (primary included) and `write_quorum` acknowledgements before a
    write returns; both are capped by the number of live nodes. `engine` is ``memory``, ``log``
    or ``sqlite`` (both persistent, in the node's data directory; see `aether.maps.storage`).
    """

    replicas: int = 3
    write_quorum: int = 2
    engine: StorageEngine = "memory"
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES

    def validate(self, name: str) -> MapSpec:
        check_map_name(name)
        if not 1 <= self.replicas <= 9:
            raise BadRequest(f"map {name!r}: replicas must be between 1 and 9, not {self.replicas}")
        if not 1 <= self.write_quorum <= self.replicas:
            raise BadRequest(
                f"map {name!r}: write_quorum must be between 1 and replicas ({self.replicas}), "
                f"not {self.write_quorum}"
            )
        if not 1 <= self.max_value_bytes <= MAX_VALUE_BYTES_LIMIT:
            raise BadRequest(
                f"map {name!r}: max_value_bytes must be between 1 and {MAX_VALUE_BYTES_LIMIT}, "
                f"not {self.max_value_bytes}"
            )
        return self

    def describe(self) -> str:
        """Every setting, as error messages name them (`replicas=3 write_quorum=2 engine=log
        max_value_bytes=1048576`)."""
        return (
            f"replicas={self.replicas} write_quorum={self.write_quorum} engine={self.engine} "
            f"max_value_bytes={self.max_value_bytes}"
        )


class PartitionTable(msgspec.Struct, frozen=True):
    """Partition -> owners, as stored under `maps/table` and recomputed by the leader.

    `members` are the live nodes the table was computed for; `owners[p]` ranks all of them (as
    indexes into `members`) for partition `p`: the first is the primary, the next `replicas - 1`
    hold the replicas of a map with that replica count. `version` grows by one per change; a
    primary's writes carry the version at which it took the partition over (its epoch), which
    fences writes of a deposed primary.

    `active[p]` is the version whose owners of `p` hold its data: the last version at which a
    primary finished taking `p` over (0: never), and `configs` the members of every version
    `active` names. A primary taking over copies from the owners of that configuration, and
    records its own version there (a compare-and-set of this table, which fails once a newer
    table exists) before it serves. The leader carries both over to each new table.
    """

    version: int
    partitions: int
    members: list[str]
    owners: list[list[int]]
    active: list[int] = []
    configs: dict[int, list[str]] = {}
    activations: int = 0
    """How many takeovers were recorded in the table so far (each is one write of it)."""
    forced: list[int] = []
    """`forced[p]`: the version of the last takeover of `p` that went on without owners of the
    configuration before it (they left `force_after` ago: a split's minority side, a node down
    for longer; or none had a copy that counts), 0: none. Their copies, holding only
    configurations older than it and not distrusted since, may hold writes it went on without: a
    later takeover merges their newer records (`aether.maps.core`). Empty: none, or a table an
    earlier version wrote. The leader carries it over to each new table."""

    def ranking(self, partition: int) -> list[str]:
        return [self.members[i] for i in self.owners[partition]]

    def primary(self, partition: int) -> str:
        return self.members[self.owners[partition][0]]


def check_map_name(name: object) -> str:
    """`name` if it is a valid map name (lowercase letters, digits, `_.-`, at most 63), else BadRequest."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BadRequest(
            f"invalid map name {name!r}: use 1-63 lowercase letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_key(map_name: str, key: object) -> str:
    """`key` if it is a usable map key, else `MapKeyError` naming the map and the problem."""
    if not isinstance(key, str):
        raise MapKeyError(f"map {map_name!r}: keys are strings, not {type(key).__name__}")
    if not key:
        raise MapKeyError(f"map {map_name!r}: the key is empty")
    if key.isascii():
        size = len(key)
    else:
        try:
            size = len(key.encode())
        except UnicodeEncodeError as e:  # a lone surrogate ('\udc80'): no UTF-8 form to store or send
            raise MapKeyError(
                f"map {map_name!r}: the key has a lone surrogate {key[e.start]!r} at index {e.start}, "
                "which UTF-8 cannot encode (keys are stored as UTF-8)"
            ) from None
    if size > MAX_KEY_BYTES:
        raise MapKeyError(f"map {map_name!r}: key of {size} bytes is longer than {MAX_KEY_BYTES} bytes")
    return key
