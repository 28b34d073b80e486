"""SliceRuntime capacity (issue 15): concurrency limits and their queue, instance load counters,
health checks."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.errors import wire_kind_of
from aether.core.problem import problem_for, problem_headers
from aether.core.secrets import ResolvedConfig
from aether.slices import InstanceOverloaded, NoLocalInstance
from aether.slices.capacity import Gate, SliceLimits
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import StoreInvoker, build_slice_wheel, isolated_imports

pytestmark = pytest.mark.timeout(30)

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode

LIMITED = """
import asyncio
from aether.slices import Slice, entry

GATES = {}
RUNNING = []
HEALTH = {"answer": True, "sleep": 0.0, "calls": 0}

class Limited(Slice):
    @entry
    async def slow(self, key: str) -> str:
        RUNNING.append((self.context.instance, key))
        await GATES.setdefault(key, asyncio.Event()).wait()
        return key

    @entry
    async def fast(self) -> int:
        return self.context.instance

    @entry
    async def boom(self) -> int:
        raise RuntimeError("boom")

    async def health(self):
        HEALTH["calls"] += 1
        if HEALTH["sleep"]:
            await asyncio.sleep(HEALTH["sleep"])
        answer = HEALTH["answer"]
        if isinstance(answer, Exception):
            raise answer
        return answer
"""

PLAIN = """
from aether.slices import Slice, entry

class Plain(Slice):
    @entry
    async def ping(self) -> int:
        return 1
