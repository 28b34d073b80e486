"""Private files: what a node or the local-cluster CLI writes is for its own user only.

The consensus journal holds the whole KV (map definitions, blueprints, user keys), map files hold
the maps' data, logs hold request details: every file is created 0600 and every directory 0700,
with the mode given where the file is created (not left to the process umask, which a library
user running nodes in their own process controls). `tighten_dir` narrows a directory created
earlier with looser modes (e.g. 0755 by an older version).

May import only the standard library.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "OsFiles",
    "free_bytes",
    "fsync_dir",
    "make_private_dirs",
    "open_private",
    "open_private_append",
    "prepare_private_dir",
    "privatize_tree",
    "process_temporary",
    "remove_stale_temporaries",
    "replace_private",
    "tighten_dir",
    "write_all",
    "write_private",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dirs(path: Path | str) -> list[Path]:
    """Create `path` and its missing parents, each 0700 whatever the umask; return the directories
    created (outermost first). Existing directories are left as they are."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created meanwhile by someone else
        os.chmod(d, PRIVATE_DIR_MODE)  # a umask may have removed bits the owner needs
        created.append(d)
    if not path.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(path))
    return created


def tighten_dir(path: Path | str, log: logging.Logger | None = None) -> bool:
    """Make an existing directory 0700 if group or others have any access; log it once (warning).
    Returns whether it changed. What lies below becomes unreachable for others with it."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if not mode & 0o077:
        return False
    os.chmod(path, PRIVATE_DIR_MODE)
    if log is not None:
        log.warning("%s was mode %o (readable by other users); changed to %o", path, mode, PRIVATE_DIR_MODE)
    return True


def prepare_private_dir(path: Path | str, log: logging.Logger | None = None) -> Path:
    """A node's own directory: create it 0700, or tighten it if it exists with looser modes."""
    path = Path(path)
    if path not in make_private_dirs(path):
        tighten_dir(path, log)
    return path


def open_private(path: Path | str, flags: int) -> int:
    """`os.open(path, flags | O_CREAT, 0600)`: a file descriptor."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)


def open_private_append(path: Path | str) -> BinaryIO:
    """A log file opened for appending in binary mode, created 0600."""
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "ab")


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until all of `data` is written (a write may take only a part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path | str) -> None:
    """Make the entries of directory `path` durable (after a file was created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class OsFiles:
    """Files by handle on the real file system, for the write-ahead logs (the consensus journal,
    the log map engine), which take them as a parameter so that the simulations can pass a
    simulated disk instead (`aether.testing.simfs`). Files are created 0600, directories 0700."""

    def read(self, path: Path) -> bytes | None:
        """The whole file, or None if there is none."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, path: Path) -> bool:
        return path.exists()

    def open(self, path: Path, *, truncate: bool) -> int:
        """Open for appending (created if missing; emptied first if `truncate`)."""
        return open_private(path, os.O_WRONLY | os.O_APPEND | (os.O_TRUNC if truncate else 0))

    def write(self, handle: int, data: bytes) -> int:
        """Write some of `data` at the end; how many bytes were written."""
        return os.write(handle, data)

    def fsync(self, handle: int) -> None:
        os.fsync(handle)

    def close(self, handle: int) -> None:
        os.close(handle)

    def truncate(self, path: Path, size: int) -> None:
        os.truncate(path, size)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        """Remove `path` if it exists."""
        path.unlink(missing_ok=True)

    def fsync_dir(self, path: Path) -> None:
        fsync_dir(path)

    def free_bytes(self, path: Path) -> int | None:
        """Bytes still free for files in directory `path` (`free_bytes`)."""
        return free_bytes(path)

    def makedirs(self, path: Path) -> list[Path]:
        """Create `path` and missing parents (0700); the directories that were created."""
        return make_private_dirs(path)


def write_private(path: Path | str, data: bytes) -> None:
    """Write `data` as the whole content of `path` (created 0600; an existing file keeps its
    mode, so write a temporary name and rename it over the target for an atomic replace)."""
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def replace_private(path: Path | str, data: bytes, *, sync: bool = False) -> None:
    """Make `data` the content of `path` (0600) in one step: written to ``PATH.tmp``, then renamed
    over `path`, so a reader (or a restart after a kill, or a write that failed on a full disk)
    finds the old content or the new, never a file cut short. Not synced unless `sync` (the file
    before the rename, its directory after): without it a power cut may keep the old content."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if sync:
            fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            write_private(tmp, data)
        os.replace(tmp, path)
        if sync:
            fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


STALE_TEMPORARY_AGE = 60.0
"""Seconds after which a `process_temporary` belongs to no write still running (one takes
milliseconds)."""


def process_temporary(path: Path) -> Path:
    """The name this process writes the new content of `path` to before renaming it over `path`
    (``.NAME.PID.tmp`` beside it): for a file that several processes may replace at once, each
    with a temporary of its own. Remove it if the write fails; `remove_stale_temporaries` removes
    those of processes killed between writing and renaming."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: Path, age: float = STALE_TEMPORARY_AGE) -> int:
    """Remove the `process_temporary` names of `path`, of any process, older than `age` seconds
    (a write still running keeps its own); nothing else is touched. How many were removed."""
    prefix = f".{path.name}."
    cutoff = time.time() - age
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp") and name[len(prefix) : -4].isdigit()):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass  # gone meanwhile, or not ours to remove: left as it is
    return removed


def privatize_tree(root: Path | str) -> None:
    """Remove group and other permissions from everything under `root` (e.g. what pip wrote with
    the process umask); owner bits, such as the executable bit of a script, stay."""
    for dirpath, _dirnames, filenames in os.walk(root):  # symlinked directories are not entered
        os.chmod(dirpath, PRIVATE_DIR_MODE)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & 0o700)
