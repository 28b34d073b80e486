"""Bad input on the cluster port: every case logs exactly one WARNING naming the remote address,
closes or keeps the offending connection as documented, and leaves the node working.

Setup per test: node "a" (members a, b and "ghost", a member that never runs, so a raw socket can
authenticate as it without disturbing b) and node "b", linked to each other; a raw socket plays
the misbehaving remote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any, Union
from unittest.mock import ANY

import msgspec
import pytest

from aether.core.types import Address
from aether.transport import (
    Challenge,
    ClientHello,
    ClientSession,
    EventBus,
    FrameDecoder,
    HelloAck,
    PeerHello,
    Ping,
    Proof,
    Reject,
    Transport,
    encode_frame,
)
from aether.transport.auth import AuthFailed, Credentials, DialerHandshake
from conftest import wait_until
from test_transport import Note, PeerMsg, Req, Resp

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
CLUSTER = "bad-input-cluster"
SECRET = b"bad-input-cluster-secret"


# the wire message types are the ones tests/test_transport.py uses


def frame(obj: Any) -> bytes:
    return encode_frame(msgspec.msgpack.encode(obj))


REPLY_DECODER = msgspec.msgpack.Decoder(Union[HelloAck, Reject, Challenge])  # noqa: UP007


class Env:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.inbox: dict[str, list[tuple[str, Any]]] = {"a": [], "b": []}
        self.client_msgs: list[tuple[str, Any]] = []
        self.logs = {i: logging.getLogger(f"test.badinput.{self.tag}.{i}") for i in "ab"}
        self.nodes: dict[str, Transport] = {}

    def make(self, node_id: str, **options: Any) -> Transport:
        def on_client_message(session: ClientSession, msg: Any) -> None:
            self.client_msgs.append((session.client_id, msg))
            session.send(Resp(msg.n + 1))

        extra: dict[str, Any] = {}
        if node_id == "a":
            extra = dict(client_message_type=Req, on_client_message=on_client_message)
        t = Transport(
            node_id,
            {node_id: Address(HOST, 0)},
            listen=Address(HOST, 0),
            cluster_name=CLUSTER,
            message_type=PeerMsg,
            on_message=lambda sender, msg: self.inbox[node_id].append((sender, msg)),
            bus=EventBus(),
            logger=self.logs[node_id],
            secret=SECRET,
            **extra,
            **options,
        )
        self.nodes[node_id] = t
        return t

    @property
    def a(self) -> Transport:
        return self.nodes["a"]

    @property
    def b(self) -> Transport:
        return self.nodes["b"]

    def warnings(self, node_id: str = "a") -> list[logging.LogRecord]:
        return [
            r
            for r in self.caplog.records
            if r.name == self.logs[node_id].name and r.levelno >= logging.WARNING
        ]

    async def assert_still_working(self, seq: int) -> None:
        assert self.a.send("b", Note(seq, "a->b"))
        assert self.b.send("a", Note(seq, "b->a"))
        await wait_until(
            lambda: (
                ("a", Note(seq, "a->b")) in self.inbox["b"] and ("b", Note(seq, "b->a")) in self.inbox["a"]
            ),
            what="a<->b traffic",
        )
        assert self.a.up_peers >= {"b"} and self.b.up_peers == {"a"}

    caplog: pytest.LogCaptureFixture


@contextlib.asynccontextmanager
async def env(caplog: pytest.LogCaptureFixture, **a_options: Any) -> AsyncIterator[Env]:
    """Nodes a and b up and linked; `a_options` are extra Transport arguments for a."""
    e = Env()
    e.caplog = caplog
    a, b = e.make("a", **a_options), e.make("b")
    # "ghost" is a member whose port is bound but not listening: dials are refused (a logs that at
    # INFO only) and no other process can take the port meanwhile.
    ghost_sock = socket.socket()
    try:
        ghost_sock.bind((HOST, 0))
        ghost = Address(HOST, ghost_sock.getsockname()[1])
        await a.start()
        await b.start()
        a.set_members({"a": Address(HOST, a.port), "b": Address(HOST, b.port), "ghost": ghost})
        b.set_members({"a": Address(HOST, a.port), "b": Address(HOST, b.port)})
        await wait_until(lambda: a.up_peers == {"b"} and b.up_peers == {"a"}, what="a and b up")
        await e.assert_still_working(0)
        yield e
    finally:
        await a.stop()
        await b.stop()
        ghost_sock.close()


class Raw:
    """A raw TCP connection to node a."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.addr = f"{host}:{port}"
        self.frames = FrameDecoder()

    @classmethod
    async def connect(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def handshake(self, hello: PeerHello | ClientHello, secret: bytes | None = SECRET) -> Any:
        """Send `hello` (with a fresh nonce), prove `secret` (None: send an empty proof) in answer to
        the node's Challenge; returns the node's final reply (HelloAck or Reject)."""
        if isinstance(hello, PeerHello):
            kind, own = "peer", hello.node_id
        else:
            kind, own = "client", hello.client_id
        auth = DialerHandshake(Credentials(CLUSTER, secret=secret), kind, own)
        await self.send(frame(msgspec.structs.replace(hello, nonce=auth.nonce)))
        challenge = await self.read_reply()
        assert isinstance(challenge, Challenge), challenge
        try:
            proof = auth.answer(challenge.node_id, challenge.nonce, challenge.proof)
        except AuthFailed:  # we hold another secret (an impostor): send a proof anyway
            proof = bytes(32)
        await self.send(frame(Proof(proof)))
        return await self.read_reply()

    async def read_reply(self, timeout: float = 5.0) -> Any:
        """The next Challenge / HelloAck / Reject frame from the node."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), deadline - loop.time())
            if not data:
                raise EOFError("connection closed")
            frames = self.frames.feed(data)
            if frames:
                return REPLY_DECODER.decode(frames[0])

    async def wait_closed_by_node(self, timeout: float = 5.0) -> None:
        async def drain() -> None:
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass

        await asyncio.wait_for(drain(), timeout)

    async def is_open(self, grace: float = 0.2) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), grace)
        except TimeoutError:
            return True
        except ConnectionError:
            return False
        return bool(data)

    def close(self) -> None:
        self.writer.close()


async def expect_one_warning(e: Env, raw: Raw, needle: str) -> None:
    await wait_until(lambda: len(e.warnings()) >= 1, what="a warning")
    await asyncio.sleep(0.2)  # anything else that would be logged arrives by now
    warnings = e.warnings()
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING
    assert raw.addr in text, text
    assert needle in text, text
    assert e.warnings("b") == []


# ---------------------------------------------------------------------------------------------
# the first frame is bad: reject (where possible) and close


CLOSING_CASES = {
    # name: (bytes to send, text expected in the warning, whether a Reject reply is expected)
    "garbage_frame": (encode_frame(b"\xc1\xc1\xc1 not msgpack"), "undecodable frame", True),
    "http_request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "frame header announces", False),
    "oversized_header": (
        struct.pack(">I", 16 * 1024 * 1024 + 1) + b"\x00" * 32,
        "frame header announces",
        False,
    ),
    "unknown_tag_first": (frame([99, "x"]), "first frame is not a valid hello", True),
    "ping_first": (frame(Ping()), "first frame is not a valid hello", True),
    "app_message_first": (frame(Note(1, "hi")), "first frame is not a valid hello", True),
    "hello_wrong_shape": (frame([1, CLUSTER]), "first frame is not a valid hello", True),
    "wrong_cluster": (frame(PeerHello("some-other-cluster", "b")), "cluster 'some-other-cluster'", True),
    "unknown_node_id": (frame(PeerHello(CLUSTER, "intruder")), "unknown node id 'intruder'", True),
    "own_node_id": (frame(PeerHello(CLUSTER, "a")), "unknown node id 'a'", True),
    "client_wrong_cluster": (frame(ClientHello("nope", "c1")), "cluster 'nope'", True),
}


@pytest.mark.parametrize("case", sorted(CLOSING_CASES))
async def test_bad_first_frame_is_logged_once_and_connection_closed(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, needle, rejected = CLOSING_CASES[case]
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            await raw.send(data)
            if rejected:
                reply = await raw.read_reply()
                assert isinstance(reply, Reject), reply
            await raw.wait_closed_by_node()
            await expect_one_warning(e, raw, needle)
        finally:
            raw.close()
        await e.assert_still_working(1)


async def test_truncated_frame_then_close(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        hello = frame(PeerHello(CLUSTER, "ghost"))
        await raw.send(hello[:-3])  # header announces more than we send
        raw.writer.write_eof()
        await raw.wait_closed_by_node()
        raw.close()
        await expect_one_warning(e, raw, "in the middle of a frame")
        await e.assert_still_working(1)


async def test_no_clients_accepted_rejects_client_hello(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.b.port)  # b was built without client_message_type
        try:
            await raw.send(frame(ClientHello(CLUSTER, "c1")))
            reply = await raw.read_reply()
            assert isinstance(reply, Reject) and "client" in reply.reason
            await raw.wait_closed_by_node()
        finally:
            raw.close()
        await wait_until(lambda: len(e.warnings("b")) == 1, what="b's warning")
        assert raw.addr in e.warnings("b")[0].getMessage()
        await e.assert_still_working(1)


async def test_silent_connection_closed_after_hello_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            await raw.wait_closed_by_node(timeout=10)  # handshake timeout is max(1s, 5 x heartbeat_timeout)
            await expect_one_warning(e, raw, "no hello")
        finally:
            raw.close()
        await e.assert_still_working(1)


# ---------------------------------------------------------------------------------------------
# bad frames on an established link: dropped, connection kept (up to 10), one warning


ESTABLISHED_BAD_FRAMES = {
    "unknown_tag": frame([99, 1, 2]),
    "wrong_shape": frame([10, "not-an-int", 3]),
    "garbage": encode_frame(b"\xc1\xff\x00garbage"),
    "empty_payload": encode_frame(b""),
    "second_hello": frame(PeerHello(CLUSTER, "ghost")),
}


@pytest.mark.parametrize("case", sorted(ESTABLISHED_BAD_FRAMES))
async def test_bad_frame_on_peer_link_is_dropped(case: str, caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            assert await raw.handshake(PeerHello(CLUSTER, "ghost")) == HelloAck("a", ANY)
            await raw.send(frame(Note(1, "before")) + ESTABLISHED_BAD_FRAMES[case] + frame(Note(2, "after")))
            await wait_until(
                lambda: len([m for s, m in e.inbox["a"] if s == "ghost"]) == 2, what="good frames"
            )
            assert [m.text for s, m in e.inbox["a"] if s == "ghost"] == ["before", "after"]
            await expect_one_warning(e, raw, "frame dropped")
            assert await raw.is_open()
        finally:
            raw.close()
        await e.assert_still_working(1)


async def test_more_than_ten_bad_frames_close_the_link(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            assert await raw.handshake(PeerHello(CLUSTER, "ghost")) == HelloAck("a", ANY)
            await raw.send(frame([99]) * 10)
            assert await raw.is_open()
            await raw.send(frame([99]))  # the 11th
            await raw.wait_closed_by_node()
            await expect_one_warning(e, raw, "frame dropped")
        finally:
            raw.close()
        await e.assert_still_working(1)


async def test_oversized_header_on_established_link_closes_it(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            assert await raw.handshake(PeerHello(CLUSTER, "ghost")) == HelloAck("a", ANY)
            await raw.send(frame(Note(5)) + struct.pack(">I", 0xFFFFFFFF))
            await raw.wait_closed_by_node()
            await expect_one_warning(e, raw, "frame header announces 4294967295 bytes")
            assert e.inbox["a"][-1] == ("ghost", Note(5))  # frames before the bad header still count
        finally:
            raw.close()
        await e.assert_still_working(1)


async def test_bad_frame_on_client_session_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            assert await raw.handshake(ClientHello(CLUSTER, "cli")) == HelloAck("a", ANY)
            # a peer message type is not a client request: unknown tag for this session
            await raw.send(frame(Req(1)) + frame(Note(1)) + frame(Req(2)))
            await wait_until(lambda: len(e.client_msgs) == 2, what="client requests")
            assert e.client_msgs == [("cli", Req(1)), ("cli", Req(2))]
            await expect_one_warning(e, raw, "frame dropped")
            assert await raw.is_open()
        finally:
            raw.close()
        await e.assert_still_working(1)


async def test_many_bad_connections_at_once(caplog: pytest.LogCaptureFixture) -> None:
    cases = ["garbage_frame", "http_request", "oversized_header", "unknown_tag_first", "ping_first"]
    async with env(caplog) as e:
        raws = [await Raw.connect(e.a.port) for _ in range(20)]
        try:
            for i, raw in enumerate(raws):
                await raw.send(CLOSING_CASES[cases[i % len(cases)]][0])
            for raw in raws:
                await raw.wait_closed_by_node()
            await wait_until(lambda: len(e.warnings()) >= 20, what="20 warnings")
            await asyncio.sleep(0.2)
            assert len(e.warnings()) == 20
            for raw in raws:
                assert sum(raw.addr in r.getMessage() for r in e.warnings()) == 1
        finally:
            for raw in raws:
                raw.close()
        await e.assert_still_working(1)


async def test_repeated_identical_hello_rejections_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A removed node that keeps redialing must not flood the log: same host + same claimed id within
    a minute -> one WARNING, later ones at DEBUG. Every connection is still rejected and closed."""
    async with env(caplog) as e:
        for _ in range(3):
            raw = await Raw.connect(e.a.port)
            try:
                await raw.send(frame(PeerHello(CLUSTER, "removed-node")))
                assert isinstance(await raw.read_reply(), Reject)
                await raw.wait_closed_by_node()
            finally:
                raw.close()
        await asyncio.sleep(0.2)
        assert len(e.warnings()) == 1
        assert "unknown node id 'removed-node'" in e.warnings()[0].getMessage()
        await e.assert_still_working(1)
