"""The suite itself: a run stopped with SIGTERM (a CI timeout, `timeout`) still tears the running
test's fixtures down, so the processes they started are stopped, not left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SLEEPY = '''
import os, subprocess, sys, time
import pytest

@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.environ["SLEEPY_PID_FILE"], "w") as f:
        f.write(str(p.pid))
    yield p
    p.kill()
    p.wait()

def test_waits(child):
    print("READY", flush=True)
    time.sleep(120)
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(120)
def test_a_run_stopped_with_sigterm_tears_its_fixtures_down(tmp_path: Path) -> None:
    (tmp_path / "test_sleepy.py").write_text(SLEEPY)
    pid_file = tmp_path / "child.pid"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "SLEEPY_PID_FILE": str(pid_file),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "conftest", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-p", "no:asyncio", f"--basetemp={tmp_path / 'run'}",
         str(tmp_path / "test_sleepy.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    child = None
    try:
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text():
                child = int(pid_file.read_text())
            time.sleep(0.1)
        assert child is not None and alive(child), "the fixture did not start its process"
        time.sleep(0.5)  # into the test's sleep
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert "asked to stop" in out, out
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "SIGTERM left the fixture's process running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
