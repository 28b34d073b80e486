"""Slice worker processes, seen from the node: spawning, talking to and supervising them.

Owns `WorkerHost` (one per artifact the runtime runs out of process, docs/slices.md *Worker
processes*): it starts ``python -P -m aether.slices.worker`` with one end of a Unix socketpair
(`aether.slices.workerproto` frames; nothing listens on a network address), asks it to import the
class (`open`), forwards the runtime's start/stop/call/health/reconfigure operations (`request`),
answers the calls slice code makes into the node (slice-to-slice calls through the node's
`SliceCaller`, map operations through its `MapBackend`) and re-emits the worker's log records on
the node's loggers, naming the slice, the instance and the worker's pid.

Supervision: a worker that exits while it should run fails the calls in flight it had begun with
`WorkerLostMidCall` (503, kind interrupted: they may have partly run, so the invoker retries them on
another instance only for idempotent entries); those it had not begun (the begun record it shares
with the node, `workerproto.BEGUN`, read once it has exited) and calls made while it is down fail
with `WorkerLost`, kind no_instance (they did not run: retried). It is started again after
the delay `RestartPolicy` decides (exponential backoff, bounded); `on_restart` (the runtime) then
starts its instances again. `close` asks the worker to stop the instances still started there and
exit, then sends SIGTERM (after `EXIT_GRACE` s, plus `stop_timeout` if it still had instances to
stop), then SIGKILL (`stop_timeout` s later). The worker exits by itself when the node's
process is gone (socket EOF, parent pid watch), so none is left behind.
May import `aether.core`, `aether.slices.*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import mmap
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from aether.core.errors import KIND_INTERRUPTED, KIND_NO_INSTANCE, WireKind
from aether.core.tracing import current_trace, parse_traceparent
from aether.slices.api import SliceCaller
from aether.slices.errors import SliceError, SliceLoadError
from aether.slices.maps import MapBackend
from aether.slices.workerproto import (
    BEGUN,
    BEGUN_ENV,
    DEFAULT_MAX_FRAME,
    Call,
    Cancel,
    FrameDecoder,
    GiveUp,
    Load,
    Log,
    Message,
    Op,
    RemoteError,
    Reply,
    RestartPolicy,
    Shutdown,
    SliceDescription,
    Up,
    UpReply,
    begun_upto,
    encode_frame,
    error_info,
    rebuild_error,
)

__all__ = ["EXIT_GRACE", "WorkerHost", "WorkerLost", "WorkerLostMidCall", "WorkerSpec"]

# s a worker asked to exit (`WorkerHost.close`) gets before SIGTERM, beyond the stop()s it still runs
EXIT_GRACE = 1.0


def _up_context(m: Up) -> contextvars.Context:
    """The context an `Up` from slice code runs in: its trace context set (docs/invocation.md)."""
    ctx = contextvars.copy_context()
    if m.traceparent:
        trace = parse_traceparent(m.traceparent, m.tracestate)
        if trace is not None:
            ctx.run(current_trace.set, trace)
    return ctx


class WorkerLost(SliceError):
    """The worker process of the instance is not running (it died, or is being restarted), so the
    call was not sent to it: 503, kind no_instance, so the invoker retries the call on another
    instance."""

    status = 503
    wire_kind: ClassVar[WireKind] = KIND_NO_INSTANCE


class WorkerLostMidCall(WorkerLost):
    """The worker process died after the call was sent to it and before it answered: the call may
    have partly run. 503, kind interrupted: the invoker retries it elsewhere only when the entry is
    idempotent (else `IndeterminateOutcome`), as for a call its node stopped mid-run."""

    wire_kind: ClassVar[WireKind] = KIND_INTERRUPTED


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to import one slice: its class and its own `sys.path` additions (the
    slice's code directory, then the library directories resolved for the worker alone)."""

    artifact: str
    slice_class: str
    paths: list[str]
    libraries: dict[str, str] = field(default_factory=dict)  # name -> version, resolved for the worker
    reason: str = ""  # why it runs in a worker (a conflict, or `isolation = "process"`)


