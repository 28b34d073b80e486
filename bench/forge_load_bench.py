"""Forge's load generator: its own CPU at the rates it offers (docs/forge.md, bench/README.md).

Starts a bare aiohttp server on loopback in a separate process (so the two CPUs are not mixed),
then drives it with `aether.forge.load.LoadGenerator` (two targets with templates, like the order
demo's) at each offered rate for a few seconds, and prints per rate the achieved rate and the
generator's CPU (% of one core, `LoadGenerator.cpu_seconds()`: the thread time of its event loop).

    .venv/bin/python bench/forge_load_bench.py [--rates 200,500,1000] [--seconds 5] [--uvloop]

The last line is machine-readable:
RESULT rate_200_cpu=.. rate_500_cpu=.. rate_1000_cpu=.. achieved_1000=..
"""

# ruff: noqa: E501  (the order-demo-like body line of the config)
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time

from aether.forge.config import parse_forge_config
from aether.forge.load import LoadGenerator

CONFIG = """
[load]
rate = 0
max_in_flight = 512
connections = 100
timeout = 5

[[load.targets]]
name = "place-order"
method = "POST"
path = "/api/orders"
weight = 3
headers = { "Content-Type" = "application/json" }
body = '{"customerId": "CUST-${range:1:500}", "items": [{"productId": "PROD-STICKER", "quantity": ${range:1:3}}]}'
expect = [200, 201]

[[load.targets]]
name = "get-order"
path = "/api/orders/${uuid}"
"""


def _process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def serve() -> None:
    """The server process: answers every request with a small JSON body; prints its port."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"orderId": "ORD-1", "status": "ok"})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())


async def drive(port: int, rates: list[int], seconds: float) -> dict[int, tuple[float, float, int]]:
    cfg = parse_forge_config(CONFIG, "bench").load
    gen = LoadGenerator(cfg, lambda: [f"127.0.0.1:{port}"], seed=1)
    out: dict[int, tuple[float, float, int]] = {}
    await gen.start()
    try:
        for rate in rates:
            gen.set_rate(rate)
            await asyncio.sleep(1.0)  # warm up: connections opened, the rate reached
            v0 = gen.snapshot().total
            c0, t0, p0 = gen.cpu_seconds(), time.monotonic(), _process_cpu()
            await asyncio.sleep(seconds)
            v1 = gen.snapshot().total
            c1, t1, p1 = gen.cpu_seconds(), time.monotonic(), _process_cpu()
            dt = t1 - t0
            achieved = ((v1.ok + v1.failed) - (v0.ok + v0.failed)) / dt
            cpu = 100.0 * (c1 - c0) / dt
            proc = 100.0 * (p1 - p0) / dt  # the whole process, every thread: a cross-check
            errors = (v1.failed - v0.failed) + (v1.dropped - v0.dropped)
            out[rate] = (cpu, achieved, errors)
            print(
                f"offered {rate:5d}/s  achieved {achieved:7.1f}/s  generator CPU {cpu:5.1f} % of a core"
                f" (process {proc:5.1f} %)"
                f"  failed+dropped {errors}  p50 {v1.p50_ms} ms  p99 {v1.p99_ms} ms (so far)",
                flush=True,
            )
    finally:
        await gen.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,500,1000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--uvloop", action="store_true", help="run the generator on uvloop (Forge's loop)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    rates = [int(r) for r in args.rates.split(",")]
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.strip():
            raise SystemExit("the bench server did not start")
        port = int(line)
        if args.uvloop:
            import uvloop

            out = uvloop.run(drive(port, rates, args.seconds))
        else:
            out = asyncio.run(drive(port, rates, args.seconds))
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    fields = [f"rate_{r}_cpu={out[r][0]:.1f}" for r in rates]
    top = max(rates)
    fields.append(f"achieved_{top}={out[top][1]:.1f}")
    fields.append(f"errors={sum(e for _, _, e in out.values())}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
