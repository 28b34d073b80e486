"""`run_every`: a fixed-rate loop for the adapters that act once per interval (metrics, controller)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["run_every"]


async def run_every(interval: float, step: Callable[[], object], log: logging.Logger, what: str) -> None:
    """Call `step()` every `interval` seconds until cancelled, on a fixed schedule (a slow step does
    not shift the next ones). After a stall longer than one interval (a blocked loop) the schedule
    restarts from now instead of catching up with a burst. An exception in `step` is logged (as
    `what`) and the loop goes on."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        if loop.time() - next_at > interval:
            next_at = loop.time()
        try:
            step()
        except Exception:
            log.exception("%s failed", what)
