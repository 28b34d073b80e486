"""Local persistence of one replica: an atomically replaced snapshot plus an append-only journal.

Journal records are framed as `[u32 length][u32 crc32][payload]`. On load, damage with no valid
record anywhere after it (a record cut short, garbage or zeros to the end of the file) is what a
crash or power cut in the middle of an append leaves behind, a *torn tail*: it is cut off. A
damaged record followed by a valid one is corruption: loading stops with `JournalCorrupt`,
naming the file and offset, instead of silently dropping what follows.

Durability (`fsync` policy):

- "always" (the default): `when_durable(callback)` runs the callback once everything appended
  so far has reached the disk. Appends are written at once; fsyncs run one at a time, each
  covering every record written before it started (group commit), so a busy replica does far
  fewer fsyncs than it writes records. New files and renames are followed by an fsync of the
  directory.
- "snapshot": snapshots are fsynced, the journal is not (survives kill -9, not a power cut).
- "none": nothing is fsynced (tests and throwaway clusters).

A write or fsync that fails raises `JournalError` (and, for fsyncs in the background, reports it
to the callbacks); the store is then *failed* and refuses every later append: the replica must
stop rather than send anything that was not journalled.

Snapshots (and the incarnation number) are written to ``NAME.tmp`` and renamed over ``NAME``. A
write that fails removes its temporary at once, and opening the store removes any such temporary
a kill or a power cut left (these three names are written by nothing else): a snapshot's
temporary is as large as the snapshot, space a full disk needs before the node can start again.

All file access goes through a `FileSystem`, so the simulation can run this code against a
simulated disk (power loss, torn writes, full disk, I/O errors); `OsFileSystem` is the real one.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aether.core.errors import AetherError
from aether.core.files import OsFiles

_HDR = struct.Struct(">II")
_log = logging.getLogger("aether.consensus.storage")

FSYNC_POLICIES = ("none", "snapshot", "always")
DEFAULT_FSYNC = "always"

DurableCallback = Callable[[BaseException | None], None]


class JournalError(AetherError):
    """The journal or snapshot could not be written; the replica must stop (fail-stop).

    A request that fails with it has an unknown outcome (its command may have reached the other
    replicas, which go on): 503, and this node's clients are told to ask another node."""

    status = 503


class JournalCorrupt(AetherError):
    """A journal record before the end of the file is damaged; the node refuses to start."""


class FileSystem(Protocol):
    """The file operations `DiskStore` needs. Handles are small ints (file descriptors)."""

    def read(self, path: Path) -> bytes | None:
        """The whole file, or None if it does not exist."""
        ...

    def exists(self, path: Path) -> bool: ...

    def open(self, path: Path, *, truncate: bool) -> int:
        """Open for appending (created if missing; emptied first if `truncate`)."""
        ...

    def write(self, handle: int, data: bytes) -> int:
        """Write some of `data` at the end; return how many bytes were written (may be fewer)."""
        ...

    def fsync(self, handle: int) -> None: ...

    def fsync_in_background(self, handle: int, done: DurableCallback) -> None:
        """fsync what was written so far; call `done(error or None)` on the loop, now or later."""
        ...

    def close(self, handle: int) -> None: ...

    def truncate(self, path: Path, size: int) -> None: ...

    def replace(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path) -> None:
        """Remove `path` if it exists."""
        ...

    def fsync_dir(self, path: Path) -> None: ...

    def makedirs(self, path: Path) -> list[Path]:
        """Create `path` and missing parents; return the directories that were created."""
        ...


# fdatasync flushes the data and what is needed to read it back (an appended file's size), not
# timestamps: what a write-ahead log needs, and cheaper (etcd and PostgreSQL use it on Linux too).
# Directories (new names, renames) are always fsynced.
_datasync = getattr(os, "fdatasync", os.fsync)


# fsyncs at most this long (median of the recent ones) run on the event loop, longer ones in a thread
INLINE_FSYNC_MAX = 0.002


