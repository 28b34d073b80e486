"""Slice faults (issue 16): `SliceRuntime.inject_fault` makes the instances running at that moment
fail, slow down or fail their health checks; instances started later are healthy."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import msgspec
import pytest

from aether.core.errors import wire_kind_of
from aether.core.problem import problem_for
from aether.slices import NoLocalInstance
from aether.slices.errors import InjectedFault
from aether.slices.faults import SliceFault, should_fail
from aether.slices.repository import Repository
from test_slices_runtime import CTR, _isolated, make_store, repo  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(30)

dec = msgspec.msgpack.decode


def test_the_fault_and_its_error() -> None:
    assert SliceFault() == SliceFault(error_rate=1.0, delay_ms=0.0, unhealthy=False)
    assert SliceFault(error_rate=0.5, delay_ms=200, unhealthy=True).describe() == (
        "errors 50%, delay 200 ms, unhealthy"
    )
    for bad, field in (({"error_rate": 1.5}, "error_rate"), ({"error_rate": -1}, "error_rate"),
                       ({"delay_ms": -5}, "delay_ms"), ({"delay_ms": float("nan")}, "delay_ms")):
        with pytest.raises(ValueError, match=field):
            SliceFault(**bad)  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError, match="error_rate"):
        msgspec.json.decode(b'{"error_rate": 2}', type=SliceFault)
    exc = InjectedFault("injected fault: a:b:1 instance 0 on node-1")
    assert exc.status == 500 and wire_kind_of(exc) == "injected_fault"
    assert problem_for(exc).status == 500
    rng = random.Random(4)
    n = 10_000
    share = sum(should_fail(SliceFault(error_rate=0.25), rng) for _ in range(n)) / n
    assert abs(share - 0.25) < 0.03
    assert not any(should_fail(SliceFault(error_rate=0), rng) for _ in range(100))


async def test_errors_hit_the_faulted_instances_only(repo: Repository, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(repo, tmp_path)
    await store.load(CTR)
    await store.activate(CTR, [1, 2])
    with pytest.raises(NoLocalInstance, match=r"no instance of org\.example:other:1\.0\.0 runs on node-1"):
        store.inject_fault(CTR.__class__.parse("org.example:other:1.0.0"), SliceFault())
    assert store.inject_fault(CTR, SliceFault()) == [1, 2]
    with pytest.raises(InjectedFault) as info:
        await store.call(CTR, "whoami", b"", instance=1)
    text = str(info.value)
    assert str(CTR) in text and "instance 1" in text and "node-1" in text
    assert wire_kind_of(info.value) == "injected_fault"
    # the failures count like the instance's own (the controller's error-rate rule sees them)
    load = next(x for x in store.instance_loads() if x.instance == 1)
    assert load.failures == 1 and load.calls == 1
    assert store.faults() == {CTR: (SliceFault(), [1, 2])}
    # a new instance (a scale-up, or a replacement) is healthy
    await store.set_instances(CTR, [2, 3])
    assert dec(await store.call(CTR, "whoami", b"", instance=3))["instance"] == 3
    with pytest.raises(InjectedFault):
        await store.call(CTR, "whoami", b"", instance=2)
    assert store.faults() == {CTR: (SliceFault(), [2])}
    # a restart under the same id makes a new object: healthy too
    await store.set_instances(CTR, [3])
    await store.set_instances(CTR, [2, 3])
    assert dec(await store.call(CTR, "whoami", b"", instance=2))["instance"] == 2
    assert store.faults() == {CTR: (SliceFault(), [])}
    assert store.clear_fault(CTR) and not store.clear_fault(CTR)
    assert store.faults() == {}
    await store.close()


async def test_clearing_heals_and_the_rate_and_delay_apply(repo: Repository, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(repo, tmp_path)
    await store.load(CTR)
    await store.activate(CTR, [0])
    store._fault_rng.seed(11)
    store.inject_fault(CTR, SliceFault(error_rate=0.5))
    outcomes = []
    for _ in range(200):
        try:
            await store.call(CTR, "whoami", b"")
            outcomes.append(True)
        except InjectedFault:
            outcomes.append(False)
    assert 60 < outcomes.count(False) < 140
    store.inject_fault(CTR, SliceFault(error_rate=0, delay_ms=200))  # replaces the previous fault
    t0 = time.monotonic()
    assert dec(await store.call(CTR, "whoami", b""))["instance"] == 0
    assert time.monotonic() - t0 >= 0.19
    store.clear_fault(CTR)
    t0 = time.monotonic()
    await store.call(CTR, "whoami", b"")
    assert time.monotonic() - t0 < 0.1
    await store.close()


async def test_unhealthy_fails_health_checks_without_a_hook(repo: Repository, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(repo, tmp_path)
    await store.load(CTR)
    await store.activate(CTR, [0, 1])
    assert store.check_health() == 0  # Counter has no health() hook
    store.inject_fault(CTR, SliceFault(error_rate=0, unhealthy=True))
    for n in (1, 2, 3):
        assert store.check_health() == 2
        loads = store.instance_loads()
        assert [(x.healthy, x.health_failures) for x in loads] == [(False, n), (False, n)]
    assert "injected fault" in (store.instance_loads()[0].health_reason or "")
    # calls still succeed (error_rate 0): only the checks fail
    assert dec(await store.call(CTR, "whoami", b"", instance=0))["instance"] == 0
    store.clear_fault(CTR)
    assert store.check_health() == 0
    assert [(x.healthy, x.health_failures) for x in store.instance_loads()] == [(None, 0), (None, 0)]
    await asyncio.sleep(0)
    await store.close()
