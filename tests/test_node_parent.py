"""A node started with ``AETHER_PARENT_PID`` (what Aether Forge does) stops itself when that
process dies, even by SIGKILL: no node is left behind (a Forge killed hard, or a failed test
that killed it, used to leave its five nodes running, busy and holding their ports). Real
processes: an intermediate parent starts the node, is killed, and the node must go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from aether.core.config import PARENT_PID_ENV
from aether.node.runner import parent_pid_from_env
from conftest import free_ports

pytestmark = pytest.mark.timeout(90)

PARENT = """
import os, subprocess, sys, time
env = dict(os.environ)
env[sys.argv[1]] = str(os.getpid())
with open(sys.argv[2], "ab") as log:
    p = subprocess.Popen(sys.argv[3:], env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
print(p.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, f"not {what} within {timeout} s"
        time.sleep(0.05)


def test_a_node_whose_parent_dies_stops_itself(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    log = tmp_path / "node.log"
    node = [
        sys.executable, "-m", "aether.cli.main", "node", "--id", "node-1",
        "--peers", f"node-1=127.0.0.1:{port}", "--host", "127.0.0.1", "--cluster-port", str(port),
        "--management-port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, PARENT_PID_ENV, str(log), *node],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        _wait(lambda: "node node-1 started" in log.read_text(errors="replace"), 45, "the node up")
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        _wait(lambda: not _alive(pid), 15, "the orphaned node gone")
        text = log.read_text(errors="replace")
        assert f"the process that started this node (pid {parent.pid}) is gone: stopping the node" in text
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_parent_pid_variable_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    assert parent_pid_from_env() is None
    monkeypatch.setenv(PARENT_PID_ENV, "1234")
    assert parent_pid_from_env() == 1234
    for bad in ("forge", "-5", "0"):
        monkeypatch.setenv(PARENT_PID_ENV, bad)
        with pytest.raises(ValueError, match=rf"AETHER_PARENT_PID must be the process id .* got '{bad}'"):
            parent_pid_from_env()


def test_forge_hands_its_pid_to_its_nodes(tmp_path: Path) -> None:
    from aether.forge.supervisor import ForgeCluster

    c = ForgeCluster(tmp_path, nodes=1)
    assert c._child_env()[PARENT_PID_ENV] == str(os.getpid())
