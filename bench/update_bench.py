"""Zero-downtime updates: how long a rolling update of 3 instances takes, how many requests fail
meanwhile, p99 during the update against steady state, and how many requests a failing canary
costs before its automatic rollback.

Starts 3 real node processes (`aether.forge.supervisor.ForgeCluster`, a temporary repository with
four versions of one hello slice: 0.1.0 and 0.2.0 answer, 0.3.0 likewise, 0.4.0 fails every other
call; every `start()` takes `--start-delay` seconds, as a slice that opens connections would),
deploys 3 instances of 0.1.0 and keeps a steady closed-loop HTTP load (`--workers` clients,
round-robin over the 3 nodes' routers). Then, `--rounds` times:

1. steady: `--steady` seconds of load, p99 of those requests;
2. a rolling update to the other good version (0.1.0 <-> 0.2.0; `POST /api/v1/rollouts`, waited
   for): its wall time, the requests that failed (any non-2xx or connection error) and the p99 of
   the requests answered during it.

Finally a canary of 0.4.0 (steps 1, 50, 100 %, `max_error_rate` 0.1) and its rollback: the share
of the requests sent while it ran that failed.

The last line: `RESULT update_s=.. failed=.. p99_update_ms=.. p99_steady_ms=.. rollback_failed_pct=..
requests=..` (medians over the rounds; `failed` is the total over every update).

    .venv/bin/python bench/update_bench.py [--rounds 3] [--workers 8] [--steady 5] [--start-delay 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from aether.forge.supervisor import ForgeCluster  # noqa: E402
from aether.slices.repository import Repository  # noqa: E402
from aether.slices.testing import build_slice_wheel  # noqa: E402

NAME = "org.bench:hello"
SOURCE = """
import asyncio
import itertools

from aether.slices import Slice, route


class Hello(Slice):
    async def start(self) -> None:
        await asyncio.sleep(START_DELAY)
        self.calls = itertools.count()

    @route("GET", "/hello/{name}")
    async def greet(self, name: str) -> dict:
        if HALF_FAIL and next(self.calls) % 2:
            raise RuntimeError("half of the calls fail")
        return {"version": "VERSION", "name": name}
"""
VERSIONS = {"0.1.0": False, "0.2.0": False, "0.4.0": True}


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))] * 1000


class Load:
    def __init__(self, urls: list[str], workers: int) -> None:
        self.urls = urls
        self.workers = workers
        self.answers: list[tuple[float, float, bool]] = []  # (end time, latency s, ok)
        self._stop = asyncio.Event()

    async def _run(self, k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while not self._stop.is_set():
            url = self.urls[i % len(self.urls)]
            i += 1
            t = time.monotonic()
            try:
                async with session.get(f"{url}/hello/bench") as r:
                    await r.read()
                    ok = 200 <= r.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            now = time.monotonic()
            self.answers.append((now, now - t, ok))

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._tasks = [asyncio.create_task(self._run(k, self._session)) for k in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    def window(self, t0: float, t1: float) -> list[tuple[float, float, bool]]:
        return [a for a in self.answers if t0 <= a[0] <= t1]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aether-update-bench-") as tmp:
        repo = Repository(Path(tmp) / "repo")
        for version, half in VERSIONS.items():
            source = (SOURCE.replace("START_DELAY", repr(args.start_delay)).replace("HALF_FAIL", repr(half))
                      .replace("VERSION", version))  # fmt: skip
            repo.deploy(build_slice_wheel(Path(tmp) / "wheels", f"{NAME}:{version}", source, "Hello",
                                          module="bench_hello"))  # fmt: skip
        forge = ForgeCluster(Path(tmp) / "forge", nodes=3, repository=Path(tmp) / "repo",
                             fault_injection=False)  # fmt: skip
        async with forge:
            toml = f'id = "hello"\n[slices.hello]\nartifact = "{NAME}:0.1.0"\ninstances = 3\n'
            await forge.api("POST", "/api/v1/blueprints", {"toml": toml})
            await forge.api("POST", "/api/v1/blueprints/hello/wait?timeout=60", timeout=70)
            urls = [f"http://{a}" for a in forge.http_addresses()]
            rounds: list[dict[str, float]] = []
            async with Load(urls, args.workers) as load:
                current = "0.1.0"
                for k in range(args.rounds):
                    t = time.monotonic()
                    await asyncio.sleep(args.steady)
                    steady = load.window(t, time.monotonic())
                    target = "0.2.0" if current == "0.1.0" else "0.1.0"
                    t0 = time.monotonic()
                    await forge.api("POST", "/api/v1/rollouts", {"artifact": NAME, "version": target})
                    r = await forge.api("POST", f"/api/v1/rollouts/{NAME}/wait?timeout=120", timeout=130)
                    t1 = time.monotonic()
                    if r["state"] != "succeeded":
                        raise SystemExit(f"round {k + 1}: the rollout ended {r['state']}: {r['reason']}")
                    current = target
                    during = load.window(t0, t1)
                    res = {
                        "update_s": t1 - t0, "failed": sum(1 for a in during if not a[2]),
                        "p99_update_ms": p99([a[1] for a in during]),
                        "p99_steady_ms": p99([a[1] for a in steady]), "requests": len(during),
                    }  # fmt: skip
                    rounds.append(res)
                    print(f"round {k + 1}: {current}: update {res['update_s']:.2f} s, {res['requests']} req, "
                          f"{res['failed']} failed, p99 {res['p99_update_ms']:.1f} ms (steady "
                          f"{res['p99_steady_ms']:.1f} ms)", flush=True)  # fmt: skip
                t2 = time.monotonic()
                await forge.api("POST", "/api/v1/rollouts", {
                    "artifact": NAME, "version": "0.4.0", "strategy": "canary", "steps": [1, 50, 100],
                    "interval": 30, "max_error_rate": 0.1, "min_calls": 6,
                })  # fmt: skip
                r = await forge.api("POST", f"/api/v1/rollouts/{NAME}/wait?timeout=120", timeout=130)
                t3 = time.monotonic()
                canary = load.window(t2, t3)
                bad = sum(1 for a in canary if not a[2])
                print(f"canary of 0.4.0: {r['state']} after {t3 - t2:.1f} s ({r['reason']}); {bad} of "
                      f"{len(canary)} requests failed", flush=True)  # fmt: skip
                await asyncio.sleep(1.0)
                after = load.window(t3 + 0.5, time.monotonic())
                if any(not a[2] for a in after):
                    raise SystemExit("requests failed after the rollback")
    return {
        "update_s": round(statistics.median(r["update_s"] for r in rounds), 2),
        "failed": sum(int(r["failed"]) for r in rounds),
        "p99_update_ms": round(statistics.median(r["p99_update_ms"] for r in rounds), 1),
        "p99_steady_ms": round(statistics.median(r["p99_steady_ms"] for r in rounds), 1),
        "rollback_failed_pct": round(100 * bad / max(1, len(canary)), 2),
        "requests": sum(int(r["requests"]) for r in rounds),
        "rolled_back": r["state"] == "rolled-back",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8, help="concurrent HTTP clients")
    ap.add_argument("--steady", type=float, default=5.0, help="seconds of steady load before each update")
    ap.add_argument("--start-delay", type=float, default=0.5, help="seconds each instance's start() takes")
    res = asyncio.run(run(ap.parse_args()))
    print("RESULT " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
