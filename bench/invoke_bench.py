#!/usr/bin/env python3
"""Slice-to-slice invocation benchmark on real node processes (default 3 nodes).

A driver slice (`org.bench:driver`, built here) calls `org.example:hello.greet` through the
runtime's invoker, from inside the cluster as business code would, and reports calls/s and
latency percentiles. The bench triggers it through the management API
(`POST /api/v1/invoke/org.bench:driver/run`).

- local: hello has an instance on every node, so every call is served in-process;
- remote: hello has one instance, on another node than the driver: one transport hop per call.

Each mode runs closed loop (`--concurrency` callers) and then open loop at `--rate` calls/s (the
p99-at-1,000-calls/s figure). Final line:
`RESULT nodes=3 local_calls_s=... local_p50_ms=... local_p99_ms=... remote_calls_s=... remote_p50_ms=...
remote_p99_ms=... remote_rate=1000 remote_rate_p99_ms=...`

`--rounds N` (default 3; 0 skips it), after the runs above: the goal "remote calls at least as fast
as local ones minus one loopback hop" in one run. Alternating rounds of local calls (to
`org.bench:hello-local`, the hello slice without its route, on every node), remote calls (hello, one
instance, not on the driver's node) and a bare loopback round trip in the transport's framing and
codec between two extra processes (`--bare-serve`, `--bare-client`); per round and mode one caller
(p50, p99) and `--concurrency` callers (calls/s, and CPU per call: of the three node processes, less
their idle background rate, or of the two bare processes). Extra keys (medians of the rounds):
`local_1c_p50_ms remote_1c_p50_ms bare_1c_p50_ms` (and `_p99_ms`), `*_rounds_calls_s`, `*_cpu_us`,
`remote_cpu_ratio` = remote / (local + bare) CPU per call, `remote_latency_ratio` = remote p50 /
(local p50 + bare p50), `remote_cost_ratio` = (1 / remote calls/s) / (1 / local + 1 / bare), each
<= 1 when the goal is met, and `*_runs` (calls/s of every round).

`--tls`: the cost of mutual TLS on remote calls (every call and answer crosses the cluster port).
Measures remote calls only, `--tls-rounds` times on a plaintext cluster and as often on a mutual-TLS
cluster (a CA and node certificates generated with `aether.transport.tls` in the run's temp dir,
nodes started with `--tls-cert/--tls-key/--tls-ca`; the cluster secret stays on top), alternating
plain/TLS, TLS/plain, ..., each on a fresh cluster. Final line (rates: median of the rounds):
`RESULT nodes=3 rounds=3 plain_calls_s=... tls_calls_s=... tls_loss_pct=... plain_p50_ms=... tls_p50_ms=...
plain_rate_p99_ms=... tls_rate_p99_ms=... plain_runs=a/b/c tls_runs=a/b/c`

`--worker`: the extra cost of a call into a slice worker process (docs/slices.md, *Worker
processes*) against an in-process call, in one process without a cluster: one `SliceRuntime` runs
the same echo slice twice, once in the node's interpreter and once in a worker (`isolation =
"process"`), and calls each through `SliceRuntime.call` (what the invoker does for a local call),
`--worker-rounds` times, alternating which goes first: one caller (median and p99 latency), then
`--concurrency` callers (calls/s). Final line (medians of the rounds):
`RESULT worker_rounds=3 inproc_p50_ms=... worker_p50_ms=... p50_ratio=... inproc_calls_s=...
worker_calls_s=... calls_ratio=... inproc_p99_ms=... worker_p99_ms=... concurrency=32`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import deploy_bench  # noqa: E402
from deploy_bench import build_repository, converged  # noqa: E402
from kv_bench import HOST, Cluster, log, result_line  # noqa: E402

DRIVER = """
import asyncio
import time

import msgspec

from aether.slices import Slice, entry


class Run(msgspec.Struct):
    target: str
    method: str
    calls: int = 10000
    concurrency: int = 32
    rate: float = 0.0
    arg: str = "bench"


class Result(msgspec.Struct):
    calls: int
    errors: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    node: str


