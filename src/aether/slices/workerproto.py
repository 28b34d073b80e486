"""The protocol between a node and its slice worker processes, and the supervisor's decisions (sans-IO).

Owns the messages (`msgspec.Struct`s, MessagePack) that cross the node <-> worker socket, their
framing (4-byte big-endian length, then the message; `FrameDecoder` refuses a frame larger than its
bound), the portable form of an error (`ErrorInfo`: its kind, status and text, so an error raised
in a worker reaches the node's invoker with the same kind and status as in-process, and back the
other way for calls slice code makes into the node: `error_info`, `rebuild_error`) and
`RestartPolicy`, the deterministic rule that decides when a dead worker is started again.

Nothing here does I/O, sleeps or reads a clock: the node's adapter (`aether.slices.workers`) and the
worker's main (`aether.slices.worker`) feed it bytes and times. docs/slices.md, *Worker processes*.
May import `aether.core` and msgspec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec

from aether.core.errors import KIND_APP_ERROR, AetherError, kind_status
from aether.core.policy import DEFAULT_POLICY, EntryPolicy

__all__ = [
    "BEGUN",
    "BEGUN_ENV",
    "DEFAULT_MAX_FRAME",
    "HEALTH_STILL_RUNNING",
    "Call",
    "Cancel",
    "ErrorInfo",
    "FrameDecoder",
    "FrameTooLarge",
    "GiveUp",
    "Load",
    "Log",
    "Message",
    "RemoteError",
    "Reply",
    "Restart",
    "RestartPolicy",
    "Shutdown",
    "SliceDescription",
    "Up",
    "UpReply",
    "begun_upto",
    "encode_frame",
    "error_info",
    "rebuild_error",
]

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
"""The largest message either side accepts (bytes after the length prefix)."""

HEALTH_STILL_RUNNING = (
    "health() is still running from an earlier check (it ignored its cancellation at the timeout); "
    "no new check starts until it ends"
)
"""The reason of a failed health check while the instance's previous `health()` has not ended (the
node's runtime for slices in-process, the worker for its own)."""

_HEADER = struct.Struct(">I")

BEGUN_ENV = "AETHER_WORKER_BEGUN_FD"
"""The environment variable naming the file descriptor of a worker's *begun* record: a small file
(memfd) that the node creates, maps and passes to the worker, and the worker maps too."""

BEGUN = struct.Struct("<QQ")
"""The begun record: (1 once the worker keeps it, the highest `cid` of a `Load` or `Call` the worker
has decoded). The worker writes it before it creates the task that runs the message, so a message
with a greater cid was certainly not begun: slice code never ran for it. Shared memory rather than a
message: the record is read only when the worker died, and costs the worker a store per call, not a
write to the socket and a wake-up of the node. A worker that does not know the record (an older
installation) leaves it zero: then nothing is known, and every call in flight may have run."""


def begun_upto(record: bytes) -> int | None:
    """The highest cid the worker began, from the bytes of its begun record (None: not kept)."""
    if len(record) < BEGUN.size:
        return None
    kept, cid = BEGUN.unpack_from(record)
    return cid if kept == 1 else None


# --- messages -----------------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True):
    """An exception in portable form: `kind` is its invoke response kind (`wire_kind_of`), `status`
    its HTTP status (if any), `type_name` and `message` what `describe_exception` shows, `detail` the
    short text an HTTP client reads (if it has one), `headers` its `http_headers()`."""

    type_name: str
    message: str
    kind: str = KIND_APP_ERROR
    status: int | None = None
    detail: str | None = None
    headers: dict[str, str] = {}


class RouteDescription(msgspec.Struct, frozen=True):
    http_method: str
    path: str
    entry: str
    path_params: list[str]
    bindings: dict[str, str]


class EntryDescription(msgspec.Struct, frozen=True):
    name: str
    qualname: str
    kind: Literal["none", "request", "params"]
    doc: str | None = None
    # the policy declared in code (`@entry(idempotent=False, ...)`): without it the node published
    # the defaults for a slice in a worker, and a call its worker died under was run again
    policy: EntryPolicy = DEFAULT_POLICY


