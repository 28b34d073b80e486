"""Slice code runs on its own event loop, in its own thread: the node's control plane never waits for it.

Owns `SliceThread` (one per active artifact on a node: a daemon thread running an asyncio loop
where that artifact's `start()`, `stop()` and entry calls run), the bridges that let slice code
call back into the node (`SliceCaller`, `MapBackend`: each call hops to the node's loop and back),
the containment of `BaseException`s raised by slice code (`SliceCrashed`), the lag watchdog
(`SliceThread.check`: a loop that has not turned for `block_limit` seconds is *blocked*, and the
call that blocks it is named and answered with `SliceBlocked`) and `BlockPolicy`, the
deterministic rule that quarantines a slice that keeps blocking.

Why threads: heartbeats, consensus, map replication and the management API run on the node's
loop. An entry that calls `time.sleep(5)` or spins on the CPU used to stop all of them, and the
cluster evicted the whole node. Now it stops only its own slice's loop (a CPU-bound entry still
shares the interpreter lock, which Python hands over every few milliseconds). What threads do
not contain: `os._exit()`, crashes in C extensions, memory exhaustion (a slice run in a worker
process, `aether.slices.workers`, is contained against those too). The price is a hop between
threads on every call (and the interpreter lock handed between them): a slice whose blueprint
says ``isolation = "inline"`` runs on the node's loop instead (`InlineLoop`), trusted not to block.

May import `aether.core` and `aether.slices.*`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import itertools
import logging
import os
import selectors
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import msgspec

from aether.core.deadlines import DeadlineSweep
from aether.core.errors import KIND_INTERRUPTED, WireKind
from aether.core.secrets import redact
from aether.core.tracing import TraceContext, current_trace
from aether.slices.api import SliceCaller
from aether.slices.errors import InstanceStopping, SliceError
from aether.slices.maps import MapBackend, MapOp, MapOpStarter

__all__ = [
    "BlockPolicy", "BlockReport", "DirectHome", "InlineCalls", "InlineInvoker", "InlineLoop", "NotDirect",
    "SharedInvoker", "SliceBlocked", "SliceBlockedNotice", "SliceCrashed", "SliceStopped", "SliceThread",
    "ThreadInvoker",
    "ThreadMaps",
]

T = TypeVar("T")


class SliceCrashed(SliceError):
    """Slice code raised `SystemExit`, `KeyboardInterrupt` or another `BaseException`: contained, the
    call fails (the node goes on)."""


def crashed(log: logging.Logger, what: str, exc: BaseException, secrets: tuple[str, ...]) -> SliceCrashed:
    """Log that slice code (`what`: its entry or hook and slice) raised `exc`, a `BaseException`
    (`SystemExit`, `KeyboardInterrupt`, ...), contained; the `SliceCrashed` its call fails with.
    The secret values of the instance's config are redacted from both, as from what an entry
    raises (`runtime.redact_error`): `sys.exit(f"cannot connect to {dsn}")` logged the password."""
    text = redact(f"{type(exc).__name__}({exc})", secrets) if secrets else f"{type(exc).__name__}({exc})"
    log.error(
        "slice %s raised %s: contained; the call fails and the node goes on (slice code must not exit "
        "the process)", what, text,
    )  # fmt: skip
    return SliceCrashed(
        f"{what} raised {text}; slice code must not exit the process (the call failed, the node goes on)"
    )


class SliceStopped(SliceError):
    """The call was still running when its slice's loop was closed (the slice was undeployed or
    scaled away, the node stops, its drain gave up on the call): answered without it. It may have
    partly run: 503, kind interrupted, so the caller's invoker repeats it on another instance only
    if the entry is idempotent (as for a call whose node or worker process stopped mid-run)."""

    status = 503
    wire_kind: ClassVar[WireKind] = KIND_INTERRUPTED


def _not_started(name: str, why: str) -> InstanceStopping:
    """For a call (or hook) that reached a slice's loop closed or closing, before it started: it did
    not run, so it is `InstanceStopping` (503, kind shutting_down: the invoker tries another
    instance, whatever the entry), not `SliceCrashed` (an app error, never retried) nor
    `SliceStopped` (it may have partly run)."""
    return InstanceStopping(f"{name}: {why} (stopped before the call started); retry elsewhere")


class SliceBlocked(SliceError):
    """The call held its slice's event loop longer than the limit (blocking code in an `async` entry)."""


class SliceBlockedNotice(msgspec.Struct, frozen=True):
    """Published on the node's event bus when a slice loop was found blocked (event stream)."""

    node: str
    artifact: str
    entry: str | None
    seconds: float
    where: str
    quarantined: bool


@dataclass(frozen=True, slots=True)
class BlockReport:
    """A slice loop found blocked by `SliceThread.check`."""

    thread: str  # the thread's name: the artifact's coordinates (the node's shared loop: "shared")
    entry: str | None  # the entry (or "start()"/"stop()") whose call blocks it, when known
    seconds: float  # how long the loop has not turned
    where: str  # innermost source location of the blocked thread ("file:line in function")
    owner: str | None = None  # the coordinates of the slice whose call blocks it, when known


