"""Capacity of one slice instance: its concurrency limits, the queue behind them, its load counters.

Owns `SliceLimits` (what a blueprint's `max_concurrency`, `max_queue` and `entry_concurrency` say
for one artifact), `InstanceLoad` (one instance's gauges and cumulative counters, what
`SliceRuntime.instance_loads` reports; the node turns them into `aether.metrics` counters) and
`Gate`, the admission of calls to one instance under limits (docs/slices.md, *Concurrency limits*):

- a call runs at once when the instance runs fewer than `max_concurrency` calls and its entry fewer
  than its `entry_concurrency` limit;
- otherwise it waits in the instance's FIFO queue; a freed slot goes to the oldest waiting call
  that may run (a call held back by its entry's limit does not hold back the calls of other entries);
- a call that finds the queue full (`max_queue` waiting calls; default 10 x `max_concurrency`, or
  10 x the entry's limit when only entries are limited) is refused at once (`InstanceOverloaded`);
- a waiting call that is cancelled (its caller gave up) leaves the queue.

No clock, no I/O: one event loop (the node's) drives it. May import `aether.core`, `aether.slices`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["DEFAULT_QUEUE_FACTOR", "Gate", "InstanceLoad", "SliceLimits"]

DEFAULT_QUEUE_FACTOR = 10
"""The queue bound when a limit is set but `max_queue` is not: this many times the limit."""


@dataclass(frozen=True, slots=True)
class SliceLimits:
    """The concurrency limits of one artifact's instances (each instance has its own)."""

    max_concurrency: int | None = None
    """Calls one instance runs at once (None: no limit)."""
    max_queue: int | None = None
    """Calls one instance queues beyond its limits (None: `DEFAULT_QUEUE_FACTOR` x the limit)."""
    entry_concurrency: Mapping[str, int] = field(default_factory=dict)
    """Calls of one entry one instance runs at once."""

    @property
    def limited(self) -> bool:
        """True when some limit is set (the instances get a `Gate`)."""
        return self.max_concurrency is not None or bool(self.entry_concurrency)


NO_LIMITS = SliceLimits()


@dataclass(slots=True)
class InstanceLoad:
    """One instance: gauges now, counters since it started (`SliceRuntime.instance_loads`)."""

    artifact: str  # full coordinates
    instance: int
    in_flight: int  # calls running now
    queued: int  # calls waiting for a slot
    admitted: int  # calls accepted (run or queued) since it started
    rejected: int  # calls refused because the queue was full
    calls: int  # calls finished
    failures: int  # finished calls that failed (5xx; 4xx answers are the caller's mistake)
    busy_seconds: float  # execution time of the finished calls, queue wait excluded
    started: float  # time.monotonic() when the instance started
    healthy: bool | None = None  # the last health() answer; None: no check, or none ran yet
    health_failures: int = 0  # consecutive failed health checks
    health_reason: str | None = None  # why the last check failed (redacted)


class Gate:
    """Admission of calls to one instance under `SliceLimits` (see the module docstring)."""

    __slots__ = ("by_entry", "entry_limits", "limit", "queue_max", "queued_by_entry", "running", "waiters")

    def __init__(self, limits: SliceLimits) -> None:
        self.running = 0  # calls holding a slot
        self.by_entry: dict[str, int] = {}
        self.queued_by_entry: dict[str, int] = {}
        self.waiters: deque[tuple[str, asyncio.Future[None]]] = deque()
        self.limit: int | None = None
        self.entry_limits: dict[str, int] = {}
        self.queue_max: int | None = None
        self.configure(limits)

    def configure(self, limits: SliceLimits) -> None:
        """Take new limits (a re-applied blueprint); waiting calls that now may run are started."""
        self.limit = limits.max_concurrency
        self.entry_limits = dict(limits.entry_concurrency)
        if limits.max_queue is not None:
            self.queue_max = limits.max_queue
        elif self.limit is not None:
            self.queue_max = DEFAULT_QUEUE_FACTOR * self.limit
        else:
            self.queue_max = None  # per entry: DEFAULT_QUEUE_FACTOR x its limit
        self._wake()

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def free(self, entry: str) -> bool:
        """Would a call of `entry` run at once?"""
        if self.limit is not None and self.running >= self.limit:
            return False
        el = self.entry_limits.get(entry)
        return el is None or self.by_entry.get(entry, 0) < el

    def _room(self, entry: str) -> bool:
        if self.queue_max is not None:
            return len(self.waiters) < self.queue_max
        el = self.entry_limits.get(entry)
        return el is None or self.queued_by_entry.get(entry, 0) < DEFAULT_QUEUE_FACTOR * el

    def _take(self, entry: str) -> None:
        self.running += 1
        self.by_entry[entry] = self.by_entry.get(entry, 0) + 1

    def enter(self, entry: str) -> asyncio.Future[None] | bool:
        """A call of `entry` arrives: True (it holds a slot: run it), a future (queued: await it,
        then it holds a slot; on cancellation call `abandon`), or False (the queue is full: refuse)."""
        if self.free(entry):
            self._take(entry)
            return True
        if not self._room(entry):
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((entry, fut))
        self.queued_by_entry[entry] = self.queued_by_entry.get(entry, 0) + 1
        return fut

    def leave(self, entry: str) -> None:
        """A call that held a slot finished: give the slot to the oldest waiting call that may run."""
        self.running -= 1
        n = self.by_entry.get(entry, 0) - 1
        if n > 0:
            self.by_entry[entry] = n
        else:
            self.by_entry.pop(entry, None)
        if self.waiters:
            self._wake()

    def abandon(self, fut: asyncio.Future[None], entry: str) -> None:
        """The queued call of `fut` was cancelled: it leaves the queue (or gives back the slot it
        was handed just before)."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.leave(entry)  # it got a slot but will not run
            return
        try:
            self.waiters.remove((entry, fut))
        except ValueError:
            return
        self._unqueue(entry)

    def fail_waiting(self, error: Callable[[], BaseException]) -> int:
        """Fail every waiting call with `error()` (the instance stops); returns how many."""
        n = 0
        while self.waiters:
            entry, fut = self.waiters.popleft()
            self._unqueue(entry)
            if not fut.done():
                fut.set_exception(error())
                n += 1
        return n

    def _unqueue(self, entry: str) -> None:
        q = self.queued_by_entry.get(entry, 0) - 1
        if q > 0:
            self.queued_by_entry[entry] = q
        else:
            self.queued_by_entry.pop(entry, None)

    def _wake(self) -> None:
        waiters = self.waiters
        if not waiters:
            return
        if not self.entry_limits:  # one FIFO, no per-entry holds: O(1) per slot handed out
            while waiters and (self.limit is None or self.running < self.limit):
                entry, fut = waiters.popleft()
                self._unqueue(entry)
                if fut.done():  # cancelled: its abandon() will find it gone
                    continue
                self._take(entry)
                fut.set_result(None)
            return
        for item in list(waiters):
            if self.limit is not None and self.running >= self.limit:
                break
            entry, fut = item
            if fut.done():  # cancelled; its task calls abandon() when it runs
                continue
            if self.free(entry):
                waiters.remove(item)
                self._unqueue(entry)
                self._take(entry)
                fut.set_result(None)
