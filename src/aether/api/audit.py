"""The audit trail of a node's management API: every write operation it served.

A write is any request whose method is not GET or HEAD (deploy, scale, blueprints, maps,
invoke, keys, ...), refused ones (401, 403, 400) included. Each entry records who (key name or
None when no valid key was presented, remote address), what (method, path, and the target when
known: a path parameter such as a blueprint id, map or key name, or the `artifact`/`name` field
of a JSON body), when (Unix time) and the result (HTTP status).

Where: the newest `DEFAULT_CAPACITY` entries of this node in memory (`GET /api/v1/audit`,
`aether audit`), and one INFO log line per entry on the logger `aether.audit.NODE` (the durable
trail: ship the node log). Not in the replicated store: that would add a consensus write to
every audited request (an invoke through the API is one) and need its own bounded family and
garbage collection; the in-memory window is bounded by construction. Consequences: each node
shows the writes it served itself, and the window is empty after a restart (the log keeps all).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import msgspec

__all__ = ["DEFAULT_CAPACITY", "AuditEntry", "AuditLog", "target_of"]

DEFAULT_CAPACITY = 1000
_MAX_TARGET = 200


class AuditEntry(msgspec.Struct):
    time: float
    node: str
    key: str | None  # the key's name (bootstrap, anonymous, or a stored key); None: no valid key
    remote: str | None
    method: str
    path: str
    target: str | None
    status: int


def target_of(match_info: dict[str, str], body: bytes | None) -> str | None:
    """What a write is about, when the request says: a path parameter (blueprint `id`, map or
    key `name`, `artifact`, a fault's `peer`), else the `artifact` or `name` field of a JSON object body."""
    for name in ("id", "artifact", "name", "peer"):
        value = match_info.get(name)
        if value:
            return value[:_MAX_TARGET]
    if body:
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        if isinstance(doc, dict):
            for name in ("artifact", "name"):
                value = doc.get(name)
                if isinstance(value, str) and value:
                    return value[:_MAX_TARGET]
    return None


def _one_line(text: str) -> str:
    """`text` with every character that is not printable (a line break, NUL, a lone surrogate)
    written as its Python escape: the path and the target come from the request, and a key such as
    `x%0A2026-... audit: key=admin ...` wrote a second, forged audit line into a text log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class AuditLog:
    """The newest `capacity` audit entries of one node, and a log line per entry."""

    def __init__(self, node_id: str, capacity: int = DEFAULT_CAPACITY, logger: logging.Logger | None = None):
        self.node_id = node_id
        self.entries: deque[AuditEntry] = deque(maxlen=capacity)
        self.log = logger or logging.getLogger(f"aether.audit.{node_id}")

    def record(
        self, *, key: str | None, remote: str | None, method: str, path: str, target: str | None, status: int
    ) -> AuditEntry:
        entry = AuditEntry(time.time(), self.node_id, key, remote, method, path, target, status)
        self.entries.append(entry)
        self.log.info(
            "audit: key=%s remote=%s %s %s target=%s -> %d",
            key or "-", remote or "-", method, _one_line(path), _one_line(target or "-"), status,
        )
        return entry

    def recent(self, limit: int) -> list[AuditEntry]:
        """The newest `limit` entries, oldest first."""
        if limit <= 0:
            return []
        return list(self.entries)[-limit:]