"""

LIM = Artifact.parse("org.example:limited:1.0.0")
PLN = Artifact.parse("org.example:plain:1.0.0")


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo")
    r.deploy(build_slice_wheel(tmp_path / "w1", str(LIM), LIMITED, "Limited", module="limited_slice"))
    r.deploy(build_slice_wheel(tmp_path / "w2", str(PLN), PLAIN, "Plain", module="plain_slice"))
    return r


def mod() -> Any:
    return sys.modules["limited_slice"]


def gate(key: str) -> asyncio.Event:
    return mod().GATES.setdefault(key, asyncio.Event())  # type: ignore[no-any-return]


def make(repo: Repository, tmp_path: Path, limits: dict[str, SliceLimits], **kw: Any) -> SliceRuntime:
    inv = StoreInvoker()
    rt = SliceRuntime(
        "node-1", repo, tmp_path / "data", inv, space=ImportSpace(),
        limits_for=lambda a: limits.get(str(a), SliceLimits()), **kw,
    )  # fmt: skip
    inv.add(rt)
    return rt


async def until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def load_of(rt: SliceRuntime, instance: int = 0) -> Any:
    return next(x for x in rt.instance_loads() if x.instance == instance)


async def test_limit_queues_then_refuses_with_503_and_retry_after(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {str(LIM): SliceLimits(max_concurrency=1, max_queue=1)})
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    first = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a"})))
    await until(lambda: len(mod().RUNNING) == 1)
    second = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "b"})))
    await until(lambda: load_of(rt).queued == 1)
    with pytest.raises(InstanceOverloaded) as info:
        await rt.call(LIM, "fast", b"")
    err = info.value
    assert err.status == 503 and wire_kind_of(err) == "overloaded"
    assert problem_headers(err) == {"Retry-After": "1"} and problem_for(err).status == 503
    assert "at its limit: 1 call(s) running, 1 queued (max_queue 1)" in str(err)
    x = load_of(rt)
    assert (x.in_flight, x.queued, x.admitted, x.rejected, x.calls) == (1, 1, 2, 1, 0)
    assert mod().RUNNING == [(0, "a")]  # b waits for the slot
    gate("a").set()
    assert dec(await first) == "a"
    await until(lambda: len(mod().RUNNING) == 2)
    x = load_of(rt)
    assert (x.in_flight, x.queued, x.calls) == (1, 0, 1)
    gate("b").set()
    assert dec(await second) == "b"
    x = load_of(rt)
    assert (x.in_flight, x.queued, x.admitted, x.rejected, x.calls, x.failures) == (0, 0, 2, 1, 2, 0)
    assert x.busy_seconds > 0 and x.artifact == str(LIM) and x.healthy is None


async def test_has_room_says_whether_a_call_would_run_at_once(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {str(LIM): SliceLimits(max_concurrency=1, max_queue=5)})
    assert not rt.has_room(LIM, "slow")  # not loaded: no instance here
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    assert rt.has_room(LIM, "slow") and rt.has_room("org.example:limited", "slow")
    first = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "r"})))
    await until(lambda: len(mod().RUNNING) == 1)
    assert not rt.has_room(LIM, "slow")  # its one slot is busy: a call would queue
    gate("r").set()
    await first
    assert rt.has_room(LIM, "slow")


async def test_default_queue_is_ten_times_the_limit_and_cancelled_calls_leave_it(
    repo: Repository, tmp_path: Path
) -> None:
    rt = make(repo, tmp_path, {str(LIM): SliceLimits(max_concurrency=1)})
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    running = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a"})))
    await until(lambda: len(mod().RUNNING) == 1)
    queued = [asyncio.create_task(rt.call(LIM, "fast", b"")) for _ in range(10)]
    await until(lambda: load_of(rt).queued == 10)
    with pytest.raises(InstanceOverloaded):
        await rt.call(LIM, "fast", b"")
    for t in queued[:4]:  # callers gone: they leave the queue
        t.cancel()
    await asyncio.gather(*queued[:4], return_exceptions=True)
    assert load_of(rt).queued == 6
    more = asyncio.create_task(rt.call(LIM, "fast", b""))  # room again
    await until(lambda: load_of(rt).queued == 7)
    gate("a").set()
    assert [dec(r) for r in await asyncio.gather(running, *queued[4:], more)] == ["a"] + [0] * 7
    x = load_of(rt)
    assert (x.in_flight, x.queued, x.admitted, x.rejected, x.calls) == (0, 0, 12, 1, 8)


async def test_entry_limits_hold_back_one_entry_only(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {str(LIM): SliceLimits(entry_concurrency={"slow": 1})})
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    a = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a"})))
    await until(lambda: len(mod().RUNNING) == 1)
    b = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "b"})))
    await until(lambda: load_of(rt).queued == 1)
    assert dec(await rt.call(LIM, "fast", b"")) == 0  # another entry runs at once
    cs = [asyncio.create_task(rt.call(LIM, "slow", enc({"key": "c"}))) for _ in range(9)]  # 10 x the limit
    await until(lambda: load_of(rt).queued == 10)
    with pytest.raises(InstanceOverloaded):
        await rt.call(LIM, "slow", enc({"key": "d"}))
    gate("a").set()
    gate("b").set()
    gate("c").set()
    assert dec(await a) == "a" and dec(await b) == "b"
    assert [dec(c) for c in await asyncio.gather(*cs)] == ["c"] * 9
    await until(lambda: load_of(rt).in_flight == 0 and load_of(rt).calls == 12)
    assert [k for _, k in mod().RUNNING] == ["a", "b"] + ["c"] * 9  # one at a time, in order


async def test_pick_prefers_an_instance_with_a_free_slot(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {str(LIM): SliceLimits(max_concurrency=1, max_queue=5)})
    await rt.load(LIM)
    await rt.activate(LIM, [0, 1, 2])
    calls = [asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a"}))) for _ in range(3)]
    await until(lambda: len(mod().RUNNING) == 3)
    assert sorted(i for i, _ in mod().RUNNING) == [0, 1, 2]  # none queued behind another
    # all busy: the shortest queue takes the next calls
    more = [asyncio.create_task(rt.call(LIM, "fast", b"")) for _ in range(3)]
    await until(lambda: sum(x.queued for x in rt.instance_loads()) == 3)
    assert [x.queued for x in rt.instance_loads()] == [1, 1, 1]
    gate("a").set()
    await asyncio.gather(*calls, *more)
    assert sum(x.calls for x in rt.instance_loads()) == 6


async def test_draining_waits_for_queued_calls_and_fails_them_after_the_timeout(
    repo: Repository, tmp_path: Path
) -> None:
    rt = make(repo, tmp_path, {str(LIM): SliceLimits(max_concurrency=1)})
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    a = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a"})))
    await until(lambda: len(mod().RUNNING) == 1)
    b = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "b"})))
    await until(lambda: load_of(rt).queued == 1)
    deact = asyncio.create_task(rt.deactivate(LIM, drain_timeout=5.0))
    await asyncio.sleep(0.05)
    gate("a").set()
    await until(lambda: len(mod().RUNNING) == 2)
    assert not deact.done()  # the queued call counts as in flight
    gate("b").set()
    await deact
    assert [dec(await a), dec(await b)] == ["a", "b"]
    # a drain that times out fails the calls still queued (the invoker retries them elsewhere)
    await rt.activate(LIM, [0])  # a new slice loop: new events
    a = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a2"})))
    await until(lambda: len(mod().RUNNING) == 3)
    b = asyncio.create_task(rt.call(LIM, "fast", b""))
    await until(lambda: load_of(rt).queued == 1)
    await rt.deactivate(LIM, drain_timeout=0.1)
    with pytest.raises(NoLocalInstance, match="stopped while the call was queued"):
        await b
    await asyncio.gather(a, return_exceptions=True)  # ran past the drain: cancelled with its loop


async def test_no_limits_no_gate_but_counters(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {})
    await rt.load(LIM)
    await rt.activate(LIM, [0, 1])
    for _ in range(4):
        await rt.call(LIM, "fast", b"")
    with pytest.raises(RuntimeError):
        await rt.call(LIM, "boom", b"")
    with pytest.raises(Exception):  # noqa: B017 - a bad payload: the caller's mistake, not a failure
        await rt.call(LIM, "slow", enc({"nope": 1}))
    loads = rt.instance_loads()
    assert [x.instance for x in loads] == [0, 1]
    assert sum(x.calls for x in loads) == 6 and sum(x.failures for x in loads) == 1
    assert sum(x.admitted for x in loads) == 6 and all(x.rejected == 0 and x.queued == 0 for x in loads)
    assert rt.limits(LIM) == SliceLimits()
    assert all(i.gate is None for i in rt._entries[LIM].instances.values())


async def test_changed_limits_reach_running_instances(repo: Repository, tmp_path: Path) -> None:
    limits = {str(LIM): SliceLimits(max_concurrency=1)}
    rt = make(repo, tmp_path, limits)
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    a = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "a"})))
    await until(lambda: len(mod().RUNNING) == 1)
    b = asyncio.create_task(rt.call(LIM, "slow", enc({"key": "b"})))
    await until(lambda: load_of(rt).queued == 1)
    limits[str(LIM)] = SliceLimits(max_concurrency=2)
    rt.refresh_limits()  # the waiting call gets the new slot
    await until(lambda: len(mod().RUNNING) == 2)
    assert rt.limits(LIM).max_concurrency == 2
    del limits[str(LIM)]
    rt.refresh_limits()  # no limits: no gate
    assert rt._entries[LIM].instances[0].gate is None
    gate("a").set()
    gate("b").set()
    await asyncio.gather(a, b)


def test_gate_hands_a_freed_slot_to_the_oldest_call_that_may_run() -> None:
    async def main() -> None:
        g = Gate(SliceLimits(max_concurrency=2, max_queue=3, entry_concurrency={"x": 1}))
        assert g.enter("x") is True and g.enter("y") is True
        fx = g.enter("x")
        fy = g.enter("y")
        fz = g.enter("z")
        assert g.enter("z") is False and g.queued == 3
        assert isinstance(fx, asyncio.Future) and isinstance(fy, asyncio.Future)
        assert isinstance(fz, asyncio.Future)
        g.leave("y")  # x is still at its entry limit: y, the oldest that may run, gets the slot
        assert not fx.done() and fy.done() and not fz.done()
        g.leave("x")  # now x may run
        assert fx.done() and not fz.done()
        fz.cancel()
        g.abandon(fz, "z")
        assert g.queued == 0 and g.running == 2 and g.queued_by_entry == {}

    asyncio.run(main())


# --- health --------------------------------------------------------------------------------------


async def test_health_flips_and_is_reported_per_instance(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {}, health_timeout=0.3)
    rt.config_for = lambda a: ResolvedConfig({"pw": "hunter2"}, ("hunter2",))
    await rt.load(LIM)
    await rt.load(PLN)
    await rt.activate(LIM, [0, 1])
    await rt.activate(PLN, [0])
    assert load_of(rt).healthy is None
    assert rt.check_health() == 2  # only the slice with a health() hook
    await until(lambda: all(x.healthy for x in rt.instance_loads() if x.artifact == str(LIM)))
    plain = [x for x in rt.instance_loads() if x.artifact == str(PLN)]
    assert [x.healthy for x in plain] == [None]

    mod().HEALTH["answer"] = False
    for n in (1, 2):
        rt.check_health()
        await until(lambda n=n: load_of(rt).health_failures == n)
    x = load_of(rt)
    assert (x.healthy, x.health_failures, x.health_reason) == (False, 2, "health() returned False")

    mod().HEALTH["answer"] = RuntimeError("db at hunter2 unreachable " + "x" * 300)
    rt.check_health()
    await until(lambda: load_of(rt).health_failures == 3)
    reason = load_of(rt).health_reason
    assert reason.startswith("health() raised RuntimeError: db at *** unreachable")
    assert "hunter2" not in reason and len(reason) == 200

    mod().HEALTH["answer"] = None  # None counts as healthy
    rt.check_health()
    await until(lambda: load_of(rt).healthy is True)
    assert (load_of(rt).health_failures, load_of(rt).health_reason) == (0, None)


async def test_health_timeout_and_never_twice_at_once(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {}, health_timeout=0.2)
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    mod().HEALTH["sleep"] = 10.0
    assert rt.check_health() == 1
    assert rt.check_health() == 0  # the first is still running
    await until(lambda: load_of(rt).healthy is False)
    assert load_of(rt).health_reason == "health() did not answer within 0.2 s"
    assert mod().HEALTH["calls"] == 1
    mod().HEALTH["sleep"] = 0.0
    assert dec(await rt.call(LIM, "fast", b"")) == 0  # the slice's loop was never blocked
    assert rt.check_health() == 1
    await until(lambda: load_of(rt).healthy is True)


async def test_health_loop_runs_every_interval(repo: Repository, tmp_path: Path) -> None:
    rt = make(repo, tmp_path, {}, health_interval=0.05)
    await rt.load(LIM)
    await rt.activate(LIM, [0])
    await until(lambda: mod().HEALTH["calls"] >= 3)
    assert load_of(rt).healthy is True
    health = mod().HEALTH
    await rt.close()
    calls = health["calls"]
    await asyncio.sleep(0.15)
    assert health["calls"] == calls and rt._health is None  # stopped with the runtime


async def test_a_cancelled_waiter_at_the_head_does_not_hold_back_the_next() -> None:
    gate = Gate(SliceLimits(max_concurrency=1, max_queue=5))
    assert gate.enter("e") is True
    first, second = gate.enter("e"), gate.enter("e")
    assert isinstance(first, asyncio.Future) and isinstance(second, asyncio.Future)
    first.cancel()  # its caller gave up; its abandon() runs later
    gate.leave("e")  # the slot goes to the oldest waiter still waiting
    assert second.done() and gate.running == 1 and gate.queued == 0
    gate.abandon(first, "e")  # late: nothing left to undo
    assert gate.running == 1 and gate.queued == 0
