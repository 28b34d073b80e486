#!/usr/bin/env python3
"""Order demo benchmark: `POST /api/orders` on ONE hot product (and `GET /api/orders/{id}`)
requests/s and p50/p99 on 3 real nodes, with the load spread over every node's HTTP port.

Builds the order demo's six wheels (examples/build.py --only order_demo: five slices and the
order-domain library), deploys them into a fresh repository, starts 3 `aether node` processes on
127.0.0.1 (free ports; data dirs and logs in a fresh `/tmp/aether-order-bench-*` dir), applies
examples/order_demo/demo-order.blueprint (inventory x3, pricing x3, place-order x3,
get-order-status x2, cancel-order x2; maps `orders` and `stock` with 3 replicas, write quorum 2)
and waits until every instance is ACTIVE. Then, for each connection count C in `--conns`:

- `place`: three `wrk -t1 -c(C/3)` processes at once, one per node's HTTP port, each sending
  `POST /api/orders` with one line: 1 x `--product` (default PROD-STICKER, 100,000,000 in stock:
  every order really takes a unit of the same product, and none runs out). Every request is a
  full place-order: two slice calls to inventory (check, reserve: the take, shared with its
  batch, and the order's reservation record), one to pricing, and a replicated put into `orders`.
- `get`: the same shape with `GET /api/orders/{id}` over 300 orders placed beforehand
  (`--no-get` skips it).

After the runs the product's stock must have gone down by at least the orders answered 2xx
(else the run fails: an order acknowledged without its stock).

Each run has an unrecorded warm-up (`--warmup`, default 2 s) and then `--duration` s (default 10).
`rps` is the sum over the three wrk processes. p50/p99 merge the three latency distributions:
each wrk process reports its latency at every 0.1 % quantile (a Lua `done` hook), these are
pooled weighted by request count and the percentile is read off the pool (exact to about 0.1 %
in rank; the log line gives p90 and p99.9 as well). `cpu_ms`: user + system CPU of the three
node processes per placed order (from /proc/PID/stat), which the other work on a shared machine
moves much less than rps and latency. `loop_lag_ms`: the largest event-loop lag any node reported
(`loop_lag_max_ms` of its status, the last 10 s) right after the run, -1 if none answered; the
per-node log line gives each node's (a tail from a stalled loop shows there). `retries`: calls
the nodes' invokers retried during the run (`aether_invoke_retries_total`; -1 if unknown);
`map_retries`: their map operations tried again (`aether_map_op_retries_total`, every reason: an
attempt the primary left unanswered for 1 s is one, and shows as a ~1 s tail).
Everything runs on loopback on the same machine as the nodes (wrk uses CPU too); every process
started is tracked by PID and killed by PID on exit, also on SIGINT/SIGTERM.

`--isolation thread|inline` runs every demo slice on a thread of its own or on its node's loop
(the blueprint says ``isolation = "shared"``: one slice loop per node, calls between the demo's
slices direct) and `--engine memory|sqlite` sets both maps' storage engine (the blueprint says
``log``): experiments that show what the slice threads and the storage cost per order, not
configurations the demo ships with.

`--baseline REF` (e.g. `main`) also builds the demo as of git REF (`git archive REF examples src`,
built by that tree's own build.py) and runs its nodes on REF's `src` too (through `PYTHONPATH`,
so a change of the platform, e.g. the map's storage, is compared as well as one of the demo's
slices), and measures both, each on fresh nodes, `--rounds N` times,
alternating which goes first; the RESULT then gives the medians (`base_*` for REF) and the
medians of the per-round ratios new/base (`place_c{C}_{rps,p50_ms,p99_ms,cpu_ms}_ratio`).

Final line (machine-readable):
`RESULT nodes=3 product=... isolation=... engine=... place_c{C}_rps=... place_c{C}_p50_ms=...
place_c{C}_p99_ms=... place_c{C}_cpu_ms=... place_c{C}_loop_lag_ms=... place_c{C}_retries=...
place_c{C}_map_retries=... get_c{C}_rps=... get_c{C}_p50_ms=... get_c{C}_p99_ms=... non2xx=...
socket_errors=...
[base_... place_c{C}_rps_ratio=... ...]` (one line), or
`RESULT error=<ExceptionName>` after the tail of every node log.
"""

from __future__ import annotations

import argparse
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
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from http_bench import Interrupted, _on_signal, ensure_wrk, http, wait_quorum_fast  # noqa: E402
from kv_bench import HOST, Cluster, log  # noqa: E402
from limits import with_isolation  # noqa: E402

BUILD = ROOT / "examples" / "build.py"
BLUEPRINT_FILE = ROOT / "examples" / "order_demo" / "demo-order.blueprint"
BLUEPRINT_ID = "demo-order:0.1.0"
HOT_PRODUCT = "PROD-STICKER"  # 100,000,000 in stock: every order takes one, none runs out

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


