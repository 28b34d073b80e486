"""A node whose disk fills up stops (fail-stop) instead of voting on without its journal.

Seen before: with a full disk the journal silently stopped growing while the node kept voting,
with nothing logged. Now the node logs why and what to do, exits with status 1, the others keep
committing, and once there is room again the node restarts and catches up with every
acknowledged write.

Seen later (the test used to write only through the other nodes): a client writing through the
node whose disk filled got `internal error: appending to .../journal.bin failed` for a write the
others may still commit, instead of being sent to another node; and starting the node again
while its disk was still full died with a Python traceback (the incarnation file could not be
written) instead of a line saying so.

Needs root (a small tmpfs is mounted as the node's data directory); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ProcessCluster


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str = "8m") -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a node's data directory needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> Path:
    """Fill the file system at `path` to the last byte; returns the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.timeout(120)
async def test_full_disk_stops_the_node_its_clients_go_elsewhere_and_it_catches_up_after(
    make_process_cluster: Callable[..., ProcessCluster],
) -> None:
    c = make_process_cluster(3, start=False)
    victim = 2
    with tiny_filesystem(c.data_dir(victim)):
        c.start_all()
        await c.await_quorum(30, nodes=[0, 1, 2])
        acked: dict[str, bytes] = {}

        async def put(k: str, v: bytes) -> None:
            await client.put(k, v)  # raises if the write is not acknowledged
            acked[k] = v

        # the client writes through the victim: its requests in flight when the journal fails
        # must move to another node (same session: applied once), not fail
        async with c.client(prefer=victim, timeout=10.0) as client:
            for i in range(50):
                await put(f"user/before-{i}", f"v{i}".encode())
            filler = fill(c.data_dir(victim))
            i = 0
            proc = c.procs[victim]
            assert proc is not None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while proc.poll() is None or i < 100:
                assert loop.time() < deadline, "the node with a full disk did not stop\n" + c.log_tail(victim)
                await asyncio.gather(*(put(f"user/during-{i + j}", f"w{i + j}".encode()) for j in range(4)))
                i += 4
            assert proc.wait(timeout=10) == 1
            c.procs[victim] = None
            log = c.log_text(victim)
            assert "consensus stops" in log and "No space left on device" in log, c.log_tail(victim)
            assert f"free space on the file system holding {c.data_dir(victim)}" in log, c.log_tail(victim)
            assert "stopped:" in log  # run_node's last word names the reason
            # started again while the disk is still full: one line saying so, exit 1, no traceback
            c.start(victim)
            proc = c.procs[victim]
            assert proc is not None and proc.wait(timeout=30) == 1, c.log_tail(victim)
            c.procs[victim] = None
            last_run = c.log_text(victim).rsplit("---- test harness: starting", 1)[1]
            assert "Traceback" not in last_run, last_run
            for says in (f"cannot start node {c.ids[victim]}", "No space left", "free space on the"):
                assert says in last_run, last_run
            filler.unlink()
            c.start(victim)
            await c.await_quorum(30, nodes=[0, 1, 2])
            for j in range(20):
                await put(f"user/after-{j}", f"a{j}".encode())
        await asyncio.to_thread(c.wait_applied_equal, 30.0)
        for node in range(3):
            got = await c.akv(node, "user/")
            missing = {k for k, v in acked.items() if got.get(k) not in (v, v.decode())}
            assert not missing, f"{c.ids[node]} lacks {len(missing)} acked keys, e.g. {sorted(missing)[:3]}"
        c.close()  # before the tmpfs goes away


@pytest.mark.timeout(120)
async def test_a_node_killed_during_a_snapshot_on_a_full_disk_starts_again(
    make_process_cluster: Callable[..., ProcessCluster],
) -> None:
    """A node killed while writing a snapshot leaves `snapshot.bin.tmp` (as large as the snapshot);
    here it fills the rest of the disk. The next start used to fail at once (`writing
    .../incarnation.tmp failed: No space left on device`) and go on failing: nothing removed the
    leftover. Now a replica opening its directory removes it, and the node starts and catches up."""
    c = make_process_cluster(3, start=False)
    victim = 2
    with tiny_filesystem(c.data_dir(victim)):
        c.start_all()
        await c.await_quorum(30, nodes=[0, 1, 2])
        async with c.client(prefer=0, timeout=10.0) as client:
            for i in range(20):
                await client.put(f"user/before-{i}", f"v{i}".encode())
            c.kill9(victim)
            consensus = c.data_dir(victim) / "consensus"
            leftover = fill(consensus).rename(consensus / "snapshot.bin.tmp")
            for i in range(20):
                await client.put(f"user/while-down-{i}", f"w{i}".encode())
            c.start(victim)
            await c.await_quorum(30, nodes=[0, 1, 2])
            assert not leftover.exists()
            await client.put("user/after", b"a")
        await asyncio.to_thread(c.wait_applied_equal, 30.0)
        got = await c.akv(victim, "user/")
        assert len(got) == 41 and got.get("user/after") in (b"a", "a"), sorted(got)[:5]
        last_run = c.log_text(victim).rsplit("---- test harness: starting", 1)[1]
        assert "Traceback" not in last_run and "No space left" not in last_run, last_run
        c.close()  # before the tmpfs goes away
