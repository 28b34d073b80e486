"""Storage engines of the distributed map, behind one interface (`MapStorage`).

`MemoryStorage` keeps one dict per partition; `LogStorage` (`aether.maps.logstorage`, engine ``log``)
the same, with every commit appended to a file. `SqliteStorage` keeps one SQLite database per map in
the node's data directory, in WAL mode with ``synchronous=NORMAL`` and an exclusive lock (held
while the engine is open: no other connection, in this process or another, can open the file
meanwhile). Both count the live entries and
the bytes of their values for `stats`. Engines store whatever record they are given; the caller
decides with `records.newer` whether a record replaces the current one.

Group commit: `SqliteStorage` opens a transaction with the first write and keeps adding the writes
that follow to it until `commit` (`pending` says whether one is open; `close` commits it). The
node's map service (`aether.maps.service`) commits once per event-loop turn, before it sends or
answers anything the core decided in that turn: every write is committed before the operation it
belongs to is acknowledged, and survives a crash of the process (a power loss may lose the last
writes of this node; the replicas have them). A failed commit rolls the transaction back and
raises: the service then fails every acknowledgement of that turn. `MemoryStorage` has nothing to
commit (`pending` is always False).
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import msgspec

from aether.core.files import free_bytes, make_private_dirs, open_private
from aether.maps.records import Record, RecordMeta

__all__ = [
    "MapStorage", "MemoryStorage", "SqliteStorage", "StorageDamaged", "UnopenedStorage",
    "definition_file", "no_space", "open_storage_engine", "storage_files",
]

_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"


def no_space(e: BaseException) -> bool:
    """Whether `e` says the disk (or the user's quota) is full: the write was refused whole and
    nothing on disk is damaged (OSError ENOSPC or EDQUOT, SQLite's SQLITE_FULL)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(e)
    return False

_OPS_ENCODER = msgspec.msgpack.Encoder()
_OPS_DECODER = msgspec.msgpack.Decoder(list[tuple[int, str, int, int]])

_NOTADB = sqlite3.SQLITE_NOTADB

CACHE_KIB = 16 * 1024
"""Page cache of one `SqliteStorage` (one map on one node), in KiB."""

# the partitions holding records, one index seek each (a plain DISTINCT reads every record)
_PARTITIONS = (
    "WITH RECURSIVE ps(p) AS (SELECT min(p) FROM records UNION ALL "
    "SELECT (SELECT min(p) FROM records WHERE p > ps.p) FROM ps WHERE ps.p IS NOT NULL) "
    "SELECT p FROM ps WHERE p IS NOT NULL"
)


class StorageDamaged(Exception):
    """A map's file does not read back, and not because a crash cut its end short: it is damaged.
    `path` names it (the map service sets it aside, with its side files, and starts the map empty
    on this node)."""

    def __init__(
        self,
        path: Path,
        message: str,
        *,
        rename: Callable[[Path, Path], None] = os.replace,
        exists: Callable[[Path], bool] = os.path.exists,
    ) -> None:
        super().__init__(message)
        self.path = path
        self._rename = rename  # (the engine's files: real, or the simulation's)
        self._exists = exists

    def set_aside(self, suffix: str) -> list[Path]:
        """Rename the file and its SQLite side files (``-wal``, ``-shm``: a stale WAL would be
        replayed into a new database) to NAME + `suffix`; the new names."""
        moved = []
        for side in ("", "-wal", "-shm"):
            old = Path(f"{self.path}{side}")
            if side == "" or self._exists(old):
                new = Path(f"{self.path}{side}{suffix}")
                self._rename(old, new)
                moved.append(new)
        return moved


class MapStorage(Protocol):
    entries: int
    """Records holding a value (tombstones excluded; expired but not yet purged included)."""
    bytes: int
    """Sum of the value sizes of those records."""

    def get(self, partition: int, key: str) -> Record | None: ...

    def put(self, partition: int, key: str, rec: Record) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def scan(self, partition: int) -> Iterator[tuple[str, Record]]: ...

    def scan_meta(self, partition: int) -> Iterator[tuple[str, RecordMeta]]:
        """`scan` without the values: what the core reads to compare keys and versions or to list
        keys. A partition of large values cost its whole size in reads and copies to compare them
        (SQLite: 64 values of 512 KiB, 42 ms a scan; 17 ms without them)."""
        ...

    def partitions(self) -> set[int]: ...

    def drop(self, partition: int) -> int:
        """Delete every record of `partition` (tombstones included) and its operation ids; the
        number of records deleted (what it cost: `MapCore` deletes copies a batch per step)."""
        ...

    def purge(self, partitions: range, now_ms: int) -> int:
        """Delete the records of `partitions` whose expiry is due (values and tombstones); their count."""
        ...

    def held(self) -> dict[int, set[int]]:
        """Per partition, the table versions whose copy this storage holds (see `MapCore.held`);
        kept with the data, so a persistent engine keeps it across restarts."""
        ...

    def set_held(self, partition: int, versions: set[int]) -> None: ...

    def add_ops(self, ops: list[tuple[int, str, int, int]]) -> None:
        """Remember applied operations ``(partition, origin, rid, applied_at_ms)`` with the data
        (`drop` forgets a partition's), so that a retry is recognised after a restart too."""
        ...

    def load_ops(self) -> list[tuple[int, str, int, int]]: ...

    def ops_index(self) -> dict[int, dict[tuple[str, int], int]]:
        """`load_ops` by partition, ``{partition: {(origin, rid): applied_at_ms}}``: new dicts the
        caller owns (`MapCore` keeps them as its index of applied operations). A memory or log
        engine copies its own (C speed): indexing 20,000 operations one by one held a restarted
        node's event loop 0.05-0.17 s."""
        ...

    def purge_ops(self, partitions: range, before_ms: int) -> None:
        """Forget the operations of `partitions` applied before `before_ms` (an engine may forget
        other partitions' that old as well)."""
        ...

    @property
    def pending(self) -> bool:
        """A write is not committed yet (`commit` makes it durable)."""
        ...

    def commit(self) -> None:
        """Make the writes so far durable. On failure they are all undone and the error raised."""
        ...

    def free_bytes(self) -> int | None:
        """Bytes still free on the file system holding this engine's files (None: it keeps none,
        or cannot tell). The probe of a failed storage requires room (`MapTimings.probe_room`)."""
        ...

    def close(self) -> None: ...


class UnopenedStorage:
    """Stands in for an engine that could not be opened (a full disk, a missing permission): every
    use raises, so the map is broken on this node (it does not serve it and the leader leaves it
    out); the map service tries to open the engine again (`MapService._reopen`)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.entries = 0
        self.bytes = 0
        self.pending = False

    def _fail(self) -> OSError:
        return OSError(f"the map's storage could not be opened ({type(self.error).__name__}: {self.error})")

    def get(self, partition: int, key: str) -> Record | None:
        raise self._fail()

    def put(self, partition: int, key: str, rec: Record) -> None:
        raise self._fail()

    def delete(self, partition: int, key: str) -> None:
        raise self._fail()

    def scan(self, partition: int) -> Iterator[tuple[str, Record]]:
        raise self._fail()

    def scan_meta(self, partition: int) -> Iterator[tuple[str, RecordMeta]]:
        raise self._fail()

    def partitions(self) -> set[int]:
        return set()

    def drop(self, partition: int) -> int:
        return 0  # holds nothing

    def purge(self, partitions: range, now_ms: int) -> int:
        return 0

    def held(self) -> dict[int, set[int]]:
        raise self._fail()

    def set_held(self, partition: int, versions: set[int]) -> None:
        raise self._fail()

    def add_ops(self, ops: list[tuple[int, str, int, int]]) -> None:
        raise self._fail()

    def load_ops(self) -> list[tuple[int, str, int, int]]:
        return []

    def ops_index(self) -> dict[int, dict[tuple[str, int], int]]:
        return {}

    def purge_ops(self, partitions: range, before_ms: int) -> None:
        pass

    def commit(self) -> None:
        pass

    def free_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        pass


def _size(rec: Record | None) -> tuple[int, int]:
    if rec is None or rec.value is None:
        return 0, 0
    return 1, len(rec.value)


class MemoryStorage:
    def __init__(self) -> None:
        self._parts: dict[int, dict[str, Record]] = {}
        self._held: dict[int, set[int]] = {}
        self._ops: dict[int, dict[tuple[str, int], int]] = {}
        self.entries = 0
        self.bytes = 0
        self.pending = False

    def free_bytes(self) -> int | None:
        return None  # (no files)

    def commit(self) -> None:
        pass

    def add_ops(self, ops: list[tuple[int, str, int, int]]) -> None:
        for p, origin, rid, at in ops:
            self._ops.setdefault(p, {})[(origin, rid)] = at

    def load_ops(self) -> list[tuple[int, str, int, int]]:
        return [(p, o, r, at) for p, d in self._ops.items() for (o, r), at in d.items()]

    def ops_index(self) -> dict[int, dict[tuple[str, int], int]]:
        return {p: dict(d) for p, d in self._ops.items() if d}

    def purge_ops(self, partitions: range, before_ms: int) -> None:
        for p in partitions:
            d = self._ops.get(p)
            if d:
                for k in [k for k, at in d.items() if at < before_ms]:
                    del d[k]

    def held(self) -> dict[int, set[int]]:
        return {p: set(v) for p, v in self._held.items()}

    def set_held(self, partition: int, versions: set[int]) -> None:
        if versions:
            self._held[partition] = set(versions)
        else:
            self._held.pop(partition, None)

    def get(self, partition: int, key: str) -> Record | None:
        part = self._parts.get(partition)
        return None if part is None else part.get(key)

    def put(self, partition: int, key: str, rec: Record) -> None:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = {}
        old = part.get(key)
        part[key] = rec
        e0, b0 = _size(old)
        e1, b1 = _size(rec)
        self.entries += e1 - e0
        self.bytes += b1 - b0

    def delete(self, partition: int, key: str) -> None:
        part = self._parts.get(partition)
        if part is not None and key in part:
            e, b = _size(part.pop(key))
            self.entries -= e
            self.bytes -= b

    def scan(self, partition: int) -> Iterator[tuple[str, Record]]:
        return iter(list(self._parts.get(partition, {}).items()))

    def scan_meta(self, partition: int) -> Iterator[tuple[str, RecordMeta]]:
        return iter([
            (k, RecordMeta(r.epoch, r.seq, r.expires, r.value is None))
            for k, r in self._parts.get(partition, {}).items()
        ])

    def partitions(self) -> set[int]:
        return {p for p, d in self._parts.items() if d}

    def drop(self, partition: int) -> int:
        self._ops.pop(partition, None)
        part = self._parts.pop(partition, None)
        if not part:
            return 0
        for rec in part.values():
            e, b = _size(rec)
            self.entries -= e
            self.bytes -= b
        return len(part)

    def purge(self, partitions: range, now_ms: int) -> int:
        n = 0
        for p in partitions:
            part = self._parts.get(p)
            if not part:
                continue
            for key in [k for k, rec in part.items() if rec.expires and rec.expires <= now_ms]:
                self.delete(p, key)
                n += 1
        return n

    def close(self) -> None:
        self._parts.clear()
        self._held.clear()
        self._ops.clear()
        self.entries = self.bytes = 0


class SqliteStorage:
    """One SQLite database file per map (``{name}.sqlite`` in `directory`). Writes collect in one
    transaction until `commit` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        make_private_dirs(path.parent)
        self.path = path
        # created 0600 before SQLite opens it: SQLite would create it 0644, and gives the -wal and
        # -shm files the database file's mode
        os.close(open_private(path, os.O_RDWR))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except BaseException as e:
            self._db.close()
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # "malformed", "not a database"
            if isinstance(e, sqlite3.DatabaseError) and code in (sqlite3.SQLITE_CORRUPT, _NOTADB):
                raise StorageDamaged(path, f"{path} is damaged: {e}") from None
            raise

    def _open(self) -> None:
        # the node is the file's only user: it keeps the lock instead of taking and releasing it
        # (fcntl calls) around every transaction, and the WAL index lives in its memory (no -shm)
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # pages kept in memory (SQLite's default is 2 MiB): every write reads the B-tree pages on
        # its way to a random leaf; with more of them cached, fewer are read from the file again
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS records (p INTEGER NOT NULL, k TEXT NOT NULL, v BLOB, "
            "epoch INTEGER NOT NULL, seq INTEGER NOT NULL, exp INTEGER NOT NULL, PRIMARY KEY (p, k)) "
            "WITHOUT ROWID"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS held (p INTEGER PRIMARY KEY, versions TEXT NOT NULL)")
        # applied operations: one row per commit that added any (`oplog`), appended at the end of
        # the table instead of one row per operation at a random place of an index; `opdrop`: a
        # partition's operations in rows up to `seq` were dropped with its copy
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS oplog "
            "(seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, ops BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS opdrop (p INTEGER PRIMARY KEY, seq INTEGER NOT NULL)")
        self._migrate_ops()
        self._log: list[tuple[int, int]] = []  # heap of (newest `at`, seq) of the oplog rows
        self._last_seq = 0  # the highest seq logged (a new row takes the next one)
        self._load_log()
        self._new_ops: list[tuple[int, str, int, int]] = []  # added in the open transaction
        row = self._db.execute(
            "SELECT count(v), coalesce(sum(length(v)), 0) FROM records WHERE v IS NOT NULL"
        ).fetchone()
        self.entries, self.bytes = int(row[0]), int(row[1])
        self._counts = (self.entries, self.bytes)  # as of the last commit (restored by a rollback)
        self._error: BaseException | None = None  # a write of the open transaction failed
        # the record `get` read last: the core reads a key right before it writes it, so `put` and
        # `delete` take the old record's size from here instead of reading it again
        self._seen: tuple[int, str, Record | None] | None = None

    # --- transactions ---------------------------------------------------------------------------

    def _load_log(self) -> None:
        self._log = [(int(at), int(seq)) for seq, at in self._db.execute("SELECT seq, at FROM oplog")]
        heapq.heapify(self._log)
        # above every row left and every drop mark: a new row is never taken for one a mark covers
        row = self._db.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM oplog), 0), "
            "coalesce((SELECT max(seq) FROM opdrop), 0))"
        ).fetchone()
        self._last_seq = int(row[0])

    def _migrate_ops(self) -> None:
        """A file written before `oplog` keeps its operations in a table ``ops`` (one row per
        operation): moved into one `oplog` row."""
        db = self._db
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ops'").fetchone() is None:
            return
        old = db.execute("SELECT p, origin, rid, at FROM ops")
        rows = [(int(p), str(o), int(r), int(a)) for p, o, r, a in old]
        db.execute("BEGIN")
        if rows:
            at = max(r[3] for r in rows)
            db.execute("INSERT INTO oplog (at, ops) VALUES (?, ?)", (at, _OPS_ENCODER.encode(rows)))
        db.execute("DROP TABLE ops")
        db.execute("COMMIT")

    @property
    def pending(self) -> bool:
        return self._db.in_transaction or self._error is not None or bool(self._new_ops)

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """Run a write in the open transaction (opened here if none is)."""
        db = self._db
        try:
            if not db.in_transaction:
                db.execute("BEGIN")
            return db.execute(sql, args)
        except BaseException as e:
            # SQLite may have rolled the whole transaction back (a full disk, an I/O error): the
            # commit must fail even if later writes open a new one
            self._error = self._error or e
            raise

    def commit(self) -> None:
        if not self.pending:
            return
        try:
            if self._error is not None:
                raise sqlite3.OperationalError(f"a write of this transaction failed: {self._error}")
            logged = None
            if self._new_ops:
                ops = self._new_ops
                at = max(op[3] for op in ops)
                seq = self._last_seq + 1
                blob = _OPS_ENCODER.encode(ops)
                self._exec("INSERT INTO oplog (seq, at, ops) VALUES (?, ?, ?)", (seq, at, blob))
                logged = (at, seq)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._new_ops = []
        if logged is not None:
            heapq.heappush(self._log, logged)
            self._last_seq = logged[1]
        self._counts = (self.entries, self.bytes)

    def _rollback(self) -> None:
        self._error = None
        self._seen = None
        self._new_ops = []
        self.entries, self.bytes = self._counts
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # rolled back already (SQLite does so itself after some errors)
        try:  # a purge of the undone transaction took rows off `_log`
            self._load_log()
        except sqlite3.Error:
            pass  # the storage is failing: the node stops serving the map and drops `_log` with it

    # --- records --------------------------------------------------------------------------------

    def get(self, partition: int, key: str) -> Record | None:
        row = self._db.execute(
            "SELECT v, epoch, seq, exp FROM records WHERE p = ? AND k = ?", (partition, key)
        ).fetchone()
        rec = None if row is None else Record(row[0], row[1], row[2], row[3])
        self._seen = (partition, key, rec)
        return rec

    def _old(self, partition: int, key: str) -> Record | None:
        seen = self._seen
        if seen is not None and seen[0] == partition and seen[1] == key:
            return seen[2]
        return self.get(partition, key)

    def put(self, partition: int, key: str, rec: Record) -> None:
        old = self._old(partition, key)
        self._seen = None
        self._exec(
            "INSERT OR REPLACE INTO records (p, k, v, epoch, seq, exp) VALUES (?, ?, ?, ?, ?, ?)",
            (partition, key, rec.value, rec.epoch, rec.seq, rec.expires),
        )
        self._seen = (partition, key, rec)
        e0, b0 = _size(old)
        e1, b1 = _size(rec)
        self.entries += e1 - e0
        self.bytes += b1 - b0

    def delete(self, partition: int, key: str) -> None:
        old = self._old(partition, key)
        if old is not None:
            self._seen = None
            self._exec("DELETE FROM records WHERE p = ? AND k = ?", (partition, key))
            self._seen = (partition, key, None)
            e, b = _size(old)
            self.entries -= e
            self.bytes -= b

    def scan(self, partition: int) -> Iterator[tuple[str, Record]]:
        rows = self._db.execute(
            "SELECT k, v, epoch, seq, exp FROM records WHERE p = ?", (partition,)
        ).fetchall()
        return iter([(r[0], Record(r[1], r[2], r[3], r[4])) for r in rows])

    def scan_meta(self, partition: int) -> Iterator[tuple[str, RecordMeta]]:
        # length(v), not v IS NULL: SQLite takes a blob's length from the row's header without
        # reading the blob (v IS NULL reads it: 21 ms instead of 17 for 64 values of 512 KiB)
        rows = self._db.execute(
            "SELECT k, epoch, seq, exp, length(v) FROM records WHERE p = ?", (partition,)
        ).fetchall()
        return iter([(r[0], RecordMeta(r[1], r[2], r[3], r[4] is None)) for r in rows])

    def partitions(self) -> set[int]:
        return {r[0] for r in self._db.execute(_PARTITIONS)}

    def drop(self, partition: int) -> int:
        self._seen = None
        self._new_ops = [op for op in self._new_ops if op[0] != partition]
        if self._log:  # the operations logged so far: skipped by `load_ops`, gone with their rows
            self._exec("INSERT OR REPLACE INTO opdrop (p, seq) VALUES (?, ?)", (partition, self._last_seq))
        row = self._db.execute(
            "SELECT count(v), coalesce(sum(length(v)), 0) FROM records WHERE p = ? AND v IS NOT NULL",
            (partition,),
        ).fetchone()
        n = self._exec("DELETE FROM records WHERE p = ?", (partition,)).rowcount
        self.entries -= int(row[0])
        self.bytes -= int(row[1])
        return int(n)

    def purge(self, partitions: range, now_ms: int) -> int:
        self._seen = None
        where = "p >= ? AND p < ? AND exp > 0 AND exp <= ?"
        args = (partitions.start, partitions.stop, now_ms)
        row = self._db.execute(
            f"SELECT count(v), coalesce(sum(length(v)), 0) FROM records WHERE {where} AND v IS NOT NULL", args
        ).fetchone()
        n = self._exec(f"DELETE FROM records WHERE {where}", args).rowcount
        self.entries -= int(row[0])
        self.bytes -= int(row[1])
        return int(n)

    def held(self) -> dict[int, set[int]]:
        rows = self._db.execute("SELECT p, versions FROM held").fetchall()
        return {int(p): {int(v) for v in versions.split(",") if v} for p, versions in rows}

    def set_held(self, partition: int, versions: set[int]) -> None:
        if versions:
            self._exec(
                "INSERT OR REPLACE INTO held (p, versions) VALUES (?, ?)",
                (partition, ",".join(str(v) for v in sorted(versions))),
            )
        else:
            self._exec("DELETE FROM held WHERE p = ?", (partition,))

    def add_ops(self, ops: list[tuple[int, str, int, int]]) -> None:
        """Logged with the transaction's other writes, as one `oplog` row, when it commits."""
        self._new_ops += ops

    def load_ops(self) -> list[tuple[int, str, int, int]]:
        dropped = dict(self._db.execute("SELECT p, seq FROM opdrop").fetchall())
        out: list[tuple[int, str, int, int]] = []
        for seq, blob in self._db.execute("SELECT seq, ops FROM oplog ORDER BY seq"):
            out += [
                (p, o, r, a) for p, o, r, a in _OPS_DECODER.decode(blob) if seq > dropped.get(p, -1)
            ]
        return out + self._new_ops

    def ops_index(self) -> dict[int, dict[tuple[str, int], int]]:
        """Built from the log's rows as they decode (not from `load_ops`' list of them all): a
        drop mark is looked at only for a row it covers (most are newer than every mark)."""
        dropped: dict[int, int] = dict(self._db.execute("SELECT p, seq FROM opdrop").fetchall())
        newest_mark = max(dropped.values(), default=-1)
        index: dict[int, dict[tuple[str, int], int]] = {}
        for seq, blob in self._db.execute("SELECT seq, ops FROM oplog ORDER BY seq"):
            if seq > newest_mark:
                for p, origin, rid, at in _OPS_DECODER.decode(blob):
                    d = index.get(p)
                    if d is None:
                        d = index[p] = {}
                    d[(origin, rid)] = at
            else:
                for p, origin, rid, at in _OPS_DECODER.decode(blob):
                    if seq > dropped.get(p, -1):
                        index.setdefault(p, {})[(origin, rid)] = at
        for p, origin, rid, at in self._new_ops:
            index.setdefault(p, {})[(origin, rid)] = at
        return index

    def purge_ops(self, partitions: range, before_ms: int) -> None:
        """Forget the operations applied before `before_ms`: of every partition, not only of
        `partitions` (an `oplog` row holds many partitions' operations). A row goes once the
        newest operation in it is that old (one dated ahead by another node's clock keeps only its
        own row)."""
        if before_ms >= 2**62:  # everything (a node dropping all its copies)
            self._new_ops = []
        log = self._log
        gone: list[int] = []
        while log and log[0][0] < before_ms:
            gone.append(heapq.heappop(log)[1])
        if gone:
            self._exec("DELETE FROM oplog WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(gone),))
            # a partition's drop mark matters only while a row it covers is left
            self._exec("DELETE FROM opdrop WHERE seq < (SELECT coalesce(min(seq), 1 << 62) FROM oplog)")

    def free_bytes(self) -> int | None:
        return free_bytes(self.path.parent)

    def close(self) -> None:
        """Commit what is pending and close the database."""
        try:
            self.commit()
        finally:
            self._db.close()


def open_storage_engine(engine: str, directory: Path, name: str) -> MapStorage:
    if engine == "memory":
        return MemoryStorage()
    if engine == "sqlite":
        return SqliteStorage(directory / f"{name}.sqlite")
    if engine == "log":
        from aether.maps.logstorage import LogStorage

        return LogStorage(directory / f"{name}.log")
    raise ValueError(f"unknown storage engine {engine!r}; use memory, log or sqlite")


def storage_files(directory: Path, name: str) -> list[Path]:
    """Every file the persistent engines may keep for map `name` in `directory`, the file naming
    the definition they belong to (`definition_file`) last."""
    sqlite = directory / f"{name}.sqlite"
    log = directory / f"{name}.log"
    return [Path(f"{sqlite}{s}") for s in ("", "-wal", "-shm")] + [
        Path(f"{log}{s}") for s in ("", ".tmp", ".lock")
    ] + [definition_file(directory, name)]


def definition_file(directory: Path, name: str) -> Path:
    """The file naming the definition of map `name` whose data its files in `directory` hold: the
    store revision that created it (`ClusterStore.created_local`)."""
    return directory / f"{name}.def"
