"""Tests of aether.transport: framing, codec validation, peer links, liveness, clients.

Port pattern: every Transport listens on 127.0.0.1 port 0 and starts with only itself as member;
after all are started their real ports are known and `set_members` is called on each of them
without awaiting in between (see `cluster()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Union

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.core.types import Address
from aether.transport import (
    Challenge,
    ClientLink,
    ClientSession,
    EventBus,
    FrameDecoder,
    FrameTooLarge,
    HelloAck,
    PeerDown,
    PeerHello,
    PeerUp,
    Proof,
    QuorumChanged,
    Reject,
    Transport,
    TransportEvent,
    encode_frame,
    message_types,
    open_client_connection,
)
from aether.transport.auth import AcceptorHandshake, Credentials
from conftest import wait_until

pytestmark = pytest.mark.timeout(30)

SECRET = b"test-transport-cluster-secret"

HOST = "127.0.0.1"
CLUSTER = "test-cluster"


class Note(msgspec.Struct, array_like=True, frozen=True, tag=10):
    seq: int
    text: str = ""


class Blob(msgspec.Struct, array_like=True, frozen=True, tag=11):
    data: bytes


PeerMsg = Union[Note, Blob]  # noqa: UP007


class Req(msgspec.Struct, array_like=True, frozen=True, tag=20):
    n: int


class Resp(msgspec.Struct, array_like=True, frozen=True, tag=21):
    n: int


# ---------------------------------------------------------------------------------------------
# helpers


class Node:
    """A Transport plus recorded inbox and events."""

    def __init__(self, node_id: str, members: dict[str, Address] | None = None, port: int = 0, **kw: Any):
        self.id = node_id
        self.inbox: list[tuple[str, Any]] = []
        self.events: list[TransportEvent] = []
        self.bus = EventBus()
        self.bus.subscribe(TransportEvent, self.events.append)
        self.log = logging.getLogger(f"test.transport.{uuid.uuid4().hex[:8]}.{node_id}")
        kw.setdefault("secret", SECRET)
        self.t = Transport(
            node_id,
            members if members is not None else {node_id: Address(HOST, port)},
            listen=Address(HOST, port),
            cluster_name=CLUSTER,
            message_type=PeerMsg,
            on_message=lambda sender, msg: self.inbox.append((sender, msg)),
            bus=self.bus,
            logger=self.log,
            **kw,
        )

    def got(self, sender: str) -> list[Any]:
        return [m for s, m in self.inbox if s == sender]


@contextlib.asynccontextmanager
async def cluster(ids: list[str], **kw: Any) -> AsyncIterator[dict[str, Node]]:
    nodes = {i: Node(i, **kw) for i in ids}
    try:
        for n in nodes.values():
            await n.t.start()
        members = {i: Address(HOST, n.t.port) for i, n in nodes.items()}
        for n in nodes.values():  # no await in between: nobody dials a node that does not know it yet
            n.t.set_members(members)
        await wait_until(
            lambda: all(n.t.up_peers == set(ids) - {i} for i, n in nodes.items()), what="all peers up"
        )
        yield nodes
    finally:
        for n in nodes.values():
            await n.t.stop()


@contextlib.contextmanager
def refusing_address() -> Iterator[Address]:
    """An address that refuses connections: a port bound (so nobody else gets it) but not listening."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        yield Address(HOST, s.getsockname()[1])


class FakePeer(asyncio.Protocol):
    """A raw peer that completes the handshake as `node_id` (Challenge proving SECRET, then HelloAck
    without checking the dialer's proof), then stays silent (and optionally stops reading)."""

    def __init__(self, node_id: str, *, ack: bool = True, stop_reading: bool = False):
        self.node_id = node_id
        self.ack = ack
        self.stop_reading = stop_reading
        self.frames = FrameDecoder()
        self.decoder = msgspec.msgpack.Decoder(Union[PeerHello, Proof])  # noqa: UP007
        self.auth = AcceptorHandshake(Credentials(CLUSTER, secret=SECRET), node_id)
        self.transport: asyncio.Transport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for frame in self.frames.feed(data):
            self.received += 1
            if self.received <= 2 and self.ack:
                msg = self.decoder.decode(frame)
                assert self.transport is not None
                if isinstance(msg, PeerHello):
                    nonce, proof = self.auth.challenge("peer", msg.node_id, msg.nonce)
                    reply: Any = Challenge(self.node_id, nonce, proof)
                else:
                    reply = HelloAck(self.node_id)
                self.transport.write(encode_frame(msgspec.msgpack.encode(reply)))
                if self.stop_reading and isinstance(msg, Proof):
                    self.transport.pause_reading()


