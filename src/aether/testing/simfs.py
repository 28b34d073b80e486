"""A simulated file system for `DiskStore`: page cache vs. disk, power loss, torn writes, errors.

Each file has the bytes a reader sees now (the page cache) and the bytes that are on disk
(updated by `fsync`). Directory entries are the same: a created or renamed name is only on
disk once its directory is fsynced. `crash()` models a process crash (the page cache
survives); `power_loss(rng)` models a power cut: every file goes back to what was on disk plus,
for appended files, a random prefix of the unsynced tail whose last part may be garbage (a torn
write); names go back to the synced directory.

Faults for the next operations: `fail_writes` (an errno raised by `write`, e.g. ENOSPC or EIO),
`fail_fsync`, `short_writes` (writes accept only part of the data), `capacity` (bytes in all
files; beyond it writes raise ENOSPC).

`fsync_in_background` calls back through `schedule(delay, fn)` (the simulation's clock) after
`fsync_delay` seconds, so group commit is exercised on virtual time.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aether.consensus.storage import DurableCallback


@dataclass
class _File:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    version: int = 0  # bumped by every change of `data`
    synced: int = 0  # the version `durable` was taken at


class SimFileSystem:
    """In-memory files with separate cached and durable contents (see the module docstring)."""

    def __init__(
        self,
        *,
        schedule: Callable[[float, Callable[[], None]], None] | None = None,
        fsync_delay: float = 0.0,
    ) -> None:
        self.files: dict[Path, _File] = {}  # visible names
        self.durable_names: dict[Path, _File] = {}  # names as they are on disk
        self.dirs: set[Path] = set()
        self.handles: dict[int, _File] = {}
        self._next = 3
        self.schedule = schedule
        self.fsync_delay = fsync_delay
        self.fail_writes: int | None = None  # errno for every write while set
        self.fail_fsync: int | None = None
        self.short_writes = False
        self.capacity: int | None = None
        self.fsyncs = 0
        self.dir_fsyncs = 0

    # --- FileSystem protocol ----------------------------------------------------------------------

    def exists(self, path: Path) -> bool:
        return path in self.files

    def read(self, path: Path) -> bytes | None:
        f = self.files.get(path)
        return None if f is None else bytes(f.data)

    def open(self, path: Path, *, truncate: bool) -> int:
        if path.parent not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = _File()
        elif truncate:
            f.data.clear()
            f.version += 1
        h = self._next
        self._next += 1
        self.handles[h] = f
        return h

    def _used(self) -> int:
        return sum(len(f.data) for f in self.files.values())

    def write(self, handle: int, data: bytes) -> int:
        f = self.handles.get(handle)
        if f is None:
            raise OSError(errno.EBADF, "bad file handle")
        if self.fail_writes is not None:
            raise OSError(self.fail_writes, "simulated write failure")
        n = len(data)
        if self.capacity is not None:
            room = self.capacity - self._used()
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = min(n, room)
        if self.short_writes and n > 1:
            n = max(1, n // 2)
        f.data += data[:n]
        f.version += 1
        return n

    def fsync(self, handle: int) -> None:
        f = self.handles.get(handle)
        if f is None:
            raise OSError(errno.EBADF, "bad file handle")
        if self.fail_fsync is not None:
            raise OSError(self.fail_fsync, "simulated fsync failure")
        self.fsyncs += 1
        f.durable = bytes(f.data)
        f.synced = f.version

    def fsync_in_background(self, handle: int, done: DurableCallback) -> None:
        f = self.handles.get(handle)
        if f is None:
            raise OSError(errno.EBADF, "bad file handle")
        snapshot = bytes(f.data)  # what the fsync covers: everything written before it started
        version = f.version

        def finish() -> None:
            if self.fail_fsync is not None:
                done(OSError(self.fail_fsync, "simulated fsync failure"))
                return
            self.fsyncs += 1
            if version > f.synced:  # never behind a later fsync (a truncate may have shortened it)
                f.durable = snapshot
                f.synced = version
            done(None)

        if self.schedule is None:
            finish()
        else:
            self.schedule(self.fsync_delay, finish)

    def close(self, handle: int) -> None:
        self.handles.pop(handle, None)

    def truncate(self, path: Path, size: int) -> None:
        f = self.files[path]
        del f.data[size:]
        f.version += 1

    def replace(self, src: Path, dst: Path) -> None:
        f = self.files.pop(src)
        self.files[dst] = f

    def unlink(self, path: Path) -> None:
        """Remove the name if it exists (gone from the disk once its directory is fsynced)."""
        self.files.pop(path, None)

    def fsync_dir(self, path: Path) -> None:
        self.dir_fsyncs += 1
        for p in [p for p in self.durable_names if p.parent == path]:
            del self.durable_names[p]
        for p, f in self.files.items():
            if p.parent == path:
                self.durable_names[p] = f

    def free_bytes(self, path: Path) -> int | None:
        """What `capacity` leaves (None: no limit)."""
        return None if self.capacity is None else max(0, self.capacity - self._used())

    def makedirs(self, path: Path) -> list[Path]:
        created: list[Path] = []
        p = path
        while p not in self.dirs:
            created.append(p)
            if p.parent == p:
                break
            p = p.parent
        self.dirs.update(created)
        return list(reversed(created))

    # --- faults -----------------------------------------------------------------------------------

    def crash(self) -> None:
        """A process crash: open handles are gone, the page cache survives."""
        self.handles.clear()

    def power_loss(self, rng: random.Random, *, torn: bool = True) -> None:
        """A power cut: files fall back to their durable bytes plus a random part of the rest."""
        self.handles.clear()
        survivors: dict[Path, _File] = {}
        for p, f in self.durable_names.items():
            kept = f.durable
            extra = bytes(f.data[len(f.durable):]) if f.data.startswith(f.durable) else b""
            if torn and extra and rng.random() < 0.5:
                cut = rng.randrange(len(extra) + 1)
                tail = extra[:cut]
                if tail and rng.random() < 0.5:
                    # the last block written only partly: garbage or zeros at its end
                    k = rng.randrange(1, min(len(tail), 64) + 1)
                    filler = bytes(k) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(k))
                    tail = tail[:-k] + filler
                kept = kept + tail
            nf = _File(bytearray(kept), kept)
            survivors[p] = nf
        self.files = dict(survivors)
        self.durable_names = dict(survivors)