class _Protocol(asyncio.Protocol):
    def __init__(self, host: WorkerHost, proc: _Proc) -> None:
        self.host = host
        self.proc = proc

    def data_received(self, data: bytes) -> None:
        self.host._received(self.proc, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.host._lost(self.proc)


@dataclass(eq=False)
class _Proc:
    """One OS process of a host (a restart makes a new one)."""

    process: asyncio.subprocess.Process
    decoder: FrameDecoder
    transport: asyncio.Transport | None = None
    pending: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    ups: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    started: float = 0.0
    # the objects started there and not asked to stop since (what a `Shutdown` still has to stop)
    live: set[int] = field(default_factory=set)
    # the first frame of a loop turn is written at once, the next ones of that turn together after it
    out: list[bytes] = field(default_factory=list)
    batching: bool = False
    # the begun record shared with the worker (workerproto.BEGUN); None: none (every call in
    # flight when it dies may have run), or already read
    begun: mmap.mmap | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


def _begun_record() -> tuple[int, mmap.mmap] | None:
    """A zeroed file of `BEGUN.size` bytes (memfd where there is one) and this process's mapping of
    it; None if the system refuses (the worker then runs without: nothing is known of its calls)."""
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("aether-worker-begun", os.MFD_CLOEXEC)
        else:
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
    except OSError:
        return None
    try:
        os.ftruncate(fd, BEGUN.size)
        return fd, mmap.mmap(fd, BEGUN.size)
    except (OSError, ValueError):
        os.close(fd)
        return None


class WorkerHost:
    """One supervised worker process for one artifact (see the module docstring).

    `on_restart` is awaited after a restarted worker loaded the class again (the runtime starts the
    instances it had there); `on_gone(reason)` is called when the policy gives up.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        node_id: str,
        invoker: SliceCaller,
        *,
        maps: MapBackend | None = None,
        logger: logging.Logger | None = None,
        policy: RestartPolicy | None = None,
        stop_timeout: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_restart: Callable[[], Awaitable[None]] | None = None,
        on_gone: Callable[[str], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.spec = spec
        self.node_id = node_id
        self.invoker = invoker
        self.maps = maps
        self.log = logger or logging.getLogger("aether.slices.workers")
        self.policy = policy or RestartPolicy()
        self.stop_timeout = stop_timeout
        self.max_frame = max_frame
        self.on_restart = on_restart
        self.on_gone = on_gone
        self.python = python
        self.description: SliceDescription | None = None
        self.restarts = 0
        self.failed: str | None = None  # set when the policy gave up
        self._proc: _Proc | None = None
        self._loaded: _Proc | None = None  # the process that has the class imported
        self._ready = False
        self._closing = False
        self._next_cid = 0
        self._supervisor: asyncio.Task[None] | None = None

    # --- state --------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker's process id (None while none runs)."""
        return self._proc.pid if self._proc is not None and self._proc.process.returncode is None else None

    @property
    def ready(self) -> bool:
        """True while a worker runs with the class loaded (and, after a restart, its instances started)."""
        return self._ready and self._proc is not None

    # --- starting -----------------------------------------------------------------------------------

    async def open(self) -> SliceDescription:
        """Start the worker and import the class there; `SliceLoadError(reason)` if it cannot."""
        try:
            await self._spawn_and_load()
        except BaseException:
            await self._kill()
            raise
        assert self.description is not None
        self._ready = True
        return self.description

    async def _spawn_and_load(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        record = _begun_record()
        try:
            cmd = [self.python, "-P", "-m", "aether.slices.worker", "--fd", str(child.fileno()),
                   "--parent", str(os.getpid()), "--max-frame", str(self.max_frame),
                   "--log-level", str(self.log.getEffectiveLevel())]  # fmt: skip
            fds: tuple[int, ...] = (child.fileno(),)
            env: dict[str, str] | None = None
            if record is not None:  # an environment variable: a worker that does not know it runs
                fds, env = (child.fileno(), record[0]), {**os.environ, BEGUN_ENV: str(record[0])}
            try:
                process = await asyncio.create_subprocess_exec(
                    *cmd, pass_fds=fds, env=env, stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,  # a signal to the node's terminal group is the node's, not ours
                )  # fmt: skip
            except OSError as exc:
                raise SliceLoadError(
                    f"{self.spec.artifact}: starting its worker process failed: {exc}"
                ) from None
        finally:
            child.close()
            if record is not None:
                os.close(record[0])  # the mappings stay
        proc = _Proc(process, FrameDecoder(self.max_frame), started=time.monotonic())
        if record is not None:
            proc.begun = record[1]
        self._proc = proc
        self.policy.started(proc.started)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(lambda: _Protocol(self, proc), sock=parent)
        proc.transport = transport
        watcher = loop.create_task(self._watch(proc))
        watcher.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        try:
            payload = await self._ask(proc, lambda cid: Load(
                cid, self.spec.artifact, self.node_id, self.spec.slice_class, self.spec.paths
            ))  # fmt: skip
        except RemoteError as exc:
            raise SliceLoadError(str(exc)) from None
        except WorkerLost as exc:
            raise SliceLoadError(
                f"{self.spec.artifact}: its worker process exited while loading ({exc})"
            ) from None
        self.description = msgspec.msgpack.decode(payload, type=SliceDescription)
        self._loaded = proc
        self.log.info(
            "%s: %s runs in worker process %d (%s)",
            self.node_id,
            self.spec.artifact,
            proc.pid,
            self.spec.reason or "isolated",
        )

    # --- requests -----------------------------------------------------------------------------------

    async def request(
        self,
        op: Op,
        instance: int,
        slot: int,
        *,
        method: str = "",
        payload: bytes = b"",
        request_id: str | None = None,
        config: Any = None,
        idempotency_key: str | None = None,
        trace: tuple[str, str] = ("", ""),
    ) -> bytes:
        """Run `op` on `instance` in the worker; errors come back rebuilt (`RemoteError`, same kind
        and status as raised there) or as `WorkerLost` when the worker is not there to answer."""
        proc = self._proc
        # a restarted worker takes its instances' starts before it takes calls (`on_restart`)
        if proc is None or not (self._ready or (op == "start" and self._loaded is proc)):
            why = self.failed or "it is being restarted"
            raise WorkerLost(f"the worker of {self.spec.artifact} on {self.node_id} is not running: {why}")
        # `live`: a start may have started the object there unless the worker said it failed; once
        # asked to stop, its stop() is the worker's business (and bounded there) whatever comes back
        if op == "start":
            proc.live.add(slot)
        elif op == "stop":
            proc.live.discard(slot)
        try:
            return await self._ask(
                proc,
                lambda cid: Call(
                    cid, op, instance, slot, method, payload, request_id, config, idempotency_key, *trace
                ),
            )
        except RemoteError:
            if op == "start":
                proc.live.discard(slot)
            raise

    async def _ask(self, proc: _Proc, make: Callable[[int], Load | Call]) -> bytes:
        self._next_cid += 1
        cid = self._next_cid
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        proc.pending[cid] = fut
        try:
            self._send(proc, make(cid))
            return await fut
        except asyncio.CancelledError:
            if proc.pending.get(cid) is fut:
                with contextlib.suppress(Exception):
                    self._send(proc, Cancel(cid))
            raise
        finally:
            proc.pending.pop(cid, None)

    def _send(self, proc: _Proc, msg: Message) -> None:
        t = proc.transport
        if t is None or t.is_closing():
            raise WorkerLost(f"the worker of {self.spec.artifact} on {self.node_id} has gone")
        frame = encode_frame(msg, self.max_frame)
        if proc.batching:
            proc.out.append(frame)
            return
        t.write(frame)
        proc.batching = True
        asyncio.get_running_loop().call_soon(self._flush, proc)

    @staticmethod
    def _flush(proc: _Proc) -> None:
        frames, proc.out = proc.out, []
        proc.batching = False
        t = proc.transport
        if t is not None and not t.is_closing() and frames:
            t.write(b"".join(frames))

    # --- receiving ----------------------------------------------------------------------------------

    def _received(self, proc: _Proc, data: bytes) -> None:
        try:
            msgs = proc.decoder.feed(data)
        except Exception as exc:
            self.log.error(
                "%s: worker %d of %s sent a bad frame (%s); killing it",
                self.node_id,
                proc.pid,
                self.spec.artifact,
                exc,
            )
            if proc.transport is not None:
                proc.transport.abort()
            with contextlib.suppress(ProcessLookupError):
                proc.process.kill()
            return
        for m in msgs:
            if isinstance(m, Reply):
                fut = proc.pending.get(m.cid)
                if fut is None or fut.done():
                    continue
                if m.error is not None:
                    fut.set_exception(rebuild_error(m.error))
                else:
                    fut.set_result(m.payload)
            elif isinstance(m, Log):
                self._log_record(proc, m)
            elif isinstance(m, Up):
                if m.cancel:
                    task = proc.ups.pop(m.uid, None)
                    if task is not None:
                        task.cancel()
                else:
                    proc.ups[m.uid] = asyncio.get_running_loop().create_task(
                        self._up(proc, m), context=_up_context(m)
                    )

    def _log_record(self, proc: _Proc, m: Log) -> None:
        who = f"{self.spec.artifact}" + (f" instance {m.instance}" if m.instance is not None else "")
        logging.getLogger(m.logger).log(
            m.level,
            "%s (worker %d on %s): %s",
            who,
            proc.pid,
            self.node_id,
            m.message,
            extra={
                "aether_node": self.node_id,
                "aether_slice": str(self.spec.artifact),
                "aether_instance": m.instance,
                "aether_request_id": m.request_id,
            },
        )

    async def _up(self, proc: _Proc, m: Up) -> None:
        try:
            result = await self._run_up(m)
        except asyncio.CancelledError:
            return
        except Exception as exc:
            reply = UpReply(m.uid, error=error_info(exc))
        else:
            reply = UpReply(m.uid, result=result)
        finally:
            proc.ups.pop(m.uid, None)
        with contextlib.suppress(Exception):
            self._send(proc, reply)

    async def _run_up(self, m: Up) -> Any:
        a = m.args
        if m.op == "invoke":
            target, method, payload, rid, timeout, ikey = a
            if ikey is None:  # a SliceCaller need not take the keyword when there is no key
                return await self.invoker.invoke(
                    target, method, bytes(payload), request_id=rid, timeout=timeout
                )
            return await self.invoker.invoke(
                target, method, bytes(payload), request_id=rid, timeout=timeout, idempotency_key=ikey
            )
        maps = self.maps
        if maps is None:
            raise SliceError("this node's runtime has no distributed map")
        if m.op == "map_get":
            return await maps.map_get(a[0], a[1])
        if m.op == "map_put":
            await maps.map_put(a[0], a[1], bytes(a[2]), ttl=a[3])
            return None
        if m.op == "map_remove":
            return await maps.map_remove(a[0], a[1])
        if m.op == "map_compare_and_set":
            exp = None if a[2] is None else bytes(a[2])
            new = None if a[3] is None else bytes(a[3])
            return await maps.map_compare_and_set(a[0], a[1], exp, new, ttl=a[4])
        if m.op == "map_keys":
            return await maps.map_keys(a[0], a[1])
        raise SliceError(f"unknown call {m.op!r} from a worker")

    def _lost(self, proc: _Proc) -> None:
        """The socket closed, or the process exited: nothing in flight will be answered.

        A call the worker never began (its cid is beyond the begun record: it was still in the
        socket, or not even written) did not run: `WorkerLost` (kind no_instance, retried like a
        call that found no worker). Any other may have partly run: `WorkerLostMidCall`. The record
        is read once the process has exited (`_watch`), when the worker can begin nothing more;
        a socket that closes first leaves the calls waiting until then."""
        if self._proc is proc:
            self._ready = False  # calls fail fast (retryable) until the restart is done
        for task in proc.ups.values():
            task.cancel()
        if proc.begun is not None and proc.process.returncode is None:
            return
        upto: int | None = None
        if proc.begun is not None:
            upto = begun_upto(proc.begun[: BEGUN.size])
            proc.begun.close()
            proc.begun = None
        for cid, fut in proc.pending.items():
            if fut.done():
                continue
            if upto is not None and cid > upto:
                fut.set_exception(WorkerLost(
                    f"the worker process {proc.pid} of {self.spec.artifact} on {self.node_id} exited "
                    "before it began the call; the call did not run"
                ))  # fmt: skip
            else:
                fut.set_exception(WorkerLostMidCall(
                    f"the worker process {proc.pid} of {self.spec.artifact} on {self.node_id} exited "
                    "before it answered; the call may have partly run"
                ))  # fmt: skip

    # --- supervision --------------------------------------------------------------------------------

    async def _watch(self, proc: _Proc) -> None:
        code = await proc.process.wait()
        if proc.transport is not None:
            proc.transport.abort()
        self._lost(proc)
        if self._closing or self._proc is not proc:
            return
        self._ready = False
        why = f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
        decision = self.policy.died(time.monotonic(), why)
        if isinstance(decision, GiveUp):
            self.failed = f"the worker of {self.spec.artifact} on {self.node_id}: {decision.reason}"
            self._proc = None
            self.log.error("%s", self.failed)
            if self.on_gone is not None:
                self.on_gone(self.failed)
            return
        self.log.warning(
            "%s: the worker process %d of %s died (%s); restarting it in %.2f s (attempt %d)",
            self.node_id,
            proc.pid,
            self.spec.artifact,
            why,
            decision.delay,
            decision.attempt,
        )
        self._supervisor = asyncio.get_running_loop().create_task(self._restart(decision.delay))

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closing:
            return
        try:
            await self._spawn_and_load()
            if self.on_restart is not None:
                await self.on_restart()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning(
                "%s: restarting the worker of %s failed: %s", self.node_id, self.spec.artifact, exc
            )
            proc = self._proc
            if proc is not None and proc.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()  # its watcher decides again (backoff)
            return
        self.restarts += 1
        self._ready = True
        self.log.info(
            "%s: the worker of %s runs again (process %d)", self.node_id, self.spec.artifact, self.pid or 0
        )

    # --- stopping -----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Ask the worker to stop its instances and exit; SIGTERM if it has not exited after
        `EXIT_GRACE` s (plus `stop_timeout`, the worker's bound on the `stop()`s, when objects are
        still started there), then SIGKILL `stop_timeout` s later. Objects the node asked to stop
        already (`request("stop")`: the runtime stops every instance before it unloads) leave the
        worker nothing to wait for: one still there after the grace is held by slice code the node
        has abandoned (a `stop()` blocking its loop), so it did not get 2 x `stop_timeout` more."""
        self._closing = True
        self._ready = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            self._send(proc, Shutdown(self.stop_timeout))
        if await self._wait(proc, EXIT_GRACE + (self.stop_timeout if proc.live else 0.0)):
            return
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(signal.SIGTERM)
        if await self._wait(proc, self.stop_timeout):
            return
        self.log.warning(
            "%s: worker %d of %s ignored SIGTERM; killing it", self.node_id, proc.pid, self.spec.artifact
        )
        await self._kill()

    async def _wait(self, proc: _Proc, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(proc.process.wait()), timeout)
            return True
        except TimeoutError:
            return False

    async def _kill(self) -> None:
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.process.kill()
        await proc.process.wait()
        if proc.transport is not None:
            proc.transport.abort()


def worker_paths(code_dir: Path, library_dirs: list[Path]) -> list[str]:
    """A worker's `sys.path` additions: the slice's code first, then its libraries."""
    return [str(code_dir), *(str(p) for p in library_dirs)]
