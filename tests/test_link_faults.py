"""Link faults injected in the transport (issue 16): the pure decision (`aether.transport.faults`)
and its application by `Transport.set_link_fault` on real loopback links (delay, order, loss,
heartbeats, partitions, healing)."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import msgspec
import pytest

from aether.transport import LinkFault, PeerDown
from aether.transport.faults import DROP, decide
from test_transport import Note, cluster, wait_until

pytestmark = pytest.mark.timeout(60)


# ---- the decision (sans-IO) ---------------------------------------------------------------------


def test_no_fault_sends_at_once() -> None:
    rng = random.Random(1)
    assert decide(LinkFault(), rng, 10.0, 0.0) == 10.0
    assert decide(LinkFault(delay_ms=250), rng, 10.0, 0.0) == pytest.approx(10.25)


def test_blocked_drops_everything() -> None:
    rng = random.Random(2)
    fault = LinkFault(blocked=True, delay_ms=5)
    assert all(decide(fault, rng, float(t), 0.0) is DROP for t in range(10_000))


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
def test_loss_fraction_is_close_to_the_rate(rate: float) -> None:
    rng = random.Random(1234)
    fault = LinkFault(loss=rate)
    n = 20_000
    lost = sum(decide(fault, rng, 0.0, 0.0) is DROP for _ in range(n))
    # binomial: 5 standard deviations (and exact at 0 and 1)
    assert abs(lost / n - rate) <= 5 * math.sqrt(rate * (1 - rate) / n) + 1e-9


def test_jitter_keeps_fifo_order_and_stays_within_bounds() -> None:
    rng = random.Random(7)
    fault = LinkFault(delay_ms=100, jitter_ms=80)
    prev = 0.0
    now = 0.0
    dues = []
    for _ in range(5_000):
        now += rng.uniform(0, 0.01)  # frames sent 0-10 ms apart, much less than the jitter
        due = decide(fault, rng, now, prev)
        assert due is not None
        assert due >= prev  # never before the frame sent before it
        assert due >= now + 0.020 - 1e-9  # delay - jitter
        assert due <= max(prev, now + 0.180 + 1e-9)  # delay + jitter (or waiting behind the previous)
        dues.append(due)
        prev = due
    assert dues == sorted(dues)
    # the jitter really varies the delays (not all pinned to the previous one)
    assert len({round(d - i, 6) for i, d in enumerate(dues)}) > 100


def test_jitter_never_makes_a_negative_delay() -> None:
    rng = random.Random(3)
    fault = LinkFault(delay_ms=5, jitter_ms=50)
    for _ in range(2_000):
        due = decide(fault, rng, 100.0, 0.0)
        assert due is not None and due >= 100.0


def test_the_same_seed_gives_the_same_fates() -> None:
    fault = LinkFault(delay_ms=20, jitter_ms=10, loss=0.3)
    runs = []
    for _ in range(2):
        rng = random.Random(99)
        runs.append([decide(fault, rng, i * 0.001, 0.0) for i in range(200)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": float("nan")}, "delay_ms"),
        ({"delay_ms": float("inf")}, "delay_ms"),
        ({"jitter_ms": -0.5}, "jitter_ms"),
        ({"loss": 1.5}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"loss": float("nan")}, "loss"),
        ({"delay_ms": 1e9}, "delay_ms"),
    ],
)
def test_invalid_faults_are_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LinkFault(**kwargs)
    if all(math.isfinite(v) for v in kwargs.values()):  # JSON has no NaN or infinity
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.json.decode(msgspec.json.encode(kwargs), type=LinkFault)


def test_decoding_a_fault() -> None:
    f = msgspec.json.decode(b'{"delay_ms": 300, "loss": 0.25}', type=LinkFault)
    assert f == LinkFault(delay_ms=300.0, loss=0.25)
    assert f.describe() == "delay 300 ms, loss 25%"
    assert LinkFault(blocked=True).describe() == "blocked"
    assert LinkFault().describe() == "none"
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"delay": 3}', type=LinkFault)


# ---- on real links ------------------------------------------------------------------------------


async def _round_trip_time(a: Any, b: Any, seq: int) -> float:
    """Seconds from a.send(Note) to its arrival at b."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert a.t.send(b.id, Note(seq))
    await wait_until(lambda: any(m.seq == seq for m in b.got(a.id)), what=f"note {seq}")
    return loop.time() - t0


async def test_delay_applies_to_one_direction_only_and_heals() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        base = await _round_trip_time(a, b, 1)
        a.t.set_link_fault("b", LinkFault(delay_ms=300))
        assert a.t.link_faults() == {"b": LinkFault(delay_ms=300)}
        slow = await _round_trip_time(a, b, 2)
        assert slow >= 0.29 and slow > base + 0.2
        back = await _round_trip_time(b, a, 3)  # the other direction is not delayed
        assert back < 0.2
        # heartbeats keep flowing (300 ms < heartbeat_timeout 600 ms): nobody went down
        await asyncio.sleep(0.8)
        assert a.t.up_peers == {"b"} and b.t.up_peers == {"a"}
        a.t.clear_faults()
        assert a.t.link_faults() == {}
        await asyncio.sleep(0.35)  # the frames delayed before (pings) leave first: order is kept
        assert await _round_trip_time(a, b, 4) < 0.2