class BlockPolicy:
    """Quarantine a slice that keeps blocking: `strikes` blocks within `window` seconds.

    Sans-IO: `blocked(now)` records one block episode and says whether to quarantine now.
    """

    def __init__(self, strikes: int = 3, window: float = 60.0) -> None:
        if strikes < 1:
            raise ValueError("strikes must be at least 1")
        self.strikes = strikes
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    def blocked(self, now: float) -> bool:
        times = self._times
        times.append(now)
        while times and now - times[0] > self.window:
            times.popleft()
        if len(times) >= self.strikes:
            times.clear()
            return True
        return False


class _Call:
    __slots__ = ("answer", "coro", "entry", "owner", "secrets", "task")

    def __init__(
        self, entry: str | None, answer: asyncio.Future[Any], coro: Coroutine[Any, Any, Any],
        owner: str | None = None, secrets: tuple[str, ...] = (),
    ) -> None:
        self.entry = entry
        self.answer = answer  # on the node's loop
        self.coro = coro
        self.owner = owner  # the coordinates of the slice whose code it runs (a shared loop runs many)
        self.secrets = secrets  # the secret values of the instance's config (redacted by `crashed`)
        self.task: asyncio.Task[Any] | None = None  # on the slice's loop, once started


class _Running:
    """What a task on the shared loop runs while it makes a direct call (`SliceThread.direct_enter`):
    the callee's entry and slice, and the call being served (its answer: for `check`, `_abandon`)."""

    __slots__ = ("entry", "owner", "served")

    def __init__(self, entry: str, served: _Call | None, owner: str) -> None:
        self.entry = entry
        self.served = served
        self.owner = owner

    @property
    def answer(self) -> asyncio.Future[Any] | None:
        return self.served.answer if self.served is not None else None


# the call a task on a slice loop serves (set by `_guard` in the call's task; tasks that slice code
# starts inherit it): a direct call made from such a task answers that call when it blocks the loop
_serving: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("aether_slice_call", default=None)


class _Start:
    """A node call that starts without a coroutine when it can: `fn()`, on the node's loop, returns
    the operation's future, or an awaitable to run as a task (`ThreadMaps`)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], asyncio.Future[Any] | Awaitable[Any]]) -> None:
        self.fn = fn


class _NodeCall:
    """A call slice code makes into the node (runs on the node's loop, answered on the slice's)."""

    __slots__ = ("aw", "cancelled", "fut", "task")

    def __init__(self, aw: Awaitable[Any] | _Start, fut: asyncio.Future[Any]) -> None:
        self.aw = aw
        self.fut = fut  # on the slice's loop
        self.task: asyncio.Future[Any] | None = None  # on the node's loop, once started (a task or a future)
        self.cancelled = False

    def cancel(self) -> None:
        """On the node's loop: the slice code stopped waiting."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()

    def aw_close(self) -> None:
        close = getattr(self.aw, "close", None)
        if close is not None:
            close()


_names = itertools.count(1)
_CANCELLED = object()


class _DirectStreak:
    """The direct calls made in one turn of `loop` (`SliceRuntime._direct` runs them in their
    caller's task), for `direct_yield`."""

    DIRECT_STREAK = 32  # direct calls in one turn of the loop before one of them yields
    loop: asyncio.AbstractEventLoop
    _streak: int = 0

    def direct_yield(self) -> bool:
        """On this loop, as a direct call ends: True when the caller should yield to the loop
        (`await asyncio.sleep(0)`). A direct call does not suspend its caller, so a caller making
        calls in a loop would hold the loop (the watchdog would take it for blocked, other calls
        would wait): one in `DIRECT_STREAK` calls of a turn yields. (Not every call after the first
        `DIRECT_STREAK`: under load a turn runs many callers' calls, one each, and each yield costs
        its caller a suspension and a resumption through its whole stack.)"""
        n = self._streak + 1
        if n == 1:
            self.loop.call_soon(self._end_streak)  # runs when the loop turns
        self._streak = n
        return n % self.DIRECT_STREAK == 0

    def _end_streak(self) -> None:
        self._streak = 0


