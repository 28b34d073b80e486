"""`aether node` and the state in its data directory, with real node processes.

- A damaged ``consensus/snapshot.bin`` (cut short, as a disk or a copy can leave it) stops the
  start with one log line naming the file, exit status 1, and the files left as they were. Seen
  before: the start died with a msgspec traceback ("Input data was truncated") naming no file.

Clusters come from the shared fixtures in tests/conftest.py (free ports, PIDs cleaned up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ProcessCluster

pytestmark = [pytest.mark.slow]


async def _put(c: ProcessCluster, n: int) -> None:
    async with c.client(0) as client:
        for k in range(n):
            await client.put(f"user/k{k}", b"v%d" % k)


def _files(d: Path) -> dict[str, bytes]:
    """Every file under `d` (but the lock file and the incarnation counter) and its bytes."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name not in ("node.lock", "incarnation")
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
