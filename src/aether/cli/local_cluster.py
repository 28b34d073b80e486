"""Local multi-process clusters: the logic behind `aether cluster start|stop|status|demo`.

A local cluster lives in one directory (default `.aether/cluster`):

- `cluster.json` describes every node: id, ports, data dir, log, and the pid and process
  create-time of the process we started (so that `stop` never signals a process that merely
  reuses a pid, and so that `stop`/`status` need no flags);
- `node-K.pid` holds the pid of node K, `node-K.log` its output, `node-K/data` its data;
- `cluster.secret` (0600) holds the cluster secret the nodes prove to each other on the cluster
  port, generated on the first start (docs/cluster-security.md). Clients of the cluster port use
  it too: `AETHER_CLUSTER_SECRET_FILE=DIR/cluster.secret`. A caller whose environment already sets
  AETHER_CLUSTER_SECRET or AETHER_CLUSTER_SECRET_FILE gives the nodes that secret instead.
  `cluster.json` records a fingerprint of it (`secret_id`): a later start that would give the
  nodes another secret is refused (`_nodes_secret`), but for a new `cluster.secret` written while
  every node is stopped;
- a stopped cluster starts again with the settings it was created with (`plan_start`): node
  count, TLS, secret, management API key (`api_key_id`, a fingerprint of AETHER_API_KEY: a start
  without it is refused), and its port offset unless moved;
- with `aether cluster start --tls`, `tls/` (0700) holds a cluster CA (`ca.crt`, `ca.key`) and a
  certificate per node (`node-K.crt`, `node-K.key`, for the node id and the loopback names),
  generated on the first start: the nodes use them for mutual TLS on the cluster port and serve
  the management API and the HTTP router over HTTPS. `cluster.json` names the CA (`tls_ca`), so
  the CLI verifies the nodes against it without --ca;
- `repository/` is the artifact repository directory of the nodes (their cache of the cluster's
  repository and the bootstrap they publish at start, docs/repository.md), shared by this
  cluster's nodes only: when the cluster is created (no `cluster.json` yet) it is seeded with a
  copy of the wheels of `~/.aether/repository` (what `make examples` put there), never again.
  `cluster.json` records it (`repository`); a caller whose environment sets AETHER_REPOSITORY
  gives the nodes that directory instead (recorded when it creates the cluster). A `cluster.json`
  of an older release records none: its nodes keep the default directory.

Node K (1-based) is `node-K` with cluster port 7000+K-1, management port 9000+K-1 and HTTP port
8080+K-1, all shifted by `port_offset`. Nodes are started as `python -m aether.cli.main node ...`
in their own session, so a Ctrl-C in the terminal reaches only the CLI, which stops them.

This module does no terminal output; `aether.cli.main` renders what it returns. Nodes are watched
only through their management API and their processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from aether.cli.client import ApiError, ApiUnreachable, ManagementClient
from aether.core.errors import AetherError
from aether.core.files import (
    make_private_dirs,
    open_private_append,
    prepare_private_dir,
    process_temporary,
    remove_stale_temporaries,
    write_private,
)
from aether.core.status import NodeStatus
from aether.core.types import (
    CLUSTER_PORT_BASE,
    HTTP_PORT_BASE,
    MANAGEMENT_PORT_BASE,
    Address,
    default_node_id,
)

if TYPE_CHECKING:
    import psutil

DEFAULT_DIR = ".aether/cluster"
CLUSTER_FILE = "cluster.json"
SECRET_FILE = "cluster.secret"
TLS_DIR = "tls"
REPOSITORY_DIR = "repository"
API_KEY_ENV = "AETHER_API_KEY"
REPOSITORY_ENV = "AETHER_REPOSITORY"  # aether.slices.repository's (not imported here: start-up time)
MAX_NODES = 99
LOG_TAIL_LINES = 25
_CREATE_TIME_TOLERANCE = 0.05  # seconds

__all__ = [
    "DEFAULT_DIR",
    "ClusterError",
    "ClusterRecord",
    "ClusterStartError",
    "NodeObservation",
    "NodeRecord",
    "StopResult",
    "apply_node_credentials",
    "check_node_credentials",
    "cluster_leader",
    "cluster_quorum",
    "default_node_argv",
    "ensure_secret_file",
    "ensure_tls_files",
    "launch_nodes",
    "load_record",
    "missing_nodes",
    "node_client",
    "nodes_repository",
    "observe",
    "plan_cluster",
    "plan_start",
    "running_nodes",
    "secret_id",
    "seed_repository",
    "start_nodes",
    "stop_cluster",
    "wait_for_quorum",
]


class ClusterError(AetherError):
    """A local-cluster operation failed; the message says what to do next."""


class ClusterStartError(ClusterError):
    """The cluster did not reach quorum; names the node at fault and the tail of its log."""

    def __init__(self, message: str, node_id: str, log_path: str, log_tail: str) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.log_path = log_path
        self.log_tail = log_tail


class NodeRecord(msgspec.Struct, kw_only=True):
    """One node of a local cluster as recorded in `cluster.json`."""

    id: str
    cluster_port: int
    management_port: int
    http_port: int
    data_dir: str
    log: str
    pid_file: str
    pid: int | None = None
    create_time: float | None = None
    log_offset: int = 0  # where this run's output starts in the log


class ClusterRecord(msgspec.Struct, kw_only=True):
    """Contents of `cluster.json`."""

    host: str
    port_offset: int
    nodes: list[NodeRecord]
    started_at: float = 0.0
    version: int = 1
    # the cluster CA certificate of a cluster started with --tls (its node certificates beside it)
    tls_ca: str | None = None
    # the artifact repository directory of the nodes (DIR/repository, or the AETHER_REPOSITORY the
    # cluster was created with); None in a cluster.json of an older release: the nodes' default
    # ($AETHER_REPOSITORY, else ~/.aether/repository), as then
    repository: str | None = None
    # a fingerprint of the cluster secret the nodes were started with (`secret_id`), never the
    # secret: a start that would give them another one is refused; None in an older cluster.json
    secret_id: str | None = None
    # likewise of the management API key (AETHER_API_KEY) they were started with, "" for none
    # (the API open to local processes): a start without the key is refused; None: not known
    api_key_id: str | None = None
    # False from the first start of a new cluster until its nodes reached quorum: a cluster that
    # never did is planned anew by the next start (node count, TLS, secret, key); True in an
    # older cluster.json
    established: bool = True

    def peers_arg(self) -> str:
        return ",".join(f"{n.id}={Address(self.host, n.cluster_port)}" for n in self.nodes)

    @property
    def scheme(self) -> str:
        """How its management APIs and HTTP routers are reached: ``https`` with --tls."""
        return "https" if self.tls_ca else "http"


# -- planning and the cluster file ------------------------------------------------------------------


def plan_cluster(
    directory: str | Path, nodes: int, *, host: str = "127.0.0.1", port_offset: int = 0, tls: bool = False
) -> ClusterRecord:
    """Ids, ports and paths of an N-node local cluster in `directory` (nothing is started); with
    `tls`, the path of its CA (`ensure_tls_files` makes it when the nodes start)."""
    if not 1 <= nodes <= MAX_NODES:
        raise ClusterError(f"--nodes must be between 1 and {MAX_NODES} (got {nodes})")
    d = Path(directory).absolute()
    recs: list[NodeRecord] = []
    for k in range(1, nodes + 1):
        nid = default_node_id(k)
        ports = [
            base + port_offset + k - 1 for base in (CLUSTER_PORT_BASE, MANAGEMENT_PORT_BASE, HTTP_PORT_BASE)
        ]
        for p in ports:
            if not 1 <= p <= 65535:
                raise ClusterError(f"--base-port-offset {port_offset} puts port {p} of {nid} outside 1-65535")
        recs.append(
            NodeRecord(
                id=nid,
                cluster_port=ports[0],
                management_port=ports[1],
                http_port=ports[2],
                data_dir=str(d / nid / "data"),
                log=str(d / f"{nid}.log"),
                pid_file=str(d / f"{nid}.pid"),
            )
        )
    tls_ca = str(d / TLS_DIR / "ca.crt") if tls else None
    return ClusterRecord(host=host, port_offset=port_offset, nodes=recs, tls_ca=tls_ca)


def plan_start(
    directory: str | Path, nodes: int | None = None, *, port_offset: int | None = None, tls: bool = False
) -> ClusterRecord:
    """The plan of `aether cluster start` in `directory`: a new cluster (`nodes` default 3, offset
    default 0) when none is recorded there, else the recorded cluster with the settings it was
    created with (docs/cli.md, *aether cluster start*):

    - its node count: the nodes' data records them as the members, so another `nodes` cannot
      start (ClusterError saying what to do);
    - TLS: a cluster created with --tls always starts with TLS; `tls` turns it on for a cluster
      created without it (an upgrade, recorded);
    - its port offset unless `port_offset` moves it (the members are named by id, so their
      addresses may change while every node is stopped);
    - its repository and secret (`launch_nodes`).
    """
    previous = load_record(directory)
    if previous is not None and not previous.established:
        # its first start failed: nothing ran, so the flags plan it as a new cluster (the data
        # its nodes wrote is replaced when the node count changes, `launch_nodes`)
        offset = previous.port_offset if port_offset is None else port_offset
        record = plan_cluster(directory, 3 if nodes is None else nodes, host=previous.host,
                              port_offset=offset, tls=tls)  # fmt: skip
        record.established = False
        return record
    if previous is None:
        record = plan_cluster(directory, 3 if nodes is None else nodes, port_offset=port_offset or 0, tls=tls)
        record.established = False
        return record
    count = len(previous.nodes)
    if nodes is not None and nodes != count:
        raise ClusterError(
            f"the cluster of {directory} was created with {count} node(s), and their data records "
            f"them as its members: it cannot start with --nodes {nodes}; drop --nodes to start it "
            "again, or create a new cluster in another --dir (or after removing this directory)"
        )
    offset = previous.port_offset if port_offset is None else port_offset
    record = plan_cluster(directory, count, host=previous.host, port_offset=offset,
                          tls=tls or previous.tls_ca is not None)  # fmt: skip
    record.secret_id, record.api_key_id = previous.secret_id, previous.api_key_id
    return record


def load_record(directory: str | Path) -> ClusterRecord | None:
    """The recorded cluster of `directory`, or None if there is none."""
    path = Path(directory) / CLUSTER_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(data, type=ClusterRecord)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ClusterError(f"{path} is damaged ({e}); remove it and the node-*.pid files beside it") from None


def save_record(directory: str | Path, record: ClusterRecord) -> None:
    """Write `cluster.json` atomically, through a temporary of this process's own; a write that
    fails removes it, and those of `aether` processes killed while writing are removed here."""
    d = Path(directory)
    make_private_dirs(d)
    path = d / CLUSTER_FILE
    remove_stale_temporaries(path)
    tmp = process_temporary(path)
    try:
        write_private(tmp, msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (one per process id: they piled up, each a whole record)
        raise


def ensure_secret_file(directory: str | Path) -> Path:
    """The cluster secret file of `directory`, generated (0600) if there is none yet."""
    from aether.transport.auth import generate_secret, write_secret_file

    path = Path(directory) / SECRET_FILE
    if not path.exists():
        write_secret_file(path, generate_secret())
    return path


def secret_id(secret: bytes) -> str:
    """The fingerprint of a cluster secret that `cluster.json` records (`ClusterRecord.secret_id`):
    it tells two secrets apart and reveals nothing of either."""
    return hmac.new(secret, b"aether local cluster secret id v1", hashlib.sha256).hexdigest()[:16]


def _nodes_secret(d: Path, record: ClusterRecord, child_env: dict[str, str], *, whole: bool) -> None:
    """Give the nodes (`child_env`) the cluster secret and record its fingerprint in `record`.

    The environment's AETHER_CLUSTER_SECRET or AETHER_CLUSTER_SECRET_FILE, else `d/cluster.secret`
    (generated for a new cluster). Raises ClusterError when it cannot be read, or when it is not
    the secret the cluster was started with before: the nodes still running (or, for the `whole`
    cluster, its clients) hold that one. The one deliberate change allowed: a new secret written
    into `d/cluster.secret` while every node is stopped (`whole`).
    """
    from aether.transport.auth import SECRET_ENV, SECRET_FILE_ENV, secret_from_env

    own = d / SECRET_FILE
    value, file = child_env.get(SECRET_ENV), child_env.get(SECRET_FILE_ENV)
    if file and not value and Path(file).absolute().resolve() == own.absolute().resolve():
        file = None  # the cluster's own file, as docs/cluster-security.md has clients export it
    if value and file:
        raise ClusterError(
            f"the environment sets both {SECRET_ENV} and {SECRET_FILE_ENV}; unset one of them "
            f"(or both, and the nodes get the cluster's own secret, {own})"
        )
    if value or file:
        source = f"{SECRET_ENV} in the environment" if value else f"{SECRET_FILE_ENV}={file}"
    else:
        if record.secret_id is not None and not own.exists():
            raise ClusterError(
                f"the cluster of {d} was started with a cluster secret that is not in {own} (there is "
                f"no such file): give the nodes that secret again ({SECRET_ENV} or {SECRET_FILE_ENV}), "
                f"or, to give the stopped cluster a new secret, write one into {own} (mode 0600; "
                "python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        child_env[SECRET_FILE_ENV] = str(ensure_secret_file(d).absolute())
        source = str(own)
    try:
        secret = secret_from_env(child_env)
    except AetherError as e:
        raise ClusterError(f"cannot give the nodes the cluster secret: {e}") from None
    assert secret is not None
    sid = secret_id(secret)
    if record.secret_id is not None and record.secret_id != sid and not (whole and source == str(own)):
        if whole:
            raise ClusterError(
                f"the nodes would get the cluster secret of {source}, not the one the cluster of {d} "
                f"was started with (clients holding that one would be refused): unset {SECRET_ENV} and "
                f"{SECRET_FILE_ENV} to use the cluster's own secret, {own}, or give the one it was "
                f"started with; to change the secret of the stopped cluster, write the new one into {own}"
            )
        raise ClusterError(
            f"the cluster secret of {source} is not the one the running nodes of {d} were started "
            f"with, so the node(s) started now could not link with them: give the same secret (unset "
            f"{SECRET_ENV} and {SECRET_FILE_ENV} to use {own}), or stop the whole cluster first"
        )
    record.secret_id = sid


def _nodes_api_key(d: Path, record: ClusterRecord, child_env: Mapping[str, str], *, whole: bool) -> None:
    """Record the fingerprint of the management API key the nodes get (AETHER_API_KEY of
    `child_env`) in `record`; raise ClusterError when the cluster was started with a key and this
    start has none (its API would be open to every local process: a downgrade), or, for nodes
    started beside running ones (not `whole`), when the key is not theirs. Changing the key, or
    setting one, while every node is stopped is allowed."""
    key = child_env.get(API_KEY_ENV) or ""
    kid = hmac.new(key.encode(), b"aether local cluster api key id v1", hashlib.sha256).hexdigest()[:16]
    kid = kid if key else ""
    before = record.api_key_id
    if before and not kid:
        raise ClusterError(
            f"the cluster of {d} was started with a management API key and {API_KEY_ENV} is not set "
            f"now: its nodes would start without one, their API open to every local process; set "
            f"{API_KEY_ENV} (or give --api-key-file) to the cluster's key"
        )
    if before is not None and kid != before and not whole:
        raise ClusterError(
            f"the running nodes of {d} were started "
            f"{'with another management API key' if before else 'without a management API key'} "
            f"than the {API_KEY_ENV} of this start: give the same key (or none), or stop the whole "
            "cluster first"
        )
    record.api_key_id = kid


def check_node_credentials(
    directory: str | Path, record: ClusterRecord, env: Mapping[str, str] | None = None
) -> None:
    """Raise ClusterError if nodes of `record` started now (environment `env`, default ours) would
    not get the secret and API key the running ones have (as `start_nodes` would, before
    stopping any)."""
    probe = msgspec.structs.replace(record)
    apply_node_credentials(directory, probe, dict(os.environ if env is None else env))


def apply_node_credentials(
    directory: str | Path, record: ClusterRecord, child_env: dict[str, str], *, whole: bool = False
) -> None:
    """Give the nodes of `record` their cluster secret in `child_env` and record the fingerprints
    of it and of their API key in `record`; ClusterError when they are not the ones the cluster
    was started with (`_nodes_secret`, `_nodes_api_key`; `whole`: every node starts now)."""
    _nodes_secret(Path(directory), record, child_env, whole=whole)
    _nodes_api_key(Path(directory), record, child_env, whole=whole)


def ensure_tls_files(record: ClusterRecord) -> None:
    """The CA of a cluster started with --tls and a certificate per node, generated (keys 0600 in
    a 0700 directory) where missing. Node certificates name the node id, the loopback names and
    the cluster's host, so HTTPS clients verify them by address."""
    from aether.transport.tls import CA_KEY, DEFAULT_SANS, init_ca, issue_node_cert

    if not record.tls_ca:
        return
    d = Path(record.tls_ca).parent
    if not (d / CA_KEY).exists():
        init_ca(d, cluster_name=f"local cluster {d.parent.name}")
    sans = list(dict.fromkeys([*DEFAULT_SANS, record.host]))
    for n in record.nodes:
        if not (d / f"{n.id}.crt").exists() or not (d / f"{n.id}.key").exists():
            issue_node_cert(d, n.id, sans=sans)