@contextlib.asynccontextmanager
async def fake_server(**kw: Any) -> AsyncIterator[tuple[Address, list[FakePeer]]]:
    """Serve FakePeer(**kw) on 127.0.0.1:0; on exit close the server and every accepted connection."""
    peers: list[FakePeer] = []

    def factory() -> FakePeer:
        peers.append(FakePeer(**kw))
        return peers[-1]

    server = await asyncio.get_running_loop().create_server(factory, HOST, 0)
    try:
        yield Address(HOST, server.sockets[0].getsockname()[1]), peers
    finally:
        server.close()
        for p in peers:
            if p.transport is not None:
                p.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # let the aborted transports close their sockets


# ---------------------------------------------------------------------------------------------
# framing (pure)


def test_encode_frame_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_decoder_basic_and_partial() -> None:
    dec = FrameDecoder()
    stream = encode_frame(b"one") + encode_frame(b"") + encode_frame(b"three")
    assert dec.feed(stream[:2]) == []
    assert dec.buffered == 2
    assert dec.feed(stream[2:9]) == [b"one"]
    assert dec.feed(bytearray(stream[9:])) == [b"", b"three"]
    assert dec.buffered == 0
    assert dec.feed(memoryview(encode_frame(b"mv"))) == [b"mv"]
    assert dec.feed(b"") == []


def test_decoder_many_small_frames_in_pieces() -> None:
    payloads = [str(i).encode() * (i % 7) for i in range(20000)]
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(stream), 1000):
        out.extend(dec.feed(stream[i : i + 1000]))
    assert out == payloads
    assert dec.buffered == 0


def test_decoder_oversized_header_raises_without_payload() -> None:
    dec = FrameDecoder(max_frame=100)
    assert dec.feed(encode_frame(b"x" * 100)) == [b"x" * 100]
    assert dec.feed(b"\x00\x00") == []
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(b"\x00\x65")  # 101, header split across two feeds, no payload sent at all
    assert (info.value.size, info.value.limit) == (101, 100)
    with pytest.raises(FrameTooLarge):  # poisoned from now on
        dec.feed(encode_frame(b"ok"))


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
def test_decoder_reassembles_any_split(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder(max_frame=300)
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out.extend(dec.feed(stream[a:b]))
    assert out == payloads
    assert dec.buffered == 0


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=1 << 20),
    excess=st.integers(min_value=1, max_value=1 << 30),
    prefix=st.lists(st.binary(max_size=50), max_size=5),
    split=st.integers(min_value=0, max_value=4),
)
def test_decoder_oversized_header_property(limit: int, excess: int, prefix: list[bytes], split: int) -> None:
    dec = FrameDecoder(max_frame=max(limit, 50))
    size = dec.max_frame + excess
    good = b"".join(encode_frame(p) for p in prefix)
    header = struct.pack(">I", min(size, 0xFFFFFFFF))
    if split < 4:
        assert dec.feed(good + header[:split]) == prefix
        with pytest.raises(FrameTooLarge) as info:
            dec.feed(header[split:] + b"\x00" * 10)
        assert info.value.frames == []
    else:  # whole header in one chunk: the frames before it come back on the exception
        with pytest.raises(FrameTooLarge) as info:
            dec.feed(good + header)
        assert info.value.frames == prefix
    assert dec.buffered == 0


