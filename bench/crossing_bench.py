#!/usr/bin/env python3
"""What one crossing between a slice's loop and its node's loop costs (`aether.slices.isolation`).

A slice that runs on a loop of its own (``isolation = "thread"`` or ``"shared"``) reaches its node
(a map operation, a call to a slice elsewhere) through `SliceThread.call_main`: the request is
queued for the node's loop, that loop is woken, runs it, and the result is queued back and the
slice's loop woken. This measures that round trip in one process with the node's own machinery
(uvloop on both loops, as in a node), against the same awaits on one loop (``inline``):

- ``single``: one caller, one call after the other: every crossing wakes a sleeping thread;
- ``batched``: `--conc` callers at once: one wake-up carries many calls (what load does);
- ``inline``: the callers await the coroutine directly on one loop (no crossing at all).

For each: calls per second, CPU (user + system) per call, system CPU per call and context
switches per call, from `getrusage` of the process. `--pin` first pins the process (every thread)
to one CPU: the two loops then hand over on one core instead of waking each other across cores.

```bash
.venv/bin/python bench/crossing_bench.py                # ~10 s
.venv/bin/python bench/crossing_bench.py --pin --seconds 3
```

Final line: ``RESULT single_cpu_us=... batched_cpu_us=... inline_cpu_us=... single_ctxsw=...
batched_ctxsw=... single_rps=... batched_rps=... inline_rps=... pinned=0|1``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aether.slices.isolation import SliceThread


async def _noop() -> int:
    return 1


async def _drive(call: Callable[[], Awaitable[Any]], conc: int, seconds: float) -> int:
    """`conc` callers making `call()` one after the other for `seconds`; the calls made. (A call
    that completes without suspending, the inline way, never lets the loop turn: each caller then
    yields once per 256 calls, so that the others run too.)"""
    done = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < end:
            for _ in range(256):
                await call()
            done += 256
            await asyncio.sleep(0)

    await asyncio.gather(*(caller() for _ in range(conc)))
    return done


async def measure(mode: str, conc: int, seconds: float) -> dict[str, float]:
    """One measurement: calls per second and CPU, system CPU and context switches per call."""
    thread = SliceThread("bench") if mode != "inline" else None
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if thread is None:
        calls = await _drive(_noop, conc, seconds)
    else:
        th = thread
        calls = await th.run(_drive(lambda: th.call_main(_noop()), conc, seconds))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if thread is not None:
        await thread.close()
    n = max(1, calls)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    switches = (r1.ru_nvcsw - r0.ru_nvcsw) + (r1.ru_nivcsw - r0.ru_nivcsw)
    return {
        "rps": calls / wall,
        "cpu_us": (user + system) / n * 1e6,
        "sys_us": system / n * 1e6,
        "ctxsw": switches / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--conc", type=int, default=16, help="callers at once for `batched` (default 16)")
    ap.add_argument("--pin", action="store_true", help="pin the process to one CPU first")
    a = ap.parse_args()
    if a.seconds <= 0 or a.conc < 1:
        ap.error("--seconds must be > 0 and --conc >= 1")
    if a.pin:
        cpu = min(os.sched_getaffinity(0))
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {cpu})
        os.sched_setaffinity(0, {cpu})  # and the threads started from now on
    try:
        import uvloop
    except ImportError:
        print("uvloop is not installed: the node's loops are measured with asyncio's", file=sys.stderr)
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    res: dict[str, dict[str, float]] = {}
    for mode, conc in (("single", 1), ("batched", a.conc), ("inline", a.conc)):
        res[mode] = r = asyncio.run(measure(mode, conc, a.seconds))
        print(
            f"{mode:8} callers={conc:<3} {r['rps']:>9,.0f} calls/s  {r['cpu_us']:6.1f} us CPU per call "
            f"({r['sys_us']:5.1f} system)  {r['ctxsw']:5.2f} context switches per call",
            flush=True,
        )
    print(
        "RESULT "
        + " ".join(f"{m}_cpu_us={res[m]['cpu_us']:.1f}" for m in res)
        + " ".join(["", *(f"{m}_ctxsw={res[m]['ctxsw']:.2f}" for m in ("single", "batched"))])
        + " ".join(["", *(f"{m}_rps={res[m]['rps']:.0f}" for m in res)])
        + f" pinned={int(a.pin)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
