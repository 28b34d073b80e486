#!/usr/bin/env python3
"""Autoscaling benchmark (issue 15): how the layer-1 controller follows a load step.

Starts 3 real `aether node` processes on 127.0.0.1 (free ports; data dirs and logs in a fresh
`/tmp/aether-autoscale-bench-*` dir, deleted unless `--keep`; every process started is tracked by
PID and killed by PID, also on SIGINT/SIGTERM) with a slice repository prepared beforehand: one
slice, `org.bench:sleeper`, whose route `GET /sleep` awaits `asyncio.sleep(0.05)` and returns
"ok" (wheel built with `aether.slices.testing.build_slice_wheel`, as in `deploy_bench.py`). The
blueprint limits each instance to `max_concurrency = 8` calls at once, so capacity grows with
instances, not with CPU (8 / 50 ms = 160 calls/s per instance), and lets the controller move the
count within `[slices.sleeper.scaling] min = 1, max = 8, in_flight = 6`:

    [slices.sleeper]
    artifact = "org.bench:sleeper:0.1.0"
    instances = 1
    max_concurrency = 8
    max_queue = 1000

    [slices.sleeper.scaling]
    min = 1
    max = 8
    in_flight = 6

`max_queue = 1000`: at the step one instance serves 160 calls/s of the 400 offered, so its queue
grows by 240 calls/s until more instances are ACTIVE; 1,000 places absorb ~4 s of that (the goal is
to react within 3 s), and a full queue drains in 1000 / 160 = 6.25 s, far below the load's 30 s
timeout. A refusal (503) during the step therefore means the controller was slower than ~4 s.

An optional controller configuration (`--controller-config FILE`, TOML, docs/controller.md) is
applied first with `PUT /api/v1/controller/config` (falling back to `aether controller config
--set FILE`); when neither exists the run goes on with the defaults and says so.

Load: a separate process (this script with `--loadgen`; aiohttp, uvloop when importable) sends
open-loop `GET /sleep` at fixed, evenly spaced times, round-robin over the 3 nodes' HTTP ports:
`--lo-rps` (40) for `--pre-s` (20 s), `--hi-rps` (400) for `--hi-s` (60 s), then `--lo-rps`
again until the ACTIVE count is back at `min` and `--settle-s` (10 s) more have passed, or for
at most `--post-s` (120 s). Latency is measured from the scheduled send time. Requests time out
after `--req-timeout` (30 s); non-2xx answers, timeouts, connection errors (and requests not sent
because `--max-inflight` were outstanding) are errors.

Every `--sample-s` (0.5 s) the driver reads `GET /api/v1/slices` (what `aether slices` shows: the
ACTIVE instances and the desired count), the `scale/` key (`GET /api/v1/kv?prefix=scale/`) and
`GET /api/v1/controller/status` (both optional: a 404 is tolerated and not asked again).

Final line (medians over `--rounds`, each round a fresh cluster; then the Ray Serve anchor
`/work/shared/anchors/ray_autoscale_bench.sh` unless `--no-ray`):

    RESULT react_s=... p99_step_ms=... recover_s=... errors=... scale_down_s=... flaps=...
           ray_default_react_s=... ray_tuned_react_s=... (extras)

See bench/README.md ("Autoscaling") for what every key means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kv_bench import HOST, Cluster, log, pct  # noqa: E402

ARTIFACT = "org.bench:sleeper:0.1.0"
BP_ID = "autoscale-bench:0.1.0"
ROUTE = "/sleep"
RAY_SCRIPT = "/work/shared/anchors/ray_autoscale_bench.sh"
# load-generator result codes besides HTTP status codes
C_TIMEOUT, C_CONNERR, C_DROPPED, C_UNFINISHED, C_NOTSENT = -1, -2, -3, -4, 0

SLEEPER_SOURCE = '''
"""org.bench:sleeper: one route that waits (asyncio.sleep) and answers a small value."""

from __future__ import annotations

import asyncio

from aether.slices import Slice, route


class Sleeper(Slice):
    async def start(self) -> None:
        self.delay = float(self.context.config.get("delay_ms", 50)) / 1000.0

    @route("GET", "/sleep")
    async def work(self) -> str:
        await asyncio.sleep(self.delay)
        return "ok"
'''


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------------------------------
# load generator (a separate process)


async def _loadgen(p: dict[str, Any]) -> None:
    import aiohttp

    urls, t0 = p["urls"], p["t0"]
    max_inflight, timeout_s = p["max_inflight"], p["timeout_s"]
    sched: list[float] = []
    base = 0.0
    for rate, dur in p["phases"]:
        n = round(rate * dur)
        sched.extend(base + k / rate for k in range(n))
        base += dur
    n = len(sched)
    code = [C_NOTSENT] * n
    lat: list[float | None] = [None] * n
    lag: list[float | None] = [None] * n
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    inflight = 0
    tasks: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=max_inflight + 16, limit_per_host=0)
    session = aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def one(i: int, ts: float) -> None:
        nonlocal inflight
        inflight += 1
        lag[i] = time.monotonic() - ts
        try:
            async with session.get(urls[i % len(urls)]) as r:
                await r.read()
                code[i] = r.status
        except TimeoutError:
            code[i] = C_TIMEOUT
        except Exception:  # connection reset/refused, payload errors
            code[i] = C_CONNERR
        finally:
            lat[i] = time.monotonic() - ts
            inflight -= 1

    stopped_at = n
    if time.monotonic() > t0:
        print(f"[loadgen] started {time.monotonic() - t0:.2f}s after t0", flush=True)
    for i in range(n):
        if stop.is_set():
            stopped_at = i
            break
        ts = t0 + sched[i]
        d = ts - time.monotonic()
        if d > 0:
            await asyncio.sleep(d)
        if inflight >= max_inflight:
            code[i] = C_DROPPED
            continue
        t = asyncio.create_task(one(i, ts))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=timeout_s + 5)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    await session.close()
    for i in range(stopped_at):
        if code[i] == C_NOTSENT:
            code[i] = C_UNFINISHED
    with open(p["out"] + ".tmp", "w") as f:
        json.dump(
            {
                "sched": [round(x, 4) for x in sched[:stopped_at]],
                "code": code[:stopped_at],
                "lat": [None if x is None else round(x, 5) for x in lat[:stopped_at]],
                "lag": [None if x is None else round(x, 5) for x in lag[:stopped_at]],
            },
            f,
        )
    os.rename(p["out"] + ".tmp", p["out"])
    print(f"[loadgen] done: {stopped_at}/{n} scheduled requests issued or dropped", flush=True)


def loadgen_main(params_json: str) -> int:
    p = json.loads(params_json)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(_loadgen(p))
    except KeyboardInterrupt:
        return 130
    return 0


# --------------------------------------------------------------------------------------------------
# management API


class HttpStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def http(
    port: int,
    method: str,
    path: str,
    body: object | None = None,
    timeout: float = 10.0,
    raw: bytes | None = None,
    ctype: str = "application/json",
) -> Any:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", data=data, method=method, headers={"Content-Type": ctype}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
    except urllib.error.HTTPError as e:
        raise HttpStatus(e.code, e.read().decode(errors="replace")) from None
    return json.loads(text) if text.strip() else None


def build_repository(root: Path, wheels: Path) -> None:
    from aether.slices.repository import Repository
    from aether.slices.testing import build_slice_wheel

    Repository(root).deploy(
        build_slice_wheel(wheels, ARTIFACT, SLEEPER_SOURCE, "Sleeper", module="sleeper_slice")
    )


def blueprint(a: argparse.Namespace, *, limits: bool, scaling: bool) -> str:
    out = [f'id = "{BP_ID}"', "", "[slices.sleeper]", f'artifact = "{ARTIFACT}"', "instances = 1"]
    if limits:
        out += [f"max_concurrency = {a.max_concurrency}", f"max_queue = {a.max_queue}"]
    out += ["", "[slices.sleeper.config]", f"delay_ms = {a.service_ms:g}"]
    if scaling:
        out += [
            "",
            "[slices.sleeper.scaling]",
            f"min = {a.min}",
            f"max = {a.max}",
            f"in_flight = {a.in_flight:g}",
        ]
    return "\n".join(out) + "\n"


def apply_blueprint(port: int, a: argparse.Namespace, notes: dict[str, Any]) -> None:
    """The full blueprint; if this build refuses a key (issue 15 not merged yet), the same without
    the scaling table, then without the limits, and say so in the result (`--strict`: fail)."""
    attempts = [(True, True), (True, False), (False, False)]
    last: HttpStatus | None = None
    for limits, scaling in attempts:
        toml = blueprint(a, limits=limits, scaling=scaling)
        try:
            http(port, "POST", "/api/v1/blueprints", {"toml": toml, "filename": "autoscale.blueprint"})
        except HttpStatus as e:
            if e.status != 400 or a.strict:
                raise
            log(f"blueprint refused (limits={limits}, scaling={scaling}): {e.body[:300]}")
            last = e
            continue
        notes["limits"] = "on" if limits else "refused"
        notes["scaling"] = "on" if scaling else "refused"
        if last is not None:
            log(f"WARNING: part of the blueprint refused; applied limits={limits}, scaling={scaling}")
        log("blueprint:\n" + toml)
        return
    raise RuntimeError(f"blueprint refused: {last}")


def apply_controller_config(cluster: Cluster, path: str, notes: dict[str, Any]) -> None:
    text = Path(path).read_text()
    port = cluster.mgmt_ports[0]
    for ctype in ("application/toml", "text/plain"):
        try:
            http(port, "PUT", "/api/v1/controller/config", raw=text.encode(), ctype=ctype)
            notes["controller_config"] = "applied"
            log(f"controller config {path} applied (PUT /api/v1/controller/config, {ctype})")
            return
        except HttpStatus as e:
            if e.status in (404, 405):
                break
            if e.status == 415:
                continue
            log(f"PUT /api/v1/controller/config: {e}")
            break
    with contextlib.suppress(HttpStatus):  # a JSON body, in case the route wants one
        http(port, "PUT", "/api/v1/controller/config", {"toml": text})
        notes["controller_config"] = "applied"
        log(f"controller config {path} applied (PUT /api/v1/controller/config, JSON)")
        return
    cli = Path(sys.executable).with_name("aether")
    env = dict(os.environ, AETHER_CONNECT=f"http://{HOST}:{port}")
    try:
        r = subprocess.run(
            [str(cli), "controller", "config", "--set", path],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        r = None
        log(f"aether controller config --set: {e}")
    if r is not None and r.returncode == 0:
        notes["controller_config"] = "applied"
        log(f"controller config {path} applied (aether controller config --set)")
        return
    if r is not None:
        log(f"aether controller config --set failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:300]}")
    notes["controller_config"] = "unsupported"
    log("WARNING: no way to set the controller config on this build; running with its defaults")


def first_200(ports: list[int], deadline: float) -> None:
    for port in ports:
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}{ROUTE}", timeout=2.0) as r:
                    if r.status == 200:
                        r.read()
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 200 on {ROUTE} of port {port} before the deadline")
            time.sleep(0.05)


class Sampler:
    """Reads the ACTIVE count (and, when this build has them, the scale/ key and the controller's
    status) from the management API; asks the other nodes when one does not answer."""

    def __init__(self, cluster: Cluster) -> None:
        self.ports = list(cluster.mgmt_ports)
        self.kv_ok = True
        self.failures = 0

    def _get(self, path: str) -> Any:
        err: Exception | None = None
        for port in self.ports:
            try:
                return http(port, "GET", path, timeout=2.0)
            except HttpStatus:
                raise
            except Exception as e:  # a node not answering: try the next
                err = e
        raise RuntimeError(f"no node answered {path}: {err}")

    def sample(self) -> dict[str, Any] | None:
        try:
            st = self._get("/api/v1/slices")
        except Exception as e:
            self.failures += 1
            log(f"sample failed: {type(e).__name__}: {e}")
            return None
        s = next((x for x in st if x["artifact"] == ARTIFACT), None)
        out: dict[str, Any] = {
            "active": s["active"] if s else 0,
            "desired": s["desired"] if s else 0,
            "states": ",".join(
                sorted(f"{i['node'][-1]}:{i['state']}{len(i['instance_ids'])}" for i in s["instances"])
            )
            if s
            else "",
        }
        if self.kv_ok:
            try:  # instances registered for routing: one endpoint key per entry and instance
                kv = self._get("/api/v1/kv?prefix=" + urllib.parse.quote(f"endpoints/{ARTIFACT}/"))
                out["serving"] = len(
                    {
                        e["key"].rsplit(":", 1)[-1]
                        for e in kv.get("entries", [])
                        if isinstance(e.get("value"), dict) and e["value"].get("state") == "ACTIVE"
                    }
                )
                kv = self._get("/api/v1/kv?prefix=scale/")
                ent = next((e for e in kv.get("entries", []) if e["key"].endswith(ARTIFACT)), None)
                if ent is not None and isinstance(ent.get("value"), dict):
                    out["scale"] = ent["value"].get("instances")
                    out["scale_source"] = ent["value"].get("source")
            except HttpStatus as e:
                if e.status in (400, 404):
                    self.kv_ok = False
            except Exception:
                pass
        return out


# --------------------------------------------------------------------------------------------------
# CPU


_CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fl = f.read().rsplit(")", 1)[-1].split()
        return (int(fl[11]) + int(fl[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def cpu_mark(cluster: Cluster) -> tuple[float, dict[str, float | None]]:
    return time.monotonic(), {
        nid: (proc_cpu_s(p.pid) if p is not None else None)
        for nid, p in zip(cluster.ids, cluster.procs, strict=True)
    }


def cpu_pct(
    m0: tuple[float, dict[str, float | None]], m1: tuple[float, dict[str, float | None]]
) -> dict[str, float]:
    (t0, a), (t1, b) = m0, m1
    out = {}
    for k, v in b.items():
        if v is not None and a.get(k) is not None and t1 > t0:
            out[k] = 100.0 * (v - a[k]) / (t1 - t0)  # type: ignore[operator]
    return out


def controller_get(cluster: Cluster, node: str | None, path: str) -> Any:
    """`GET /api/v1/controller/PATH` on `node` (the leader: only it counts its steps); None when
    this build has no such endpoint or the node does not answer."""
    i = cluster.ids.index(node) if node in cluster.ids else 0
    try:
        return http(cluster.mgmt_ports[i], "GET", f"/api/v1/controller/{path}", timeout=3.0)
    except HttpStatus as e:
        if e.status not in (404, 405):
            log(f"GET /api/v1/controller/{path}: {e}")
    except Exception as e:
        log(f"GET /api/v1/controller/{path}: {type(e).__name__}: {e}")
    return None


def step_share(s0: Any, s1: Any, dt: float) -> dict[str, Any]:
    """The controller's share of one core between two status answers of the leader: time spent in
    its steps (`step_seconds`, observation + decisions + dispatch) per second of wall clock."""
    if not (isinstance(s0, dict) and isinstance(s1, dict)) or dt <= 0:
        return {}
    if "step_seconds" not in s0 or "step_seconds" not in s1 or s0.get("node_id") != s1.get("node_id"):
        return {}
    return {
        "ctl_cpu_pct": 100.0 * (s1["step_seconds"] - s0["step_seconds"]) / dt,
        "ctl_steps": s1.get("steps", 0) - s0.get("steps", 0),
        "ctl_step_max_ms": s1.get("step_max_ms"),
    }


def leader_of(cluster: Cluster) -> str | None:
    for i in range(cluster.n):
        with contextlib.suppress(Exception):
            return cluster.status(i).get("leader")
    return None


# --------------------------------------------------------------------------------------------------
# statistics


def ok_code(c: int) -> bool:
    return 200 <= c < 300


def window(lg: dict[str, Any], lo: float, hi: float) -> dict[str, Any]:
    """Stats of the requests scheduled in [lo, hi) s after t0 (latencies of the 2xx only)."""
    ok: list[float] = []
    errs: dict[str, int] = {}
    lags: list[float] = []
    for s, c, lt, g in zip(lg["sched"], lg["code"], lg["lat"], lg["lag"], strict=True):
        if not lo <= s < hi:
            continue
        if ok_code(c):
            ok.append(lt * 1e3)
        else:
            name = {
                C_TIMEOUT: "timeout",
                C_CONNERR: "conn",
                C_DROPPED: "dropped",
                C_UNFINISHED: "unfinished",
            }.get(c, str(c))
            errs[name] = errs.get(name, 0) + 1
        if g is not None:
            lags.append(g * 1e3)
    ok.sort()
    lags.sort()
    return {
        "n_ok": len(ok),
        "errors": sum(errs.values()),
        "by": errs,
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
        "max_ms": ok[-1] if ok else float("nan"),
        "ok_rps": len(ok) / (hi - lo) if hi > lo else float("nan"),
        "lag_p99_ms": pct(lags, 99),
    }


def runs(series: list[int]) -> tuple[int, int]:
    """(scale-ups, scale-downs): maximal runs of same-direction moves of the sampled count (flat
    samples in between do not split a run), so 1 -> 2 -> 4 -> 1 is one up and one down."""
    ups = downs = 0
    last = 0
    for a, b in itertools.pairwise(series):
        s = (b > a) - (b < a)
        if s == 0 or s == last:
            continue
        ups += s > 0
        downs += s < 0
        last = s
    return ups, downs


def first_after(samples: list[dict[str, Any]], t_from: float, pred: Any) -> float | None:
    for s in samples:
        if s["t"] >= t_from and pred(s):
            return s["t"] - t_from
    return None


def recover(lg: dict[str, Any], step: float, end: float, limit_ms: float) -> tuple[float | None, list[float]]:
    """Start (s after the step) of the first 1 s bucket after which every bucket's p99 stays under
    `limit_ms` (a bucket with an error counts as over) until `end`; and the per-bucket p99s."""
    nb = max(0, math.floor(end - step))
    p99s: list[float] = []
    bad: list[bool] = []
    for k in range(nb):
        w = window(lg, step + k, step + k + 1)
        p99s.append(w["p99_ms"])
        bad.append(w["errors"] > 0 or not (w["p99_ms"] < limit_ms))
    last_bad = max((k for k, b in enumerate(bad) if b), default=-1)
    if last_bad == nb - 1 and nb:
        return None, p99s
    return float(last_bad + 1), p99s


def fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


# --------------------------------------------------------------------------------------------------
# one round


def run_round(a: argparse.Namespace, work: str, rnd: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    os.makedirs(work, exist_ok=True)
    cluster = Cluster(3, work, no_uvloop=False, fsync=None, extra=list(a.node_arg or []))
    lg_proc: subprocess.Popen[bytes] | None = None
    try:
        t_start = time.monotonic()
        cluster.start(a.timeout)
        pids = [p.pid for p in cluster.procs if p]
        log(
            f"round {rnd}: 3 nodes up with quorum in {time.monotonic() - t_start:.1f} s ({work}); management "
            f"ports {cluster.mgmt_ports}, HTTP ports {cluster.http_ports}, pids {pids}"
        )
        mgmt = cluster.mgmt_ports[0]
        if a.controller_config:
            apply_controller_config(cluster, a.controller_config, notes)
        apply_blueprint(mgmt, a, notes)
        deadline = time.monotonic() + a.timeout
        while True:
            st = http(mgmt, "GET", "/api/v1/slices")
            s = next((x for x in st if x["artifact"] == ARTIFACT), None)
            if s and s["active"] >= 1 and all(i["state"] == "ACTIVE" for i in s["instances"]):
                break
            if s and any(i["state"] == "FAILED" for i in s["instances"]):
                raise RuntimeError(f"instance FAILED: {s}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"slice not ACTIVE within {a.timeout}s: {st}")
            time.sleep(0.05)
        first_200(cluster.http_ports, deadline)
        log(f"round {rnd}: slice ACTIVE and answering on every node: {s}")
        leader = leader_of(cluster)
        res["leader"] = leader

        # idle: the slice deployed, no load; the controller steps every second on the leader
        m_idle0 = cpu_mark(cluster)
        ctl0 = controller_get(cluster, leader, "status")
        if ctl0 is None:
            log("GET /api/v1/controller/status: not in this build (404)")
        time.sleep(a.idle_s)
        m_idle1 = cpu_mark(cluster)
        ctl_idle = controller_get(cluster, leader, "status")
        idle = cpu_pct(m_idle0, m_idle1)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in idle.items())
        log(f"round {rnd}: CPU with no load (% of one core): {shown} (leader {leader})")

        out = os.path.join(work, f"loadgen-{rnd}.json")
        t0 = time.monotonic() + 2.0
        urls = [f"http://{HOST}:{p}{ROUTE}" for p in cluster.http_ports]
        params = {
            "urls": urls,
            "t0": t0,
            "max_inflight": a.max_inflight,
            "timeout_s": a.req_timeout,
            "out": out,
            "phases": [[a.lo_rps, a.pre_s], [a.hi_rps, a.hi_s], [a.lo_rps, a.post_s]],
        }
        lg_proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--loadgen", json.dumps(params)],
            stdin=subprocess.DEVNULL,
        )
        step, drop = a.pre_s, a.pre_s + a.hi_s
        t_step, t_drop, t_end = t0 + step, t0 + drop, t0 + drop + a.post_s
        sampler = Sampler(cluster)
        samples: list[dict[str, Any]] = []
        marks: dict[str, Any] = {}
        need_lo = a.min
        done_lo_at: float | None = None
        next_t = t0 - 1.0
        prev_key = None
        while True:
            now = time.monotonic()
            for mark, t_mark in (("pre", t0 + 3.0), ("step", t_step), ("drop", t_drop)):
                if mark not in marks and now >= t_mark:
                    marks[mark] = cpu_mark(cluster)
            if now >= t_end or lg_proc.poll() is not None:
                break
            if done_lo_at is not None and now >= done_lo_at + a.settle_s:
                break
            for i, p in enumerate(cluster.procs):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"{cluster.ids[i]} exited with code {p.returncode}")
            smp = sampler.sample()
            if smp is not None:
                smp["t"] = time.monotonic() - t0
                samples.append(smp)
                if done_lo_at is None and time.monotonic() >= t_drop and smp["active"] <= need_lo:
                    done_lo_at = time.monotonic()
                key = (smp["active"], smp["desired"], smp.get("scale"), smp.get("serving"), smp["states"])
                if key != prev_key:
                    log(
                        f"round {rnd}: t={smp['t'] - step:+7.1f}s from step: ACTIVE {smp['active']}, "
                        f"desired {smp['desired']}, scale/ {smp.get('scale', '-')}, "
                        f"serving {smp.get('serving', '-')}, per node {smp['states']}"
                    )
                    prev_key = key
            if sampler.failures > 40:
                raise RuntimeError("the management API stopped answering")
            next_t += a.sample_s
            d = next_t - time.monotonic()
            if d > 0:
                time.sleep(d)
            else:
                next_t = time.monotonic()
        marks["end"] = cpu_mark(cluster)
        ctl_end = controller_get(cluster, leader, "status")
        decisions = controller_get(cluster, leader, "decisions?limit=1000")
        if lg_proc.poll() is None:
            os.kill(lg_proc.pid, signal.SIGUSR1)
        try:
            lg_proc.wait(timeout=a.req_timeout + 20)
        except subprocess.TimeoutExpired:
            log("load generator did not finish; SIGKILL")
            os.kill(lg_proc.pid, signal.SIGKILL)
            lg_proc.wait()
        if not os.path.exists(out):
            raise RuntimeError(f"load generator wrote no results (rc {lg_proc.returncode})")
        with open(out) as f:
            lg = json.load(f)
        ctl_status = ctl_end

        # ------------------------------------------------------------ stats
        base = next((s for s in reversed(samples) if s["t"] < step), None)
        at_drop = next((s for s in reversed(samples) if s["t"] < drop), None)
        if base is None:
            raise RuntimeError("no sample before the step")
        need_hi = min(a.max, math.ceil(a.hi_rps * a.service_ms / 1e3 / a.in_flight))
        res["react_s"] = first_after(samples, step, lambda s: s["active"] > base["active"])
        res["decide_s"] = first_after(samples, step, lambda s: s["desired"] > base["desired"])
        res["ready_s"] = first_after(samples, step, lambda s: s["active"] >= need_hi)
        if all("serving" in s for s in samples):  # the same, counting instances with endpoints
            base_serving = base["serving"]
            res["react_serving_s"] = first_after(samples, step, lambda s: s["serving"] > base_serving)
            res["ready_serving_s"] = first_after(samples, step, lambda s: s["serving"] >= need_hi)
            sv_ups, sv_downs = runs([s["serving"] for s in samples])
            res["flaps_serving"] = sv_ups + sv_downs
        w_step = window(lg, step, step + 10)
        res["p99_step_ms"] = w_step["p99_ms"]
        w_pre = window(lg, 3.0, step)
        steady = w_pre["p99_ms"]
        t_last = lg["sched"][-1] if lg["sched"] else step
        res["recover_s"], p99s = recover(lg, step, t_last, 2 * steady)
        w_all = window(lg, -1.0, t_last + 1)
        res["errors"] = w_all["errors"]
        scaled_up = any(s["active"] > a.min for s in samples if step <= s["t"] < drop)
        # na: the count never left min during the high phase, so there was nothing to scale down
        res["scale_down_s"] = (
            first_after(samples, drop, lambda s: s["active"] <= a.min) if scaled_up else "na"
        )
        if scaled_up:  # drop -> the sample from which ACTIVE stays at min (differs when it flaps back up)
            after = [s for s in samples if s["t"] >= drop]
            last_above = max((k for k, s in enumerate(after) if s["active"] > a.min), default=-1)
            res["scale_down_final_s"] = (
                after[last_above + 1]["t"] - drop if after and last_above + 1 < len(after) else None
            )
        act = [s["active"] for s in samples]
        ups, downs = runs(act)
        res["flaps"] = ups + downs
        res["scale_ups"], res["scale_downs"] = ups, downs
        d_ups, d_downs = runs([s["desired"] for s in samples])
        res["desired_changes"] = d_ups + d_downs
        res["need"] = need_hi
        res["peak"] = max(act)
        res["steady_p50_ms"] = w_pre["p50_ms"]
        res["steady_p99_ms"] = steady
        w_hi = window(lg, step, drop)
        res["hi_p50_ms"], res["hi_p99_ms"], res["hi_max_ms"] = w_hi["p50_ms"], w_hi["p99_ms"], w_hi["max_ms"]
        res["ok_rps"] = w_hi["ok_rps"]
        res["errors_step"] = w_hi["errors"]
        w_last = window(lg, max(step, drop - 20), drop)
        res["last20_p99_ms"] = w_last["p99_ms"]
        if at_drop is not None:
            res["scale_down_first_s"] = first_after(samples, drop, lambda s: s["active"] < at_drop["active"])
        for k, v in sorted(w_all["by"].items()):
            res[f"err_{k}"] = v
        res["loadgen_lag_p99_ms"] = w_all["lag_p99_ms"]
        res.update(notes)
        # CPU, % of one core: leader and the followers' mean, idle and over the high phase
        res["idle_leader_cpu_pct"] = idle.get(leader or "", float("nan"))
        fol = [v for k, v in idle.items() if k != leader]
        res["idle_follower_cpu_pct"] = statistics.mean(fol) if fol else float("nan")
        res["leader_extra_cpu_pct"] = res["idle_leader_cpu_pct"] - res["idle_follower_cpu_pct"]
        if "step" in marks and "drop" in marks:
            hi_cpu = cpu_pct(marks["step"], marks["drop"])
            res["hi_leader_cpu_pct"] = hi_cpu.get(leader or "", float("nan"))
            res["hi_nodes_cpu_pct"] = sum(hi_cpu.values())
            shown = ", ".join(f"{k} {v:.1f}" for k, v in hi_cpu.items())
            log(f"round {rnd}: CPU in the high phase (% of one core): {shown}")
        # the controller's own time on the leader: idle, and over the load (from its step counters)
        idle_share = step_share(ctl0, ctl_idle, m_idle1[0] - m_idle0[0])
        if idle_share:
            res["ctl_idle_cpu_pct"] = idle_share["ctl_cpu_pct"]
        res.update(step_share(ctl_idle, ctl_end, marks["end"][0] - m_idle1[0]))
        if isinstance(ctl_status, dict):
            log(f"round {rnd}: controller status at the end: {json.dumps(ctl_status)[:2000]}")
            if ctl_status.get("writes_failed"):
                res["ctl_writes_failed"] = ctl_status["writes_failed"]
        if isinstance(decisions, list):
            t_wall_step = time.time() - (time.monotonic() - t_step)
            kinds: dict[str, int] = {}
            for d in decisions:
                if d.get("artifact") not in (None, ARTIFACT):
                    continue
                kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
                log(
                    f"round {rnd}: decision #{d['seq']} t={d['time'] - t_wall_step:+7.1f}s {d['kind']} "
                    f"{d.get('from_count')}->{d.get('to_count')} [{d['rule']}] applied={d.get('applied')}: "
                    f"{d['reason']} {json.dumps(d.get('inputs') or {})[:300]}"
                )
            res["ctl_scale_ups"] = kinds.get("scale_up", 0)
            res["ctl_scale_downs"] = kinds.get("scale_down", 0)
            res["ctl_skips"] = kinds.get("skip", 0)

        # timeline, 1 s buckets around the step, then 5 s buckets
        log(f"round {rnd}: timeline (t from step; requests by scheduled time; ACTIVE/desired = last sample)")
        log(f"round {rnd}:    t_s offered/s  ok/s  err  p50_ms  p99_ms  max_ms  ACTIVE desired serving")
        edges = [float(x) for x in range(-5, 16)]
        b = 15.0
        while b < t_last - step:
            b += 5.0
            edges.append(b)
        for lo, hi in itertools.pairwise(edges):
            wk = window(lg, step + lo, step + hi)
            offered = sum(1 for s in lg["sched"] if step + lo <= s < step + hi) / (hi - lo)
            ss = [s for s in samples if step + lo <= s["t"] < step + hi]
            rr = (
                f"{ss[-1]['active']:>6} {ss[-1]['desired']:>7} {ss[-1].get('serving', '-'):>7}"
                if ss
                else f"{'-':>6} {'-':>7} {'-':>7}"
            )
            log(
                f"round {rnd}: {lo:+6.0f} {offered:>9.0f} {wk['ok_rps']:>5.0f} {wk['errors']:>4} "
                f"{wk['p50_ms']:>7.0f} {wk['p99_ms']:>7.0f} {wk['max_ms']:>7.0f} {rr}"
            )
        log(f"round {rnd}: per-second p99 after the step (ms): " + " ".join(f"{x:.0f}" for x in p99s[:30]))
        log(f"round {rnd}: " + " ".join(f"{k}={fmt(v)}" for k, v in res.items()))
        if a.dump:
            with open(f"{a.dump}.{rnd}.json", "w") as f:
                json.dump(
                    {
                        "samples": samples,
                        "loadgen": lg,
                        "result": res,
                        "controller_status": ctl_status,
                        "decisions": decisions,
                    },
                    f,
                )
        res["_log_problems"] = scan_logs(cluster)
        return res
    except (Exception, Interrupted):
        cluster.log_tails(30)
        raise
    finally:
        if lg_proc is not None and lg_proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(lg_proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                lg_proc.wait(timeout=5)
        cluster.stop_all()


def scan_logs(cluster: Cluster) -> list[str]:
    """ERROR/CRITICAL lines and tracebacks in the node logs (shown after the round)."""
    found: list[str] = []
    for i in range(cluster.n):
        try:
            with open(cluster.log_path(i), errors="replace") as f:
                for line in f:
                    if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line):
                        found.append(f"{cluster.ids[i]}: {line.rstrip()[:400]}")
        except OSError:
            pass
    return found


# --------------------------------------------------------------------------------------------------
# Ray Serve anchor


_ray_pid: int | None = None


def run_ray(a: argparse.Namespace) -> dict[str, Any]:
    """Runs the anchor and returns its figures as ray_* keys ('unavailable' when it cannot run)."""
    global _ray_pid
    keys = (
        "react_s",
        "decide_s",
        "ready_s",
        "p99_ms",
        "p50_ms",
        "errors",
        "dropped",
        "ok_rps",
        "scale_down_s",
        "dir_changes",
        "peak",
    )
    out: dict[str, Any] = {}

    def unavailable(reason: str) -> dict[str, Any]:
        log(f"Ray anchor unavailable: {reason}")
        return {
            "ray_default_react_s": "unavailable",
            "ray_tuned_react_s": "unavailable",
            "ray_reason": re.sub(r"\s+", "_", reason)[:80],
        }

    if not os.path.exists(a.ray_script):
        return unavailable(f"no_{a.ray_script}")
    log(
        f"running the Ray Serve anchor: bash {a.ray_script} {' '.join(a.ray_arg or [])} (~5 min, more "
        "if it has to create /tmp/ray-bench-venv)"
    )
    p = subprocess.Popen(
        ["bash", a.ray_script, *(a.ray_arg or [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    _ray_pid = p.pid
    line = None
    assert p.stdout is not None
    for raw in p.stdout:
        text = raw.decode(errors="replace").rstrip()
        print(f"  [ray] {text}", flush=True)
        if text.startswith("RESULT "):
            line = text
    p.wait()
    _ray_pid = None
    if line is None:
        return unavailable(f"no_RESULT_line_rc_{p.returncode}")
    kv = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
    if "error" in kv:
        return unavailable(kv["error"])
    for cfg in ("default", "tuned"):
        if f"{cfg}_error" in kv:
            out[f"ray_{cfg}_react_s"] = "unavailable"
            out[f"ray_{cfg}_error"] = kv[f"{cfg}_error"]
            continue
        for k in keys:
            if f"{cfg}_{k}" in kv:
                out[f"ray_{cfg}_{k}"] = kv[f"{cfg}_{k}"]
    for k in ("ray_version", "need_replicas", "target_ongoing"):
        if k in kv:
            out[k if k.startswith("ray_") else f"ray_{k}"] = kv[k]
    return out


def stop_ray() -> None:
    if _ray_pid is not None:  # the wrapper turns SIGTERM into SIGINT for the driver and reaps by PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(_ray_pid, signal.SIGTERM)


# --------------------------------------------------------------------------------------------------


HEAD_KEYS = ("react_s", "p99_step_ms", "recover_s", "errors", "scale_down_s", "flaps")


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric keys over the rounds ('none' counts as missing); the first round's
    value for the others; plus `KEY_runs=a/b/...` for the headline keys."""
    if len(rounds) == 1:
        return dict(rounds[0])
    out: dict[str, Any] = {}
    keys: list[str] = []
    for r in rounds:
        keys += [k for k in r if k not in keys]
    for k in keys:
        vals = [r.get(k) for r in rounds]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        if nums and len(nums) == len(vals):
            m = statistics.median(nums)
            out[k] = int(m) if all(isinstance(v, int) for v in nums) and m == int(m) else float(m)
        elif nums:  # some rounds never got there ('none'): report the median of those that did, and say so
            out[k] = float(statistics.median(nums))
            out[f"{k}_missing"] = len(vals) - len(nums)
        else:
            out[k] = vals[0]
    for k in (*HEAD_KEYS, "ready_s", "decide_s"):
        out[f"{k}_runs"] = "/".join(fmt(r.get(k)) for r in rounds)
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        return loadgen_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="runs of ours, each on a fresh cluster (medians)")
    ap.add_argument("--lo-rps", type=float, default=40.0)
    ap.add_argument("--hi-rps", type=float, default=400.0)
    ap.add_argument("--pre-s", type=float, default=20.0, help="low phase before the step")
    ap.add_argument("--hi-s", type=float, default=60.0, help="high phase")
    ap.add_argument("--post-s", type=float, default=120.0, help="low phase after the drop, at most")
    ap.add_argument(
        "--settle-s", type=float, default=10.0, help="after ACTIVE is back at min, go on this long"
    )
    ap.add_argument(
        "--idle-s", type=float, default=10.0, help="CPU measurement with the slice deployed, no load"
    )
    ap.add_argument("--service-ms", type=float, default=50.0, help="the slice's asyncio.sleep")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=1000)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=8)
    ap.add_argument(
        "--in-flight", type=float, default=6.0, help="scaling target: calls in flight per instance"
    )
    ap.add_argument("--controller-config", default=None, help="TOML file applied before the blueprint")
    ap.add_argument(
        "--strict", action="store_true", help="fail when the blueprint's limits/scaling are refused"
    )
    ap.add_argument("--sample-s", type=float, default=0.5)
    ap.add_argument(
        "--max-inflight", type=int, default=8000, help="requests outstanding in the load generator"
    )
    ap.add_argument("--req-timeout", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=90.0, help="start-up and deployment deadline")
    ap.add_argument("--node-arg", action="append", help="extra `aether node` flag, repeatable")
    ray = ap.add_mutually_exclusive_group()
    ray.add_argument(
        "--ray", dest="ray", action="store_true", default=True, help="run the Ray anchor (default)"
    )
    ray.add_argument("--no-ray", dest="ray", action="store_false")
    ap.add_argument("--ray-script", default=RAY_SCRIPT)
    ap.add_argument("--ray-arg", action="append", help="argument for the Ray anchor, repeatable")
    ap.add_argument("--dump", default=None, help="write samples and per-request data to DUMP.N.json")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (node logs, load-generator data)")
    a = ap.parse_args()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    work = tempfile.mkdtemp(prefix="aether-autoscale-bench-")
    res: dict[str, Any] = {}
    rc = 0
    rounds: list[dict[str, Any]] = []
    try:
        os.environ["AETHER_REPOSITORY"] = os.path.join(work, "repo")
        build_repository(Path(work) / "repo", Path(work) / "wheels")
        for r in range(1, a.rounds + 1):
            rounds.append(run_round(a, os.path.join(work, f"round-{r}"), r))
        problems = [p for r in rounds for p in r.pop("_log_problems", [])]
        if problems:
            log(f"{len(problems)} ERROR/Traceback lines in the node logs; the first 20:")
            for p in problems[:20]:
                log("  " + p)
        res = combine(rounds)
        res["node_log_errors"] = len(problems)
        res["rounds"] = len(rounds)
    except (Exception, Interrupted) as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        res = combine(rounds) if rounds else {}
        res["error"] = type(e).__name__
        rc = 1
    if a.ray and rc == 0:
        try:
            res.update(run_ray(a))
        except (Exception, Interrupted) as e:
            log(f"Ray anchor: {type(e).__name__}: {e}")
            stop_ray()
            res.update(
                {
                    "ray_default_react_s": "unavailable",
                    "ray_tuned_react_s": "unavailable",
                    "ray_reason": type(e).__name__,
                }
            )
    elif not a.ray:
        res.update({"ray_default_react_s": "skipped", "ray_tuned_react_s": "skipped"})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if a.keep:
        log(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    head = (
        "react_s",
        "p99_step_ms",
        "recover_s",
        "errors",
        "scale_down_s",
        "flaps",
        "ray_default_react_s",
        "ray_tuned_react_s",
    )
    order = [k for k in head if k in res] + [k for k in res if k not in head]
    print("RESULT " + " ".join(f"{k}={fmt(res[k])}" for k in order), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
