"""The node's process exits once its node stopped, even when slice code left threads running.

`aether node` (`aether.node.runner.run_node`) ends its process 1 s after the node stopped even if
slice code still runs (docs/cli.md). Code running on the node's loop was covered (`_run`), but not
the threads slice code starts: a blocked call it made with `asyncio.to_thread` (a thread of the
loop's default executor, which the process shut down waiting for each of its threads) or a thread
of its own that is not a daemon (the interpreter joins them all before it exits) kept the stopped
node's process alive until its supervisor killed it. Here the runner's own exit path, in a child
process: what matters is that the process ends."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(30)

SCRIPT = """
import asyncio, logging, sys, threading, time
from aether.node import runner

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

async def main():  # the node's run: slice code started these, and they block
    threading.Thread(target=time.sleep, args=(60,), name="made-by-a-slice").start()
    asyncio.get_running_loop().run_in_executor(None, time.sleep, 60)
    await asyncio.sleep(0.05)

runner._run(main())
print("node stopped", flush=True)
code = runner.exit_leaving_threads(0)
print("returned", code, flush=True)
sys.exit(code)
"""


def test_threads_slice_code_left_running_do_not_keep_the_stopped_nodes_process_alive() -> None:
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process did not exit within 10 s: {exc.stderr!r}") from None
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert "node stopped" in done.stdout and "returned" not in done.stdout
    assert (
        "2 thread(s) still running 1.0 s after the node stopped (slice code blocked in a thread it "
        "started, or in asyncio.to_thread): asyncio_0, made-by-a-slice; the process exits without them"
    ) in done.stderr, done.stderr
    assert took < 6.0, f"exiting took {took:.1f} s"  # (1 s for the tasks, 1 s for the threads)


def test_a_stopped_nodes_process_with_no_thread_left_exits_as_it_returns() -> None:
    """Idle threads of the default executor end with it: no wait, no warning, no os._exit."""
    script = SCRIPT.replace(
        'threading.Thread(target=time.sleep, args=(60,), name="made-by-a-slice").start()', "pass"
    ).replace("time.sleep, 60)", "time.sleep, 0.01)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert "returned 0" in done.stdout and "still running" not in done.stderr, done.stderr
