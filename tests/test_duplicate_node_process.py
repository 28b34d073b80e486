"""A second process with a member's id, started with ``--peers`` (a copied command line with other
ports), with real node processes.

Found by an audit (after `--join` was made to refuse the case, d46ad36): a fourth process knowing
the cluster secret and started as node-2 at another port took node-2's place on every link. The
members took its authenticated hello for node-2 restarted and dropped the real node-2's
connection; the real node-2 saw its peers go down, dialed again and took the links back, and so
on (its leadership, when it led, flapped with them), while the second process ran on. Now:

- while the members reach node-2 at its member address, a hello claiming node-2 from another
  process (its `PeerHello.instance` differs from the one node-2 acknowledged our dial with) is
  refused, with the reason logged; the second process learns why (`Reject.code`) and exits with
  status 2 naming node-2's address; the real node-2 never loses a link;
- when the second process came first (node-2 was stopped: nothing at its address to contradict
  it) and the real node-2 starts again, the real one gets its links and the second process is
  turned away and exits 2;
- the real node-2 restarted by kill -9 (a new process at its own address) is still accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ProcessCluster, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _second_node2(c: ProcessCluster, tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    """node-2's command line with other ports (its entry in --peers too: a node refuses to listen
    elsewhere than its entry says) and its own data directory; (process, log, cluster port)."""
    cmd = c.command(1)
    ports = free_ports(3)
    for flag, port in zip(("--cluster-port", "--management-port", "--http-port"), ports, strict=True):
        cmd[cmd.index(flag) + 1] = str(port)
    at = cmd.index("--peers") + 1
    cmd[at] = cmd[at].replace(f"node-2={c.address(1)}", f"node-2=127.0.0.1:{ports[0]}")
    cmd[cmd.index("--data-dir") + 1] = str(tmp_path / name / "data")
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=c.env,
            start_new_session=True,
        )  # fmt: skip
    return proc, log, ports[0]


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _since(c: ProcessCluster, i: int, mark: int) -> str:
    return c.log_text(i)[mark:]


async def _write_and_read(c: ProcessCluster, key: str) -> bytes | None:
    async with c.client(0) as client:
        await client.put(key, b"ok")
        return await client.get(key)


def test_a_second_process_with_a_members_id_is_refused_and_exits_2(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path,
) -> None:
    c = make_process_cluster(3)
    c.wait_quorum(30)
    node2 = c.address(1)

    # 1. node-2 runs; a second process starts as node-2 at another port
    marks = [len(c.log_text(i)) for i in range(3)]
    second, log, port = _second_node2(c, tmp_path, "second")
    try:
        rc = _wait(second, 40)
        text = log.read_text(errors="replace")
        flaps = [ln for ln in _since(c, 1, marks[1]).splitlines() if " down" in ln and "peer node-" in ln]
        assert rc == 2, (
            f"the second node-2 runs on (exit code {rc}); the real node-2 lost its peers "
            f"{len(flaps)} times meanwhile: {flaps[:6]}\nits log:\n{text[-3000:]}"
        )
    finally:
        _kill(second)
    assert "Traceback" not in text, text
    assert f"node-2 is already running in the cluster, at {node2}" in text, text[-3000:]
    assert f"this process (listening on 127.0.0.1:{port}) is a second one with its id" in text, text[-3000:]
    refused = [ln for i in (0, 2) for ln in _since(c, i, marks[i]).splitlines()
               if "a second process with the id of node-2" in ln]
    assert refused, c.logs_report()
    assert f"at its member address {node2}" in refused[0] and "rejected" in refused[0], refused[0]
    # no connection of the real node-2 was displaced (what the members did to it before: its peers
    # went down, 'connection closed by the remote side', about three times a second)
    for i in range(3):
        downs = [ln for ln in _since(c, i, marks[i]).splitlines()
                 if "peer node-" in ln and " down: connection closed by the remote side" in ln]
        assert not downs, (c.ids[i], downs)
    c.wait_quorum(20)
    assert asyncio.run(_write_and_read(c, "user/after-second")) == b"ok"

    # 2. node-2 stopped: a second process starts as node-2 first (nothing at node-2's address
    # contradicts it), then the real node-2 starts again: the real one wins, the second exits 2
    assert c.stop(1) == 0
    second, log, port = _second_node2(c, tmp_path, "first")
    try:
        time.sleep(3)
        assert second.poll() is None, log.read_text(errors="replace")[-3000:]
        c.start(1)
        rc = _wait(second, 40)
        text = log.read_text(errors="replace")
        assert rc == 2, f"exit code {rc}; its log:\n{text[-3000:]}"
    finally:
        _kill(second)
    assert f"node-2 is already running in the cluster, at {node2}" in text, text[-3000:]
    c.wait_quorum(30)
    assert asyncio.run(_write_and_read(c, "user/after-first")) == b"ok"

    # 3. the real node-2, killed and started again at its own address, is accepted at once
    marks = [len(c.log_text(i)) for i in range(3)]
    c.kill9(1)
    c.start(1)
    c.wait_quorum(30)
    assert asyncio.run(_write_and_read(c, "user/after-restart")) == b"ok"
    for i in (0, 2):
        assert "a second process" not in _since(c, i, marks[i]), _since(c, i, marks[i])[-3000:]
