"""The list-append checker and the virtual-time loop the node simulation runs on."""

from __future__ import annotations

import asyncio

import pytest

from aether.testing.listappend import Append, Read, check_list_append, decode_list, encode_list
from aether.testing.vloop import SimDeadlock, VirtualTimeLoop


def ok(client: str, elem: int, call: float, ret: float, key: str = "k") -> Append:
    return Append(client, key, elem, call, ret, "ok")


def test_a_consistent_history_passes() -> None:
    appends = [ok("a", 1, 0.0, 1.0), ok("b", 2, 0.5, 2.0), Append("c", "k", 3, 2.5, None, "maybe")]
    reads = [Read("a", "k", (1,), 1.1, 1.2), Read("b", "k", (1, 2), 2.1, 2.2)]
    assert check_list_append(appends, reads, {"k": [1, 2]}) == []
    assert check_list_append(appends, reads, {"k": [1, 2, 3]}) == []  # the maybe took effect


def test_lost_duplicated_and_phantom_elements() -> None:
    appends = [ok("a", 1, 0.0, 1.0), ok("b", 2, 0.5, 2.0), Append("c", "k", 3, 0.1, None, "fail")]
    assert any("lost" in p for p in check_list_append(appends, [], {"k": [2]}))
    assert any("twice" in p for p in check_list_append(appends, [], {"k": [1, 2, 1]}))
    assert any("never appended" in p for p in check_list_append(appends, [], {"k": [1, 2, 9]}))
    assert any("definitely rejected" in p for p in check_list_append(appends, [], {"k": [1, 2, 3]}))


def test_real_time_order_of_appends() -> None:
    appends = [ok("a", 1, 0.0, 1.0), ok("b", 2, 1.5, 2.0)]  # 1 acknowledged before 2 was invoked
    probs = check_list_append(appends, [], {"k": [2, 1]})
    assert any("yet comes after it" in p for p in probs)


def test_reads_must_be_prefixes_fresh_and_monotonic() -> None:
    appends = [ok("a", 1, 0.0, 1.0), ok("b", 2, 0.5, 2.0)]
    final = {"k": [1, 2]}
    assert any("not a prefix" in p for p in check_list_append(appends, [Read("r", "k", (2,), 3, 4)], final))
    assert any("stale read" in p for p in check_list_append(appends, [Read("r", "k", (), 1.5, 1.6)], final))
    early = Read("r", "k", (1, 2), 0.1, 0.2)  # read 2 before its append was invoked
    assert any("before its append" in p for p in check_list_append(appends, [early], final))
    reads = [Read("r", "k", (1, 2), 2.1, 2.2), Read("s", "k", (1,), 2.3, 2.4)]
    assert any("longer" in p for p in check_list_append(appends, reads, final))


def test_list_encoding_round_trips() -> None:
    assert decode_list(encode_list([3, 1, 2])) == (3, 1, 2)
    assert decode_list(None) == () and decode_list(b"") == ()


def test_virtual_loop_jumps_to_the_next_timer() -> None:
    loop = VirtualTimeLoop(start=10.0)
    seen: list[tuple[str, float]] = []

    async def main() -> None:
        async def at(d: float, tag: str) -> None:
            await asyncio.sleep(d)
            seen.append((tag, loop.time()))

        await asyncio.gather(at(3600.0, "hour"), at(0.25, "quarter"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(100), 1.5)
        seen.append(("timeout", loop.time()))

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert seen == [("quarter", 10.25), ("hour", 3610.0), ("timeout", 3611.5)]


def test_virtual_loop_reports_a_deadlock() -> None:
    loop = VirtualTimeLoop()
    fut = loop.create_future()
    with pytest.raises(SimDeadlock):
        loop.run_until_complete(fut)
    loop.close()
