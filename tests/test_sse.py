"""Server-sent events: the API's one framing (`aether.api.sse`) read back by the CLI's parser."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from aether.api import sse
from aether.client.management import ServerEvent, StreamLost, _server_events


async def _read(raw: bytes, n: int) -> list[ServerEvent]:
    content = asyncio.StreamReader()
    content.feed_data(raw)
    content.feed_eof()
    resp: Any = SimpleNamespace(content=content)
    events: list[ServerEvent] = []
    gen = _server_events(resp, read_timeout=1.0)
    with pytest.raises(StreamLost, match="closed the stream"):
        async for ev in gen:
            events.append(ev)
    assert len(events) == n
    return events


def test_a_frame_is_id_event_and_one_line_of_compact_json() -> None:
    assert sse.frame("deploy", {"a": 1, "text": "two\nlines"}, 7) == (
        b'id: 7\nevent: deploy\ndata: {"a":1,"text":"two\\nlines"}\n\n'
    )
    assert sse.frame("hello", {}) == b"event: hello\ndata: {}\n\n"
    with pytest.raises(ValueError, match="line break"):
        sse.frame("bad\ntype", {})


async def test_what_the_api_frames_the_cli_reads_back() -> None:
    data = {"node": "node-1", "text": "multi\nline: with colons", "n": [1, 2]}
    raw = sse.frame("hello", {"last_id": 0}) + sse.KEEPALIVE + sse.frame("deploy", data, 42)
    hello, deploy = await _read(raw, 2)
    assert (hello.id, hello.event, json.loads(hello.data)) == (None, "hello", {"last_id": 0})
    assert (deploy.id, deploy.event, json.loads(deploy.data)) == ("42", "deploy", data)


async def test_the_reader_follows_the_field_rules_for_frames_from_elsewhere() -> None:
    raw = b": comment\r\ndata: a\r\ndata:b\r\n\r\nevent: x\nid: 3\n\n"
    (ev,) = await _read(raw, 1)  # the second block has no data: no event (WHATWG)
    assert (ev.id, ev.event, ev.data) == (None, "message", "a\nb")
