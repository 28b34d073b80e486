"""The ``log`` map engine (`aether.maps.logstorage`): what a commit leaves in the file is what opening
it gives back, whatever happened after (a crash mid-write, a power cut's zeros, a full disk, a
snapshot cut short), and a damaged file is named, never silently shortened."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aether.maps.logstorage import MAGIC, LogStorage, frame
from aether.maps.records import Record
from aether.maps.storage import MemoryStorage, StorageDamaged
from test_disk_faults import fill, tiny_filesystem

pytestmark = pytest.mark.timeout(120)


def state(e: MemoryStorage) -> dict[str, Any]:
    """Everything an engine holds, comparable."""
    return {
        "parts": {p: dict(d) for p, d in e._parts.items() if d},
        "held": e.held(),
        "ops": sorted(e.load_ops()),
        "counts": (e.entries, e.bytes),
    }


def crash(e: LogStorage) -> None:
    """What kill -9 leaves: the file as written so far (nothing pending committed), the lock gone;
    a snapshot being written is left as a ``.tmp`` file (its thread is let finish first, so that
    it does not write into the next engine's snapshot: a killed process writes nothing more)."""
    if e._snap is not None:
        e._snap.join()
    e._close_files()


def random_step(rng: random.Random, e: MemoryStorage, now: int) -> None:
    p = rng.randrange(6)
    key = f"k{rng.randrange(12)}"
    roll = rng.random()
    if roll < 0.45:
        value = None if rng.random() < 0.15 else rng.randbytes(rng.randrange(0, 40))
        e.put(p, key, Record(value, rng.randrange(3), rng.randrange(1000), rng.choice([0, 0, now + 50])))
    elif roll < 0.6:
        e.delete(p, key)
    elif roll < 0.65:
        e.drop(p)
    elif roll < 0.72:
        e.set_held(p, set(rng.sample(range(8), rng.randrange(3))))
    elif roll < 0.85:
        e.add_ops([(p, f"n{rng.randrange(3)}", rng.randrange(50), now)])
    elif roll < 0.92:
        e.purge_ops(range(rng.randrange(3), 6), now - rng.randrange(100))
    else:
        e.purge(range(0, 6), now)


@pytest.mark.parametrize("seed", range(12))
def test_reopening_gives_what_was_committed_through_crashes_and_snapshots(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random changes applied to the engine and to a `MemoryStorage` model; at random points a
    commit, a clean reopen, a crash (the uncommitted changes are lost: the model goes back to its
    last commit) or a snapshot; the engine always equals the model (in half the runs a small
    snapshot threshold makes snapshots start on their own instead of by hand; in the others
    reopening replays long logs)."""
    started = 0  # snapshots started, by the threshold or by hand
    start = LogStorage._start_snapshot

    def counted(self: LogStorage, *, thread: bool) -> Any:
        nonlocal started
        started += 1
        return start(self, thread=thread)

    monkeypatch.setattr(LogStorage, "_start_snapshot", counted)
    rng = random.Random(seed)
    path = tmp_path / "m.log"
    threshold = 256 if seed % 2 else 1 << 30
    e = LogStorage(path, compact_min_bytes=threshold)
    model, committed = MemoryStorage(), MemoryStorage()
    now, by_hand = 1000, 0
    for _ in range(600):
        now += rng.randrange(20)
        r = rng.random()
        if r < 0.8:
            s = rng.getstate()
            random_step(rng, e, now)
            rng.setstate(s)
            random_step(rng, model, now)
        elif r < 0.9:
            e.commit()
            committed = copy.deepcopy(model)
        elif r < 0.95:
            e.close()  # (finishes a snapshot being written)
            committed = copy.deepcopy(model)
            e = LogStorage(path, compact_min_bytes=threshold)
        elif r < 0.98:
            crash(e)
            model = copy.deepcopy(committed)
            e = LogStorage(path, compact_min_bytes=threshold)
        else:
            e.commit()
            committed = copy.deepcopy(model)
            if threshold != 256:  # (with the small threshold: its own snapshots only)
                by_hand += 1
                e.snapshot()
        assert state(e) == state(model)
    e.close()
    assert (started - by_hand > 0) == (threshold == 256)  # started by the threshold
    again = LogStorage(path)
    assert state(again) == state(model)
    again.close()


def test_a_log_of_live_data_is_not_rewritten_until_half_of_it_is_gone(tmp_path: Path) -> None:
    """A map that only grows (the order demo's orders) gains nothing from a rewrite of its log: the
    file doubling past the threshold starts no snapshot while it is mostly live data (each one cost
    the whole map's encoding under the interpreter lock); once overwrites left more than half of it
    gone, one does."""
    path = tmp_path / "m.log"
    e = LogStorage(path, compact_min_bytes=16 * 1024)

    def write(n: int, version: int) -> None:
        for i in range(n):
            e.put(i % 7, f"k{i}", Record(b"x" * 80, version, i))
            if i % 20 == 19:
                e.commit()
                if e._snap is not None:
                    e._snap.join()  # (so that the next commit finishes it)
        e.commit()

    write(2_000, 1)  # ~190 KB of records, none gone: the file is over 10 times the threshold
    assert e.snapshots == 0 and e._snap is None and path.stat().st_size > 10 * 16 * 1024
    live = path.stat().st_size
    write(2_000, 2)  # each record again: half of the file is gone, not more
    assert e.snapshots == 0 and e._snap is None
    write(2_000, 3)  # on to two thirds gone: rewritten on the way (then written on)
    if e._snap is not None:
        e._snap.join()
        e.commit()
    assert e.snapshots == 1 and path.stat().st_size < 2 * live
    e.close()
    again = LogStorage(path)
    assert again.get(3, "k10") == Record(b"x" * 80, 3, 10) and again.entries == 2_000
    again.close()


def test_snapshots_keep_the_file_near_the_live_data(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    e = LogStorage(path, compact_min_bytes=64 * 1024)
    for i in range(20_000):  # the same 100 keys over and over: ~2 MB written in all
        e.put(i % 100 % 7, f"k{i % 100}", Record(b"x" * 80, 1, i))
        e.commit()
        if e._snap is not None:  # a snapshot's thread done before the next commit (a slow
            e._snap.join()  # machine would let the log grow on meanwhile)
    assert e.snapshots >= 10
    assert path.stat().st_size < 2 * 64 * 1024
    e.close()
    again = LogStorage(path)
    assert again.entries == 100 and again.get(99 % 7, "k99") == Record(b"x" * 80, 1, 19_999)
    again.close()


def _hold_back_writer(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[Any], None] | None = None
) -> threading.Event:
    """Snapshot writers wait for the event this returns before they write (commits go on
    meanwhile); `then(writer)` runs once one has written."""
    from aether.maps import logstorage

    release = threading.Event()
    run = logstorage._SnapshotWriter._run

    def held_back(self: Any, chunks: Any) -> None:
        assert release.wait(30)
        run(self, chunks)
        if then is not None:
            then(self)

    monkeypatch.setattr(logstorage._SnapshotWriter, "_run", held_back)
    return release


def _overwrite_until_a_snapshot_starts(e: LogStorage, *, ops: bool = False) -> int:
    """Commit puts of 10 keys over and over (and an operation id each, with `ops`) until the
    threshold starts a snapshot; the number of commits made."""
    i = 0
    while e._snap is None:
        e.put(0, f"k{i % 10}", Record(b"x" * 100, 1, i))
        if ops:
            e.add_ops([(0, "n1", i, 1000 + i)])
        e.commit()
        i += 1
    return i


def test_a_snapshot_is_written_beside_the_commits_that_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot's thread is held back: commits go on meanwhile (to the old log), the log is
    replaced only by the first commit after the thread is done, and that file holds them all. The
    writer builds the frames of the operation ids from the copies taken when it started (not on
    the loop, where it stalled the node): ids added and purged meanwhile come from the log's tail."""
    release = _hold_back_writer(monkeypatch)
    path = tmp_path / "m.log"
    e = LogStorage(path, compact_min_bytes=4096)
    i = _overwrite_until_a_snapshot_starts(e, ops=True)
    inode = path.stat().st_ino
    for j in range(50):  # while the snapshot is being written
        e.put(1, f"during{j}", Record(b"d", 1, j))
        e.add_ops([(1, "n2", j, 5000 + j)])
        e.commit()
    e.purge_ops(range(1), 1000 + i // 2)  # half of the ids the snapshot copied
    e.commit()
    assert path.stat().st_ino == inode and e.snapshots == 0
    release.set()
    snap = e._snap
    snap.join()
    assert snap.written == 51  # the writer appended (and synced) the commits made so far
    e.put(2, "after", Record(b"a", 1, 0))
    e.commit()  # finds the thread done: the snapshot, with what came meanwhile, replaces the log
    assert path.stat().st_ino != inode and e.snapshots == 1 and e._snap is None
    assert path.stat().st_size == snap.size + len(snap.tail[-1])  # each commit once: the last here
    assert path.stat().st_size < 4096 + 50 * 64
    want = state(e)
    crash(e)
    again = LogStorage(path)
    assert state(again) == want and again.entries == 10 + 50 + 1
    assert {(p, o) for p, o, _, _ in want["ops"]} == {(0, "n1"), (1, "n2")}
    assert len(want["ops"]) == i - i // 2 + 50
    again.close()


def test_a_snapshot_by_hand_while_the_thresholds_own_is_written_finishes_that_one_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`snapshot()` called while a snapshot the threshold started is still being written (what the
    random test above covered before its small-threshold runs stopped taking snapshots by hand):
    that one is finished first, then the new one replaces it; nothing committed is lost."""
    release = _hold_back_writer(monkeypatch)
    path = tmp_path / "m.log"
    e = LogStorage(path, compact_min_bytes=4096)
    _overwrite_until_a_snapshot_starts(e)
    for j in range(20):  # while it is held back
        e.put(1, f"during{j}", Record(b"d", 1, j))
        e.commit()
    release.set()
    e.snapshot()
    assert e.snapshots == 2 and e._snap is None
    want = state(e)
    crash(e)
    again = LogStorage(path)
    assert state(again) == want and again.entries == 10 + 20
    again.close()


def test_a_snapshot_holds_the_state_when_it_started_while_the_map_changes_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting a snapshot lends the writer the map's per-partition dicts instead of copying them
    all on the loop; a change to a lent partition (put, delete, drop, operation ids added or purged)
    gives the map a copy first. The writer, held back while the map changes, writes exactly the
    state of the moment it started, and the map goes on with every change."""
    kept: dict[str, Any] = {}

    def keep(writer: Any) -> None:
        data = writer.files.read(writer.tmp)  # the snapshot, then the commits made meanwhile it appended
        kept["snapshot"] = data[: len(data) - sum(len(t) for t in writer.tail[: writer.written])]

    release = _hold_back_writer(monkeypatch, keep)
    e = LogStorage(tmp_path / "m.log", compact_min_bytes=4096)
    i = 0
    while True:
        e.put(i % 4, f"k{i % 40}", Record(b"x" * 100, 1, i))
        e.add_ops([(i % 4, "n1", i, 1000 + i)])
        e.commit()
        if e._snap is not None:
            break
        i += 1
    at_start = state(e)
    e.put(0, "k0", Record(b"changed", 2, 0))
    e.put(0, "new", Record(b"n", 2, 1))
    e.delete(1, "k1")
    e.drop(2)
    e.add_ops([(3, "n2", 1, 9000)])
    e.purge_ops(range(4), 1000 + i // 2)
    e.commit()
    after = state(e)
    assert after != at_start
    release.set()
    e._snap.join()
    e.put(3, "last", Record(b"l", 2, 2))
    e.commit()  # the snapshot takes the log's place
    assert e.snapshots == 1
    snap_path = tmp_path / "snap.log"
    snap_path.write_bytes(kept["snapshot"])
    written = LogStorage(snap_path)
    assert state(written) == at_start
    written.close()
    want = state(e)
    crash(e)
    again = LogStorage(tmp_path / "m.log")
    assert state(again) == want
    again.close()


def test_a_snapshot_leaves_the_loop_no_file_sync_and_no_close_of_the_replaced_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncing the snapshot with the commits made meanwhile happens in the writer's thread, and the
    replaced log is closed (its blocks freed) in another: on the committing thread (the node's
    loop) finishing a snapshot only appends the last commits, renames and syncs the directory (the
    sync and the close on the loop stalled a busy node ~10 ms per snapshot; bench/snapshot_bench.py).
    Each commit is in the new log once; reopening gives the state."""
    from aether.core.files import OsFiles

    loop_thread = threading.get_ident()
    calls: list[tuple[str, bool]] = []  # (operation, on the committing thread)

    class Watched(OsFiles):
        def fsync(self, handle: int) -> None:
            calls.append(("fsync", threading.get_ident() == loop_thread))
            super().fsync(handle)

        def close(self, handle: int) -> None:
            calls.append(("close", threading.get_ident() == loop_thread))
            super().close(handle)

    release = _hold_back_writer(monkeypatch)
    path = tmp_path / "m.log"
    e = LogStorage(path, compact_min_bytes=4096, files=Watched())
    i = 0
    while e._snap is None:
        e.put(0, f"k{i % 10}", Record(b"x" * 100, 1, i))
        e.commit()
        i += 1
    for j in range(20):
        e.put(1, f"during{j}", Record(b"d", 1, j))
        e.commit()
    release.set()
    e._snap.join()
    calls.clear()
    e.put(2, "after", Record(b"a", 1, 0))
    e.commit()  # finishes the snapshot
    assert e.snapshots == 1
    for t in threading.enumerate():
        if t.name == "aether-log-close":
            t.join(10)
    assert ("close", False) in calls, calls  # the replaced log, off the loop
    assert not [c for c in calls if c[1]], f"file syncs or closes on the committing thread: {calls}"
    want = state(e)
    crash(e)
    again = LogStorage(path)
    assert state(again) == want and again.entries == 10 + 20 + 1
    again.close()


def test_a_failed_snapshot_leaves_the_log_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.log"
    e = LogStorage(path, compact_min_bytes=2048)
    Path(f"{path}.tmp").mkdir()  # the snapshot cannot be written there
    for i in range(100):
        e.put(0, f"k{i % 5}", Record(b"x" * 100, 1, i))
        e.commit()
    want = state(e)
    e.close()  # (waits for a snapshot still being tried)
    assert "the snapshot failed (IsADirectoryError" in caplog.text and e.snapshots == 0
    Path(f"{path}.tmp").rmdir()
    again = LogStorage(path)
    assert state(again) == want
    again.close()


def test_a_snapshot_that_filled_the_disk_gives_its_space_back_when_a_commit_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot's writer filled the disk part way through: its file was removed only at the next
    commit that succeeded, and on the full disk (full of it) none did; the map's storage probe,
    which wants room, could not bring it back either. A commit that fails removes it now, and so
    does asking the engine for the free space (`free_bytes`, the probe)."""
    from aether.testing.simfs import SimFileSystem

    fs = SimFileSystem()
    release = _hold_back_writer(monkeypatch)
    path = Path("/sim/maps/m.log")
    tmp = Path(f"{path}.tmp")
    e = LogStorage(path, files=fs, compact_min_bytes=2048)
    _overwrite_until_a_snapshot_starts(e)
    fs.capacity = fs._used() + 300  # the snapshot fills the disk part way through
    release.set()
    assert e._snap is not None
    e._snap.join()
    assert e._snap.error is not None and tmp in fs.files
    e.put(0, "k0", Record(b"y" * 400, 1, 10_000))
    with pytest.raises(OSError):
        e.commit()  # no room: the snapshot's partial file holds it
    assert tmp not in fs.files and fs.free_bytes(path.parent) == 300
    e.put(0, "k0", Record(b"y" * 100, 1, 10_001))
    e.commit()  # fits again
    e.close()
    fs.capacity = None
    again = LogStorage(path, files=fs)
    assert again.get(0, "k0") == Record(b"y" * 100, 1, 10_001)
    again.close()


def test_asking_for_the_free_space_removes_a_failed_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    from aether.testing.simfs import SimFileSystem

    fs = SimFileSystem()
    release = _hold_back_writer(monkeypatch)
    path = Path("/sim/maps/m.log")
    e = LogStorage(path, files=fs, compact_min_bytes=2048)
    _overwrite_until_a_snapshot_starts(e)
    fs.capacity = fs._used() + 300
    release.set()
    assert e._snap is not None
    e._snap.join()
    assert e.free_bytes() == 300 and Path(f"{path}.tmp") not in fs.files
    e.close()


def test_commits_after_a_snapshot_whose_directory_sync_failed_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The snapshot was renamed over the log but syncing the directory failed: the commits after
    it must go to the new file (they went to the replaced one's handle, gone at the next open)."""
    from aether.core.files import OsFiles

    class DirSyncFails(OsFiles):
        def fsync_dir(self, path: Path) -> None:
            raise OSError(5, "Input/output error")

    path = tmp_path / "m.log"
    e = LogStorage(path, files=DirSyncFails())
    e.put(0, "before", Record(b"b", 1, 1))
    e.commit()
    e.snapshot()
    assert e.snapshots == 1 and "syncing its directory failed" in caplog.text
    e.put(0, "after", Record(b"a", 1, 2))
    e.commit()
    e.close()
    again = LogStorage(path)
    assert again.get(0, "after") == Record(b"a", 1, 2) and again.get(0, "before") is not None
    again.close()


def _committed_file(tmp_path: Path) -> tuple[Path, int, dict[str, Any]]:
    """A log of two commits; the length of the first and the state after it."""
    path = tmp_path / "m.log"
    e = LogStorage(path)
    e.put(1, "a", Record(b"first", 1, 1))
    e.add_ops([(1, "n1", 1, 100)])
    e.commit()
    first = path.stat().st_size
    after_first = state(e)
    e.put(1, "b", Record(b"second", 1, 2))
    e.set_held(1, {3})
    e.commit()
    e.close()
    return path, first, after_first


def test_a_commit_cut_short_anywhere_is_cut_off_and_the_earlier_ones_stay(tmp_path: Path) -> None:
    path, first, after_first = _committed_file(tmp_path)
    whole = path.read_bytes()
    for cut in range(first + 1, len(whole)):  # every length inside the second frame
        path.write_bytes(whole[:cut])
        e = LogStorage(path)
        assert state(e) == after_first, cut
        assert path.stat().st_size == first  # the torn part is gone, the next commit follows the first
        e.put(2, "c", Record(b"after", 1, 3))
        e.commit()
        e.close()
        again = LogStorage(path)
        assert again.get(2, "c") == Record(b"after", 1, 3) and again.get(1, "a") is not None
        again.close()
    for cut in range(0, len(MAGIC)):  # the header itself cut short: an empty map
        path.write_bytes(whole[:cut])
        e = LogStorage(path)
        assert e.entries == 0 and path.read_bytes() == b""
        e.put(1, "a", Record(b"1", 1, 1))
        e.commit()  # the header goes with the first commit
        e.close()
        again = LogStorage(path)
        assert path.read_bytes().startswith(MAGIC) and again.get(1, "a") == Record(b"1", 1, 1)
        again.close()
    for cut in (0, 1, 13, len(MAGIC) - 1):  # a power cut: the header in part, zeros where the rest was
        path.write_bytes(whole[:cut] + bytes(len(whole) - cut))
        e = LogStorage(path)
        assert e.entries == 0 and path.read_bytes() == b"", cut
        e.close()
    path.write_bytes(whole[:13] + b"x" + bytes(100))  # something else after it: not taken for empty
    with pytest.raises(StorageDamaged, match="not an Aether map log"):
        LogStorage(path)


@pytest.mark.parametrize("tail", [b"\0" * 4096, bytes(range(256)) * 3, b"AEML" + bytes(200)])
def test_zeros_or_garbage_after_the_last_commit_are_cut_off(tmp_path: Path, tail: bytes) -> None:
    """What a power cut can leave after the data (zeros, the garbage of a block written in part,
    a frame's start): no whole frame follows, so it is cut off, not taken for damage."""
    path, _, _ = _committed_file(tmp_path)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(tail)
    e = LogStorage(path)
    assert e.get(1, "b") == Record(b"second", 1, 2) and e.held() == {1: {3}}
    assert path.stat().st_size == size
    e.close()


def test_a_garbled_last_commit_header_is_cut_off(tmp_path: Path) -> None:
    path, first, after_first = _committed_file(tmp_path)
    data = bytearray(path.read_bytes())
    for i in range(first, first + 16):  # the second (last) commit's header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    e = LogStorage(path)
    assert state(e) == after_first and path.stat().st_size == first
    e.close()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_cutting_off_the_end_is_logged_with_the_file_and_the_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an audit: a byte changed in the last commit's value was cut off with that commit,
    nothing logged. It cannot be told from a torn write there (that commit was never synced), so
    it is still cut off, but the warning names the file, where and how much."""
    path, first, after_first = _committed_file(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(_flip(whole, whole.index(b"second")))
    with caplog.at_level("WARNING", logger="aether.maps.logstorage"):
        e = LogStorage(path)
    assert state(e) == after_first
    e.close()
    cut = len(whole) - first
    assert f"map log {path}: cut off {cut} bytes at byte {first} (a commit of {cut - 16} bytes whose " \
        "contents do not match their checksum, then 0 bytes)" in caplog.text


def test_a_changed_byte_in_the_last_frame_of_a_snapshot_is_named_not_cut_off(tmp_path: Path) -> None:
    """Found by an audit: right after a snapshot, a byte changed in a value of its last frame was
    cut off on open as a torn end, its records lost, though the snapshot's frames were synced
    before it took the log's place (a torn write cannot be there). A snapshot now ends its synced
    part with an empty commit, so damage anywhere before it has a whole frame after it: named."""
    path = tmp_path / "m.log"
    e = LogStorage(path, background=False)
    for i in range(1000):
        e.put(i % 4, f"k{i}", Record(b"value-%05d" % i, 1, i))
        if i % 100 == 99:
            e.commit()
    e.snapshot()
    e.close()
    data = path.read_bytes()
    assert data.endswith(frame(b"\x90"))  # the empty commit that closes the synced part
    at = data.index(b"value-00999")  # in the snapshot's last frame of records
    damaged = data[:at] + b"V" + data[at + 1 :]
    path.write_bytes(damaged)
    with pytest.raises(StorageDamaged, match=r"damaged commit at byte \d+ \(a whole one follows") as info:
        LogStorage(path)
    assert info.value.path == path and path.read_bytes() == damaged  # left as found
    path.write_bytes(data)
    again = LogStorage(path)  # (the empty commit replays as nothing)
    assert again.entries == 1000 and again.get(3, "k999") == Record(b"value-00999", 1, 999)
    again.close()


@pytest.mark.parametrize(
    "damage, match",
    [
        # a byte of the first commit's payload, of its length, of its mark (the second follows it)
        (lambda b: _flip(b, len(MAGIC) + 19), r"damaged commit at byte 17 \(a whole one follows at byte \d"),
        (lambda b: _flip(b, len(MAGIC) + 5), r"damaged commit at byte 17 \(a whole one follows"),
        (lambda b: _flip(b, len(MAGIC)), r"damaged commit at byte 17 \(a whole one follows"),
        (lambda b: b"SQLite format 3\x00" + b[16:], "not an Aether map log"),
    ],
    ids=["payload", "length", "mark", "not-a-log"],
)
def test_damage_before_the_end_is_named_and_nothing_is_cut(tmp_path: Path, damage: Any, match: str) -> None:
    path, _, _ = _committed_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    damaged = path.read_bytes()
    with pytest.raises(StorageDamaged, match=match) as info:
        LogStorage(path)
    assert info.value.path == path
    assert path.read_bytes() == damaged  # left as found, for whoever looks at it
    os.replace(path, tmp_path / "aside")
    LogStorage(path).close()  # the failed open let its lock go


def test_a_payload_that_is_not_a_list_of_changes_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_bytes(MAGIC + frame(b"\x93\x01\x02\x03") + frame(b"\x90"))  # [1, 2, 3]: no such change
    with pytest.raises(StorageDamaged, match="commit at byte 17 cannot be read"):
        LogStorage(path)


def test_a_second_opener_is_refused_in_this_process_and_another(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    e = LogStorage(path)
    with pytest.raises(OSError, match="open in another process"):
        LogStorage(path)
    code = (
        "import sys; from pathlib import Path; from aether.maps.logstorage import LogStorage; "
        "LogStorage(Path(sys.argv[1]))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "open in another process" in r.stderr
    e.close()
    LogStorage(path).close()  # free again once closed


def test_a_snapshot_a_crash_interrupted_leaves_the_old_log(tmp_path: Path) -> None:
    path, _, _ = _committed_file(tmp_path)
    Path(f"{path}.tmp").write_bytes(MAGIC + b"half a snapshot")
    e = LogStorage(path)
    assert e.get(1, "b") is not None and not Path(f"{path}.tmp").exists()
    e.close()


def test_a_full_disk_fails_the_commit_undoes_it_and_the_next_one_works(tmp_path: Path) -> None:
    """A real full file system (a small tmpfs, root only): the commit raises ENOSPC, the file
    and the memory are as after the previous commit; with room again the engine goes on."""
    mnt = tmp_path / "fs"
    with tiny_filesystem(mnt, "1m"):
        path = mnt / "m.log"
        e = LogStorage(path)
        e.put(1, "kept", Record(b"v", 1, 1))
        e.add_ops([(1, "n1", 1, 100)])
        e.commit()
        before, size = state(e), path.stat().st_size
        filler = fill(mnt)
        e.put(1, "kept", Record(b"w" * 5000, 1, 2))
        e.put(2, "new", Record(b"n" * 5000, 1, 3))
        e.purge_ops(range(0, 8), 150)
        e.drop(1)
        e.set_held(2, {4})
        e.add_ops([(2, "n2", 9, 200)])
        with pytest.raises(OSError) as info:
            e.commit()
        assert info.value.errno == 28  # ENOSPC
        assert state(e) == before and not e.pending
        assert path.stat().st_size == size
        filler.unlink()
        e.put(3, "later", Record(b"l", 1, 4))
        e.commit()
        e.close()
        again = LogStorage(path)
        assert again.get(1, "kept") == Record(b"v", 1, 1) and again.get(3, "later") is not None
        assert again.get(2, "new") is None and sorted(again.load_ops()) == [(1, "n1", 1, 100)]
        again.close()


def test_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        e = LogStorage(tmp_path / "maps" / "m.log", compact_min_bytes=0)
        e.put(1, "a", Record(b"1", 1, 1))
        e.commit()
        e.snapshot()  # (written to m.log.tmp, renamed over m.log)
        e.close()
        assert e.snapshots == 1
        for name in ("m.log", "m.log.lock"):
            assert (tmp_path / "maps" / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        os.umask(old)