def test_message_types_validation() -> None:
    assert message_types(PeerMsg) == (Note, Blob)
    assert message_types(Note | Blob) == (Note, Blob)
    assert message_types(Note) == (Note,)
    assert message_types(None) == ()

    class LowTag(msgspec.Struct, array_like=True, tag=3):
        pass

    class NotArray(msgspec.Struct, tag=12):
        pass

    class NoTag(msgspec.Struct, array_like=True):
        pass

    class StrTag(msgspec.Struct, array_like=True, tag="x"):
        pass

    class Dup(msgspec.Struct, array_like=True, tag=10):
        pass

    for bad in (LowTag, NotArray, NoTag, StrTag, Union[Note, Dup], int):  # noqa: UP007
        with pytest.raises(TypeError):
            message_types(bad)


# ---------------------------------------------------------------------------------------------
# peer links


async def test_three_nodes_exchange_both_ways() -> None:
    async with cluster(["a", "b", "c"]) as nodes:
        for src in nodes.values():
            assert src.t.has_quorum()
            for dst in nodes:
                if dst != src.id:
                    assert src.t.send(dst, Note(1, f"{src.id}->{dst}"))
        await wait_until(lambda: all(len(n.inbox) == 2 for n in nodes.values()), what="6 messages")
        for n in nodes.values():
            assert sorted((s, m.text) for s, m in n.inbox) == sorted(
                (s, f"{s}->{n.id}") for s in nodes if s != n.id
            )


async def test_broadcast_reaches_every_peer_but_self() -> None:
    async with cluster(["a", "b", "c", "d"]) as nodes:
        nodes["a"].t.broadcast(Blob(b"hello"))
        await wait_until(lambda: all(len(nodes[i].inbox) == 1 for i in "bcd"), what="broadcast")
        await asyncio.sleep(0.05)
        assert nodes["a"].inbox == []
        for i in "bcd":
            assert nodes[i].inbox == [("a", Blob(b"hello"))]


async def test_order_preserved_and_throughput_smoke() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        total = 20000
        for i in range(total):
            assert a.t.send("b", Note(i))
            if i % 1000 == 0:
                await asyncio.sleep(0)  # interleave flushes with new sends
        await wait_until(lambda: len(b.inbox) == total, what="all messages")
        assert [m.seq for _, m in b.inbox] == list(range(total))
        assert a.t.up_peers == {"b"}  # heartbeats kept flowing


async def test_send_rules() -> None:
    async with cluster(["a", "b"]) as nodes:
        t = nodes["a"].t
        assert not t.send("a", Note(1))  # never to self
        assert not t.send("nobody", Note(1))
        with pytest.raises(TypeError):
            t.send("b", Req(1))
        with pytest.raises(TypeError):
            t.broadcast("not a message")