def post_script(order: dict[str, object]) -> str:
    body = json.dumps(order).replace("\\", "\\\\").replace("'", "\\'")
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


def with_engine(blueprint: str, engine: str) -> str:
    """`blueprint` with every map's storage engine set to `engine`."""
    return re.sub(r'^engine = "[a-z]+"', f'engine = "{engine}"', blueprint, flags=re.M)


def blueprint_engine(blueprint: str) -> str:
    """The storage engine `blueprint` gives its maps (the first one named)."""
    m = re.search(r'^engine = "([a-z]+)"', blueprint, flags=re.M)
    return m.group(1) if m else "memory"


def blueprint_isolation(blueprint: str) -> str:
    """Where `blueprint` runs its slices (the first isolation named; none: "thread")."""
    m = re.search(r'^isolation = "([a-z]+)"', blueprint, flags=re.M)
    return "thread" if m is None or m.group(1) in ("auto", "process") else m.group(1)


def build_wheels(out: Path, build: Path = BUILD) -> Path:
    proc = subprocess.run(
        [sys.executable, str(build), "--only=order_demo", "--no-deploy", f"--out={out}"],
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
    return out


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
    non2xx = errors = ok_total = 0
    for out in outs:
        q_line = next(ln for ln in out.splitlines() if ln.startswith("QUANTILES_US "))
        s_line = next(ln for ln in out.splitlines() if ln.startswith("SUMMARY "))
        s = {k: int(v) for k, v in (kv.split("=") for kv in s_line.split()[1:])}
        qs = [float(x) for x in q_line.split()[1:]]
        rps += s["requests"] / (s["duration_us"] / 1e6)
        ok_total += s["requests"] - s["non2xx"]
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

    return {
        "rps": rps,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "non2xx": non2xx,
        "socket_errors": errors,
        "ok_total": ok_total,
    }


def cpu_seconds(cluster: Cluster) -> float:
    """User + system CPU seconds the node processes used so far (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in cluster.procs:
        if p is None:
            continue
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def loop_lags(cluster: Cluster) -> list[float | None]:
    """Each node's largest event-loop lag of the last 10 s (`loop_lag_max_ms` of its status), read
    right after a measured run: a stall of the node's loop shows here as a tail of its own."""
    out: list[float | None] = []
    for i in range(cluster.n):
        try:
            lag = cluster.status(i).get("loop_lag_max_ms")
        except (OSError, ValueError):
            lag = None
        out.append(float(lag) if isinstance(lag, (int, float)) else None)
    return out


RETRY_SERIES = {"retries": "aether_invoke_retries_total{", "map_retries": "aether_map_op_retries_total{"}


def retry_counts(cluster: Cluster) -> list[dict[str, float] | None]:
    """Each node's retry counters now, summed over their labels: ``retries`` (its invoker's,
    `aether_invoke_retries_total`) and ``map_retries`` (its map operations',
    `aether_map_op_retries_total`); None if its /metrics did not answer."""
    out: list[dict[str, float] | None] = []
    for i in range(cluster.n):
        try:
            with urllib.request.urlopen(f"http://{HOST}:{cluster.mgmt_ports[i]}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            out.append(None)
            continue
        out.append(parse_retries(text))
    return out


def parse_retries(text: str) -> dict[str, float]:
    """The `RETRY_SERIES` counters in a /metrics text, each summed over its labels."""
    counts = dict.fromkeys(RETRY_SERIES, 0.0)
    for line in text.splitlines():
        for key, prefix in RETRY_SERIES.items():
            if line.startswith(prefix):
                counts[key] += float(line.rsplit(" ", 1)[1])
    return counts


def load(
    label: str,
    ports: list[int],
    path: str,
    conns: int,
    a: argparse.Namespace,
    script: Path,
    cluster: Cluster | None = None,
) -> dict[str, float]:
    run_wrk_all(ports, path, conns, a.warmup, script)  # not recorded
    cpu0 = cpu_seconds(cluster) if cluster is not None else 0.0
    retries0 = retry_counts(cluster) if cluster is not None else []
    outs = run_wrk_all(ports, path, conns, a.duration, script)
    r = merge(outs)
    lags = loop_lags(cluster) if cluster is not None else []
    retries1 = retry_counts(cluster) if cluster is not None else []
    retries = [
        {k: after[k] - before[k] for k in RETRY_SERIES} if after is not None and before is not None else None
        for before, after in zip(retries0, retries1, strict=False)
    ]
    if retries and all(n is not None for n in retries):
        for k in RETRY_SERIES:
            r[k] = float(sum(n[k] for n in retries if n is not None))
    if any(lag is not None for lag in lags):
        r["loop_lag_max_ms"] = max(lag for lag in lags if lag is not None)
    if len(outs) > 1:  # each node as the entry point: an uneven share of the work shows here
        each = [merge([o]) for o in outs]
        log(f"{label} c={conns} per entry node: " + "; ".join(
            f"node-{i + 1} {e['rps']:.0f} req/s p50 {e['p50_ms']:.1f} p99 {e['p99_ms']:.1f} ms"
            + (f" (loop lag max {lags[i]:.0f} ms)" if i < len(lags) and lags[i] is not None else "")
            + ("" if i >= len(retries) or (n := retries[i]) is None
               else f" retries {n['retries']:.0f} map retries {n['map_retries']:.0f}")
            for i, e in enumerate(each)
        ))  # fmt: skip
    if cluster is not None:  # the nodes' CPU per request: what the load on the machine moves least
        r["cpu_ms"] = (cpu_seconds(cluster) - cpu0) * 1000 / max(1.0, r["rps"] * a.duration)
    log(
        f"{label} c={conns} over {len(ports)} ports: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
        f"p90 {r['p90_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, p99.9 {r['p999_ms']:.2f} ms, "
        f"non2xx {r['non2xx']:.0f}, socket errors {r['socket_errors']:.0f}"
        + (f", node CPU {r['cpu_ms']:.2f} ms per request" if "cpu_ms" in r else "")
    )
    return r


def baseline_wheels(ref: str, out: Path) -> tuple[Path, Path]:
    """The order demo's wheels as of git `ref` (its examples/ tree, built by its own build.py),
    and the directory of its `aether` package (the nodes of the baseline run on it)."""
    src = out / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "examples", "src"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {ref} failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=120)
    wheels = out / "wheels"
    build_wheels(wheels, src / "examples" / "build.py")
    return wheels, src / "src"


def run_variant(
    label: str,
    variant: tuple[Path, Path | None],
    work: Path,
    conns: list[int],
    a: argparse.Namespace,
    order: dict[str, object],
) -> dict[str, float]:
    """Start 3 nodes with the demo built from `variant`'s wheels (and, if it names one, on the
    `aether` package of its source directory), measure every step, stop them."""
    from aether.slices.repository import Repository

    wheels, pkg = variant
    n = 3
    repo = Repository(work / "repo")
    for w in sorted(wheels.glob("*.whl")):
        repo.deploy_wheel(w)
    os.environ["AETHER_REPOSITORY"] = str(work / "repo")
    saved = os.environ.get("PYTHONPATH")
    if pkg is not None:  # the nodes (started below, with this environment) import REF's aether
        os.environ["PYTHONPATH"] = str(pkg)
    cluster = Cluster(n, str(work), no_uvloop=False, fsync=None, extra=[])
    res: dict[str, float] = {}
    try:
        mgmt = cluster.mgmt_ports[0]
        ports = cluster.http_ports
        deadline = time.monotonic() + a.timeout
        for i in range(n):
            cluster.start_node(i)
        wait_quorum_fast(cluster, deadline)
        toml = with_isolation(BLUEPRINT_FILE.read_text(), a.isolation)
        if a.engine is not None:
            toml = with_engine(toml, a.engine)
        http(mgmt, "POST", "/api/v1/blueprints", {"toml": toml, "filename": "demo-order"})
        st = http(
            mgmt,
            "POST",
            f"/api/v1/blueprints/{BLUEPRINT_ID}/wait?timeout={a.timeout:g}",
            timeout=a.timeout + 5,
        )
        log(f"[{label}] deployed: " + ", ".join(f"{s['artifact']} x{s['active']}" for s in st))
        product = order["items"][0]["productId"]  # type: ignore[index]
        before = http(ports[1], "GET", f"/api/inventory/{product}")
        ids = [http(ports[k % n], "POST", "/api/orders", order)["orderId"] for k in range(300)]
        read = http(ports[2], "GET", f"/api/orders/{ids[0]}")
        if read["orderId"] != ids[0]:
            raise RuntimeError(f"GET /api/orders/{ids[0]} answered {read}")
        post_lua, get_lua = work / "post.lua", work / "get.lua"
        post_lua.write_text(post_script(order))
        get_lua.write_text(get_script(ids))
        non2xx = socket_errors = 0
        placed = 300
        for c in conns:
            r = load(f"[{label}] place {product}", ports, "/api/orders", c, a, post_lua, cluster)
            res.update(
                {
                    f"place_c{c}_rps": r["rps"],
                    f"place_c{c}_p50_ms": r["p50_ms"],
                    f"place_c{c}_p99_ms": r["p99_ms"],
                    f"place_c{c}_cpu_ms": r["cpu_ms"],
                    f"place_c{c}_loop_lag_ms": r.get("loop_lag_max_ms", -1.0),
                    f"place_c{c}_retries": r.get("retries", -1.0),
                    f"place_c{c}_map_retries": r.get("map_retries", -1.0),
                }
            )
            non2xx += int(r["non2xx"])
            socket_errors += int(r["socket_errors"])
            placed += int(r["ok_total"])
        if not a.no_get:
            for c in conns:
                r = load(f"[{label}] get", ports, "/api/orders/x", c, a, get_lua)
                res.update(
                    {
                        f"get_c{c}_rps": r["rps"],
                        f"get_c{c}_p50_ms": r["p50_ms"],
                        f"get_c{c}_p99_ms": r["p99_ms"],
                    }
                )
                non2xx += int(r["non2xx"])
                socket_errors += int(r["socket_errors"])
        after = http(ports[1], "GET", f"/api/inventory/{product}")
        taken = before["available"] - after["available"]
        log(
            f"[{label}] stock of {product}: {before} -> {after}: {taken} taken, at least {placed} orders "
            "answered 2xx (wrk does not count the answers it cut off)"
        )
        if taken < placed or after["available"] < 0:
            raise RuntimeError(f"{product}: {taken} units taken for {placed} acknowledged orders")
        res.update(non2xx=non2xx, socket_errors=socket_errors)
    except BaseException:
        for i in range(n):
            log(f"--- {cluster.ids[i]} log tail ---\n{cluster.log_tail(i)}")
        raise
    finally:
        kill_wrk()
        cluster.stop_all()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each run")
    ap.add_argument("--conns", default="6,48", help="comma-separated total connection counts")
    ap.add_argument("--timeout", type=float, default=90.0, help="deadline for start-up and convergence")
    ap.add_argument("--product", default=HOT_PRODUCT, help="the one product every order takes")
    ap.add_argument("--baseline", metavar="REF", help="also measure the demo as of git REF (e.g. main)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds (with --baseline: each runs both)")
    ap.add_argument("--no-get", action="store_true", help="skip the GET /api/orders/{id} step")
    ap.add_argument(
        "--isolation", choices=("thread", "shared", "inline"), default=None,
        help='where the demo\'s slices run (default: as the blueprint says, "shared"): "thread", a '
        'loop and thread of their own each; "shared", one slice loop per node; "inline", the node\'s '
        "loop (set in every slice table, for the experiment)",
    )  # fmt: skip
    ap.add_argument(
        "--engine", choices=("log", "sqlite", "memory"),
        help="the storage engine of both maps (default: as the blueprint says)",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the work dir (node logs)")
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",") if c.strip()]
    if not conns or min(conns) < 1:
        ap.error("--conns needs positive connection counts, e.g. 6,48")
    if a.rounds < 1:
        ap.error("--rounds needs at least 1")
    order = {"customerId": "CUST-BENCH", "items": [{"productId": a.product, "quantity": 1}]}

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    work = Path(tempfile.mkdtemp(prefix="aether-order-bench-"))
    engine = a.engine or blueprint_engine(BLUEPRINT_FILE.read_text())
    isolation = a.isolation or blueprint_isolation(BLUEPRINT_FILE.read_text())
    res: dict[str, object] = {"nodes": 3, "product": a.product, "isolation": isolation, "engine": engine}
    rc = 0
    try:
        ensure_wrk()
        log("building the order demo wheels")
        variants: dict[str, tuple[Path, Path | None]] = {"new": (build_wheels(work / "wheels"), None)}
        if a.baseline:
            log(f"building the order demo wheels as of {a.baseline}")
            variants = {"base": baseline_wheels(a.baseline, work / "base"), **variants}
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for k in range(a.rounds):
            names = list(variants) if k % 2 == 0 else list(reversed(variants))  # alternate who goes first
            for v in names:
                runs[v].append(run_variant(v, variants[v], work / f"{v}-{k}", conns, a, order))
        for v, rs in runs.items():
            prefix = "base_" if v == "base" else ""
            for key in rs[0]:
                vals = [r[key] for r in rs]
                res[prefix + key] = (
                    sum(vals) if key in ("non2xx", "socket_errors") else statistics.median(vals)
                )
        if a.baseline:
            for c in conns:
                for m in ("rps", "p50_ms", "p99_ms", "cpu_ms"):
                    k = f"place_c{c}_{m}"
                    ratios = [n[k] / b[k] for n, b in zip(runs["new"], runs["base"], strict=True) if b[k]]
                    if ratios:
                        res[f"{k}_ratio"] = statistics.median(ratios)
    except (Exception, Interrupted) as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        res = {"error": type(e).__name__}
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_wrk()
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
