"""Wire types of the management API that are not in `aether.core.status` (msgspec only).

Kept free of aiohttp so that clients (the CLI) can decode answers without importing the server.
"""

from __future__ import annotations

import msgspec

from aether.core.status import KVEntry


class KVListing(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/kv?prefix=P`."""

    prefix: str
    entries: list[KVEntry]


class Problem(msgspec.Struct, frozen=True):
    """An RFC 9457 problem document, the body of every error answer."""

    type: str
    title: str
    status: int
    detail: str