class SliceThread(_DirectStreak):
    """An asyncio loop in a daemon thread, for one artifact's code. Create and use it on the node's loop.

    `run(coro, entry=...)` runs a coroutine there and returns its result on the node's loop; a
    `BaseException` other than cancellation comes back as `SliceCrashed`. `check(now)` (call it
    periodically from the node's loop) reports a loop that has not turned for `block_limit`
    seconds, once per episode, and answers the call that blocks it with `SliceBlocked`.

    Calls and answers cross between the threads through two queues, each drained in one go by
    its loop: under load one wake-up of the other loop carries many calls (a wake-up per call,
    as `run_coroutine_threadsafe` does, halved the throughput of a slice served to other nodes).
    """

    BEAT = 0.1  # how often the slice loop proves it turns (a fifth of the default block_limit)

    def __init__(
        self, name: str, *, block_limit: float = 0.5, logger: logging.Logger | None = None,
        shared: bool = False,
    ) -> None:
        self.name = name
        # the node's shared slice loop (``isolation = "shared"``): the code of several slices runs here,
        # and their calls to each other run directly on it (`SharedInvoker`)
        self.shared = shared
        self.deadlines = DeadlineSweep()  # of the direct calls on this (shared) loop, used there only
        self.block_limit = block_limit
        self.log = logger or logging.getLogger("aether.slices.isolation")
        self.main = asyncio.get_running_loop()
        self.loop = asyncio.new_event_loop()
        self.beat = time.monotonic()
        self._calls: dict[asyncio.Task[Any], _Call | _Running] = {}
        self._blocked_since: float | None = None  # the beat of the episode already reported
        self._closed = False
        # node loop -> slice loop: calls to start; slice loop -> node loop: (call, result, error)
        self._inbox: collections.deque[_Call] = collections.deque()
        self._inbox_woken = False
        self._outbox: collections.deque[tuple[_Call, Any, BaseException | None]] = collections.deque()
        self._outbox_woken = False
        # slice loop -> node loop: bookkeeping to do there (`post_main`), with the answers' wake-up
        self._later: collections.deque[tuple[Any, tuple[Any, ...]]] = collections.deque()
        self._streak = 0  # direct calls made in this turn of the (shared) loop (`direct_yield`)
        # slice loop -> node loop: node calls made by slice code, and their results back
        self._up: collections.deque[_NodeCall] = collections.deque()
        self._up_woken = False
        self._down: collections.deque[tuple[_NodeCall, Any, BaseException | None]] = collections.deque()
        self._down_woken = False
        started = threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(started,), name=f"slice-{next(_names)}-{name}", daemon=True
        )
        self.thread.start()
        started.wait()

    def _main(self, started: threading.Event) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)

        async def beat() -> None:
            while True:
                self.beat = time.monotonic()
                await asyncio.sleep(self.BEAT)

        ticker = loop.create_task(beat())
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            ticker.cancel()
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    _, left = loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
                    if left:  # slice code that swallows its cancellation: it runs on, here, alone
                        self._abandon(left)
                        loop.run_until_complete(asyncio.wait(left))
            except BaseException:
                self.log.debug("slice loop %s: error while closing", self.name, exc_info=True)
            loop.close()
            if self._outbox or self._later:  # answers of the last turn (their deferred wake-up never ran)
                try:
                    self.main.call_soon_threadsafe(self._settle_calls)
                except RuntimeError:
                    pass

    def _abandon(self, left: set[asyncio.Task[Any]]) -> None:
        """On the slice's loop, closing: `left` did not end when cancelled (slice code that catches
        `CancelledError` and goes on). Their callers are answered now, the log names them, and the
        loop keeps running them in this (daemon) thread until they end by themselves: closed with
        them pending, it left their coroutines to the garbage collector, which ran their cleanup at
        some later point on whatever thread (and the callers were never answered)."""
        names = []
        for task in left:
            call = self._calls.get(task)
            if isinstance(call, _Running):  # a direct call, in the task of the call it serves
                names.append(f"{call.entry} of {call.owner}")
                served = call.served
                if served is not None:  # (it waited for its caller's deadline: 10 s by default)
                    self._answer(served, None, SliceStopped(
                        f"{self._what(served)} (running {call.entry} of {call.owner} directly) did not "
                        "end when its slice was stopped (its code ignores cancellation); abandoned"
                    ))  # fmt: skip
            elif call is not None:
                what = self._what(call)
                names.append(what)
                self._answer(call, None, SliceStopped(
                    f"{what} did not end when its slice was stopped (its code ignores cancellation); "
                    "abandoned"
                ))  # fmt: skip
            else:
                names.append(f"a task of slice code ({task.get_name()})")
        self.log.warning(
            "slice loop %s: %s still running 1.0 s after %s cancelled (slice code that catches "
            "asyncio.CancelledError and goes on); abandoned: left running on the loop's own thread",
            self.name, ", ".join(sorted(names)), "it was" if len(names) == 1 else "they were",
        )  # fmt: skip

    def _what(self, call: _Call) -> str:
        name = call.owner or self.name
        return f"{call.entry} of {name}" if call.entry else name

    # --- running slice code -----------------------------------------------------------------------

    async def run(
        self, coro: Coroutine[Any, Any, T], *, entry: str | None = None, owner: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> T:
        """Run `coro` on this thread's loop; await it on the node's loop. `entry` and `owner` (the
        slice's coordinates) name the call when it blocks the loop; `secrets`, the secret values of
        the instance's config, are redacted from what a contained `BaseException` logs and answers."""
        if self._closed:
            coro.close()
            raise _not_started(self.name, "the slice's loop is closed")
        answer: asyncio.Future[T] = self.main.create_future()
        call = _Call(entry, answer, coro, owner, secrets)
        self._inbox.append(call)
        if not self._inbox_woken:
            self._inbox_woken = True
            self.main.call_soon(self._wake_inbox)  # once this turn of the node's loop is done
        try:
            return await answer
        except asyncio.CancelledError:
            self._cancel(call)
            raise

    async def hook(
        self, coro: Coroutine[Any, Any, T], *, entry: str | None = None, owner: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> T:
        """`run` for a lifecycle hook (as `InlineLoop.hook`): a caller that stops waiting goes on at
        once here anyway (the hook runs on this thread's loop, where it is cancelled)."""
        return await self.run(coro, entry=entry, owner=owner, secrets=secrets)

    def _cancel(self, call: _Call) -> None:
        def cancel() -> None:
            if call.task is not None:
                call.task.cancel()
            else:  # not started yet
                call.coro.close()
                if not self._closed:  # (closing, it is never started: a new coroutine went unawaited)
                    call.coro = _closed_coro()

        try:
            self.loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the slice's loop is closed: nothing runs there any more
            if call.task is None:  # never started: close it here (else "never awaited" at GC)
                call.coro.close()

    def _wake_inbox(self) -> None:
        """On the node's loop, at the end of the turn that queued calls: one wake-up of the slice's
        loop for all of them (waking it at once let it take each call as it came, one system call
        and one hand-over of the interpreter lock each, while the node's loop was still busy)."""
        try:
            self.loop.call_soon_threadsafe(self._start_calls)
        except RuntimeError:  # the slice's loop closed meanwhile: fail what waits for it
            inbox = self._inbox
            while inbox:
                call = inbox.popleft()
                call.coro.close()
                if not call.answer.done():
                    call.answer.set_exception(_not_started(self.name, "the slice's loop is closed"))

    def _start_calls(self) -> None:
        """On the slice's loop: start every call queued so far. Closing (the stop is in this same
        turn), fail them instead: a task started now would be cancelled before its first step,
        its caller never answered and its coroutine never awaited."""
        self._inbox_woken = False  # first: a call queued from now on wakes us again
        inbox = self._inbox
        loop = self.loop
        while inbox:
            call = inbox.popleft()
            if self._closed:
                call.coro.close()
                self._answer(call, None, _not_started(self.name, "the slice's loop is closing"))
                continue
            call.task = loop.create_task(self._guard(call))

    def _answer(self, call: _Call, result: Any, error: BaseException | None) -> None:
        """On the slice's loop: hand a finished call back to the node's loop."""
        self._outbox.append((call, result, error))
        if not self._outbox_woken:
            self._outbox_woken = True
            self.loop.call_soon(self._wake_outbox)  # once this turn of the slice's loop is done

    def _wake_outbox(self) -> None:
        """On the slice's loop: one wake-up of the node's loop for the answers of this turn."""
        try:
            self.main.call_soon_threadsafe(self._settle_calls)
        except RuntimeError:
            pass  # the node's loop is closed: nobody waits any more

    def post_main(self, fn: Any, *args: Any) -> None:
        """From the slice's loop: run `fn(*args)` on the node's loop soon, with the answers of this
        turn (one wake-up of the node's loop for both). For bookkeeping the node's loop owns."""
        self._later.append((fn, args))
        if not self._outbox_woken:
            self._outbox_woken = True
            self.loop.call_soon(self._wake_outbox)

    def _settle_calls(self) -> None:
        """On the node's loop: resolve every call answered so far (and run what `post_main` queued)."""
        self._outbox_woken = False
        later = self._later
        while later:
            fn, args = later.popleft()
            try:
                fn(*args)
            except Exception:
                self.log.exception("slice loop %s: bookkeeping on the node's loop failed", self.name)
        outbox = self._outbox
        while outbox:
            call, result, error = outbox.popleft()
            answer = call.answer
            if answer.done():
                continue  # answered already (SliceBlocked) or cancelled by the caller
            if result is _CANCELLED:
                answer.cancel()
            elif error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

    async def _guard(self, call: _Call) -> None:
        task = asyncio.current_task(self.loop)  # (with the loop: no lookup of the running one, a getpid)
        assert task is not None
        self._calls[task] = call
        serving = _serving.set(call) if self.shared else None  # (read by direct calls only)
        try:
            result = await call.coro
        except asyncio.CancelledError:
            if self._closed:
                # cancelled by the loop's close (`_main`), not by its caller: answered with why (a
                # bare cancellation reached a caller whose task nobody had cancelled)
                self._answer(call, None, SliceStopped(
                    f"{self._what(call)} was cancelled when its slice was stopped, before it finished "
                    "(it may have partly run)"
                ))  # fmt: skip
            else:
                self._answer(call, _CANCELLED, None)
            raise
        except Exception as e:
            self._answer(call, None, e)
        except BaseException as e:
            self._answer(call, None, crashed(self.log, self._what(call), e, call.secrets))
        else:
            self._answer(call, result, None)
        finally:
            del self._calls[task]
            if serving is not None:  # (else the task's context and the call would keep each other)
                _serving.reset(serving)

    async def call_main(self, aw: Awaitable[T] | _Start) -> T:
        """From slice code: run a coroutine of the node (a map operation, a call) on the node's loop
        (or, for a `_Start`, what its function starts there).

        Batched like `run`, the other way round: requests queue for the node's loop, results queue
        back for the slice's loop, one wake-up each for as many as have queued."""
        nc = _NodeCall(aw, self.loop.create_future())
        self._up.append(nc)
        if not self._up_woken:
            self._up_woken = True
            self.loop.call_soon(self._wake_up)  # once this turn of the slice's loop is done
        try:
            return await nc.fut
        except asyncio.CancelledError:
            self.main.call_soon_threadsafe(nc.cancel)
            raise

    def _wake_up(self) -> None:
        """On the slice's loop: one wake-up of the node's loop for the node calls of this turn."""
        self.main.call_soon_threadsafe(self._start_node_calls)

    def _start_node_calls(self) -> None:
        """On the node's loop: start every call slice code queued so far."""
        self._up_woken = False
        up = self._up
        main = self.main
        while up:
            nc = up.popleft()
            if nc.cancelled:
                nc.aw_close()
                continue
            aw = nc.aw
            if type(aw) is _Start:
                try:
                    started = aw.fn()
                except Exception as e:  # bad input, raised before anything started
                    self._post(nc, None, e)
                    continue
                if isinstance(started, asyncio.Future):  # under way: no task needed
                    nc.task = started
                    started.add_done_callback(functools.partial(self._node_call_done, nc))
                    continue
                aw = started
            # a coroutine (the usual call) is a task as it is; other awaitables get wrapped
            task = main.create_task(aw if type(aw) is types.CoroutineType else _as_coro(aw))  # type: ignore[arg-type]
            nc.task = task
            task.add_done_callback(functools.partial(self._node_call_done, nc))

    def _node_call_done(self, nc: _NodeCall, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            self._post(nc, _CANCELLED, None)
        elif (exc := task.exception()) is not None:
            self._post(nc, None, exc)
        else:
            self._post(nc, task.result(), None)

    def _post(self, nc: _NodeCall, result: Any, error: BaseException | None) -> None:
        """On the node's loop: `nc` ended; its slice's loop hears of it after this turn."""
        self._down.append((nc, result, error))
        if not self._down_woken:
            self._down_woken = True
            self.main.call_soon(self._wake_down)  # once this turn of the node's loop is done

    def _wake_down(self) -> None:
        """On the node's loop: one wake-up of the slice's loop for the node calls finished this turn."""
        try:
            self.loop.call_soon_threadsafe(self._settle_node_calls)
        except RuntimeError:
            pass  # the slice's loop is closed

    def _settle_node_calls(self) -> None:
        """On the slice's loop: resolve every node call answered so far."""
        self._down_woken = False
        down = self._down
        while down:
            nc, result, error = down.popleft()
            fut = nc.fut
            if fut.done():
                continue
            if result is _CANCELLED:
                fut.cancel()
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    # --- the watchdog -------------------------------------------------------------------------------

    def check(self, now: float) -> BlockReport | None:
        """Report the loop if it has not turned for `block_limit` s (once per episode), and answer the
        call that blocks it with `SliceBlocked` (it is not retried elsewhere: it would block there too)."""
        beat = self.beat
        lag = now - beat
        if lag < self.block_limit or self._closed:
            if lag < self.block_limit:
                self._blocked_since = None
            return None
        if self._blocked_since == beat:
            return None
        frame = self._frame()
        if frame is not None and self._waiting_for_events(frame):
            return None  # not blocked: its timer is due, the thread waits for a core or the GIL
        self._blocked_since = beat
        task = asyncio.current_task(self.loop)
        call = self._calls.get(task) if task is not None else None
        entry = call.entry if call is not None else None
        owner = call.owner if call is not None else None
        where = self._where()
        answer = call.answer if call is not None else None
        if answer is not None and not answer.done():
            answer.set_exception(SliceBlocked(
                f"{entry or 'a call'} of {owner or self.name} blocked its slice's event loop for more "
                f"than {self.block_limit:g} s ({where}); an async entry must not block: await, or move "
                "blocking work to asyncio.to_thread"
            ))  # fmt: skip
        return BlockReport(self.name, entry, lag, where, owner)

    def direct_enter(
        self, owner: str, entry: str, task: asyncio.Task[Any]
    ) -> tuple[asyncio.Task[Any], _Call | _Running | None]:
        """On this (shared) loop, as `task` runs another slice's entry directly: name that entry and
        slice as what the task runs now (for `check`: a block is the callee's, and answers the call
        being served); undo with `direct_exit`."""
        calls = self._calls
        before = calls.get(task)
        serving = _serving.get()
        calls[task] = _Running(entry, serving, owner)
        return task, before

    def direct_exit(self, token: tuple[asyncio.Task[Any], _Call | _Running | None]) -> None:
        task, before = token
        if before is None:
            self._calls.pop(task, None)
        else:
            self._calls[task] = before

    def _frame(self) -> types.FrameType | None:
        ident = self.thread.ident
        return sys._current_frames().get(ident) if ident is not None else None

    def _where(self) -> str:
        frame = self._frame()
        if frame is None:
            return "location unknown"
        return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"

    @staticmethod
    def _waiting_for_events(frame: types.FrameType) -> bool:
        """Whether the loop's thread is in the loop's own wait for events, with no slice code on
        its stack: asyncio's selector called from the loop's `_run_once`, or (uvloop, whose loop
        has no Python frames) `_main` itself. A stale beat then means the thread was not given a
        core or the GIL back since its timer fell due (an overloaded machine or process), not that
        a slice blocks it. Slice code waiting in a selector of its own has its frames under it."""
        code = frame.f_code
        if code is _MAIN_CODE:
            return True
        back = frame.f_back
        if code in _SELECT_CODES and back is not None and back.f_code is _RUN_ONCE_CODE:
            return True
        return SliceThread._loop_machinery_only(frame)

    @staticmethod
    def _loop_machinery_only(frame: types.FrameType) -> bool:
        """Whether every frame of the thread's stack is the loop's own machinery (asyncio, the
        thread's start, this module: e.g. the wake-up of the node's loop, `call_soon_threadsafe`
        writing to its pipe), not a callback being run (`Handle._run` innermost: it may be slice
        code without frames of its own, `loop.call_soon(time.sleep, 5)`). Such a thread waits for
        the GIL or a core, as in `_waiting_for_events` (seen under load in CI: a slice thread in
        `_write_to_self` for 0.2 s while the node's loop ran 20,000 direct calls, reported as
        blocked by its slice)."""
        if frame.f_code is _HANDLE_RUN_CODE:
            return False
        f: types.FrameType | None = frame
        while f is not None:
            name = f.f_code.co_filename
            if name == threading.__file__:  # (only the thread's start, at the bottom: not Event.wait)
                return f.f_code in _THREAD_START_CODES
            if not (name == __file__ or name.startswith(_ASYNCIO_DIR) or name == selectors.__file__):
                return False
            f = f.f_back
        return True

    # --- shutting down ------------------------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> bool:
        """Stop the loop and wait (up to `timeout` s) for the thread; False if slice code still holds it
        (it is a daemon thread: it cannot keep the process alive)."""
        if self._closed:
            return not self.thread.is_alive()
        self._closed = True
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            pass  # already closed
        await asyncio.to_thread(self.thread.join, timeout)
        if self.thread.is_alive():
            self.log.warning("slice loop of %s still busy %.1f s after it was asked to stop; leaving it",
                             self.name, timeout)
            return False
        return True


# What `SliceThread._waiting_for_events` recognises: the loop's own wait, in either kind of loop.
_MAIN_CODE = SliceThread._main.__code__
_RUN_ONCE_CODE = asyncio.base_events.BaseEventLoop._run_once.__code__  # type: ignore[attr-defined]
_HANDLE_RUN_CODE = asyncio.events.Handle._run.__code__
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep
_THREAD_START_CODES = frozenset(
    getattr(threading.Thread, n).__code__ for n in ("run", "_bootstrap", "_bootstrap_inner")
)
_SELECT_CODES = frozenset(
    cls.select.__code__
    for name in ("SelectSelector", "PollSelector", "EpollSelector", "DevpollSelector", "KqueueSelector")
    if (cls := getattr(selectors, name, None)) is not None
)


class InlineLoop:
    """Where the code of a slice with ``isolation = "inline"`` runs: on the node's own loop, with
    no thread hop (the fastest way to call it). The same interface as `SliceThread`; what it does
    not give: a blocking entry blocks the node's loop (heartbeats, consensus, the management API:
    the node's loop-lag probe reports it, nothing can interrupt it), so it is for trusted code
    whose entries never block. `BaseException`s are still contained (`SliceCrashed`)."""

    def __init__(self, name: str, *, logger: logging.Logger | None = None) -> None:
        self.name = name
        self.log = logger or logging.getLogger("aether.slices.isolation")
        self._closed = False
        # hooks whose caller stopped waiting (a deadline, a cancelled step) before they ended: the
        # hook -> what it is (`hook`); they end by themselves, or are left running (`close`)
        self._left: dict[asyncio.Task[Any], str] = {}

    async def run(
        self, coro: Coroutine[Any, Any, T], *, entry: str | None = None, owner: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> T:
        """Await `coro` here, on the node's loop; `SliceCrashed` for a `BaseException` other than
        cancellation (`secrets` redacted from it and its log line, as `SliceThread.run`)."""
        if self._closed:
            coro.close()
            raise _not_started(self.name, "the slice is stopped")
        try:
            return await coro
        except (Exception, asyncio.CancelledError, GeneratorExit):  # (GeneratorExit: closed unfinished)
            raise
        except BaseException as e:
            what = f"{entry} of {self.name}" if entry else self.name
            raise crashed(self.log, what, e, secrets) from None

    async def hook(
        self, coro: Coroutine[Any, Any, T], *, entry: str | None = None, owner: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> T:
        """`run` for a lifecycle hook (`__init__`, `start()`, `stop()`, `health()`, `reconfigure()`),
        in a task of its own: a caller that stops waiting (its deadline passed, its step was
        cancelled) cancels the hook and goes on at once, as with a slice on its own loop. Awaited in
        the caller's task, a hook that swallows its cancellation (catches `CancelledError` and goes
        on awaiting) kept the caller waiting for it: a node's stop or the deactivation of the slice
        never ended. A hook still running after it was cancelled is left to itself (`close` logs
        it)."""
        name = f"{entry or 'a hook'} of {owner or self.name}"  # (named in the logs when left running)
        task = asyncio.get_running_loop().create_task(
            self.run(coro, entry=entry, owner=owner, secrets=secrets), name=name
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.cancel()
                self._left[task] = entry or "a hook"
                task.add_done_callback(self._hook_ended)
            raise

    def _hook_ended(self, task: asyncio.Task[Any]) -> None:
        self._left.pop(task, None)
        if not task.cancelled():
            task.exception()  # (retrieved: nobody waits for it any more)

    async def call_main(self, aw: Awaitable[T]) -> T:
        """From slice code: a node coroutine, awaited where it already is."""
        return await aw

    def check(self, now: float) -> BlockReport | None:
        """Nothing to report: a blocked inline slice blocks the node's loop, which the node's own
        loop-lag probe reports."""
        return None

    async def close(self, timeout: float = 2.0) -> bool:
        """No more calls; wait (up to `timeout` s) for the hooks cancelled by a caller that stopped
        waiting (`hook`) to end. False, logged naming them, if slice code still runs one (it ignores
        its cancellation: it is left running on the node's loop)."""
        self._closed = True
        if self._left:
            await asyncio.wait(list(self._left), timeout=timeout)
        if self._left:
            self.log.warning(
                "slice %s: %s still running %.1f s after %s cancelled (slice code that catches "
                "asyncio.CancelledError and goes on); abandoned: it is left running on the node's loop",
                self.name, ", ".join(sorted(set(self._left.values()))), timeout,
                "it was" if len(self._left) == 1 else "they were",
            )  # fmt: skip
            return False
        return True


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


async def _map_op(
    inner: MapBackend, name: str, op: MapOp, key: str, value: bytes | None, expected: bytes | None,
    ttl: float | None,
) -> tuple[bytes | None, bool]:
    """`MapOpStarter.start_op`'s answer from the plain `MapBackend` methods."""
    if op == "get":
        return await inner.map_get(name, key), True
    if op == "put":
        assert value is not None
        await inner.map_put(name, key, value, ttl=ttl)
        return None, True
    if op == "remove":
        return None, await inner.map_remove(name, key)
    return None, await inner.map_compare_and_set(name, key, expected, value, ttl=ttl)


async def _closed_coro() -> None:
    raise asyncio.CancelledError


def _traced(aw: Awaitable[T]) -> Awaitable[T]:
    """`aw` run on the node's loop with the trace context of the slice code that made it (the
    node's task does not inherit the slice loop's context); `aw` itself when untraced."""
    trace = current_trace.get()
    if trace is None:
        return aw
    return _Traced(trace, aw)


class _Traced(Generic[T]):
    """An awaitable that sets the trace context in the task awaiting it, then awaits `aw`;
    `close` closes `aw` (a call cancelled before it started)."""

    __slots__ = ("aw", "trace")

    def __init__(self, trace: TraceContext, aw: Awaitable[T]) -> None:
        self.trace = trace
        self.aw = aw

    def __await__(self) -> Generator[Any, None, T]:
        current_trace.set(self.trace)  # in the node's task that awaits this
        return (yield from self.aw.__await__())

    def close(self) -> None:
        close = getattr(self.aw, "close", None)
        if close is not None:
            close()


class ThreadInvoker:
    """The node's `SliceCaller`, callable from a slice's loop."""

    def __init__(self, inner: SliceCaller, thread: SliceThread) -> None:
        self._inner = inner
        self._thread = thread

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        if idempotency_key is None:
            aw = self._inner.invoke(target, method, payload, request_id=request_id, timeout=timeout)
        else:
            aw = self._inner.invoke(
                target, method, payload, request_id=request_id, timeout=timeout,
                idempotency_key=idempotency_key,
            )
        return await self._thread.call_main(_traced(aw))


class NotDirect:
    """`SharedInvoker`'s direct path declined a call: it goes the usual way, with `idempotency_key`
    when the direct path derived it already (a call's key is derived once)."""

    __slots__ = ("idempotency_key",)

    def __init__(self, idempotency_key: str | None) -> None:
        self.idempotency_key = idempotency_key


class DirectHome(Protocol):
    """The loop where a direct call runs in its caller's task (`SliceRuntime._direct`), and what
    it keeps there: the node's shared slice loop (its `SliceThread`) or the node's own loop for the
    inline slices (`InlineCalls`)."""

    loop: asyncio.AbstractEventLoop
    deadlines: DeadlineSweep

    def direct_enter(self, owner: str, entry: str, task: asyncio.Task[Any]) -> Any: ...
    def direct_exit(self, token: Any) -> None: ...
    def direct_yield(self) -> bool: ...
    def post_main(self, fn: Any, *args: Any) -> None: ...


DirectCall = Callable[
    [str, str, bytes, "str | None", "float | None", "str | None"], Awaitable["bytes | NotDirect"]
]


class _DirectFirst:
    """A `SliceCaller` that tries each call directly (`SliceRuntime._direct`, in the caller's task)
    and sends what that declines (`NotDirect`) the usual way (`_usual`), with the idempotency key
    the direct path derived already (a call's key is derived once)."""

    _direct: DirectCall

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        out = await self._direct(target, method, payload, request_id, timeout, idempotency_key)
        if not isinstance(out, NotDirect):
            return out
        key = out.idempotency_key or idempotency_key
        return await self._usual(target, method, payload, request_id, timeout, key)

    async def _usual(
        self, target: str, method: str, payload: bytes, request_id: str | None, timeout: float | None,
        idempotency_key: str | None,
    ) -> bytes:
        raise NotImplementedError


class SharedInvoker(_DirectFirst, ThreadInvoker):
    """The node's `SliceCaller` for slice code on the node's shared loop (``isolation = "shared"``).

    A call to a slice whose code runs on the same loop is tried directly first (`direct`:
    `SliceRuntime._direct` runs the entry in the caller's task, with the same request id, key,
    deadline, errors and bookkeeping as a local call through the node): no hop to the node's loop
    and back, no interpreter lock handed over. A call it declines (`NotDirect`) goes the usual way.
    """

    def __init__(self, inner: SliceCaller, thread: SliceThread, direct: DirectCall) -> None:
        ThreadInvoker.__init__(self, inner, thread)
        self._direct = direct

    async def _usual(
        self, target: str, method: str, payload: bytes, request_id: str | None, timeout: float | None,
        idempotency_key: str | None,
    ) -> bytes:
        return await ThreadInvoker.invoke(
            self, target, method, payload, request_id=request_id, timeout=timeout,
            idempotency_key=idempotency_key,
        )


class InlineCalls(_DirectStreak):
    """The node's loop as the home of direct calls between inline slices: what a `SliceThread`
    gives `SliceRuntime._direct` on the shared loop (the loop, the deadline sweep, the streak that
    makes a caller yield), for the slices with ``isolation = "inline"``, which all run on the node's
    loop. No watchdog (a blocking inline slice blocks the node's loop, which the node's loop-lag
    probe reports), and the bookkeeping runs at once: this is the loop that owns it. Create it on
    the node's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadlines = DeadlineSweep()  # of the direct calls between inline slices

    def direct_enter(self, owner: str, entry: str, task: asyncio.Task[Any]) -> None:
        """Nothing to name: no watchdog looks at the node's loop from here."""
        return None

    def direct_exit(self, token: None) -> None:
        return None

    def post_main(self, fn: Any, *args: Any) -> None:
        """`fn(*args)` now (on the node's loop already)."""
        fn(*args)


class InlineInvoker(_DirectFirst):
    """The node's `SliceCaller` for inline slices: a call to another inline slice on this node is
    tried directly first (`SliceRuntime._direct` with the node's `InlineCalls`), as on the shared
    loop; one it declines (`NotDirect`) goes through the node's invoker as before."""

    def __init__(self, inner: SliceCaller, direct: DirectCall) -> None:
        self._inner = inner
        self._direct = direct

    async def _usual(
        self, target: str, method: str, payload: bytes, request_id: str | None, timeout: float | None,
        idempotency_key: str | None,
    ) -> bytes:
        if idempotency_key is None:
            return await self._inner.invoke(target, method, payload, request_id=request_id, timeout=timeout)
        return await self._inner.invoke(
            target, method, payload, request_id=request_id, timeout=timeout, idempotency_key=idempotency_key
        )


class ThreadMaps:
    """The node's `MapBackend`, callable from a slice's loop."""

    def __init__(self, inner: MapBackend, thread: SliceThread) -> None:
        self._inner = inner
        self._thread = thread
        self._starter = inner if isinstance(inner, MapOpStarter) else None

    def require_map(self, name: str) -> None:
        """`UnknownMap` unless `name` is defined (`Slice.map` calls it): a read of the node's local
        map definitions, safe from another thread (it changes nothing)."""
        require = getattr(self._inner, "require_map", None)
        if require is not None:
            require(name)

    def map_owned_here(self, name: str, key: str) -> bool:
        """`SliceMap.owned_here`: the node's answer, read from this thread (it changes nothing)."""
        owned = getattr(self._inner, "map_owned_here", None)
        return bool(owned(name, key)) if owned is not None else False

    async def map_get(self, name: str, key: str) -> bytes | None:
        return (await self._op(name, "get", key))[0]

    async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._op(name, "put", key, value, None, ttl)

    async def map_remove(self, name: str, key: str) -> bool:
        return (await self._op(name, "remove", key))[1]

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, new: bytes | None, *, ttl: float | None = None
    ) -> bool:
        return (await self._op(name, "compare_and_set", key, new, expected, ttl))[1]

    def _op(
        self, name: str, op: MapOp, key: str, value: bytes | None = None, expected: bytes | None = None,
        ttl: float | None = None,
    ) -> Awaitable[tuple[bytes | None, bool]]:
        start = functools.partial(self._start, current_trace.get(), name, op, key, value, expected, ttl)
        return self._thread.call_main(_Start(start))

    def _start(
        self, trace: TraceContext | None, name: str, op: MapOp, key: str, value: bytes | None,
        expected: bytes | None, ttl: float | None,
    ) -> asyncio.Future[tuple[bytes | None, bool]] | Awaitable[tuple[bytes | None, bool]]:
        """On the node's loop: the operation started by the node's `start_op` (no task for it), or
        else a coroutine of the `MapBackend` methods, with the slice code's trace context."""
        if self._starter is not None:
            fut = self._starter.start_op(name, op, key, value, expected, ttl, trace)
            if fut is not None:
                return fut
        coro = _map_op(self._inner, name, op, key, value, expected, ttl)
        return coro if trace is None else _Traced(trace, coro)

    async def map_keys(self, name: str, prefix: str = "") -> list[str]:
        return await self._thread.call_main(_traced(self._inner.map_keys(name, prefix)))

