"""Structured node logs: the JSON line format, the context every record carries, and the bounded
buffer of recent records each node keeps for `GET /api/v1/logs` and `aether logs`
(docs/operations.md, *Logs*).

Every record is seen with the context it was emitted in (`aether.core.context`): the node
(`current_node_id`), the request id, the trace id (`aether.core.tracing.current_trace`, in a
traced call), the slice (``group:artifact:version``) and its instance. Records forwarded from
another process (a slice worker) may carry them as attributes instead: ``aether_node``,
``aether_slice``, ``aether_instance``, ``aether_request_id`` (logging's ``extra``).

- `JsonFormatter`: one JSON object per line: time (ISO 8601, UTC), level, logger, message, node,
  and request_id, trace_id, slice, instance and exc (the traceback) when known;
- `LogBuffer`: a `logging.Handler` keeping the last records of one node (at most `max_records`
  and about `max_bytes`) as `LogEntry` values, each with a sequence number, and answering queries
  (since a time, after a sequence number, one slice, a minimum level, a limit);
- `configure_logging`: the process's stderr handler in the text or JSON format (`aether node`).

Nothing here holds state outside the objects it returns and logging's own handlers.
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Final

import msgspec

from aether.core import context as _context
from aether.core.tracing import current_trace

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_BUFFER_RECORDS",
    "LEVELS",
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "LogBuffer",
    "LogEntry",
    "configure_logging",
    "entry_of",
    "matches_slice",
    "parse_level",
    "parse_since",
]

LOG_FORMATS: Final = ("text", "json")
DEFAULT_BUFFER_RECORDS: Final = 5000
DEFAULT_BUFFER_BYTES: Final = 4 * 1024 * 1024
LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s {node} %(name)s: %(message)s"
"""The text format (`aether node` before JSON existed): time, level, node, logger, message."""

_OVERHEAD: Final = 160  # bytes an entry costs beyond its strings (the struct, the deque slot)
_FIELDS_ATTR: Final = "_aether_log_fields"


class LogEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One log record of a node (`GET /api/v1/logs`): `seq` numbers the node's buffered records
    from 1; `time` is epoch seconds; `level` the level name (``INFO``...)."""

    seq: int
    time: float
    level: str
    logger: str
    message: str
    node: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    slice: str | None = None
    instance: int | None = None
    exc: str | None = None


class _Fields(msgspec.Struct, frozen=True):
    node: str | None
    request_id: str | None
    trace_id: str | None
    slice: str | None
    instance: int | None


def _trace_id() -> str | None:
    """The trace id of the call being served (`aether.core.tracing.current_trace`), if traced."""
    ctx = current_trace.get()
    return None if ctx is None else ctx.trace_id


def _fields(record: logging.LogRecord) -> _Fields:
    """The record's context: its ``aether_*`` attributes, else the context variables now (a
    handler runs in the context the record was emitted in). Computed once per record."""
    cached = getattr(record, _FIELDS_ATTR, None)
    if cached is not None:
        return cached
    get = record.__dict__.get
    slice_ = get("aether_slice")
    instance = get("aether_instance")
    if slice_ is None:
        slice_ = _context.current_slice.get()
        instance = _context.current_instance.get()
    f = _Fields(
        get("aether_node") or _context.current_node_id.get(),
        get("aether_request_id") or _context.current_request_id.get(),
        get("aether_trace_id") or _trace_id(),
        slice_,
        instance,
    )
    setattr(record, _FIELDS_ATTR, f)
    return f


def _exc_text(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        if not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        return record.exc_text
    return record.exc_text or None


def entry_of(record: logging.LogRecord, seq: int = 0, node: str | None = None) -> LogEntry:
    """`record` as a `LogEntry`; `node` when the record's context names none."""
    f = _fields(record)
    return LogEntry(
        seq=seq,
        time=record.created,
        level=record.levelname,
        logger=record.name,
        message=record.getMessage(),
        node=f.node or node,
        request_id=f.request_id,
        trace_id=f.trace_id,
        slice=f.slice,
        instance=f.instance,
        exc=_exc_text(record),
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC, milliseconds), level, logger, message, node
    (the record's, else `node_id`), then request_id, trace_id, slice, instance and exc when known."""

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        f = _fields(record)
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, object] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": f.node or self.node_id,
        }
        for key, value in (
            ("request_id", f.request_id),
            ("trace_id", f.trace_id),
            ("slice", f.slice),
            ("instance", f.instance),
            ("exc", _exc_text(record)),
        ):
            if value is not None:
                out[key] = value
        return self._encoder.encode(out).decode()


