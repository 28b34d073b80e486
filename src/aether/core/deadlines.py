"""Deadlines of calls that run in their caller's task, watched by one sweep per loop.

`asyncio.timeout_at` arms and cancels a loop timer for every call, a tenth of a local call's time.
A `DeadlineSweep` keeps the limits of the calls running now instead and, every `every` seconds
while any runs, cancels the task of each call past its limit, as `asyncio.timeout_at` would: at
most `every` late, which is why it is for limits at least `SWEPT_FROM` seconds away (a shorter one
gets a timer of its own). Used by the invoker's local attempts (on the node's loop) and the direct
calls on the shared slice loop; one sweep belongs to one loop.
"""

from __future__ import annotations

import asyncio

__all__ = ["SWEEP_EVERY", "SWEPT_FROM", "Deadline", "DeadlineSweep"]

SWEPT_FROM = 1.0  # a limit at least this far away is watched by the sweep, not by a timer of its own
SWEEP_EVERY = 0.02


class Deadline:
    """The limit of one call watched by a `DeadlineSweep`; its task is cancelled once the limit has
    passed, as `asyncio.timeout_at` would."""

    __slots__ = ("cancelling", "expired", "limit", "task")

    def __init__(self, limit: float, task: asyncio.Task[object]) -> None:
        self.limit = limit
        self.task = task
        self.cancelling = task.cancelling()  # cancellations requested before this call
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def expired_here(self) -> bool:
        """For a CancelledError in the call: True when the sweep's cancellation caused it (and it is
        taken back), False when someone else cancelled the task too."""
        return self.expired and self.task.uncancel() <= self.cancelling


class DeadlineSweep:
    """The deadlines of the calls running on one loop, and the sweep that enforces them.

    `watch(limit)` in the call's task (on the sweep's loop) before it runs, `done(deadline)` in a
    `finally` after; a CancelledError the call sees is the deadline's when `expired_here()`."""

    def __init__(self, every: float = SWEEP_EVERY) -> None:
        self.every = every
        self._watching: set[Deadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, limit: float, task: asyncio.Task[object] | None = None) -> Deadline:
        """Watch the current task (or `task`) until `limit` (the loop's time)."""
        if task is None:
            task = asyncio.current_task()
            assert task is not None, "DeadlineSweep.watch outside a task"
        deadline = Deadline(limit, task)
        self._watching.add(deadline)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.every, self._sweep)
        return deadline

    def done(self, deadline: Deadline) -> None:
        self._watching.discard(deadline)

    def __len__(self) -> int:
        return len(self._watching)

    def _sweep(self) -> None:
        """Cancel the calls past their limit; again in `every` s while any runs."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for deadline in self._watching:
            if not deadline.expired and deadline.limit <= now:
                deadline.expire()
        self._handle = loop.call_later(self.every, self._sweep) if self._watching else None
