"""Capacity signals end to end on 3 in-process nodes (issue 15): a slice with `max_concurrency = 1`
and `max_queue = 1` runs one call, queues one, and refuses the third at once with 503 and
`Retry-After`; the leader's aggregator shows the instance's in-flight, queued and rejected calls."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from aether.cli.main import main
from aether.core.artifact import Artifact
from conftest import running_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ART = "org.example:throttled:1.0.0"
THROTTLED = """
import asyncio
from aether.slices import Slice, route

class Throttled(Slice):
    @route("GET", "/throttled/{key}")
    async def slow(self, key: str) -> str:
        await asyncio.sleep(3.5)
        return key
"""
BLUEPRINT = f"""
id = "throttled:1"
[slices.throttled]
artifact = "{ART}"
instances = 1
max_concurrency = 1
max_queue = 1
"""


async def test_a_full_queue_answers_503_with_retry_after_and_shows_in_the_metrics(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, extra={ART: (THROTTLED, "Throttled")}) as nodes:
        n1 = nodes[0]
        await n1.deployments.apply_blueprint(BLUEPRINT, "throttled.toml")
        await n1.deployments.wait_converged("throttled:1", timeout=60)
        host = next(n for n in nodes if n.slice_runtime.local_instances(ART))
        caller = next(n for n in nodes if n is not host)  # through another node: the remote path
        assert host.slice_runtime.limits(Artifact.parse(ART)).max_queue == 1  # from the blueprint

        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{caller.http.port}"

            async def get(key: str) -> tuple[int, str, dict[str, str]]:
                async with http.get(f"{base}/throttled/{key}") as r:
                    return r.status, await r.text(), dict(r.headers)

            loop = asyncio.get_running_loop()
            first = asyncio.create_task(get("a"))

            def load() -> tuple[int, int]:
                (x,) = host.slice_runtime.instance_loads()
                return x.in_flight, x.queued

            end = loop.time() + 10
            while load() != (1, 0):
                assert loop.time() < end, load()
                await asyncio.sleep(0.02)
            second = asyncio.create_task(get("b"))
            while load() != (1, 1):
                assert loop.time() < end, load()
                await asyncio.sleep(0.02)
            t0 = loop.time()
            status, text, headers = await get("c")
            assert status == 503, text
            assert loop.time() - t0 < 2.0  # at once, not after the invoker's 10 s deadline
            assert headers.get("Retry-After") == "1" and "at its limit" in text
            assert headers["Content-Type"].startswith("application/problem+json")

            # the leader (node-1) sees the instance: one running, one queued, one refused
            end = loop.time() + 10
            stats = None
            while True:
                got = [x for x in n1.metrics.aggregator.instance_stats(time.monotonic()) if x.artifact == ART]
                if got and (got[0].in_flight, got[0].queued, got[0].rejected) == (1, 1, 1):
                    stats = got[0]
                    break
                assert loop.time() < end, f"the leader never saw 1 running, 1 queued, 1 rejected: {got}"
                await asyncio.sleep(0.1)
            assert stats.node_id == host.node_id and stats.admitted == 2
            load_ = n1.metrics.aggregator.slice_loads(time.monotonic())[ART]
            assert (load_.instances, load_.in_flight, load_.queued) == (1, 1, 1)
            snap = n1.metrics.latest
            assert snap is not None and all(n.loop_lag_ms >= 0 for n in snap.nodes)

            # `aether metrics` through another node shows the instance's queue (from the snapshot)
            env = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "COLUMNS": "200"}
            connect = f"127.0.0.1:{caller.management.port}"
            end = loop.time() + 5
            while True:
                r = await asyncio.to_thread(CliRunner(env=env).invoke, main, ["--connect", connect, "metrics",
                                                                              "--json"])  # fmt: skip
                assert r.exit_code == 0, r.output
                shown = [i for i in json.loads(r.output)["instances"] if i["artifact"] == ART]
                if shown and (shown[0]["in_flight"], shown[0]["queued"]) == (1, 1):
                    break
                assert loop.time() < end, shown
                await asyncio.sleep(0.2)
            r = await asyncio.to_thread(CliRunner(env=env).invoke, main, ["--connect", connect, "metrics"])
            assert r.exit_code == 0, r.output
            row = next(line for line in r.output.splitlines() if ART in line and "Instances" not in line
                       and host.node_id in line)  # fmt: skip
            cells = [c.strip() for c in row.strip("│ ").split("│")]
            assert cells[2:5] == ["0", "1", "1"], row  # instance 0: 1 in flight, 1 queued
            assert "Loop lag ms" in r.output

            assert (await first)[0] == 200 and (await second)[0] == 200
        (x,) = host.slice_runtime.instance_loads()
        assert (x.in_flight, x.queued, x.admitted, x.rejected, x.calls, x.failures) == (0, 0, 2, 1, 2, 0)
        assert x.busy_seconds >= 6.9  # two calls of 3.5 s, the queue wait excluded
