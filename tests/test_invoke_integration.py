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

from aether.testing.invokenodes import Endpoint as Ep
from aether.testing.invokenodes import InvokeNode, StaticRegistry, make_invoke_node, start_nodes, stop_nodes

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
