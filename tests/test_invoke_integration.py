"""Integration test of aether.invoke over three real `Transport`s in one event loop.

Each node has a Transport (port 0 pattern of tests/test_transport.py), an `InvokeServer` whose
`dispatch` is the transport's `on_message`, and an `Invoker` subscribed to PeerDown on the node's
event bus. Slices and the endpoint registry are fakes. Node A streams calls to an artifact whose
instances live on B and C; B's transport is stopped mid-stream: the caller must see zero failures
and the calls must continue on C. Throughput is printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from aether.core.types import Address
from aether.invoke import InvokeBadRequest, InvokeMessage, Invoker, InvokeServer, SliceAppError
from aether.testing.invokenodes import Endpoint as Ep
from aether.testing.invokenodes import InvokeNode, StaticRegistry, make_invoke_node, start_nodes, stop_nodes
from aether.transport import EventBus, PeerDown, Transport

pytestmark = pytest.mark.timeout(60)

CLUSTER = "invoke-test"
ART = "org.demo:echo:1.0.0"
TARGET = "org.demo:echo"


class NoLocalInstance(Exception):
    wire_kind = "no_instance"  # declared like the slices package's error


class EchoSlices:
    def __init__(self, node_id: str, active: bool, work: float) -> None:
        self.node_id = node_id
        self.active = active
        self.work = work
        self.served = 0

    def has_room(self, target: str, method: str) -> bool:
        return bool(self.local_instances(target))

    def local_instances(self, target: str) -> list[int]:
        return [0] if self.active and ART.startswith(target) else []

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        if not self.active:
            raise NoLocalInstance(f"no ACTIVE instance of {artifact} on {self.node_id}")
        await asyncio.sleep(self.work)
        self.served += 1
        return self.node_id.encode() + b":" + payload


def make_member(
    node_id: str, registry: StaticRegistry, active: bool, work: float, **invoker_kw: Any
) -> InvokeNode:
    return make_invoke_node(
        node_id,
        EchoSlices(node_id, active, work),
        registry,  # deliberately NOT updated when a node dies
        cluster_name=CLUSTER,
        logger=logging.getLogger(f"test.invoke.{uuid.uuid4().hex[:6]}.{node_id}"),
        **invoker_kw,
    )


async def test_stream_survives_a_target_node_stopping_mid_stream() -> None:
    registry = StaticRegistry([Ep(ART, "echo", 0, "B"), Ep(ART, "echo", 1, "C")])
    # a long per-attempt timeout: calls pending on B can only fail over fast through PeerDown
    members = {
        "A": make_member("A", registry, active=False, work=0.0, attempt_timeout=5.0),
        "B": make_member("B", registry, active=True, work=0.001),
        "C": make_member("C", registry, active=True, work=0.001),
    }
    a, b = members["A"], members["B"]
    loop = asyncio.get_running_loop()
    try:
        await start_nodes(list(members.values()))

        workers = 32
        stop_at: list[float] = []  # loop time when B's transport had stopped
        results: list[tuple[float, float, str]] = []  # (started, finished, served by)
        failures: list[BaseException] = []
        running = True

        async def worker(w: int) -> None:
            n = 0
            while running:
                n += 1
                t0 = loop.time()
                try:
                    out = await a.invoker.invoke(TARGET, "echo", f"{w}-{n}".encode())
                except Exception as exc:
                    failures.append(exc)
                    continue
                assert out.endswith(f":{w}-{n}".encode())
                results.append((t0, loop.time(), out.split(b":", 1)[0].decode()))

        tasks = [asyncio.create_task(worker(w)) for w in range(workers)]
        await asyncio.sleep(1.0)
        phase1 = len(results)
        t_stop0 = loop.time()
        pending_on_b = a.invoker._calls.peers().count("B")
        await b.transport.stop()
        stop_at.append(loop.time())
        await asyncio.sleep(1.0)
        running = False
        await asyncio.wait_for(asyncio.gather(*tasks), 10.0)
        t_end = loop.time()

        assert failures == [], f"{len(failures)} failed calls, first: {failures[0]!r}"
        after = [r for r in results if r[1] > stop_at[0]]
        assert after, "no calls completed after B stopped"
        assert {r[2] for r in after} == {"C"}
        assert {r[2] for r in results if r[1] < t_stop0} == {"B", "C"}
        assert a.invoker.stats.retries >= 1, (
            "no call was pending on B when it stopped (failover not exercised)"
        )
        worst = max(r[1] - r[0] for r in results)
        assert worst < 4.0, f"a call took {worst:.2f}s: failover waited for the per-attempt timeout"
        assert a.invoker.pending_count == 0

        phase2 = len(results) - phase1
        rate1 = phase1 / 1.0
        rate2 = phase2 / (t_end - t_stop0)
        print(
            f"\ninvoke integration: {len(results)} calls, 0 failures, {workers} concurrent callers; "
            f"{rate1:.0f} calls/s over B+C, {rate2:.0f} calls/s over C only after B stopped; "
            f"{pending_on_b} calls pending on B at the stop, {a.invoker.stats.retries} retries; "
            f"slowest call {worst * 1000:.1f} ms"
        )
    finally:
        await stop_nodes(members.values(), grace=1.0)


class SizedSlices:
    """Entry "big" answers `size` bytes, "small" a few; every call's payload length is recorded."""

    def __init__(self, active: bool, size: int) -> None:
        self.active = active
        self.size = size
        self.ran: list[tuple[str, int]] = []

    def has_room(self, target: str, method: str) -> bool:
        return self.active

    def local_instances(self, target: str) -> list[int]:
        return [0] if self.active else []

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        self.ran.append((method, len(payload)))
        return b"x" * self.size if method == "big" else b"ok"


