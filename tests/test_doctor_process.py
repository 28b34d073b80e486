"""`aether doctor` against a real 3-process local cluster (issue 11, item 4): exit 0 on a healthy
cluster serving a slice; non-zero, naming the instance, while an instance is stuck in a
transitional state and its artifact has no ACTIVE instance anywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import LocalCluster, deploy_hello_examples

pytestmark = pytest.mark.timeout(180)

SLOW = "org.example:slow:0.1.0"
SLOW_SRC = """
import asyncio

from aether.slices import Slice, route


class Slow(Slice):
    async def start(self) -> None:
        await asyncio.sleep(8)  # under the 10 s activate deadline: ACTIVATING for 8 s

    @route("GET", "/slow")
    async def ping(self) -> str:
        return "pong"
"""


def _doctor(c: LocalCluster, *args: str) -> tuple[int, dict[str, Any]]:
    r = c.cli("doctor", "--cluster-dir", str(c.dir), "--json", *args, timeout=60)
    return r.returncode, json.loads(r.stdout)


def _verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {ch["name"]: ch["verdict"] for ch in report["checks"]}


def test_doctor_healthy_then_stuck_instance_fails(make_local_cluster: Any, tmp_path: Path) -> None:
    c = make_local_cluster(3)
    deploy_hello_examples(c.repository, tmp_path / "wheels", extra={SLOW: (SLOW_SRC, "Slow")})
    r = c.start()
    assert r.returncode == 0, r.stdout + r.stderr
    blueprint = Path(__file__).resolve().parents[1] / "examples" / "hello" / "hello.blueprint"
    r = c.on(0, "blueprint", "apply", str(blueprint), "--wait", "--wait-timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr

    # healthy: routes and entries served by instances the nodes really run
    deadline = time.monotonic() + 30
    while True:  # leader agreement and the endpoints may take a moment after the apply
        code, report = _doctor(c)
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 0, json.dumps(report, indent=1)
    v = _verdicts(report)
    assert v["routes"] == "ok" and v["instances serving"] == "ok" and v["loop lag"] in ("ok", "warning")
    assert "(3 nodes)" in next(ch["detail"] for ch in report["checks"] if ch["name"] == "loop lag")
    table = c.cli("doctor", "--cluster-dir", str(c.dir), timeout=60)
    assert table.returncode == 0 and "routes" in table.stdout and "✓ ok" in table.stdout

    # an instance stuck in ACTIVATING: its artifact has no ACTIVE instance, users get errors
    r = c.on(1, "deploy", SLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 20
    while True:
        code, report = _doctor(c, "--stuck-after", "1")
        v = _verdicts(report)
        if v["stuck instances"] == "failed" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 1, json.dumps(report, indent=1)
    stuck = next(ch for ch in report["checks"] if ch["name"] == "stuck instances")
    assert any(SLOW in i and "ACTIVAT" in i for i in stuck["items"]), stuck
    serving = next(ch for ch in report["checks"] if ch["name"] == "instances serving")
    assert serving["verdict"] == "failed" and any(SLOW in i for i in serving["items"]), serving
    table = c.cli("doctor", "--cluster-dir", str(c.dir), "--stuck-after", "1", timeout=60)
    assert table.returncode == 1 and "✗ failed" in table.stdout and SLOW in table.stdout
