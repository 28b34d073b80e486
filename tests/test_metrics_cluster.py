"""Metrics on 3 in-process nodes: calls are counted once, on the node that runs the instance,
pushed to the leader, aggregated and broadcast, and readable from any node (JSON, history,
Prometheus, `aether metrics`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from aether.cli.main import main
from aether.core.artifact import Artifact
from aether.invoke import InvokeBadRequest
from aether.node.node import Node
from conftest import running_cluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

HELLO = "org.example:hello:0.1.0"


async def _get(node: Node, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{node.management.port}{path}") as r,
    ):
        return r.status, await r.text()


async def _greet_metrics(node: Node, want_calls: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll `GET /api/v1/metrics` of `node` until greet shows `want_calls` calls and all 3 nodes."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    doc: dict[str, Any] = {}
    while loop.time() < end:
        status, text = await _get(node, "/api/v1/metrics")
        assert status == 200, text
        doc = json.loads(text)
        greet = [e for e in doc["entries"] if (e["artifact"], e["entry"]) == (HELLO, "greet")]
        if doc["source"] == "leader" and greet and greet[0]["calls"] == want_calls and len(doc["nodes"]) == 3:
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"greet never showed {want_calls} calls within {timeout}s; last: {doc}")


async def test_calls_are_counted_once_and_seen_from_a_follower(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        n1, n2, n3 = nodes
        # before any call: every node answers (a local view until the first snapshot arrives)
        status, text = await _get(n3, "/api/v1/metrics")
        assert status == 200 and json.loads(text)["node_id"] == "node-3"

        await n1.deployments.deploy(Artifact.parse(HELLO), 1)
        await n1.deployments.wait_converged(f"direct:{Artifact.parse(HELLO).name}", timeout=30)
        host = next(n for n in nodes if n.slice_runtime.local_instances(HELLO))
        others = [n for n in nodes if n is not host]

        # 10 calls through each node's invoker: 10 local on the host, 20 served for the others
        for node in nodes:
            for i in range(10):
                raw = await node.invoker.invoke("org.example:hello", "greet", msgspec.msgpack.encode(f"p{i}"))
                assert msgspec.msgpack.decode(raw)["node"] == host.node_id
        with pytest.raises(InvokeBadRequest):  # ran on the host, rejected there: one client error
            await others[0].invoker.invoke("org.example:hello", "greet", msgspec.msgpack.encode([1, 2]))

        follower = n3 if n3.node_id != n3.leader.leader else n2
        doc = await _greet_metrics(follower, 31)
        assert doc["node_id"] == follower.node_id and doc["leader"] == "node-1"
        (greet,) = [e for e in doc["entries"] if e["entry"] == "greet"]
        assert (greet["successes"], greet["client_errors"], greet["failures"]) == (30, 1, 0)
        assert greet["nodes"] == [host.node_id]  # counted only where it ran
        assert greet["p50_ms"] is not None and greet["p99_ms"] >= greet["p50_ms"]
        assert sorted(n["node_id"] for n in doc["nodes"]) == ["node-1", "node-2", "node-3"]
        assert all(n["rss_bytes"] > 0 and n["uptime"] > 0 for n in doc["nodes"])
        assert doc["totals"]["calls"] >= 31 and doc["totals"]["nodes"] == 3
        assert doc["snapshot_age"] < 5

        # the window: every node has a copy of the leader's per-second points
        status, text = await _get(follower, "/api/v1/metrics/history?seconds=60")
        assert status == 200, text
        points = json.loads(text)["points"]
        assert points and all(p["nodes"] >= 1 for p in points)
        assert [p["time"] for p in points] == sorted(p["time"] for p in points)
        status, text = await _get(follower, "/api/v1/metrics/history?seconds=0")
        assert status == 400 and "seconds" in json.loads(text)["detail"]
        status, text = await _get(follower, "/api/v1/metrics/history?seconds=abc")
        assert status == 400

        # the stream: a metrics event per interval, each the same document as GET /api/v1/metrics
        url = f"http://127.0.0.1:{follower.management.port}/api/v1/metrics/stream?interval=0.2"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        events.append(json.loads(line[len("data: "):]))
                        if len(events) == 2:
                            break
        assert all(e["node_id"] == follower.node_id and e["totals"]["calls"] == 31 for e in events)
        for bad in ("0.01", "abc", "61"):
            status, text = await _get(follower, f"/api/v1/metrics/stream?interval={bad}")
            assert status == 400 and "interval" in json.loads(text)["detail"]

        # Prometheus: the host exposes the entry's counters and histogram, the others do not
        status, text = await _get(host, "/metrics")
        assert status == 200
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        calls = {
            s.labels["entry"]: s.value for s in fams["aether_entry_duration_seconds"].samples
            if s.name.endswith("_count")
        }  # fmt: skip
        assert calls == {"greet": 31}
        assert fams["aether_entry_failures"].samples[0].value == 0
        assert fams["aether_entry_client_errors"].samples[0].value == 1
        count = [s for s in fams["aether_entry_duration_seconds"].samples if s.name.endswith("_count")]
        assert count[0].value == 31 and count[0].labels["node"] == host.node_id
        assert fams["aether_node_memory_rss_bytes"].samples[0].value > 0
        # the standard process series of prometheus_client's process collector (Linux: /proc)
        if os.path.exists("/proc/self/stat"):
            assert fams["process_cpu_seconds"].type == "counter"
            assert fams["process_cpu_seconds"].samples[0].name == "process_cpu_seconds_total"
            assert fams["process_resident_memory_bytes"].samples[0].value > 0
            assert fams["process_virtual_memory_bytes"].samples[0].value > 0
            assert 0 < fams["process_open_fds"].samples[0].value <= fams["process_max_fds"].samples[0].value
            assert 0 < fams["process_start_time_seconds"].samples[0].value <= time.time()
        status, text = await _get(others[0], "/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["aether_entry_duration_seconds"].samples == []

        # the CLI (blocking HTTP: run it in a thread so the nodes keep serving)
        env = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "COLUMNS": "200"}
        connect = f"127.0.0.1:{follower.management.port}"
        cli = CliRunner(env=env)
        r = await asyncio.to_thread(
            cli.invoke, main, ["--connect", connect, "metrics", "--json"], catch_exceptions=False
        )
        assert r.exit_code == 0, r.output
        cli_doc = json.loads(r.output)
        assert [e["calls"] for e in cli_doc["entries"] if e["entry"] == "greet"] == [31]
        r = await asyncio.to_thread(
            CliRunner(env=env).invoke, main, ["--connect", connect, "metrics"], catch_exceptions=False
        )
        assert r.exit_code == 0, r.output
        assert "greet" in r.output and "node-1" in r.output and "Entry points" in r.output
        r = await asyncio.to_thread(
            CliRunner(env=env).invoke, main,
            ["--connect", connect, "metrics", "--json", "--watch", "--interval", "0.2", "--count", "2"],
            catch_exceptions=False,
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert len([json.loads(line) for line in r.output.splitlines()]) == 2


async def test_a_new_leader_continues_the_window(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        n1, n2, _n3 = nodes
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while len(n2.metrics.aggregator.window) < 3:
            assert loop.time() < end, "node-2 mirrored no window points"
            await asyncio.sleep(0.1)
        first = n2.metrics.aggregator.window[0].time
        seq = n2.metrics.aggregator.seq
        await n1.stop()
        end = loop.time() + 15
        while not (n2.leader.is_leader and n2.metrics.aggregator.seq >= seq + 2):
            assert loop.time() < end, "node-2 did not take over the metrics"
            await asyncio.sleep(0.1)
        window = list(n2.metrics.aggregator.window)
        assert window[0].time == first  # kept what node-1 had broadcast
        assert window[-1].time > first and [p.time for p in window] == sorted(p.time for p in window)
        status, text = await _get(n2, "/api/v1/metrics")
        assert status == 200, text
        doc = json.loads(text)
        assert doc["leader"] == "node-2" and doc["source"] == "leader"
        assert sorted(n["node_id"] for n in doc["nodes"]) == ["node-2", "node-3"]
