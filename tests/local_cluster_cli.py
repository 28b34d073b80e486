"""Helpers of the tests that run `aether cluster ...` as processes: with stand-in nodes
(tests/test_cli_local_cluster.py) and with real ones (tests/test_cluster_cli.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from conftest import free_port_offset


def alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a zombie does not; one of ours is reaped here)."""
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (never reaps it: a `Popen` of the caller
    keeps its exit status)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def wait_gone(pids: list[int | None], seconds: float = 10) -> bool:
    """Whether every process of `pids` has ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


@contextlib.contextmanager
def running_demo(env: dict[str, str], cluster_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """`aether cluster demo` with 3 nodes on free ports, once it has printed quorum and its Ctrl-C
    line; killed on the way out if it still runs."""
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aether.cli.main",
            "cluster",
            "demo",
            "--nodes",
            "3",
            "--dir",
            str(cluster_dir),
            "--base-port-offset",
            str(free_port_offset(3)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert any("Quorum: yes" in line for line in lines), "".join(lines)
        yield demo
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
