"""Management API endpoints of the node's recent log records (thin: the node's
`aether.core.logs.LogBuffer`, `node.logs`, keeps them; docs/operations.md, *Logs*):

- `GET /api/v1/logs` -> `LogPage`: the held records, oldest first, filtered by `since` (a duration
  back from now such as ``5m``, an epoch timestamp or an ISO 8601 time), `slice` (``group:artifact``,
  with or without the version, or the artifact name), `level` (the minimum: debug ... critical),
  `after` (a sequence number: only newer records) and `limit` (the newest N, 1-10000, default 1000);
- `GET /api/v1/logs/stream` -> server-sent events: ``hello`` `{node_id, time, last_seq}`, then one
  ``log`` event per record (its `LogEntry`, id = its sequence number) as the node keeps it, the same
  filters (without `limit`; `since` and `after` pick the records sent first), ``gap`` `{missed}`
  when records left the buffer before they could be sent, and a ``: keepalive`` comment while
  nothing happens.

A bad filter is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import msgspec
from aiohttp import web

from aether.api import sse
from aether.api.common import API_PREFIX, json_response, query
from aether.api.routing import Answer, Route, query_param
from aether.core.errors import BadRequest
from aether.core.logs import LogEntry, parse_level, parse_since

__all__ = ["ROUTES", "LogPage", "LogRoutes"]

DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 10_000
POLL: Final = 0.2  # seconds between two looks at the buffer while following


class LogPage(msgspec.Struct, frozen=True):
    """`GET /api/v1/logs`: the node, its records (oldest first) and the newest sequence number it
    holds (pass it as `after` to read on)."""

    node_id: str
    last_seq: int
    entries: list[LogEntry]


class _Filters(msgspec.Struct, frozen=True):
    since: float | None
    after: int
    slice: str | None
    level: int
    limit: int


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from {low} to {high}, not {text!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be from {low} to {high}, not {value}")
    return value


def _filters(request: web.Request, *, with_limit: bool) -> _Filters:
    names = ("since", "after", "slice", "level") + (("limit",) if with_limit else ())
    q = query(request, names)
    since = None
    if q.get("since"):
        try:
            since = parse_since(q["since"])
        except ValueError as e:
            raise BadRequest(str(e)) from None
    try:
        level = parse_level(q.get("level"))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    after = _int("after", q["after"], 0, 2**62) if q.get("after") else 0
    limit = _int("limit", q["limit"], 1, MAX_LIMIT) if q.get("limit") else DEFAULT_LIMIT
    return _Filters(since, after, q.get("slice") or None, level, limit)


class LogRoutes:
    def __init__(self, node: Any, *, heartbeat: float = 15.0) -> None:
        self.node = node
        self.logs: Any = getattr(node, "logs", None)
        self.heartbeat = heartbeat
        self.closing = False  # set when the server shuts down: every stream ends

    def close(self) -> None:
        """End every log stream (the server is shutting down)."""
        self.closing = True

    async def get_logs(self, request: web.Request) -> web.Response:
        f = _filters(request, with_limit=True)
        entries = self.logs.query(since=f.since, after=f.after, slice=f.slice, level=f.level, limit=f.limit)
        return json_response(LogPage(getattr(self.node, "node_id", ""), self.logs.last_seq, entries))

    async def stream_logs(self, request: web.Request) -> web.StreamResponse:
        f = _filters(request, with_limit=False)
        logs = self.logs
        resp = sse.stream_response()
        try:
            # the first batch: what `since` / `after` select of the records held (the newest
            # DEFAULT_LIMIT); without either, what comes after the hello's `last_seq` (read once:
            # slice threads log while the hello is written)
            last_seq = logs.last_seq
            after = f.after if (f.since is not None or f.after) else last_seq
            exact = f.since is None or f.after > 0  # from a sequence number: say what was lost since
            await resp.prepare(request)
            hello = {
                "type": "hello",
                "node_id": getattr(self.node, "node_id", ""),
                "time": time.time(),
                "last_seq": last_seq,
            }
            await resp.write(sse.frame("hello", hello))
            first = True
            next_beat = time.monotonic() + self.heartbeat
            while True:
                transport = request.transport
                if self.closing or transport is None or transport.is_closing():
                    break
                oldest, top = logs.first_seq, logs.last_seq
                if oldest > after + 1 and (exact or not first):
                    await resp.write(sse.frame("gap", {"type": "gap", "missed": oldest - after - 1}))
                batch = logs.query(
                    since=f.since if first else None,
                    after=after,
                    slice=f.slice,
                    level=f.level,
                    limit=DEFAULT_LIMIT if first else None,
                )
                first = False
                # every record up to here was looked at, sent or filtered out
                after = max(after, top, batch[-1].seq if batch else 0, oldest - 1)
                for entry in batch:
                    await resp.write(sse.frame("log", entry, entry.seq))
                if batch:
                    next_beat = time.monotonic() + self.heartbeat
                elif time.monotonic() >= next_beat:
                    await resp.write(sse.KEEPALIVE)
                    next_beat = time.monotonic() + self.heartbeat
                await asyncio.sleep(POLL)
        except (ConnectionResetError, ConnectionError):
            pass
        return resp


P = API_PREFIX
_HAS_LOGS: Final = lambda routes: routes.logs is not None  # noqa: E731 (a node keeping its log records)
_FILTERS: Final = (
    query_param(
        "since",
        "only records from this time on: a duration back from now (300, 90s, 5m, 2h, "
        "1d), an epoch timestamp or an ISO 8601 time",
    ),
    query_param("slice", "only records of this slice: group:artifact[:version], or the artifact name"),
    query_param(
        "level", "only records at this level or above", enum=["debug", "info", "warning", "error", "critical"]
    ),
    query_param(
        "after",
        "only records with a higher sequence number (`last_seq` of a previous answer)",
        type="integer",
        minimum=0,
    ),
)

ROUTES: Final = (
    Route(
        "GET",
        f"{P}/logs",
        LogRoutes.get_logs,
        "getLogs",
        "This node's recent log records (a bounded buffer), oldest first, with node, request id, "
        "trace id, slice and instance where known",
        {200: Answer(LogPage, "The node, the records that pass the filters, the newest sequence number")},
        (400,),
        tags=("logs",),
        when=_HAS_LOGS,
        params=(
            *_FILTERS,
            query_param(
                "limit",
                f"at most the newest N records (1-{MAX_LIMIT}, default {DEFAULT_LIMIT})",
                type="integer",
                minimum=1,
                maximum=MAX_LIMIT,
            ),
        ),
    ),
    Route(
        "GET",
        f"{P}/logs/stream",
        LogRoutes.stream_logs,
        "streamLogs",
        "Server-sent events of this node's log records as it keeps them (hello, log, gap); with since "
        "or after, the held records they select come first; a `: keepalive` comment every 15 s",
        {
            200: Answer(
                {"type": "string"},
                "An endless event stream; each `log` data line is a LogEntry object",
                media=sse.MEDIA_TYPE,
            )
        },
        (400,),
        tags=("logs",),
        when=_HAS_LOGS,
        params=_FILTERS,
    ),
)
"""The log endpoints (served when the node keeps a log buffer, `node.logs`)."""