async def test_jittered_frames_arrive_in_order() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        a.t.set_link_fault("b", LinkFault(delay_ms=50, jitter_ms=45))
        for i in range(200):
            assert a.t.send("b", Note(i))
            if i % 10 == 0:
                await asyncio.sleep(0.005)
        await wait_until(lambda: len(b.got("a")) == 200, what="200 notes")
        assert [m.seq for m in b.got("a")] == list(range(200))


async def test_clearing_a_delay_keeps_the_order_of_frames_in_flight() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        a.t.set_link_fault("b", LinkFault(delay_ms=200))
        for i in range(10):
            a.t.send("b", Note(i))
        link = a.t._peers["b"].link
        assert link is not None and link.delayed_frames == 10 and link.frames_delayed == 10
        a.t.set_link_fault("b", None)  # healed while 10 frames are still delayed
        for i in range(10, 20):
            a.t.send("b", Note(i))  # must not overtake them
        await wait_until(lambda: len(b.got("a")) == 20, what="20 notes")
        assert [m.seq for m in b.got("a")] == list(range(20))
        assert link.fault is None and link.delayed_frames == 0  # back to the plain path once drained


async def test_loss_drops_about_that_share_of_messages() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        a.t._fault_rng.seed(5)
        a.t.set_link_fault("b", LinkFault(loss=0.3))
        for i in range(2000):
            a.t.send("b", Note(i))
        a.t.set_link_fault("b", None)
        a.t.send("b", Note(-1))  # a marker: everything before it has arrived when it has
        await wait_until(lambda: any(m.seq == -1 for m in b.got("a")), what="marker")
        got = [m.seq for m in b.got("a") if m.seq >= 0]
        assert got == sorted(got)
        assert 0.6 < len(got) / 2000 < 0.8
        link = a.t._peers["b"].link
        assert link is not None and link.frames_dropped >= 2000 - len(got)  # pings may be lost too


async def test_total_loss_takes_the_heartbeats_too() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        a.t.set_link_fault("b", LinkFault(loss=1.0))
        # b hears nothing from a (no pings get through): it sees a down, then a sees b down too
        await wait_until(lambda: "a" not in b.t.up_peers, timeout=5, what="b sees a down")
        await wait_until(lambda: "b" not in a.t.up_peers, timeout=5, what="a sees b down")
        a.t.set_link_fault("b", None)
        await wait_until(lambda: a.t.up_peers == {"b"} and b.t.up_peers == {"a"}, timeout=10, what="healed")


async def test_blocking_one_node_partitions_it_and_healing_rejoins() -> None:
    async with cluster(["a", "b", "c"]) as nodes:
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        for other in ("b", "c"):  # a cut off both ways
            a.t.set_link_fault(other, LinkFault(blocked=True))
            nodes[other].t.set_link_fault("a", LinkFault(blocked=True))
        await wait_until(
            lambda: b.t.up_peers == {"c"} and c.t.up_peers == {"b"} and not a.t.up_peers,
            timeout=5, what="partition",
        )
        assert b.t.has_quorum() and c.t.has_quorum() and not a.t.has_quorum()
        assert any(isinstance(e, PeerDown) and e.node_id == "a" for e in b.events)
        # it stays cut off: redials do not complete their handshake through the block
        await asyncio.sleep(1.5)
        assert not a.t.up_peers and "a" not in b.t.up_peers and "a" not in c.t.up_peers
        # messages to it are accepted by send only while the link is up (here: never)
        assert not b.t.send("a", Note(1))
        for other in ("b", "c"):
            a.t.set_link_fault(other, None)
            nodes[other].t.clear_faults()
        await wait_until(
            lambda: all(n.t.up_peers == {"a", "b", "c"} - {i} for i, n in nodes.items()),
            timeout=15, what="healed",
        )
        assert b.t.send("a", Note(2))
        await wait_until(lambda: any(m.seq == 2 for m in a.got("b")), what="delivered after healing")


async def test_a_fault_applies_to_links_made_later_and_is_dropped_with_the_member() -> None:
    async with cluster(["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        a.t.set_link_fault("b", LinkFault(delay_ms=200))
        old = a.t._peers["b"].link
        assert old is not None
        old.abort("test: reconnect")  # a new outbound link is dialed: it must be faulted too
        await wait_until(lambda: a.t.up_peers == {"b"} and a.t._peers["b"].link is not old, what="redial")
        new = a.t._peers["b"].link
        assert new is not None and new.fault == LinkFault(delay_ms=200)
        assert await _round_trip_time(a, b, 7) >= 0.19
        members = a.t.members
        a.t.set_members({"a": members["a"]})
        assert a.t.link_faults() == {}


async def test_unknown_peers_are_refused() -> None:
    async with cluster(["a", "b"]) as nodes:
        a = nodes["a"]
        with pytest.raises(KeyError, match="not a member"):
            a.t.set_link_fault("zz", LinkFault(blocked=True))
        with pytest.raises(KeyError, match="itself"):
            a.t.set_link_fault("a", LinkFault(blocked=True))
        assert a.t.link_faults() == {}
