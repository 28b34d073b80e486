"""The controller on 3 in-process nodes with the real core: an operator pin through the API takes
effect, every node answers the controller API from the synced copy, the reconciler's
re-placements of a lost leader's instances are recorded as decisions by the new leader, which
continues the numbering it inherited, and the decisions reach a follower's event stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aether.kv.keys import BlueprintKey, BlueprintSlice, BlueprintValue, ScaleValue, ScalingRule
from conftest import running_cluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

HELLO = "org.example:hello:0.1.0"


async def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


async def get(node: Any, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{node.management.port}{path}") as r,
    ):
        assert r.status == 200, await r.text()
        return json.loads(await r.text())


def active(node: Any) -> int:
    return sum(
        len(v.instances) for k, v in node.kv.list_local("slices/")
        if k.endswith(HELLO) and v.state == "ACTIVE"
    )


async def test_pin_sync_and_a_new_leader_records_re_placements(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        n1, n2, n3 = nodes
        rule = ScalingRule(min=1, max=4, rate=50.0)
        bp = BlueprintValue([BlueprintSlice(HELLO, 1, scaling=rule, name="hello")])
        await n1.kv.put(BlueprintKey("auto"), bp)
        await until(lambda: active(n1) == 1, "1 instance ACTIVE")

        # an operator pin through a follower's API: the reconciler follows it
        async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{n3.management.port}/api/v1/scale", json={"artifact": HELLO, "instances": 3}
        ) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
        assert doc["autoscaled"][0]["bounds_source"] == "operator" and doc["autoscaled"][0]["instances"] == 3
        await until(lambda: active(n1) == 3, "3 instances ACTIVE")
        v = n2.kv.get_local(f"scale/{HELLO}")
        assert isinstance(v, ScaleValue) and (v.instances, v.min, v.max, v.source) == (3, 3, 3, "operator")

        # the leader steps; followers answer from the synced copy
        await until(lambda: n1.controller.steps >= 2 and n3.controller.memory is not None, "controller syncs")
        lead = await get(n1, "/api/v1/controller/status")
        follow = await get(n3, "/api/v1/controller/status")
        assert lead["running"] is True and lead["steps"] >= 2 and lead["synced_from"] is None
        assert follow["running"] is False and follow["synced_from"] == "node-1"
        (art,) = follow["artifacts"]
        assert (art["artifact"], art["instances"], art["min"], art["max"]) == (HELLO, 3, 3, 3)
        assert art["bounds_source"] == "operator" and art["count_source"] == "operator"

        # a follower's event stream shows the decisions of the next leader
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{n3.management.port}/api/v1/events"
        ) as events:
            inherited = n2.controller.memory.seq if n2.controller.memory is not None else 0
            await n1.stop()  # the leader goes: node-2 leads, re-places node-1's instance
            await until(lambda: n2.leader.is_leader and n2.controller.core is not None, "node-2 leads")
            await until(lambda: any(d.kind == "re_place" for d in n2.controller.history), "re_place recorded")
            (rp,) = [d for d in n2.controller.history if d.kind == "re_place"]
            assert rp.node == "node-1" and rp.artifact == HELLO and rp.seq > inherited
            assert rp.source == "reconciler"
            seen: list[dict[str, Any]] = []
            end = time.monotonic() + 10
            kind = ""
            while not any(e.get("kind") == "re_place" for e in seen):
                assert time.monotonic() < end, f"no re_place in node-3's event stream: {seen}"
                line = (await asyncio.wait_for(events.content.readline(), 5)).decode().strip()
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "controller-decision":
                    seen.append(json.loads(line[6:]))
        await until(lambda: active(n2) == 3, "3 instances ACTIVE again")
        decisions = await get(n3, f"/api/v1/controller/decisions?since={inherited}")
        assert any(d["kind"] == "re_place" for d in decisions)
        st = await get(n2, "/api/v1/controller/status")
        assert st["running"] is True and st["last_seq"] >= rp.seq


WORK = "org.example:work:1.0.0"
WORK_SLICE = """
import asyncio
from aether.slices import Slice, route

class Work(Slice):
    @route("GET", "/work/{key}")
    async def work(self, key: str) -> str:
        await asyncio.sleep(0.2)
        return key
"""
WORK_BLUEPRINT = f"""
id = "work:1"
[slices.work]
artifact = "{WORK}"
instances = 1
max_concurrency = 2
max_queue = 500

