"""The main of a slice worker process: ``python -P -m aether.slices.worker --fd N --parent PID``.

Owns what runs inside a worker (docs/slices.md, *Worker processes*): it imports one slice class
with its own `sys.path` (the environment's, plus the slice's code and library directories the node
resolved for this worker, sent in the `Load` message), creates, starts, calls and stops that
class's instances as the node asks over the inherited socket (`aether.slices.workerproto`
frames), forwards the calls slice code makes into the node (`self.call`, proxies, maps: `Up`
messages, answered by the node's invoker and `MapBackend`) and every log record (`Log`).

It exits when the node closes the socket (EOF: the node stopped or died), when the node's process
is gone (a thread polls the parent's pid: slice code that blocks this loop cannot keep an orphan
alive) or on `Shutdown`. Slice code runs on this process's only event loop. Before it begins a
call it records the call's number in the begun record the node shares with it (`workerproto.BEGUN`,
a file descriptor named by ``AETHER_WORKER_BEGUN_FD``), so that when it dies the node knows which
calls in flight never ran.
May import `aether.core`, `aether.slices.*`, msgspec.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import copy
import importlib
import logging
import mmap
import os
import socket
import sys
import threading
import time
from typing import Any

import msgspec

from aether.core.artifact import Artifact
from aether.core.context import current_request_id, enter_call
from aether.core.tracing import current_trace, parse_traceparent, trace_fields
from aether.slices.api import Slice, SliceContext, describe_slice, invoke_entry, type_name
from aether.slices.errors import ResponseTypeError
from aether.slices.workerproto import (
    BEGUN,
    BEGUN_ENV,
    DEFAULT_MAX_FRAME,
    HEALTH_STILL_RUNNING,
    Call,
    Cancel,
    EntryDescription,
    ErrorInfo,
    FrameDecoder,
    Load,
    Log,
    Message,
    Reply,
    RouteDescription,
    Shutdown,
    SliceDescription,
    Up,
    UpReply,
    encode_frame,
    error_info,
    rebuild_error,
)

__all__ = ["main"]

_instance: contextvars.ContextVar[int | None] = contextvars.ContextVar("aether_worker_instance", default=None)


def describe(cls: type[Slice]) -> SliceDescription:
    """The `SliceDescription` of a slice class (`describe_slice` without the types)."""
    info = describe_slice(cls)
    return SliceDescription(
        info.name,
        [EntryDescription(e.name, e.qualname, e.kind, e.doc, e.policy) for e in info.entries.values()],
        [RouteDescription(r.http_method, r.path, r.entry, list(r.path_params), dict(r.bindings))
         for r in info.routes],
        info.doc,
        callable(getattr(cls, "health", None)),
        callable(getattr(cls, "reconfigure", None)),
    )  # fmt: skip


class _Forward(logging.Handler):
    """Sends every record to the node (`Log`), naming the instance whose code emitted it."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__()
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.worker.send_threadsafe(
                Log(record.levelno, record.name, text, _instance.get(), current_request_id.get())
            )
        except Exception:
            self.handleError(record)


class _Invoker:
    """The node's `SliceCaller`, seen from the worker (`Up` ``invoke``)."""

    def __init__(self, worker: _Worker) -> None:
        self._w = worker

    async def invoke(
        self, target: str, method: str, payload: bytes, *, request_id: str | None = None,
        timeout: float | None = None, idempotency_key: str | None = None,
    ) -> bytes:  # fmt: skip
        result = await self._w.up("invoke", [target, method, payload, request_id, timeout, idempotency_key])
        return bytes(result)


class _Maps:
    """The node's `MapBackend`, seen from the worker (`Up` map operations)."""

    def __init__(self, worker: _Worker) -> None:
        self._w = worker

    async def map_get(self, name: str, key: str) -> bytes | None:
        got = await self._w.up("map_get", [name, key])
        return None if got is None else bytes(got)

    async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._w.up("map_put", [name, key, value, ttl])

    async def map_remove(self, name: str, key: str) -> bool:
        return bool(await self._w.up("map_remove", [name, key]))

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, new: bytes | None, *, ttl: float | None = None
    ) -> bool:
        return bool(await self._w.up("map_compare_and_set", [name, key, expected, new, ttl]))

    async def map_keys(self, name: str, prefix: str = "") -> list[str]:
        return [str(k) for k in await self._w.up("map_keys", [name, prefix])]


