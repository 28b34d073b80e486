"""Shared fixtures for tests that run REAL node processes on loopback.

Generic helpers, usable from any test module:

- `free_ports(n)` -> n distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral range
  (see there why); `refusing_port()` -> a port that refuses connections.
- `wait_until(pred, timeout, what)` (async): polls `pred` until true, else AssertionError.
- `node_configs(tmp_path, n=3, **config)` -> the NodeConfigs of an in-process loopback cluster
  (free cluster ports, management/HTTP on port 0); `running_cluster(tmp_path)` runs 3 such nodes.
- `ProcessCluster` starts N `aether node` processes (distinct free cluster / management / HTTP
  ports, data dirs and log files under a base directory), and offers `kill9(i)`, `stop(i)`,
  `start(i)`, `status(i)`, `kv(i, prefix)`, `wait_quorum(...)`, `wait_applied_equal(...)`,
  `client(prefer=i)`, `log_text(i)`, `close()`. Nodes are addressed by 0-based index; node i has
  id `node-{i+1}`. Every PID it starts is remembered and `close()` SIGKILLs the ones still alive
  (by PID, never by name).
- Fixture `make_process_cluster(n=3, **kw)`: a factory; every cluster it made is closed in a
  `finally` when the test ends (pass or fail), and when the test fails the tail of every node log
  is attached to the failure report ("node logs" section).
- Fixture `make_module_process_cluster` (module scope): the same factory for a cluster that the
  tests of one module share, through a module-scoped fixture of that module (each start of a
  node costs about a CPU-second of imports); only where no test needs a fresh cluster or stops,
  kills or reconfigures one. Closed after the module's last test; its node logs are attached to
  any failing test of the module.
- Fixture `process_cluster`: a started 3-node cluster with quorum.
- `LocalCluster` / fixture `make_local_cluster(nodes=3)`: a cluster directory driven by the real
  `aether cluster start|stop` commands (subprocesses) on a free port offset (`free_port_offset`);
  closed with `aether.cli.local_cluster.stop_cluster` (recorded PIDs only) when the test ends,
  its node logs attached on failure like those of `make_process_cluster`.
- Fixture `demo_wheels` (session): the order demo's wheels as `make demo-wheels` builds them (six,
  plus place-order 0.1.1), built once per run with examples/build.py (shared by the xdist workers).

Blocking helpers (`wait_quorum`, `status`, ...) use plain sockets/urllib; from async tests that
also have client traffic in flight, call them through `asyncio.to_thread(...)` (or the `a*`
wrappers) so the event loop keeps serving the clients meanwhile.

Environment knobs (defaults exercise the real `aether node` command unchanged):

- `AETHER_TEST_NODE_NO_UVLOOP=1`: start nodes with the `uvloop` import blocked (plain asyncio loop).
- `AETHER_TEST_KEEP_LOGS=DIR`: copy node logs to DIR when a cluster is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from aether.core.config import NodeConfig

HOST = "127.0.0.1"

_NO_UVLOOP_SHIM = (
    "import sys; sys.modules['uvloop'] = None; sys.argv[0] = 'aether'; "
    "from aether.cli.main import main; main()"
)


# --------------------------------------------------------------------------------------------------
# example slices

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "hello"


def deploy_hello_examples(
    repo_root: Path, wheels: Path, *, extra: dict[str, tuple[str, str]] | None = None
) -> None:
    """Build the hello example's two slices from their sources (no setuptools run) into `repo_root`.

    `extra` adds more slices: {coords: (module source, class name)}.
    """
    from aether.slices.repository import Repository
    from aether.slices.testing import build_slice_wheel

    repo = Repository(repo_root)
    hello = (EXAMPLES / "hello-slice" / "hello_slice" / "__init__.py").read_text()
    greeter = (EXAMPLES / "greeter-service" / "greeter_slice" / "__init__.py").read_text()
    repo.deploy(build_slice_wheel(wheels, "org.example:hello:0.1.0", hello, "Hello", module="hello_slice"))
    repo.deploy(
        build_slice_wheel(
            wheels,
            "org.example:greeter:0.1.0",
            greeter,
            "Greeter",
            module="greeter_slice",
            dependencies={"org.example:hello": "^0.1.0"},
        )
    )
    for coords, (source, cls) in (extra or {}).items():
        repo.deploy(build_slice_wheel(wheels, coords, source, cls))


# --------------------------------------------------------------------------------------------------
# in-process clusters


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `pred` every 10 ms on the running loop until it is true; AssertionError naming `what`
    after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def node_configs(tmp_path: Path, n: int = 3, **config: Any) -> list[NodeConfig]:
    """The configs of an `n`-node in-process cluster on loopback: node-1..node-n on free cluster
    ports (`free_ports`), management and HTTP servers on port 0, data in `tmp_path`/n0, n1, ...;
    `config`: more NodeConfig fields for every node."""
    from aether.core.config import NodeConfig
    from aether.core.types import Address, PeerSpec

    ports = free_ports(n)
    peers = [PeerSpec(f"node-{i + 1}", Address("127.0.0.1", p)) for i, p in enumerate(ports)]
    return [
        NodeConfig(
            node_id=f"node-{i + 1}",
            peers=peers,
            cluster_port=ports[i],
            management_port=0,
            http_port=0,
            data_dir=str(tmp_path / f"n{i}"),
            **config,
        )
        for i in range(n)
    ]


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path, *, extra: dict[str, tuple[str, str]] | None = None, **config: Any
) -> AsyncIterator[list[Any]]:
    """3 in-process nodes (management on free ports) with the hello slices in their repository
    (and the `extra` slices: {coords: (module source, class name)}); `config`: more NodeConfig
    fields for every node."""
    from aether.api.server import ManagementServer
    from aether.node.node import Node
    from aether.slices.testing import isolated_imports

    repo_dir = tmp_path / "repo"
    deploy_hello_examples(repo_dir, tmp_path / "wheels", extra=extra)
    configs = node_configs(tmp_path, repository=str(repo_dir), **config)
    nodes = [Node(c, management_api=ManagementServer) for c in configs]
    with isolated_imports():
        started: list[Any] = []
        try:
            for n in nodes:
                await n.start()
                started.append(n)
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while not all(n.leader.leader == "node-1" for n in nodes):
                assert loop.time() < end, "no leader in 10 s"
                await asyncio.sleep(0.02)
            yield nodes
        finally:
            for n in started:
                if not n.transport._stopped:
                    await n.stop()


# --------------------------------------------------------------------------------------------------
# ports


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (bind to port 0, outgoing connections)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports handed out by `free_ports`/`free_port_offset` in this process: never handed out twice.
_handed_out: set[int] = set()


def _xdist_share() -> tuple[int, int]:
    """(this pytest-xdist worker's index, the number of workers); (0, 1) without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        index = int(worker[2:]) if worker.startswith("gw") else 0
    except ValueError:
        return 0, 1
    return (index % count, count) if count > 1 else (0, 1)


_PORT_BLOCK = 256


def _ours(port: int) -> bool:
    """Whether `port` is in this xdist worker's share: the workers draw from disjoint blocks of
    `_PORT_BLOCK` ports, so two of them never hand out the same port (each knows only its own
    `_handed_out`: a port worker A drew and had not bound yet was free when worker B probed it,
    and B's node then failed to bind, EADDRINUSE, while A's server answered on its address)."""
    index, count = _xdist_share()
    return (port // _PORT_BLOCK) % count == index
# Sockets of `refusing_port`: bound, never listening, open until the process ends.
_refusing: list[socket.socket] = []


def free_ports(n: int, host: str = HOST) -> list[int]:
    """Return `n` distinct TCP ports, free on `host` now, for servers whose port must be known
    before they start (a cluster's peer list, a node process's flags).

    They are drawn at random from BELOW the kernel's ephemeral range, so no port the kernel hands
    out by itself can be one of them: not a port-0 bind, not the source port of an outgoing
    connection, in any process. Such a port used to take a planned port between this probe and
    the server's bind (asyncio's `create_server` then failed with EADDRINUSE), for instance node-1
    connecting to node-3 before node-3 listened. A port is never handed out twice by this process
    either, nor by two pytest-xdist workers (each draws from its own blocks, `_ours`). What remains
    is another program binding the same port in that gap (a Forge in the other worker picks its
    nodes' ports from the same range): `make_process_cluster` starts again on other ports then. Servers that
    can report their port (management and HTTP servers of in-process nodes) bind port 0 instead.
    """
    import random

    lo = 10_000
    hi = max(_ephemeral_range()[0], lo + 10_000)
    ports: list[int] = []
    for _ in range(200 * n + 2000):
        if len(ports) == n:
            return ports
        port = random.randrange(lo, hi)
        if port in _handed_out or not _ours(port) or not _bindable(host, port):
            continue
        _handed_out.add(port)
        ports.append(port)
    raise RuntimeError(f"no {n} free ports found in {lo}-{hi}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def refusing_port(host: str = HOST) -> int:
    """A port that refuses connections for the rest of the test process: bound (so nobody else
    can take it) but not listening."""
    s = socket.socket()
    s.bind((host, 0))
    _refusing.append(s)
    return int(s.getsockname()[1])


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die if the parent thread dies
    except Exception:
        pass


# --------------------------------------------------------------------------------------------------
# cluster of node processes


class NodeExited(RuntimeError):
    """A node process exited while the test expected it to run."""


class ProcessCluster:
    """N real `aether node` processes on loopback. Node i (0-based) has id ``node-{i+1}``."""

    def __init__(
        self,
        n: int,
        base_dir: str | Path,
        *,
        cluster_name: str = "aether",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        no_uvloop: bool | None = None,
        secret: str | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.n = n
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_name = cluster_name
        self.extra_args = list(extra_args)
        self.python = python
        if no_uvloop is None:
            no_uvloop = os.environ.get("AETHER_TEST_NODE_NO_UVLOOP", "") not in ("", "0")
        self.no_uvloop = no_uvloop
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.pop("AETHER_API_KEY", None)
        # every node proves this cluster secret on the cluster port (docs/cluster-security.md);
        # pass secret="" for an open cluster (no secret: loopback only, with a warning)
        self.env.pop("AETHER_CLUSTER_SECRET_FILE", None)
        self.secret = (secrets.token_hex(16) if secret is None else secret).encode()
        if self.secret:
            self.env["AETHER_CLUSTER_SECRET"] = self.secret.decode()
        else:
            self.env.pop("AETHER_CLUSTER_SECRET", None)
        # nodes of a test never read or write the user's ~/.aether/repository
        self.repository = Path(self.env.get("AETHER_TEST_REPOSITORY") or self.base_dir / "repository")
        self.env["AETHER_REPOSITORY"] = str(self.repository)
        self.ids = [f"node-{i + 1}" for i in range(n)]
        ports = free_ports(3 * n)
        self.cluster_ports = ports[0:n]
        self.management_ports = ports[n : 2 * n]
        self.http_ports = ports[2 * n : 3 * n]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.all_pids: list[int] = []  # every pid ever started, for close()
        self._logs: list[Any] = [None] * n
        self._closed = False
        self._clients: list[Any] = []

    # --- layout ---------------------------------------------------------------------------------

    @property
    def peers_arg(self) -> str:
        return ",".join(f"{nid}={HOST}:{p}" for nid, p in zip(self.ids, self.cluster_ports, strict=True))

    @property
    def addresses(self) -> list[str]:
        """Cluster (client) addresses ``127.0.0.1:PORT`` of every node, in index order."""
        return [f"{HOST}:{p}" for p in self.cluster_ports]

    def address(self, i: int) -> str:
        return f"{HOST}:{self.cluster_ports[i]}"

    def data_dir(self, i: int) -> Path:
        return self.base_dir / self.ids[i] / "data"

    def log_path(self, i: int) -> Path:
        return self.base_dir / self.ids[i] / "node.log"

    def index_of(self, node_id: str) -> int:
        return self.ids.index(node_id)

    def command(self, i: int) -> list[str]:
        head = (
            [self.python, "-c", _NO_UVLOOP_SHIM] if self.no_uvloop else [self.python, "-m", "aether.cli.main"]
        )
        return [
            *head,
            "node",
            "--id", self.ids[i],
            "--peers", self.peers_arg,
            "--cluster-port", str(self.cluster_ports[i]),
            "--management-port", str(self.management_ports[i]),
            "--http-port", str(self.http_ports[i]),
            "--data-dir", str(self.data_dir(i)),
            "--cluster-name", self.cluster_name,
            *self.extra_args,
        ]  # fmt: skip

    # --- process control ------------------------------------------------------------------------

    def start(self, i: int) -> int:
        """Start (or restart) node i with the same id, ports and data dir; returns its pid."""
        if self._closed:
            raise RuntimeError("cluster is closed")
        if self.is_running(i):
            raise RuntimeError(f"{self.ids[i]} is already running (pid {self.procs[i].pid})")  # type: ignore[union-attr]
        self.data_dir(i).mkdir(parents=True, exist_ok=True)
        if self._logs[i] is not None:
            self._logs[i].close()
        logf = open(self.log_path(i), "ab")  # noqa: SIM115 - kept open while the node runs
        logf.write(f"---- test harness: starting {self.ids[i]} at {time.strftime('%H:%M:%S')}\n".encode())
        logf.flush()
        self._logs[i] = logf
        # PR_SET_PDEATHSIG follows the *thread* that forks: only safe from the main thread.
        preexec: Callable[[], None] | None = (
            _set_pdeathsig if threading.current_thread() is threading.main_thread() else None
        )
        proc = subprocess.Popen(
            self.command(i),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # a Ctrl-C in the terminal does not reach the nodes directly
            preexec_fn=preexec,
        )
        self.procs[i] = proc
        self.all_pids.append(proc.pid)
        return proc.pid

    def start_all(self) -> None:
        for i in range(self.n):
            if not self.is_running(i):
                self.start(i)

    def pid(self, i: int) -> int | None:
        p = self.procs[i]
        return p.pid if p is not None else None

    def is_running(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def running(self) -> list[int]:
        return [i for i in range(self.n) if self.is_running(i)]

    def kill9(self, i: int) -> None:
        """SIGKILL node i (by pid) and reap it."""
        p = self.procs[i]
        if p is None:
            raise RuntimeError(f"{self.ids[i]} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        self.procs[i] = None

    def stop(self, i: int, timeout: float = 15.0) -> int:
        """SIGTERM node i and wait for it to exit; returns its exit code.

        If it does not exit within `timeout` it is SIGKILLed and NodeExited is raised (a clean
        shutdown that hangs is a bug worth failing on).
        """
        p = self.procs[i]
        if p is None:
            raise RuntimeError(f"{self.ids[i]} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
        return self._wait_exit(i, timeout)

    def _wait_exit(self, i: int, timeout: float) -> int:
        p = self.procs[i]
        assert p is not None
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            self.procs[i] = None
            raise NodeExited(f"{self.ids[i]} did not exit within {timeout}s of SIGTERM; killed") from None
        self.procs[i] = None
        return rc

    def stop_all(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM every running node at once, then wait for each; returns their exit codes."""
        idx = self.running()
        for i in idx:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[i].pid, signal.SIGTERM)  # type: ignore[union-attr]
        return [self._wait_exit(i, timeout) for i in idx]  # one SIGTERM each: a 2nd may kill outright

    def kill9_all(self) -> None:
        idx = self.running()
        for i in idx:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[i].pid, signal.SIGKILL)  # type: ignore[union-attr]
        for i in idx:
            self.kill9(i)

    def check_alive(self, idx: Sequence[int] | None = None) -> None:
        """Raise NodeExited (with the log tail) if one of the nodes that should run has exited."""
        for i in range(self.n) if idx is None else idx:
            p = self.procs[i]
            if p is not None and p.poll() is not None:
                raise NodeExited(
                    f"{self.ids[i]} (pid {p.pid}) exited with code {p.returncode}; log tail:\n"
                    + self.log_tail(i)
                )

    def close(self) -> None:
        """SIGKILL every process this cluster started that is still alive (by pid). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pid in self.all_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(timeout=10)
        self.procs = [None] * self.n
        for f in self._logs:
            if f is not None:
                f.close()
        keep = os.environ.get("AETHER_TEST_KEEP_LOGS")
        if keep:
            dest = Path(keep) / f"{self.base_dir.name}-{os.getpid()}-{int(time.time() * 1000)}"
            dest.mkdir(parents=True, exist_ok=True)
            for i in range(self.n):
                if self.log_path(i).exists():
                    shutil.copy(self.log_path(i), dest / f"{self.ids[i]}.log")

    # --- management API -------------------------------------------------------------------------

    def _get_json(self, i: int, path: str, timeout: float) -> Any:
        url = f"http://{HOST}:{self.management_ports[i]}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self, i: int, timeout: float = 2.0) -> dict[str, Any]:
        """`GET /api/v1/status` of node i (raises on connection errors)."""
        return self._get_json(i, "/api/v1/status", timeout)

    def try_status(self, i: int, timeout: float = 1.0) -> dict[str, Any] | None:
        try:
            return self.status(i, timeout)
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def kv(self, i: int, prefix: str = "user/", timeout: float = 5.0) -> dict[str, Any]:
        """Node i's local (applied) view of keys under `prefix`: {key: value-as-JSON}."""
        q = urllib.parse.urlencode({"prefix": prefix})
        doc = self._get_json(i, f"/api/v1/kv?{q}", timeout)
        return {e["key"]: e["value"] for e in doc["entries"]}

    def wait_quorum(
        self, timeout: float = 20.0, nodes: Sequence[int] | None = None, *, all_up: bool = True
    ) -> dict[int, dict[str, Any]]:
        """Wait until every node in `nodes` (default: all running) reports quorum.

        With `all_up`, each of them must also see every running node as "up" (so a restarted node
        has rejoined). Raises NodeExited if a node dies meanwhile, TimeoutError with the last
        statuses otherwise. Returns the statuses.
        """
        deadline = time.monotonic() + timeout
        last: dict[int, Any] = {}
        while True:
            idx = list(self.running() if nodes is None else nodes)
            self.check_alive(idx)
            running_ids = {self.ids[i] for i in self.running()}
            ok = True
            for i in idx:
                st = self.try_status(i)
                last[i] = st
                if st is None or not st.get("quorum"):
                    ok = False
                    continue
                if all_up:
                    up = {m["id"] for m in st.get("nodes", []) if m.get("state") == "up"}
                    if not running_ids <= up:
                        ok = False
            if ok and idx:
                return last
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no quorum within {timeout}s; last statuses: {json.dumps(last)}")
            time.sleep(0.05)

    def wait_applied_equal(self, timeout: float = 20.0, nodes: Sequence[int] | None = None) -> int:
        """Wait until the given nodes (default: all running) report the same applied_slot twice
        in a row; returns it."""
        deadline = time.monotonic() + timeout
        prev: list[int] | None = None
        while True:
            idx = list(self.running() if nodes is None else nodes)
            self.check_alive(idx)
            sts = [self.try_status(i) for i in idx]
            slots = [s["applied_slot"] if s else -1 for s in sts]
            if -1 not in slots and len(set(slots)) == 1 and prev == slots:
                return slots[0]
            prev = slots
            if time.monotonic() >= deadline:
                raise TimeoutError(f"applied slots did not converge within {timeout}s: {slots}")
            time.sleep(0.1)

    # async wrappers: run the blocking waits in a thread so the caller's loop keeps going
    async def await_quorum(self, timeout: float = 20.0, nodes: Sequence[int] | None = None, **kw: Any) -> Any:
        return await asyncio.to_thread(self.wait_quorum, timeout, nodes, **kw)

    async def astatus(self, i: int, timeout: float = 2.0) -> dict[str, Any]:
        return await asyncio.to_thread(self.status, i, timeout)

    async def akv(self, i: int, prefix: str = "user/") -> dict[str, Any]:
        return await asyncio.to_thread(self.kv, i, prefix)

    def leader_index(self, via: int | None = None) -> int:
        """Index of the node the status of `via` (default: first running) names as leader."""
        via = self.running()[0] if via is None else via
        leader = self.status(via)["leader"]
        if leader is None:
            raise RuntimeError(f"{self.ids[via]} reports no leader")
        return self.index_of(leader)

    # --- clients ---------------------------------------------------------------------------------

    def client(
        self, prefer: int = 0, *, only: Sequence[int] | None = None, timeout: float = 5.0, **kw: Any
    ) -> Any:
        """An `AetherClient` over every node (or only the nodes in `only`), preferring node `prefer`.

        Use it as ``async with cluster.client(prefer=1) as c: ...`` (or ``await c.close()``).
        """
        from aether.client import AetherClient

        idx = list(range(self.n)) if only is None else list(only)
        addrs = [self.address(i) for i in idx]
        kw.setdefault("secret", self.secret or None)
        return AetherClient(
            addrs, cluster_name=self.cluster_name, timeout=timeout, prefer=idx.index(prefer), **kw
        )

    # --- logs ------------------------------------------------------------------------------------

    def log_text(self, i: int) -> str:
        p = self.log_path(i)
        return p.read_text(errors="replace") if p.exists() else ""

    def log_lines(self, i: int, *needles: str) -> list[str]:
        """Lines of node i's log containing every one of `needles`."""
        return [ln for ln in self.log_text(i).splitlines() if all(n in ln for n in needles)]

    def log_tail(self, i: int, lines: int = 40) -> str:
        return "\n".join(self.log_text(i).splitlines()[-lines:])

    def logs_report(self, lines: int = 40) -> str:
        parts = []
        for i in range(self.n):
            state = "running" if self.is_running(i) else "down"
            parts.append(f"===== {self.ids[i]} ({state}) {self.log_path(i)} (last {lines} lines) =====")
            parts.append(self.log_tail(i, lines))
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# local clusters driven by `aether cluster start|stop` (real CLI subprocesses)


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as `aether cluster start` checks
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_offset(nodes: int) -> int:
    """A `--base-port-offset` K such that every port of an N-node local cluster (7000+K+i,
    9000+K+i, 8080+K+i) is free right now (K < 23000 keeps them below the ephemeral range, see
    `free_ports`); none of them was handed out before in this process."""
    import random

    for _ in range(5000):
        k = random.randrange(1000, 23000)
        ports = {base + k + i for base in (7000, 9000, 8080) for i in range(nodes)}
        if not ports & _handed_out and all(_ours(p) for p in ports) and all(_port_free(p) for p in ports):
            _handed_out.update(ports)
            return k
    raise RuntimeError("no free port range found")


def aether_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90, cwd: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `aether ARGS...` (``python -m aether.cli.main``) to completion; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "aether.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """One HTTP request with a JSON body to 127.0.0.1:port: (status, decoded JSON or None)."""
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class LocalCluster:
    """A local cluster directory driven by the real `aether cluster start|stop` commands.

    The port offset is chosen once, so every `start` reuses the same ports, ids and data dirs (as
    a user running `aether cluster start` again in the same directory). `env` is the environment
    of the CLI and hence of the nodes: without AETHER_* variables of the caller, and with
    AETHER_REPOSITORY = `DIR/repository` (`self.repository`).
    """

    def __init__(self, directory: str | Path, nodes: int = 3, *, port_offset: int | None = None) -> None:
        self.dir = Path(directory)
        self.nodes = nodes
        self.port_offset = free_port_offset(nodes) if port_offset is None else port_offset
        self.repository = self.dir / "repository"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
        self.env["AETHER_REPOSITORY"] = str(self.repository)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.ids = [f"node-{i + 1}" for i in range(nodes)]

    def management_port(self, i: int) -> int:
        return 9000 + self.port_offset + i

    def http_port(self, i: int) -> int:
        return 8080 + self.port_offset + i

    @property
    def secret(self) -> bytes:
        """The cluster secret `aether cluster start` generated in the cluster directory."""
        return (self.dir / "cluster.secret").read_bytes().strip()

    def connect(self, i: int) -> str:
        """The `--connect` address of node i (0-based)."""
        return f"{HOST}:{self.management_port(i)}"

    def log_path(self, i: int) -> Path:
        return self.dir / f"{self.ids[i]}.log"

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """`aether ARGS...` with this cluster's environment."""
        return aether_cli(*args, env=self.env, timeout=timeout)

    def on(self, i: int, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """`aether --connect <node i> ARGS...`."""
        return self.cli("--connect", self.connect(i), *args, timeout=timeout)

    def start(self, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`aether cluster start` on the directory (returns when the CLI returns)."""
        return self.cli(
            "cluster", "start", "--nodes", str(self.nodes), "--dir", str(self.dir),
            "--base-port-offset", str(self.port_offset), "--timeout", str(timeout),
            timeout=timeout + 30,
        )  # fmt: skip

    def stop(self, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """`aether cluster stop` on the directory (SIGTERM, SIGKILL after `timeout`)."""
        return self.cli(
            "cluster", "stop", "--dir", str(self.dir), "--timeout", str(timeout), timeout=timeout + 30
        )

    def pids(self) -> list[int | None]:
        from aether.cli import local_cluster as lc

        rec = lc.load_record(self.dir)
        return [n.pid for n in rec.nodes] if rec is not None else []

    def api(self, i: int, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
        """One management API request to node i: (HTTP status, decoded JSON body or None)."""
        return http_json(self.management_port(i), method, path, body, timeout)

    def kv(self, i: int, prefix: str) -> dict[str, Any]:
        """Node i's local (applied) view of keys under `prefix`: {key: value-as-JSON}."""
        status, doc = self.api(i, "GET", f"/api/v1/kv?{urllib.parse.urlencode({'prefix': prefix})}")
        if status != 200:
            raise AssertionError(f"GET /api/v1/kv on {self.ids[i]} -> {status}: {doc}")
        return {e["key"]: e["value"] for e in doc["entries"]}

    def log_text(self, i: int) -> str:
        p = self.log_path(i)
        return p.read_text(errors="replace") if p.exists() else ""

    def logs_report(self, lines: int = 40) -> str:
        parts = []
        for i in range(self.nodes):
            parts.append(f"===== {self.ids[i]} {self.log_path(i)} (last {lines} lines) =====")
            parts.append("\n".join(self.log_text(i).splitlines()[-lines:]))
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every node process recorded in the directory (by recorded PID and create time)."""
        from aether.cli import local_cluster as lc

        with contextlib.suppress(Exception):
            lc.stop_cluster(self.dir, timeout=5.0)
        keep = os.environ.get("AETHER_TEST_KEEP_LOGS")
        if keep:
            dest = Path(keep) / f"{self.dir.name}-{os.getpid()}-{int(time.time() * 1000)}"
            dest.mkdir(parents=True, exist_ok=True)
            for i in range(self.nodes):
                if self.log_path(i).exists():
                    shutil.copy(self.log_path(i), dest / self.log_path(i).name)


# --------------------------------------------------------------------------------------------------
# fixtures


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}: the test run was asked to stop")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI job's timeout, `timeout`, a stopped xdist worker) ends the run the way Ctrl-C
    does: the running test's fixtures are torn down, so the node processes they started (Forge's
    among them, which are not bound to this process' life) are stopped by PID, not left running."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    # Every process a test starts gets a home of the run's own: `aether` keeps its defaults under
    # ~/.aether (the artifact repository a node caches into and publishes from at start, the local
    # cluster's directory), and a developer's own wheels there became part of the clusters that
    # tests started without AETHER_REPOSITORY (test_cluster_cli listed a map `aether.repository`
    # it never created), while those tests' wheels stayed in the developer's home.
    home = Path(tempfile.mkdtemp(prefix="aether-test-home-"))
    config.add_cleanup(functools.partial(shutil.rmtree, home, ignore_errors=True))
    os.environ["HOME"] = str(home)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, the others after them in their order (tests keep their order
    within a file). `make test` hands whole files to two xdist workers in collection order
    (`--dist loadfile --no-loadscope-reorder`): a long file handed out last (the 10-round restart
    test, 80-120 s) kept one worker busy while the other had nothing left, about a minute at the
    end of the run; longest-first leaves only short files for the end. The seconds per file are
    tests/file_seconds.json, from a whole run's `--durations=0` (setup + call + teardown summed per
    file, on a loaded machine: only their order matters); a file not listed counts 0.1 s a test."""
    weights: dict[str, float] = json.loads((Path(__file__).parent / "file_seconds.json").read_text())
    files = [item.nodeid.split("::")[0] for item in items]
    count = collections.Counter(files)
    first: dict[str, int] = {}
    for i, file in enumerate(files):
        first.setdefault(file, i)
    key = {
        id(item): (-weights.get(file.removeprefix("tests/"), 0.1 * count[file]), first[file], i)
        for i, (item, file) in enumerate(zip(items, files, strict=True))
    }
    items.sort(key=lambda item: key[id(item)])


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile src/aether once, before any test starts a process.

    The suite starts hundreds of Python processes (`aether node`, the CLI, slice workers, Forge),
    each importing most of `aether`. With PYTHONDONTWRITEBYTECODE set (as in CI's environment) no
    process writes the .pyc files of the editable install, so every one of them compiled ~160
    modules from source again: ~0.2 s of CPU per node process on a 2-core machine, and a burst of
    it whenever a cluster (re)starts. Stale .pyc files are never used (their source timestamps are
    checked), so this only changes how long the imports take.
    """
    import compileall

    compileall.compile_dir(ROOT / "src" / "aether", quiet=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    # the test's own clusters, and those its module shares (`make_module_process_cluster`)
    clusters: list[ProcessCluster | LocalCluster] = [
        c for node in reversed(item.listchain()) for c in getattr(node, "_process_clusters", [])
    ]
    if rep.failed and clusters:
        for k, c in enumerate(clusters):
            rep.sections.append((f"node logs (cluster {k}, {rep.when})", c.logs_report()))


@pytest.fixture
def make_process_cluster(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ProcessCluster]]:
    """Factory: ``make_process_cluster(n=3, start=True, quorum_timeout=20, **ProcessCluster kwargs)``.

    Every cluster made is closed (all its PIDs SIGKILLed) when the test ends, pass or fail.
    """
    made: list[ProcessCluster] = request.node.__dict__.setdefault("_process_clusters", [])
    try:
        yield functools.partial(_make_process_cluster, made, tmp_path)
    finally:
        for c in made:
            c.close()


@pytest.fixture(scope="module")
def make_module_process_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ProcessCluster]]:
    """`make_process_cluster` for a cluster that the tests of one module share (a module-scoped
    fixture calls it): closed when the module's last test ended; its node logs are attached to
    the report of any test of the module that fails. Only for tests that neither need a fresh
    cluster nor stop, kill or reconfigure one (those keep `make_process_cluster`)."""
    made: list[ProcessCluster] = request.node.__dict__.setdefault("_process_clusters", [])
    base = tmp_path_factory.mktemp(request.node.name.removesuffix(".py"))
    try:
        yield functools.partial(_make_process_cluster, made, base)
    finally:
        for c in made:
            c.close()


def _make_process_cluster(
    made: list[ProcessCluster],
    base: Path,
    n: int = 3,
    *,
    start: bool = True,
    quorum_timeout: float = 20.0,
    **kw: Any,
) -> ProcessCluster:
    """A `ProcessCluster` under `base`, recorded in `made` (which the caller closes); started with
    quorum unless `start` is false. A cluster that lost a port to another program starts again."""
    for attempt in range(1, 4):
        c = ProcessCluster(n, base / f"cluster{len(made)}", **kw)
        made.append(c)
        if not start:
            return c
        c.start_all()
        try:
            # every node, not only those still running: one that could not bind its port
            # exited, and the others have a quorum without it
            c.wait_quorum(quorum_timeout, nodes=range(n))
        except NodeExited as e:
            if "address already in use" not in str(e) or attempt == 3:
                raise
            print(f"make_process_cluster: another program took a port; starting again: {e}")
            c.close()
            continue
        return c
    raise AssertionError("unreachable")


@pytest.fixture
def process_cluster(make_process_cluster: Callable[..., ProcessCluster]) -> ProcessCluster:
    """A started 3-node cluster with quorum (closed when the test ends)."""
    return make_process_cluster(3)


@pytest.fixture
def make_local_cluster(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., LocalCluster]]:
    """Factory: ``make_local_cluster(nodes=3, port_offset=None)`` -> a `LocalCluster` in a fresh
    directory (nothing started). Every node started from it is stopped when the test ends."""
    made: list[Any] = request.node.__dict__.setdefault("_process_clusters", [])
    mine: list[LocalCluster] = []

    def make(nodes: int = 3, **kw: Any) -> LocalCluster:
        c = LocalCluster(tmp_path / f"local{len(mine)}", nodes, **kw)
        made.append(c)
        mine.append(c)
        return c

    try:
        yield make
    finally:
        for c in mine:
            c.close()


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The order demo's wheels as `make demo-wheels` builds them (5 slices, the order-domain
    library, and place-order 0.1.1 to update to), built once per run: under xdist the workers'
    temporary directories share a parent, and the first worker that needs the wheels builds them
    there while the others wait on a lock (a build costs ~9 CPU-seconds; the tests only read the
    wheels, copying them into repositories of their own)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "order-demo-wheels"
    done = shared / "order-demo-wheels.done"
    with open(shared / "order-demo-wheels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # (a build that failed half-way)
            out.mkdir()
            build = [sys.executable, str(ROOT / "examples/build.py"), "--only", "order_demo", "--no-deploy"]
            for extra in ([], ["--project", "place-order", "--set-version", "0.1.1"]):
                proc = subprocess.run(
                    [*build, *extra, "--out", str(out)],
                    capture_output=True,
                    text=True,
                    timeout=280,
                    check=False,
                )
                assert proc.returncode == 0, proc.stdout + proc.stderr
            done.touch()
    names = sorted(w.name for w in out.glob("*.whl"))
    assert len(names) == 7 and "place_order-0.1.1-py3-none-any.whl" in names, names
    return out
