"""`SliceRuntime`: the per-node slice runtime that the deployment managers drive (docs/slices.md).

Owns, per artifact on one node: the loaded class (through `SliceLoader`), its instance objects,
their `start()`/`stop()` calls, and local entry calls with in-flight counting for draining.
It keeps only the facts it needs to be correct (loaded / active, instance ids); the lifecycle
states, timeouts around each step and the KV bookkeeping are the deployment managers'.

Guarantees (docs/slices.md): `start()` runs once per instance before it receives a call; calls may run
concurrently; `deactivate` stops accepting calls, waits (bounded) for in-flight calls, then awaits
`stop()` once per instance; an instance whose `start()` raised never gets `stop()`.

Blocking work (resolving, unpacking/pip, importing) runs in a worker thread. Slice code (instance
creation, `start()`/`stop()` and calls) runs on the artifact's own loop in its own thread
(`aether.slices.isolation.SliceThread`, created on activation, closed on deactivation), so code
that blocks or exits cannot stop the node's loop; a watchdog reports a slice loop blocked for
more than `block_limit` s to the `on_block` callbacks, naming the entry, and answers that call
with `SliceBlocked`. May import: `aether.core`, `aether.slices.*`.

Capacity (docs/slices.md, *Concurrency limits*): `limits_for(artifact)` gives an artifact's
`SliceLimits`; an instance with limits admits calls through its `capacity.Gate` (run, queue or
refuse with `InstanceOverloaded`), one without pays only a few counter updates. Every instance
keeps its load counters (`instance_loads`). Health (*Health checks*): a class with
`async def health(self)` has it called on every ACTIVE instance every `health_interval` s, on the
slice's own loop, bounded by `health_timeout`, never twice at once for one instance (a health()
that ignored its cancellation at the timeout and runs on fails the next checks, none is started).

Faults (`aether.slices.faults`, for Aether Forge and tests): `inject_fault(artifact, SliceFault)`
marks the instances of the artifact running here at that moment; calls to them wait the fault's
delay, then fail with its error rate (`InjectedFault`), and with ``unhealthy`` their health checks
fail. Instances started later are not affected. `clear_fault`, `faults()`. An instance without a
fault pays one attribute test per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import inspect
import itertools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import msgspec

from aether.core.artifact import Artifact
from aether.core.context import (
    check_call_key,
    child_idempotency_key,
    current_idempotency_key,
    current_instance,
    current_node_id,
    current_slice,
    enter_call,
    exit_call,
)
from aether.core.deadlines import SWEPT_FROM
from aether.core.errors import KIND_BAD_REQUEST, kind_status, wire_kind_of
from aether.core.secrets import ResolvedConfig, redact
from aether.core.tracing import TraceContext, current_trace, trace_fields
from aether.slices._inspect import EntryInfo, RouteInfo
from aether.slices.api import (
    Slice,
    SliceCaller,
    SliceContext,
    SliceInfo,
    current_request_id,
    normalize_target,
    type_name,
)
from aether.slices.capacity import NO_LIMITS, Gate, InstanceLoad, SliceLimits
from aether.slices.errors import (
    InjectedFault,
    InstanceOverloaded,
    InstanceStopping,
    NoLocalInstance,
    ResponseTypeError,
    SliceConflict,
    SliceLoadError,
    SliceStartError,
    SliceStateError,
    UnknownEntry,
)
from aether.slices.faults import SliceFault, should_fail
from aether.slices.isolation import (
    BlockReport,
    DirectHome,
    InlineCalls,
    InlineInvoker,
    InlineLoop,
    NotDirect,
    SharedInvoker,
    SliceThread,
    ThreadInvoker,
    ThreadMaps,
    crashed,
)
from aether.slices.libstore import Installer
from aether.slices.loader import ImportSpace, LoadedSlice, SliceLoader
from aether.slices.maps import MapBackend
from aether.slices.repository import Repository
from aether.slices.workerproto import HEALTH_STILL_RUNNING, RestartPolicy, SliceDescription
from aether.slices.workers import WorkerHost, WorkerLost, WorkerSpec, worker_paths

__all__ = ["CLOSE_UNLOAD_WAIT", "CallRecorder", "InjectedFault", "SliceFault", "SliceRuntime"]


class CallRecorder(Protocol):
    """Where the store reports each entry call it ran (`aether.metrics.EntryMetrics` fits)."""

    def record(self, artifact: str, entry: str, seconds: float, ok: bool, client_error: bool = False) -> None:
        """`artifact` is the full coordinates ``group:artifact:version``; `client_error` (with
        ``ok=False``) says the call was answered with a 4xx (the caller's mistake), not a failure."""
        ...


async def _construct(cls: type[Slice]) -> Slice:
    return cls()


async def _health(hook: Callable[[], Any]) -> Any:
    return await hook()


_T = TypeVar("_T")


def _enter_instance(where: tuple[str, str, int]) -> tuple[Any, Any, Any]:
    """Name the node, slice and instance whose code runs in this task (for its log records,
    aether.core.logs; tasks it starts inherit them); the tokens undo it."""
    return current_node_id.set(where[0]), current_slice.set(where[1]), current_instance.set(where[2])


def _exit_instance(names: tuple[Any, Any, Any]) -> None:
    current_node_id.reset(names[0])
    current_slice.reset(names[1])
    current_instance.reset(names[2])


async def _in_instance(where: tuple[str, str, int], hook: Callable[[], Awaitable[_T]]) -> _T:
    """Run a hook of an instance (`start`, `stop`) naming it (`_enter_instance`), undone after (an
    inline slice's hook runs in the node's task)."""
    names: tuple[Any, Any, Any] | None = _enter_instance(where)
    try:
        return await hook()
    except GeneratorExit:  # closed unfinished (an abandoned hook, collected): not in its context
        names = None
        raise
    finally:
        if names is not None:
            _exit_instance(names)


async def _call_entry(
    obj: Slice, entry: EntryInfo, payload: bytes, request_id: str | None, idempotency_key: str | None,
    trace: TraceContext | None, where: tuple[str, str, int],
) -> bytes:
    # `invoke_entry` for an entry already looked up, in this call's context: the request id,
    # idempotency key and trace context, and for its log records (aether.core.logs) the node, slice
    # and instance (`where`); undone when it returns, for a call run in its caller's task (an inline
    # slice's). (`SliceRuntime._direct` does the same in place.)
    keys = enter_call(request_id, idempotency_key, trace)
    names: tuple[Any, Any, Any] | None = _enter_instance(where)
    try:
        return entry.encode_result(await entry.function(obj, **entry.decode(payload)))
    except GeneratorExit:  # closed unfinished (an abandoned call, collected): not in its context
        names = None
        raise
    finally:
        if names is not None:
            _exit_instance(names)
            exit_call(keys)


async def _noop() -> None:
    return None


def is_client_error(exc: BaseException) -> bool:
    """True when `exc` leaving an entry answers the caller with a 4xx status: a `BadRequest` (the
    payload did not decode, or the entry raised one), a `StatusError` of 400-499 (`NotFound`,
    `Conflict`, ...), or a nested call's 4xx answer the entry let escape (a ``SliceAppError`` with
    a status). Any other error escaping from a nested call is the entry's own failure: decided by the
    kind the error declares (`aether.core.errors.wire_kind_of`, what the invoker reports too).
    """
    kind = wire_kind_of(exc)
    if kind == KIND_BAD_REQUEST:
        return True
    status = kind_status(kind)
    return status is not None and status <= 499


def redact_error(exc: BaseException, secrets: tuple[str, ...]) -> None:
    """Replace the config's secret values in the text of `exc` and of the exceptions chained to it
    (their string `args`, and a `detail`), in place: what an entry raises reaches its HTTP client
    (the problem's detail) and the node's log (its traceback). A driver's "cannot connect to
    postgresql://app:PASSWORD@db" escaping an entry sent the password to the client."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(isinstance(a, str) and any(v and v in a for v in secrets) for a in e.args):
            e.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in e.args)
        detail = getattr(e, "detail", None)
        if isinstance(detail, str) and any(v and v in detail for v in secrets):
            with contextlib.suppress(AttributeError):
                e.detail = redact(detail, secrets)  # type: ignore[attr-defined]
        e = e.__cause__ or e.__context__


async def _remote_entry(*_: Any, **__: Any) -> Any:
    raise SliceStateError("this entry runs in a worker process")


def _info_of(desc: SliceDescription) -> SliceInfo:
    """The node's `SliceInfo` of a class loaded in a worker: names, routes, docs and the entries'
    declared policies (no types: the payloads are decoded and the results encoded in the worker)."""
    routes = [RouteInfo(r.http_method, r.path, r.entry, tuple(r.path_params), dict(r.bindings))
              for r in desc.routes]  # fmt: skip
    entries = {
        e.name: EntryInfo(
            e.name,
            e.qualname,
            e.kind,
            None,
            (),
            None,
            tuple(r for r in routes if r.entry == e.name),
            e.doc,
            _remote_entry,
            e.policy,
        )
        for e in desc.entries
    }
    return SliceInfo(Slice, desc.name, entries, routes, desc.doc)


_NOT_DIRECT = NotDirect(None)


@runtime_checkable
class DirectCaller(Protocol):
    """An invoker that lets calls between slices on the node's shared loop run there directly
    (`aether.invoke.Invoker`'s `direct_ready` and `direct_error`, through the node)."""

    def direct_ready(self, target: str, method: str, timeout: float | None) -> float | None: ...

    def direct_error(
        self, exc: BaseException | None, target: str, method: str, rid: str, *, expired: bool = False
    ) -> Exception | None: ...

# A pure function's cache (like normalize_target's): parsing coordinates on every call was ~10% of
# the HTTP request path.
_parse_artifact = functools.lru_cache(maxsize=1024)(Artifact.parse)


HEALTH_REASON_MAX = 200  # characters of a failed health check's reason that are kept
# s the node's stop (`SliceRuntime.close`) waits for each slice's code to leave the import space
CLOSE_UNLOAD_WAIT = 2.0


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's exception (logged by whoever looked at it, if anyone)."""
    if not fut.cancelled():
        fut.exception()


async def _in_thread(what: str, fn: Callable[..., _T], *args: Any) -> _T:
    """`asyncio.to_thread`, on a daemon thread of its own (named ``aether-slice-WHAT``): for the
    loader's work, which imports slice modules and so runs their top-level code. A module whose
    code blocks held a thread of the loop's default executor for as long, and the node's process
    never exited after its stop (it shuts that executor down, waiting for every thread of it)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():  # (its caller stopped waiting)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result, error = ctx.run(fn, *args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # (the loop is closed: nobody waits any more)
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"aether-slice-{what}", daemon=True).start()
    return await fut


@dataclass(eq=False)
class _Instance:
    id: int
    obj: Slice | None  # None: the object lives in the artifact's worker process (`slot` there)
    inflight: int = 0  # calls running or queued (what draining waits for)
    # direct calls running on the shared loop (`SliceRuntime._direct`): written there only
    direct_inflight: int = 0
    accepting: bool = True
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    secrets: tuple[str, ...] = ()  # the secret values of its config (redacted from reasons)
    gate: Gate | None = None  # admission under limits; None: no limit (no queue)
    # load counters (`InstanceLoad`)
    running: int = 0
    queued: int = 0
    admitted: int = 0
    rejected: int = 0
    calls: int = 0
    failures: int = 0
    busy: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # health
    healthy: bool | None = None
    health_failures: int = 0
    health_reason: str | None = None
    health_task: asyncio.Task[None] | None = None  # the check (on the node's loop), bounded
    # the coroutine of its last health() (in-process): it may run on after the check gave up on it
    # (a hook that swallows its cancellation); no new one starts before it has ended
    health_hook: Coroutine[Any, Any, Any] | None = None
    fault: SliceFault | None = None  # injected (`SliceRuntime.inject_fault`)
    slot: int = 0  # its object's key in the worker process (worker instances only)

    def __post_init__(self) -> None:
        self.idle.set()

    def load(self, artifact: str) -> InstanceLoad:
        return InstanceLoad(
            artifact, self.id, self.running + self.direct_inflight, self.queued, self.admitted,
            self.rejected, self.calls, self.failures, self.busy, self.started, self.healthy,
            self.health_failures, self.health_reason,
        )  # fmt: skip


@dataclass(eq=False)
class _Entry:
    loaded: LoadedSlice
    state: Literal["loaded", "active"] = "loaded"
    instances: dict[int, _Instance] = field(default_factory=dict)
    rr: itertools.count[int] = field(default_factory=itertools.count)
    coords: str = ""  # str(artifact), once: the metrics key (a str caches its hash)
    thread: SliceThread | InlineLoop | None = None  # where its code runs while it is active
    limits: SliceLimits = NO_LIMITS  # from `limits_for`, read on activation and every health round
    worker: WorkerHost | None = None  # its code runs in this worker process instead of `thread`
    has_health: bool = False
    has_reconfigure: bool = False

    def __post_init__(self) -> None:
        self.coords = str(self.loaded.artifact)
        if self.worker is None:
            self.has_health = callable(getattr(self.loaded.cls, "health", None))
            self.has_reconfigure = callable(getattr(self.loaded.cls, "reconfigure", None))

    @property
    def running(self) -> bool:
        """Its code can run: a slice loop (in-process) or a worker that is up."""
        if self.worker is not None:
            return self.state == "active"
        return self.thread is not None


class _Loading:
    """A load under way (`SliceRuntime.load`): its task and how many callers wait for it; `gone` is
    set while none does (all gave up: the load is undone when it ends)."""

    def __init__(self) -> None:
        self.task: asyncio.Future[SliceInfo]
        self.waiting = 0
        self.gone = asyncio.Event()

    def join(self) -> None:
        self.waiting += 1
        self.gone.clear()

    def leave(self) -> None:
        self.waiting -= 1
        if not self.waiting:
            self.gone.set()


class SliceRuntime:
    """Loads, runs and calls the slices of one node.

    `config_for(artifact)` gives each instance's `context.config` (default: `{}`): a mapping, or a
    `ResolvedConfig` whose secret values are redacted from every reason and log line the runtime
    writes about the slice; it may raise (a missing secret): the instance then fails to start with
    that message. A class with a `config_type` gets the config decoded into it. `space` is the
    interpreter's import bookkeeping (default: the process-wide one); `allow_index` lets the
    node install libraries from the package index when the wheelhouse has no match;
    `start_timeout` bounds each `start()` (None: unbounded here, the managers time the step);
    `stop_timeout` bounds each `stop()`, `reconfigure_timeout` each `reconfigure()` hook. `on_block`
    callbacks are told about every slice loop found blocked (more can be appended to `on_block`).
    `recorder` is told about every entry call that ran here — local calls and calls served for
    other nodes alike, since both come through `call` — with its duration (`time.perf_counter`)
    and whether it returned (a call that raised, including a payload that did not decode, or was
    cancelled counts as a failure); the duration of a call that waited for a slot includes its
    time in the queue (what its caller waited).

    `limits_for(artifact)` gives each artifact's `SliceLimits` (default: none), read when it is
    activated and every `health_interval` s (so a re-applied blueprint reaches running instances);
    an exception there is logged and the limits kept. Slices with a `health()` hook have it called
    every `health_interval` s with a `health_timeout` (see the module docstring).

    Worker processes (docs/slices.md, *Worker processes*): an artifact that cannot share this
    interpreter (`SliceConflict`: a library version conflict, or its module already imported from
    another wheel) or whose `isolation_for(artifact)` is ``"process"`` runs in its own supervised
    worker process (`aether.slices.workers.WorkerHost`), at most `max_workers` of them; the rest of
    this class (gates, counters, health, draining, faults) works the same for it. `worker_policy`
    makes the restart policy of each worker.
    """

    def __init__(
        self,
        node_id: str,
        repository: Repository,
        data_dir: Path,
        invoker: SliceCaller,
        *,
        logger: logging.Logger | None = None,
        config_for: Callable[[Artifact], Mapping[str, Any] | ResolvedConfig] | None = None,
        space: ImportSpace | None = None,
        allow_index: bool = False,
        installer: Installer = "auto",
        start_timeout: float | None = None,
        stop_timeout: float = 5.0,
        maps: MapBackend | None = None,
        recorder: CallRecorder | None = None,
        block_limit: float = 0.5,
        on_block: Iterable[Callable[[Artifact, BlockReport], None]] = (),
        limits_for: Callable[[Artifact], SliceLimits] | None = None,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        reconfigure_timeout: float = 5.0,
        isolation_for: Callable[[Artifact], str] | None = None,
        max_workers: int = 8,
        worker_policy: Callable[[], RestartPolicy] = RestartPolicy,
    ) -> None:
        if health_interval <= 0 or health_timeout <= 0 or reconfigure_timeout <= 0:
            raise ValueError(
                "health_interval, health_timeout and reconfigure_timeout must be positive numbers of seconds"
            )
        self.node_id = node_id
        self.block_limit = block_limit
        # told about every slice loop found blocked (the node logs it, counts it, may quarantine)
        self.on_block: list[Callable[[Artifact, BlockReport], None]] = list(on_block)
        self._watchdog: asyncio.Task[None] | None = None
        self.maps = maps
        self.recorder = recorder
        self.repository = repository
        self.data_dir = Path(data_dir)
        self.invoker = invoker
        self._direct_caller = invoker if isinstance(invoker, DirectCaller) else None
        self.log = logger or logging.getLogger("aether.slices.runtime")
        self.config_for = config_for
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.reconfigure_timeout = reconfigure_timeout
        self.loader = SliceLoader(
            node_id, repository, self.data_dir, space=space, allow_index=allow_index, installer=installer
        )
        self._entries: dict[Artifact, _Entry] = {}
        # `_matching` of a str target, per target: every call asks it up to three times (the
        # invoker's choice, `has_room`, `_pick`); emptied whenever an entry is added, removed,
        # activated or deactivated (`_changed`)
        self._match_cache: dict[str, list[_Entry]] = {}
        self._locks: dict[Artifact, asyncio.Lock] = {}
        self._loading: dict[Artifact, _Loading] = {}  # loads under way (`load`), by artifact
        self._closes = 0  # how many times `close` began (a load it did not see checks it)
        self._retiring: set[asyncio.Future[None]] = set()  # replaced instances being drained and stopped
        self.limits_for = limits_for
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self._health: asyncio.Task[None] | None = None
        self._faults: dict[Artifact, SliceFault] = {}  # injected faults (`inject_fault`)
        self._fault_rng = random.Random()
        if max_workers < 0:
            raise ValueError("max_workers must be >= 0")
        self.isolation_for = isolation_for
        self.max_workers = max_workers
        self.worker_policy = worker_policy
        self._workers_reserved = 0  # worker processes running or being started for a load
        self._slots = itertools.count(1)  # never reused: names an instance object in a worker
        # the node's shared slice loop (``isolation = "shared"``) and the artifacts whose code runs there
        self._shared: SliceThread | None = None
        self._inline: InlineCalls | None = None  # the node's loop as home of direct calls (inline slices)
        self._shared_users: set[Artifact] = set()

    def _lock(self, artifact: Artifact) -> asyncio.Lock:
        lock = self._locks.get(artifact)
        if lock is None:
            lock = self._locks[artifact] = asyncio.Lock()
        return lock

    # --- lifecycle ----------------------------------------------------------------------------------

    async def load(self, artifact: Artifact) -> SliceInfo:
        """Resolve the wheel, install its code and libraries, import and describe the class.

        Idempotent. Raises `SliceLoadError(reason)`; also when `close` began while it loaded (it is
        then unloaded at once, its worker process stopped: `close` knew nothing of it).

        The work runs as a task of its own (`_Loading`), which the callers of `load` wait for: a
        caller that stops waiting (the load step's deadline) does not stop an import under way (it
        runs on a thread; nothing can interrupt it), and a later load of the artifact waits for the
        same one. When its last caller has given up, the load is undone as soon as it ends (the
        slice leaves the import space; a worker process still starting is stopped at once), so
        nothing stays loaded that the runtime does not know of.
        """
        closes = self._closes
        job = self._loading.get(artifact)
        if job is None:
            job = self._loading[artifact] = _Loading()
            job.task = asyncio.ensure_future(self._load_job(artifact, job))
            job.task.add_done_callback(_consume)
        job.join()
        try:
            info = await asyncio.shield(job.task)
        finally:
            job.leave()
        if self._closes != closes:
            try:
                await self._unload(artifact, CLOSE_UNLOAD_WAIT)
            except Exception:
                self.log.exception("%s: unloading %s, loaded after the runtime closed, failed",
                                   self.node_id, artifact)  # fmt: skip
            raise SliceLoadError(
                f"{artifact}: the slice runtime of {self.node_id} was closed while it loaded (the node "
                "stops); unloaded"
            )
        return info

    def _abandoned(self, artifact: Artifact) -> SliceLoadError:
        return SliceLoadError(
            f"{artifact}: its load on {self.node_id} was given up by its caller(s) (a deadline); undone"
        )

    async def _load_job(self, artifact: Artifact, job: _Loading) -> SliceInfo:
        """The work of `load` (see there): under the artifact's lock, for as long as it takes; undone
        if every caller has given up by the time it ends."""
        async with self._lock(artifact):
            try:
                e = self._entries.get(artifact)
                if e is not None:
                    return e.loaded.info
                if job.gone.is_set():  # given up while it waited for the lock: nothing to do
                    raise self._abandoned(artifact)
                mode = self._isolation(artifact)
                if mode == "process":
                    e = await self._load_in_worker(artifact, 'its blueprint sets isolation = "process"', job)
                else:
                    try:
                        e = _Entry(await _in_thread(f"load {artifact}", self.loader.load, artifact))
                    except SliceConflict as exc:
                        e = await self._load_in_worker(artifact, exc.reason, job)
            finally:  # from here on, a new load of the artifact is a new job (after this one)
                if self._loading.get(artifact) is job:
                    del self._loading[artifact]
            if job.gone.is_set():  # nobody waits for it any more: undone, under the lock still
                self.log.warning(
                    "%s: the load of %s ended after its caller gave up on it; unloading it",
                    self.node_id, artifact,
                )  # fmt: skip
                await self._release(artifact, e)
                raise self._abandoned(artifact)
            self._entries[artifact] = e
            self._changed()
            where = f" in worker process {e.worker.pid}" if e.worker is not None else ""
            self.log.info("%s: loaded %s (%s)%s", self.node_id, artifact, e.loaded.info.name, where)
            return e.loaded.info

    def _isolation(self, artifact: Artifact) -> str:
        if self.isolation_for is None:
            return "auto"
        try:
            return self.isolation_for(artifact)
        except Exception:
            self.log.exception("%s: reading the isolation of %s failed; using auto", self.node_id, artifact)
            return "auto"

    async def _load_in_worker(self, artifact: Artifact, reason: str, job: _Loading) -> _Entry:
        """Prepare `artifact`'s code and libraries for a worker of its own and start that worker; a
        worker still starting when every caller of the load has given up (`job`) is stopped then."""
        if self._workers_reserved >= self.max_workers:
            raise SliceLoadError(
                f"{artifact} needs a worker process of its own ({reason}), but {self.node_id} already runs "
                f"{self._workers_reserved} worker process(es), its limit (max_workers = {self.max_workers}; "
                "`aether node --max-workers N`)"
            )
        self._workers_reserved += 1
        try:
            code = await asyncio.to_thread(self.loader.prepare_isolated, artifact)
            host = WorkerHost(
                WorkerSpec(str(artifact), code.slice_class, worker_paths(code.code_dir, code.library_dirs),
                           code.libraries, reason),
                self.node_id, self.invoker, maps=self.maps, logger=self.log, policy=self.worker_policy(),
                stop_timeout=self.stop_timeout,
            )  # fmt: skip
            if job.gone.is_set():
                raise self._abandoned(artifact)
            opening = asyncio.ensure_future(host.open())
            gone = asyncio.ensure_future(job.gone.wait())
            try:
                await asyncio.wait({opening, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not opening.done():  # abandoned, or this task cancelled: its process is killed
                    opening.cancel()
                    await asyncio.wait({opening})
            if opening.cancelled():
                raise self._abandoned(artifact)
            desc = opening.result()
        except BaseException:
            self._workers_reserved -= 1
            self.loader.release_isolated(artifact)
            raise
        loaded = LoadedSlice(artifact, Slice, _info_of(desc), code.wheel, code.sha256, code.code_dir,
                             code.libraries)  # fmt: skip
        e = _Entry(loaded, worker=host, has_health=desc.has_health, has_reconfigure=desc.has_reconfigure)
        host.on_restart = functools.partial(self._worker_restarted, e)
        host.on_gone = functools.partial(self._worker_gone, e)
        return e

    async def _worker_restarted(self, e: _Entry) -> None:
        """A worker came back: start its instances again (their counters stay: they live here)."""
        if e.state != "active" or not e.instances:
            return
        raw = self._raw_config(e)
        for inst in list(e.instances.values()):
            if not inst.accepting:
                continue
            inst.slot = next(self._slots)
            try:
                await self._start_in_worker(e, inst.id, inst.slot, raw)
            except SliceStartError as exc:
                self._health_failed(e, inst, f"restarted in a new worker process, start failed: {exc}")

    def _worker_gone(self, e: _Entry, reason: str) -> None:
        for inst in e.instances.values():
            self._health_failed(e, inst, reason)

    async def activate(self, artifact: Artifact, instances: list[int]) -> None:
        """Create one object per instance id, set its context, await `start()` on each.

        All or nothing: if a `start()` raises (or times out), the instances that did start are
        stopped, the artifact stays loaded and `SliceStartError(reason)` is raised (no `stop()` for
        the failed one). On an already active artifact this is `set_instances`.
        """
        async with self._lock(artifact):
            e = self._require(artifact)
            if e.state == "active":
                await self._set_instances(e, instances, 5.0)
                return
            mode = self._isolation(artifact) if e.worker is None else "process"
            if mode == "inline":
                e.thread = InlineLoop(e.coords, logger=self.log)
            elif mode == "shared":
                if self._shared is None:
                    self._shared = SliceThread("shared", block_limit=self.block_limit, logger=self.log,
                                               shared=True)  # fmt: skip
                    self._ensure_watchdog()
                self._shared_users.add(artifact)
                e.thread = self._shared
            elif e.worker is None:
                e.thread = SliceThread(e.coords, block_limit=self.block_limit, logger=self.log)
                self._ensure_watchdog()
            e.limits = self._limits(e)
            try:
                started = await self._start_instances(e, sorted(set(instances)))
            except BaseException:
                await self._close_thread(e)
                raise
            e.instances = {i.id: i for i in started}
            e.state = "active"
            self._changed()
            self._ensure_health()
            self.log.info("%s: activated %s instances %s", self.node_id, artifact, sorted(e.instances))

    async def set_instances(
        self, artifact: Artifact, instances: list[int], *, drain_timeout: float = 5.0
    ) -> None:
        """Scale an ACTIVE artifact to exactly `instances`: start new ids (all or nothing, as in
        `activate`), then drain (up to `drain_timeout` s) and stop the removed ids."""
        async with self._lock(artifact):
            e = self._require(artifact)
            if e.state != "active":
                raise SliceStateError(f"{artifact} is not active on {self.node_id}; activate it first")
            await self._set_instances(e, instances, drain_timeout)

    async def reconfigure(
        self, artifact: Artifact, instance: int, *, drain_timeout: float = 5.0
    ) -> Literal["reloaded", "restarted", "absent"]:
        """Give instance `instance` of the ACTIVE `artifact` the config `config_for` gives now.

        A class with an `async def reconfigure(self, config)` hook keeps its object: the new config
        (decoded like at start) is passed to the hook, then set as `context.config`. Otherwise the
        instance is restarted make-before-break: a new object with the same id is created and
        started, takes the calls, then the old one is drained (up to `drain_timeout` s) and stopped,
        so the instance never stops serving. `SliceStartError` (redacted) if the config does not
        decode, the hook raises or does not return within `reconfigure_timeout` s (it is cancelled,
        and left running if it ignores that) or the new object does not start; the old object then
        still serves.
        """
        async with self._lock(artifact):
            e = self._require(artifact)
            old = e.instances.get(instance) if e.state == "active" else None
            thread = e.thread
            if old is None or not e.running:
                return "absent"
            if e.worker is not None and e.has_reconfigure:
                config, secrets = self._config(e)
                try:
                    await asyncio.wait_for(
                        e.worker.request("reconfigure", instance, old.slot, config=config),
                        self.reconfigure_timeout,
                    )
                except TimeoutError:
                    raise self._reconfigure_timed_out(artifact, instance) from None
                except Exception as exc:
                    raise SliceStartError(
                        redact(f"reconfigure() of {artifact} instance {instance} failed: {exc}", secrets),
                        instance=instance,
                    ) from exc
                # applied: only now does the worker set it as the context's config (a hook that
                # returns after its timeout must not). The message is sent whatever happens to this
                # call from here on, and the worker takes it before anything sent to it later.
                told = asyncio.ensure_future(
                    e.worker.request("set_config", instance, old.slot, config=config)
                )
                told.add_done_callback(_consume)
                done, _ = await asyncio.wait({told}, timeout=self.reconfigure_timeout)
                if not done:
                    self.log.warning(
                        "%s: the worker of %s did not confirm the new config of instance %d within %g s "
                        "(its loop is blocked?); it takes it once its loop runs",
                        self.node_id, artifact, instance, self.reconfigure_timeout,
                    )  # fmt: skip
                elif told.exception() is not None:
                    self.log.warning(
                        "%s: the worker of %s did not take the new config of instance %d: %s",
                        self.node_id, artifact, instance, redact(str(told.exception()), secrets),
                    )  # fmt: skip
                old.secrets = secrets  # (its errors are redacted of the values it has now)
                self.log.info("%s: %s instance %d reconfigured in place", self.node_id, artifact, instance)
                return "reloaded"
            hook = getattr(old.obj, "reconfigure", None)
            if hook is not None and callable(hook) and thread is not None and old.obj is not None:
                config, secrets = self._config(e)
                try:
                    await asyncio.wait_for(
                        thread.hook(
                            hook(config), entry="reconfigure()", owner=e.coords, secrets=secrets + old.secrets
                        ),
                        self.reconfigure_timeout,
                    )
                except TimeoutError:
                    raise self._reconfigure_timed_out(artifact, instance) from None
                except Exception as exc:
                    raise SliceStartError(redact(
                        f"reconfigure() of {artifact} instance {instance} raised {type(exc).__name__}: {exc}",
                        secrets,
                    ), instance=instance) from exc
                old.obj.context = self._context(e, instance, thread, config)
                old.secrets = secrets
                self.log.info("%s: %s instance %d reconfigured in place", self.node_id, artifact, instance)
                return "reloaded"
            new = await self._start_one(e, instance)
            e.instances[instance] = new  # new calls go to the new object from here on
            old.accepting = False
            # the old object is retired even if this call is cancelled now (a step deadline)
            retire = asyncio.ensure_future(self._retire(e, old, drain_timeout))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            await asyncio.shield(retire)
            self.log.info("%s: %s instance %d restarted with its new config", self.node_id, artifact,
                          instance)
            return "restarted"

    def _reconfigure_timed_out(self, artifact: Artifact, instance: int) -> SliceStartError:
        self.log.warning(
            "%s: reconfigure() of %s instance %d did not finish within %g s; cancelled (left running "
            "if it ignores that), the change is not applied", self.node_id, artifact, instance,
            self.reconfigure_timeout,
        )  # fmt: skip
        return SliceStartError(
            f"reconfigure() of {artifact} instance {instance} did not finish within "
            f"{self.reconfigure_timeout:g} s; cancelled",
            instance=instance,
        )

    async def deactivate(self, artifact: Artifact, drain_timeout: float = 5.0) -> None:
        """Stop accepting calls, wait up to `drain_timeout` s for in-flight calls, then `stop()` each
        instance once (errors and timeouts are logged). The artifact stays loaded. Idempotent."""
        await self._deactivate(artifact, drain_timeout)

    async def _deactivate(self, artifact: Artifact, drain_timeout: float, until: float | None = None) -> None:
        """`deactivate`; with `until` (a time of the running loop) the drain ends then instead (no
        later than `drain_timeout` s after it began either way)."""
        async with self._lock(artifact):
            e = self._entries.get(artifact)
            if e is None or e.state != "active":
                return
            insts = list(e.instances.values())
            for i in insts:
                i.accepting = False
            if until is not None:
                drain_timeout = min(drain_timeout, max(0.0, until - asyncio.get_running_loop().time()))
            await self._drain(e.loaded.artifact, insts, drain_timeout)
            await asyncio.gather(*(self._stop_one(e, i) for i in insts))
            await self._close_thread(e)
            e.instances = {}
            e.state = "loaded"  # a worker keeps running with the class loaded until `unload`
            self._changed()
            self.log.info("%s: deactivated %s", self.node_id, artifact)

    async def unload(self, artifact: Artifact) -> None:
        """Forget the class (deactivating first if needed). The slice's code leaves sys.path when no
        other node in this process uses it; library directories stay on sys.path. Idempotent."""
        await self._unload(artifact)

    async def _unload(self, artifact: Artifact, code_wait: float | None = None) -> None:
        """`unload`; with `code_wait`, the wait for the code to leave the import space (which a
        slice whose module's code blocks its import holds) ends after that many seconds."""
        if artifact in self._entries and self._entries[artifact].state == "active":
            await self.deactivate(artifact)
        job = self._loading.get(artifact)
        if artifact not in self._entries and job is not None and job.gone.is_set():
            return  # a load its callers gave up on: it undoes itself when it ends (`load`)
        async with self._lock(artifact):
            e = self._entries.pop(artifact, None)
            if e is None:
                return
            self._changed()
            if await self._release(artifact, e, code_wait):
                where = " (its worker process stopped)" if e.worker is not None else ""
                self.log.info("%s: unloaded %s%s", self.node_id, artifact, where)

    async def _release(self, artifact: Artifact, e: _Entry, code_wait: float | None = None) -> bool:
        """Undo the load of `e` (no longer among the entries): stop its worker process and release
        what was held for it, or take its code out of the import space (waiting `code_wait` s at
        most: False if it did not leave by then)."""
        if e.worker is not None:
            try:
                await e.worker.close()
            finally:
                self._workers_reserved -= 1
                self.loader.release_isolated(artifact)
            return True
        leaving = _in_thread(f"unload {artifact}", self.loader.unload, artifact)
        try:
            await (leaving if code_wait is None else asyncio.wait_for(leaving, code_wait))
        except TimeoutError:
            self.log.warning(
                "%s: the code of %s did not leave the import space within %.1f s (another slice's "
                "load holds it: installing its libraries?); left there, the node goes on",
                self.node_id, artifact, code_wait,
            )  # fmt: skip
            return False
        return True

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Deactivate and unload everything (node shutdown), every artifact at once: their calls
        in flight drain together, within `drain_timeout` s of the start in all (not one drain after
        another: a node with N slices busy would take N drains to stop, past what its supervisor
        waits before it kills it), then every instance's `stop()` runs (each bounded by
        `stop_timeout`), then their loops and worker processes close. So the whole takes at most
        `drain_timeout` + `stop_timeout` + 2 s (a slice loop that does not stop is left to itself
        after 2 s; a worker process, its instances stopped, gets 1 s to exit before SIGTERM, and
        `stop_timeout` more only if it ignores SIGTERM: `WorkerHost.close`), however many slices
        there are. A load still under way then is unloaded when it ends (and fails: `load`)."""
        self._closes += 1  # a load still under way unloads what it loaded when it ends (`load`)
        until = asyncio.get_running_loop().time() + drain_timeout
        await asyncio.gather(*(self._close_one(a, drain_timeout, until) for a in list(self._entries)))
        for task in (self._watchdog, self._health):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watchdog = self._health = None

    async def _close_one(self, artifact: Artifact, drain_timeout: float, until: float) -> None:
        try:
            await self._deactivate(artifact, drain_timeout, until)
        except Exception:
            self.log.exception("%s: deactivating %s while closing failed", self.node_id, artifact)
        try:
            await self._unload(artifact, CLOSE_UNLOAD_WAIT)
        except Exception:
            self.log.exception("%s: unloading %s while closing failed", self.node_id, artifact)

    # --- queries ------------------------------------------------------------------------------------

    def info(self, artifact: Artifact) -> SliceInfo | None:
        e = self._entries.get(artifact)
        return e.loaded.info if e is not None else None

    def state(self, artifact: Artifact) -> Literal["loaded", "active"] | None:
        e = self._entries.get(artifact)
        return e.state if e is not None else None

    def worker_pid(self, artifact: Artifact) -> int | None:
        """The process id of the worker `artifact` runs in (None: it runs in this interpreter, or its
        worker is being restarted)."""
        e = self._entries.get(artifact)
        return e.worker.pid if e is not None and e.worker is not None else None

    def isolation(self, artifact: Artifact) -> Literal["thread", "shared", "inline", "process"] | None:
        """Where `artifact`'s code runs: ``thread`` (this interpreter, its own loop and thread),
        ``shared`` (the node's shared slice loop, while it is active), ``inline`` (on the node's loop,
        while it is active) or ``process`` (a worker process); None if it is not loaded here."""
        e = self._entries.get(artifact)
        if e is None:
            return None
        if e.worker is not None:
            return "process"
        if isinstance(e.thread, InlineLoop):
            return "inline"
        return "shared" if e.thread is not None and e.thread is self._shared else "thread"

    def workers(self) -> dict[Artifact, int | None]:
        """Every artifact that runs in a worker process here, with the worker's pid."""
        return {a: e.worker.pid for a, e in sorted(self._entries.items()) if e.worker is not None}

    def artifacts(self) -> dict[Artifact, str]:
        """Every artifact known here with its state (`loaded` or `active`)."""
        return {a: e.state for a, e in sorted(self._entries.items())}

    def local_instances(self, artifact_name_or_coords: str | Artifact) -> list[int]:
        """Ids of the ACTIVE instances here that accept calls (for `group:artifact`: every version)."""
        return sorted(
            i.id for e in self._matching(artifact_name_or_coords) for i in e.instances.values() if i.accepting
        )

    def instance_loads(self) -> list[InstanceLoad]:
        """Every ACTIVE instance here with its gauges, counters and health, by (artifact, instance)."""
        return [
            i.load(e.coords)
            for _, e in sorted(self._entries.items())
            if e.state == "active"
            for i in sorted(e.instances.values(), key=lambda i: i.id)
        ]

    def limits(self, artifact: Artifact) -> SliceLimits:
        """The limits the instances of `artifact` run under now."""
        e = self._entries.get(artifact)
        return e.limits if e is not None else NO_LIMITS

    def refresh_limits(self) -> None:
        """Read `limits_for` again for every ACTIVE artifact and apply changed limits to its
        instances (waiting calls that now may run are started). Runs every `health_interval` s."""
        for e in list(self._entries.values()):
            if e.state != "active":
                continue
            new = self._limits(e)
            if new == e.limits:
                continue
            self.log.info("%s: %s limits now %s", self.node_id, e.coords, new)
            e.limits = new
            for inst in e.instances.values():
                self._apply_limits(inst, new)


    def has_room(self, target: str | Artifact, method: str) -> bool:
        """True when a local ACTIVE instance of `target` would run a call of `method` at once (an
        instance without limits always would); False when every one is at its concurrency limit
        (the call would queue) or there is none. The invoker sends such calls to other nodes first."""
        for e in self._matching(target):
            if not e.limits.limited:
                return any(i.accepting for i in e.instances.values())
            for i in e.instances.values():
                if i.accepting and (i.gate is None or i.gate.free(method)):
                    return True
        return False

    # --- faults (aether.slices.faults) ---------------------------------------------------------------

    def inject_fault(self, artifact: Artifact, fault: SliceFault) -> list[int]:
        """Give `fault` to the instances of `artifact` running here now (replacing a fault they had);
        returns their ids. Instances started later are healthy. `NoLocalInstance` if none runs here."""
        e = self._entries.get(artifact)
        active = e is not None and e.state == "active"
        insts = [i for i in e.instances.values() if i.accepting] if e is not None and active else []
        if e is None or not insts:
            raise NoLocalInstance(f"no instance of {artifact} runs on {self.node_id}")
        self._faults[artifact] = fault
        for inst in insts:
            inst.fault = fault
        ids = sorted(i.id for i in insts)
        self.log.info("%s: fault injected on %s instances %s: %s", self.node_id, e.coords, ids,
                      fault.describe())
        return ids

    def clear_fault(self, artifact: Artifact) -> bool:
        """Remove the fault of `artifact`'s instances (their health is judged afresh); False if it
        had none."""
        fault = self._faults.pop(artifact, None)
        e = self._entries.get(artifact)
        if e is not None:
            for inst in e.instances.values():
                if inst.fault is None:
                    continue
                if inst.fault.unhealthy and inst.healthy is False:  # the next check decides again
                    inst.healthy, inst.health_failures, inst.health_reason = None, 0, None
                inst.fault = None
        if fault is not None:
            self.log.info("%s: fault on %s cleared", self.node_id, artifact)
        return fault is not None

    def faults(self) -> dict[Artifact, tuple[SliceFault, list[int]]]:
        """Each injected fault with the ids of the instances that still have it (none once they were
        all replaced)."""
        out: dict[Artifact, tuple[SliceFault, list[int]]] = {}
        for artifact, fault in sorted(self._faults.items()):
            e = self._entries.get(artifact)
            ids = sorted(i.id for i in e.instances.values() if i.fault is fault) if e is not None else []
            out[artifact] = (fault, ids)
        return out

    async def _injected(self, e: _Entry, inst: _Instance) -> None:
        """A call to an instance with a fault: wait its delay, then fail it with its error rate."""
        fault = inst.fault
        if fault is not None and fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000.0)
            fault = inst.fault  # cleared meanwhile: the call runs
        if fault is not None and should_fail(fault, self._fault_rng):
            raise InjectedFault(
                f"injected fault: {e.coords} instance {inst.id} on {self.node_id} failed this call on "
                "purpose (fault injection; DELETE /api/v1/faults/slices/... clears it)"
            )

    # --- calls --------------------------------------------------------------------------------------

    async def call(
        self,
        artifact: Artifact | str,
        method: str,
        payload: bytes,
        *,
        instance: int | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        """Invoke `method` on a local ACTIVE instance (round-robin unless `instance` is given).

        `artifact` is coordinates or `group:artifact` (then the highest active version here).
        Raises `NoLocalInstance`, `UnknownEntry`, `EntryBadRequest` (a BadRequest); errors raised by
        the entry itself propagate. `request_id` and `idempotency_key` (default: the caller's
        `current_request_id` / `current_idempotency_key`, which the invoker and invoke server set)
        are set for the entry.
        """
        if request_id is None:
            request_id = current_request_id.get()
        if idempotency_key is None:
            idempotency_key = current_idempotency_key.get()
        trace = current_trace.get()  # the entry's nested calls and map operations carry it on
        e, inst = self._pick(artifact, instance, method)
        entry = e.loaded.info.entries.get(method)
        if entry is None:
            raise UnknownEntry(
                f"{e.loaded.artifact} has no entry {method!r}; "
                f"entries: {', '.join(sorted(e.loaded.info.entries))}"
            )
        gate = inst.gate
        waiting: asyncio.Future[None] | bool = True
        if gate is not None:
            waiting = gate.enter(method)
            if waiting is False:
                inst.rejected += 1
                raise InstanceOverloaded(
                    f"{e.coords} instance {inst.id} on {self.node_id} is at its limit: {gate.running} "
                    f"call(s) running, {gate.queued} queued (max_queue {gate.queue_max}); retry later"
                )
        inst.admitted += 1
        inst.inflight += 1
        inst.idle.clear()
        recorder = self.recorder
        ok = client_error = False
        t_in = perf_counter()
        try:
            if waiting is not True:
                assert gate is not None and not isinstance(waiting, bool)
                inst.queued += 1
                try:
                    await waiting
                except asyncio.CancelledError:
                    gate.abandon(waiting, method)  # the caller is gone: leave the queue
                    raise
                finally:
                    inst.queued -= 1
            thread = e.thread
            worker = e.worker
            if not e.running:  # stopped while this call waited (a drain that timed out)
                if gate is not None:
                    gate.leave(method)
                raise NoLocalInstance(f"{e.coords} instance {inst.id} on {self.node_id} stopped")
            inst.running += 1
            t0 = perf_counter()
            try:
                if inst.fault is not None:
                    await self._injected(e, inst)
                if worker is not None:
                    result = await worker.request(
                        "call", inst.id, inst.slot, method=method, payload=payload,
                        request_id=request_id if request_id is not None else current_request_id.get(),
                        idempotency_key=idempotency_key, trace=trace_fields(trace),
                    )  # fmt: skip
                else:
                    assert thread is not None and inst.obj is not None
                    call = _call_entry(
                        inst.obj, entry, payload, request_id, idempotency_key, trace,
                        (self.node_id, e.coords, inst.id),
                    )
                    result = await thread.run(call, entry=method, owner=e.coords, secrets=inst.secrets)
                ok = True
                return result
            except ResponseTypeError as exc:
                self.log.error("%s: %s: %s", self.node_id, e.coords, exc)
                raise
            except Exception as exc:
                client_error = is_client_error(exc)
                if inst.secrets:
                    redact_error(exc, inst.secrets)
                raise
            finally:
                t1 = perf_counter()
                inst.running -= 1
                inst.calls += 1
                inst.busy += t1 - t0
                if not ok and not client_error:
                    inst.failures += 1
                if gate is not None:
                    gate.leave(method)
                if recorder is not None:
                    recorder.record(e.coords, method, t1 - t_in, ok, client_error)
        finally:
            inst.inflight -= 1
            if inst.inflight == 0:
                inst.idle.set()

    # --- direct calls on the shared loop ------------------------------------------------------------

    async def _direct(
        self, caller: DirectHome, target: str, method: str, payload: bytes, request_id: str | None,
        timeout: float | None, idempotency_key: str | None = None,
    ) -> bytes | NotDirect:
        """On the node's shared slice loop (`caller`, its `SliceThread`) or, between inline slices,
        on the node's loop (`caller`, the runtime's `InlineCalls`): a call slice code there makes to
        a slice that runs on the same loop, run directly in the caller's task (no hop to the node's
        loop and back: `SharedInvoker`; no pass through the invoker: `InlineInvoker`). `NotDirect`
        when it must go the usual way: the target's entry is not on this loop or not resolved here
        yet, runs under concurrency limits or with an injected fault, the
        invoker says no (`direct_ready`: a rollout splits the target, tracing is on, the entry's
        policy has a timeout or retries of its own), or no call is being served (no request id, no
        idempotency key given or to derive from), or the key given is not a valid one; and after an
        error the invoker would retry elsewhere (`direct_error`: the usual way then tries again, with
        the same idempotency key).

        Everything this reads is read-only here (the node's loop writes it); the call's bookkeeping
        (instance counters, metrics) goes to the node's loop with the turn's answers (`post_main`)."""
        found = self._direct_target(caller, target, method)
        invoker = self._direct_caller
        if found is None or invoker is None:
            return _NOT_DIRECT
        limit = invoker.direct_ready(target, method, timeout)
        if limit is None:
            return _NOT_DIRECT
        rid = request_id or current_request_id.get()
        if idempotency_key is not None:  # (`Slice.call` derives it: see `call_slice`)
            if check_call_key(idempotency_key) is not None:
                return _NOT_DIRECT  # the usual way says what is wrong with it
            ikey: str | None = idempotency_key
        else:
            ikey = child_idempotency_key(target, method)
        if rid is None or ikey is None:
            return NotDirect(ikey)
        e, inst, ent = found
        obj = inst.obj
        assert obj is not None
        loop = caller.loop
        task = asyncio.current_task(loop)  # (with the loop: no lookup of the running one, a getpid)
        assert task is not None
        inst.direct_inflight += 1
        named = caller.direct_enter(e.coords, method, task)
        ok = client_error = expired = False
        failure: BaseException | None = None
        t0 = perf_counter()
        # the deadline: a far one (the usual) watched by the loop's sweep, a near one by a timer
        timer = asyncio.timeout(limit) if limit < SWEPT_FROM else None
        watch = caller.deadlines.watch(loop.time() + limit, task) if timer is None else None
        result = b""
        # as `_call_entry` does, in this task (a coroutine fewer per call)
        keys = enter_call(rid, ikey)
        names = _enter_instance((self.node_id, e.coords, inst.id))
        try:
            if timer is None:
                result = ent.encode_result(await ent.function(obj, **ent.decode(payload)))
            else:
                async with timer:
                    result = ent.encode_result(await ent.function(obj, **ent.decode(payload)))
            ok = True
        except asyncio.CancelledError:
            if watch is None or not watch.expired_here():
                raise  # cancelled by someone else (the caller went away)
            expired = True
        except Exception as exc:
            expired = isinstance(exc, TimeoutError) and timer is not None and timer.expired()
            client_error = not expired and is_client_error(exc)
            if inst.secrets:
                redact_error(exc, inst.secrets)
            failure = exc
        except BaseException as exc:  # contained as on a loop of its own (SliceThread._guard)
            failure = crashed(self.log, f"{method} of {e.coords}", exc, inst.secrets)
        finally:
            _exit_instance(names)
            exit_call(keys)
            if watch is not None:
                caller.deadlines.done(watch)
            caller.direct_exit(named)
            inst.direct_inflight -= 1
            caller.post_main(self._direct_done, e, inst, method, perf_counter() - t0, ok, client_error)
        if ok:
            if caller.direct_yield():
                await asyncio.sleep(0)
            return result
        error = invoker.direct_error(failure, target, method, rid, expired=expired)
        if error is None:
            return NotDirect(ikey)
        raise error from failure

    def _direct_target(
        self, caller: DirectHome, target: str, method: str
    ) -> tuple[_Entry, _Instance, EntryInfo] | None:
        """The entry, instance and entry description a direct call from `caller`'s loop runs, if it
        may (see `_direct`).
        Reads only (on the shared loop's thread): a target the node's loop has not resolved yet, or
        state that changes while this reads it, answers None."""
        try:
            found = self._match_cache.get(target)  # filled by the node's loop only
            if not found:
                return None
            e = found[0]
            home: object = e.thread
            if isinstance(home, InlineLoop):
                home = self._inline  # (every inline slice runs on the node's loop)
            if home is not caller or e.state != "active" or e.limits.limited:
                return None
            ent = e.loaded.info.entries.get(method)
            if ent is None:
                return None
            insts = e.instances
            if len(insts) == 1:  # (the usual: one instance per node)
                (inst,) = insts.values()
                if not inst.accepting:
                    return None
            else:
                cands = [i for i in insts.values() if i.accepting]
                if not cands:
                    return None
                inst = cands[next(e.rr) % len(cands)]
        except (RuntimeError, ValueError):  # changed while read (the node's loop started or stopped one)
            return None
        if inst.fault is not None or inst.obj is None:
            return None
        return e, inst, ent

    def _inline_calls(self) -> InlineCalls:
        """The node's loop as the home of direct calls between inline slices (made at first use,
        on the node's loop)."""
        if self._inline is None:
            self._inline = InlineCalls()
        return self._inline

    def _direct_done(
        self, e: _Entry, inst: _Instance, method: str, seconds: float, ok: bool, client_error: bool
    ) -> None:
        """On the node's loop: count a direct call as `call` counts the calls it runs."""
        inst.admitted += 1
        inst.calls += 1
        inst.busy += seconds
        if not ok and not client_error:
            inst.failures += 1
        if self.recorder is not None:
            self.recorder.record(e.coords, method, seconds, ok, client_error)

    # --- internals ----------------------------------------------------------------------------------

    def _require(self, artifact: Artifact) -> _Entry:
        e = self._entries.get(artifact)
        if e is None:
            raise SliceStateError(f"{artifact} is not loaded on {self.node_id}; load it first")
        return e

    def _changed(self) -> None:
        """An entry was added, removed, activated or deactivated: forget `_matching`'s answers."""
        self._match_cache.clear()

    def _matching(self, target: str | Artifact) -> list[_Entry]:
        """The active entries `target` names, highest version first (do not mutate the list)."""
        if isinstance(target, Artifact):
            e = self._entries.get(target)
            return [e] if e is not None and e.state == "active" else []
        found = self._match_cache.get(target)
        if found is not None:
            return found
        t = normalize_target(target)
        if t.count(":") == 2:
            found = self._matching(_parse_artifact(t))
        else:
            found = [e for a, e in self._entries.items() if a.name == t and e.state == "active"]
            found.sort(key=lambda e: e.loaded.artifact.version, reverse=True)
        if len(self._match_cache) >= 1024:
            self._match_cache.clear()
        self._match_cache[target] = found
        return found

    def _pick(
        self, target: Artifact | str, instance: int | None, method: str = ""
    ) -> tuple[_Entry, _Instance]:
        draining = False  # a matching instance exists but no longer takes calls
        for e in self._matching(target):
            if instance is not None:
                inst = e.instances.get(instance)
                if inst is not None and inst.accepting:
                    return e, inst
                draining = draining or inst is not None
                continue
            cands = [i for i in e.instances.values() if i.accepting]
            if not cands:
                draining = draining or bool(e.instances)
                continue
            n = len(cands)
            start = next(e.rr)
            if not e.limits.limited:
                return e, cands[start % n]
            # under limits: round robin over the instances with a free slot, else the shortest queue
            best: _Instance | None = None
            for k in range(n):
                i = cands[(start + k) % n]
                g = i.gate
                if g is None or g.free(method):
                    return e, i
                if best is None or (best.gate is not None and g.queued < best.gate.queued):
                    best = i
            assert best is not None
            return e, best
        which = f"instance {instance} of {target}" if instance is not None else f"instance of {target}"
        if draining:
            raise InstanceStopping(f"the {which} on {self.node_id} is stopping (draining); retry elsewhere")
        raise NoLocalInstance(f"no active {which} on {self.node_id}")

    def _raw_config(self, e: _Entry) -> ResolvedConfig:
        """The config the instances of `e` get now, undecoded (`config_for`, read once per batch of
        instances started); `SliceStartError` naming the problem if there is none (a missing secret)."""
        if self.config_for is None:
            return ResolvedConfig()
        try:
            got = self.config_for(e.loaded.artifact)
        except Exception as exc:  # a missing secret: its message names the artifact and the secret
            raise SliceStartError(str(exc) or f"{e.loaded.artifact}: {type(exc).__name__}") from None
        return got if isinstance(got, ResolvedConfig) else ResolvedConfig(dict(got))

    def _config(self, e: _Entry, raw: ResolvedConfig | None = None) -> tuple[Any, tuple[str, ...]]:
        """The config one instance of `e` gets (its own copy, decoded into the class's `config_type`
        if it has one) and the secret values in it; `SliceStartError` (redacted) if it does not fit."""
        artifact = e.loaded.artifact
        resolved = self._raw_config(e) if raw is None else raw
        secrets = resolved.secrets
        wanted = getattr(e.loaded.cls, "config_type", None)
        if wanted is None:
            return copy.deepcopy(resolved.values), secrets
        try:
            return msgspec.convert(resolved.values, wanted), secrets
        except (msgspec.ValidationError, TypeError) as exc:
            raise SliceStartError(redact(
                f"the config of {artifact} does not fit {type_name(wanted)}: {exc} (its [slices.NAME.config] "
                "table in the blueprint)", secrets,
            )) from None

    def _context(
        self, e: _Entry, instance: int, thread: SliceThread | InlineLoop, config: Any
    ) -> SliceContext:
        artifact = e.loaded.artifact
        invoker: SliceCaller = self.invoker
        maps = self.maps
        if isinstance(thread, InlineLoop):  # a call to another inline slice here runs directly
            invoker = InlineInvoker(self.invoker, functools.partial(self._direct, self._inline_calls()))
        elif isinstance(thread, SliceThread) and thread.shared:
            invoker = SharedInvoker(self.invoker, thread, functools.partial(self._direct, thread))
            maps = ThreadMaps(self.maps, thread) if self.maps is not None else None
        elif isinstance(thread, SliceThread):  # (inline slices use the node's maps)
            invoker = ThreadInvoker(self.invoker, thread)
            maps = ThreadMaps(self.maps, thread) if self.maps is not None else None
        return SliceContext(
            artifact=artifact,
            node_id=self.node_id,
            instance=instance,
            logger=logging.getLogger(f"aether.slice.{artifact.group}.{artifact.artifact}"),
            config=config,
            invoker=invoker,
            maps=maps,
            codecs=e.loaded.codecs,
        )

    def _limits(self, e: _Entry) -> SliceLimits:
        if self.limits_for is None:
            return NO_LIMITS
        try:
            return self.limits_for(e.loaded.artifact)
        except Exception:
            self.log.exception("%s: reading the limits of %s failed; keeping %s", self.node_id, e.coords,
                               e.limits)
            return e.limits

    @staticmethod
    def _apply_limits(inst: _Instance, limits: SliceLimits) -> None:
        """Give `inst` a gate under `limits` (or none without limits). Calls already running
        without a gate are not counted by a new one: a limit set now applies to new calls."""
        if limits.limited:
            if inst.gate is None:
                inst.gate = Gate(limits)
            else:
                inst.gate.configure(limits)
        elif inst.gate is not None:
            gate, inst.gate = inst.gate, None
            gate.configure(limits)  # no limits: every waiting call runs now

    # --- health -------------------------------------------------------------------------------------

    def _ensure_health(self) -> None:
        if self._health is None or self._health.done():
            self._health = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        """Every `health_interval` s: refresh the limits, start a health check on every ACTIVE
        instance whose class has one and whose previous check has finished (runs on the node's
        loop; the checks run on the slices' loops)."""
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                self.refresh_limits()
                self.check_health()
            except Exception:
                self.log.exception("%s: health round failed", self.node_id)

    def check_health(self) -> int:
        """Start a health check on every ACTIVE instance that has a `health()` hook and no check
        running; returns how many were started (the health loop calls it; tests may too). An
        instance with an injected ``unhealthy`` fault fails its check at once (hook or not); so
        does one whose previous `health()` still runs after its check gave up on it (it ignored
        its cancellation at the timeout): `HEALTH_STILL_RUNNING`, no second one is started next to
        it (a worker process answers so for its own instances). Both count as started."""
        started = 0
        for e in list(self._entries.values()):
            thread = e.thread
            if e.state != "active" or not e.running:
                continue
            hooked = e.has_health
            for inst in list(e.instances.values()):
                if not inst.accepting:
                    continue
                if inst.fault is not None and inst.fault.unhealthy:
                    self._health_failed(e, inst, "unhealthy by an injected fault (fault injection)")
                    started += 1
                    continue
                if not hooked or (inst.health_task is not None and not inst.health_task.done()):
                    continue
                if inst.health_hook is not None:
                    if inspect.getcoroutinestate(inst.health_hook) != inspect.CORO_CLOSED:
                        self._health_failed(e, inst, HEALTH_STILL_RUNNING)
                        started += 1
                        continue
                    inst.health_hook = None
                inst.health_task = asyncio.get_running_loop().create_task(self._check_one(e, inst, thread))
                started += 1
        return started

    async def _check_one(self, e: _Entry, inst: _Instance, thread: SliceThread | InlineLoop | None) -> None:
        reason: str | None = None
        try:
            if e.worker is not None:
                got = await asyncio.wait_for(
                    e.worker.request("health", inst.id, inst.slot), self.health_timeout
                )
                result = msgspec.msgpack.decode(got)
                if isinstance(result, str):  # the worker sent the type name of what it returned
                    reason = f"health() returned {result}, expected True, False or None"
                    result = None
            else:
                assert thread is not None and inst.obj is not None
                hook = inst.obj.health  # type: ignore[attr-defined]
                # kept: its state says when the hook has really ended (`check_health`), on any loop
                inst.health_hook = coro = _health(hook)
                result = await asyncio.wait_for(
                    thread.hook(coro, entry="health()", owner=e.coords, secrets=inst.secrets),
                    self.health_timeout,
                )
            if result is False:
                reason = "health() returned False"
            elif result is not None and result is not True:
                reason = f"health() returned {type(result).__name__}, expected True, False or None"
        except TimeoutError:
            reason = f"health() did not answer within {self.health_timeout:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "_Failed":  # the worker's own (HEALTH_STILL_RUNNING): the whole reason
                reason = str(exc)
            else:
                reason = f"health() raised {type(exc).__name__}: {exc}"
        if reason is None:
            if inst.fault is not None and inst.fault.unhealthy:
                return  # a fault injected while the check ran: it does not make it healthy
            if inst.healthy is False:
                self.log.info("%s: %s instance %d is healthy again", self.node_id, e.coords, inst.id)
            inst.healthy, inst.health_failures, inst.health_reason = True, 0, None
            return
        self._health_failed(e, inst, reason)

    def _health_failed(self, e: _Entry, inst: _Instance, reason: str) -> None:
        reason = redact(reason, inst.secrets)
        if len(reason) > HEALTH_REASON_MAX:
            reason = reason[: HEALTH_REASON_MAX - 3] + "..."
        inst.healthy = False
        inst.health_failures += 1
        inst.health_reason = reason
        if inst.health_failures == 1:
            self.log.warning("%s: %s instance %d is unhealthy: %s", self.node_id, e.coords, inst.id, reason)

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Every 0.1 s: is any slice loop blocked? (Runs on the node's loop, which slices cannot block.)"""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            checked: set[int] = set()  # the shared loop is the thread of several entries: once
            for a, e in list(self._entries.items()):
                t = e.thread
                if t is None or id(t) in checked:
                    continue
                checked.add(id(t))
                report = t.check(now)
                if report is None:
                    continue
                if isinstance(t, SliceThread) and t.shared:
                    owner = self._shared_owner(report)
                    if owner is None:
                        self.log.warning(
                            "%s: the shared slice loop was blocked for %.1f s by code outside any call "
                            "(%s); calls to its slices wait", self.node_id, report.seconds, report.where,
                        )  # fmt: skip
                        continue
                    a = owner
                self.log.warning(
                    "%s: slice %s blocked its event loop for %.1f s in %s (%s); the node is not "
                    "affected, calls to this slice wait", self.node_id, a, report.seconds,
                    report.entry or "code outside any call", report.where,
                )  # fmt: skip
                for cb in list(self.on_block):
                    try:
                        cb(a, report)
                    except Exception:
                        self.log.exception("on_block callback failed")

    def _shared_owner(self, report: BlockReport) -> Artifact | None:
        """The artifact on the shared loop whose call blocks it (None: unknown)."""
        if report.owner is None:
            return None
        for a in self._shared_users:
            if str(a) == report.owner:
                return a
        return None

    async def _retire(self, e: _Entry, inst: _Instance, drain_timeout: float) -> None:
        await self._drain(e.loaded.artifact, [inst], drain_timeout)
        await self._stop_one(e, inst)

    async def _close_thread(self, e: _Entry) -> None:
        t, e.thread = e.thread, None
        if t is not None and t is self._shared:  # closed with the last slice that runs there
            self._shared_users.discard(e.loaded.artifact)
            if self._shared_users:
                return
            self._shared = None
        if t is not None:
            await t.close()

    async def _start_in_worker(
        self, e: _Entry, iid: int, slot: int, raw: ResolvedConfig | None = None
    ) -> tuple[str, ...]:
        """Create and start object `slot` (instance `iid`) in `e`'s worker; returns the secret values
        of its config. `SliceStartError` (redacted) with the worker's reason if it did not start."""
        artifact = e.loaded.artifact
        assert e.worker is not None
        try:
            config, secrets = self._config(e, raw)  # decoded into its config_type in the worker
        except SliceStartError as exc:
            exc.instance = iid
            raise
        start = e.worker.request("start", iid, slot, config=config)
        try:
            if self.start_timeout is not None:
                await asyncio.wait_for(start, self.start_timeout)
            else:
                await start
        except TimeoutError:
            raise SliceStartError(
                f"start() of {artifact} instance {iid} did not finish within {self.start_timeout} s",
                instance=iid,
            ) from None
        except Exception as exc:  # raised in the worker (rebuilt), the worker lost, or not sendable
            text = (
                str(exc)
                if type(exc).__name__ == "_Failed"
                else f"start() of {artifact} instance {iid} failed: {exc}"
            )
            raise SliceStartError(redact(text, secrets), instance=iid) from None
        return secrets

    async def _start_one(self, e: _Entry, iid: int, raw: ResolvedConfig | None = None) -> _Instance:
        artifact = e.loaded.artifact
        if e.worker is not None:
            slot = next(self._slots)
            secrets = await self._start_in_worker(e, iid, slot, raw)
            inst = _Instance(iid, None, secrets=secrets, slot=slot)
            self._apply_limits(inst, e.limits)
            return inst
        thread = e.thread
        assert thread is not None
        try:
            config, secrets = self._config(e, raw)
        except SliceStartError as exc:
            exc.instance = iid
            raise
        try:
            obj = await thread.hook(
                _construct(e.loaded.cls), entry="__init__()", owner=e.coords, secrets=secrets
            )
        except Exception as exc:
            raise SliceStartError(redact(
                f"creating {artifact} instance {iid} failed: {type(exc).__name__}: {exc}", secrets
            ), instance=iid) from exc
        obj.context = self._context(e, iid, thread, config)
        where = (self.node_id, e.coords, iid)
        try:
            start = thread.hook(
                _in_instance(where, obj.start), entry="start()", owner=e.coords, secrets=secrets
            )
            if self.start_timeout is not None:
                await asyncio.wait_for(start, self.start_timeout)
            else:
                await start
        except TimeoutError:
            raise SliceStartError(
                f"start() of {artifact} instance {iid} did not finish within {self.start_timeout} s",
                instance=iid,
            ) from None
        except Exception as exc:
            raise SliceStartError(redact(
                f"start() of {artifact} instance {iid} raised {type(exc).__name__}: {exc}", secrets
            ), instance=iid) from exc
        inst = _Instance(iid, obj, secrets=secrets)
        self._apply_limits(inst, e.limits)
        return inst

    async def _start_instances(self, e: _Entry, ids: list[int]) -> list[_Instance]:
        if not ids:
            return []
        raw = self._raw_config(e)  # once for the batch; each instance decodes its own copy
        tasks = [asyncio.create_task(self._start_one(e, iid, raw)) for iid in ids]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            started = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
            await asyncio.gather(*(self._stop_one(e, i) for i in started))
            raise
        started = [t.result() for t in tasks if t.exception() is None]
        failures = [t.exception() for t in tasks if t.exception() is not None]
        if failures:
            await asyncio.gather(*(self._stop_one(e, i) for i in started))
            first = failures[0]
            for f in failures:
                self.log.warning("%s: %s", self.node_id, f)
            if isinstance(first, SliceStartError):
                raise first
            raise SliceStartError(f"starting {e.loaded.artifact} failed: {first!r}") from first
        return started

    async def _stop_one(self, e: _Entry, inst: _Instance) -> None:
        if inst.health_task is not None:
            inst.health_task.cancel()
        thread = e.thread
        try:
            if e.worker is not None:
                await asyncio.wait_for(e.worker.request("stop", inst.id, inst.slot), self.stop_timeout)
                return
            if thread is None or inst.obj is None:
                return
            stop = _in_instance((self.node_id, e.coords, inst.id), inst.obj.stop)
            await asyncio.wait_for(
                thread.hook(stop, entry="stop()", owner=e.coords, secrets=inst.secrets), self.stop_timeout
            )
        except TimeoutError:
            self.log.warning(
                "%s: stop() of %s instance %d did not finish within %s s; abandoned, the node goes on",
                self.node_id, e.loaded.artifact, inst.id, self.stop_timeout,
            )  # fmt: skip
        except WorkerLost as exc:
            self.log.warning(
                "%s: stop() of %s instance %d: %s", self.node_id, e.loaded.artifact, inst.id, exc
            )
        except Exception:
            self.log.exception(
                "%s: stop() of %s instance %d raised", self.node_id, e.loaded.artifact, inst.id
            )

    async def _drain(self, artifact: Artifact, insts: list[_Instance], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._drain_calls(artifact, insts, timeout)
        e = self._entries.get(artifact)
        thread = e.thread if e is not None else None
        if (isinstance(thread, SliceThread) and thread.shared) or isinstance(thread, InlineLoop):
            await self._drain_direct(artifact, thread, insts, deadline)

    async def _drain_direct(
        self, artifact: Artifact, thread: SliceThread | InlineLoop, insts: list[_Instance], deadline: float
    ) -> None:
        """Wait (until `deadline`) for the direct calls running on the shared loop (or, for an inline
        slice, on the node's loop). A direct call that found its instance accepting just before the
        drain began has counted itself once the shared loop has run one more call (the check and the
        count are one step there; on the node's loop they are one step of this loop)."""
        loop = asyncio.get_running_loop()
        if isinstance(thread, SliceThread) and deadline > loop.time():
            try:
                await asyncio.wait_for(thread.run(_noop()), deadline - loop.time())
            except Exception:  # (TimeoutError too)
                pass  # a blocked or closed loop: the wait below gives up at the deadline
        while any(i.direct_inflight for i in insts) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if any(i.direct_inflight for i in insts):
            self.log.warning(
                "%s: %d direct call(s) to %s still running on %s after draining; stopping anyway",
                self.node_id, sum(i.direct_inflight for i in insts), artifact,
                "the shared loop" if isinstance(thread, SliceThread) else "the node's loop",
            )  # fmt: skip

    async def _drain_calls(self, artifact: Artifact, insts: list[_Instance], timeout: float) -> None:
        busy = [i for i in insts if i.inflight]
        if not busy:
            return
        waits = [asyncio.create_task(i.idle.wait()) for i in busy]
        try:
            _, pending = await asyncio.wait(waits, timeout=max(0.0, timeout))
        finally:
            for w in waits:
                w.cancel()
        if pending:
            left = sum(i.inflight for i in busy)
            self.log.warning(
                "%s: %d call(s) to %s still in flight after %.1f s of draining; stopping anyway",
                self.node_id, left, artifact, timeout,
            )  # fmt: skip
            for i in busy:  # calls still queued will not run here: the invoker retries them elsewhere
                if i.gate is not None:
                    i.gate.fail_waiting(lambda i=i: NoLocalInstance(  # type: ignore[misc]
                        f"{artifact} instance {i.id} on {self.node_id} stopped while the call was queued"
                    ))

    async def _set_instances(self, e: _Entry, instances: list[int], drain_timeout: float) -> None:
        want = set(instances)
        have = set(e.instances)
        new = sorted(want - have)
        gone = sorted(have - want)
        started = await self._start_instances(e, new)
        for i in started:
            e.instances[i.id] = i
        if gone:
            removed = [e.instances[g] for g in gone]
            for i in removed:
                i.accepting = False
            await self._drain(e.loaded.artifact, removed, drain_timeout)
            await asyncio.gather(*(self._stop_one(e, i) for i in removed))
            for g in gone:
                e.instances.pop(g, None)
        if new or gone:
            self.log.info(
                "%s: %s instances now %s (+%s -%s)",
                self.node_id,
                e.loaded.artifact,
                sorted(e.instances),
                new,
                gone,
            )