class _Protocol(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def data_received(self, data: bytes) -> None:
        self.worker.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.done.set()


class _Worker:
    def __init__(self, max_frame: int, begun: mmap.mmap | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        # the begun record shared with the node (workerproto.BEGUN): the highest cid decoded
        self.begun = begun
        self.thread = threading.get_ident()
        self.max_frame = max_frame
        self.decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        # the first frame of a loop turn is written at once, the next ones of that turn together after it
        self.out: list[bytes] = []
        self.batching = False
        self.done = asyncio.Event()
        self.cls: type[Slice] | None = None
        self.artifact: Artifact | None = None
        self.node_id = ""
        self.instances: dict[int, Slice] = {}
        # the slots whose health() runs: one at a time (a cancelled one may run on)
        self.health: set[int] = set()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.ups: dict[int, asyncio.Future[Any]] = {}
        self.next_uid = 0
        self.invoker = _Invoker(self)
        self.maps = _Maps(self)

    # --- sending ------------------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            frame = encode_frame(msg, self.max_frame)
        except Exception as exc:  # too large, or not encodable: answer with the reason instead
            if isinstance(msg, Reply):
                frame = encode_frame(Reply(msg.cid, error=error_info(exc)), self.max_frame)
            else:
                return
        if self.batching:
            self.out.append(frame)
            return
        self.transport.write(frame)
        self.batching = True
        self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        frames, self.out = self.out, []
        self.batching = False
        t = self.transport
        if t is not None and not t.is_closing() and frames:
            t.write(b"".join(frames))

    def send_threadsafe(self, msg: Message) -> None:
        if threading.get_ident() == self.thread:
            self.send(msg)
        else:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.send, msg)

    async def up(self, op: Any, args: list[Any]) -> Any:
        self.next_uid += 1
        uid = self.next_uid
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.ups[uid] = fut
        self.send(Up(uid, op, args, False, *trace_fields(current_trace.get())))
        try:
            return await fut
        except asyncio.CancelledError:
            self.send(Up(uid, op, [], cancel=True))
            raise
        finally:
            self.ups.pop(uid, None)

    # --- receiving ----------------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        try:
            msgs = self.decoder.feed(data)
        except Exception as exc:
            sys.stderr.write(f"aether worker {os.getpid()}: bad frame from the node: {exc}; exiting\n")
            self.done.set()
            return
        for m in msgs:
            if isinstance(m, UpReply):
                fut = self.ups.get(m.uid)
                if fut is not None and not fut.done():
                    if m.error is not None:
                        fut.set_exception(rebuild_error(m.error))
                    else:
                        fut.set_result(m.result)
            elif isinstance(m, Call):
                if self.begun is not None:  # before the task exists: a later cid never ran
                    BEGUN.pack_into(self.begun, 0, 1, m.cid)
                self._spawn(m.cid, self._run(m), m.instance)
            elif isinstance(m, Cancel):
                task = self.tasks.get(m.cid)
                if task is not None:
                    task.cancel()
            elif isinstance(m, Load):
                if self.begun is not None:
                    BEGUN.pack_into(self.begun, 0, 1, m.cid)
                self._spawn(m.cid, self._load(m), None)
            elif isinstance(m, Shutdown):
                self.loop.create_task(self._shutdown(m.stop_timeout))

    def _spawn(self, cid: int, coro: Any, instance: int | None) -> None:
        ctx = contextvars.copy_context()
        ctx.run(_instance.set, instance)
        task = self.loop.create_task(self._guard(cid, coro), context=ctx)
        self.tasks[cid] = task

    async def _guard(self, cid: int, coro: Any) -> None:
        try:
            payload = await coro
        except asyncio.CancelledError:
            self.send(Reply(cid, error=ErrorInfo("CancelledError", "the call was cancelled")))
            return
        except Exception as exc:
            self.send(Reply(cid, error=error_info(exc)))
        except BaseException as exc:  # SystemExit and the like from slice code: contained
            self.send(Reply(cid, error=ErrorInfo(
                "SliceCrashed", f"slice code raised {type(exc).__name__}({exc}); slice code must not exit "
                "the process (the call failed, the worker goes on)",
            )))  # fmt: skip
        else:
            self.send(Reply(cid, payload=payload))
        finally:
            self.tasks.pop(cid, None)

    # --- operations ---------------------------------------------------------------------------------

    async def _load(self, m: Load) -> bytes:
        self.artifact = Artifact.parse(m.artifact)
        self.node_id = m.node_id
        for p in m.paths:
            if p not in sys.path:
                sys.path.append(p)
        importlib.invalidate_caches()
        module_name, _, attr = m.slice_class.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except BaseException as exc:
            raise _Failed(f"{m.artifact}: importing {m.slice_class} in its worker failed: "
                          f"{type(exc).__name__}: {exc}") from None  # fmt: skip
        if not (isinstance(obj, type) and issubclass(obj, Slice)):
            raise _Failed(f"{m.artifact}: {m.slice_class} is not a subclass of aether.slices.Slice")
        self.cls = obj
        return msgspec.msgpack.encode(describe(obj))

    def _config(self, raw: Any) -> Any:
        assert self.cls is not None
        wanted = getattr(self.cls, "config_type", None)
        values = raw if raw is not None else {}
        if wanted is None:
            return copy.deepcopy(values)
        try:
            return msgspec.convert(values, wanted)
        except (msgspec.ValidationError, TypeError) as exc:
            raise _Failed(
                f"the config of {self.artifact} does not fit {type_name(wanted)}: {exc} (its "
                "[slices.NAME.config] table in the blueprint)"
            ) from None

    async def _run(self, m: Call) -> bytes:
        cls, artifact = self.cls, self.artifact
        if cls is None or artifact is None:
            raise _Failed("the worker has no slice loaded")
        iid, slot = m.instance, m.slot
        if m.op == "call":
            obj = self._instance(slot)
            # as in-process (`runtime._call_entry`): the request id and idempotency key in this
            # call's own context, where nested calls derive their keys from it
            enter_call(m.request_id, m.idempotency_key, parse_traceparent(m.traceparent, m.tracestate))
            try:
                return await invoke_entry(obj, m.method, m.payload)
            except ResponseTypeError as exc:  # a bug of the slice: logged, as in-process
                logging.getLogger("aether.slices.worker").error("%s: %s", artifact, exc)
                raise
        if m.op == "start":
            config = self._config(m.config)
            try:
                obj = cls()
            except Exception as exc:
                raise _Failed(
                    f"creating {artifact} instance {iid} failed: {type(exc).__name__}: {exc}"
                ) from exc
            obj.context = SliceContext(
                artifact=artifact, node_id=self.node_id, instance=iid,
                logger=logging.getLogger(f"aether.slice.{artifact.group}.{artifact.artifact}"),
                config=config, invoker=self.invoker, maps=self.maps,
            )  # fmt: skip
            try:
                await obj.start()
            except Exception as exc:
                raise _Failed(
                    f"start() of {artifact} instance {iid} raised {type(exc).__name__}: {exc}"
                ) from exc
            self.instances[slot] = obj
            return b""
        if m.op == "stop":
            inst = self.instances.pop(slot, None)
            if inst is not None:
                await inst.stop()
            return b""
        if m.op == "health":
            # the node cancels a check at its timeout; a health() that swallows the cancellation
            # runs on, and each next check started one more next to it: refused while it runs
            if slot in self.health:
                raise _Failed(HEALTH_STILL_RUNNING)
            obj = self._instance(slot)
            self.health.add(slot)
            try:
                result = await obj.health()  # type: ignore[attr-defined]
            finally:
                self.health.discard(slot)
            if result is None or isinstance(result, bool):
                return msgspec.msgpack.encode(result)
            return msgspec.msgpack.encode(type(result).__name__)
        if m.op == "reconfigure":
            # the hook only: the node decides whether the change is applied (the hook returned
            # within its `reconfigure_timeout`) and then says so (``set_config``). Set here once the
            # hook returned, a hook that swallowed its cancellation at that timeout and returned
            # later gave the instance the config the node had reported not applied.
            obj = self._instance(slot)
            await obj.reconfigure(self._config(m.config))  # type: ignore[attr-defined]
            return b""
        if m.op == "set_config":
            self._instance(slot).context.config = self._config(m.config)
            return b""
        raise _Failed(f"unknown operation {m.op!r}")

    def _instance(self, slot: int) -> Slice:
        obj = self.instances.get(slot)
        if obj is None:
            raise _Failed(f"object {slot} of {self.artifact} is not started in this worker")
        return obj

    async def _shutdown(self, stop_timeout: float) -> None:
        """Stop the instances still started, side by side, each bounded by `stop_timeout` s, then
        exit (`done`). A `stop()` still running then is cancelled and abandoned (the process ends
        under it): awaited one after another with `wait_for`, which waits for the cancelled hook to
        end, a `stop()` that swallowed its cancellation kept the worker from exiting until its node
        sent SIGTERM (and N slow ones took N x `stop_timeout`)."""
        log = logging.getLogger("aether.slices.worker")
        stops: dict[asyncio.Task[None], int] = {}
        for slot in list(self.instances):
            inst = self.instances.pop(slot)
            iid = inst.context.instance
            ctx = contextvars.copy_context()
            ctx.run(_instance.set, iid)
            stops[self.loop.create_task(_stop(inst, iid), context=ctx)] = iid
        if stops:
            _, left = await asyncio.wait(stops, timeout=stop_timeout)
            for task in left:
                task.cancel()
            if left:  # (a stop() that lets its cancellation through runs its clean-up now)
                _, left = await asyncio.wait(left, timeout=SHUTDOWN_CANCEL_GRACE)
            if left:
                log.warning(
                    "stop() of instance(s) %s did not finish within %s s; abandoned, the worker exits",
                    ", ".join(str(stops[t]) for t in sorted(left, key=stops.__getitem__)), stop_timeout,
                )  # fmt: skip
        self.done.set()


SHUTDOWN_CANCEL_GRACE = 0.1  # s a stop() cancelled at shutdown gets to end before the worker exits


async def _stop(inst: Slice, iid: int) -> None:
    try:
        await inst.stop()
    except asyncio.CancelledError:
        raise
    except BaseException:  # (SystemExit too: the worker exits anyway, after the others' stop())
        logging.getLogger("aether.slices.worker").exception("stop() of instance %d failed", iid)


class _Failed(Exception):
    """A failure the worker describes itself (the message is the whole reason)."""


def _watch_parent(parent: int) -> None:
    """Exit when the node's process is gone (even if slice code blocks the event loop)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def _begun_record() -> mmap.mmap | None:
    """Map the begun record the node passed (`BEGUN_ENV`), if it did; start keeping it."""
    raw = os.environ.pop(BEGUN_ENV, None)  # not for the processes slice code starts
    if raw is None:
        return None
    try:
        fd = int(raw)
        record = mmap.mmap(fd, BEGUN.size)
        os.close(fd)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"aether worker {os.getpid()}: begun record {raw!r} unusable: {exc}\n")
        return None
    BEGUN.pack_into(record, 0, 1, 0)
    return record


async def _serve(fd: int, max_frame: int, level: int) -> None:
    sock = socket.socket(fileno=fd)
    worker = _Worker(max_frame, _begun_record())
    root = logging.getLogger()
    root.handlers[:] = [_Forward(worker)]
    root.setLevel(level)
    transport, _ = await worker.loop.connect_accepted_socket(lambda: _Protocol(worker), sock=sock)
    worker.transport = transport
    await worker.done.wait()
    # let the last replies and log records go out, then leave (slice threads must not hold us)
    for _ in range(50):
        if transport.is_closing() or transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.01)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aether.slices.worker")
    ap.add_argument("--fd", type=int, required=True, help="the inherited socket to the node")
    ap.add_argument("--parent", type=int, required=True, help="the node's process id")
    ap.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME)
    ap.add_argument("--log-level", type=int, default=logging.INFO)
    args = ap.parse_args(argv)
    if os.getppid() != args.parent:
        os._exit(3)
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="parent-watch").start()
    # not asyncio.run: once `_serve` returns, its clean-up cancels the tasks left and waits for every
    # one of them to end, and slice code that catches its cancellation and goes on (an abandoned
    # `stop()`) never does: the worker then lived on until its node sent SIGTERM, 2 x stop_timeout
    # later. Nothing is left to clean up here: the process ends at once.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(args.fd, args.max_frame, args.log_level))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