[slices.work.scaling]
min = 1
max = 3
in_flight = 2
"""
FAST = """
[scaling]
stable_window = 2.0
panic_window = 1.0
scale_down_stabilization = 2.0
scale_down_cooldown = 2.0
"""


async def test_load_scales_a_slice_up_to_its_max_and_back_down(tmp_path: Path) -> None:
    """The real chain: instance counters -> the leader's aggregator -> the core -> the adapter's
    `scale/` write -> the reconciler -> ACTIVE instances; and back down once the load stops."""
    import msgspec

    async with running_cluster(tmp_path, extra={WORK: (WORK_SLICE, "Work")}) as nodes:
        n1, n2, _ = nodes
        await n1.controller.set_config_text(FAST, by="test")
        await n1.deployments.apply_blueprint(WORK_BLUEPRINT, "work.toml")
        await n1.deployments.wait_converged("work:1", timeout=60)

        def work_active() -> int:
            return sum(len(v.instances) for k, v in n1.kv.list_local("slices/")
                       if k.endswith(WORK) and v.state == "ACTIVE")

        # open-loop load: 40 calls/s of 0.2 s each want 8 in flight, 4 instances at 2 each: max 3
        calls: list[asyncio.Task[bytes]] = []

        async def load(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                calls.append(asyncio.ensure_future(
                    n2.invoker.invoke("org.example:work", "work", msgspec.msgpack.encode("k"), timeout=30)))
                await asyncio.sleep(0.025)

        driver = asyncio.ensure_future(load(30))
        try:
            await until(lambda: work_active() == 3, "scaled up to 3 ACTIVE", timeout=25)
        finally:
            driver.cancel()
        v = n1.kv.get_local(f"scale/{WORK}")
        assert isinstance(v, ScaleValue) and v.source == "controller" and v.instances == 3
        ups = [d for d in n1.controller.history if d.kind == "scale_up"]
        assert ups and all(d.applied and d.artifact == WORK for d in ups) and ups[-1].to_count == 3
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)]  # nothing failed meanwhile

        # no load: back to min
        await until(lambda: work_active() == 1, "scaled down to 1 ACTIVE", timeout=30)
        downs = [d for d in n1.controller.history if d.kind == "scale_down"]
        assert downs and downs[-1].to_count == 1
        st = await get(n2, "/api/v1/controller/status")
        (art,) = [a for a in st["artifacts"] if a["artifact"] == WORK]
        assert art["instances"] == 1 and art["count_source"] == "controller"


SICK = "org.example:sick:1.0.0"
SICK_SLICE = """
import itertools
from aether.slices import Slice, route

_made = itertools.count()

class Sick(Slice):
    async def start(self) -> None:
        self.n = next(_made)  # the first instance object ever made is sick, every later one is well

    async def health(self) -> bool:
        return self.n != 0

    @route("GET", "/sick/n")
    async def which(self) -> int:
        return self.n
"""


async def test_an_instance_failing_its_health_checks_is_replaced(tmp_path: Path) -> None:
    """`health()` fails on the node -> the instance counters say so -> the leader's core decides
    `replace` -> the adapter takes the instance off its node -> the reconciler starts it again:
    the new instance object is healthy and no further replacement follows."""
    async with running_cluster(
        tmp_path, extra={SICK: (SICK_SLICE, "Sick")}, health_interval=0.2, health_timeout=1.0
    ) as nodes:
        n1 = nodes[0]
        bp = BlueprintValue([BlueprintSlice(SICK, 1, name="sick")])
        await n1.kv.put(BlueprintKey("sick"), bp)
        await until(lambda: any(d.kind == "replace" for d in n1.controller.history), "a replace decision")
        (d,) = [d for d in n1.controller.history if d.kind == "replace"]
        assert d.rule == "health" and d.artifact == SICK and d.instance == 0 and d.applied
        assert "health() returned False" in d.reason

        def healthy() -> bool:
            return any(
                i.artifact == SICK and i.healthy is True and i.health_failures == 0
                for i in n1.metrics.aggregator.instance_stats(time.monotonic())
            )

        await until(healthy, "the replacement reports healthy", timeout=30)
        await asyncio.sleep(1.5)
        assert len([d for d in n1.controller.history if d.kind == "replace"]) == 1
