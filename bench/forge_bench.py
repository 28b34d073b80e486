"""Forge's own cost and reaction: idle CPU and memory of 5 nodes + dashboard + load generator, and
how fast the dashboard shows a killed node.

Starts a Forge in this process (`aether.forge.app.open_forge`: N node processes, the order demo's
blueprint when its wheels are built, the load generator paused, the dashboard server), opens the
dashboard in Debian's Chromium (Playwright) so the page polls as a user's would, then:

1. idle: over `--seconds`, the CPU time of this process (Forge: server, supervisor's poller,
   generator) plus every node process, as a percentage of one core, and their PSS summed
   (`psutil.Process.memory_full_info().pss`; Chromium and Playwright's driver are not Forge and are
   left out);
2. kill reflection, `--kills` times: SIGKILL a follower through the REST API and time until the page
   shows it down (`[data-testid=node-ID][data-state=down]`), then restart it and wait until it is up.
   Without Chromium, the time until `GET /api/state` says it is down (printed as `api_` keys).

The last line: `RESULT nodes=5 idle_cpu_pct=.. pss_mb=.. forge_cpu_pct=.. nodes_cpu_pct=..
kill_shown_ms_median=.. kill_shown_ms_max=..`.

    .venv/bin/python bench/forge_bench.py [--nodes 5] [--seconds 30] [--kills 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from aether.forge.app import ForgeOptions, open_forge, options_from_config  # noqa: E402
from aether.forge.config import load_forge_config  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def pss_bytes(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def node_procs(forge: Any) -> list[psutil.Process]:
    out = []
    for n in forge.cluster.view().nodes:
        if n.pid:
            try:
                out.append(psutil.Process(n.pid))
            except psutil.Error:
                pass
    return out


async def state_down(session: aiohttp.ClientSession, base: str, token: str, node: str) -> bool:
    async with session.get(f"{base}/api/state", headers={"Authorization": f"Bearer {token}"}) as r:
        data = await r.json()
    return any(n["id"] == node and n["state"] != "up" for n in data["cluster"]["nodes"])


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--no-demo", action="store_true", help="no blueprint, no load targets")
    args = ap.parse_args()

    config = ROOT / "examples/order_demo/forge-config.toml"
    wheels = ROOT / "build/examples/order_demo"
    with tempfile.TemporaryDirectory(prefix="aether-forge-bench-") as tmp:
        opts = ForgeOptions(nodes=args.nodes, port=0, workdir=Path(tmp) / "forge")
        if not args.no_demo and any(wheels.glob("*.whl")):
            opts = options_from_config(load_forge_config(config))  # what `make demo` runs
            opts.nodes, opts.port, opts.workdir, opts.wheels = args.nodes, 0, Path(tmp) / "forge", wheels
        elif not args.no_demo:
            print(f"(no demo wheels in {wheels}: `make demo` or examples/build.py builds them; "
                  "running without the blueprint)", file=sys.stderr)
        async with open_forge(opts, say=lambda t: print(t, file=sys.stderr)) as (forge, url):
            if forge.load is not None:
                forge.load.pause()
            base = url.split("/?", 1)[0]
            browser_ctx = None
            page = None
            pw = None
            if os.path.exists(CHROMIUM):
                try:
                    from playwright.async_api import async_playwright

                    pw = await async_playwright().start()
                    browser_ctx = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    page = await browser_ctx.new_page()
                    await page.goto(url)
                except Exception as e:  # the idle numbers are still worth having
                    print(f"(no browser: {e})", file=sys.stderr)
                    page = None
            await asyncio.sleep(5)  # settle: start-up work done, the page polling
            me = psutil.Process()
            nodes = node_procs(forge)
            c0, n0, t0 = cpu_seconds([me]), cpu_seconds(nodes), time.monotonic()
            await asyncio.sleep(args.seconds)
            c1, n1, t1 = cpu_seconds([me]), cpu_seconds(nodes), time.monotonic()
            forge_pct = 100 * (c1 - c0) / (t1 - t0)
            nodes_pct = 100 * (n1 - n0) / (t1 - t0)
            pss = pss_bytes([me, *nodes])

            shown: list[float] = []
            async with aiohttp.ClientSession() as session:
                for _ in range(args.kills):
                    view = forge.cluster.view()
                    victim = next(n.id for n in view.nodes if n.state == "up" and not n.leader)
                    start = time.monotonic()
                    async with session.post(f"{base}/api/nodes/{victim}/kill",
                                            headers={"Authorization": f"Bearer {opts.token}"}) as r:
                        assert r.status == 200, await r.text()
                    if page is not None:
                        await page.wait_for_selector(
                            f'[data-testid="node-{victim}"][data-state="down"]', timeout=10_000)
                    else:
                        while not await state_down(session, base, opts.token, victim):
                            await asyncio.sleep(0.02)
                    shown.append(1000 * (time.monotonic() - start))
                    await forge.cluster.restart(victim)
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        if any(n.id == victim and n.state == "up" and n.ready
                               for n in forge.cluster.view().nodes):
                            break
                        await asyncio.sleep(0.2)
            if browser_ctx is not None:
                await browser_ctx.close()
            if pw is not None:
                await pw.stop()
    prefix = "kill_shown" if page is not None else "api_kill_shown"
    print(f"idle over {args.seconds:g} s: Forge {forge_pct:.1f} %, nodes {nodes_pct:.1f} % of one core; "
          f"PSS {pss / 2**20:.0f} MB; kill shown after {', '.join(f'{x:.0f}' for x in shown)} ms")
    print(
        f"RESULT nodes={args.nodes} idle_cpu_pct={forge_pct + nodes_pct:.1f} pss_mb={pss / 2**20:.0f} "
        f"forge_cpu_pct={forge_pct:.1f} nodes_cpu_pct={nodes_pct:.1f} "
        f"{prefix}_ms_median={statistics.median(shown) if shown else 0:.0f} "
        f"{prefix}_ms_max={max(shown) if shown else 0:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
