"""`LogStorage`, the ``log`` engine: a map's records in memory, made durable by appending each
commit to a log file, which is rewritten as a snapshot once it has grown to twice the live data.

Why a third engine: a SQLite commit writes whole pages (every record lands on a random leaf; the
page goes to the WAL and again to the database at the checkpoint), and Python's `sqlite3` lets go
of the interpreter lock around every step of every statement, so a node whose slices run in
threads hands the lock back and forth several times per commit. Here a commit is one `write`
system call carrying the turn's changes (tens of bytes plus the values). The price: the whole map
lives in memory, as with ``memory``, and opening it reads the whole file.

The file, ``NAME.log`` in the node's map directory (0600), is a header line and then one frame per
commit: a mark (``AEML``), the payload length (4 bytes, little-endian), the CRC-32 of those 4
bytes, the CRC-32 of the payload, and the payload, the commit's changes as a msgpack list
(`_Change`). ``NAME.log.lock`` is locked (`flock`) while the engine is open: another process
opening the same map fails at once. A new file gets its header with its first commit, so opening
a map writes nothing (a map defined while the disk is full opens, and fails at its first commit
like any other write).

Opening replays the frames in order. Where a frame does not check out (cut short, zeros, garbage,
a wrong checksum), the file is cut there if no whole frame follows: that is the end a crash or a
power cut left (the commit's write never returned, or was never synced, so the node did not
count on it), with a warning naming the file and what was cut (a changed byte in the last commit
looks the same as a torn write there). If a whole frame does follow (found by its mark), the file
is damaged: cutting would lose committed data, so `StorageDamaged` is raised naming the file and
the byte offset; the map service then sets the file aside and starts the map empty on this node
(the other owners have the data). A payload that checks out but does not decode is damage too.

Durability is the sqlite engine's: once `commit` returns the changes are in the kernel's page
cache and survive a crash of the process (kill -9 included); a power cut may lose the last ones
(there is no fsync per commit; a snapshot is synced before it replaces the log). A commit whose
write fails (a full disk) cuts the file back to the end of the previous commit, undoes the turn's
changes in memory and raises.

Snapshots: when the file exceeds `COMPACT_MIN_BYTES` and twice the size of the last snapshot, and
more than half of it is gone (overwritten or removed: over twice the live data's estimated size;
a map that only grows, like the order demo's orders, is not rewritten for nothing: each rewrite
of it cost the whole map's encoding under the interpreter lock; it is looked at again once the
file has doubled), the commit lends the per-partition dicts to a thread (the records themselves
are immutable; the first change to a lent dict copies it) that writes them to ``NAME.log.tmp``
while the map goes on; the commits made meanwhile go to the log as usual and are kept; the
thread appends those made so far and an empty commit (which closes the synced part: damage in
the snapshot's last frame then has a whole frame after it and is named, not cut off as a torn
end; an earlier version replays it as nothing) and syncs the file; the first commit after the thread is done
appends the few made since (not synced, as any commit), renames the file over the log and syncs
the directory (syncing on the loop stalled it ~10 ms per snapshot). A crash leaves the old log or the new one,
never a mix (a leftover ``.tmp`` is removed on open). A snapshot that fails (a full disk) is
logged and dropped, its file removed at the next commit, or at once when that commit fails too
(the file may hold the space the commit lacked); the log goes on and the next one comes when it
has doubled again.

May import `aether.core` and `aether.maps.records` / `aether.maps.storage`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import msgspec

from aether.core.files import OsFiles, open_private
from aether.maps.records import Record
from aether.maps.storage import MemoryStorage, StorageDamaged

__all__ = ["COMPACT_MIN_BYTES", "LogStorage"]

MAGIC = b"aether map log 1\n"
"""The file's first bytes (a format change gets a new number)."""

COMPACT_MIN_BYTES = 16 * 1024 * 1024
"""A log smaller than this is never rewritten (per map and node)."""

