"""`LoopLagProbe`: the node status's event-loop lag measurement."""

from __future__ import annotations

import asyncio
import time

import pytest

from aether.node.looplag import LoopLagProbe

pytestmark = pytest.mark.timeout(10)


def test_window_keeps_the_largest_recent_lag_and_forgets_old_ones() -> None:
    now = [100.0]
    p = LoopLagProbe(interval=0.05, window=10.0, clock=lambda: now[0])
    p.record(100.0, 0.002)
    p.record(100.0, 0.4)
    assert p.max_recent() == 0.4
    now[0] = 111.0
    p.record(111.0, 0.001)
    assert p.max_recent() == 0.001  # the 0.4 s block ended more than 10 s ago


async def test_a_blocked_loop_shows_up_in_the_measurement() -> None:
    p = LoopLagProbe(interval=0.01)
    p.start()
    try:
        await asyncio.sleep(0.05)
        assert p.max_recent() < 0.2
        time.sleep(0.3)  # block the loop
        await asyncio.sleep(0.05)
        assert 0.25 <= p.max_recent() < 2.0
    finally:
        await p.stop()


async def test_kv_store_reports_failing_writes_until_one_succeeds() -> None:
    """The node status's `store_write_failing_for` / `store_write_error` come from these fields."""
    from types import SimpleNamespace

    from aether.core.errors import QuorumLost
    from aether.kv.machine import KVStateMachine
    from aether.kv.store import KVStore

    fail = [True]
    sm = KVStateMachine()

    async def apply(commands: list[bytes], timeout: float) -> list[bytes]:
        if fail[0]:
            raise QuorumLost("no quorum: this node cannot reach a majority")
        return [sm.apply(commands[0])]

    runner = SimpleNamespace(
        engine=SimpleNamespace(incarnation=1), after_apply=[], on_installed=[], apply=apply
    )
    kv = KVStore(runner, sm, "node-1")  # type: ignore[arg-type]
    assert (kv.write_failures, kv.failing_since, kv.last_write_error) == (0, None, None)
    for _ in range(2):
        with pytest.raises(QuorumLost):
            await kv.put("user/a", b"1")
    assert kv.write_failures == 2 and kv.failing_since is not None and "no quorum" in str(kv.last_write_error)
    fail[0] = False
    await kv.put("user/a", b"1")
    assert (kv.write_failures, kv.failing_since, kv.last_write_error) == (2, None, None)