def sized_member(node_id: str, slices: SizedSlices, registry: StaticRegistry, max_frame: int) -> InvokeNode:
    """A node as `make_invoke_node` makes one, with a transport of a small `max_frame`."""
    bus = EventBus()
    box: dict[str, InvokeServer] = {}
    transport = Transport(
        node_id,
        {node_id: Address("127.0.0.1", 0)},
        listen=Address("127.0.0.1", 0),
        cluster_name=CLUSTER,
        message_type=InvokeMessage,
        on_message=lambda sender, msg: box["server"].dispatch(sender, msg),
        bus=bus,
        logger=logging.getLogger(f"test.invoke.{uuid.uuid4().hex[:6]}.{node_id}"),
        max_frame=max_frame,
    )
    invoker = Invoker(node_id, slices, registry, transport, bus=bus, default_timeout=3.0)
    server = box["server"] = InvokeServer(node_id, slices, transport, invoker=invoker)
    return InvokeNode(node_id, transport, bus, invoker, server)


async def test_a_message_larger_than_a_frame_fails_the_call_and_leaves_the_links_up() -> None:
    """A result (or an argument) larger than the transport's `max_frame` used to be written all the
    same: the receiving node closed the link on its frame header, the sender saw its peer down, the
    caller heard nothing and retried the entry until its deadline (a 504 after the whole timeout,
    the entry run once per attempt, the link between the two nodes reset each time, failing over
    every other call on it). Now the callee answers app_error and the caller refuses to send a
    request that large: both fail at once with a clear error, and no link goes down."""
    limit = 64 * 1024
    registry = StaticRegistry([Ep(ART, "big", 0, "B"), Ep(ART, "small", 0, "B")])
    sb = SizedSlices(True, limit + 1000)
    a = sized_member("A", SizedSlices(False, 0), registry, limit)
    b = sized_member("B", sb, registry, limit)
    downs: list[PeerDown] = []
    a.bus.subscribe(PeerDown, downs.append)
    b.bus.subscribe(PeerDown, downs.append)
    loop = asyncio.get_running_loop()
    try:
        await start_nodes([a, b])
        t0 = loop.time()
        with pytest.raises(SliceAppError, match=r"result of \d+ bytes is larger than the largest message"):
            await a.invoker.invoke(ART, "big", b"", timeout=3.0)
        assert loop.time() - t0 < 1.0, "the caller waited for an answer that could not come"
        assert sb.ran == [("big", 0)], "the entry ran again"
        with pytest.raises(InvokeBadRequest, match=r"request of \d+ bytes is larger than the largest"):
            await a.invoker.invoke(ART, "small", b"y" * limit, timeout=3.0)
        assert sb.ran == [("big", 0)], "the request was sent"
        assert await a.invoker.invoke(ART, "small", b"y" * (limit - 1024), timeout=3.0) == b"ok"
        await asyncio.sleep(0.2)
        assert downs == [], f"a link went down: {downs}"
        assert a.invoker.pending_count == 0
    finally:
        await stop_nodes([a, b], grace=1.0)
