"""The suite itself: a run stopped with SIGTERM (a CI timeout, `timeout`) still tears the running
test's fixtures down, so the processes they started are stopped, not left behind; the two
pytest-xdist workers never hand out the same port; a process cluster whose port another program
took starts again on other ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import conftest
from conftest import HOST, ROOT, ProcessCluster

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


def test_xdist_workers_draw_ports_from_disjoint_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean clone failed once: node-2 of a cluster could not bind its port (EADDRINUSE),
    because the other worker had handed the same port to a server of its own; the cluster had a
    quorum without node-2, and a client met the other server on node-2's address."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    shares = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setattr(conftest, "_handed_out", set())
        ports = set(conftest.free_ports(200))
        k = conftest.free_port_offset(3)
        ports |= {base + k + i for base in (7000, 9000, 8080) for i in range(3)}
        assert all(conftest._ours(p) for p in ports)
        shares.append(ports)
    assert not shares[0] & shares[1]


def test_a_process_cluster_whose_port_was_taken_starts_again_on_other_ports(
    make_process_cluster: Callable[..., ProcessCluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = conftest.free_ports
    drawn: list[list[int]] = []

    def rigged(n: int, host: str = HOST) -> list[int]:
        ports = real(n, host)
        if not drawn:
            ports[1] = port  # node-2's cluster port: another program listens there
        drawn.append(ports)
        return ports

    monkeypatch.setattr(conftest, "free_ports", rigged)
    try:
        c = make_process_cluster(3)
    finally:
        taken.close()
    assert len(drawn) == 2 and port not in c.cluster_ports
    assert c.running() == [0, 1, 2]


def test_the_files_longest_first_are_run_first() -> None:
    """tests/file_seconds.json names files that exist (a renamed file would silently lose its
    place), and the collection hook puts them first, longest first, each file's tests together
    and in their order."""
    weights = json.loads((ROOT / "tests" / "file_seconds.json").read_text())
    missing = [f for f in weights if not (ROOT / "tests" / f).is_file()]
    assert not missing, f"tests/file_seconds.json names files that do not exist: {missing}"
    light, heavy = "tests/test_zz_unlisted.py", "tests/" + min(weights, key=lambda f: weights[f])
    heaviest = "tests/" + max(weights, key=lambda f: weights[f])
    ids = [f"{light}::a", f"{heavy}::a", f"{light}::b", f"{heaviest}::a", f"{heavy}::b", f"{heaviest}::b"]
    items = [types.SimpleNamespace(nodeid=i) for i in ids]
    conftest.pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [it.nodeid for it in items] == [
        f"{heaviest}::a", f"{heaviest}::b", f"{heavy}::a", f"{heavy}::b", f"{light}::a", f"{light}::b",
    ]  # fmt: skip



@pytest.fixture(scope="module")
def unstarted_module_cluster(make_module_process_cluster: Callable[..., ProcessCluster]) -> ProcessCluster:
    c = make_module_process_cluster(2, start=False)  # nothing runs: only the failure report is tested
    c.log_path(1).parent.mkdir(parents=True)
    c.log_path(1).write_text("the line the report of a failing test must show\n")
    return c


def test_a_failing_test_gets_the_node_logs_of_its_modules_shared_cluster(
    unstarted_module_cluster: ProcessCluster, request: pytest.FixtureRequest
) -> None:
    """`make_module_process_cluster` records its clusters on the module, and the report hook
    attaches their node logs to any failing test of the module, not only to the test (the
    fixture's first user) that made them."""
    rep = types.SimpleNamespace(failed=True, when="call", sections=[])
    hook = conftest.pytest_runtest_makereport(request.node, None)  # type: ignore[arg-type]
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(types.SimpleNamespace(get_result=lambda: rep))
    assert [name for name, _ in rep.sections] == ["node logs (cluster 0, call)"]
    assert "===== node-2 (down)" in rep.sections[0][1]
    assert "the line the report of a failing test must show" in rep.sections[0][1]
