#!/usr/bin/env python3
"""Aether KV benchmark: real `aether node` processes on 127.0.0.1, load from worker processes.

Measures small writes (16-byte key under ``user/``, 64-byte value) through the Python client
(`aether.client.AetherClient`), in the same shape as the etcd anchor (shared/anchors/etcd_bench.py):

- closed loop (default): ``--clients`` clients, spread as coroutines over ``--procs`` worker
  processes and round-robin over the nodes (client g prefers node g mod N), each doing one put
  after another for ``--seconds``;
- open loop (``--rate R``): the same clients issue R puts/s in total on a fixed schedule, whether
  or not earlier puts have finished; latency is measured from the scheduled send time (so a
  stall shows up in the latency instead of silently lowering the offered load);
- ``--failover``: the load runs as above; ``--kill-at`` seconds into the measurement the victim
  node (``--victim``, default node-1) is killed with SIGKILL. Reported: for the clients that were
  connected to the victim, ms from the kill to their first put acknowledged through another node
  (max and median); for the other clients, the longest gap between consecutive acknowledged
  puts from their last ack before the kill until ``--gap-window`` s after it (max over clients),
  and the same statistic over an equally long window before the kill (baseline).

Everything it starts (node processes, worker processes) is tracked by PID and killed by PID on
exit, also on SIGINT/SIGTERM; the work dir (data dirs, node logs) is deleted unless ``--keep``.
Last line of stdout:

    RESULT nodes=3 clients=64 ops_per_s=... p50_ms=... p99_ms=... errors=... [rate=...] [failover_...]

p50/p99 are nearest-rank percentiles (like etcd_bench's ``pct``).

``--tls``: mutual TLS cost. Runs the benchmark (every other flag as given) ``--tls-rounds`` times
on a plaintext cluster and as often on a TLS cluster (a CA and node/client certificates generated
in the run's work dir, nodes started with ``--tls-cert/--tls-key/--tls-ca``), alternating
plain/TLS, TLS/plain, ..., each in a fresh child run; the last line is then

    RESULT ... plain_ops_per_s=... tls_ops_per_s=... tls_loss_pct=... plain_p50_ms=... tls_p50_ms=...

(``--tls-only`` runs one TLS measurement, with the ordinary RESULT line.)

``--store etcd``: the cluster state on etcd (issue 20) beside the embedded Rabia store, in the same
run. Runs the benchmark (every other flag as given) once on Rabia-backed nodes and once on nodes
started with ``--store etcd`` against a fresh 3-member etcd (Debian's ``/usr/bin/etcd``, or
``--etcd-bin``; members on free loopback ports, data in the work dir, killed by PID), each in a
child run; the last line is then

    RESULT ... rabia_ops_per_s=... etcd_ops_per_s=... rabia_p50_ms=... etcd_p50_ms=... rabia_p99_ms=...

plus, with ``--failover``, the failover figures of both (``rabia_failover_...``, ``etcd_failover_...``).
``--failover-target etcd`` (with ``--store-only etcd``, or ``--store etcd``) kills etcd member
``--etcd-victim`` (default 1) instead of an Aether node: ``failover_others_max_gap_ms`` is then the
longest pause of acknowledged writes over every client. ``--store-only etcd`` runs one etcd
measurement with the ordinary RESULT line. The load clients are the same `AetherClient`s: an
etcd-backed node serves the cluster-port client protocol on its etcd store.

``--compare-nodes 3,5``: the benchmark (every other flag as given) on a 3-node and a 5-node cluster,
``--compare-rounds`` times each, alternating, each in a fresh child run; the last line is then

    RESULT nodes=3,5 ... ops3=... ops5=... ratio5_3=... p50_3=... p99_3=... p50_5=... p99_5=... runs3=...
           runs5=...

(medians of the rounds; ``ratio5_3`` = ops5 / ops3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

HOST = "127.0.0.1"
_NO_UVLOOP_SHIM = (
    "import sys; sys.modules['uvloop'] = None; sys.argv[0] = 'aether'; "
    "from aether.cli.main import main; main()"
)


def log(msg: str) -> None:
    print(f"[aether-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def result_line(res: Mapping[str, object], digits: int = 3) -> str:
    """The final line of a benchmark: ``RESULT k=v ...``, floats with `digits` decimals."""
    shown = (f"{k}={v:.{digits}f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
    return "RESULT " + " ".join(shown)


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (same formula as etcd_bench.py)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, round(p / 100.0 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)
            s.bind((HOST, 0))
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# --------------------------------------------------------------------------------------------------
# the cluster


def kill_all(pids: list[int], procs: list[subprocess.Popen[bytes] | None]) -> None:
    """SIGKILL every pid we ever started (gone ones are skipped), then reap `procs`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        if p is not None:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)


