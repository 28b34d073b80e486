"""`aether.core.periodic.run_every`: fixed schedule, errors logged and survived, no burst after a stall."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from aether.core.periodic import run_every

pytestmark = pytest.mark.timeout(30)


async def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("boom")

    task = asyncio.ensure_future(run_every(0.02, step, logging.getLogger("t"), "the step"))
    while len(calls) < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    assert "the step failed" in caplog.text and "boom" in caplog.text


async def test_after_a_stall_it_does_not_catch_up_with_a_burst() -> None:
    calls: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            time.sleep(0.3)  # blocks the loop for 15 intervals

    task = asyncio.ensure_future(run_every(0.02, step, logging.getLogger("t"), "the step"))
    while len(calls) < 6:
        await asyncio.sleep(0.005)
    task.cancel()
    # catching up would run the 15 missed steps at once; the schedule restarts instead (a slow
    # machine only spreads the steps further)
    soon = [t for t in calls[2:] if t - calls[2] < 0.03]
    assert len(soon) <= 3, [round(t - calls[2], 4) for t in calls[2:]]
