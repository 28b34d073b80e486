"""An asyncio event loop on virtual time, for deterministic simulations.

`VirtualTimeLoop.time()` returns a virtual clock that starts at `start` and only moves when
the loop has nothing ready to run: it then jumps straight to the next scheduled timer, so a
simulated second costs only the callbacks that run in it. There are no sockets, threads or
file descriptors: the "selector" never waits. With nothing ready and no timer scheduled while
`run_until_complete` still waits, the simulated world is deadlocked and `SimDeadlock` is raised.

Everything asyncio offers on top of `call_soon`/`call_later` (tasks, `sleep`, `wait_for`,
`wait`, futures) runs unchanged, so real code under test (`ConsensusRunner`, `KVStore`) uses
it as it would on a real loop.
"""

from __future__ import annotations

import asyncio
from typing import Any


class SimDeadlock(RuntimeError):
    """Nothing is ready, no timer is scheduled, yet the loop was asked to keep running."""


class _VirtualSelector:
    """Stands in for the I/O selector: never blocks, advances virtual time instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise SimDeadlock("virtual loop: nothing ready and no timer scheduled")
        if timeout > 0:
            self._loop._now += timeout
        return []

    def close(self) -> None:
        pass

    def get_map(self) -> dict[Any, Any]:
        return {}


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """A `BaseEventLoop` whose clock is virtual (see the module docstring)."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._now = float(start)
        self._selector = _VirtualSelector(self)
        # timers due within this much of now run in this iteration (virtual time is exact, but
        # `now + (when - now)` may differ from `when` by a rounding step)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def close(self) -> None:
        super().close()
        self._selector.close()
