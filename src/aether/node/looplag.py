"""`LoopLagProbe`: a minimal measurement of event-loop lag for the node status (and `aether
doctor`). It is a measurement only: nothing acts on it here (a watchdog that names the blocking
slice may use its own mechanism).

A task sleeps `interval` seconds again and again; the lag of one round is how much later than
asked it woke up. `max_recent` is the largest lag of the rounds that ended in the last `window`
seconds, so a block shows up for `window` seconds after it ended. A round still running counts
too (`pending`), so a loop blocked right now reports its lag once it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable


class LoopLagProbe:
    def __init__(
        self, interval: float = 0.05, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()  # (end time, lag)
        self._round_started: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aether-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def record(self, end: float, lag: float) -> None:
        self._samples.append((end, max(0.0, lag)))
        while self._samples and self._samples[0][0] < end - self.window:
            self._samples.popleft()

    def max_recent(self) -> float:
        """Largest lag (seconds) seen in the last `window` seconds, the running round included."""
        now = self._clock()
        worst = max((lag for t, lag in self._samples if t >= now - self.window), default=0.0)
        if self._round_started is not None:
            worst = max(worst, now - self._round_started - self.interval)
        return worst

    async def _run(self) -> None:
        while True:
            self._round_started = start = self._clock()
            await asyncio.sleep(self.interval)
            end = self._clock()
            self.record(end, end - start - self.interval)
