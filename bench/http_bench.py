#!/usr/bin/env python3
"""HTTP benchmark: requests/s and p50/p99 through a node's HTTP port, measured with `wrk`.

Same shape as the Ray Serve anchor (`/work/shared/anchors/ray_serve_bench.py`). Starts 3 real
`aether node` processes on 127.0.0.1 (free ports; data dirs and logs in a fresh
`/tmp/aether-http-bench-*` dir) with a slice repository prepared beforehand (the hello example's
two wheels, built from `examples/hello` sources, as in `deploy_bench.py`), then:

1. `start_to_first_s`: from launching the 3 node processes (`python -m aether.cli.main node`,
   i.e. interpreter start + imports included) until the first HTTP 200 of `GET /hello/world` on
   node-1's HTTP port. Included: process start, quorum with every member up, `POST
   /api/v1/blueprints` of the example blueprint (hello x2 + greeter x1) to node-1, wheel install
   from the repository into the nodes' code stores, instance activation, route registration, the
   first request. Not included: building the wheels / the repository (done before t0).
2. `pss_mb`: sum of PSS (`/proc/PID/smaps_rollup`) over the 3 node processes and any
   descendants, 1 s after the first 200 (the example app running).
3. `hello`: hello and greeter scaled to 3 instances (one per node, verified through
   `/api/v1/slices`), `wrk` to `GET /hello/world` on node-1 (its local instance answers).
4. `compose`: same placement, `POST /greeter/welcome` `{"names": ["world"]}` on node-1: the
   greeter calls hello through the runtime (two-slice chain, like Ray's compose phase).
5. `hello_remote`: hello scaled to 1 instance; the load goes to the lowest-numbered node that has
   no hello instance (node-1 unless the remaining instance is there), so every request crosses the
   cluster transport to the one instance.

Each load step is `wrk -t2 -cN --latency` at N = each of `--conns` (default 4,64), after a 2 s
unrecorded warm-up, for `--duration` s (default 10). Everything runs on loopback; every process
started (nodes, wrk) is tracked by PID and killed by PID on exit, also on SIGINT/SIGTERM.

Final line:
`RESULT hello_c4_rps=... hello_c64_rps=... hello_c64_p99_ms=... hello_remote_c64_rps=...
compose_c4_rps=... compose_c64_rps=... compose_c64_p99_ms=... start_to_first_s=... pss_mb=...`
followed by extra keys (p50s, other p99s, `non2xx`, `socket_errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deploy_bench import build_repository, converged, http  # noqa: E402
from kv_bench import HOST, Cluster, log, result_line  # noqa: E402

HELLO = "org.example:hello:0.1.0"
GREETER = "org.example:greeter:0.1.0"
BLUEPRINT = (HERE.parent / "examples" / "hello" / "hello.blueprint").read_text()

_wrk_pids: set[int] = set()


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def wait_converged(port: int, want: dict[str, int], timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        st = http(port, "GET", "/api/v1/slices")
        if converged(st, want):
            return st
        failed = [(s["artifact"], i) for s in st for i in s["instances"] if i["state"] == "FAILED"]
        if failed:
            raise RuntimeError(f"instance FAILED: {failed[0]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not converged within {timeout}s: {st}")
        time.sleep(0.02)


def placement(st: list[dict]) -> dict[str, dict[str, int]]:
    """artifact -> {node: number of instances there}."""
    out: dict[str, dict[str, int]] = {}
    for s in st:
        for i in s["instances"]:
            out.setdefault(s["artifact"], {})[i["node"]] = len(i["instance_ids"])
    return out


# --------------------------------------------------------------------------------------------------
# memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def pss_mb(pids: list[int]) -> tuple[float, int]:
    """Sum of PSS over `pids` and their descendants (MB), and how many processes were counted."""
    kids = _children()
    todo, seen = list(pids), set[int]()
    while todo and len(seen) < 10_000:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(kids.get(p, []))
    total_kb = 0
    for p in seen:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024.0, len(seen)


# --------------------------------------------------------------------------------------------------
# wrk

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    res: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output without Requests/sec:\n{out}")
    res["rps"] = float(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non2xx"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = float(sum(int(x) for x in m.groups())) if m else 0.0
    return res


def run_wrk(url: str, conns: int, seconds: float, script: str | None, timeout_s: float = 2.0) -> str:
    cmd = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
           f"--timeout={max(1, round(timeout_s))}s"]  # fmt: skip
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _wrk_pids.add(p.pid)
    try:
        out, _ = p.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=5)
        raise RuntimeError(f"wrk did not finish within {seconds + 30}s") from None
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        _wrk_pids.discard(p.pid)
    if p.returncode != 0:
        raise RuntimeError(f"wrk exited {p.returncode}:\n{out.decode(errors='replace')}")
    return out.decode(errors="replace")


def kill_wrk() -> None:
    for pid in list(_wrk_pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        _wrk_pids.discard(pid)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    log("wrk not found; installing it with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=True, timeout=300)
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed and apt-get could not install it")


def load(label: str, url: str, conns: int, a: argparse.Namespace, script: str | None) -> dict[str, float]:
    run_wrk(url, conns, a.warmup, script)  # not recorded
    r = parse_wrk(run_wrk(url, conns, a.duration, script))
    log(
        f"{label} c={conns}: {r['rps']:.0f} req/s, p50 {r.get('p50_ms', float('nan')):.2f} ms, "
        f"p90 {r.get('p90_ms', float('nan')):.2f} ms, p99 {r.get('p99_ms', float('nan')):.2f} ms, "
        f"{int(r['requests'])} requests, non-2xx {int(r['non2xx'])}, socket errors {int(r['socket_errors'])}"
    )
    return r


# --------------------------------------------------------------------------------------------------


def first_200(port: int, path: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2.0) as r:
                if r.status == 200:
                    r.read()
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no 200 on {path} before the deadline")
        time.sleep(0.005)


def wait_quorum_fast(cluster: Cluster, deadline: float) -> None:
    """Like Cluster.wait_quorum, polling every 10 ms (it is inside the start_to_first window)."""
    while True:
        for i, p in enumerate(cluster.procs):
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{cluster.ids[i]} exited with code {p.returncode}")
        ok = True
        for i in range(cluster.n):
            try:
                st = cluster.status(i, timeout=0.5)
            except Exception:
                ok = False
                break
            up = {m["id"] for m in st["nodes"] if m["state"] == "up"}
            if not st["quorum"] or up != set(cluster.ids):
                ok = False
                break
        if ok:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("no quorum with every node up before the deadline")
        time.sleep(0.01)


def write_post_lua(work: str) -> str:
    """A wrk script (in `work`) that sends the greeter's `POST /greeter/welcome` body; its path."""
    path = os.path.join(work, "post.lua")
    with open(path, "w") as f:
        f.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            'wrk.body = \'{"names":["world"]}\'\n'
        )
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per wrk run")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded wrk seconds before each run")
    ap.add_argument("--conns", default="4,64", help="comma-separated wrk connection counts")
    ap.add_argument("--timeout", type=float, default=60.0, help="deadline for start-up / convergence")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (node logs)")
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",") if c.strip()]

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    n = 3
    work = tempfile.mkdtemp(prefix="aether-http-bench-")
    res: dict[str, object] = {}
    extra: dict[str, object] = {}
    rc = 0
    cluster: Cluster | None = None
    try:
        ensure_wrk()
        os.environ["AETHER_REPOSITORY"] = os.path.join(work, "repo")
        build_repository(Path(work) / "repo", Path(work) / "wheels")
        post_lua = write_post_lua(work)
        cluster = Cluster(n, work, no_uvloop=False, fsync=None, extra=[])
        mgmt = cluster.mgmt_ports[0]
        hport = cluster.http_ports

        # ---- start to first answer
        t0 = time.perf_counter()
        deadline = time.monotonic() + a.timeout
        for i in range(n):
            cluster.start_node(i)
        wait_quorum_fast(cluster, deadline)
        t_quorum = time.perf_counter() - t0
        http(mgmt, "POST", "/api/v1/blueprints", {"toml": BLUEPRINT, "filename": "hello.blueprint"})
        t_applied = time.perf_counter() - t0
        first_200(hport[0], "/hello/world", deadline)
        t_first = time.perf_counter() - t0
        log(
            f"start to first 200 on GET /hello/world: {t_first:.3f} s "
            f"(quorum {t_quorum:.3f} s, blueprint accepted {t_applied:.3f} s)"
        )
        time.sleep(1.0)
        mb, nproc = pss_mb([p.pid for p in cluster.procs if p is not None])
        log(f"PSS of {nproc} node processes, example app running (hello x2, greeter x1): {mb:.1f} MB")
        res_first, res_pss = t_first, mb

        # ---- local placement: one hello and one greeter instance per node
        http(mgmt, "POST", "/api/v1/scale", {"artifact": HELLO, "instances": n})
        http(mgmt, "POST", "/api/v1/scale", {"artifact": GREETER, "instances": n})
        st = wait_converged(mgmt, {HELLO: n, GREETER: n}, a.timeout)
        where = placement(st)
        log(f"placement for hello/compose: {where}")
        for art in (HELLO, GREETER):
            if where.get(art, {}).get("node-1", 0) < 1:
                raise RuntimeError(f"{art} has no instance on node-1: {where}")
        sample = http(hport[0], "GET", "/hello/world")
        log(f"sample GET /hello/world on node-1: {sample}")
        hello: dict[int, dict[str, float]] = {}
        for c in conns:
            hello[c] = load("hello", f"http://{HOST}:{hport[0]}/hello/world", c, a, None)
        sample = http(hport[0], "POST", "/greeter/welcome", {"names": ["world"]})
        log(f"sample POST /greeter/welcome on node-1: {sample}")
        compose: dict[int, dict[str, float]] = {}
        for c in conns:
            compose[c] = load("compose", f"http://{HOST}:{hport[0]}/greeter/welcome", c, a, post_lua)
        mb2, _ = pss_mb([p.pid for p in cluster.procs if p is not None])
        log(f"PSS after hello/compose load (3 hello + 3 greeter instances): {mb2:.1f} MB")
        extra["pss_after_load_mb"] = mb2

        # ---- remote: a single hello instance; load on a node without one
        http(mgmt, "POST", "/api/v1/scale", {"artifact": HELLO, "instances": 1})
        st = wait_converged(mgmt, {HELLO: 1, GREETER: n}, a.timeout)
        hello_nodes = set(placement(st)[HELLO])
        target = next(i for i in range(n) if cluster.ids[i] not in hello_nodes)
        log(
            f"remote placement: hello on {sorted(hello_nodes)}; load on {cluster.ids[target]}"
            + ("" if target == 0 else " (the instance landed on node-1)")
        )
        sample = http(hport[target], "GET", "/hello/world")
        if sample.get("node") == cluster.ids[target]:
            raise RuntimeError(f"remote request answered locally: {sample}")
        log(f"sample GET /hello/world on {cluster.ids[target]}: {sample}")
        remote: dict[int, dict[str, float]] = {}
        for c in conns:
            remote[c] = load("hello-remote", f"http://{HOST}:{hport[target]}/hello/world", c, a, None)
        extra["remote_via"] = cluster.ids[target]

        def g(d: dict[int, dict[str, float]], c: int, k: str) -> object:
            return d[c][k] if c in d and k in d[c] else "na"

        res.update(
            hello_c4_rps=g(hello, 4, "rps"),
            hello_c64_rps=g(hello, 64, "rps"),
            hello_c64_p99_ms=g(hello, 64, "p99_ms"),
            hello_remote_c64_rps=g(remote, 64, "rps"),
            compose_c4_rps=g(compose, 4, "rps"),
            compose_c64_rps=g(compose, 64, "rps"),
            compose_c64_p99_ms=g(compose, 64, "p99_ms"),
            start_to_first_s=res_first,
            pss_mb=res_pss,
        )
        for name, d in (("hello", hello), ("hello_remote", remote), ("compose", compose)):
            for c in conns:
                for k in ("rps", "p50_ms", "p99_ms"):
                    key = f"{name}_c{c}_{k}"
                    if key not in res:
                        extra[key] = d[c].get(k, "na")
        allruns = [*hello.values(), *compose.values(), *remote.values()]
        extra["non2xx"] = int(sum(r["non2xx"] for r in allruns))
        extra["socket_errors"] = int(sum(r["socket_errors"] for r in allruns))
        extra["quorum_s"] = t_quorum
    except (Exception, Interrupted) as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        if cluster is not None:
            cluster.log_tails()
        res = {"error": type(e).__name__}
        extra = {}
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_wrk()
        if cluster is not None:
            cluster.stop_all()
        if a.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res.update(extra)
    print(result_line(res), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
