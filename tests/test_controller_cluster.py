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
