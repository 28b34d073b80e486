"""`/readyz` while a REAL node process stops (SIGTERM) with an HTTP request in flight.

On SIGTERM the node stops taking HTTP connections and lets the requests in flight finish (up to
5 s; docs/cli.md) before it stops its management API. Found walking docs/operations.md: during
that drain `/readyz` still answered 200 ready, so a load balancer kept sending new connections to
a router that no longer accepted them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aether.slices.repository import Repository
from aether.slices.testing import build_slice_wheel
from conftest import HOST, aether_cli, http_json

pytestmark = [pytest.mark.timeout(120)]

SLOW = """
import asyncio
from aether.slices import Slice, route

class Slow(Slice):
    @route("GET", "/slow")
    async def slow(self) -> str:
        await asyncio.sleep(3.0)
        return "done"
"""

COORDS = "org.t:slow:1.0.0"


def test_readyz_is_503_while_the_router_drains_on_sigterm(make_process_cluster: Any, tmp_path: Path) -> None:
    c = make_process_cluster(1, start=False)
    wheel = build_slice_wheel(tmp_path / "wheels", COORDS, SLOW, "Slow", module="slow_t")
    Repository(c.repository).deploy(wheel)
    c.start_all()
    c.wait_quorum(30)
    bp = tmp_path / "slow.blueprint"
    bp.write_text(f'id = "slow:1"\n[slices.slow]\nartifact = "{COORDS}"\n')
    r = aether_cli("--connect", f"{HOST}:{c.management_ports[0]}", "blueprint", "apply", str(bp), "--wait",
                   "--wait-timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert http_json(c.management_ports[0], "GET", "/readyz")[0] == 200

    answer: list[Any] = []

    def slow_request() -> None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{c.http_ports[0]}/slow", timeout=20) as resp:
                answer.append((resp.status, json.loads(resp.read())))
        except (urllib.error.URLError, OSError) as e:
            answer.append(e)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.5)  # the request is in the slice
    pid = c.pid(0)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    # the drain lasts ~2.5 s more: the probe must say the node is not ready any more
    seen: list[tuple[int, Any]] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            seen.append(http_json(c.management_ports[0], "GET", "/readyz", timeout=1))
        except OSError:
            break  # the management API has stopped: the drain is over
        if seen[-1][0] == 503:
            break
        time.sleep(0.05)
    t.join(20)
    assert answer and answer[0] == (200, "done"), answer  # the request in flight finished
    assert seen, "the management API stopped at once (no probe answered)"
    status, body = seen[-1]
    assert status == 503, f"/readyz during the drain: {[s for s, _ in seen]}"
    assert body["reason"] == "the node is stopping", body
    assert c.stop(0, timeout=20) == 0  # (a second SIGTERM changes nothing: the stop goes on)