def pct(xs, p):
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


class Driver(Slice):
    @entry
    async def run(self, req: Run) -> Result:
        invoke = self.context.invoker.invoke
        payload = msgspec.msgpack.encode(req.arg)
        lats = []
        errors = 0
        pc = time.perf_counter
        t0 = pc()
        if req.rate > 0:
            interval = 1.0 / req.rate

            async def one(t_sched):
                nonlocal errors
                try:
                    await invoke(req.target, req.method, payload)
                    lats.append(pc() - t_sched)
                except Exception:
                    errors += 1

            tasks = []
            for i in range(req.calls):
                t_sched = t0 + i * interval
                delay = t_sched - pc()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(t_sched)))
            await asyncio.gather(*tasks)
        else:
            left = req.calls

            async def worker():
                nonlocal left, errors
                while left > 0:
                    left -= 1
                    s = pc()
                    try:
                        await invoke(req.target, req.method, payload)
                        lats.append(pc() - s)
                    except Exception:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(req.concurrency)))
        secs = pc() - t0
        lats.sort()
        return Result(len(lats), errors, secs, len(lats) / secs, pct(lats, 50) * 1e3, pct(lats, 99) * 1e3,
                      self.context.node_id)
"""


def http(port: int, method: str, path: str, body: object | None = None, timeout: float = 120.0) -> object:
    """`deploy_bench.http` with a longer default timeout."""
    return deploy_bench.http(port, method, path, body, timeout)


def wait_converged(port: int, want: dict[str, int], timeout: float = 60.0) -> list[dict]:
    t0 = time.monotonic()
    while True:
        st = http(port, "GET", "/api/v1/slices")
        if converged(st, want):  # type: ignore[arg-type]
            return st  # type: ignore[return-value]
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"not converged: {st}")
        time.sleep(0.02)


HELLO, DRIVER_ARTIFACT = "org.example:hello:0.1.0", "org.bench:driver:0.1.0"
HELLO_LOCAL = "org.bench:hello-local:0.1.0"  # the hello slice without its HTTP route, on every node


def run_driver(
    a: argparse.Namespace,
    port: int,
    mode: str,
    rate: float = 0.0,
    *,
    target: str = "org.example:hello",
    calls: int = 0,
    concurrency: int = 0,
) -> dict:
    """One driver run through node 1's management API: closed loop, or open loop at `rate` calls/s."""
    calls = calls or (int(a.rate * a.rate_seconds) if rate else a.calls)
    body = {"target": target, "method": "greet", "calls": calls, "concurrency": concurrency or a.concurrency,
            "rate": rate}  # fmt: skip
    out = http(port, "POST", "/api/v1/invoke/org.bench:driver/run?timeout=300", body, timeout=320)
    assert isinstance(out, dict)
    label = f"{mode} @{int(rate)}/s" if rate else mode
    log(
        f"{label}: {out['calls']} calls on {out['node']}, "
        f"{out['errors']} errors, {out['calls_per_s']:.0f} calls/s, p50 {out['p50_ms']:.2f} ms, "
        f"p99 {out['p99_ms']:.2f} ms"
    )
    if out["errors"]:
        raise RuntimeError(f"{out['errors']} failed calls in {mode}")
    return out


