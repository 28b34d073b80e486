"""Server-sent events: the one place that frames them (WHATWG `text/event-stream`).

`stream_response` is a streaming answer with the headers every event stream of the API sends;
`frame` turns one event (type, JSON-able data, optional id) into its `id:`/`event:`/`data:` block;
`KEEPALIVE` is the comment line sent while there is nothing to say. The CLI's reader
(`aether.client.management`) parses exactly these blocks.
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

__all__ = ["KEEPALIVE", "MEDIA_TYPE", "frame", "stream_response"]

MEDIA_TYPE: Final = "text/event-stream"
KEEPALIVE: Final = b": keepalive\n\n"
_HEADERS: Final = {"Content-Type": MEDIA_TYPE, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(event: str, data: object, id: int | None = None) -> bytes:
    """One event block: ``id:`` (if given), ``event:``, ``data:`` (compact JSON, one line), blank line."""
    if "\n" in event or "\r" in event:
        raise ValueError(f"an event type cannot contain a line break: {event!r}")
    head = b"" if id is None else b"id: %d\n" % id
    return head + b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def stream_response() -> web.StreamResponse:
    """An event-stream answer (not cached, not buffered by proxies); the handler prepares it."""
    return web.StreamResponse(headers=_HEADERS)
