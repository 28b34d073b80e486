"""Real processes: a node survives its slices (issue 11, "found" 1 and 2).

A slice whose entry calls `time.sleep` used to stop its whole node (peers logged "heartbeat
timeout", the leader re-placed everything the node hosted, other requests stalled); one whose
entry raised `SystemExit` ended its node, and the invoker's retry ended the next one. Now slice
code runs on its own loop: the block is named and answered, the node keeps serving; the exit
fails the call and every node lives; a slice that keeps blocking is quarantined on that node.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import LocalCluster, deploy_hello_examples

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

UNRULY = "org.test:unruly:1.0.0"
UNRULY_SOURCE = '''
import time

from aether.slices import Slice, entry


class Unruly(Slice):
    @entry
    async def nap(self, seconds: float) -> str:
        time.sleep(seconds)  # blocking code in an async entry: the bug this test is about
        return "rested"

    @entry
    async def quit(self) -> str:
        raise SystemExit(3)

    @entry
    async def ping(self) -> str:
        return "pong from " + self.context.node_id
'''

BLUEPRINT = f'''id = "unruly:1"

[slices.unruly]
artifact = "{UNRULY}"
instances = 3

[slices.hello]
artifact = "org.example:hello:0.1.0"
instances = 3
'''


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _hosts(lc: LocalCluster, artifact: str, state: str = "ACTIVE") -> list[int]:
    kv = lc.kv(0, "slices/")
    return sorted(
        lc.ids.index(k.split("/")[1]) for k, v in kv.items()
        if k.endswith("/" + artifact) and v.get("state") == state
    )


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_node_survives_blocking_and_exiting_slice_code(
    make_local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    lc = make_local_cluster(3)
    deploy_hello_examples(lc.repository, tmp_path / "wheels", extra={UNRULY: (UNRULY_SOURCE, "Unruly")})
    out = lc.start()
    assert out.returncode == 0, out.stdout + out.stderr
    bp = tmp_path / "unruly.blueprint"
    bp.write_text(BLUEPRINT)
    out = lc.on(0, "blueprint", "apply", str(bp), "--wait", "--wait-timeout", "90", timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    hosts = _wait(lambda: [i for i in _hosts(lc, UNRULY) if i in _hosts(lc, "org.example:hello:0.1.0")],
                  30, "a node hosting both slices")
    n = hosts[0]
    pids = lc.pids()

    # --- 1. a blocking entry: the call is answered, the node keeps serving, the slice is named ----
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        nap = pool.submit(lc.api, n, "POST", f"/api/v1/invoke/{UNRULY}/nap", {"seconds": 4}, 30)
        time.sleep(0.3)
        t1 = time.monotonic()
        status, doc = lc.api(n, "GET", "/api/v1/status", timeout=5)
        assert status == 200 and time.monotonic() - t1 < 1.0, "management API stalled by a slice"
        t1 = time.monotonic()
        status, doc = lc.api(n, "POST", "/api/v1/invoke/org.example:hello/greet", {"name": "x"}, 5)
        assert status == 200, doc
        assert time.monotonic() - t1 < 1.0, "another slice on the node stalled"
        status, doc = nap.result(timeout=30)
        answered = time.monotonic() - t0
    assert status == 502, doc  # the slice's error (the API's status for errors raised by slices)
    assert "blocked its slice's event loop" in str(doc) and "nap" in str(doc), doc
    assert answered < 3.0, f"the blocked call was answered after {answered:.1f} s, not at the limit"
    time.sleep(4.5)  # past the block: nothing was evicted or re-placed
    log = lc.log_text(n)
    assert f"slice {UNRULY} blocked its event loop" in log and "in nap" in log, log[-3000:]
    for i in range(3):
        assert "heartbeat timeout" not in lc.log_text(i), f"{lc.ids[i]} lost a peer to a blocking slice"
    assert n in _hosts(lc, UNRULY) and n in _hosts(lc, "org.example:hello:0.1.0")

    def blocked() -> int:
        _, doc = lc.api(n, "GET", "/api/v1/metrics", timeout=5)
        naps = [e for e in doc["entries"] if e["artifact"] == UNRULY and e["entry"] == "nap"]
        return sum(e.get("blocked", 0) for e in naps)

    assert _wait(blocked, 15, "the block in the metrics") == 1
    assert lc.api(n, "GET", "/api/v1/status")[1]["slice_blocks"] == 1

    # --- 2. SystemExit: the call fails, every node lives, the slice still serves --------------------
    status, doc = lc.api(n, "POST", f"/api/v1/invoke/{UNRULY}/quit", {}, 30)
    assert status == 502 and "SystemExit(3)" in str(doc), doc
    time.sleep(1.0)
    assert all(_alive(p) for p in pids), "a node process ended"
    for i in range(3):
        status, _ = lc.api(i, "GET", "/api/v1/status", timeout=5)
        assert status == 200
    status, doc = lc.api(n, "POST", f"/api/v1/invoke/{UNRULY}/ping", {}, 10)
    assert status == 200 and doc.startswith("pong from "), doc

    # --- 3. a slice that keeps blocking is quarantined on that node, the node stays -----------------
    for _ in range(2):  # with the nap above: three blocks within a minute
        status, doc = lc.api(n, "POST", f"/api/v1/invoke/{UNRULY}/nap", {"seconds": 0.8}, 30)
        assert status == 502, doc
        time.sleep(0.9)
    key = f"slices/{lc.ids[n]}/{UNRULY}"

    def failed() -> Any:
        v = lc.kv(0, "slices/").get(key)
        return v if v is not None and v.get("state") == "FAILED" else None

    v = _wait(failed, 30, f"{key} FAILED")
    assert v["reason"].startswith("quarantined: nap blocked the slice's event loop"), v
    assert all(_alive(p) for p in pids)
    for i in range(3):
        assert "heartbeat timeout" not in lc.log_text(i)
