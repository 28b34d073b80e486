#!/usr/bin/env python3
"""CPU cost of one remote slice call, both sides, in one process (issue 19, remote calls).

Two nodes in one process on one event loop (uvloop when installed): node A's `Invoker` calls an
entry whose only instance is on node B, over two real `Transport`s on loopback (authenticated
links, the node's framing, codec and write coalescing), B's `InvokeServer` runs it on a fake slice
runtime that answers at once. Everything both nodes do for a call runs on this one thread, so
the CPU time per call is that of a remote call, caller and callee together. Beside
it, in the same run and on the same loop:

- ``local``: the same invoker calling an instance on its own node (A with a local instance);
- ``bare``: one loopback round trip in the same framing and codec with nothing around it (an
  `InvokeRequest` frame out, an `InvokeResponse` frame back, a future per call, frames of one loop
  turn written together): the physical floor of a remote call.

Rounds alternate the order of the three modes; the figures are medians of the rounds. What it
leaves out, on purpose: the slice threads (a real call also crosses to the slice's own loop and
back, the same for local and remote) and the second process (on a real cluster the two sides run
in parallel on two cores). `bench/invoke_bench.py` measures those on real nodes.

The ``*_us`` figures are CPU time of this process per call (``time.process_time``: user + system,
the kernel's loopback work included), so other processes on the machine barely move them; calls/s
(wall clock) is given too but swings with the machine's load.

The goal "remote calls at least as fast as local ones minus one loopback hop" reads here as
``remote_us <= local_us + bare_us``: ``remote_excess_us = remote_us - local_us - bare_us`` is what the
remote path costs beyond a local call and the bare hop (0 or less: goal met).

    .venv/bin/python bench/remote_path_bench.py [--calls 20000] [--concurrency 32] [--rounds 5]

Final line:
``RESULT remote_us=... local_us=... bare_us=... remote_excess_us=... remote_calls_s=... local_calls_s=...
bare_calls_s=... rounds=...``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from typing import Any

import barehop
from aether.testing.invokenodes import Endpoint, StaticRegistry, make_invoke_node, start_nodes, stop_nodes

HOST = "127.0.0.1"
ART = "org.bench:echo:1.0.0"
TARGET = "org.bench:echo"


def log(msg: str) -> None:
    print(f"[remote-path {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Slices:
    """A slice runtime whose one entry answers at once."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def has_room(self, target: str, method: str) -> bool:
        return bool(self.local_instances(target))

    def local_instances(self, target: str) -> list[int]:
        return [0] if self.active and ART.startswith(target) else []

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        return barehop.REPLY


async def run_calls(call: Any, calls: int, concurrency: int) -> tuple[float, float]:
    """`calls` calls of ``await call()`` by `concurrency` callers: (calls/s, CPU µs per call)."""
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - t0), (time.process_time() - c0) * 1e6 / calls


async def main_async(a: argparse.Namespace) -> dict[str, object]:
    logging.basicConfig(level=logging.ERROR)
    registry = StaticRegistry([Endpoint(ART, "greet", 0, "B"), Endpoint(ART, "greet", 0, "L")])
    nodes = {
        node_id: make_invoke_node(
            node_id,
            Slices(active),
            registry,
            cluster_name="bench",
            logger=logging.getLogger(f"bench.{node_id}"),
        )
        for node_id, active in (("A", False), ("B", True), ("L", True))
    }
    a_inv, l_inv = nodes["A"].invoker, nodes["L"].invoker
    await start_nodes([nodes["A"], nodes["B"]])  # A calls B
    await nodes["L"].transport.start()  # L calls itself
    bare_server = await barehop.serve(HOST)
    bare = await barehop.connect(HOST, bare_server.sockets[0].getsockname()[1], ART)
    arg = barehop.ARG

    async def remote() -> bytes:
        return await a_inv.invoke(TARGET, "greet", arg)

    async def local() -> bytes:
        return await l_inv.invoke(TARGET, "greet", arg)

    modes = {"local": local, "remote": remote, "bare": bare.call}
    if a.only:
        modes = {a.only: modes[a.only]}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for fn in modes.values():  # warm-up
            await run_calls(fn, a.calls // 4, a.concurrency)
        names = list(modes)
        for r in range(a.rounds):
            for m in names[r % len(names) :] + names[: r % len(names)]:
                rate, us = await run_calls(modes[m], a.calls, a.concurrency)
                rates[m].append(rate)
                cpu[m].append(us)
                log(f"round {r + 1} {m}: {rate:,.0f} calls/s, {us:.1f} µs CPU per call")
    finally:
        bare.close()
        bare_server.close()
        await stop_nodes(nodes.values(), grace=1.0)
    if a.only:
        return {f"{a.only}_us": statistics.median(cpu[a.only]), "rounds": a.rounds}
    med = {m: statistics.median(v) for m, v in rates.items()}
    us = {m: statistics.median(v) for m, v in cpu.items()}
    return {
        "remote_us": us["remote"],
        "local_us": us["local"],
        "bare_us": us["bare"],
        "remote_excess_us": us["remote"] - us["local"] - us["bare"],
        "remote_calls_s": med["remote"],
        "local_calls_s": med["local"],
        "bare_calls_s": med["bare"],
        "rounds": a.rounds,
        "remote_runs_us": "/".join(f"{x:.1f}" for x in cpu["remote"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--only", choices=("local", "remote", "bare"), help="one mode (for profiling it)")
    a = ap.parse_args()
    if a.no_uvloop:
        res = asyncio.run(main_async(a))
    else:
        import uvloop

        res = uvloop.run(main_async(a))
    shown = (f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
    print("RESULT " + " ".join(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