async def test_on_message_exception_is_logged_and_link_survives(caplog: pytest.LogCaptureFixture) -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        seen: list[int] = []

        def explode(sender: str, msg: Any) -> None:
            seen.append(msg.seq)
            if msg.seq == 1:
                raise RuntimeError("boom")

        b.t._on_message = explode
        a.t.send("b", Note(1))
        a.t.send("b", Note(2))
        await wait_until(lambda: seen == [1, 2], what="both messages")
        errors = [r for r in caplog.records if r.name == b.log.name and r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None
        assert "boom" in caplog.text
        assert b.t.up_peers == {"a"} and a.t.up_peers == {"b"}


async def test_single_node_has_quorum_from_start() -> None:
    n = Node("solo")
    try:
        assert not n.t.has_quorum()
        await n.t.start()
        assert n.t.has_quorum()
        assert n.events == [QuorumChanged(True, frozenset())]
    finally:
        await n.t.stop()
    assert not n.t.has_quorum()
    assert n.events[-1] == QuorumChanged(False, frozenset())
    await n.t.stop()  # idempotent


async def test_peer_down_up_and_quorum_on_stop_and_restart() -> None:
    extra: list[Node] = []
    async with cluster(["a", "b", "c"], reconnect_max=0.3) as nodes:
        a = nodes["a"]
        members = a.t.members
        a.events.clear()

        await nodes["c"].t.stop()
        await wait_until(lambda: a.t.up_peers == {"b"}, what="c down")
        assert next(e for e in a.events if isinstance(e, PeerDown)).node_id == "c"
        assert not any(isinstance(e, QuorumChanged) for e in a.events)  # a + b still a majority
        assert a.t.has_quorum()

        await nodes["b"].t.stop()
        await wait_until(lambda: a.t.up_peers == set(), what="b down")
        assert not a.t.has_quorum()
        assert a.events[-1] == QuorumChanged(False, frozenset())
        assert [e.node_id for e in a.events if isinstance(e, PeerDown)] == ["c", "b"]
        assert not a.t.send("b", Note(1))

        a.events.clear()
        b2 = Node("b", members=dict(members), port=members["b"].port)
        extra.append(b2)
        await b2.t.start()
        await wait_until(lambda: a.t.up_peers == {"b"} and b2.t.up_peers == {"a"}, what="b back")
        assert a.events == [PeerUp("b"), QuorumChanged(True, frozenset({"b"}))]
        assert b2.t.has_quorum()

        c2 = Node("c", members=dict(members), port=members["c"].port)
        extra.append(c2)
        await c2.t.start()
        await wait_until(lambda: a.t.up_peers == {"b", "c"} and c2.t.up_peers == {"a", "b"}, what="c back")
        await wait_until(lambda: b2.t.up_peers == {"a", "c"}, what="b2 sees c2")
        assert a.t.send("c", Note(7)) and c2.t.send("a", Note(8))
        await wait_until(lambda: c2.got("a") == [Note(7)] and a.got("c") == [Note(8)], what="traffic")
    for n in extra:
        await n.t.stop()


async def test_a_restarted_peer_is_not_timed_out_while_the_survivor_backs_off() -> None:
    """A node killed and restarted at once dials the survivor and sees it up on the ack; the
    survivor, backing off its dials to the dead node, must dial back at once (it only sends on its
    own link), or the restarted node hears nothing and declares it down after heartbeat_timeout.
    reconnect_min = reconnect_max = 2 s pins the survivor's backoff at 1-2 s, longer than the 0.6 s
    timeout: without the prompt dial back, b2 always times `a` out here."""
    kw: dict[str, Any] = {"reconnect_min": 2.0, "reconnect_max": 2.0, "heartbeat_timeout": 0.6}
    async with cluster(["a", "b"], **kw) as nodes:
        a = nodes["a"]
        members = a.t.members
        await nodes["b"].t.stop()  # abortive, like kill -9: the links just close, no goodbye
        await wait_until(lambda: a.t.up_peers == set(), what="b down")
        await asyncio.sleep(0.1)  # a's dial to b failed (refused) or never started: it backs off 1-2 s
        a.events.clear()
        b2 = Node("b", members=dict(members), port=members["b"].port, **kw)
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            await b2.t.start()
            await wait_until(lambda: b2.t.up_peers == {"a"}, timeout=2.0, what="b2 sees a up")
            await wait_until(lambda: a.t.up_peers == {"b"}, timeout=2.0, what="a sees b2 up")
            both_up = loop.time() - started
            await asyncio.sleep(0.8)  # past b2's heartbeat timeout counted from its link coming up
            assert not [e for e in b2.events if isinstance(e, PeerDown)], b2.events
            assert b2.t.up_peers == {"a"} and a.t.up_peers == {"b"}
            assert [e for e in a.events if isinstance(e, PeerUp | PeerDown)] == [PeerUp("b")]
            assert both_up < 0.5, f"a saw the restarted b only {both_up:.2f}s after it started"
        finally:
            await b2.t.stop()


class StuckDialTarget:
    """Listens on 127.0.0.1:`port` so that a dial to it gets stuck, as across machines:
    "connecting" (the accept queue is full, so the kernel drops the SYN and the dialer's connect
    hangs in SYN retries, as towards a machine that is down) or "handshaking" (the connection is
    accepted and then nothing is ever answered, like a half-open one)."""

    def __init__(self, port: int, stuck_in: str) -> None:
        self.port = port
        self.stuck_in = stuck_in
        self.socks: list[socket.socket] = []
        self.server: asyncio.Server | None = None
        self.accepted: list[asyncio.BaseTransport] = []

    async def open(self) -> None:
        if self.stuck_in == "handshaking":
            accepted = self.accepted

            class Silent(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    accepted.append(transport)

            self.server = await asyncio.get_running_loop().create_server(Silent, HOST, self.port)
            self.port = self.server.sockets[0].getsockname()[1]  # if given 0
            return
        lsock = socket.socket()
        self.socks.append(lsock)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((HOST, self.port))
        lsock.listen(0)
        self.socks.append(socket.create_connection((HOST, self.port), timeout=1.0))  # queue now full
        with socket.socket() as probe:  # check that a connect to the port now hangs
            probe.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                probe.connect((HOST, self.port))
            await asyncio.sleep(0.05)
            with pytest.raises(OSError):
                probe.getpeername()  # still not connected: the SYN was dropped

    def close_listener(self) -> None:
        """Free the port; a connection accepted in "handshaking" stays open (and silent)."""
        if self.server is not None:
            self.server.close()
        for s in self.socks:
            s.close()

    def close(self) -> None:
        self.close_listener()
        for tr in self.accepted:
            tr.abort()


@pytest.mark.parametrize(
    ("stuck_in", "hb_timeout"),
    [("connecting", 0.4), ("handshaking", 0.4), ("connecting", 1.6), ("handshaking", 1.6)],
)
async def test_a_restarted_peer_is_not_timed_out_while_the_survivor_dial_is_stuck(
    stuck_in: str, hb_timeout: float
) -> None:
    """Like the test above, but the survivor's dial to the restarted node does not sleep a backoff:
    it is stuck connecting (SYN retries towards a machine that was down) or handshaking (a
    half-open connection), for up to handshake_timeout (3 s here). The restarted node dials the
    survivor and sees it up on the ack; the survivor must give up its stuck attempt and dial again,
    or the restarted node hears nothing and times it out after heartbeat_timeout (0.4 s, well
    before the survivor's SYN retry 1 s after its first SYN could reach it). The stuck dial is
    0.3 s old when the peer proves itself: older than heartbeat_timeout / 4 with 0.4 s (given up at
    once), younger with 1.6 s (given up when 0.4 s old): both must be up within 0.5 s either way."""
    kw: dict[str, Any] = {"heartbeat_timeout": hb_timeout, "handshake_timeout": 3.0}
    async with cluster(["a", "b"], **kw) as nodes:
        a = nodes["a"]
        members = a.t.members
        await nodes["b"].t.stop()  # abortive, like kill -9
        target = StuckDialTarget(members["b"].port, stuck_in)
        b2: Node | None = None
        try:
            await target.open()  # a's next dial to b (backoff of some 20-40 ms) gets stuck there
            await wait_until(lambda: a.t.up_peers == set(), what="b down")
            if stuck_in == "handshaking":
                await wait_until(lambda: bool(target.accepted), what="a's dial stuck in the handshake")
            await asyncio.sleep(0.3)
            target.close_listener()  # b's port is free again; a's dial stays stuck
            a.events.clear()
            b2 = Node("b", members=dict(members), port=members["b"].port, **kw)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await b2.t.start()
            await wait_until(lambda: b2.t.up_peers == {"a"}, timeout=2.0, what="b2 sees a up")
            await wait_until(lambda: a.t.up_peers == {"b"}, timeout=2.0, what="a sees b2 up")
            both_up = loop.time() - started
            await asyncio.sleep(0.6)  # past b2's heartbeat timeout (0.4 s) counted from its link coming up
            assert not [e for e in b2.events if isinstance(e, PeerDown)], b2.events
            assert b2.t.up_peers == {"a"} and a.t.up_peers == {"b"}
            assert [e for e in a.events if isinstance(e, PeerUp | PeerDown)] == [PeerUp("b")]
            assert both_up < 0.5, f"a saw the restarted b only {both_up:.2f}s after it started"
        finally:
            target.close()
            if b2 is not None:
                await b2.t.stop()


async def test_a_peer_reachable_one_way_gets_one_prompt_redial_per_proof() -> None:
    """b reaches a, but a's dials to b hang (its address for b is a silent listener): b dials a,
    sees it up, hears nothing, times it out, dials again, and so on. Each time b proves itself, a
    gives up its stuck dial and dials once more, and no more than that: no tight loop."""
    kw: dict[str, Any] = {"heartbeat_timeout": 0.4, "handshake_timeout": 3.0}
    a, b = Node("a", **kw), Node("b", **kw)
    target = StuckDialTarget(0, "handshaking")
    try:
        await target.open()
        sink_address = Address(HOST, target.port)
        await a.t.start()
        await b.t.start()
        a_addr, b_addr = Address(HOST, a.t.port), Address(HOST, b.t.port)
        a.t.set_members({"a": a_addr, "b": sink_address})
        b.t.set_members({"a": a_addr, "b": b_addr})
        await asyncio.sleep(2.0)
        proofs = sum(1 for e in b.events if isinstance(e, PeerUp))  # b's links up: a accepted its proof
        downs = [e for e in b.events if isinstance(e, PeerDown)]
        assert proofs >= 3 and all("heartbeat timeout" in e.reason for e in downs), b.events
        dials = len(target.accepted)  # a's dials to b, all stuck in the handshake
        assert proofs <= dials <= proofs + 1, f"{dials} dials for {proofs} proofs"
        assert a.t.up_peers == set()
    finally:
        await a.t.stop()
        await b.t.stop()
        target.close()


async def test_heartbeat_timeout_marks_silent_peer_down() -> None:
    async with fake_server(node_id="mute") as (mute, fakes):
        n = Node(
            "a", members={"a": Address(HOST, 0), "mute": mute}, heartbeat_interval=0.05, heartbeat_timeout=0.3
        )
        try:
            await n.t.start()
            await wait_until(lambda: any(isinstance(e, PeerDown) for e in n.events), what="peer down")
            up, down, *_ = (e for e in n.events if isinstance(e, PeerUp | PeerDown))
            assert up == PeerUp("mute")
            assert isinstance(down, PeerDown) and down.node_id == "mute" and "heartbeat" in down.reason
            qc = [e for e in n.events if isinstance(e, QuorumChanged)]
            assert qc[:2] == [QuorumChanged(True, frozenset({"mute"})), QuorumChanged(False, frozenset())]
            assert fakes[0].received >= 2  # hello + at least one ping reached the silent peer
            # it redials (and flaps) rather than giving up
            await wait_until(lambda: len(fakes) >= 2, what="redial")
        finally:
            await n.t.stop()


async def test_write_buffer_limit_drops_link_to_a_peer_that_does_not_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with fake_server(node_id="sink", stop_reading=True) as (sink, _):
        n = Node(
            "a",
            members={"a": Address(HOST, 0), "sink": sink},
            heartbeat_timeout=20.0,
            max_write_buffer=256 * 1024,
        )
        try:
            await n.t.start()
            await wait_until(lambda: n.t.up_peers == {"sink"}, what="sink up")
            chunk = Blob(b"x" * (1 << 20))
            for _ in range(200):
                if not n.t.send("sink", chunk):
                    break
                await asyncio.sleep(0.001)
            await wait_until(lambda: any(isinstance(e, PeerDown) for e in n.events), what="link dropped")
            down = next(e for e in n.events if isinstance(e, PeerDown))
            assert "write buffer" in down.reason
            warnings = [r for r in caplog.records if r.name == n.log.name and r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "not reading" in warnings[0].getMessage()
        finally:
            await n.t.stop()


async def test_set_members_add_and_remove() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        c = Node("c")
        try:
            await c.t.start()
            members = {**a.t.members, "c": Address(HOST, c.t.port)}
            for n in (a, b, c):
                n.t.set_members(members)
            await wait_until(
                lambda: a.t.up_peers == {"b", "c"} and c.t.up_peers == {"a", "b"}, what="c joined"
            )
            a.events.clear()
            del members["c"]
            a.t.set_members(members)
            assert a.t.up_peers == {"b"}
            assert a.events == [PeerDown("c", "removed from membership")]
            assert not a.t.send("c", Note(1))
            await asyncio.sleep(0.2)
            assert a.t.up_peers == {"b"}  # not redialed; c's connections to a were dropped too
        finally:
            await c.t.stop()


async def test_construction_validates_arguments() -> None:
    kw: dict[str, Any] = dict(listen=Address(HOST, 0), cluster_name=CLUSTER, on_message=lambda s, m: None)
    with pytest.raises(TypeError):
        Transport("a", {}, message_type=Union[Note, PeerHello], **kw)  # noqa: UP007
    with pytest.raises(ValueError):
        Transport("a", {}, message_type=Note, heartbeat_interval=1.0, heartbeat_timeout=0.5, **kw)
    with pytest.raises(Exception, match="invalid node id"):
        Transport("bad id!", {}, message_type=Note, **kw)


# ---------------------------------------------------------------------------------------------
# client sessions


def server_node(node_id: str = "srv", **kw: Any) -> tuple[Node, list[ClientSession], list[ClientSession]]:
    opened: list[ClientSession] = []
    closed: list[ClientSession] = []

    def on_client_message(session: ClientSession, msg: Any) -> None:
        if session not in opened:
            opened.append(session)
        if msg.n < 0:
            raise ValueError("negative")
        session.send(Resp(msg.n * 2))

    n = Node(
        node_id,
        client_message_type=Req,
        on_client_message=on_client_message,
        on_client_closed=closed.append,
        **kw,
    )
    return n, opened, closed


async def connect_client(
    srv: Node, client_id: str, on_message: Callable[[Any], None], on_close: Callable[[Exception | None], None]
) -> ClientLink:
    """A client connection to `srv` (started) in this module's cluster, answers typed `Resp`."""
    return await open_client_connection(
        Address(HOST, srv.t.port),
        cluster_name=CLUSTER,
        secret=SECRET,
        client_id=client_id,
        message_type=Resp,
        on_message=on_message,
        on_close=on_close,
    )


async def test_client_round_trip_and_close() -> None:
    srv, opened, closed = server_node()
    got: list[Any] = []
    closes: list[Exception | None] = []
    try:
        await srv.t.start()
        link = await connect_client(srv, "c1", got.append, closes.append)
        assert link.node_id == "srv" and not link.closed
        for i in range(500):
            assert link.send(Req(i))
        await wait_until(lambda: len(got) == 500, what="responses")
        assert got == [Resp(2 * i) for i in range(500)]
        assert opened[0].client_id == "c1" and not opened[0].closed

        link.close()
        await link.wait_closed()
        assert link.closed and not link.send(Req(1))
        assert closes == [None]
        await wait_until(lambda: len(closed) == 1, what="server saw close")
        assert closed[0] is opened[0] and closed[0].closed
    finally:
        await srv.t.stop()


async def test_client_handler_error_logged_and_server_close_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv, opened, _ = server_node()
    got: list[Any] = []
    closes: list[Exception | None] = []
    try:
        await srv.t.start()
        link = await connect_client(srv, "c2", got.append, closes.append)
        link.send(Req(-1))
        link.send(Req(4))
        await wait_until(lambda: got == [Resp(8)], what="response after failing handler")
        assert any(r.exc_info and r.name == srv.log.name for r in caplog.records)
        opened[0].close()
        await wait_until(lambda: len(closes) == 1, what="client on_close")
        assert isinstance(closes[0], ConnectionError)
        assert link.closed
    finally:
        await srv.t.stop()


async def test_client_connection_errors() -> None:
    srv, _, _ = server_node()
    plain = Node("plain")  # accepts no clients
    kw: dict[str, Any] = dict(
        client_id="c", message_type=Resp, on_message=lambda m: None, on_close=lambda e: None, secret=SECRET
    )
    async with fake_server(node_id="x", ack=False) as (silent, _):
        try:
            await srv.t.start()
            await plain.t.start()
            with pytest.raises(ConnectionError, match=r"rejected.*wrong cluster"):
                await open_client_connection(Address(HOST, srv.t.port), cluster_name="other", **kw)
            with pytest.raises(ConnectionError, match="does not accept client"):
                await open_client_connection(Address(HOST, plain.t.port), cluster_name=CLUSTER, **kw)
            with pytest.raises(ConnectionError, match="within"):
                await open_client_connection(silent, cluster_name=CLUSTER, timeout=0.3, **kw)
            with refusing_address() as nowhere, pytest.raises(ConnectionError, match="cannot connect"):
                await open_client_connection(nowhere, cluster_name=CLUSTER, **kw)
            # the server is still fine afterwards
            link = await open_client_connection(Address(HOST, srv.t.port), cluster_name=CLUSTER, **kw)
            link.close()
            await link.wait_closed()
        finally:
            await srv.t.stop()
            await plain.t.stop()


async def test_stop_closes_client_sessions() -> None:
    srv, _, closed = server_node()
    closes: list[Exception | None] = []
    try:
        await srv.t.start()
        link = await connect_client(srv, "c3", lambda m: None, closes.append)
        link.send(Req(1))
        await wait_until(lambda: srv.t._inbound and all(p.session for p in srv.t._inbound), what="session")
    finally:
        await srv.t.stop()
    await wait_until(lambda: len(closes) == 1 and len(closed) == 1, what="both sides closed")
    assert isinstance(closes[0], ConnectionError)


def test_works_on_uvloop() -> None:
    """uvloop transports are not asyncio.Transport subclasses: links, clients and bad input still work."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with cluster(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            sock = a.t._peers["b"].link.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for i in range(1000):
                a.t.send("b", Note(i))
            b.t.broadcast(Note(-1))
            await wait_until(lambda: len(b.inbox) == 1000 and len(a.inbox) == 1, what="uvloop traffic")
            assert [m.seq for _, m in b.inbox] == list(range(1000))
            reader, writer = await asyncio.open_connection(HOST, a.t.port)
            writer.write(b"\x00\x00\x00\x02\xc1\xc1")
            reply = await asyncio.wait_for(reader.read(), 5)  # read() returns at EOF: the node closed it
            assert msgspec.msgpack.decode(FrameDecoder().feed(reply)[0], type=Reject).reason
            writer.close()
            assert a.t.send("b", Note(1000))
            await wait_until(lambda: len(b.inbox) == 1001, what="still working")

    uvloop.run(scenario())


async def test_quorum_counts_the_voters_only_when_set() -> None:
    """Membership changes: the member map may hold nodes that do not count (being added, or just
    removed); with voters set, quorum is a majority of them, and a node outside them has none."""
    async with cluster(["a", "b", "c", "d"]) as nodes:
        a = nodes["a"].t
        await nodes["c"].t.stop()
        await nodes["d"].t.stop()
        await wait_until(lambda: a.up_peers == {"b"}, what="c and d down")
        assert not a.has_quorum()  # 2 of 4
        a.set_voters(["a", "b", "c"])
        assert a.has_quorum()  # 2 of the 3 voters; d does not count
        assert nodes["a"].events[-1] == QuorumChanged(True, frozenset({"b"}))
        a.set_voters(["b", "c", "d"])
        assert not a.has_quorum()  # not a voter itself
        a.set_voters(None)
        assert not a.has_quorum()


@pytest.mark.parametrize("how", ["send", "broadcast"])
async def test_a_message_over_max_frame_is_refused_and_the_link_stays_up(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The peer would close the link on a frame over its max_frame (the same setting on every node):
    # the sender must not write it, or every message queued with it is lost, the peer goes down and
    # whatever produced the message (a retry, a catch-up) produces it again on the next link.
    limit = 64 * 1024
    async with cluster(["a", "b"], max_frame=limit, max_buffered_bytes=4 * limit) as nodes:
        a, b = nodes["a"], nodes["b"]
        big = Blob(b"x" * (limit + 1))
        if how == "send":
            assert a.t.send("b", big) is False
        else:
            a.t.broadcast(big)
        assert a.t.send("b", Note(2))
        await wait_until(lambda: Note(2) in b.got("a"), what="the next message")
        assert big not in b.got("a")
        assert not [e for e in a.events + b.events if isinstance(e, PeerDown)]
        assert a.t.up_peers == {"b"} and b.t.up_peers == {"a"}
        refused = [r for r in caplog.records if r.name == a.log.name and r.levelno == logging.ERROR]
        assert len(refused) == 1
        assert f"Blob of {limit + 1 + 7} bytes" in refused[0].getMessage()
        assert f"max_frame of {limit} bytes" in refused[0].getMessage()
