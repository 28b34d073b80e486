#!/usr/bin/env python3
"""Distributed-map benchmark from slice code on real node processes, against a local Redis.

A driver slice (`org.bench:driver`, built here) runs `--concurrency` callers inside the cluster
doing `await m.put(key, value)` (then `await m.get(key)`) on `self.map("bench", bytes)` for
`--seconds` per phase, over `--keys` keys with `--value-size`-byte values, and reports ops/s and
latency percentiles. The map is defined first through `POST /api/v1/maps` (replicas 3, write quorum
2 by default); the bench triggers the driver through `POST /api/v1/invoke/org.bench:driver/run`.
One driver instance: with keys spread by the partition table about 1/3 of the operations have a
local primary, the rest take one transport hop (puts also wait for a second replica).

In the same run the bench starts `redis-server` (127.0.0.1, free port, no persistence) and drives it
with redis-py's asyncio client (one client, connection pool sized for the concurrency) at the same
concurrency, value size, key count and phase length (SET, then GET). `--skip-redis` leaves it out.
Final line:
`RESULT put_ops_s=... get_ops_s=... redis_put_ops_s=... redis_get_ops_s=... put_p99_ms=... get_p99_ms=...
put_p50_ms=... get_p50_ms=... redis_put_p99_ms=... redis_get_p99_ms=... put_ratio=... get_ratio=...`
(ratio = aether / redis ops/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from invoke_bench import http, wait_converged  # noqa: E402
from kv_bench import HOST, Cluster, free_ports, log, pct  # noqa: E402

DRIVER = """
import asyncio
import time

import msgspec

from aether.slices import Slice, entry


class Run(msgspec.Struct):
    op: str = "put"
    map: str = "bench"
    seconds: float = 10.0
    max_ops: int = 0
    concurrency: int = 64
    keys: int = 10000
    value_size: int = 100


class Result(msgspec.Struct):
    op: str
    ops: int
    errors: int
    error_types: dict
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    missing: int
    node: str


def pct(xs, p):
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


class Driver(Slice):
    @entry
    async def run(self, req: Run) -> Result:
        m = self.map(req.map, bytes)
        value = b"x" * req.value_size
        keys = [f"k{i:08d}" for i in range(req.keys)]
        nkeys = len(keys)
        lats = []
        errors = 0
        missing = 0
        kinds = {}
        counter = 0
        pc = time.perf_counter
        t0 = pc()
        deadline = t0 + req.seconds
        cap = req.max_ops or (1 << 62)
        is_put = req.op == "put"

        async def worker():
            nonlocal counter, errors, missing
            while counter < cap and pc() < deadline:
                key = keys[counter % nkeys]
                counter += 1
                s = pc()
                try:
                    if is_put:
                        await m.put(key, value)
                    elif await m.get(key) is None:
                        missing += 1
                    lats.append(pc() - s)
                except Exception as e:
                    errors += 1
                    name = type(e).__name__
                    kinds[name] = kinds.get(name, 0) + 1

        await asyncio.gather(*(worker() for _ in range(req.concurrency)))
        secs = pc() - t0
        lats.sort()
        return Result(req.op, len(lats), errors, kinds, secs, len(lats) / secs, pct(lats, 50) * 1e3,
                      pct(lats, 99) * 1e3, missing, self.context.node_id)
