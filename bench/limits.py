#!/usr/bin/env python3
"""The limits: Aether's HTTP router against the same Python stack with nothing of Aether in the way.

One run measures, in alternating rounds (`--rounds`, default 3; medians reported), with
`wrk -t2 -c64 --latency` (`--conns`), a `--warmup` s unrecorded run before each `--duration` s run:

1. `bare_hello`: a bare aiohttp + uvloop app in its own process (`web.Application`, access log
   off) answering `GET /hello/{name}` with the hello example's JSON answer
   (`{"message":"Hello, world!","node":"bare","instance":1}`, encoded with `json.dumps`).
2. `bare_chain`: two such processes: the front answers `POST /greeter/welcome`
   `{"names":["world"]}` by calling the back's `GET /hello/{name}` for each name over an aiohttp
   `ClientSession` whose `TCPConnector(limit=--bare-chain-conns)` (default 64) keeps keep-alive
   connections to the back (aiohttp's client does not pipeline, so one connection would serialize
   the 64 concurrent requests: `--bare-chain-conns 1` measures that), and answers like the greeter.
   HTTP/1.1 framing, not Aether's transport framing.
3. `hello`: `GET /hello/world` through node-1's router to node-1's own hello instance (3 real
   `aether node` processes, the hello example deployed, hello and greeter scaled to 3 instances,
   one per node, as in `bench/http_bench.py`, whose helpers this reuses).
4. `chain`: `POST /greeter/welcome` `{"names":["world"]}` on node-1, same placement: the router
   calls the greeter, which calls hello through the runtime (two-slice chain, both local).
5. `remote`: hello scaled to 1 instance; `GET /hello/world` on the lowest-numbered node without
   a hello instance: every request crosses the cluster transport. Scaled back to 3 for the next
   round.

Each round runs the steps in that order (each bare step right before its Aether counterpart), so
every ratio compares figures taken seconds apart on the same (shared, noisy) machine.

Ratios (the goals of issue 19):

- `hello_ratio` = hello rps / bare_hello rps (goal >= 0.7);
- `chain_ratio` = chain rps / bare_hello rps: the chain against the bare *app*, as the issue states
  the goal (>= 0.5); `chain_vs_bare_chain` = chain rps / bare_chain rps is printed as well;
- `p99_ratio` = hello p99 / bare_hello p99 at the measured connection count (goal <= 2);
- `remote_ratio`: the goal is "remote calls at least as fast as local ones minus one loopback
  hop". One loopback hop costs, per request, what the bare chain adds to the bare app:
  `hop_s = 1/bare_chain_rps - 1/bare_hello_rps` (a second process behind one keep-alive HTTP
  hop, JSON in and out). The goal's throughput is `local_minus_hop_rps = 1 / (1/hello_rps +
  hop_s)` and `remote_ratio = remote_rps / local_minus_hop_rps` (goal >= 1). The latency side is
  printed too: `remote_p50_ms` against `hello_p50_ms + (bare_chain_p50_ms - bare_hello_p50_ms)`
  (`remote_p50_goal_ms`). `remote_vs_local` = remote rps / hello rps.

Every ratio is the median over rounds of that round's ratio; the rps and p99 keys are medians
of the rounds' figures.

CPU per request (`<step>_cpu_us`, and `hello_cpu_ratio` / `chain_cpu_ratio` against the bare
hello): user + system CPU seconds (`/proc/PID/stat`, every thread) of the serving processes during
the measured run, divided by the requests wrk counted. Serving processes: the bare server; the
bare chain's front and back; node-1 for hello and chain; the ingress node and the instance's node
for remote. On a machine shared with other work the rps figures swing several-fold between runs
seconds apart; CPU per request moves much less, so it is the figure to compare changes with.

`--pin`: the processes serving the step measured (the same list) run on CPU 0, wrk, this script
and the nodes not measured on CPU 1 (the first two CPUs this process may use; every thread's
affinity, set before each step). Without it
the scheduler moves a node's two threads (its loop, the shared slice loop) and wrk over both
CPUs, and the chain's CPU per request swings between runs (96-134 us for the same code in one
afternoon, while the bare app's stayed at 38-61); pinned, the server under test has one CPU of
its own and the load generator the other, for the bare app as for the node. The bare chain's two
processes then share one CPU (its figures are not comparable with unpinned ones). The key
`pinned` says which it was.

`--profile DIR` runs `py-spy record --nonblocking --rate 200` on the node serving the load
(node-1 for hello and chain, the ingress node for remote) for the whole measured run of each
Aether step and writes `DIR/<step>-r<round>.svg` flame graphs (py-spy sampling costs the node
some throughput: compare profiled figures with profiled ones only); `--profile-gil` keeps only the
samples holding the interpreter lock (where the CPU goes, without the idle threads' waits).

Processes (nodes, bare servers, wrk, py-spy) are tracked by PID and killed by PID on exit, also
on SIGINT/SIGTERM; the work dir (`/tmp/aether-limits-*`) is deleted unless `--keep`.

Final line:
`RESULT hello_ratio=... chain_ratio=... remote_ratio=... p99_ratio=... bare_hello_rps=...
hello_rps=... chain_rps=... remote_rps=... bare_chain_rps=... bare_hello_p99_ms=...
hello_p99_ms=...` followed by extra keys.

`python bench/limits.py --serve hello|chain --port P [--back-port Q]` runs one bare server in the
foreground (what the benchmark starts as child processes; also for trying it by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deploy_bench import build_repository  # noqa: E402
from http_bench import (  # noqa: E402
    BLUEPRINT,
    GREETER,
    HELLO,
    Interrupted,
    _on_signal,
    ensure_wrk,
    http,
    kill_wrk,
    parse_wrk,
    placement,
    run_wrk,
    wait_converged,
    write_post_lua,
)
from kv_bench import HOST, Cluster, free_ports, log  # noqa: E402

STEPS = ("bare_hello", "hello", "bare_chain", "chain", "remote")
AETHER_STEPS = ("hello", "chain", "remote")

# --------------------------------------------------------------------------------------------------
# the bare servers (run in their own processes: `--serve`)


def hello_app() -> Any:
    """The bare hello app: `GET /hello/{name}` -> the hello example's JSON answer."""
    from aiohttp import web

    async def greet(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = json.dumps({"message": f"Hello, {name}!", "node": "bare", "instance": 1}).encode()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/hello/{name}", greet)
    return app


def chain_app(back_port: int, conns: int) -> Any:
    """The bare chain's front: `POST /greeter/welcome` {"names": [...]} -> one `GET /hello/{name}`
    per name on the back (keep-alive pool of `conns` connections) -> the greeter's answer."""
    import asyncio

    import aiohttp
    from aiohttp import web

    back = f"http://{HOST}:{back_port}/hello/"
    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(_app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns))

    async def on_cleanup(_app: web.Application) -> None:
        await state["session"].close()

    async def one(name: str) -> dict[str, Any]:
        async with state["session"].get(back + name) as r:
            r.raise_for_status()
            g = await r.json()
        return {"text": f"Welcome! {g['message']}", "greeted_by": f"{g['node']}/{g['instance']}"}

    async def welcome(request: web.Request) -> web.Response:
        req = await request.json()
        out = await asyncio.gather(*(one(n) for n in req["names"]))
        return web.Response(body=json.dumps(out).encode(), content_type="application/json")

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/greeter/welcome", welcome)
    return app