def node_client(
    record: ClusterRecord, node: NodeRecord, *, api_key: str | None = None, timeout: float = 1.0
) -> ManagementClient:
    """A client for the management API of `node` (HTTPS with the cluster's CA if it has TLS)."""
    return ManagementClient(
        Address(record.host, node.management_port), api_key=api_key, timeout=timeout,
        https=record.tls_ca is not None, ca=record.tls_ca,
    )


# -- processes --------------------------------------------------------------------------------------


def _is_node_cmdline(cmdline: Sequence[str]) -> bool:
    joined = " ".join(cmdline)
    return "aether" in joined and "node" in cmdline


def live_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The running `psutil.Process` we started as `pid`, or None if it is gone or not ours.

    With a recorded create-time the process must have been created at that moment; without one
    (a bare pid file) its command line must be that of an `aether node`. A zombie counts as gone
    (it is never reaped here: a Popen owning it must still see its exit code).
    """
    if not pid or pid <= 0:
        return None
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time is not None:
            if abs(p.create_time() - create_time) > _CREATE_TIME_TOLERANCE:
                return None
        elif not _is_node_cmdline(p.cmdline()):
            return None
        return p
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def _read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass
class _Target:
    id: str
    pid: int
    create_time: float | None
    pid_file: Path


def _targets(directory: Path, record: ClusterRecord | None) -> list[_Target]:
    """Every node process the directory says we started (from cluster.json, then stray pid files)."""
    out: list[_Target] = []
    seen: set[Path] = set()
    if record is not None:
        for n in record.nodes:
            pf = Path(n.pid_file)
            seen.add(pf.absolute())
            pid = n.pid if n.pid else _read_pid_file(pf)
            if pid:
                out.append(_Target(n.id, pid, n.create_time if n.pid == pid else None, pf))
    for pf in sorted(directory.glob("*.pid")):
        if pf.absolute() in seen:
            continue
        pid = _read_pid_file(pf)
        if pid:
            out.append(_Target(pf.stem, pid, None, pf))
    return out


def running_nodes(directory: str | Path) -> list[tuple[str, int]]:
    """(id, pid) of every node process of `directory` that is still running."""
    d = Path(directory)
    record = load_record(d)
    return [(t.id, t.pid) for t in _targets(d, record) if live_process(t.pid, t.create_time) is not None]


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def check_ports(record: ClusterRecord) -> None:
    """Raise ClusterError naming the first port that is already in use."""
    for n in record.nodes:
        for what, port in (
            ("cluster", n.cluster_port),
            ("management", n.management_port),
            ("HTTP", n.http_port),
        ):
            if not _port_free(record.host, port):
                raise ClusterError(
                    f"port {port} ({what} port of {n.id}) is already in use on {record.host}: "
                    "stop whatever uses it, or shift all ports with --base-port-offset K"
                )


def default_node_argv(record: ClusterRecord, node: NodeRecord) -> list[str]:
    """The command line that runs `node` of `record`."""
    return [
        sys.executable,
        "-m",
        "aether.cli.main",
        "node",
        "--id",
        node.id,
        "--peers",
        record.peers_arg(),
        "--host",
        record.host,
        "--cluster-port",
        str(node.cluster_port),
        "--management-port",
        str(node.management_port),
        "--http-port",
        str(node.http_port),
        "--data-dir",
        node.data_dir,
        *_tls_args(record, node),
    ]


def _tls_args(record: ClusterRecord, node: NodeRecord) -> list[str]:
    if not record.tls_ca:
        return []
    d = Path(record.tls_ca).parent
    return [
        "--tls-cert", str(d / f"{node.id}.crt"), "--tls-key", str(d / f"{node.id}.key"),
        "--tls-ca", record.tls_ca, "--https",
    ]  # fmt: skip


NodeArgv = Callable[[ClusterRecord, NodeRecord], list[str]]


def launch_nodes(
    directory: str | Path,
    record: ClusterRecord,
    *,
    node_argv: NodeArgv = default_node_argv,
    env: dict[str, str] | None = None,
) -> dict[str, subprocess.Popen[bytes]]:
    """Start every node of `record` (after checking nothing runs and ports are free).

    Writes pid files and `cluster.json` before returning, so that `stop_cluster` can clean up
    whatever happens next. Returns the Popen objects by node id.
    """
    d = prepare_private_dir(directory, logging.getLogger("aether.cluster"))  # data, logs, pid files: 0700
    running = running_nodes(d)
    if running:
        listing = ", ".join(f"{nid} (pid {pid})" for nid, pid in running)
        raise ClusterError(
            f"a cluster started from {d} is still running: {listing}; "
            f"stop it first with `aether cluster stop --dir {d}`"
        )
    check_ports(record)
    previous = load_record(d)
    if previous is not None and not previous.established:
        if len(previous.nodes) != len(record.nodes):
            _remove_node_data(previous)  # it records the other member set: the nodes could not agree
        previous = None  # a cluster that never ran: created anew (its secret file stays)
    record.repository = _cluster_repository(d, previous, os.environ if env is None else env)
    if previous is not None and record.secret_id is None:
        record.secret_id = previous.secret_id
    if previous is not None and record.api_key_id is None:
        record.api_key_id = previous.api_key_id
    record.started_at = time.time()
    return _spawn(d, record, record.nodes, node_argv, env, whole=True)


def _remove_node_data(record: ClusterRecord) -> None:
    """Remove the data directories of `record`'s nodes (``DIR/node-K/data``, and ``DIR/node-K``
    when that leaves it empty); their logs stay."""
    for n in record.nodes:
        data = Path(n.data_dir)
        try:
            shutil.rmtree(data)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ClusterError(f"cannot remove {data}, the data of {n.id} of the first start: {e}") from e
        with contextlib.suppress(OSError):
            data.parent.rmdir()


def mark_established(directory: str | Path) -> None:
    """Record that the cluster of `directory` reached quorum (`ClusterRecord.established`): from
    now on a start keeps its settings."""
    record = load_record(directory)
    if record is not None and not record.established:
        record.established = True
        save_record(directory, record)


def _cluster_repository(d: Path, previous: ClusterRecord | None, env: Mapping[str, str]) -> str | None:
    """The repository directory of the cluster of `d` (`ClusterRecord.repository`): the recorded
    one of a cluster started before, else (the cluster is created) the AETHER_REPOSITORY of `env`,
    else `d/repository`, seeded with the wheels of `~/.aether/repository`."""
    if previous is not None:
        return previous.repository
    explicit = env.get(REPOSITORY_ENV)
    if explicit:
        return str(Path(explicit).expanduser().absolute())
    own = d.absolute() / REPOSITORY_DIR
    source = Path.home() / ".aether" / "repository"
    try:
        seed_repository(source, own)
    except OSError as e:
        raise ClusterError(
            f"cannot copy the wheels of {source} into the cluster's repository {own}: {e}"
        ) from e
    return str(own)


def seed_repository(source: Path, dest: Path) -> int:
    """Copy the wheels of the repository directory `source` (slice wheels by coordinates, library
    wheels in `_libs/`) into `dest` (created, 0700), but for a version `dest` has a wheel of, or a
    library wheel of that name; returns how many were copied."""
    from aether.slices.errors import ArtifactNotFound
    from aether.slices.repository import Repository, _copy_atomic

    make_private_dirs(dest)
    src, dst = Repository(source), Repository(dest)
    copies: list[tuple[Path, Path]] = []
    for a in src.list():
        target_dir = dst.artifact_dir(a)
        if target_dir.is_dir() and any(p.suffix == ".whl" for p in target_dir.iterdir()):
            continue
        with contextlib.suppress(ArtifactNotFound):  # removed meanwhile
            copies.append((src.resolve(a), target_dir))
    copies += [(w, dst.libs_dir) for w in src.library_wheels() if not (dst.libs_dir / w.name).exists()]
    for wheel, target_dir in copies:
        _copy_atomic(wheel, target_dir, wheel.name)
    return len(copies)


def nodes_repository(record: ClusterRecord, env: Mapping[str, str] | None = None) -> str:
    """The repository directory the nodes of `record` get when started with `env` (default ours)."""
    e = os.environ if env is None else env
    return e.get(REPOSITORY_ENV) or record.repository or str(Path.home() / ".aether" / "repository")


def missing_nodes(record: ClusterRecord, *, api_key: str | None = None, timeout: float = 1.0) -> list[str]:
    """Ids of the recorded nodes that neither run from here nor answer on their management port."""
    obs = observe(record, api_key=api_key, timeout=timeout)
    return [o.node.id for o in obs if not o.running and not o.up]


def start_nodes(
    directory: str | Path,
    ids: Sequence[str],
    *,
    node_argv: NodeArgv = default_node_argv,
    env: dict[str, str] | None = None,
) -> tuple[ClusterRecord, dict[str, subprocess.Popen[bytes]]]:
    """Start the nodes `ids` of the cluster recorded in `directory` again, with their recorded
    ports and data; each must not be running and its ports must be free. Returns the record and
    the Popen objects of the started nodes."""
    d = Path(directory)
    record = load_record(d)
    if record is None:
        raise ClusterError(f"no local cluster recorded in {d}; start one with `aether cluster start`")
    by_id = {n.id: n for n in record.nodes}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ClusterError(
            f"no node {', '.join(unknown)} in the cluster of {d} (nodes: {', '.join(by_id)})"
        )
    nodes = [by_id[i] for i in ids]
    for n in nodes:
        if live_process(n.pid, n.create_time) is not None:
            raise ClusterError(f"{n.id} (pid {n.pid}) is already running")
    check_ports(ClusterRecord(host=record.host, port_offset=record.port_offset, nodes=nodes))
    prepare_private_dir(d, logging.getLogger("aether.cluster"))
    return record, _spawn(d, record, nodes, node_argv, env, whole=False)


def _spawn(
    d: Path,
    record: ClusterRecord,
    nodes: Sequence[NodeRecord],
    node_argv: NodeArgv,
    env: dict[str, str] | None,
    *,
    whole: bool,
) -> dict[str, subprocess.Popen[bytes]]:
    import psutil

    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    apply_node_credentials(d, record, child_env, whole=whole)
    if record.repository and not child_env.get(REPOSITORY_ENV):
        child_env[REPOSITORY_ENV] = record.repository
    try:
        ensure_tls_files(record)
    except (AetherError, OSError) as e:
        raise ClusterError(f"cannot create the TLS certificates of the cluster: {e}") from e
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for n in nodes:
            make_private_dirs(n.data_dir)
            with open_private_append(n.log) as log:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log.write(f"\n=== aether cluster start: {n.id} at {stamp} ===\n".encode())
                log.flush()
                n.log_offset = log.tell()
                proc = subprocess.Popen(
                    node_argv(record, n),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    env=child_env,
                )
            procs[n.id] = proc
            n.pid = proc.pid
            try:
                n.create_time = psutil.Process(proc.pid).create_time()
            except psutil.Error:
                n.create_time = None  # exited already; the quorum wait reports it
            write_private(n.pid_file, f"{proc.pid}\n".encode())
    except OSError as e:
        save_record(d, record)
        stop_cluster(d, only=[n.id for n in nodes])
        raise ClusterError(f"cannot start the nodes: {e}") from e
    save_record(d, record)
    return procs


# -- observing --------------------------------------------------------------------------------------


@dataclass
class NodeObservation:
    """What one look at a node found: the process we started (`running`) and the answer of its
    management port. A node is `up` when that port answers as this node, whoever started it
    (e.g. a node restarted by hand with `aether node`)."""

    node: NodeRecord
    running: bool
    status: NodeStatus | None = None
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.status is not None


def _observe_one(
    record: ClusterRecord, node: NodeRecord, api_key: str | None, timeout: float
) -> NodeObservation:
    running = live_process(node.pid, node.create_time) is not None
    client = node_client(record, node, api_key=api_key, timeout=timeout)
    try:
        st = client.get_typed("/api/v1/status", NodeStatus)
    except ApiUnreachable as e:
        return NodeObservation(node, running, error=e.reason if running else "not running")
    except ApiError as e:
        return NodeObservation(node, running, error=f"{e.status} {e.title}: {e.detail}")
    if st.node_id != node.id:
        return NodeObservation(
            node, running, error=f"port {node.management_port} answers as {st.node_id}, not {node.id}"
        )
    return NodeObservation(node, running, status=st)


def observe(
    record: ClusterRecord, *, api_key: str | None = None, timeout: float = 1.0
) -> list[NodeObservation]:
    """Look at every node of `record` (in parallel), in node order."""
    if not record.nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(record.nodes))) as pool:
        return list(pool.map(lambda n: _observe_one(record, n, api_key, timeout), record.nodes))


def cluster_leader(observations: Sequence[NodeObservation]) -> str | None:
    """The leader most answering nodes report (None if none reports one)."""
    votes = Counter(o.status.leader for o in observations if o.status is not None and o.status.leader)
    return votes.most_common(1)[0][0] if votes else None


def cluster_quorum(observations: Sequence[NodeObservation]) -> bool:
    """True if an answering node reports quorum."""
    return any(o.status is not None and o.status.quorum for o in observations)


def _all_ready(observations: Sequence[NodeObservation]) -> bool:
    leaders = {o.status.leader for o in observations if o.status is not None}
    return (
        all(o.up and o.status is not None and o.status.quorum for o in observations)
        and len(leaders) == 1
        and None not in leaders
    )


def log_tail(node: NodeRecord, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines this run of `node` wrote to its log."""
    try:
        with open(node.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = node.log_offset if node.log_offset <= size else 0
            f.seek(max(start, size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return f"(cannot read {node.log}: {e})"
    text = data.decode(errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) if text else "(the log is empty)"


def wait_for_quorum(
    record: ClusterRecord,
    *,
    timeout: float = 30.0,
    api_key: str | None = None,
    procs: dict[str, subprocess.Popen[bytes]] | None = None,
    on_poll: Callable[[list[NodeObservation], float], None] | None = None,
    interval: float = 0.2,
) -> list[NodeObservation]:
    """Poll every node until all report quorum and agree on the leader.

    Raises ClusterStartError as soon as a node process exits, or after `timeout` seconds.
    """
    start = time.monotonic()
    while True:
        for n in record.nodes:
            p = (procs or {}).get(n.id)
            code = p.poll() if p is not None else None
            # without `procs` every node must be ours; with them, nodes we did not just start may
            # run from elsewhere (restarted by hand): the quorum wait judges them by their answer
            if code is not None or (procs is None and live_process(n.pid, n.create_time) is None):
                how = f"exited with code {code}" if code is not None else "is not running"
                raise ClusterStartError(
                    f"{n.id} (pid {n.pid}) {how} before the cluster reached quorum",
                    n.id,
                    n.log,
                    log_tail(n),
                )
        obs = observe(record, api_key=api_key, timeout=min(1.0, max(0.2, timeout / 10)))
        elapsed = time.monotonic() - start
        if on_poll is not None:
            on_poll(obs, elapsed)
        if _all_ready(obs):
            return obs
        if elapsed >= timeout:
            bad = next((o for o in obs if not o.up), None) or next(
                (o for o in obs if o.status is None or not o.status.quorum), obs[0]
            )
            if bad.status is None:
                why = f"does not answer on its management port {bad.node.management_port} ({bad.error})"
            elif not bad.status.quorum:
                why = "answers but reports no quorum"
            else:
                leaders = sorted({str(o.status.leader) for o in obs if o.status is not None})
                why = f"answers but the nodes do not agree on a leader ({', '.join(leaders)})"
            raise ClusterStartError(
                f"the cluster did not reach quorum within {timeout:g} s: {bad.node.id} {why}",
                bad.node.id,
                bad.node.log,
                log_tail(bad.node),
            )
        time.sleep(interval)


# -- stopping ---------------------------------------------------------------------------------------


@dataclass
class StopResult:
    """What `stop_cluster` did to one node: outcome is stopped, killed, not running or failed."""

    id: str
    pid: int
    outcome: str
    detail: str = ""


def stop_cluster(
    directory: str | Path, *, timeout: float = 10.0, only: Sequence[str] | None = None
) -> list[StopResult]:
    """SIGTERM every node process we started from `directory` (only the nodes `only`, if given),
    wait up to `timeout` s, then SIGKILL.

    Only processes verified to be ours (recorded create-time, or an `aether node` command line
    for a bare pid file) are signalled. Removes the pid files and clears the pids in
    `cluster.json`. Returns one result per pid found.
    """
    import psutil

    d = Path(directory)
    record = load_record(d)
    results: dict[int, StopResult] = {}
    pending: dict[int, tuple[_Target, psutil.Process]] = {}
    targets = [t for t in _targets(d, record) if only is None or t.id in only]
    for t in targets:
        proc = live_process(t.pid, t.create_time)
        if proc is None:
            results[t.pid] = StopResult(t.id, t.pid, "not running")
            continue
        try:
            proc.send_signal(signal.SIGTERM)
            pending[t.pid] = (t, proc)
        except psutil.NoSuchProcess:
            results[t.pid] = StopResult(t.id, t.pid, "not running")
        except psutil.AccessDenied as e:
            results[t.pid] = StopResult(t.id, t.pid, "failed", f"not allowed to signal it: {e}")

    def wait(deadline: float) -> None:
        while pending and time.monotonic() < deadline:
            for pid, (t, _) in list(pending.items()):
                if live_process(pid, t.create_time) is None:
                    del pending[pid]
                    results[pid] = StopResult(t.id, pid, outcome)
            if pending:
                time.sleep(0.05)

    outcome = "stopped"
    wait(time.monotonic() + timeout)
    if pending:
        outcome = "killed"
        for _pid, (_t, proc) in pending.items():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        wait(time.monotonic() + 5.0)
    for pid, (t, _) in pending.items():
        results[pid] = StopResult(t.id, pid, "failed", "still running after SIGKILL")

    for t in targets:
        if results.get(t.pid) is not None and results[t.pid].outcome != "failed":
            with contextlib.suppress(FileNotFoundError):
                t.pid_file.unlink()
    if record is not None:
        for n in record.nodes:
            if only is not None and n.id not in only:
                continue
            r = results.get(n.pid or -1)
            if n.pid is None or (r is not None and r.outcome != "failed"):
                n.pid = None
                n.create_time = None
        save_record(d, record)
    order = {t.pid: i for i, t in enumerate(targets)}
    return sorted(results.values(), key=lambda r: order.get(r.pid, 0))
