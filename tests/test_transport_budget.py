"""The node-wide budget of bytes held in unfinished inbound frames (issue 12, `max_buffered_bytes`;
docs/cluster-security.md): the accounting sans IO, then authenticated clients against a real
Transport pair over loopback sockets, then the node config values that set the limits."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, cast
from unittest.mock import ANY

import msgspec
import psutil
import pytest

from aether.core.config import NodeConfig
from aether.core.errors import ConfigError
from aether.core.types import Address, PeerSpec
from aether.transport import Challenge, ClientHello, HelloAck, Proof, Transport
from aether.transport._link import BufferBudget, LinkProtocol
from aether.transport.auth import Credentials, DialerHandshake
from test_transport import Note, PeerMsg
from test_transport_badinput import CLUSTER, HOST, SECRET, env, frame, wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# the accounting, sans IO


class FakeConn:
    """What `BufferBudget` uses of a connection."""

    def __init__(self, name: str, *, peer: bool) -> None:
        self.name = name
        self.peer = peer
        self.paused = False
        self.closed = ""

    def may_wait_for_budget(self) -> bool:
        return self.peer

    def pause_for_budget(self) -> None:
        self.paused = True

    def resume_for_budget(self) -> None:
        self.paused = False

    def budget_refused(self, need: int, budget: BufferBudget) -> None:
        self.closed = "refused"
        budget.release(cast(LinkProtocol, self))

    def budget_evicted(self, held: int, peer: Any, budget: BufferBudget) -> None:
        self.closed = f"evicted for {peer.name}"
        budget.release(cast(LinkProtocol, self))

    def describe(self) -> str:
        return self.name


def _conn(name: str, *, peer: bool) -> Any:
    return FakeConn(name, peer=peer)


def test_clients_reserve_whole_frames_and_are_refused_beyond_the_limit() -> None:
    b = BufferBudget(100)
    c1, c2, c3 = _conn("c1", peer=False), _conn("c2", peer=False), _conn("c3", peer=False)
    b.settle(c1, 60, 10)  # a header announcing 56 bytes: the whole frame is reserved
    b.settle(c2, 40, 40)
    assert b.used == 100 and not c1.closed and not c2.closed
    b.settle(c3, 2, 2)  # even 2 more bytes do not fit: closed, not paused
    assert c3.closed == "refused" and not c3.paused and b.used == 100 and b.refused == 1
    b.settle(c1, 0, 0)  # c1's frame completed
    assert b.used == 40 and b.charged(c1) == 0
    b.release(c2)  # c2 closed
    assert b.used == 0 and b.peak == 100


def test_a_peer_evicts_clients_largest_first_then_waits_fifo() -> None:
    b = BufferBudget(100)
    small, big = _conn("small", peer=False), _conn("big", peer=False)
    p1, p2, p3 = _conn("p1", peer=True), _conn("p2", peer=True), _conn("p3", peer=True)
    b.settle(small, 20, 20)
    b.settle(big, 50, 50)
    b.settle(p1, 40, 5)  # 30 free: the biggest client makes room, the small one stays
    assert big.closed == "evicted for p1" and not small.closed and not p1.paused
    assert b.used == 60 and b.evicted == 1
    b.settle(p2, 50, 7)  # 40 free: evicts small (20) -> 60 free... 60 >= 50: fits
    assert small.closed == "evicted for p2" and not p2.paused and b.used == 90
    b.settle(p3, 30, 4)  # no client left to evict, p1 and p2 are reading: p3 waits holding 4
    assert p3.paused and b.waiting == 1 and b.used == 94 and b.charged(p3) == 4
    late = _conn("late", peer=False)
    b.settle(late, 3, 3)  # fits in what is left, but a peer waits: the client is refused
    assert late.closed == "refused"
    b.settle(p1, 0, 0)  # p1's frame done: 40 freed, p3's 30 now fit
    assert not p3.paused and b.waiting == 0 and b.charged(p3) == 30 and b.used == 80
    b.release(p2)
    b.release(p3)
    assert b.used == 0 and b.waiting == 0


def test_a_peer_never_waits_for_room_nobody_will_free() -> None:
    b = BufferBudget(100)
    p1, p2 = _conn("p1", peer=True), _conn("p2", peer=True)
    b.settle(p1, 90, 10)
    b.settle(p2, 50, 6)  # p1 reads on: p2 waits
    assert p2.paused and b.used == 96
    b.release(p1)  # p1's connection dropped mid-frame: its share frees and p2 resumes
    assert not p2.paused and b.used == 50
    p3 = _conn("p3", peer=True)
    b.settle(p2, 80, 60)
    b.settle(p3, 40, 4)  # only p2 holds room and it is reading: p3 waits
    assert p3.paused
    b.settle(p2, 81, 70)  # p2 grows (a new frame), p3 waiting holds 4: 85 fits
    assert p3.paused and b.used == 85
    b.release(p2)
    assert not p3.paused and b.used == 40 and b.waiting == 0


def test_closing_releases_the_share_once() -> None:
    b = BufferBudget(10)
    c = _conn("c", peer=False)
    b.settle(c, 7, 7)
    b.release(c)
    b.release(c)
    assert b.used == 0


# ---------------------------------------------------------------------------------------------
# against a running Transport pair: authenticated clients hog, peers keep working


ANNOUNCE = 8 * MiB  # each client announces a frame of this payload size...
SEND = 6 * MiB  # ...and sends this much of it, then stalls
CLIENTS = 16
BUDGET = 32 * MiB  # room for 3 such frames (3 x (8 MiB + 4))
FIT = BUDGET // (ANNOUNCE + 4)
RSS_BOUND = 48 * MiB  # without the budget: 16 x 6 MiB = 96 MiB held


def _read_frame(s: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError("closed by the node")
            data += chunk
        return data

    (size,) = struct.unpack(">I", exactly(4))
    return exactly(size)


def _authenticated_client(port: int, client_id: str) -> socket.socket:
    """A blocking socket that completed the client handshake with node a."""
    s = socket.create_connection((HOST, port), timeout=10)
    auth = DialerHandshake(Credentials(CLUSTER, secret=SECRET), "client", client_id)
    s.sendall(frame(ClientHello(CLUSTER, client_id, auth.nonce)))
    ch = msgspec.msgpack.decode(_read_frame(s), type=Challenge)
    s.sendall(frame(Proof(auth.answer(ch.node_id, ch.nonce, ch.proof))))
    assert msgspec.msgpack.decode(_read_frame(s), type=HelloAck) == HelloAck("a", ANY)
    return s


def _hog(port: int) -> tuple[list[socket.socket], int]:
    """CLIENTS authenticated clients each announce ANNOUNCE bytes and send SEND of them; returns the
    sockets and how many the node cut off while sending."""
    socks: list[socket.socket] = []
    cut = 0
    chunk = memoryview(b"\x00" * (256 * 1024))
    for i in range(CLIENTS):
        s = _authenticated_client(port, f"hog-{i}")
        socks.append(s)
        try:
            s.sendall(struct.pack(">I", ANNOUNCE))
            for _ in range(SEND // len(chunk)):
                s.sendall(chunk)
        except OSError:
            cut += 1
    return socks, cut


async def test_authenticated_clients_cannot_buffer_more_than_the_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    proc = psutil.Process()
    async with env(caplog, max_buffered_bytes=BUDGET) as e:
        a: Transport = e.a
        budget = a.buffer_budget
        assert budget.limit == BUDGET and a.buffered_bytes == 0
        rss_before = proc.memory_info().rss
        socks, _cut = await asyncio.to_thread(_hog, a.port)
        try:
            # FIT clients hold their reservation; every later one was closed at its frame header
            await wait_until(
                lambda: budget.refused == CLIENTS - FIT and a.buffered_bytes == FIT * (ANNOUNCE + 4),
                what=f"{FIT} clients holding {ANNOUNCE} byte frames, the rest refused",
            )
            await asyncio.sleep(0.3)  # let every byte sent reach the node
            grown = proc.memory_info().rss - rss_before
            print(f"budget {BUDGET / MiB:.0f} MiB, peak {budget.peak / MiB:.1f} MiB, RSS +{grown / MiB:.1f}")
            assert budget.peak <= BUDGET, budget.peak
            assert grown < RSS_BOUND, f"RSS grew by {grown / MiB:.1f} MiB with {CLIENTS} hogging clients"
            assert any("does not fit the node's buffer budget" in r.getMessage() for r in e.warnings())

            # peers keep working: small messages, and a 10 MiB frame each way; a needs room for it
            # and closes a hogging client to make it
            await e.assert_still_working(1)
            big = "x" * (10 * MiB)
            assert e.b.send("a", Note(2, big)) and e.a.send("b", Note(2, big))
            await wait_until(
                lambda: ("b", Note(2, big)) in e.inbox["a"] and ("a", Note(2, big)) in e.inbox["b"],
                what="10 MiB notes both ways",
            )
            assert budget.evicted >= 1 and budget.waiting == 0
            assert any("to make room for peer 'b'" in r.getMessage() for r in e.warnings())
            assert budget.peak <= BUDGET, budget.peak
            await e.assert_still_working(3)
        finally:
            for s in socks:
                s.close()
        # every share returns when the connections close
        await wait_until(lambda: a.buffered_bytes == 0, what="the accounting back to 0")
        assert budget.waiting == 0 and not budget._holders
        await e.assert_still_working(4)


async def test_transport_rejects_a_budget_smaller_than_one_frame() -> None:
    with pytest.raises(ValueError, match="must hold at least one largest frame"):
        Transport(
            "a", {"a": Address(HOST, 0)}, listen=Address(HOST, 0), cluster_name=CLUSTER,
            message_type=PeerMsg, on_message=lambda s, m: None, max_frame=MiB, max_buffered_bytes=MiB,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# node config


def _config(**kw: Any) -> NodeConfig:
    return NodeConfig(node_id="n1", peers=[PeerSpec("n1", Address(HOST, 7000))], **kw)


def test_node_config_limits_are_validated_with_clear_errors() -> None:
    c = _config().validate()
    assert (c.max_buffered_bytes, c.pre_auth_max_frame, c.handshake_timeout) == (256 * MiB, 4096, None)
    _config(max_buffered_bytes=32 * MiB, pre_auth_max_frame=256, handshake_timeout=300).validate()
    with pytest.raises(ConfigError, match=r"max_buffered_bytes must be at least 33554432 .*got 1000000\)"):
        _config(max_buffered_bytes=1_000_000).validate()
    for bad in (100, 2 * MiB):
        expected = rf"pre_auth_max_frame must be between 256 and 1048576 bytes \(got {bad}\)"
        with pytest.raises(ConfigError, match=expected):
            _config(pre_auth_max_frame=bad).validate()
    for bad_t in (0.0, -1.0, 301.0):
        with pytest.raises(ConfigError, match=r"handshake_timeout must be > 0 and <= 300 seconds"):
            _config(handshake_timeout=bad_t).validate()


def test_node_config_limits_from_toml_and_flags(tmp_path: Any) -> None:
    from aether.cli.main import build_node_config, parse_size

    toml = tmp_path / "aether.toml"
    toml.write_text(
        "[node]\npre_auth_max_frame = 2048\nhandshake_timeout = 2.5\nmax_buffered_bytes = 40000000\n"
    )
    c = build_node_config(str(toml), {"max_buffered_bytes": None})
    assert (c.max_buffered_bytes, c.pre_auth_max_frame, c.handshake_timeout) == (40_000_000, 2048, 2.5)
    c = build_node_config(str(toml), {"max_buffered_bytes": parse_size("64MiB", "--max-buffered-bytes")})
    assert c.max_buffered_bytes == 64 * MiB
    assert parse_size("1 GiB", "x") == 1 << 30 and parse_size("500mb", "x") == 500_000_000
    assert parse_size("1048576", "x") == MiB
    import click

    with pytest.raises(click.BadParameter, match="not a size"):
        parse_size("lots", "--max-buffered-bytes")
    toml.write_text("[node]\npre_auth_max_frame = 10\n")
    with pytest.raises(ConfigError, match="pre_auth_max_frame must be between"):
        build_node_config(str(toml), {})


def test_node_passes_the_limits_to_its_transport(tmp_path: Any) -> None:
    from aether.node.node import Node

    config = _config(
        data_dir=str(tmp_path / "data"), fsync="none", max_buffered_bytes=40 * MiB, pre_auth_max_frame=1024,
        handshake_timeout=2.0, repository=str(tmp_path / "repo"),
    )  # fmt: skip
    node = Node(config.validate())
    t = node.transport
    assert (t.buffer_budget.limit, t._pre_auth_max_frame, t._handshake_timeout) == (40 * MiB, 1024, 2.0)
