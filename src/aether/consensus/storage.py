"""Local persistence of one replica: an atomically replaced snapshot plus an append-only journal.

Journal records are framed as `[u32 length][u32 crc32][payload]`; loading stops at the first
truncated or corrupt frame (what a crash mid-write leaves behind). The snapshot is written to
a temporary file and renamed into place. `fsync` policy: "none" (rely on the OS page cache:
survives a process crash, not a power cut), "snapshot" (fsync snapshots), "always" (also fsync
the journal before anything that follows a record is sent).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

_HDR = struct.Struct(">II")
_log = logging.getLogger("aether.consensus.storage")


class DiskStore:
    """Snapshot and journal files in `directory` (created if missing)."""

    def __init__(self, directory: str | Path, fsync: str = "none") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.snapshot_path = self.dir / "snapshot.bin"
        self.journal_path = self.dir / "journal.bin"
        self._fd: int | None = None

    def load(self) -> tuple[bytes | None, list[bytes]]:
        """Return (snapshot or None, journal payloads in order)."""
        snap = self.snapshot_path.read_bytes() if self.snapshot_path.exists() else None
        records: list[bytes] = []
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            off = 0
            while off + _HDR.size <= len(data):
                length, crc = _HDR.unpack_from(data, off)
                end = off + _HDR.size + length
                if end > len(data):
                    _log.warning("journal %s: truncated record at offset %d ignored", self.journal_path, off)
                    break
                payload = data[off + _HDR.size:end]
                if zlib.crc32(payload) != crc:
                    _log.warning(
                        "journal %s: corrupt record at offset %d; ignoring the rest", self.journal_path, off
                    )
                    break
                records.append(payload)
                off = end
            if off != len(data):
                # cut the damaged tail so later appends follow a valid record
                with open(self.journal_path, "r+b") as f:
                    f.truncate(off)
        return snap, records

    def _journal_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def append(self, payloads: list[bytes]) -> None:
        """Append records with one write (atomic with respect to a process crash)."""
        if not payloads:
            return
        buf = b"".join(_HDR.pack(len(p), zlib.crc32(p)) + p for p in payloads)
        fd = self._journal_fd()
        os.write(fd, buf)
        if self.fsync == "always":
            os.fsync(fd)

    def save_snapshot(self, data: bytes) -> None:
        """Replace the snapshot atomically, then start an empty journal."""
        tmp = self.dir / "snapshot.bin.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync in ("snapshot", "always"):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)
        if self.fsync in ("snapshot", "always"):
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        fd = self._journal_fd()
        os.ftruncate(fd, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