def serve(kind: str, port: int, back_port: int, conns: int) -> int:
    import uvloop
    from aiohttp import web

    app = hello_app() if kind == "hello" else chain_app(back_port, conns)
    uvloop.install()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, handle_signals=True)
    return 0


class BareServers:
    """The bare hello server and the chain's two processes, started by PID and killed by PID."""

    def __init__(self, workdir: str, conns: int) -> None:
        self.workdir = workdir
        self.conns = conns
        self.hello_port, self.back_port, self.front_port = free_ports(3)
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, kind: str, port: int, back_port: int = 0) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port),
               "--back-port", str(back_port), "--bare-chain-conns", str(self.conns)]  # fmt: skip
        logf = open(os.path.join(self.workdir, f"bare-{kind}-{port}.log"), "ab")  # noqa: SIM115
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
        logf.close()
        self.procs.append(p)

    def start(self, timeout: float = 30.0) -> None:
        self._start("hello", self.hello_port)
        self._start("hello", self.back_port)
        self._start("chain", self.front_port, self.back_port)
        deadline = time.monotonic() + timeout
        for port, method, path, body in (
            (self.hello_port, "GET", "/hello/world", None),
            (self.front_port, "POST", "/greeter/welcome", {"names": ["world"]}),
        ):
            while True:
                for p in self.procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"bare server pid {p.pid} exited with code {p.returncode}")
                try:
                    http(port, method, path, body, timeout=2.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"bare server on :{port} did not answer in {timeout}s") from None
                    time.sleep(0.05)

    def pids(self, what: str) -> list[int]:
        """The processes serving `what`: the hello server, or the chain's front and back."""
        return [self.procs[0].pid] if what == "hello" else [self.procs[1].pid, self.procs[2].pid]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        self.procs = []