class Cluster:
    def __init__(
        self, n: int, workdir: str, *, no_uvloop: bool, fsync: str | None, extra: list[str], tls: bool = False
    ) -> None:
        self.n = n
        self.workdir = workdir
        self.ids = [f"node-{i + 1}" for i in range(n)]
        self.tls_dir = os.path.join(workdir, "tls") if tls else None
        if self.tls_dir is not None:  # a cluster CA and one certificate per node, plus the clients'
            from aether.transport.tls import init_ca, issue_node_cert

            init_ca(self.tls_dir)
            for nid in [*self.ids, "bench-client"]:
                issue_node_cert(self.tls_dir, nid)
        ports = free_ports(3 * n)
        self.cluster_ports, self.mgmt_ports, self.http_ports = ports[:n], ports[n : 2 * n], ports[2 * n :]
        self.no_uvloop = no_uvloop
        self.fsync = fsync
        self.extra = extra
        # the nodes prove this secret to each other, and clients prove it (docs/cluster-security.md)
        self.secret = os.environ.get("AETHER_CLUSTER_SECRET") or secrets.token_hex(32)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.all_pids: list[int] = []
        self._logs: list[Any] = [None] * n

    @property
    def addresses(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.cluster_ports]

    def log_path(self, i: int) -> str:
        return os.path.join(self.workdir, f"{self.ids[i]}.log")

    def start_node(self, i: int) -> None:
        peers = ",".join(f"{nid}={HOST}:{p}" for nid, p in zip(self.ids, self.cluster_ports, strict=False))
        head = (
            [sys.executable, "-c", _NO_UVLOOP_SHIM]
            if self.no_uvloop
            else [sys.executable, "-m", "aether.cli.main"]
        )
        cmd = [
            *head, "node",
            "--id", self.ids[i],
            "--peers", peers,
            "--cluster-port", str(self.cluster_ports[i]),
            "--management-port", str(self.mgmt_ports[i]),
            "--http-port", str(self.http_ports[i]),
            "--data-dir", os.path.join(self.workdir, self.ids[i]),
            *(["--fsync", self.fsync] if self.fsync else []),
            *self.tls_args(self.ids[i]),
            *self.extra,
        ]  # fmt: skip
        logf = open(self.log_path(i), "ab")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != "AETHER_API_KEY"}
        env["AETHER_CLUSTER_SECRET"] = self.secret
        p = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # our SIGINT handler stops them; a terminal Ctrl-C does not reach them
        )
        self.procs[i] = p
        self._logs[i] = logf
        self.all_pids.append(p.pid)

    def tls_args(self, owner: str) -> list[str]:
        d = self.tls_dir
        if d is None:
            return []
        return [
            "--tls-cert", os.path.join(d, f"{owner}.crt"),
            "--tls-key", os.path.join(d, f"{owner}.key"),
            "--tls-ca", os.path.join(d, "ca.crt"),
        ]  # fmt: skip

    def client_tls(self) -> Any:
        """The load clients' TlsFiles (None without TLS)."""
        if self.tls_dir is None:
            return None
        from aether.transport.tls import TlsFiles

        d = self.tls_dir
        return TlsFiles(*(os.path.join(d, f) for f in ("bench-client.crt", "bench-client.key", "ca.crt")))

    def start(self, timeout: float = 60.0) -> None:
        for i in range(self.n):
            self.start_node(i)
        self.wait_quorum(timeout)

    def status(self, i: int, timeout: float = 1.0) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://{HOST}:{self.mgmt_ports[i]}/api/v1/status", timeout=timeout
        ) as r:
            return json.loads(r.read())

    def wait_quorum(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(
                        f"{self.ids[i]} exited with code {p.returncode}; see {self.log_path(i)}"
                    )
            ok = True
            for i in range(self.n):
                try:
                    st = self.status(i)
                except Exception:
                    ok = False
                    break
                up = {m["id"] for m in st["nodes"] if m["state"] == "up"}
                if not st["quorum"] or up != set(self.ids):
                    ok = False
                    break
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no quorum with every node up within {timeout}s; see logs in {self.workdir}"
                )
            time.sleep(0.05)

    def kill9(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        self.procs[i] = None

    def stop_all(self) -> None:
        """SIGTERM (clean shutdown), SIGKILL after 10 s; then SIGKILL any pid we ever started."""
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        t_end = time.monotonic() + 10.0
        for p in live:
            try:
                p.wait(timeout=max(0.1, t_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"node pid {p.pid} ignored SIGTERM for 10 s; SIGKILL")
        kill_all(self.all_pids, self.procs)
        self.procs = [None] * self.n
        for f in self._logs:
            if f is not None and not f.closed:
                f.close()

    def log_tails(self, n: int = 15) -> None:
        """Log the last `n` lines of every node's log (after a failure)."""
        for i in range(self.n):
            log(f"--- {self.ids[i]} log tail ---\n{self.log_tail(i, n)}")

    def log_tail(self, i: int, n: int = 15) -> str:
        try:
            with open(self.log_path(i), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class EtcdProcs:
    """`n` etcd members on 127.0.0.1 (free client and peer ports), data under `workdir`, killed by PID."""

    def __init__(self, n: int, workdir: str, binary: str) -> None:
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"{binary} missing: install Debian's etcd-server (`make etcd` as root)")
        self.binary = binary
        self.workdir = os.path.join(workdir, "etcd")
        os.makedirs(self.workdir, exist_ok=True)
        ports = free_ports(2 * n)
        self.client_ports, self.peer_ports = ports[:n], ports[n:]
        self.names = [f"e{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.all_pids: list[int] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.client_ports]

    def start(self, timeout: float = 30.0) -> None:
        initial = ",".join(
            f"{nm}=http://{HOST}:{p}" for nm, p in zip(self.names, self.peer_ports, strict=True)
        )
        for i, name in enumerate(self.names):
            url, peer = self.endpoints[i], f"http://{HOST}:{self.peer_ports[i]}"
            cmd = [
                self.binary, f"--name={name}", f"--data-dir={os.path.join(self.workdir, name)}",
                f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={initial}", "--initial-cluster-state=new",
                "--initial-cluster-token=aether-bench", "--logger=zap", "--log-level=warn",
            ]  # fmt: skip
            with open(os.path.join(self.workdir, f"{name}.log"), "ab") as logf:
                p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs[i] = p
            self.all_pids.append(p.pid)
        deadline = time.monotonic() + timeout
        pending = list(range(len(self.names)))
        while pending:
            for i in list(pending):
                p = self.procs[i]
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"etcd {self.names[i]} exited ({p.returncode}); see {self.workdir}")
                try:
                    with urllib.request.urlopen(f"{self.endpoints[i]}/health", timeout=1) as r:
                        if json.loads(r.read()).get("health") == "true":
                            pending.remove(i)
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd members {pending} not healthy within {timeout}s; see {self.workdir}"
                )
            time.sleep(0.05)

    def is_leader(self, i: int) -> bool:
        req = urllib.request.Request(f"{self.endpoints[i]}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            doc = json.loads(r.read())
        return str(doc.get("leader")) == str(doc.get("header", {}).get("member_id"))

    def kill9(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.procs[i] = None

    def stop_all(self) -> None:
        kill_all(self.all_pids, self.procs)
        self.procs = [None] * len(self.procs)


# --------------------------------------------------------------------------------------------------
# load generation (forked worker processes)


def load_worker(
    widx: int,
    first_client: int,
    n_clients: int,
    addresses: list[str],
    rate: float | None,
    timeout: float,
    start_at: Any,  # mp.Value('d'): monotonic time the measurement starts (set by the parent)
    go: Any,  # mp.Event
    warmup: float,
    duration: float,
    out_q: Any,
    use_uvloop: bool,
) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if use_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    try:
        res = asyncio.run(
            _worker_main(
                widx, first_client, n_clients, addresses, rate, timeout, start_at, go, warmup, duration, out_q
            )
        )
    except BaseException as e:  # report instead of dying silently
        out_q.put(("error", widx, f"{type(e).__name__}: {e}"))
        return
    out_q.put(("result", widx, res))


async def _worker_main(
    widx: int,
    first_client: int,
    n_clients: int,
    addresses: list[str],
    rate: float | None,
    timeout: float,
    start_at: Any,
    go: Any,
    warmup: float,
    duration: float,
    out_q: Any,
) -> dict[str, Any]:
    from aether.client import AetherClient

    n_nodes = len(addresses)
    node_of = {a: i for i, a in enumerate(addresses)}
    value = os.urandom(32).hex().encode()  # 64 bytes
    clients = []
    for t in range(n_clients):
        g = first_client + t
        c = AetherClient(
            addresses, timeout=timeout, prefer=g % n_nodes, client_id=f"bench-{os.getpid()}-{g}",
            tls=_CLIENT_TLS,
        )
        await c.__aenter__()
        await c.put(f"user/warm{g:011x}", value)  # connection open, session known
        clients.append(c)
    initial = [node_of.get(str(c.connected_to), -1) for c in clients]
    out_q.put(("ready", widx, None))
    await asyncio.to_thread(go.wait, 120)
    t_start = start_at.value
    t_go = t_start - warmup
    t_end = t_start + duration

    # per client: ack times (monotonic), latencies (s), node index that acknowledged
    acks = [array("d") for _ in clients]
    lats = [array("d") for _ in clients]
    nodes = [array("b") for _ in clients]
    errors: dict[str, int] = {}
    seqs = [0] * n_clients

    def key(t: int) -> str:
        seqs[t] += 1
        return f"user/{widx:02x}{t:03x}{seqs[t]:011x}"  # "user/" + exactly 16 chars

    async def one(t: int, t_sched: float, record_until: float | None) -> None:
        c = clients[t]
        try:
            await c.put(key(t), value)
        except Exception as e:
            if t_sched >= t_start:
                name = type(e).__name__
                errors[name] = errors.get(name, 0) + 1
            return
        t_ack = time.monotonic()
        if t_sched >= t_start and (record_until is None or t_ack <= record_until):
            acks[t].append(t_ack)
            lats[t].append(t_ack - t_sched)
            nodes[t].append(node_of.get(str(c.connected_to), -1))

    async def closed_loop(t: int) -> None:
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                return
            await one(t, t0, t_end)

    dropped = 0

    async def open_loop() -> None:
        nonlocal dropped
        my_rate = rate * n_clients  # rate is per client
        interval = 1.0 / my_rate
        # stagger the workers' schedules so they do not fire in lockstep
        t_next = t_go + (widx * interval / max(1, n_clients))
        k = 0
        tasks: set[asyncio.Task[None]] = set()
        while t_next < t_end:
            now = time.monotonic()
            if t_next > now:
                await asyncio.sleep(t_next - now)
            while t_next <= time.monotonic() and t_next < t_end:
                if len(tasks) >= 20_000:  # the cluster stalled: do not grow without bound
                    if t_next >= t_start:
                        dropped += 1
                else:
                    task = asyncio.create_task(one(k % n_clients, t_next, None))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                k += 1
                t_next += interval
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 5)

    now = time.monotonic()
    if now < t_go:
        await asyncio.sleep(t_go - now)
    if rate is None:
        await asyncio.gather(*(closed_loop(t) for t in range(n_clients)))
    else:
        await open_loop()
    if dropped:
        errors["dropped_overload"] = dropped
    for c in clients:
        await c.close()
    return {
        "first_client": first_client,
        "initial": initial,
        "acks": [a.tobytes() for a in acks],
        "lats": [a.tobytes() for a in lats],
        "nodes": [a.tobytes() for a in nodes],
        "errors": errors,
    }


# --------------------------------------------------------------------------------------------------
# analysis


def unpack(data: bytes, code: str) -> array:
    a = array(code)
    a.frombytes(data)
    return a


def max_gap(times: list[float], t_from: float, t_to: float) -> float:
    """Longest stretch without an ack, from the client's last ack at or before `t_from` until `t_to`
    (the stretch from its last ack in the window to `t_to` counts too)."""
    before = [x for x in times if x <= t_from]
    pts = ([before[-1]] if before else [t_from]) + [x for x in times if t_from < x <= t_to] + [t_to]
    return max(b - a for a, b in itertools.pairwise(pts))


def failover_stats(
    per_client: list[dict[str, Any]], victim: int, t_kill: float, window: float, t_start: float
) -> dict[str, Any]:
    victim_gaps, other_gaps, base_gaps = [], [], []
    no_ack = 0
    for cl in per_client:
        acks, nodes = list(cl["acks"]), list(cl["nodes"])
        if cl["initial"] == victim:
            first = next((t for t, nd in zip(acks, nodes, strict=True) if t > t_kill and nd != victim), None)
            if first is None:
                no_ack += 1
                victim_gaps.append(float("inf"))
            else:
                victim_gaps.append(first - t_kill)
        else:
            other_gaps.append(max_gap(acks, t_kill, t_kill + window))
            b0 = max(t_start, t_kill - 0.1 - window)
            base_gaps.append(max_gap(acks, b0, b0 + window) if t_kill - 0.1 - b0 > 0.2 else float("nan"))
    fin = sorted(x for x in victim_gaps if x != float("inf"))
    r: dict[str, Any] = {
        "failover_victim": f"node-{victim + 1}" if victim >= 0 else "etcd-member",
        "failover_victim_clients": len(victim_gaps),
        "failover_victim_ms_max": (max(victim_gaps) * 1e3) if victim_gaps else float("nan"),
        "failover_victim_ms_median": (statistics.median(victim_gaps) * 1e3) if victim_gaps else float("nan"),
        "failover_victim_no_ack": no_ack,
        "failover_others_max_gap_ms": (max(other_gaps) * 1e3) if other_gaps else float("nan"),
        "failover_others_baseline_gap_ms": (
            max(x for x in base_gaps if x == x) * 1e3 if any(x == x for x in base_gaps) else float("nan")
        ),
        "failover_window_s": window,
    }
    if fin:
        r["failover_victim_ms_min"] = fin[0] * 1e3
    return r


# --------------------------------------------------------------------------------------------------

_CLUSTER: Cluster | None = None
_ETCD: EtcdProcs | None = None
_CLIENT_TLS: Any = None  # TlsFiles of the load clients with --tls-only (inherited by the forked workers)
_WORKER_PIDS: list[int] = []
_WORKDIR: str | None = None
_KEEP = False


def cleanup() -> None:
    global _CLUSTER, _ETCD
    for pid in _WORKER_PIDS:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if _CLUSTER is not None:
        _CLUSTER.stop_all()
        _CLUSTER = None
    if _ETCD is not None:  # after the nodes
        _ETCD.stop_all()
        _ETCD = None
    if _WORKDIR and not _KEEP:
        shutil.rmtree(_WORKDIR, ignore_errors=True)


def on_signal(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log(f"signal {signum}: cleaning up")
    raise SystemExit(128 + signum)  # unwinds into main()'s finally


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf"
        return f"{v:.2f}"
    return str(v)


def main() -> int:
    global _CLUSTER, _WORKDIR, _KEEP, _CLIENT_TLS, _ETCD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3, help="cluster size (3 or 5)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--procs", type=int, default=2, help="worker processes the clients are spread over")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=1.0, help="unrecorded load before the measurement")
    ap.add_argument("--rate", type=float, default=None, help="open loop: total puts/s (default: closed loop)")
    ap.add_argument("--timeout", type=float, default=5.0, help="client request timeout (s)")
    ap.add_argument("--failover", action="store_true", help="kill -9 a node during the load and measure")
    ap.add_argument("--victim", default="1", help="node to kill: K or node-K (default 1)")
    ap.add_argument("--kill-at", type=float, default=None, help="seconds into the measurement (default 30%%)")
    ap.add_argument(
        "--gap-window", type=float, default=3.0, help="seconds after the kill for the others' max gap"
    )
    ap.add_argument(
        "--fsync", choices=["none", "snapshot", "always"], default=None, help="node --fsync policy"
    )
    ap.add_argument("--node-arg", action="append", default=[], help="extra `aether node` flag (repeatable)")
    ap.add_argument(
        "--no-uvloop",
        action="store_true",
        help="plain asyncio event loop in the nodes (uvloop import blocked) and in the load workers",
    )
    ap.add_argument("--workdir", default=None, help="default: fresh mkdtemp under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep data dirs and node logs")
    ap.add_argument(
        "--dump",
        default=None,
        metavar="FILE",
        help="write per-client ack times / latencies / nodes (JSON) for offline analysis",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="compare: plaintext and mutual-TLS clusters, --tls-rounds runs each, alternating (see above)",
    )
    ap.add_argument("--tls-rounds", type=int, default=1, help="with --tls: measurements per mode")
    ap.add_argument("--tls-only", action="store_true", help="one measurement on a mutual-TLS cluster")
    ap.add_argument(
        "--store",
        choices=["rabia", "etcd"],
        default="rabia",
        help="etcd: measure Rabia-backed and etcd-backed nodes in one run (see above)",
    )
    ap.add_argument("--store-only", choices=["rabia", "etcd"], default=None, help="one measurement on it")
    ap.add_argument("--etcd-bin", default="/usr/bin/etcd", help="the etcd server binary")
    ap.add_argument(
        "--failover-target",
        choices=["node", "etcd"],
        default="node",
        help="with --failover: kill an Aether node (default) or an etcd member (etcd store only)",
    )
    ap.add_argument("--etcd-victim", type=int, default=1, help="etcd member to kill (1..3)")
    ap.add_argument(
        "--compare-nodes",
        default=None,
        metavar="A,B",
        help="compare two cluster sizes (e.g. 3,5): --compare-rounds runs each, alternating (see above)",
    )
    ap.add_argument("--compare-rounds", type=int, default=3, help="with --compare-nodes: runs per size")
    a = ap.parse_args()
    if a.compare_nodes:
        try:
            sizes = [int(x) for x in a.compare_nodes.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != 2 or min(sizes) < 1 or sizes[0] == sizes[1]:
            ap.error("--compare-nodes takes two different cluster sizes, e.g. 3,5")
        if a.failover or a.dump or a.workdir or a.tls:
            ap.error("--compare-nodes runs fresh clusters: not with --failover, --dump, --workdir or --tls")
        return compare_nodes(
            strip_args(sys.argv[1:], {"--compare-nodes", "--compare-rounds", "--nodes"}),
            sizes[0],
            sizes[1],
            max(1, a.compare_rounds),
        )
    if a.store == "etcd" and a.store_only is None:
        if a.tls or a.tls_only or a.dump or a.workdir:
            ap.error("--store etcd compares two fresh clusters: not with --tls, --dump or --workdir")
        return compare_stores(sys.argv[1:], a.failover_target)
    store = a.store_only or "rabia"
    if a.failover_target == "etcd" and store != "etcd":
        ap.error("--failover-target etcd needs the etcd store (--store etcd or --store-only etcd)")
    if a.tls:
        if a.failover or a.dump or a.workdir:
            ap.error("--tls compares two fresh clusters: not with --failover, --dump or --workdir")
        return compare_tls([x for x in sys.argv[1:] if x != "--tls"], max(1, a.tls_rounds))
    if a.nodes < 1 or a.clients < 1 or a.seconds <= 0:
        ap.error("need --nodes >= 1, --clients >= 1, --seconds > 0")
    victim = int(a.victim.removeprefix("node-")) - 1
    if a.failover and not 0 <= victim < a.nodes:
        ap.error(f"--victim must be 1..{a.nodes}")
    kill_at = a.kill_at if a.kill_at is not None else 0.3 * a.seconds

    _KEEP = a.keep
    _WORKDIR = a.workdir or tempfile.mkdtemp(prefix=f"aether-bench-{a.nodes}n-", dir="/tmp")
    os.makedirs(_WORKDIR, exist_ok=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    res: dict[str, Any] = {"nodes": a.nodes, "clients": a.clients}
    extra: dict[str, Any] = {}
    rc = 0
    workers: list[Any] = []
    try:
        t0 = time.monotonic()
        node_args = list(a.node_arg)
        if store == "etcd":
            _ETCD = EtcdProcs(3, _WORKDIR, a.etcd_bin)
            _ETCD.start()
            took = 1e3 * (time.monotonic() - t0)
            log(f"etcd: 3 members up in {took:.0f} ms at {','.join(_ETCD.endpoints)}")
            node_args += ["--store", "etcd", "--etcd-endpoints", ",".join(_ETCD.endpoints)]
            res["store"] = "etcd"
        _CLUSTER = Cluster(
            a.nodes, _WORKDIR, no_uvloop=a.no_uvloop, fsync=a.fsync, extra=node_args, tls=a.tls_only
        )
        os.environ["AETHER_CLUSTER_SECRET"] = _CLUSTER.secret  # the (forked) workers' AetherClients read it
        _CLIENT_TLS = _CLUSTER.client_tls()
        _CLUSTER.start()
        log(
            f"{a.nodes} nodes up with quorum in {1e3 * (time.monotonic() - t0):.0f} ms; workdir {_WORKDIR}; "
            f"cluster ports {_CLUSTER.cluster_ports}; pids {_CLUSTER.all_pids}"
            + ("; nodes and workers WITHOUT uvloop" if a.no_uvloop else "")
            + ("; mutual TLS between nodes and for the clients" if a.tls_only else "")
        )

        procs = max(1, min(a.procs, a.clients))
        per = [a.clients // procs + (1 if i < a.clients % procs else 0) for i in range(procs)]
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        go = ctx.Event()
        start_at = ctx.Value("d", 0.0)
        first = 0
        for w in range(procs):
            rate_pc = (a.rate / a.clients) if a.rate else None
            p = ctx.Process(
                target=load_worker,
                args=(
                    w,
                    first,
                    per[w],
                    _CLUSTER.addresses,
                    rate_pc,
                    a.timeout,
                    start_at,
                    go,
                    a.warmup,
                    a.seconds,
                    q,
                    not a.no_uvloop,
                ),
                daemon=True,
            )
            p.start()
            workers.append(p)
            _WORKER_PIDS.append(p.pid)
            first += per[w]
        ready, results, werrors = 0, {}, []
        deadline = time.monotonic() + 60 + 0.1 * a.clients
        while ready < procs:
            try:
                kind, w, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                raise RuntimeError(f"only {ready}/{procs} load workers got ready") from None
            if kind == "ready":
                ready += 1
            elif kind == "error":
                raise RuntimeError(f"load worker {w} failed while connecting: {payload}")
        t_start = time.monotonic() + a.warmup + 0.2
        start_at.value = t_start
        go.set()
        mode = f"open loop at {a.rate:g} puts/s" if a.rate else "closed loop"
        log(
            f"{a.clients} clients over {procs} procs ready; {mode}; "
            f"warm-up {a.warmup:g} s, measuring {a.seconds:g} s"
        )

        t_kill = None
        if a.failover:
            time.sleep(max(0.0, t_start + kill_at - time.monotonic()))
            if a.failover_target == "etcd" and _ETCD is not None:
                ev = a.etcd_victim - 1
                was_leader = _ETCD.is_leader(ev)
                t_kill = time.monotonic()
                _ETCD.kill9(ev)
                victim = -1  # no Aether node dies: every client counts among "the others"
                extra["failover_etcd_leader_killed"] = was_leader
                log(
                    f"kill -9 etcd member {ev + 1} ({'the' if was_leader else 'not the'} etcd leader) "
                    f"at +{kill_at:.2f} s"
                )
            else:
                t_kill = time.monotonic()
                _CLUSTER.kill9(victim)
                log(f"kill -9 node-{victim + 1} at +{kill_at:.2f} s")

        deadline = t_start + a.seconds + a.timeout + 60
        while len(results) + len(werrors) < procs:
            try:
                kind, w, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                raise RuntimeError(f"only {len(results)}/{procs} load workers reported") from None
            if kind == "result":
                results[w] = payload
            elif kind == "error":
                werrors.append(f"worker {w}: {payload}")
        for p in workers:
            p.join(timeout=10)
        if werrors:
            raise RuntimeError("; ".join(werrors))

        per_client: list[dict[str, Any]] = []
        errors: dict[str, int] = {}
        for w in sorted(results):
            r = results[w]
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            for t in range(len(r["acks"])):
                per_client.append(
                    {
                        "initial": r["initial"][t],
                        "acks": unpack(r["acks"][t], "d"),
                        "lats": unpack(r["lats"][t], "d"),
                        "nodes": unpack(r["nodes"][t], "b"),
                    }
                )
        if a.dump:
            with open(a.dump, "w") as f:
                json.dump(
                    {
                        "t_start": t_start,
                        "t_kill": t_kill,
                        "seconds": a.seconds,
                        "victim": victim,
                        "clients": [
                            {k: (list(v) if isinstance(v, array) else v) for k, v in cl.items()}
                            for cl in per_client
                        ],
                    },
                    f,
                )
            log(f"per-client data written to {a.dump}")
        all_acks = sorted(t for cl in per_client for t in cl["acks"])
        if len(all_acks) > 1:
            stall = max((b - a_, a_) for a_, b in itertools.pairwise(all_acks))
            log(
                f"longest time without any ack in the whole cluster: {stall[0] * 1e3:.1f} ms "
                f"(at +{stall[1] - t_start:.2f} s)"
            )
        per_sec = [0] * max(1, int(a.seconds + 0.999))
        for t in all_acks:
            b = int(t - t_start)
            if 0 <= b < len(per_sec):
                per_sec[b] += 1
        log("acks per second: " + " ".join(map(str, per_sec)))
        lats = sorted(x for cl in per_client for x in cl["lats"])
        n_ops = len(lats)
        n_err = sum(errors.values())
        res.update(
            {
                "ops_per_s": n_ops / a.seconds,
                "p50_ms": pct(lats, 50) * 1e3,
                "p99_ms": pct(lats, 99) * 1e3,
                "errors": n_err,
            }
        )
        if a.rate:
            extra["rate"] = a.rate if a.rate != int(a.rate) else int(a.rate)
        mean = (sum(lats) / n_ops * 1e3) if n_ops else float("nan")
        log(
            f"{n_ops} puts acknowledged in {a.seconds:g} s = {n_ops / a.seconds:.0f} ops/s; "
            f"p50 {pct(lats, 50) * 1e3:.2f} ms, p90 {pct(lats, 90) * 1e3:.2f} ms, "
            f"p99 {pct(lats, 99) * 1e3:.2f} ms, "
            f"p99.9 {pct(lats, 99.9) * 1e3:.2f} ms, max {(lats[-1] * 1e3 if lats else float('nan')):.2f} ms, "
            f"mean {mean:.2f} ms; errors {n_err} {errors or ''}"
        )
        per_node = [sum(1 for cl in per_client if cl["initial"] == i) for i in range(a.nodes)]
        log(f"clients per node at start: {per_node}")
        if a.failover and t_kill is not None:
            window = max(0.2, min(a.gap_window, t_start + a.seconds - t_kill))
            fs = failover_stats(per_client, victim, t_kill, window, t_start)
            log("failover: " + " ".join(f"{k}={fmt(v)}" for k, v in fs.items()))
            bins = [0] * 30  # acks per 100 ms, from 0.5 s before the kill to 2.5 s after
            for cl in per_client:
                for t in cl["acks"]:
                    b = int((t - t_kill + 0.5) // 0.1)
                    if 0 <= b < len(bins):
                        bins[b] += 1
            log("acks per 100 ms from kill-0.5 s to kill+2.5 s: " + " ".join(map(str, bins)))
            extra.update(
                {
                    k: fs[k]
                    for k in (
                        "failover_victim_ms_max",
                        "failover_victim_ms_median",
                        "failover_others_max_gap_ms",
                        "failover_others_baseline_gap_ms",
                        "failover_victim_clients",
                        "failover_victim_no_ack",
                    )
                }
            )
    except (Exception, SystemExit) as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        if _CLUSTER is not None:
            for i in range(_CLUSTER.n):
                tail = _CLUSTER.log_tail(i)
                if tail:
                    log(f"--- {_CLUSTER.ids[i]} log tail ---\n{tail}")
        res["error"] = type(e).__name__
        rc = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    finally:
        for p in workers:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
        cleanup()
    print("RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in {**res, **extra}.items()), flush=True)
    return rc


def compare_stores(args: list[str], failover_target: str) -> int:
    """Run this benchmark on Rabia-backed and on etcd-backed nodes, each in a child; one RESULT
    line with both figures (``rabia_...``, ``etcd_...``). With ``--failover-target etcd`` the Rabia
    run kills an Aether node instead (it has no etcd)."""
    fields_of: dict[str, dict[str, str]] = {}
    base = strip_args(args, {"--store"})
    for store in ("rabia", "etcd"):
        run = strip_args(base, {"--failover-target"}) if store == "rabia" else base
        log(f"--store etcd: the {store} run")
        fields = run_child([*run, "--store-only", store], store)
        if fields is None:
            print(f"RESULT error={store}-run-failed", flush=True)
            return 1
        fields_of[store] = fields
    first = fields_of["rabia"]
    out: dict[str, Any] = {"nodes": first.get("nodes", "?"), "clients": first.get("clients", "?")}
    for k in ("ops_per_s", "p50_ms", "p99_ms"):
        for store in ("rabia", "etcd"):
            out[f"{store}_{k}"] = fields_of[store][k]
    for store in ("rabia", "etcd"):
        for k, v in fields_of[store].items():
            if k.startswith("failover_"):
                out[f"{store}_{k}"] = v
    out["errors"] = sum(int(f.get("errors", "0")) for f in fields_of.values())
    print("RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in out.items()), flush=True)
    return 0


def strip_args(argv: list[str], drop: set[str]) -> list[str]:
    """`argv` without the options in `drop` (given as `--opt value` or `--opt=value`)."""
    out: list[str] = []
    skip = False
    for x in argv:
        if skip:
            skip = False
        elif x in drop:
            skip = True
        elif x.split("=", 1)[0] not in drop:
            out.append(x)
    return out


def run_child(args: list[str], label: str) -> dict[str, str] | None:
    """Run this benchmark with `args` in a child; its RESULT fields (None if it failed)."""
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for x in proc.stdout.splitlines():
        if not x.startswith("RESULT "):
            print(f"  {label}: {x}", flush=True)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), "")
    fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    if proc.returncode != 0 or "ops_per_s" not in fields:
        log(f"{label} run failed (exit {proc.returncode}): {line or proc.stdout[-500:]}")
        return None
    log(f"{label}: {line}")
    return fields


K = TypeVar("K", int, str)


def alternate(
    what: str, rounds: int, pair: tuple[K, K], child: Callable[[K], tuple[list[str], str, str]]
) -> dict[K, list[dict[str, str]]] | None:
    """Run the children of `pair` in alternating order, (x, y), (y, x), ..., `rounds` times; `child`
    gives each one's (args, label, name in the error). The RESULT fields of each run by member of
    `pair`, or None (after printing a RESULT error line) when a run failed."""
    runs: dict[K, list[dict[str, str]]] = {pair[0]: [], pair[1]: []}
    for r in range(rounds):
        for x in pair if r % 2 == 0 else pair[::-1]:
            args, label, name = child(x)
            log(f"{what} round {r + 1}/{rounds}: {label}")
            fields = run_child(args, label)
            if fields is None:
                print(f"RESULT error={name}-run-failed", flush=True)
                return None
            runs[x].append(fields)
    return runs


def compare_nodes(args: list[str], a: int, b: int, rounds: int) -> int:
    """Run this benchmark on an `a`-node and a `b`-node cluster, alternating (a, b), (b, a), ...,
    each run a fresh cluster in a child; one RESULT line with the medians and their ratio."""
    runs = alternate(
        "--compare-nodes", rounds, (a, b), lambda n: ([*args, "--nodes", str(n)], f"{n} nodes", f"{n}-node")
    )
    if runs is None:
        return 1

    def med(n: int, k: str) -> float:
        return statistics.median(float(f[k]) for f in runs[n])

    ops_a, ops_b = med(a, "ops_per_s"), med(b, "ops_per_s")
    out: dict[str, Any] = {"nodes": f"{a},{b}", "clients": runs[a][0].get("clients", "?"), "rounds": rounds}
    out[f"ops{a}"] = ops_a
    out[f"ops{b}"] = ops_b
    out[f"ratio{b}_{a}"] = ops_b / ops_a if ops_a else float("nan")
    for n in (a, b):
        out[f"p50_{n}"] = med(n, "p50_ms")
        out[f"p99_{n}"] = med(n, "p99_ms")
    for n in (a, b):
        out[f"runs{n}"] = "/".join(f"{float(f['ops_per_s']):.0f}" for f in runs[n])
    out["errors"] = sum(int(f.get("errors", "0")) for m in runs.values() for f in m)
    print("RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in out.items()), flush=True)
    return 0


def compare_tls(args: list[str], rounds: int) -> int:
    """Run this benchmark plain and with --tls-only, alternating, each in a child; one RESULT line."""
    runs = alternate(
        "--tls", rounds, ("plain", "tls"),
        lambda mode: ([*args, *(["--tls-only"] if mode == "tls" else [])], mode, mode),
    )  # fmt: skip
    if runs is None:
        return 1

    def mean(mode: str, k: str) -> float:
        return statistics.fmean(float(f[k]) for f in runs[mode])

    plain, tls = mean("plain", "ops_per_s"), mean("tls", "ops_per_s")
    out = {
        "nodes": runs["plain"][0].get("nodes", "?"),
        "clients": runs["plain"][0].get("clients", "?"),
        "rounds": rounds,
        "plain_ops_per_s": plain,
        "tls_ops_per_s": tls,
        "tls_loss_pct": 100.0 * (plain - tls) / plain if plain else float("nan"),
        "plain_p50_ms": mean("plain", "p50_ms"),
        "tls_p50_ms": mean("tls", "p50_ms"),
        "plain_p99_ms": mean("plain", "p99_ms"),
        "tls_p99_ms": mean("tls", "p99_ms"),
        "errors": sum(int(f.get("errors", "0")) for m in runs.values() for f in m),
    }
    print("RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in out.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