def parse_level(text: str | None) -> int:
    """The level number of a name (``debug`` ... ``critical``, any case); 0 for None or empty.
    ValueError naming the choices otherwise."""
    if not text:
        return 0
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise ValueError(f"level must be one of {', '.join(LEVELS)} (got {text!r})")
    return level


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_since(text: str, now: float | None = None) -> float:
    """The epoch time `text` names: a duration back from `now` (``300``, ``90s``, ``5m``, ``2h``,
    ``1d``), an epoch timestamp (a number from 1e9 on) or an ISO 8601 time (UTC unless it has an
    offset). ValueError saying what is accepted otherwise."""
    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m:
        value = float(m[1])
        if m[2] is None and value >= 1e9:
            return value  # an epoch timestamp
        return now - value * _UNIT[m[2]]
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since must be a duration (300, 90s, 5m, 2h, 1d), an epoch timestamp or an ISO 8601 "
            f"time (got {text!r})"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def matches_slice(value: str | None, wanted: str) -> bool:
    """True when the slice coordinates `value` (``group:artifact:version``) are those `wanted`
    names: the same coordinates, ``group:artifact`` (any version) or the artifact name alone."""
    if value is None:
        return False
    if value == wanted:
        return True
    if ":" in wanted:
        return value.startswith(wanted + ":")
    parts = value.split(":")
    return len(parts) >= 2 and parts[1] == wanted


class LogBuffer(logging.Handler):
    """The recent log records of node `node_id`, bounded by `max_records` and about `max_bytes`
    (the oldest go first). Add it to the root logger (`attach`); it keeps the records emitted in
    the node's context (`current_node_id`), and records with no node in their context whose logger
    name ends with ``.node_id``, or any such record when `claim_all` (one node per process).
    Thread-safe: slice threads log into it."""

    def __init__(
        self,
        node_id: str,
        *,
        max_records: int = DEFAULT_BUFFER_RECORDS,
        max_bytes: int = DEFAULT_BUFFER_BYTES,
        claim_all: bool = False,
    ) -> None:
        super().__init__(logging.DEBUG)
        if max_records < 1 or max_bytes < 1:
            raise ValueError("a log buffer must hold at least one record and one byte")
        self.node_id = node_id
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.claim_all = claim_all
        self._entries: deque[tuple[LogEntry, int]] = deque()
        self._bytes = 0
        self._seq = itertools.count(1)
        self.last_seq = 0
        self.evicted = 0  # records dropped to stay within the bounds, since creation

    # -- logging -------------------------------------------------------------------------------

    def accepts(self, record: logging.LogRecord) -> bool:
        node = _fields(record).node
        if node is not None:
            return node == self.node_id
        return self.claim_all or record.name.endswith("." + self.node_id)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self.accepts(record):
                return
            seq = next(self._seq)
            entry = entry_of(record, seq, self.node_id)
            size = _OVERHEAD + len(entry.message) + len(entry.logger) + len(entry.exc or "")
            self._entries.append((entry, size))
            self._bytes += size
            self.last_seq = seq
            while len(self._entries) > self.max_records or (
                self._bytes > self.max_bytes and len(self._entries) > 1
            ):
                _, gone = self._entries.popleft()
                self._bytes -= gone
                self.evicted += 1
        except Exception:
            self.handleError(record)

    def attach(self, logger: logging.Logger | None = None) -> None:
        """Start keeping records (adds itself to `logger`, default the root logger)."""
        (logger or logging.getLogger()).addHandler(self)

    def detach(self, logger: logging.Logger | None = None) -> None:
        (logger or logging.getLogger()).removeHandler(self)

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes the buffered records are counted as (see `max_bytes`)."""
        return self._bytes

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest record held (last_seq + 1 when empty)."""
        with self.lock or _NoLock():
            return self._entries[0][0].seq if self._entries else self.last_seq + 1

    def query(
        self,
        *,
        since: float | None = None,
        after: int = 0,
        slice: str | None = None,
        level: int = 0,
        limit: int | None = None,
    ) -> list[LogEntry]:
        """The held records, oldest first, emitted at or after `since` (epoch seconds), numbered
        above `after`, of slice `slice` (see `matches_slice`) and at `level` or above; the newest
        `limit` of them."""
        with self.lock or _NoLock():
            if after > 0:  # numbered in order: take the newer end only (a follower's poll)
                newer: list[LogEntry] = []
                for e, _ in reversed(self._entries):
                    if e.seq <= after:
                        break
                    newer.append(e)
                entries = newer[::-1]
            else:
                entries = [e for e, _ in self._entries]
        return select(entries, since=since, after=after, slice=slice, level=level, limit=limit)


def select(
    entries: Iterable[LogEntry],
    *,
    since: float | None = None,
    after: int = 0,
    slice: str | None = None,
    level: int = 0,
    limit: int | None = None,
) -> list[LogEntry]:
    """The `entries` (oldest first) that pass the filters of `LogBuffer.query`; the last `limit`."""
    out = [
        e for e in entries
        if e.seq > after
        and (since is None or e.time >= since)
        and (level <= 0 or _level_no(e.level) >= level)
        and (slice is None or matches_slice(e.slice, slice))
    ]  # fmt: skip
    if limit is not None and len(out) > limit:
        out = out[len(out) - limit :]
    return out


def _level_no(name: str) -> int:
    return logging.getLevelNamesMapping().get(name, 0)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def configure_logging(
    node_id: str, level: str | int = "info", fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Log to `stream` (default stderr) at `level`, in the text or JSON format (`LOG_FORMATS`),
    through one handler on the root logger (unless it already has handlers: then as they are, level
    too).
    Returns the handler in use (the first one)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {fmt!r})")
    root = logging.getLogger()
    if root.handlers:  # set up already (`aether node` before `run_node`, or a test): leave it
        return root.handlers[0]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node_id))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("{node}", node_id)))
    root.addHandler(handler)
    return handler