# --------------------------------------------------------------------------------------------------
# profiling


class Profiler:
    """py-spy record on one PID for one measured run (None when not profiling)."""

    def __init__(self, outdir: str | None, fmt: str = "flamegraph", gil: bool = False) -> None:
        self.outdir = outdir
        self.fmt = fmt
        self.gil = gil
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    def start(self, pid: int, name: str, seconds: float) -> None:
        if self.outdir is None:
            return
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.fmt]
        out = os.path.join(self.outdir, f"{name}.{ext}")
        cmd = [self.exe, "record", "--nonblocking", "--threads", "--rate", "200", "--format", self.fmt,
               "--duration", str(max(1, round(seconds))), "--pid", str(pid), "--output", out]  # fmt: skip
        if self.gil:
            cmd.append("--gil")  # only samples holding the interpreter lock: CPU work, not idle threads
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)  # fmt: skip

    def finish(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


# --------------------------------------------------------------------------------------------------
# figures


def ratios(r: dict[str, dict[str, float]]) -> dict[str, float]:
    """The ratios of one round: `r` maps each step to its wrk figures (rps, p50_ms, p99_ms)."""
    bh, bc = r["bare_hello"], r["bare_chain"]
    h, c, rem = r["hello"], r["chain"], r["remote"]
    hop_s = max(0.0, 1.0 / bc["rps"] - 1.0 / bh["rps"])
    local_minus_hop = 1.0 / (1.0 / h["rps"] + hop_s)
    out = {
        "hello_ratio": h["rps"] / bh["rps"],
        "chain_ratio": c["rps"] / bh["rps"],
        "remote_ratio": rem["rps"] / local_minus_hop,
        "p99_ratio": h["p99_ms"] / bh["p99_ms"],
        "chain_vs_bare_chain": c["rps"] / bc["rps"],
        "remote_vs_local": rem["rps"] / h["rps"],
        "hop_us": hop_s * 1e6,
        "local_minus_hop_rps": local_minus_hop,
        "remote_p50_goal_ms": h["p50_ms"] + max(0.0, bc["p50_ms"] - bh["p50_ms"]),
    }
    if bh.get("cpu_us") and h.get("cpu_us") and c.get("cpu_us"):  # CPU per request, a steadier figure
        out["hello_cpu_ratio"] = h["cpu_us"] / bh["cpu_us"]
        out["chain_cpu_ratio"] = c["cpu_us"] / bh["cpu_us"]
    return out


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Medians over rounds: of each round's ratios, and of each step's rps / p50 / p99."""
    res: dict[str, float] = {}
    per_round = [ratios(r) for r in rounds]
    for k in per_round[0]:
        res[k] = statistics.median(pr[k] for pr in per_round)
    for step in STEPS:
        for k in ("rps", "p50_ms", "p99_ms", "cpu_us"):
            vals = [r[step][k] for r in rounds if k in r[step]]
            if vals:
                res[f"{step}_{k}"] = statistics.median(vals)
    return res


RESULT_KEYS = (
    "hello_ratio", "chain_ratio", "remote_ratio", "p99_ratio", "bare_hello_rps", "hello_rps", "chain_rps",
    "remote_rps", "bare_chain_rps", "bare_hello_p99_ms", "hello_p99_ms",
)  # fmt: skip


def result_line(res: dict[str, Any]) -> str:
    """`RESULT k=v ...`: the required keys first (in `RESULT_KEYS` order), then the others."""
    keys = [k for k in RESULT_KEYS if k in res] + sorted(k for k in res if k not in RESULT_KEYS)
    return "RESULT " + " ".join(
        f"{k}={res[k]:.3f}" if isinstance(res[k], float) else f"{k}={res[k]}" for k in keys
    )


def parse_result(line: str) -> dict[str, str]:
    """The key=value pairs of a RESULT line."""
    if not line.startswith("RESULT "):
        raise ValueError(f"not a RESULT line: {line!r}")
    return dict(kv.split("=", 1) for kv in line.split()[1:])


# --------------------------------------------------------------------------------------------------


def scale_local(cluster: Cluster, timeout: float) -> None:
    mgmt, n = cluster.mgmt_ports[0], cluster.n
    http(mgmt, "POST", "/api/v1/scale", {"artifact": HELLO, "instances": n})
    http(mgmt, "POST", "/api/v1/scale", {"artifact": GREETER, "instances": n})
    where = placement(wait_converged(mgmt, {HELLO: n, GREETER: n}, timeout))
    for art in (HELLO, GREETER):
        if where.get(art, {}).get("node-1", 0) < 1:
            raise RuntimeError(f"{art} has no instance on node-1: {where}")
    sample = http(cluster.http_ports[0], "GET", "/hello/world")
    if sample.get("node") != "node-1":
        raise RuntimeError(f"GET /hello/world on node-1 not answered by node-1: {sample}")


def scale_remote(cluster: Cluster, timeout: float) -> tuple[int, int]:
    """hello down to 1 instance; the indexes of the node the remote load goes to and of the node
    running the instance."""
    mgmt, n = cluster.mgmt_ports[0], cluster.n
    http(mgmt, "POST", "/api/v1/scale", {"artifact": HELLO, "instances": 1})
    hello_nodes = set(placement(wait_converged(mgmt, {HELLO: 1, GREETER: n}, timeout))[HELLO])
    target = next(i for i in range(n) if cluster.ids[i] not in hello_nodes)
    sample = http(cluster.http_ports[target], "GET", "/hello/world")
    if sample.get("node") == cluster.ids[target]:
        raise RuntimeError(f"remote request answered locally: {sample}")
    return target, cluster.ids.index(sample["node"])


def _pid(cluster: Cluster, i: int) -> int:
    p = cluster.procs[i]
    return p.pid if p is not None else 0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by `pids` (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICK


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (a process's threads each have their own affinity)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


def measure(
    a: argparse.Namespace,
    prof: Profiler,
    step: str,
    url: str,
    script: str | None,
    servers: list[int],
    pid: int = 0,
) -> dict[str, float]:
    """One step: a warm-up wrk run, then the measured one (profiled when `pid` is given).
    `cpu_us` is the CPU time `servers` used during the measured run per request answered."""
    if a.pin:  # the servers measured on one CPU, everything else (wrk, the idle nodes) on another
        for other in a.pinned_pids:
            pin_process(other, {a.load_cpu})
        for server in servers:
            pin_process(server, {a.server_cpu})
    run_wrk(url, a.conns, a.warmup, script)  # not recorded
    if pid:
        prof.start(pid, step, a.duration)  # covers the measured run only
    cpu0 = cpu_seconds(servers)
    try:
        out = parse_wrk(run_wrk(url, a.conns, a.duration, script))
    finally:
        cpu1 = cpu_seconds(servers)
        prof.finish()
    out["cpu_us"] = (cpu1 - cpu0) * 1e6 / max(1.0, out["requests"])
    log(
        f"{step} c={a.conns}: {out['rps']:.0f} req/s, p50 {out.get('p50_ms', float('nan')):.2f} ms, "
        f"p99 {out.get('p99_ms', float('nan')):.2f} ms, {out['cpu_us']:.0f} us CPU/request, "
        f"non-2xx {int(out['non2xx'])}, socket errors {int(out['socket_errors'])}"
        + (" (profiled)" if pid else "")
    )
    return out


def with_isolation(blueprint: str, isolation: str | None) -> str:
    """`blueprint` with ``isolation = "shared"`` or ``"inline"`` in every slice table (``thread``:
    without an isolation line, so each slice has a thread of its own; None: as it is)."""
    if isolation is None:
        return blueprint
    text = re.sub(r'^isolation = "[a-z]+".*\n', "", blueprint, flags=re.M)
    if isolation == "thread":
        return text
    table = r"^(\[slices\.[A-Za-z0-9_-]+\]\n)"
    return re.sub(table, rf'\1isolation = "{isolation}"\n', text, flags=re.M)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians reported)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per wrk run")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded wrk seconds before each run")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections")
    ap.add_argument("--bare-chain-conns", type=int, default=64, help="the bare chain's keep-alive pool")
    ap.add_argument("--timeout", type=float, default=60.0, help="deadline for start-up / convergence")
    ap.add_argument("--profile", metavar="DIR", help="py-spy flame graphs of the Aether steps into DIR")
    ap.add_argument(
        "--profile-format",
        choices=("flamegraph", "raw", "speedscope"),
        default="flamegraph",
        help="py-spy output: svg flame graphs, raw collapsed stacks (.txt) or speedscope (.json)",
    )
    ap.add_argument(
        "--profile-gil", action="store_true",
        help="profile only samples holding the interpreter lock (where the CPU goes, without idle threads)",
    )
    ap.add_argument(
        "--isolation", choices=("thread", "shared", "inline"), default="thread",
        help="where hello and greeter run on the nodes: their own loop and thread (the default), the "
        'node\'s shared slice loop (isolation = "shared": the greeter calls hello directly there), or '
        'the node\'s loop (isolation = "inline": no thread hop)',
    )
    ap.add_argument(
        "--pin", action="store_true",
        help="the server measured (the bare app, node-1, ...) on CPU 0, wrk and the rest on CPU 1",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (node logs)")
    ap.add_argument("--serve", choices=("hello", "chain"), help="run one bare server (internal)")
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--back-port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.port, a.back_port, a.bare_chain_conns)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if a.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error(f"--pin needs two CPUs to run on, this process may use {len(cpus)}")
        a.server_cpu, a.load_cpu = cpus[0], cpus[1]

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    work = tempfile.mkdtemp(prefix="aether-limits-")
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    prof = Profiler(a.profile, a.profile_format, a.profile_gil)
    res: dict[str, Any] = {}
    rc = 0
    blueprint = {"toml": with_isolation(BLUEPRINT, a.isolation), "filename": "hello.blueprint"}
    cluster: Cluster | None = None
    bare: BareServers | None = None
    try:
        ensure_wrk()
        os.environ["AETHER_REPOSITORY"] = os.path.join(work, "repo")
        build_repository(Path(work) / "repo", Path(work) / "wheels")
        post_lua = write_post_lua(work)
        bare = BareServers(work, a.bare_chain_conns)
        bare.start()
        cluster = Cluster(3, work, no_uvloop=False, fsync=None, extra=[])
        cluster.start(a.timeout)
        if a.pin:
            os.sched_setaffinity(0, {a.load_cpu})  # this script and the wrk runs it starts
            a.pinned_pids = [_pid(cluster, i) for i in range(3)] + bare.pids("hello") + bare.pids("chain")
        http(cluster.mgmt_ports[0], "POST", "/api/v1/blueprints", blueprint)
        hport = cluster.http_ports
        hello_url = f"http://{HOST}:{{}}/hello/world"
        chain_url = f"http://{HOST}:{{}}/greeter/welcome"
        rounds: list[dict[str, dict[str, float]]] = []
        for rnd in range(1, a.rounds + 1):
            log(f"--- round {rnd}/{a.rounds}")
            r: dict[str, dict[str, float]] = {}
            scale_local(cluster, a.timeout)
            pid1 = _pid(cluster, 0) if a.profile else 0
            node1 = [_pid(cluster, 0)]  # hello and chain run on node-1 alone
            r["bare_hello"] = measure(
                a, prof, "bare_hello", hello_url.format(bare.hello_port), None, bare.pids("hello")
            )
            r["hello"] = measure(a, prof, f"hello-r{rnd}", hello_url.format(hport[0]), None, node1, pid1)
            r["bare_chain"] = measure(
                a, prof, "bare_chain", chain_url.format(bare.front_port), post_lua, bare.pids("chain")
            )
            r["chain"] = measure(a, prof, f"chain-r{rnd}", chain_url.format(hport[0]), post_lua, node1, pid1)
            target, serving = scale_remote(cluster, a.timeout)
            pid = _pid(cluster, target) if a.profile else 0
            both = [_pid(cluster, target), _pid(cluster, serving)]  # the ingress node and the instance's
            r["remote"] = measure(a, prof, f"remote-r{rnd}", hello_url.format(hport[target]), None, both, pid)
            for step, fig in r.items():
                for k in ("non2xx", "socket_errors"):
                    if fig.get(k):
                        log(f"WARNING: {step}: {k}={int(fig[k])}")
            rounds.append(r)
            log(f"round {rnd}: " + " ".join(f"{k}={v:.3f}" for k, v in ratios(r).items()))
        res = summarize(rounds)
        res.update(
            rounds=a.rounds,
            conns=a.conns,
            bare_chain_conns=a.bare_chain_conns,
            isolation=a.isolation,
            pinned=int(a.pin),
            non2xx=int(sum(f["non2xx"] for r in rounds for f in r.values())),
            socket_errors=int(sum(f["socket_errors"] for r in rounds for f in r.values())),
        )
        if a.profile:
            res["profiles"] = a.profile
    except (Exception, Interrupted) as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        if cluster is not None:
            for i in range(cluster.n):
                log(f"--- {cluster.ids[i]} log tail ---\n{cluster.log_tail(i)}")
        res = {"error": type(e).__name__}
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_wrk()
        prof.finish()
        if cluster is not None:
            cluster.stop_all()
        if bare is not None:
            bare.stop()
        if a.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(result_line(res), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
