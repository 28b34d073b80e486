"""Wire types of the management API that are not in `aether.core.status` (msgspec only).

Kept free of aiohttp so that clients (the CLI) can decode answers without importing the server.
"""

from __future__ import annotations

import msgspec

from aether.core.problem import Problem
from aether.core.status import KVEntry

__all__ = ["KVListing", "Problem"]


class KVListing(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/kv?prefix=P`."""

    prefix: str
    entries: list[KVEntry]
