"""A real etcd cluster for tests: Debian's etcd-server (``/usr/bin/etcd``, `make etcd`), its members
started as processes on free loopback ports in a tmp dir, killed and restarted by PID.

`EtcdCluster(tmp, size=3)` starts `size` members (`start`), kills one with SIGKILL (`kill`),
restarts it on its data dir (`restart`) and stops them all (`stop`, also when a test fails: the
fixtures below call it). `etcd_cluster` is a module-scoped fixture of a 3-member cluster, so a
test module pays the start-up once. Tests using it skip with the reason when etcd is missing.
Optional TLS (`tls=EtcdTls(...)`: https client URLs, ``--client-cert-auth``) and `etcdctl` for
set-up steps such as enabling auth.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_ports

ETCD = os.environ.get("AETHER_TEST_ETCD", "/usr/bin/etcd")
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
MISSING = f"{ETCD} missing: install Debian's etcd-server (`make etcd` as root does)"
HAVE_ETCD = os.access(ETCD, os.X_OK)

requires_etcd = pytest.mark.skipif(not HAVE_ETCD, reason=MISSING)


@dataclass(frozen=True)
class EtcdTls:
    """Certificates for https client URLs: the CA, the members' server certificate and the client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> EtcdTls:
        """A CA and two certificates for 127.0.0.1, made with `aether.transport.tls` (cryptography)."""
        from aether.transport.tls import init_ca, issue_node_cert

        ca, _ = init_ca(directory, cluster_name="etcd-test")
        server_cert, server_key = issue_node_cert(directory, "etcd-server", sans=("127.0.0.1", "localhost"))
        client_cert, client_key = issue_node_cert(directory, "aether-client", sans=("127.0.0.1",))
        return cls(ca, server_cert, server_key, client_cert, client_key)


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class EtcdCluster:
    """`size` etcd members on 127.0.0.1 (client and peer ports free), data and logs under `tmp`."""

    def __init__(
        self, tmp: Path, size: int = 3, *, tls: EtcdTls | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        if not HAVE_ETCD:
            pytest.skip(MISSING)
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.extra = extra
        ports = free_ports(2 * size)
        self.members = [
            Member(f"m{i + 1}", ports[2 * i], ports[2 * i + 1], tmp / f"m{i + 1}", tmp / f"m{i + 1}.log")
            for i in range(size)
        ]
        self.scheme = "https" if tls else "http"
        self.initial_cluster = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self.endpoint(i) for i in range(len(self.members)))

    def endpoint(self, i: int) -> str:
        return f"{self.scheme}://127.0.0.1:{self.members[i].client_port}"

    def index_of(self, endpoint: str) -> int:
        return self.endpoints.index(endpoint)

    def _spawn(self, m: Member, state: str) -> None:
        url = f"{self.scheme}://127.0.0.1:{m.client_port}"
        peer = f"http://127.0.0.1:{m.peer_port}"
        args = [
            ETCD,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-state={state}",
            "--initial-cluster-token=aether-test",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
            *self.extra,
        ]
        if self.tls:
            args += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 20.0) -> None:
        for m in self.members:
            self._spawn(m, "new")
        self.wait_healthy(range(len(self.members)), timeout)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def healthy(self, i: int) -> bool:
        """The member answers /health with health true (it has a leader and serves)."""
        try:
            with urllib.request.urlopen(f"{self.endpoint(i)}/health", timeout=1, context=self._ssl()) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, indexes: range | list[int], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(indexes)
        while pending:
            for m in (self.members[i] for i in pending):
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd {m.name} exited ({m.proc.returncode}): {m.log.read_text()[-2000:]}"
                    )
            pending = [i for i in pending if not self.healthy(i)]
            if pending and time.monotonic() > deadline:
                logs = {self.members[i].name: self.members[i].log.read_text()[-1000:] for i in pending}
                raise RuntimeError(f"etcd members not healthy after {timeout}s: {logs}")
            if pending:
                time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL member `i` by its PID and reap it."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Start killed member `i` again on its data dir and wait until it is healthy."""
        self.kill(i)
        self._spawn(self.members[i], "existing")
        self.wait_healthy([i], timeout)

    def stop(self, grace: float = 1.0) -> None:
        """Stop every member by PID: SIGTERM, then SIGKILL after `grace` seconds (members stopping
        together try to hand their leadership to each other first, which can take seconds)."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGTERM)
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    os.kill(m.proc.pid, signal.SIGKILL)
                    m.proc.wait(timeout=5)

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run etcdctl against all members (``--user`` when given); its stdout. Skips the test when
        etcdctl (Debian's etcd-client) is missing."""
        if not os.access(ETCDCTL, os.X_OK):
            pytest.skip(f"{ETCDCTL} missing: install Debian's etcd-client (`make etcd` as root does)")
        cmd = [ETCDCTL, f"--endpoints={','.join(self.endpoints)}", *args]
        if user:
            cmd.insert(1, f"--user={user}")
        if self.tls:
            cmd[1:1] = [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"}
        )
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr}")
        return out.stdout


@contextlib.contextmanager
def running_etcd(tmp: Path, size: int = 3, **kwargs: object) -> Iterator[EtcdCluster]:
    """A started `EtcdCluster`, stopped (by PID) on exit."""
    cluster = EtcdCluster(tmp, size, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster shared by the tests of one module."""
    if not HAVE_ETCD:
        pytest.skip(MISSING)
    with running_etcd(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster
