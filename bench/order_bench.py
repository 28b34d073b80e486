#!/usr/bin/env python3
"""Order demo benchmark: `POST /api/orders` (and `GET /api/orders/{id}`) requests/s and p50/p99 on
3 real nodes, with the load spread over every node's HTTP port.

Builds the order demo's six wheels (examples/build.py --only order_demo: five slices and the
order-domain library), deploys them into a fresh repository, starts 3 `aether node` processes on
127.0.0.1 (free ports; data dirs and logs in a fresh `/tmp/aether-order-bench-*` dir), applies
examples/order_demo/demo-order.blueprint (inventory x2, pricing x2, place-order x3,
get-order-status x2, cancel-order x2; maps `orders` and `stock` with 3 replicas, write quorum 2)
and waits until every instance is ACTIVE. Then, for each connection count C in `--conns`:

- `place`: three `wrk -t1 -c(C/3)` processes at once, one per node's HTTP port, each sending
  `POST /api/orders` with one line (1 x PROD-STICKER, whose stock is effectively unlimited). Every
  request is a full place-order: two slice calls to inventory (check, reserve; reserve is a
  compare-and-set on the `stock` map), one to pricing, and a replicated put into `orders`.
- `get`: the same shape with `GET /api/orders/{id}` over 300 orders placed beforehand.

Each run has an unrecorded warm-up (`--warmup`, default 2 s) and then `--duration` s (default 10).
`rps` is the sum over the three wrk processes. p50/p99 merge the three latency distributions:
each wrk process reports its latency at every 0.1 % quantile (a Lua `done` hook), these are
pooled weighted by request count and the percentile is read off the pool (exact to about 0.1 %
in rank). Everything runs on loopback on the same machine as the nodes (wrk uses CPU too);
every process started is tracked by PID and killed by PID on exit, also on SIGINT/SIGTERM.

Final line (machine-readable):
`RESULT nodes=3 place_c{C}_rps=... place_c{C}_p50_ms=... place_c{C}_p99_ms=... get_c{C}_rps=...
get_c{C}_p50_ms=... get_c{C}_p99_ms=... non2xx=... socket_errors=...` (one line), or
`RESULT error=<ExceptionName>` after the tail of every node log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from http_bench import Interrupted, _on_signal, ensure_wrk, http, wait_quorum_fast  # noqa: E402
from kv_bench import HOST, Cluster, log  # noqa: E402

BUILD = ROOT / "examples" / "build.py"
BLUEPRINT_FILE = ROOT / "examples" / "order_demo" / "demo-order.blueprint"
BLUEPRINT_ID = "demo-order:0.1.0"
ORDER = {"customerId": "CUST-BENCH", "items": [{"productId": "PROD-STICKER", "quantity": 1}]}

_wrk: set[subprocess.Popen[bytes]] = set()

LUA_DONE = """
done = function(summary, latency, requests)
  local q = {}
  for i = 1, 1000 do q[i] = latency:percentile(i / 10) end
  io.write("QUANTILES_US " .. table.concat(q, " ") .. "\\n")
  local e = summary.errors
  io.write(string.format("SUMMARY requests=%d duration_us=%d non2xx=%d socket_errors=%d\\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def post_script() -> str:
    body = json.dumps(ORDER).replace("\\", "\\\\").replace("'", "\\'")
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = '{body}'\n" + LUA_DONE
    )


def get_script(order_ids: list[str]) -> str:
    paths = ", ".join(f'"/api/orders/{oid}"' for oid in order_ids)
    return (
        f"paths = {{ {paths} }}\n"
        "counter = 0\n"
        "request = function()\n"
        "  counter = counter + 1\n"
        '  return wrk.format("GET", paths[(counter % #paths) + 1])\n'
        "end\n" + LUA_DONE
    )


def build_wheels(out: Path) -> list[Path]:
    proc = subprocess.run(
        [sys.executable, str(BUILD), "--only=order_demo", "--no-deploy", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the order demo failed:\n{proc.stdout}{proc.stderr}")
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 6:
        raise RuntimeError(f"expected 6 wheels, built {[w.name for w in wheels]}")
    return wheels


def run_wrk_all(ports: list[int], path: str, conns: int, seconds: float, script: Path) -> list[str]:
    """One `wrk -t1` per port, all at once, `conns` connections in total; their outputs."""
    per = [conns // len(ports) + (1 if i < conns % len(ports) else 0) for i in range(len(ports))]
    procs = []
    for port, c in zip(ports, per, strict=True):
        if c == 0:
            continue
        cmd = ["wrk", "-t1", f"-c{c}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script)]
        p = subprocess.Popen(
            [*cmd, f"http://{HOST}:{port}{path}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        _wrk.add(p)
        procs.append(p)
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 30)
            if p.returncode != 0:
                raise RuntimeError(f"wrk exited {p.returncode}:\n{out.decode(errors='replace')}")
            outs.append(out.decode(errors="replace"))
    finally:
        kill_wrk()
    return outs


def kill_wrk() -> None:
    for p in list(_wrk):
        if p.poll() is None:
            p.kill()
            p.wait(5)
        _wrk.discard(p)


def merge(outs: list[str]) -> dict[str, float]:
    """Sum the rates; pool the quantile grids (weighted by requests) for p50/p99."""
    pool: list[tuple[float, float]] = []  # (latency_us, weight)
    rps = 0.0
    non2xx = errors = 0
    for out in outs:
        q_line = next(ln for ln in out.splitlines() if ln.startswith("QUANTILES_US "))
        s_line = next(ln for ln in out.splitlines() if ln.startswith("SUMMARY "))
        s = {k: int(v) for k, v in (kv.split("=") for kv in s_line.split()[1:])}
        qs = [float(x) for x in q_line.split()[1:]]
        rps += s["requests"] / (s["duration_us"] / 1e6)
        non2xx += s["non2xx"]
        errors += s["socket_errors"]
        pool += [(v, s["requests"] / len(qs)) for v in qs]
    pool.sort()
    total = sum(w for _, w in pool)

    def pct(p: float) -> float:
        acc = 0.0
        for v, w in pool:
            acc += w
            if acc >= total * p / 100:
                return v / 1000
        return pool[-1][0] / 1000

    return {"rps": rps, "p50_ms": pct(50), "p99_ms": pct(99), "non2xx": non2xx, "socket_errors": errors}


def load(
    label: str, ports: list[int], path: str, conns: int, a: argparse.Namespace, script: Path
) -> dict[str, float]:
    run_wrk_all(ports, path, conns, a.warmup, script)  # not recorded
    r = merge(run_wrk_all(ports, path, conns, a.duration, script))
    log(
        f"{label} c={conns} over {len(ports)} ports: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
        f"p99 {r['p99_ms']:.2f} ms, non2xx {r['non2xx']:.0f}, socket errors {r['socket_errors']:.0f}"
    )
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each run")
    ap.add_argument("--conns", default="6,48", help="comma-separated total connection counts")
    ap.add_argument("--timeout", type=float, default=90.0, help="deadline for start-up and convergence")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (node logs)")
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",") if c.strip()]
    if not conns or min(conns) < 1:
        ap.error("--conns needs positive connection counts, e.g. 6,48")

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    n = 3
    work = Path(tempfile.mkdtemp(prefix="aether-order-bench-"))
    res: dict[str, object] = {"nodes": n}
    rc = 0
    cluster: Cluster | None = None
    try:
        ensure_wrk()
        log("building the order demo wheels")
        from aether.slices.repository import Repository

        repo = Repository(work / "repo")
        for w in build_wheels(work / "wheels"):
            repo.deploy_wheel(w)
        os.environ["AETHER_REPOSITORY"] = str(work / "repo")
        cluster = Cluster(n, str(work), no_uvloop=False, fsync=None, extra=[])
        mgmt = cluster.mgmt_ports[0]
        ports = cluster.http_ports
        deadline = time.monotonic() + a.timeout
        for i in range(n):
            cluster.start_node(i)
        wait_quorum_fast(cluster, deadline)
        http(
            mgmt, "POST", "/api/v1/blueprints", {"toml": BLUEPRINT_FILE.read_text(), "filename": "demo-order"}
        )
        st = http(
            mgmt,
            "POST",
            f"/api/v1/blueprints/{BLUEPRINT_ID}/wait?timeout={a.timeout:g}",
            timeout=a.timeout + 5,
        )
        log("deployed: " + ", ".join(f"{s['artifact']} x{s['active']}" for s in st))
        sample = http(ports[0], "POST", "/api/orders", ORDER)
        log(f"sample POST /api/orders on node-1: {sample}")
        ids = [http(ports[k % n], "POST", "/api/orders", ORDER)["orderId"] for k in range(300)]
        read = http(ports[2], "GET", f"/api/orders/{ids[0]}")
        if read["orderId"] != ids[0]:
            raise RuntimeError(f"GET /api/orders/{ids[0]} answered {read}")
        post_lua, get_lua = work / "post.lua", work / "get.lua"
        post_lua.write_text(post_script())
        get_lua.write_text(get_script(ids))
        non2xx = socket_errors = 0
        for c in conns:
            r = load("place", ports, "/api/orders", c, a, post_lua)
            res.update(
                {
                    f"place_c{c}_rps": r["rps"],
                    f"place_c{c}_p50_ms": r["p50_ms"],
                    f"place_c{c}_p99_ms": r["p99_ms"],
                }
            )
            non2xx += int(r["non2xx"])
            socket_errors += int(r["socket_errors"])
        for c in conns:
            r = load("get", ports, "/api/orders/x", c, a, get_lua)
            res.update(
                {f"get_c{c}_rps": r["rps"], f"get_c{c}_p50_ms": r["p50_ms"], f"get_c{c}_p99_ms": r["p99_ms"]}
            )
            non2xx += int(r["non2xx"])
            socket_errors += int(r["socket_errors"])
        stock = http(ports[1], "GET", "/api/inventory/PROD-STICKER")
        log(f"stock after the run: {stock}")
        res.update(non2xx=non2xx, socket_errors=socket_errors)
    except (Exception, Interrupted) as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        if cluster is not None:
            for i in range(n):
                log(f"--- {cluster.ids[i]} log tail ---\n{cluster.log_tail(i)}")
        res = {"error": type(e).__name__}
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
    print(
        "RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
        flush=True,
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
