"""`DiskStore`: torn tails vs. corruption, failed writes, group commit, snapshots that keep the slot
in progress, power loss (simulated file system) and the same rules on the real file system."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from aether.consensus.storage import (
    DiskStore,
    JournalCorrupt,
    JournalError,
    OsFileSystem,
    frame,
    scan_journal,
)
from aether.core.problem import problem_for
from aether.testing.simfs import SimFileSystem

D = Path("/sim/node/consensus")


def payloads(store: DiskStore) -> list[bytes]:
    _, recs = store.load()
    return [p for _, p in recs]


# --- torn tails and corruption -----------------------------------------------------------------------


def test_scan_cuts_a_torn_tail_of_any_shape() -> None:
    good = frame(b"one") + frame(b"two")
    third = frame(b"three-three")
    for tail in (third[:3], third[:-2], third[:-1] + b"\xff", bytes(40), third[:9] + bytes(6)):
        recs, valid = scan_journal(good + tail)
        assert [p for _, p in recs] == [b"one", b"two"]
        assert valid == len(good)


def test_scan_refuses_damage_with_valid_records_after_it() -> None:
    a, b, c = frame(b"alpha"), frame(b"bravo"), frame(b"charlie")
    damaged = bytearray(a + b + c)
    damaged[len(a) + 9] ^= 0x01  # a bit flip inside record 2's payload
    with pytest.raises(JournalCorrupt) as e:
        scan_journal(bytes(damaged), "/x/journal.bin")
    msg = str(e.value)
    assert "/x/journal.bin" in msg and f"offset {len(a)}" in msg and f"offset {len(a) + len(b)}" in msg


def test_load_truncates_a_torn_tail_so_appends_follow_a_valid_record() -> None:
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"r1", b"r2"])
    fs.files[s.journal_path].data += frame(b"r3")[:-2]
    s2 = DiskStore(D, fs=fs)
    assert payloads(s2) == [b"r1", b"r2"]
    s2.append([b"r4"])
    assert payloads(DiskStore(D, fs=fs)) == [b"r1", b"r2", b"r4"]


def test_real_file_system_corruption_names_file_and_offset(tmp_path: Path) -> None:
    s = DiskStore(tmp_path)
    s.append([b"first", b"second", b"third"])
    s.close()
    raw = bytearray(s.journal_path.read_bytes())
    raw[len(frame(b"first")) + 8] ^= 0xFF
    s.journal_path.write_bytes(bytes(raw))
    with pytest.raises(JournalCorrupt, match=rf"{s.journal_path}.*offset {len(frame(b'first'))}"):
        DiskStore(tmp_path).load()


# --- write failures: fail-stop ------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_failed_append_fails_the_store_for_good(err: int) -> None:
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"ok"])
    fs.fail_writes = err
    with pytest.raises(JournalError, match="appending"):
        s.append([b"lost"])
    fs.fail_writes = None
    assert s.failed is not None
    # says what to do, and a request that failed with it is a 503 naming it (outcome unknown)
    remedy = "free space on the file system holding" if err == errno.ENOSPC else "check the disk holding"
    assert f"{remedy} {D}" in str(s.failed) and "then start the node again" in str(s.failed)
    assert problem_for(s.failed).status == 503 and problem_for(s.failed).detail == str(s.failed)
    with pytest.raises(JournalError):
        s.append([b"later"])  # never writes again, even when the disk has room again
    seen: list[BaseException | None] = []
    s.when_durable(seen.append)
    assert seen == [s.failed]


def test_a_full_disk_part_way_through_a_record_leaves_a_torn_tail() -> None:
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"a" * 10])
    fs.capacity = len(fs.files[s.journal_path].data) + 7
    with pytest.raises(JournalError, match="No space"):
        s.append([b"b" * 10])
    fs.capacity = None
    assert payloads(DiskStore(D, fs=fs)) == [b"a" * 10]


@pytest.mark.parametrize("fault", ["full", "eio", "fsync"])
def test_a_failed_snapshot_leaves_no_temporary_file(fault: str) -> None:
    # A failed snapshot's temporary (up to a whole snapshot) used to stay until the next snapshot
    # that succeeded, holding the space a full disk needed for the node to start again.
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"a" * 10])
    s.sync()
    if fault == "full":
        fs.capacity = fs._used() + 1_000  # room for part of the snapshot
    elif fault == "eio":
        fs.fail_writes = errno.EIO
    else:
        fs.fail_fsync = errno.EIO
    with pytest.raises(JournalError, match="snapshot"):
        s.save_snapshot(b"S" * 5_000, [b"a" * 10])
    assert sorted(p.name for p in fs.files) == ["journal.bin"]
    fs.capacity = fs.fail_writes = fs.fail_fsync = None
    assert payloads(DiskStore(D, fs=fs)) == [b"a" * 10]


def test_a_failed_incarnation_write_leaves_no_temporary_file() -> None:
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    fs.fail_writes = errno.ENOSPC
    with pytest.raises(JournalError, match="incarnation"):
        s.next_incarnation(5)
    assert not fs.files


@pytest.mark.parametrize("real", [False, True])
def test_opening_removes_the_temporaries_a_write_that_never_finished_left(real: bool, tmp_path: Path) -> None:
    # a kill (or a power cut) between writing a temporary and renaming it leaves it behind
    fs: SimFileSystem | OsFileSystem
    if real:
        d, fs = tmp_path / "consensus", OsFileSystem()
        d.mkdir()
        for name in ("snapshot.bin.tmp", "journal.bin.tmp", "incarnation.tmp", "notes.tmp", "journal.bin"):
            (d / name).write_bytes(b"x" * 100)
    else:
        d, fs = D, SimFileSystem()
        fs.makedirs(d)
        for name in ("snapshot.bin.tmp", "journal.bin.tmp", "incarnation.tmp", "notes.tmp", "journal.bin"):
            h = fs.open(d / name, truncate=True)
            fs.write(h, b"x" * 100)
            fs.close(h)
    DiskStore(d, fs=fs)
    left = sorted(p.name for p in d.iterdir()) if real else sorted(p.name for p in fs.files)
    assert left == ["journal.bin", "notes.tmp"]  # only its own names: nothing else is touched


def test_short_writes_are_completed() -> None:
    fs = SimFileSystem()
    fs.short_writes = True
    s = DiskStore(D, fs=fs)
    s.append([b"x" * 1000, b"y" * 333])
    s.save_snapshot(b"S" * 5000, [b"kept"])
    fs.short_writes = False
    s2 = DiskStore(D, fs=fs)
    snap, recs = s2.load()
    assert snap == b"S" * 5000 and [p for _, p in recs] == [b"kept"]


def test_a_failed_background_fsync_reports_to_every_waiter() -> None:
    pending: list[object] = []
    fs = SimFileSystem(schedule=lambda _d, fn: pending.append(fn))
    s = DiskStore(D, fs=fs)
    s.append([b"r"])
    got: list[BaseException | None] = []
    s.when_durable(got.append)
    fs.fail_fsync = errno.EIO
    pending.pop()()  # type: ignore[operator]
    assert len(got) == 1 and isinstance(got[0], JournalError)
    assert s.failed is got[0]


# --- group commit -------------------------------------------------------------------------------------


def test_group_commit_one_fsync_covers_all_records_written_before_it() -> None:
    pending: list[object] = []
    fs = SimFileSystem(schedule=lambda _d, fn: pending.append(fn))
    s = DiskStore(D, fs=fs)
    done: list[str] = []
    s.append([b"1"])
    assert s.when_durable(lambda e: done.append("a")) is False
    s.append([b"2"])
    s.when_durable(lambda e: done.append("b"))  # written after the running fsync started
    s.append([b"3"])
    s.when_durable(lambda e: done.append("c"))
    assert len(pending) == 1 and done == []
    pending.pop(0)()  # type: ignore[operator]
    assert done == ["a"] and len(pending) == 1  # b and c need a second fsync, and share it
    pending.pop(0)()  # type: ignore[operator]
    assert done == ["a", "b", "c"] and not pending
    assert s.stats["fsyncs"] == 2 and s.stats["appends"] == 3
    # nothing new written: durable at once
    assert s.when_durable(lambda e: done.append("d")) is True and done[-1] == "d"


def test_policy_none_never_waits_and_never_fsyncs() -> None:
    fs = SimFileSystem(schedule=lambda _d, fn: pytest.fail("no fsync expected"))
    s = DiskStore(D, "none", fs=fs)
    s.append([b"1"])
    assert s.when_durable(lambda e: None) is True
    s.save_snapshot(b"snap", [])
    assert fs.fsyncs == 0 and fs.dir_fsyncs == 0


# --- snapshots ----------------------------------------------------------------------------------------


def test_snapshot_keeps_the_given_records_and_releases_waiters() -> None:
    pending: list[object] = []
    fs = SimFileSystem(schedule=lambda _d, fn: pending.append(fn))
    s = DiskStore(D, fs=fs)
    s.append([b"old1", b"old2"])
    got: list[BaseException | None] = []
    s.when_durable(got.append)
    s.save_snapshot(b"SNAP", [b"sent-in-slot-in-progress"])
    assert got == [None]  # the synced snapshot covers what they waited for
    s.append([b"new"])
    snap, recs = DiskStore(D, fs=fs).load()
    assert snap == b"SNAP" and [p for _, p in recs] == [b"sent-in-slot-in-progress", b"new"]


def test_crash_between_snapshot_and_journal_replacement_keeps_the_old_journal() -> None:
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"sent"])
    s.sync()
    real_replace = fs.replace
    calls = 0

    def replace_then_die(src: Path, dst: Path) -> None:
        nonlocal calls
        calls += 1
        if dst.name == "journal.bin":
            raise OSError(errno.EIO, "power cut")
        real_replace(src, dst)

    fs.replace = replace_then_die  # type: ignore[method-assign]
    with pytest.raises(JournalError):
        s.save_snapshot(b"SNAP", [b"sent"])
    fs.replace = real_replace  # type: ignore[method-assign]
    fs.power_loss(random.Random(1))
    snap, recs = DiskStore(D, fs=fs).load()
    assert snap == b"SNAP" and [p for _, p in recs] == [b"sent"]


# --- power loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_power_loss_keeps_everything_that_was_durable(seed: int) -> None:
    rng = random.Random(seed)
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    durable: list[bytes] = []
    written: list[bytes] = []
    for i in range(rng.randrange(1, 30)):
        rec = f"rec-{i}-".encode() * rng.randrange(1, 20)
        s.append([rec])
        written.append(rec)
        if rng.random() < 0.3:
            s.sync()
            durable = list(written)
        if rng.random() < 0.05:
            s.save_snapshot(f"snap{i}".encode(), [rec])
            written = [rec]
            durable = list(written)
    fs.power_loss(rng)
    got = payloads(DiskStore(D, fs=fs))
    assert got[: len(durable)] == durable  # nothing durable lost
    assert got == written[: len(got)]  # and what survived beyond it is a clean prefix


def test_new_files_and_renames_fsync_the_directory() -> None:
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"r"])
    s.sync()
    fs.power_loss(random.Random(0), torn=False)
    assert payloads(DiskStore(D, fs=fs)) == [b"r"]  # the journal's name survived too


def test_incarnation_grows_even_when_the_clock_goes_back() -> None:
    fs = SimFileSystem()
    a = DiskStore(D, fs=fs).next_incarnation(1_000)
    b = DiskStore(D, fs=fs).next_incarnation(500)  # the wall clock stepped back
    fs.power_loss(random.Random(0))
    c = DiskStore(D, fs=fs).next_incarnation(0)
    assert a == 1_000 and b == 1_001 and c == 1_002


def test_real_file_system_round_trip(tmp_path: Path) -> None:
    s = DiskStore(tmp_path / "a" / "b", fs=OsFileSystem())
    s.append([b"1", b"2"])
    s.sync()
    s.save_snapshot(b"SNAP", [b"2"])
    s.append([b"3"])
    s.close()
    snap, recs = DiskStore(tmp_path / "a" / "b").load()
    assert snap == b"SNAP" and [p for _, p in recs] == [b"2", b"3"]
    assert not (tmp_path / "a" / "b" / "journal.bin.tmp").exists()


async def test_real_fsync_runs_on_the_loop_when_the_disk_is_fast_and_in_a_thread_when_slow(
    tmp_path: Path,
) -> None:
    import asyncio
    import threading

    fs = OsFileSystem()
    s = DiskStore(tmp_path, fs=fs)
    s.append([b"r"])
    called: list[tuple[BaseException | None, int]] = []
    s.when_durable(lambda e: called.append((e, threading.get_ident())))
    assert called == [(None, threading.get_ident())]  # fast disk: done at once, on the loop
    assert s.when_durable(lambda e: None) is True

    fs._recent.extend([1.0] * 16)  # the recent fsyncs took a second each: slow disk
    s.append([b"s"])
    fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    assert s.when_durable(fut.set_result) is False
    assert not fut.done()  # in a worker thread; the answer comes back on the loop
    assert await asyncio.wait_for(fut, 5) is None
    assert s.when_durable(lambda e: None) is True
    assert payloads(DiskStore(tmp_path)) == [b"r", b"s"]


def test_a_failed_fsync_on_the_loop_fails_the_store(tmp_path: Path) -> None:
    fs = OsFileSystem()
    s = DiskStore(tmp_path, fs=fs)
    s.append([b"r"])
    fd = s._fd
    assert fd is not None
    os.close(fd)  # the next fsync gets EBADF
    errors: list[BaseException | None] = []
    s.when_durable(errors.append)
    assert len(errors) == 1 and isinstance(errors[0], JournalError)
    assert "fsync" in str(errors[0])
    with pytest.raises(JournalError):
        s.append([b"s"])  # failed for good: nothing more is journalled
    s._fd = None  # already closed above


def test_power_loss_keeps_records_synced_after_a_torn_tail_was_cut() -> None:
    """A torn tail that a power cut left on disk is cut on load; records appended and fsynced
    after that (the file now shorter than before) must survive the next power cut. The simulated
    disk compared lengths to order fsyncs and kept the old, longer contents instead."""
    pending: list[object] = []
    fs = SimFileSystem(schedule=lambda _d, fn: pending.append(fn))
    s = DiskStore(D, fs=fs)
    s.append([b"a" * 50, b"b" * 50])
    s.sync()
    j = fs.files[s.journal_path]
    j.data += frame(b"c" * 200)[:-5]  # a torn record that reached the disk
    j.durable = bytes(j.data)
    s2 = DiskStore(D, fs=fs)
    assert payloads(s2) == [b"a" * 50, b"b" * 50]  # cut on load
    s2.append([b"new"])
    got: list[BaseException | None] = []
    s2.when_durable(got.append)
    pending.pop()()  # type: ignore[operator]
    assert got == [None]
    fs.power_loss(random.Random(0), torn=False)
    assert payloads(DiskStore(D, fs=fs)) == [b"a" * 50, b"b" * 50, b"new"]


def test_load_makes_what_it_read_durable() -> None:
    """After a process crash the journal may still be only in the page cache. The restarted
    replica acts on it at once (replays decided slots, answers peers with them), so load() must
    fsync it first: a later power cut must not take back what the replica already acted on
    (found by the node simulation: a replica decided a slot differently after kill, restart,
    power cut)."""
    fs = SimFileSystem()
    s = DiskStore(D, fs=fs)
    s.append([b"decided-slot-16"])  # written, never fsynced
    fs.crash()  # kill -9: the page cache survives
    assert payloads(DiskStore(D, fs=fs)) == [b"decided-slot-16"]
    fs.power_loss(random.Random(0), torn=False)
    assert payloads(DiskStore(D, fs=fs)) == [b"decided-slot-16"]
