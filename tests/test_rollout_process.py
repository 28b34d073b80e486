"""Rollouts on 3 real node processes under steady HTTP load through every node's router (issue 17):

- hello 0.1.0 -> 0.2.0 rolling update: zero non-2xx answers, and afterwards only 0.2.0 answers;
- a 0.3.0 whose `start` raises never answers a request and is rolled back;
- a 0.4.0 that fails half its calls is rolled back by the canary's error gate, with the failed
  requests during its canary step at most 1 % of the requests of that step.

Every version is the same slice (same module): on each node the versions run side by side (the
second one in an isolated worker process).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aether.forge.supervisor import ForgeCluster
from aether.slices.repository import Repository
from aether.slices.testing import build_slice_wheel

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

NAME = "org.example:hello"
MODULE = "hello_rollout"
SOURCE = """
import itertools

from aether.slices import Slice, route

BEHAVIOUR = "BEHAVIOUR_VALUE"


class Hello(Slice):
    async def start(self) -> None:
        if BEHAVIOUR == "broken-start":
            raise RuntimeError("cannot reach the database")
        self.calls = itertools.count()

    @route("GET", "/hello/{name}")
    async def greet(self, name: str) -> dict:
        if BEHAVIOUR == "half-fail" and next(self.calls) % 2:
            raise RuntimeError("half of the calls fail")
        return {"version": "VERSION", "name": name}
"""
VERSIONS = {"0.1.0": "ok", "0.2.0": "ok", "0.3.0": "broken-start", "0.4.0": "half-fail"}
BLUEPRINT = f"""
id = "hello"