_MARK = b"AEML"  # starts every frame: after a damaged one, the next whole frame is found by it
_HEAD = struct.Struct("<4sIII")  # mark, payload length, CRC-32 of the length bytes, CRC-32 of the payload
_LEN = struct.Struct("<I")
_SYNCED = b"\x90"  # the payload of the frame that ends the synced part of a snapshot: no changes
# (msgpack's empty list: an earlier version replays it as an empty commit)
_SNAPSHOT_CHUNK = 512  # changes per frame of a snapshot (the writer holds the interpreter lock
# while it encodes one: 4,096 records of 500 bytes held it for 3-70 ms on a loaded 2-CPU machine)
_log = logging.getLogger("aether.maps.logstorage")


class _Put(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=0):
    p: int
    k: str
    r: Record


class _Del(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    p: int
    k: str


class _Drop(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    p: int


class _Held(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=3):
    p: int
    versions: list[int]


class _Ops(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=4):
    ops: list[tuple[int, str, int, int]]


class _PurgeOps(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=5):
    start: int
    stop: int
    before: int


_Change = _Put | _Del | _Drop | _Held | _Ops | _PurgeOps
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[_Change])


class LogFiles(Protocol):
    """The file operations the engine uses (`aether.core.files.OsFiles`; the map simulation passes its
    simulated file system, `aether.testing.simfs`, with page cache, power cuts and full disks)."""

    def read(self, path: Path) -> bytes | None:
        """The whole file, or None if there is none."""
        ...

    def open(self, path: Path, *, truncate: bool) -> int:
        """Open for appending (created 0600 if missing; emptied first if `truncate`)."""
        ...

    def write(self, handle: int, data: bytes) -> int:
        """Write some of `data` at the end; how many bytes were written."""
        ...

    def fsync(self, handle: int) -> None: ...

    def close(self, handle: int) -> None: ...

    def truncate(self, path: Path, size: int) -> None: ...

    def replace(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path) -> None:
        """Remove `path` if it exists."""
        ...

    def exists(self, path: Path) -> bool: ...

    def fsync_dir(self, path: Path) -> None: ...

    def free_bytes(self, path: Path) -> int | None:
        """Bytes still free for files in directory `path` (None: unknown)."""
        ...

    def makedirs(self, path: Path) -> list[Path]: ...


def _write_all(files: LogFiles, handle: int, data: bytes) -> None:
    while data:  # (a write may take only a part: a full disk, a signal)
        data = data[files.write(handle, data) :]


def frame(payload: bytes) -> bytes:
    """One frame of the log: the header (length and the two checksums) and `payload`."""
    n = _LEN.pack(len(payload))
    return _HEAD.pack(_MARK, len(payload), zlib.crc32(n), zlib.crc32(payload)) + payload


def _frame_at(view: memoryview, pos: int, end: int) -> int | None:
    """The end of the whole frame at `pos` (mark, length and payload check out), else None."""
    if end - pos < _HEAD.size:
        return None
    mark, length, len_crc, crc = _HEAD.unpack_from(view, pos)
    if mark != _MARK or zlib.crc32(_LEN.pack(length)) != len_crc:
        return None
    stop = pos + _HEAD.size + length
    if stop > end or zlib.crc32(view[pos + _HEAD.size : stop]) != crc:
        return None
    return stop


def _describe_tail(view: memoryview, pos: int, end: int) -> str:
    """What the bytes from `pos` to the end of the file are, for the warning that cuts them off."""
    if not any(view[pos:end]):
        return "zeros"
    if end - pos >= _HEAD.size:
        mark, length, len_crc, _ = _HEAD.unpack_from(view, pos)
        if mark == _MARK and zlib.crc32(_LEN.pack(length)) == len_crc:
            if pos + _HEAD.size + length > end:
                return f"a commit of {length} bytes cut short to {end - pos - _HEAD.size}"
            return (f"a commit of {length} bytes whose contents do not match their checksum, "
                    f"then {end - pos - _HEAD.size - length} bytes")
    return "not a commit's start"


def _next_frame(data: bytes, view: memoryview, start: int) -> int | None:
    """Where the first whole frame at or after `start` begins, if any."""
    end = len(data)
    i = data.find(_MARK, start)
    while i != -1:
        if _frame_at(view, i, end) is not None:
            return i
        i = data.find(_MARK, i + 1)
    return None


def _chunks(
    parts: dict[int, dict[str, Record]], held: list[_Held], ops: dict[int, dict[tuple[str, int], int]]
) -> Iterator[list[_Change]]:
    """The frames of a snapshot, built as they are written (in the writer's thread): the records,
    the held versions, the operation ids, `_SNAPSHOT_CHUNK` changes or ids per frame."""
    chunk: list[_Change] = []
    for p, part in parts.items():
        for k, rec in part.items():
            chunk.append(_Put(p, k, rec))
            if len(chunk) >= _SNAPSHOT_CHUNK:
                yield chunk
                chunk = []
    chunk += held
    batch: list[tuple[int, str, int, int]] = []
    for p, d in ops.items():
        for (o, r), at in d.items():
            batch.append((p, o, r, at))
            if len(batch) >= _SNAPSHOT_CHUNK:
                chunk.append(_Ops(batch))
                yield chunk
                chunk, batch = [], []
    if batch:
        chunk.append(_Ops(batch))
    if chunk:
        yield chunk


class _SnapshotWriter:
    """Writes a snapshot to ``NAME.log.tmp`` in a thread of its own (the node's loop goes on; the
    commits made meanwhile are kept in `tail`). Once the snapshot is written, the thread appends
    the commits `tail` holds by then (`written` of them) and syncs the file; the few made after
    are appended when the snapshot takes the log's place, on the loop (`LogStorage._finish_snapshot`,
    no sync: like any commit)."""

    def __init__(self, files: LogFiles, tmp: Path, chunks: Iterator[list[_Change]], *, thread: bool) -> None:
        self.files = files
        self.tmp = tmp
        self.tail: list[bytes] = []  # appended by the loop; read here (appends are atomic)
        self.written = 0  # the commits of `tail` the thread appended to the snapshot
        self.size = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(chunks,), name=f"aether-snapshot-{tmp.name}", daemon=True
        )
        if thread:
            self.thread.start()
        else:  # written now (the simulation: no threads on its virtual time)
            self._run(chunks)

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self) -> None:
        if self.thread.ident is not None:
            self.thread.join()

    def _run(self, chunks: Iterator[list[_Change]]) -> None:
        files = self.files
        try:
            fd = files.open(self.tmp, truncate=True)
            try:
                size = len(MAGIC)
                _write_all(files, fd, MAGIC)
                for chunk in chunks:
                    data = frame(_ENCODER.encode(chunk))
                    _write_all(files, fd, data)
                    size += len(data)
                n = len(self.tail)  # the commits made meanwhile, so far: synced with the snapshot
                # then an empty commit: everything before it is synced, so damage there (its last
                # frame included) is followed by a whole frame and named, not cut off as the end a
                # crash left (a write that was synced cannot have been torn)
                data = b"".join([*self.tail[:n], frame(_SYNCED)])
                _write_all(files, fd, data)
                size += len(data)
                files.fsync(fd)
                self.written = n
            finally:
                files.close(fd)
            self.size = size
        except BaseException as e:  # reported on the loop (`LogStorage._finish_snapshot`)
            self.error = e