class SliceDescription(msgspec.Struct, frozen=True):
    """What the node needs to know of a class loaded in a worker (its `SliceInfo` without the types)."""

    name: str
    entries: list[EntryDescription]
    routes: list[RouteDescription]
    doc: str | None = None
    has_health: bool = False
    has_reconfigure: bool = False


# node -> worker


class Load(msgspec.Struct, frozen=True, tag="load"):
    """Import the slice class (`module:Qual.Name`) with `paths` added to `sys.path`; answered by a
    `Reply` whose payload is an encoded `SliceDescription`."""

    cid: int
    artifact: str
    node_id: str
    slice_class: str
    paths: list[str]


Op = Literal["start", "stop", "call", "health", "reconfigure", "set_config"]


class Call(msgspec.Struct, frozen=True, tag="call"):
    """Run `op` on the object `slot` (instance id `instance`): ``start`` creates and starts it with
    `config`, ``call`` runs entry `method` with `payload`, ``stop``/``health``/``reconfigure`` call
    those hooks (``reconfigure`` leaves `context.config` as it is), ``set_config`` sets `config` as
    the object's `context.config` (the node applies a reconfigure so once its hook returned in
    time). A slot names one object: a restarted instance (a new config) gets a new one while
    the old object with the same instance id drains."""

    cid: int
    op: Op
    instance: int
    slot: int
    method: str = ""
    payload: bytes = b""
    request_id: str | None = None
    config: Any = None
    idempotency_key: str | None = None  # the logical call's key, beside its request id
    traceparent: str = ""  # the call's W3C trace context, beside them ("" untraced)
    tracestate: str = ""


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """The caller of `cid` stopped waiting."""

    cid: int


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    """Stop every instance still started (side by side, `stop_timeout` s in all: a `stop()` still
    running then is abandoned) and exit."""

    stop_timeout: float = 5.0


class UpReply(msgspec.Struct, frozen=True, tag="upreply"):
    """The node's answer to an `Up` call: `result` (MessagePack-encodable) or `error`."""

    uid: int
    result: Any = None
    error: ErrorInfo | None = None


# worker -> node


class Reply(msgspec.Struct, frozen=True, tag="reply"):
    """The answer to a `Load` or `Call`: `payload` or `error`."""

    cid: int
    payload: bytes = b""
    error: ErrorInfo | None = None


UpOp = Literal["invoke", "map_get", "map_put", "map_remove", "map_compare_and_set", "map_keys"]


class Up(msgspec.Struct, frozen=True, tag="up"):
    """Slice code in the worker calls the node: a slice-to-slice call (``invoke``: args are target,
    method, payload, request id, timeout) or a map operation (the `MapBackend` method's arguments),
    with the W3C trace context of the call being served in the worker ("" untraced)."""

    uid: int
    op: UpOp
    args: list[Any]
    cancel: bool = False
    traceparent: str = ""
    tracestate: str = ""


class Log(msgspec.Struct, frozen=True, tag="log"):
    """A log record emitted in the worker (re-emitted by the node's logger `logger`)."""

    level: int
    logger: str
    message: str
    instance: int | None = None
    request_id: str | None = None  # of the call being served where the record was emitted


Message = Load | Call | Cancel | Shutdown | UpReply | Reply | Up | Log

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class FrameTooLarge(ValueError):
    """A frame announced (or about to be sent) more bytes than the bound."""