[slices.hello]
artifact = "{NAME}:0.1.0"
instances = 3
"""


class Load:
    """Steady requests round-robin over the nodes' HTTP ports; every answer recorded."""

    def __init__(self, urls: list[str], workers: int = 6, pause: float = 0.02) -> None:
        self.urls = urls
        self.workers = workers
        self.pause = pause
        self.answers: list[tuple[float, int, str]] = []  # (time, status, version or detail)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self, k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while not self._stop.is_set():
            url = self.urls[i % len(self.urls)]
            i += 1
            try:
                async with session.get(f"{url}/hello/ann") as r:
                    body = await r.json(content_type=None)
                    what = body.get("version", "") if r.status == 200 else str(body.get("detail", body))
                    self.answers.append((time.monotonic(), r.status, what))
            except (aiohttp.ClientError, TimeoutError) as e:
                self.answers.append((time.monotonic(), 0, repr(e)))
            await asyncio.sleep(self.pause)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._tasks = [asyncio.create_task(self._run(k, self._session)) for k in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    def between(self, t0: float, t1: float) -> list[tuple[float, int, str]]:
        return [a for a in self.answers if t0 <= a[0] <= t1]


def failed(answers: list[tuple[float, int, str]]) -> list[tuple[float, int, str]]:
    return [a for a in answers if not 200 <= a[1] < 300]


def why(answers: list[tuple[float, int, str]]) -> list[tuple[tuple[int, str], int]]:
    return Counter((s, w) for _, s, w in failed(answers)).most_common(5)


async def rollout(forge: ForgeCluster, version: str, **settings: Any) -> dict[str, Any]:
    await forge.api("POST", "/api/v1/rollouts", {"artifact": NAME, "version": version, **settings})
    done: dict[str, Any] = await forge.api("POST", f"/api/v1/rollouts/{NAME}/wait?timeout=90", timeout=100)
    return done


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = Repository(tmp_path / "repo")
    for version, behaviour in VERSIONS.items():
        source = SOURCE.replace("BEHAVIOUR_VALUE", behaviour).replace("VERSION", version)
        wheel = build_slice_wheel(tmp_path / "wheels", f"{NAME}:{version}", source, "Hello", module=MODULE)
        repo.deploy(wheel)
    return tmp_path / "repo"


async def test_updates_under_load(tmp_path: Path, repository: Path) -> None:
    forge_dir = tmp_path / "forge"
    async with ForgeCluster(forge_dir, nodes=3, repository=repository, fault_injection=False) as forge:
        await forge.api("POST", "/api/v1/blueprints", {"toml": BLUEPRINT, "filename": "hello.toml"})
        await forge.api("POST", "/api/v1/blueprints/hello/wait?timeout=60", timeout=70)
        urls = [f"http://{a}" for a in forge.http_addresses()]
        assert len(urls) == 3
        async with Load(urls) as load:
            await asyncio.sleep(1.0)
            # 1. rolling update: no request fails, and then only 0.2.0 answers
            t0 = time.monotonic()
            r = await rollout(forge, "0.2.0")
            t1 = time.monotonic()
            assert r["state"] == "succeeded", r["history"]
            await asyncio.sleep(1.0)
            print(f"rolling update of 3 instances: {t1 - t0:.2f} s, {len(load.between(t0, t1))} requests")
            assert not failed(load.answers), why(load.answers)
            assert {w for _, _, w in load.answers} == {"0.1.0", "0.2.0"}
            assert {w for _, _, w in load.between(time.monotonic() - 0.8, time.monotonic())} == {"0.2.0"}
            # 2. a version whose start fails never answers and is rolled back
            r = await rollout(forge, "0.3.0")
            assert r["state"] == "rolled-back" and "cannot reach the database" in r["reason"], r
            await asyncio.sleep(0.5)
            assert "0.3.0" not in {w for _, _, w in load.answers}
            assert not failed(load.answers), why(load.answers)
            # 3. a canary that fails half its calls: rolled back by the error gate
            t2 = time.monotonic()
            r = await rollout(forge, "0.4.0", strategy="canary", steps=[1, 50, 100], interval=30,
                              max_error_rate=0.1, min_calls=6)  # fmt: skip
            t3 = time.monotonic()
            assert r["state"] == "rolled-back" and "max_error_rate" in r["reason"], r
            await asyncio.sleep(1.0)
            step = load.between(t2, t3)
            bad = failed(step)
            share = len(bad) / len(step)
            print(f"canary of 0.4.0: {len(bad)} of {len(step)} requests failed ({100 * share:.2f} %) "
                  f"in {t3 - t2:.1f} s; reason: {r['reason']}")  # fmt: skip
            assert share <= 0.01, (len(bad), len(step))
            assert all(s == 500 or s == 502 for _, s, _ in bad), Counter(s for _, s, _ in bad)
            assert not failed(load.between(t3 + 0.5, time.monotonic()))
        stored = await forge.api("GET", "/api/v1/blueprints/hello")
        assert stored["slices"][0]["artifact"] == f"{NAME}:0.2.0"
        # the CLI: status table and JSON, update --wait, a refused command, undo
        addr = forge.view().nodes[0].management_address
        env = {**os.environ, "AETHER_API_KEY": forge.api_key}

        def aether(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "aether.cli.main", "--connect", addr, *args],
                                  capture_output=True, text=True, timeout=120, env=env)  # fmt: skip

        out = aether("rollout", "status", NAME)
        assert out.returncode == 0 and "rolled-back" in out.stdout and "max_error_rate" in out.stdout, out
        out = aether("rollout", "status", "--json")
        assert [r["new_version"] for r in json.loads(out.stdout)] == ["0.4.0"]
        out = aether("update", NAME, "--to", "0.1.0", "--wait")
        assert out.returncode == 0 and "runs 0.1.0: rollout succeeded" in out.stdout, out
        assert "step" in out.stderr  # the steps, as they happen
        # the same update again starts nothing: the API answers 200 with that rollout, Forge's
        # control and the CLI say so (both said "started" before)
        repeat = {"artifact": NAME, "version": "0.1.0"}
        status, again = await forge.api_status("POST", "/api/v1/rollouts", repeat)
        assert (status, again["state"], again["new_version"]) == (200, "succeeded", "0.1.0")
        done = await forge.update(NAME, "0.1.0")
        assert done.message == f"rollout of {NAME} 0.2.0 -> 0.1.0 (rolling) already succeeded", done
        out = aether("update", NAME, "--to", "0.1.0")
        assert out.returncode == 0 and "already at 0.1.0: its rollout from 0.2.0 succeeded" in out.stdout, out
        out = aether("rollout", "pause", NAME)
        assert out.returncode == 1 and "only a progressing rollout can be paused" in out.stderr, out
        out = aether("rollout", "undo", NAME)
        assert out.returncode == 0 and "rolling back to 0.2.0" in out.stdout, out
        out = aether("rollout", "status", NAME, "--watch")
        assert out.returncode == 0 and "runs 0.2.0" in out.stdout, out
