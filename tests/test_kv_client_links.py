"""`AetherClient`'s links to the nodes, with the connections faked (no sockets): which link's close
counts, and where the client goes after a node answers that it has no quorum."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import aether.client.client as client_module
from aether.client import AetherClient
from aether.core.errors import BadRequest
from aether.kv.machine import Result
from aether.kv.protocol import ClientRequest, ClientResponse

pytestmark = pytest.mark.timeout(30)

ADDRESSES = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]


class FakeLink:
    """A client link to node `index`: node 0 answers every request "no quorum", the others apply
    it. Closing it calls the client's close callback `close_delay` s later, as the transport does
    (a TLS close takes a while)."""

    def __init__(self, index: int, on_message: Any, on_close: Any, close_delay: float) -> None:
        self.index = index
        self._on_message = on_message
        self._on_close = on_close
        self._delay = close_delay
        self.closed = False

    def send(self, msg: ClientRequest) -> bool:
        if self.closed:
            return False
        if self.index == 0:
            answer = ClientResponse(msg.id, error="this node has no quorum", kind="quorum")
        else:
            answer = ClientResponse(msg.id, result=msgspec.msgpack.encode(Result(True, None, 7)))
        asyncio.get_running_loop().call_soon(self._on_message, answer)
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().call_later(self._delay, self._on_close, None)


def _fake_links(monkeypatch: pytest.MonkeyPatch, close_delay: float) -> list[FakeLink]:
    """The client's connections made `FakeLink`s; the list of those opened, in order."""
    opened: list[FakeLink] = []

    async def fake_open(address: Any, *, on_message: Any, on_close: Any, **_: Any) -> FakeLink:
        link = FakeLink(ADDRESSES.index(str(address)), on_message, on_close, close_delay)
        opened.append(link)
        return link

    monkeypatch.setattr(client_module, "open_client_connection", fake_open)
    return opened


@pytest.mark.parametrize("close_delay", [0.0, 0.05])
async def test_a_client_leaving_a_node_without_quorum_goes_to_the_next_and_keeps_that_link(
    monkeypatch: pytest.MonkeyPatch, close_delay: float
) -> None:
    """Seen before: the close callback of the link the client had just left (`_switch`) was taken
    for the loss of the current link. Arriving at once, it moved the client one node further
    (node 3 instead of node 2) and counted a failover; arriving after the next link was up (a TLS
    close), it dropped that link without closing it (a leaked connection) and failed the requests
    waiting on it, so the next request opened a third link."""
    opened = _fake_links(monkeypatch, close_delay)
    c = AetherClient(ADDRESSES, client_id="app", prefer=0, timeout=5.0)
    try:
        assert await c.put("k", b"v") == 7
        assert [link.index for link in opened] == [0, 1]  # the next node, none skipped
        assert str(c.connected_to) == ADDRESSES[1]
        await asyncio.sleep(close_delay + 0.05)  # the left link's close callback has come
        assert await c.put("k2", b"w") == 7
        assert [link.index for link in opened] == [0, 1]  # still on the same link: no third one
        assert opened[0].closed and not opened[1].closed
        assert str(c.connected_to) == ADDRESSES[1] and c.failovers == 0
    finally:
        await c.close()


async def test_losing_the_current_link_fails_over_to_the_next_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """The current link closed by the node (its callback with an error): a failover, counted, and
    the next request goes to the next node."""
    opened = _fake_links(monkeypatch, 0.0)
    c = AetherClient(ADDRESSES, client_id="app", prefer=1, timeout=5.0)
    try:
        assert await c.put("k", b"v") == 7
        lost = opened[-1]
        lost.closed = True
        lost._on_close(ConnectionError("reset by peer"))
        assert c.failovers == 1 and c.connected_to is None
        assert await c.put("k2", b"w") == 7
        assert [link.index for link in opened] == [1, 2]
    finally:
        await c.close()


class CountingLink(FakeLink):
    """A `FakeLink` to a node that applies everything, counting what it was sent."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent: list[ClientRequest] = []

    def send(self, msg: ClientRequest) -> bool:
        self.sent.append(msg)
        return super().send(msg)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        # a lone surrogate cannot be encoded: it escaped as a bare UnicodeEncodeError
        (lambda c: c.put("user/\udc80", b"v"), "key 'user/\\udc80' is not valid UTF-8"),
        (lambda c: c.get("user/a\udc80"), "is not valid UTF-8"),
        (lambda c: c.remove(5), "key must be a str, got int"),
        # went to the node and came back as msgspec's `Expected bytes, got str - at $[0][2]`
        (lambda c: c.put("user/s", "text"), "value for 'user/s' must be bytes, got str"),
        (lambda c: c.put("user/s", None), "value for 'user/s' must be bytes, got NoneType"),
        (lambda c: c.compare_and_set("user/s", "old", b"new"), "expected value for 'user/s' must be bytes"),
    ],
)
async def test_a_key_or_value_the_store_cannot_take_is_a_bad_request_naming_it_and_not_sent(
    monkeypatch: pytest.MonkeyPatch, call: Any, error: str
) -> None:
    """Found walking docs/consensus.md with a real cluster: `AetherClient.put("user/\\udc80", ...)`
    raised UnicodeEncodeError from deep inside the encoder, after the lane had been opened. Now
    every malformed key or value is a BadRequest naming it, nothing is sent, and the client goes on."""
    opened: list[CountingLink] = []

    async def fake_open(address: Any, *, on_message: Any, on_close: Any, **_: Any) -> CountingLink:
        link = CountingLink(1, on_message, on_close, 0.0)
        opened.append(link)
        return link

    monkeypatch.setattr(client_module, "open_client_connection", fake_open)
    c = AetherClient(ADDRESSES, client_id="app", prefer=1, timeout=5.0)
    try:
        with pytest.raises(BadRequest) as ei:
            await call(c)
        assert error in str(ei.value)
        assert sum(len(link.sent) for link in opened) == 0  # refused before anything was sent
        assert await c.put("user/ok", b"v") == 7  # the client goes on
    finally:
        await c.close()
