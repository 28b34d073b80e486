"""A real `aether node` process stopping (SIGTERM) with slices whose `stop()` swallows its
cancellation: one inline (on the node's loop) and one in a worker process. The node must exit in
bounded time all the same, and its worker with it (tests/test_slices_stop.py covers the runtime,
tests/test_node_stop.py an in-process node; here what matters is the end of the processes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from aether.slices.repository import Repository
from aether.slices.testing import build_slice_wheel
from conftest import aether_cli, http_json
from local_cluster_cli import running

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

SWALLOWS = """
import asyncio, os
from aether.slices import Slice, entry

class Swallows(Slice):
    async def stop(self):
        while True:  # never ends: catches its cancellation and goes on
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass

    @entry
    async def pid(self) -> int:
        return os.getpid()
"""

INLINE = "org.t:inline-swallows:1.0.0"
WORKER = "org.t:worker-swallows:1.0.0"
BLUEPRINT = f"""
id = "swallows:1"
[slices.inline]
artifact = "{INLINE}"
isolation = "inline"

[slices.worker]
artifact = "{WORKER}"
isolation = "process"
"""


def test_a_node_process_exits_when_its_slices_stop_hooks_never_end(
    make_process_cluster: Any, tmp_path: Path
) -> None:
    """The node's stop abandons both stop()s after 5 s (stop_timeout), then the inline one's left
    task 2 s later, and the process ends 1 s after that. The process sat in asyncio.run's own
    clean-up, which cancels every task left and waits for all of them: for ever (until SIGKILL by
    its supervisor). The worker exited only on SIGTERM, 10 s (2 x stop_timeout) after it was asked
    to, for the same reason."""
    c = make_process_cluster(1, start=False)
    repo = Repository(c.repository)
    for coords, module in ((INLINE, "inline_swallows"), (WORKER, "worker_swallows")):
        repo.deploy(build_slice_wheel(tmp_path / "wheels", coords, SWALLOWS, "Swallows", module=module))
    c.start_all()
    c.wait_quorum(30)
    addr = f"127.0.0.1:{c.management_ports[0]}"
    bp = tmp_path / "swallows.blueprint"
    bp.write_text(BLUEPRINT)
    r = aether_cli("--connect", addr, "blueprint", "apply", str(bp), "--wait", "--wait-timeout", "60")
    assert r.returncode == 0, r.stderr
    status, worker = http_json(c.management_ports[0], "POST", "/api/v1/invoke/org.t:worker-swallows/pid")
    assert status == 200, worker
    node = c.pid(0)
    assert node is not None and worker != node and running(worker)
    t0 = time.monotonic()
    assert c.stop(0, timeout=30) == 0
    took = time.monotonic() - t0
    log = c.log_text(0)
    # 5 s (stop_timeout) + 2 s (the inline stop() left) + 1 s (tasks left when the process ends);
    # before: never (the worker alone: 5 + 10 s)
    assert took < 12.5, f"the node took {took:.1f} s to exit\n{c.log_tail(0)}"
    assert not running(worker)
    for coords in (INLINE, WORKER):
        assert f"stop() of {coords} instance 0 did not finish within 5.0 s; abandoned" in log, log
    assert f"slice {INLINE}: stop() still running 2.0 s after it was cancelled" in log
    assert "ignored SIGTERM" not in log
    assert (
        "1 task(s) still running 1.0 s after the node stopped and cancelled them (code that catches "
        f"asyncio.CancelledError and goes on): stop() of {INLINE}; the process exits without them"
    ) in log
    assert "GeneratorExit" not in log and "Traceback" not in log, log