def deploy_remote(port: int) -> None:
    """One hello instance and the driver on another node (so every call is one transport hop)."""
    http(port, "POST", "/api/v1/deploy", {"artifact": HELLO, "instances": 1})
    wait_converged(port, {HELLO: 1})
    http(port, "POST", "/api/v1/deploy", {"artifact": DRIVER_ARTIFACT, "instances": 1})
    st = wait_converged(port, {HELLO: 1, DRIVER_ARTIFACT: 1})
    where = {s["artifact"]: s["instances"][0]["node"] for s in st}
    if where[HELLO] == where[DRIVER_ARTIFACT]:
        raise RuntimeError(f"driver and hello were placed on the same node {where}; cannot measure remote")
    log(f"remote placement: hello on {where[HELLO]}, driver on {where[DRIVER_ARTIFACT]}")


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by the processes `pids`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def _bare_loop() -> object:
    import asyncio

    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def bare_serve() -> int:
    """The callee of the bare loopback hop (`barehop.Echo`). Prints its port."""
    import asyncio

    import barehop

    loop = _bare_loop()
    asyncio.set_event_loop(loop)  # type: ignore[arg-type]
    srv = loop.run_until_complete(barehop.serve(HOST))  # type: ignore[attr-defined]
    print(srv.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()  # type: ignore[attr-defined]
    return 0


def bare_client(port: int, calls: int, concurrency: int) -> int:
    """The caller of the bare loopback hop (`barehop.Caller`): `concurrency` callers, each awaiting
    one round trip after the other. Prints JSON {calls_per_s, p50_ms, p99_ms, client_cpu_s}."""
    import asyncio

    import barehop

    async def main() -> dict:
        caller = await barehop.connect(HOST, port, HELLO)
        lats: list[float] = []
        left = calls
        pc = time.perf_counter

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                s = pc()
                await caller.call()
                lats.append(pc() - s)

        t0, c0 = pc(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        secs, cpu = pc() - t0, time.process_time() - c0
        caller.close()
        lats.sort()
        return {"calls_per_s": len(lats) / secs, "p50_ms": lats[len(lats) // 2] * 1e3,
                "p99_ms": lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1e3,
                "client_cpu_s": cpu}  # fmt: skip

    loop = _bare_loop()
    try:
        out = loop.run_until_complete(main())  # type: ignore[attr-defined]
    finally:
        loop.close()  # type: ignore[attr-defined]
    print(json.dumps(out), flush=True)
    return 0


class BareHop:
    """The bare loopback hop: a server process and, per run, a client process (two processes, as two
    nodes), both in the transport's framing and codec with nothing of Aether around them."""

    def __init__(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bare-serve"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def run(self, calls: int, concurrency: int, label: str) -> dict:
        import subprocess

        cmd = [sys.executable, __file__, "--bare-client", str(self.port), "--calls", str(calls),
               "--concurrency", str(concurrency)]  # fmt: skip
        c0 = proc_cpu([self.proc.pid])
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout)
        out["cpu_us"] = (proc_cpu([self.proc.pid]) - c0 + out["client_cpu_s"]) * 1e6 / calls
        log(f"{label}: {calls} calls, {out['calls_per_s']:.0f} calls/s, p50 {out['p50_ms']:.3f} ms, "
            f"p99 {out['p99_ms']:.3f} ms, {out['cpu_us']:.1f} µs CPU per call")  # fmt: skip
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            self.proc.wait(10)


def compare_rounds(a: argparse.Namespace, port: int, bare: BareHop, pids: list[int]) -> dict[str, object]:
    """Alternating rounds of local calls, remote calls and the bare loopback hop: one caller (p50,
    p99: the per-call latency) and `--concurrency` callers (calls/s, and CPU per call: of all node
    processes for local and remote, of the two bare processes for bare). Medians of the rounds."""
    modes = ["local", "remote", "bare"]
    figs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    c0, t0 = proc_cpu(pids), time.monotonic()
    time.sleep(3.0)
    idle = (proc_cpu(pids) - c0) / (time.monotonic() - t0)  # the nodes' own background work, s/s
    log(f"idle nodes: {idle * 1000:.1f} ms CPU per second (subtracted from the per-call figures)")
    lat_calls = max(1000, a.calls // 10)
    for r in range(a.rounds):
        order = modes[r % 3 :] + modes[: r % 3]
        for m in order:
            if m == "bare":
                one = bare.run(lat_calls, 1, f"round {r + 1} bare, 1 caller")
                many = bare.run(a.calls, a.concurrency, f"round {r + 1} bare, {a.concurrency} callers")
                cpu[m].append(many["cpu_us"])
            else:
                target = "org.bench:hello-local" if m == "local" else "org.example:hello"
                one = run_driver(a, port, f"round {r + 1} {m}, 1 caller", target=target, calls=lat_calls,
                                 concurrency=1)  # fmt: skip
                c0, t0 = proc_cpu(pids), time.monotonic()
                many = run_driver(a, port, f"round {r + 1} {m}, {a.concurrency} callers", target=target)
                used = proc_cpu(pids) - c0 - idle * (time.monotonic() - t0)
                cpu[m].append(used * 1e6 / a.calls)
                log(f"  {cpu[m][-1]:.1f} µs CPU per call over the nodes")
            figs[m].append((one["p50_ms"], one["p99_ms"], many["calls_per_s"]))

    def med(m: str, i: int) -> float:
        return statistics.median(f[i] for f in figs[m])

    res: dict[str, object] = {"rounds": a.rounds}
    for m in modes:
        res[f"{m}_1c_p50_ms"], res[f"{m}_1c_p99_ms"] = med(m, 0), med(m, 1)
        res[f"{m}_rounds_calls_s"] = med(m, 2)
    for m in modes:
        res[f"{m}_cpu_us"] = statistics.median(cpu[m])
    # CPU per call, robust to the machine's other load: <= 1 is the goal met
    res["remote_cpu_ratio"] = res["remote_cpu_us"] / (res["local_cpu_us"] + res["bare_cpu_us"])  # type: ignore[operator]
    # the goal "remote calls at least as fast as local ones minus one loopback hop": <= 1 is met
    res["remote_latency_ratio"] = med("remote", 0) / (med("local", 0) + med("bare", 0))
    # the same in cost per call at concurrency: 1/remote <= 1/local + 1/bare
    res["remote_cost_ratio"] = (1 / med("remote", 2)) / (1 / med("local", 2) + 1 / med("bare", 2))
    for m in modes:
        res[f"{m}_runs"] = "/".join(f"{f[2]:.0f}" for f in figs[m])
    return res


def compare_tls(a: argparse.Namespace, work: str) -> int:
    """Remote calls on a plaintext and a mutual-TLS cluster, alternating, a fresh cluster each time."""
    runs: dict[str, list[dict]] = {"plain": [], "tls": []}
    rounds = max(1, a.tls_rounds)
    rc = 0
    for r in range(rounds):
        for mode in ("plain", "tls") if r % 2 == 0 else ("tls", "plain"):
            log(f"--tls round {r + 1}/{rounds}: {mode}")
            run_dir = os.path.join(work, f"{mode}-{r}")
            os.makedirs(run_dir)
            cluster = Cluster(
                a.nodes, run_dir, no_uvloop=False, fsync=None, extra=[],
                tls=mode == "tls",
            )  # fmt: skip
            try:
                cluster.start()
                port = cluster.mgmt_ports[0]
                deploy_remote(port)
                run_driver(a, port, f"{mode} warm-up")
                closed = run_driver(a, port, f"{mode} remote")
                opened = run_driver(a, port, f"{mode} remote", a.rate)
                runs[mode].append({"calls_s": closed["calls_per_s"], "p50_ms": closed["p50_ms"],
                                   "p99_ms": closed["p99_ms"], "rate_p99_ms": opened["p99_ms"]})  # fmt: skip
            except Exception as e:
                log(f"ERROR in {mode} round {r + 1}: {type(e).__name__}: {e}")
                cluster.log_tails()
                rc = 1
            finally:
                cluster.stop_all()
            if rc:
                print(f"RESULT error={mode}-run-failed", flush=True)
                return rc

    def med(mode: str, k: str) -> float:
        return statistics.median(float(x[k]) for x in runs[mode])

    plain, tls = med("plain", "calls_s"), med("tls", "calls_s")
    out: dict[str, object] = {
        "nodes": a.nodes,
        "rounds": rounds,
        "plain_calls_s": plain,
        "tls_calls_s": tls,
        "tls_loss_pct": 100.0 * (plain - tls) / plain if plain else float("nan"),
        "plain_p50_ms": med("plain", "p50_ms"),
        "tls_p50_ms": med("tls", "p50_ms"),
        "plain_p99_ms": med("plain", "p99_ms"),
        "tls_p99_ms": med("tls", "p99_ms"),
        "plain_rate_p99_ms": med("plain", "rate_p99_ms"),
        "tls_rate_p99_ms": med("tls", "rate_p99_ms"),
        "plain_runs": "/".join(f"{x['calls_s']:.0f}" for x in runs["plain"]),
        "tls_runs": "/".join(f"{x['calls_s']:.0f}" for x in runs["tls"]),
    }
    print(result_line(out, 2))
    return 0


ECHO = """
from aether.slices import Slice, entry


class Echo(Slice):
    @entry
    async def echo(self, text: str) -> str:
        return text
"""


async def _measure(rt: object, target: object, calls: int, concurrency: int) -> tuple[float, float, float]:
    """`calls` calls of `echo` through `rt.call` by `concurrency` callers: (calls/s, p50 ms, p99 ms)."""
    import asyncio

    import msgspec

    payload = msgspec.msgpack.encode("bench")
    lat: list[float] = []
    per = max(1, calls // concurrency)

    async def caller() -> None:
        for _ in range(per):
            t0 = time.perf_counter()
            await rt.call(target, "echo", payload)  # type: ignore[attr-defined]
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    dt = time.perf_counter() - t0
    lat.sort()
    return len(lat) / dt, lat[len(lat) // 2] * 1000, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000


async def _compare_worker(a: argparse.Namespace, work: Path) -> dict[str, object]:
    from aether.core.artifact import Artifact
    from aether.slices.loader import ImportSpace
    from aether.slices.repository import Repository
    from aether.slices.runtime import SliceRuntime
    from aether.slices.testing import StoreInvoker, build_slice_wheel

    repo = Repository(work / "repo")
    inproc, worker = Artifact.parse("org.bench:echo:1.0.0"), Artifact.parse("org.bench:echo-worker:1.0.0")
    for art, mod in ((inproc, "bench_echo"), (worker, "bench_echo_worker")):
        repo.deploy(build_slice_wheel(work / "wheels" / mod, art, ECHO, "Echo", module=mod))
    rt = SliceRuntime(
        "bench", repo, work / "data", StoreInvoker(), space=ImportSpace(),
        isolation_for=lambda art: "process" if art == worker else "auto",
    )  # fmt: skip
    figures: dict[str, list[tuple[float, float, float]]] = {"inproc": [], "worker": []}
    try:
        for art in (inproc, worker):
            await rt.load(art)
            await rt.activate(art, [1])
        assert rt.isolation(worker) == "process" and rt.isolation(inproc) == "thread"
        for art in (inproc, worker):  # warm-up
            await _measure(rt, art, 2000, a.concurrency)
        for r in range(a.worker_rounds):
            order = [("inproc", inproc), ("worker", worker)]
            for name, art in order if r % 2 == 0 else order[::-1]:
                _, p50, p99 = await _measure(rt, art, max(1000, a.calls // 10), 1)
                rate, _, _ = await _measure(rt, art, a.calls, a.concurrency)
                figures[name].append((p50, p99, rate))
                log(f"round {r + 1} {name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms (1 caller), "
                    f"{rate:,.0f} calls/s ({a.concurrency} callers)")  # fmt: skip
    finally:
        await rt.close()

    def med(name: str, i: int) -> float:
        return statistics.median(f[i] for f in figures[name])

    res: dict[str, object] = {"worker_rounds": a.worker_rounds}
    res.update(inproc_p50_ms=med("inproc", 0), worker_p50_ms=med("worker", 0))
    res.update(p50_ratio=med("worker", 0) / med("inproc", 0))
    res.update(inproc_calls_s=med("inproc", 2), worker_calls_s=med("worker", 2))
    res.update(calls_ratio=med("worker", 2) / med("inproc", 2))
    res.update(inproc_p99_ms=med("inproc", 1), worker_p99_ms=med("worker", 1), concurrency=a.concurrency)
    return res


def compare_worker(a: argparse.Namespace) -> int:
    import asyncio

    work = Path(tempfile.mkdtemp(prefix="aether-worker-bench-"))
    try:
        res = asyncio.run(_compare_worker(a, work))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    shown = (f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
    print("RESULT " + " ".join(shown))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop calls/s for the latency run")
    ap.add_argument("--rate-seconds", type=float, default=5.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tls", action="store_true", help="compare remote calls: plaintext vs mutual TLS")
    ap.add_argument("--tls-rounds", type=int, default=3, help="with --tls: measurements per mode")
    ap.add_argument("--worker", action="store_true", help="calls into a worker process vs in-process")
    ap.add_argument("--worker-rounds", type=int, default=3, help="with --worker: measurements per mode")
    ap.add_argument("--rounds", type=int, default=3,
                    help="remote vs local vs bare loopback hop: alternating rounds (0: skip)")  # fmt: skip
    ap.add_argument("--bare-serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-client", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_serve:
        return bare_serve()
    if a.bare_client:
        return bare_client(a.bare_client, a.calls, a.concurrency)
    if a.worker:
        return compare_worker(a)

    work = tempfile.mkdtemp(prefix="aether-invoke-bench-")
    os.environ["AETHER_REPOSITORY"] = os.path.join(work, "repo")
    build_repository(Path(work) / "repo", Path(work) / "wheels")
    from aether.slices.repository import Repository
    from aether.slices.testing import build_slice_wheel

    Repository(Path(work) / "repo").deploy(
        build_slice_wheel(
            Path(work) / "wheels", "org.bench:driver:0.1.0", DRIVER, "Driver", module="bench_driver"
        )
    )
    hello_path = HERE.parent / "examples" / "hello" / "hello-slice" / "hello_slice" / "__init__.py"
    hello_src = hello_path.read_text()
    local_src = hello_src.replace("import Slice, route", "import Slice, entry").replace(
        '@route("GET", "/hello/{name}")', "@entry"
    )
    Repository(Path(work) / "repo").deploy(
        build_slice_wheel(Path(work) / "wheels", HELLO_LOCAL, local_src, "Hello", module="bench_hello_local")
    )
    if a.tls:
        try:
            return compare_tls(a, work)
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
    cluster = Cluster(a.nodes, work, no_uvloop=False, fsync=None, extra=[])
    res: dict[str, object] = {"nodes": a.nodes}
    rc = 0
    hello, driver = HELLO, DRIVER_ARTIFACT
    bare: BareHop | None = None
    try:
        cluster.start()
        port = cluster.mgmt_ports[0]

        def run(mode: str, rate: float = 0.0) -> dict:
            return run_driver(a, port, mode, rate)

        deploy_remote(port)
        # the same hello slice (without its HTTP route) on every node: calls to it are local
        http(port, "POST", "/api/v1/deploy", {"artifact": HELLO_LOCAL, "instances": a.nodes})
        wait_converged(port, {hello: 1, driver: 1, HELLO_LOCAL: a.nodes})
        local = "org.bench:hello-local"
        run("warm-up", 0.0)
        r = run("remote")
        res.update(remote_calls_s=r["calls_per_s"], remote_p50_ms=r["p50_ms"], remote_p99_ms=r["p99_ms"])
        r = run("remote", a.rate)
        res.update(remote_rate=int(a.rate), remote_rate_p50_ms=r["p50_ms"], remote_rate_p99_ms=r["p99_ms"])
        r = run_driver(a, port, "local", target=local)
        res.update(local_calls_s=r["calls_per_s"], local_p50_ms=r["p50_ms"], local_p99_ms=r["p99_ms"])
        r = run_driver(a, port, "local", a.rate, target=local)
        res.update(local_rate_p99_ms=r["p99_ms"])
        if a.rounds > 0:
            bare = BareHop()
            bare.run(a.calls, a.concurrency, "warm-up bare")
            pids = [p.pid for p in cluster.procs if p is not None]
            res.update(compare_rounds(a, port, bare, pids))
    except Exception as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        cluster.log_tails()
        res["error"] = type(e).__name__
        rc = 1
    finally:
        if bare is not None:
            bare.stop()
        cluster.stop_all()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(result_line(res, 2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