class OsFileSystem(OsFiles):
    """The real file system (`OsFiles`), with fdatasync and fsyncs handed to a thread when the disk
    is slow."""

    def __init__(self) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=16)  # fsync seconds

    def fsync(self, handle: int) -> None:
        _datasync(handle)

    def fsync_in_background(self, handle: int, done: DurableCallback) -> None:
        # A fast disk (the median of the recent fsyncs under INLINE_FSYNC_MAX) is synced right
        # here on the event loop: handing it to a thread and back costs more than the fsync (it
        # doubled a replica's wait per journal write). A slow one goes to a worker thread, so it
        # does not stall everything else the node does; `done` is then called on the loop.
        recent = self._recent
        if len(recent) < 4 or sorted(recent)[len(recent) // 2] <= INLINE_FSYNC_MAX:
            t0 = time.perf_counter()
            try:
                _datasync(handle)
            except OSError as e:
                done(e)
                return
            recent.append(time.perf_counter() - t0)
            done(None)
            return
        # A duplicate keeps the file open even if the store closes or replaces it meanwhile.
        dup = os.dup(handle)

        def work() -> None:
            try:
                t0 = time.perf_counter()
                _datasync(dup)
                recent.append(time.perf_counter() - t0)
            finally:
                os.close(dup)

        fut = asyncio.get_running_loop().run_in_executor(None, work)
        fut.add_done_callback(lambda f: done(None if f.cancelled() else f.exception()))


def frame(payload: bytes) -> bytes:
    """One journal record as written to disk."""
    return _HDR.pack(len(payload), zlib.crc32(payload)) + payload


def _next_valid_record(data: bytes, start: int) -> int | None:
    """The offset of the first well-formed record at or after `start`, if any (slow path)."""
    size = len(data)
    unpack = _HDR.unpack_from
    for pos in range(start, size - _HDR.size):
        length, crc = unpack(data, pos)
        end = pos + _HDR.size + length
        if length > 0 and end <= size and zlib.crc32(data[pos + _HDR.size:end]) == crc:
            return pos
    return None


def scan_journal(data: bytes, path: Path | str = "journal") -> tuple[list[tuple[int, bytes]], int]:
    """Parse journal bytes into (offset, payload) records and the length of the valid prefix.

    A damaged record is a torn tail (returned as the valid prefix's end) when nothing valid can
    follow it; otherwise `JournalCorrupt` is raised.
    """
    records: list[tuple[int, bytes]] = []
    off = 0
    size = len(data)
    while off < size:
        if off + _HDR.size > size:
            break  # a header cut short: torn tail
        length, crc = _HDR.unpack_from(data, off)
        end = off + _HDR.size + length
        if length > 0 and end <= size and zlib.crc32(data[off + _HDR.size:end]) == crc:
            records.append((off, data[off + _HDR.size:end]))
            off = end
            continue
        # a bad record: a torn tail unless a valid record follows somewhere after it
        nxt = _next_valid_record(data, off + 1)
        if nxt is None:
            break
        raise JournalCorrupt(
            f"journal {path} is corrupt at offset {off} (a valid record follows at offset {nxt}, "
            f"so this is not a torn write at the end); "
            "restore the node's data directory from a backup or remove it so the node "
            "rejoins from its peers"
        )
    return records, off


class DiskStore:
    """Snapshot and journal files in `directory` (created if missing)."""

    def __init__(
        self, directory: str | Path, fsync: str = DEFAULT_FSYNC, *, fs: FileSystem | None = None
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)} (got {fsync!r})")
        self.fs: FileSystem = fs or OsFileSystem()
        self.dir = Path(directory)
        self.fsync = fsync
        self.snapshot_path = self.dir / "snapshot.bin"
        self.journal_path = self.dir / "journal.bin"
        self.incarnation_path = self.dir / "incarnation"
        self._fd: int | None = None
        self._failed: JournalError | None = None
        # group commit: callbacks waiting for what was written before them to be durable
        self._written = 0  # bytes appended to the current journal file (a generation count)
        self._gen = 0  # bumped when the journal file is replaced
        self._synced: tuple[int, int] = (0, 0)  # (generation, bytes) known durable
        self._waiting: list[tuple[tuple[int, int], DurableCallback]] = []
        self._syncing = False
        self.stats = {"appends": 0, "fsyncs": 0, "bytes": 0}
        created = self.fs.makedirs(self.dir)
        if created and self.durable_journal:
            for d in {c.parent for c in created}:
                self.fs.fsync_dir(d)
        self._remove_temporaries()

    def _temporaries(self) -> list[Path]:
        """The temporary names `_write_atomically` writes (``NAME.tmp`` of each file it replaces):
        only this store writes them, so any found on opening is a leftover (a kill or a power cut
        between writing and renaming it)."""
        files = (self.snapshot_path, self.journal_path, self.incarnation_path)
        return [p.with_name(p.name + ".tmp") for p in files]

    def _remove_temporaries(self) -> None:
        """Remove what a write that never finished left: a snapshot's temporary may be as large as
        the snapshot, space a full disk needs before the node can start again."""
        for tmp in self._temporaries():
            if not self.fs.exists(tmp):
                continue
            try:
                self.fs.unlink(tmp)
            except OSError as e:  # (writing it again truncates it; only the space is lost)
                _log.warning("cannot remove %s, left by a write that did not finish: %s", tmp, e)
            else:
                _log.info("removed %s, left by a write that did not finish", tmp)

    @property
    def durable_journal(self) -> bool:
        return self.fsync == "always"

    @property
    def failed(self) -> JournalError | None:
        return self._failed

    # --- loading ----------------------------------------------------------------------------------

    def load(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        """Return (snapshot or None, journal records as (offset, payload) in order).

        Raises `JournalCorrupt` for damage that is not a torn tail; a torn tail is cut off.
        """
        fs = self.fs
        snap = fs.read(self.snapshot_path)
        data = fs.read(self.journal_path)
        if data is None:
            return snap, []
        records, valid = scan_journal(data, self.journal_path)
        if valid != len(data):
            _log.warning(
                "journal %s: cut a torn last record at offset %d (%d bytes)",
                self.journal_path, valid, len(data) - valid,
            )
            fs.truncate(self.journal_path, valid)
        if self.durable_journal:
            # After a process crash the journal may be in the page cache only. The replica acts on
            # it at once (replays decided slots, answers peers with them, repeats what it sent), so
            # make it durable first: a later power cut must not take back what it acted on.
            try:
                fs.fsync(self._journal_fd())
            except OSError as e:
                raise self._fail(f"fsync of {self.journal_path}", e) from e
            self._synced = (self._gen, self._written)
        return snap, records

    def next_incarnation(self, candidate: int) -> int:
        """A number larger than any this replica used before (persisted before it is returned)."""
        prev = self.fs.read(self.incarnation_path)
        last = 0
        if prev:
            try:
                last = int(prev.decode().strip())
            except ValueError:
                raise JournalCorrupt(f"{self.incarnation_path}: not a number: {prev[:40]!r}") from None
        inc = max(candidate, last + 1)
        self._write_atomically(self.incarnation_path, f"{inc}\n".encode(), sync=True)
        return inc

    # --- journal ----------------------------------------------------------------------------------

    def _journal_fd(self) -> int:
        if self._fd is None:
            new = not self.fs.exists(self.journal_path)
            self._fd = self.fs.open(self.journal_path, truncate=False)
            if new and self.durable_journal:
                self.fs.fsync_dir(self.dir)
        return self._fd

    def _fail(self, what: str, e: BaseException) -> JournalError:
        if self._failed is None:
            # the runner logs it (CRITICAL) and stops the replica
            self._failed = JournalError(
                f"{what} failed: {e}; this replica stops (nothing unjournalled is sent): "
                f"{self._remedy(e)}"
            )
        return self._failed

    def _remedy(self, e: BaseException) -> str:
        """What the operator does about `e` (in the error and the node's last log line)."""
        again = "then start the node again: it catches up from its peers"
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"free space on the file system holding {self.dir}, {again}"
        return f"check the disk holding {self.dir} (the kernel log names I/O errors), {again}"

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _write_all(self, fd: int, buf: bytes, what: str) -> None:
        while buf:  # os.write may write less than asked (a full disk, a signal)
            try:
                n = self.fs.write(fd, buf)
            except OSError as e:
                raise self._fail(what, e) from e
            if n <= 0:
                raise self._fail(what, OSError(errno.EIO, "write returned 0 bytes"))
            buf = buf[n:]

    def append(self, payloads: list[bytes]) -> None:
        """Write records at the end of the journal (durable later: see `when_durable`)."""
        self._check()
        if not payloads:
            return
        buf = b"".join(frame(p) for p in payloads)
        try:
            fd = self._journal_fd()
        except OSError as e:
            raise self._fail(f"opening {self.journal_path}", e) from e
        self._write_all(fd, buf, f"appending to {self.journal_path}")
        self._written += len(buf)
        self.stats["appends"] += 1
        self.stats["bytes"] += len(buf)

    def when_durable(self, callback: DurableCallback, *, start: bool = True) -> bool:
        """Call `callback(None)` once everything appended so far is on disk (per the policy).

        Returns True if it already is (the callback has then been called synchronously).
        `callback(error)` is called instead if the store failed. With `start=False` no fsync is
        started for it yet (`start_sync` does), so that records appended after it share the fsync.
        """
        if self._failed is not None:
            callback(self._failed)
            return True
        mark = (self._gen, self._written)
        if not self.durable_journal or self._synced >= mark:
            callback(None)
            return True
        self._waiting.append((mark, callback))
        if start:
            self._start_sync()
        return False

    def start_sync(self) -> None:
        """Start an fsync for the callbacks waiting (unless one is running: it starts after it)."""
        self._start_sync()

    def _start_sync(self) -> None:
        if self._syncing or not self._waiting or self._fd is None:
            return
        self._syncing = True
        mark = (self._gen, self._written)
        self.stats["fsyncs"] += 1

        def done(err: BaseException | None) -> None:
            self._syncing = False
            if err is not None:
                self._fail(f"fsync of {self.journal_path}", err)
            elif mark > self._synced:
                self._synced = mark
            ready: list[DurableCallback] = []
            rest: list[tuple[tuple[int, int], DurableCallback]] = []
            for m, cb in self._waiting:
                if self._failed is not None or m <= self._synced:
                    ready.append(cb)
                else:
                    rest.append((m, cb))
            self._waiting = rest
            for cb in ready:
                cb(self._failed)
            self._start_sync()

        try:
            self.fs.fsync_in_background(self._fd, done)
        except OSError as e:
            done(e)

    def sync(self) -> None:
        """fsync the journal now, blocking (used on shutdown and by tests)."""
        self._check()
        if self._fd is None or not self.durable_journal:
            return
        try:
            self.fs.fsync(self._fd)
        except OSError as e:
            raise self._fail(f"fsync of {self.journal_path}", e) from e
        self._synced = max(self._synced, (self._gen, self._written))

    # --- snapshots --------------------------------------------------------------------------------

    def _write_atomically(self, path: Path, data: bytes, *, sync: bool) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fs = self.fs
        try:
            fd = fs.open(tmp, truncate=True)
            try:
                self._write_all(fd, data, f"writing {tmp}")
                if sync:
                    fs.fsync(fd)
            finally:
                fs.close(fd)
            fs.replace(tmp, path)
            if sync:
                fs.fsync_dir(self.dir)
        except BaseException as e:
            # A failed write leaves nothing behind: on a full disk its temporary (up to a whole
            # snapshot) would keep the space the node needs to start again.
            try:
                fs.unlink(tmp)  # (gone already if the rename was done)
            except OSError as ue:
                _log.warning("cannot remove %s after a failed write: %s", tmp, ue)
            if isinstance(e, OSError):
                raise self._fail(f"writing {path}", e) from e
            raise

    def save_snapshot(self, data: bytes, keep: list[bytes] | None = None) -> None:
        """Replace the snapshot atomically, then start a journal holding only `keep`.

        `keep` are the records that must outlive the snapshot (what this replica already sent
        for the slot in progress). Either file is replaced atomically, the snapshot first: after
        a crash between the two, the old journal (a superset of `keep`) is still there.
        """
        self._check()
        sync = self.fsync != "none"
        self._write_atomically(self.snapshot_path, data, sync=sync)
        body = b"".join(frame(p) for p in keep or [])
        self._write_atomically(self.journal_path, body, sync=sync)
        old = self._fd
        self._fd = None
        if old is not None:
            try:
                self.fs.close(old)
            except OSError:
                pass
        self._gen += 1
        self._written = len(body)
        if sync:
            self._synced = (self._gen, self._written)
        # callbacks that waited for records of the old journal: the snapshot now covers them
        ready = [cb for m, cb in self._waiting if m[0] < self._gen]
        self._waiting = [(m, cb) for m, cb in self._waiting if m[0] >= self._gen]
        for cb in ready:
            cb(None)

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.fs.close(self._fd)
            except OSError:
                pass
            self._fd = None
