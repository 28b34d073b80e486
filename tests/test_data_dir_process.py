"""`aether node` and the state in its data directory, with real node processes.

- A damaged ``consensus/snapshot.bin`` (cut short, as a disk or a copy can leave it) stops the
  start with one log line naming the file, exit status 1, and the files left as they were. Seen
  before: the start died with a msgspec traceback ("Input data was truncated") naming no file.
- A byte changed inside a value of ``consensus/snapshot.bin`` stops the start the same way, naming
  the file and that its checksum does not match. Seen before (an audit): it loaded silently and
  the node served the changed value (the journal had checksums, the snapshot none). A snapshot of
  the previous format, without a checksum, still loads.
- A second `aether node` on a data directory a running node holds refuses to start (naming the
  directory and the holder's pid) and touches nothing. Seen before: it started and served on
  the same journal and snapshot as the running node, both appending to one ``journal.bin``.
- The lock dies with its process: after kill -9 the node starts again on the same directory.

Clusters come from the shared fixtures in tests/conftest.py (free ports, PIDs cleaned up).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from conftest import ProcessCluster, free_ports

pytestmark = [pytest.mark.slow]


async def _put(c: ProcessCluster, n: int) -> None:
    async with c.client(0) as client:
        for k in range(n):
            await client.put(f"user/k{k}", b"v%d" % k)


def _files(d: Path) -> dict[str, bytes]:
    """Every file under `d` (but the lock file, the incarnation counter and `maps/alive`, the
    liveness time a running node rewrites every few seconds: a clean clone failed when the holder
    first wrote it between the two reads of a refused start's test) and its bytes."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name not in ("node.lock", "incarnation")
        and str(p.relative_to(d)) != "maps/alive"
    }


def _wait_exit(c: ProcessCluster, i: int, timeout: float = 30) -> int:
    p = c.procs[i]
    assert p is not None
    rc = p.wait(timeout=timeout)
    c.procs[i] = None
    return rc


@pytest.mark.timeout(90)
def test_truncated_snapshot_stops_the_start_naming_the_file(
    make_process_cluster: Callable[..., ProcessCluster],
) -> None:
    c = make_process_cluster(1)
    asyncio.run(_put(c, 5))
    assert c.stop(0) == 0  # a clean stop leaves a snapshot holding the writes
    snap = c.data_dir(0) / "consensus" / "snapshot.bin"
    data = snap.read_bytes()
    snap.write_bytes(data[: len(data) // 2])
    before = _files(c.data_dir(0))

    c.start(0)
    assert _wait_exit(c, 0) == 1
    log = c.log_text(0)
    assert "Traceback" not in log, c.log_tail(0)
    lines = c.log_lines(0, "cannot start node node-1", f"snapshot {snap} cannot be decoded")
    assert lines, c.log_tail(0)
    assert _files(c.data_dir(0)) == before  # the failed start changed nothing


@pytest.mark.timeout(120)
def test_a_byte_changed_in_a_snapshot_value_stops_the_start_and_the_previous_format_loads(
    make_process_cluster: Callable[..., ProcessCluster],
) -> None:
    from test_snapshot_checksum import PreviousEngineSnapshot

    value = b"a value the snapshot holds"

    async def put() -> None:
        async with c.client(0) as client:
            for k in range(5):
                await client.put(f"user/k{k}", value + b"%d" % k)

    async def read() -> list[bytes | None]:
        async with c.client(0) as client:
            return [await client.get(f"user/k{k}") for k in range(5)]

    c = make_process_cluster(1)
    asyncio.run(put())
    assert c.stop(0) == 0  # a clean stop leaves a snapshot holding the writes
    snap = c.data_dir(0) / "consensus" / "snapshot.bin"
    data = snap.read_bytes()
    at = data.index(value + b"3")
    snap.write_bytes(data[:at] + b"A" + data[at + 1:])  # 'a' -> 'A': the snapshot still decodes
    before = _files(c.data_dir(0))

    c.start(0)
    assert _wait_exit(c, 0) == 1
    assert "Traceback" not in c.log_text(0), c.log_tail(0)
    lines = c.log_lines(0, "cannot start node node-1", f"snapshot {snap} is damaged: its contents do not "
                        "match their checksum")
    assert lines, c.log_tail(0)
    assert _files(c.data_dir(0)) == before  # the failed start changed nothing

    # the undamaged snapshot, as the previous release wrote it (no checksum): it loads
    sealed = msgspec.msgpack.decode(data, type=PreviousEngineSnapshot)
    snap.write_bytes(msgspec.msgpack.encode(sealed))
    c.start(0)
    c.wait_quorum(20)
    assert asyncio.run(read()) == [value + b"%d" % k for k in range(5)]


@pytest.mark.timeout(90)
def test_second_node_on_a_held_data_dir_refuses_to_start(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path,
) -> None:
    c = make_process_cluster(1)
    asyncio.run(_put(c, 5))
    holder = c.pid(0)
    data = c.data_dir(0)
    before = _files(data)

    # the same node's command line with other ports (a copied config, a second terminal)
    cmd = c.command(0)
    ports = free_ports(3)
    for flag, port in zip(("--cluster-port", "--management-port", "--http-port"), ports, strict=True):
        cmd[cmd.index(flag) + 1] = str(port)
    cmd[cmd.index("--peers") + 1] = f"node-1=127.0.0.1:{ports[0]}"
    log = tmp_path / "second.log"
    with open(log, "wb") as out:
        second = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=c.env,
            start_new_session=True,
        )
    try:
        try:
            rc = second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        text = log.read_text(errors="replace")
        assert rc == 1, f"the second node runs on {data} (exit code {rc}); its log:\n{text[-3000:]}"
        assert f"data directory {data} is in use by another process (pid {holder}" in text, text
        assert "Traceback" not in text, text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=10)
    c.check_alive()
    assert _files(data) == before  # the refused start changed nothing

    # the running node is unharmed; after kill -9 (no unlock) the node starts again
    asyncio.run(_put(c, 3))
    c.kill9(0)
    c.start(0)
    c.wait_quorum(20)

    async def read() -> bytes | None:
        async with c.client(0) as client:
            return await client.get("user/k4")

    assert asyncio.run(read()) == b"v4"