"""


# ---------------------------------------------------------------- Redis baseline


def ensure_redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    log("redis-server not found; installing the Debian package")
    cmd = ["apt-get", "install", "-y", "redis-server"]
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise RuntimeError("redis-server is missing and neither root nor sudo is available")
        cmd = ["sudo", *cmd]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server still not on PATH after apt-get install")
    return exe


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    exe = ensure_redis_server()
    port = free_ports(1)[0]
    logf = open(os.path.join(workdir, "redis.log"), "ab")  # noqa: SIM115
    p = subprocess.Popen(
        [exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", workdir, "--daemonize", "no", "--protected-mode", "no"],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return p, port


def stop_pid(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


async def redis_phase(port: int, op: str, a: argparse.Namespace, seconds: float) -> dict:
    import redis.asyncio as aredis

    client = aredis.Redis(host=HOST, port=port, max_connections=a.concurrency + 8)
    try:
        for _ in range(200):  # wait until it accepts connections
            try:
                await client.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        value = b"x" * a.value_size
        keys = [f"k{i:08d}" for i in range(a.keys)]
        nkeys = len(keys)
        if op == "get":  # every key present, as after the aether put phase (not timed)
            for i in range(0, nkeys, 1000):
                await client.mset({k: value for k in keys[i : i + 1000]})
        lats: list[float] = []
        errors = missing = counter = 0
        cap = a.max_ops or (1 << 62)
        pc = time.perf_counter
        t0 = pc()
        deadline = t0 + seconds

        async def worker() -> None:
            nonlocal counter, errors, missing
            while counter < cap and pc() < deadline:
                key = keys[counter % nkeys]
                counter += 1
                s = pc()
                try:
                    if op == "put":
                        await client.set(key, value)
                    elif await client.get(key) is None:
                        missing += 1
                    lats.append(pc() - s)
                except Exception:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        secs = pc() - t0
        lats.sort()
        return {
            "op": op, "ops": len(lats), "errors": errors, "missing": missing, "seconds": secs,
            "ops_per_s": len(lats) / secs, "p50_ms": pct(lats, 50) * 1e3, "p99_ms": pct(lats, 99) * 1e3,
        }  # fmt: skip
    finally:
        await client.aclose()


def run_redis(port: int, op: str, a: argparse.Namespace, seconds: float) -> dict:
    try:
        import uvloop  # same event loop as the nodes
    except ImportError:
        return asyncio.run(redis_phase(port, op, a, seconds))
    return uvloop.run(redis_phase(port, op, a, seconds))


def redis_benchmark(port: int, a: argparse.Namespace) -> str | None:
    """The C client's figure for the same server (context only: not in the RESULT line)."""
    exe = shutil.which("redis-benchmark")
    if not exe:
        return None
    n = max(10000, int(a.seconds * 5000))
    cmd = [exe, "-h", HOST, "-p", str(port), "-c", str(a.concurrency), "-n", str(n), "-d", str(a.value_size),
           "-r", str(a.keys), "-t", "set,get", "--csv"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    rows = [line.replace('"', "").split(",") for line in out.splitlines() if line.startswith('"')]
    fmt = "{} {:.0f}/s p50 {} ms p99 {} ms"
    return "; ".join(fmt.format(r[0], float(r[1]), r[4], r[6]) for r in rows[1:] if len(r) > 6)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase (put, get)")
    ap.add_argument("--max-ops", type=int, default=0, help="stop a phase after this many ops (0: no cap)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--engine", choices=["memory", "log", "sqlite"], default="memory")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--write-quorum", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of puts before measuring")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (node logs)")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="aether-map-bench-")
    os.environ["AETHER_REPOSITORY"] = os.path.join(work, "repo")
    from aether.slices.repository import Repository
    from aether.slices.testing import build_slice_wheel

    Repository(Path(work) / "repo").deploy(
        build_slice_wheel(
            Path(work) / "wheels", "org.bench:driver:0.1.0", DRIVER, "Driver", module="bench_driver"
        )
    )
    cluster = Cluster(a.nodes, work, no_uvloop=False, fsync=None, extra=[])
    res: dict[str, object] = {}
    aether: dict[str, dict] = {}
    redis_res: dict[str, dict] = {}
    redis_proc: subprocess.Popen[bytes] | None = None
    rc = 0
    driver = "org.bench:driver:0.1.0"
    try:
        cluster.start()
        port = cluster.mgmt_ports[0]
        http(port, "POST", "/api/v1/maps", {
            "name": "bench", "replicas": a.replicas, "write_quorum": a.write_quorum, "engine": a.engine,
        })  # fmt: skip
        t0 = time.monotonic()
        while True:  # every node has the partition table with every member
            listings = [http(p, "GET", "/api/v1/maps") for p in cluster.mgmt_ports]
            if all(
                isinstance(li, dict)
                and li["table_version"] is not None
                and len(li["members"]) == a.nodes
                and any(m["name"] == "bench" for m in li["maps"])
                for li in listings
            ):
                break
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"map not ready on every node: {listings}")
            time.sleep(0.1)
        http(port, "POST", "/api/v1/deploy", {"artifact": driver, "instances": 1})
        st = wait_converged(port, {driver: 1})
        log(f"driver on {st[0]['instances'][0]['node']}; map bench replicas={a.replicas} "
            f"write_quorum={a.write_quorum} engine={a.engine}")  # fmt: skip

        def run(op: str, seconds: float, label: str, max_ops: int | None = None) -> dict:
            body = {
                "op": op, "seconds": seconds, "max_ops": a.max_ops if max_ops is None else max_ops,
                "concurrency": a.concurrency, "keys": a.keys, "value_size": a.value_size,
            }  # fmt: skip
            tmo = int(seconds * 3 + 60)
            path = f"/api/v1/invoke/org.bench:driver/run?timeout={tmo}"
            out = http(port, "POST", path, body, timeout=tmo + 20)
            assert isinstance(out, dict)
            log(
                f"aether {label}: {out['ops']} ops on {out['node']} in {out['seconds']:.2f}s, "
                f"{out['ops_per_s']:.0f} ops/s, p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, "
                f"errors {out['errors']} {out['error_types'] or ''}, missing {out['missing']}"
            )
            return out

        if a.warmup > 0:
            run("put", a.warmup, "warm-up put")
        aether["put"] = run("put", a.seconds, "put")
        run("put", 600.0, "fill (every key present for the get phase)", max_ops=a.keys)
        aether["get"] = run("get", a.seconds, "get")
        stats = http(port, "GET", "/api/v1/maps/bench")
        log(f"map stats: {stats}")

        if not a.skip_redis:
            redis_proc, rport = start_redis(work)
            log(f"redis-server pid {redis_proc.pid} on {HOST}:{rport}")
            if a.warmup > 0:
                run_redis(rport, "put", a, a.warmup)
            for op in ("put", "get"):
                r = run_redis(rport, op, a, a.seconds)
                redis_res[op] = r
                log(
                    f"redis {op}: {r['ops']} ops in {r['seconds']:.2f}s, {r['ops_per_s']:.0f} ops/s, "
                    f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}, "
                    f"missing {r['missing']}"
                )
            rb = redis_benchmark(rport, a)
            if rb:
                log(f"redis-benchmark (C client, same server, context only): {rb}")
        for op in ("put", "get"):
            res[f"{op}_ops_s"] = aether[op]["ops_per_s"]
        for op in ("put", "get"):
            if op in redis_res:
                res[f"redis_{op}_ops_s"] = redis_res[op]["ops_per_s"]
        for q in ("p99", "p50"):
            for op in ("put", "get"):
                res[f"{op}_{q}_ms"] = aether[op][f"{q}_ms"]
        for op in ("put", "get"):
            if op in redis_res:
                res[f"redis_{op}_p99_ms"] = redis_res[op]["p99_ms"]
        for op in ("put", "get"):
            if op in redis_res:
                res[f"{op}_ratio"] = aether[op]["ops_per_s"] / redis_res[op]["ops_per_s"]
        errs = aether["put"]["errors"] + aether["get"]["errors"]
        if errs:
            res["errors"] = errs
    except Exception as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        cluster.log_tails()
        res["error"] = type(e).__name__
        rc = 1
    finally:
        if redis_proc is not None:
            stop_pid(redis_proc)
        cluster.stop_all()
        if a.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "RESULT "
        + " ".join(
            f"{k}={v:.3f}" if k.endswith("ratio") else f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in res.items()
        )
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