def encode_frame(msg: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """The bytes of one frame; `FrameTooLarge` if the message is beyond `max_frame`."""
    body = _encoder.encode(msg)
    if len(body) > max_frame:
        raise FrameTooLarge(f"a {type(msg).__name__} message of {len(body)} bytes exceeds {max_frame} bytes")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, messages out. `feed` raises `FrameTooLarge` for a frame beyond `max_frame` and
    `msgspec.DecodeError` for one that is not a message; the stream is unusable after either."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                raise FrameTooLarge(f"a frame of {size} bytes announced; the limit is {self.max_frame} bytes")
            if n - pos - 4 < size:
                break
            out.append(_decoder.decode(memoryview(buf)[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --- errors across the boundary ------------------------------------------------------------------------


def error_info(exc: BaseException) -> ErrorInfo:
    """`exc` in portable form (its kind by `wire_kind_of`, its status, text and headers)."""
    from aether.core.errors import wire_kind_of

    kind = wire_kind_of(exc)
    status = getattr(exc, "status", None)
    if not (isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599):
        status = None
    detail = getattr(exc, "detail", None)
    headers: dict[str, str] = {}
    get_headers = getattr(exc, "http_headers", None)
    if callable(get_headers):
        try:
            got = get_headers()
            if isinstance(got, dict):
                headers = {str(k): str(v) for k, v in got.items()}
        except Exception:
            headers = {}
    return ErrorInfo(
        type(exc).__name__, str(exc), kind, status, detail if isinstance(detail, str) and detail else None,
        headers,
    )  # fmt: skip


class RemoteError(AetherError):
    """An error raised on the other side of a worker socket, rebuilt: same kind (`response_kind`),
    status, ``detail`` and headers; its class is named like the original (so "TypeName: text"
    reads the same)."""

    info: ErrorInfo
    _KIND: ClassVar[str] = KIND_APP_ERROR

    def __init__(self, info: ErrorInfo) -> None:
        text = info.message
        if kind_status(info.kind) is not None and info.detail:
            text = info.detail  # what a status answer shows (the invoker's error_text uses str())
        super().__init__(text)
        self.info = info
        self.status = info.status
        if info.detail is not None:
            self.detail = info.detail

    def response_kind(self) -> str:
        return self.info.kind

    def http_headers(self) -> dict[str, str]:
        return dict(self.info.headers)


def rebuild_error(info: ErrorInfo) -> RemoteError:
    """A `RemoteError` for `info`, of a class named `info.type_name` (made per call: errors are rare,
    and a cache of classes would be state for no gain)."""
    name = info.type_name if info.type_name.isidentifier() else "RemoteError"
    cls = type(name, (RemoteError,), {"__module__": "aether.slices.worker"})
    return cls(info)


# --- supervision ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the worker again after `delay` s (the `attempt`-th restart in a row)."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop restarting: the worker died `attempts` times in a row, each within `stable` s of its start."""

    reason: str
    attempts: int


class RestartPolicy:
    """When to start a dead worker again: exponential backoff from `base` s, doubling per death in a
    row up to `max_delay` s; a worker that ran `stable` s before it died starts the count afresh;
    after `max_restarts` deaths in a row the supervisor gives up (its instances stay unavailable
    until the artifact is activated again). Times are passed in (seconds, any monotonic clock)."""

    def __init__(
        self, *, base: float = 0.1, max_delay: float = 5.0, stable: float = 30.0, max_restarts: int = 8
    ) -> None:
        if base <= 0 or max_delay < base or stable <= 0 or max_restarts < 1:
            raise ValueError("base > 0, max_delay >= base, stable > 0 and max_restarts >= 1 are required")
        self.base = base
        self.max_delay = max_delay
        self.stable = stable
        self.max_restarts = max_restarts
        self.deaths = 0  # deaths in a row (of a worker that had not run `stable` s)
        self.started_at: float | None = None

    def started(self, now: float) -> None:
        """A worker (re)started at `now`."""
        self.started_at = now

    def died(self, now: float, why: str) -> Restart | GiveUp:
        """The worker died at `now` (`why`: its exit status): what to do."""
        if self.started_at is not None and now - self.started_at >= self.stable:
            self.deaths = 0
        self.deaths += 1
        self.started_at = None
        if self.deaths > self.max_restarts:
            return GiveUp(
                f"the worker died {self.deaths} times in a row (last: {why}); not restarting it again",
                self.deaths,
            )
        delay = min(self.max_delay, self.base * (2 ** (self.deaths - 1)))
        return Restart(delay, self.deaths)
