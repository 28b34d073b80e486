"""Admission control on real processes (issue 11, item 3): a runaway blueprint is rejected with a
400 naming the limit, a large allowed one converges while every node's management API answers
within 1 s, and a blueprint can always be deleted, also while it converges."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import LocalCluster, deploy_hello_examples

pytestmark = pytest.mark.timeout(180)

HELLO = "org.example:hello:0.1.0"


def _bp(bp_id: str, n: int) -> dict[str, str]:
    return {"toml": f'id = "{bp_id}"\n[slices.hello]\nartifact = "{HELLO}"\ninstances = {n}\n'}


class Prober:
    """Asks every node's management API for its status in a loop; records the slowest answer."""

    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.worst = 0.0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i in range(self.c.nodes):
                t0 = time.monotonic()
                try:
                    status, _ = self.c.api(i, "GET", "/api/v1/status", timeout=1.0)
                    if status != 200:
                        self.errors.append(f"node {i}: {status}")
                except Exception as e:  # a timeout: no answer within 1 s
                    self.errors.append(f"node {i}: {e!r}")
                self.worst = max(self.worst, time.monotonic() - t0)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def _active(c: LocalCluster) -> int:
    status, slices = c.api(0, "GET", "/api/v1/slices")
    assert status == 200, slices
    return sum(s["active"] for s in slices if s["artifact"] == HELLO)


def _wait(pred: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_runaway_rejected_large_converges_responsive_delete_always_works(
    make_local_cluster: Any, tmp_path: Path
) -> None:
    c = make_local_cluster(3)
    deploy_hello_examples(c.repository, tmp_path / "wheels")
    r = c.start()
    assert r.returncode == 0, r.stdout + r.stderr

    # runaway: rejected at once, naming the limit and the numbers, nothing written
    status, doc = c.api(0, "POST", "/api/v1/blueprints", _bp("big", 1_000_000))
    assert status == 400, doc
    assert "max_instances_per_cluster = 3000" in doc["detail"] and "1000000" in doc["detail"]
    status, doc = c.api(1, "POST", "/api/v1/deploy", {"artifact": HELLO, "instances": 5000})
    assert status == 400 and "max_instances_per_cluster = 3000" in doc["detail"], doc
    assert c.api(0, "GET", "/api/v1/blueprints") == (200, [])

    prober = Prober(c)
    try:
        # the largest allowed one (default limits: 1000 per node, 3000 in the cluster) converges
        status, doc = c.api(0, "POST", "/api/v1/blueprints", _bp("large", 3000))
        assert status == 201, doc
        took = _wait(lambda: _active(c) == 3000, 90, "3000 instances ACTIVE")
        # scaling beyond the limit is rejected too
        status, doc = c.api(2, "POST", "/api/v1/scale", {"artifact": HELLO, "instances": 3001})
        assert status == 400 and "3001" in doc["detail"], doc
        t0 = time.monotonic()
        status, doc = c.api(1, "DELETE", "/api/v1/blueprints/large", timeout=5)
        assert status == 200, doc
        assert time.monotonic() - t0 < 1.0
        _wait(lambda: c.api(0, "GET", "/api/v1/slices")[1] == [], 60, "slices removed")

        # delete while a large change is converging
        assert c.api(0, "POST", "/api/v1/blueprints", _bp("again", 3000))[0] == 201
        _wait(lambda: _active(c) > 0, 30, "first instances ACTIVE")
        t0 = time.monotonic()
        status, doc = c.api(2, "DELETE", "/api/v1/blueprints/again", timeout=5)
        assert status == 200, doc
        assert time.monotonic() - t0 < 1.0
        _wait(lambda: c.api(0, "GET", "/api/v1/slices")[1] == [], 60, "slices removed after delete mid-way")
    finally:
        prober.stop()
    print(f"3000 instances converged in {took:.1f} s; slowest management API answer {prober.worst:.3f} s")
    assert not prober.errors, prober.errors[:5]
    assert prober.worst < 1.0
    r = c.stop()
    assert r.returncode == 0, r.stdout + r.stderr  # SIGTERM was enough
    assert "Killed" not in r.stdout + r.stderr and r.stdout.count("Stopped node-") == 3, r.stdout