def _close_quietly(files: LogFiles, fd: int, path: Path) -> None:
    try:
        files.close(fd)
    except OSError as e:  # (nothing is lost: the file was replaced)
        _log.warning("map log %s: closing the replaced log failed: %s", path, e)


class LogStorage(MemoryStorage):
    """`MemoryStorage` whose changes are appended to ``NAME.log`` at each `commit` (see the module
    docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        files: LogFiles | None = None,
        background: bool = True,
    ) -> None:
        """`files`: where the file lives (default: the real file system, where the engine also
        locks it); `background`: snapshots written by a thread (else on the caller's)."""
        super().__init__()
        self.files: LogFiles = files or OsFiles()
        self.files.makedirs(path.parent)
        self.path = path
        self.compact_min_bytes = compact_min_bytes
        self.background = background
        self._lock_fd = -1
        if files is None:
            self._lock_fd = open_private(f"{path}.lock", os.O_RDWR)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                held = f"{path} is open in another process (its lock file {path}.lock is held)"
                raise OSError(held) from None
        self._fd = -1
        try:
            self.files.unlink(Path(f"{path}.tmp"))  # a snapshot a crash interrupted
            self._size = self._replay()  # 0: a new file (its header goes with the first commit,
            self._fd = self.files.open(path, truncate=False)  # so opening writes nothing)
        except BaseException:
            self._close_files()
            raise
        # about what a snapshot taken now would weigh (the file may hold much that is gone)
        self._snapshot_size = min(self._size, self._live_estimate())
        self._changes: list[_Change] = []  # since the last commit
        self._undo: list[tuple[Any, ...]] = []  # how to take them back in memory
        self._counts = (self.entries, self.bytes)
        self.snapshots = 0  # rewrites of the file since opening (for tests and stats)
        self._snap: _SnapshotWriter | None = None  # a snapshot being written
        # partitions whose dict of records / of operation ids the snapshot being written reads:
        # the first change to one while it does gives the map a copy of its own (copy on write)
        self._lent: set[int] = set()
        self._lent_ops: set[int] = set()

    # --- opening ------------------------------------------------------------------------------------

    def _replay(self) -> int:
        """Apply the file's commits to memory; the length of the file that holds them."""
        data = self.files.read(self.path)
        if not data:
            return 0
        if not data.startswith(MAGIC):
            k = 0
            while k < len(data) and k < len(MAGIC) and data[k] == MAGIC[k]:
                k += 1
            if data.count(0, k) == len(data) - k:
                # the header a crash cut short, or a power cut left in part and zeros after it
                # (the first commit was never synced): nothing was committed
                self.files.truncate(self.path, 0)
                return 0
            raise self._damaged(f"not an Aether map log (it starts {data[:16]!r})")
        view = memoryview(data)
        pos, end = len(MAGIC), len(data)
        while pos < end:
            stop = _frame_at(view, pos, end)
            if stop is None:
                # not a whole frame: the end a crash or a power cut left (cut short, zeros, garbage)
                # if no whole frame follows; damage if one does (cutting there would lose it)
                after = _next_frame(data, view, pos + 1)
                if after is None:
                    break
                raise self._damaged(f"damaged commit at byte {pos} (a whole one follows at byte {after})")
            payload = view[pos + _HEAD.size : stop]
            try:
                changes = _DECODER.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise self._damaged(f"the commit at byte {pos} cannot be read: {e}") from None
            for change in changes:
                self._apply(change)
            pos = stop
        if pos < end:
            _log.warning(
                "map log %s: cut off %d bytes at byte %d (%s): the end a crash or a power cut left, "
                "taken for a commit that never completed; the %d bytes before it are kept",
                self.path, end - pos, pos, _describe_tail(view, pos, end), pos,
            )
            self.files.truncate(self.path, pos)
        return pos

    def _damaged(self, why: str) -> StorageDamaged:
        return StorageDamaged(
            self.path, f"{self.path}: {why}", rename=self.files.replace, exists=self.files.exists
        )

    def _apply(self, c: _Change) -> None:
        """Replay one change (no logging, no undo)."""
        if isinstance(c, _Put):
            MemoryStorage.put(self, c.p, c.k, c.r)
        elif isinstance(c, _Del):
            MemoryStorage.delete(self, c.p, c.k)
        elif isinstance(c, _Drop):
            MemoryStorage.drop(self, c.p)
        elif isinstance(c, _Held):
            MemoryStorage.set_held(self, c.p, set(c.versions))
        elif isinstance(c, _Ops):
            MemoryStorage.add_ops(self, c.ops)
        else:
            MemoryStorage.purge_ops(self, range(c.start, c.stop), c.before)

    # --- changes ------------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self._changes)

    @pending.setter
    def pending(self, value: bool) -> None:  # MemoryStorage.__init__ sets it
        pass

    def _own(self, partition: int) -> None:
        """About to change `partition`'s records: if the snapshot writer reads its dict, the map
        goes on with a copy (the writer keeps the dict as it was when the snapshot started)."""
        self._lent.discard(partition)
        part = self._parts.get(partition)
        if part is not None:
            self._parts[partition] = dict(part)

    def _own_ops(self, partition: int) -> None:
        """`_own` for `partition`'s operation ids."""
        self._lent_ops.discard(partition)
        d = self._ops.get(partition)
        if d is not None:
            self._ops[partition] = dict(d)

    def put(self, partition: int, key: str, rec: Record) -> None:
        if partition in self._lent:
            self._own(partition)
        part = self._parts.get(partition)
        self._undo.append(("rec", partition, key, None if part is None else part.get(key)))
        super().put(partition, key, rec)
        self._changes.append(_Put(partition, key, rec))

    def delete(self, partition: int, key: str) -> None:
        part = self._parts.get(partition)
        if part is None or key not in part:
            return
        if partition in self._lent:
            self._own(partition)
        self._undo.append(("rec", partition, key, part[key]))
        super().delete(partition, key)
        self._changes.append(_Del(partition, key))

    def drop(self, partition: int) -> int:
        if partition in self._lent:
            self._own(partition)
        if partition in self._lent_ops:
            self._own_ops(partition)
        self._undo.append(("drop", partition, self._parts.get(partition), self._ops.get(partition)))
        n = super().drop(partition)
        self._changes.append(_Drop(partition))
        return n

    def set_held(self, partition: int, versions: set[int]) -> None:
        self._undo.append(("held", partition, self._held.get(partition)))
        super().set_held(partition, versions)
        self._changes.append(_Held(partition, sorted(versions)))

    def add_ops(self, ops: list[tuple[int, str, int, int]]) -> None:
        if not ops:
            return
        lent = self._lent_ops
        for p, origin, rid, _ in ops:
            if p in lent:
                self._own_ops(p)
            self._undo.append(("op", p, (origin, rid), self._ops.get(p, {}).get((origin, rid))))
        super().add_ops(ops)
        self._changes.append(_Ops(list(ops)))

    def purge_ops(self, partitions: range, before_ms: int) -> None:
        gone = False
        for p in partitions:
            d = self._ops.get(p)
            if d:
                old = {k: at for k, at in d.items() if at < before_ms}
                if old:
                    if p in self._lent_ops:
                        self._own_ops(p)
                    self._undo.append(("ops", p, old))
                    gone = True
        if gone:
            super().purge_ops(partitions, before_ms)
            self._changes.append(_PurgeOps(partitions.start, partitions.stop, before_ms))

    # --- commits ------------------------------------------------------------------------------------

    def commit(self) -> None:
        if not self._changes:
            return
        try:
            data = frame(_ENCODER.encode(self._changes))
            if self._size == 0:
                data = MAGIC + data
            try:
                _write_all(self.files, self._fd, data)
            except BaseException:
                try:
                    self.files.truncate(self.path, self._size)  # a part may be in the file
                except OSError:
                    pass  # then replaying cuts it off (the checksum does not match)
                raise
        except BaseException:
            self._rollback()
            self._drop_failed_snapshot()
            raise
        self._size += len(data)
        self._changes = []
        self._undo = []
        self._counts = (self.entries, self.bytes)
        snap = self._snap
        if snap is not None:
            snap.tail.append(data)
            if snap.done():
                self._finish_snapshot()
        elif self._size > self.compact_min_bytes and self._size > 2 * self._snapshot_size:
            live = self._live_estimate()
            if self._size > 2 * live:  # at least half of the file is gone: rewrite it
                self._snap = self._start_snapshot(thread=self.background)
            else:  # mostly live data (a map that only grows): look again once it has doubled
                self._snapshot_size = live

    def _rollback(self) -> None:
        """Take back in memory what changed since the last commit."""
        for u in reversed(self._undo):
            kind, p = u[0], u[1]
            if kind == "rec":
                if u[3] is None:
                    MemoryStorage.delete(self, p, u[2])
                else:
                    MemoryStorage.put(self, p, u[2], u[3])
            elif kind == "drop":
                if u[2] is not None:
                    self._parts[p] = u[2]
                if u[3] is not None:
                    self._ops[p] = u[3]
            elif kind == "held":
                MemoryStorage.set_held(self, p, set() if u[2] is None else u[2])
            elif kind == "op":
                d = self._ops.setdefault(p, {})
                if u[3] is None:
                    d.pop(u[2], None)
                else:
                    d[u[2]] = u[3]
            else:  # "ops": purged ids
                self._ops.setdefault(p, {}).update(u[2])
        self._changes = []
        self._undo = []
        self.entries, self.bytes = self._counts

    def snapshot(self) -> None:
        """Rewrite the file as the live state now (what is committed: call it between commits);
        raises what made it fail (the log stays as it was)."""
        assert not self._changes, "snapshot with uncommitted changes"
        if self._snap is not None:
            self._finish_snapshot()
        self._snap = self._start_snapshot(thread=False)
        error = self._finish_snapshot()
        if error is not None:
            raise error

    def _start_snapshot(self, *, thread: bool) -> _SnapshotWriter:
        return _SnapshotWriter(self.files, Path(f"{self.path}.tmp"), self._state_copy(), thread=thread)

    def _state_copy(self) -> Iterator[list[_Change]]:
        """The committed state as the frames of a snapshot: what the writer thread encodes while
        the map goes on. The per-partition dicts are lent, not copied (the first change to one
        copies it: `_own`); the records themselves are immutable. Copying them all here, on the
        loop, stalled the node for ~20 ms per 75,000 records and 150,000 operation ids."""
        parts = {p: d for p, d in self._parts.items() if d}
        ops = {p: d for p, d in self._ops.items() if d}
        self._lent = set(parts)
        self._lent_ops = set(ops)
        held = [_Held(p, sorted(v)) for p, v in self._held.items()]
        return _chunks(parts, held, ops)

    def _finish_snapshot(self) -> BaseException | None:
        """Wait for the writer, append the commits made meanwhile and put the snapshot in the log's
        place; on failure leave the log as it is (and try again after it doubled). The error."""
        snap, self._snap = self._snap, None
        assert snap is not None
        snap.join()
        self._lent.clear()  # the writer is done with them
        self._lent_ops.clear()
        tmp = snap.tmp
        error = snap.error
        files = self.files
        if error is None:
            tail = b"".join(snap.tail[snap.written :])  # the commits the writer did not append
            fd = -1
            try:
                fd = files.open(tmp, truncate=False)  # (appends to the log once renamed)
                _write_all(files, fd, tail)  # not synced, as any commit (the snapshot is)
                files.replace(tmp, self.path)
            except OSError as e:
                error = e
                if fd >= 0:
                    files.close(fd)
            else:  # the snapshot is the log now: commits go to it, whatever happens next
                self._close_replaced(self._fd)
                self._fd = fd
                self._size = snap.size + len(tail)
                self._snapshot_size = snap.size
                self.snapshots += 1
                try:
                    files.fsync_dir(self.path.parent)
                except OSError as e:  # a power cut may bring the old name back: its last writes
                    _log.warning("map log %s: syncing its directory failed: %s", self.path, e)
                return None
        try:
            files.unlink(tmp)
        except OSError:
            pass  # (not a file: opening the map again names it)
        self._snapshot_size = self._size  # again once the file has doubled
        _log.warning(
            "map log %s: the snapshot failed (%s: %s); the log goes on growing",
            self.path, type(error).__name__, error,
        )  # fmt: skip
        return error

    def _live_estimate(self) -> int:
        records = sum(len(part) for part in self._parts.values())
        ops = sum(len(d) for d in self._ops.values())
        return len(MAGIC) + self.bytes + 32 * records + 24 * ops

    def free_bytes(self) -> int | None:
        self._drop_failed_snapshot()  # (its space is free once it is gone)
        return self.files.free_bytes(self.path.parent)

    def _drop_failed_snapshot(self) -> None:
        """Remove the file of a snapshot whose writer failed (a full disk) now: it was removed only
        at the next commit that succeeded, and on a full disk there may be none, the snapshot's
        partial file holding the space the commits (and the storage's probe) need."""
        snap = self._snap
        if snap is not None and snap.done() and snap.error is not None:
            self._finish_snapshot()

    # --- closing ------------------------------------------------------------------------------------

    def _close_replaced(self, fd: int) -> None:
        """Close the replaced log's `fd`: its last reference, so the file system frees its blocks
        then (5 ms for a 35 MB log): in a thread when snapshots are written in one."""
        if not self.background:
            self.files.close(fd)
            return
        threading.Thread(
            target=_close_quietly, args=(self.files, fd, self.path), name="aether-log-close", daemon=True
        ).start()

    def _close_files(self) -> None:
        if self._fd >= 0:
            self.files.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    def close(self) -> None:
        """Commit what is pending, finish a snapshot being written and close the file (the records
        in memory go with it)."""
        if self._fd < 0:
            return
        try:
            self.commit()
            if self._snap is not None:
                self._finish_snapshot()
        finally:
            self._close_files()
            super().close()
