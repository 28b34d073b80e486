"""Node configuration: command-line flags and an optional `aether.toml`, validated once."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from aether.core.errors import ConfigError
from aether.core.numbers import format_path, number_problem
from aether.core.types import (
    CLUSTER_PORT_BASE,
    HTTP_PORT_BASE,
    MANAGEMENT_PORT_BASE,
    Address,
    PeerSpec,
    check_node_id,
)

# Admission control defaults: measured on a 2-core machine, 3 nodes running 3,000 instances of
# a small slice converge in under a second with the management API answering in < 50 ms, while
# 100,000 keep the nodes busy for tens of seconds and lose heartbeats (docs/deployment.md).
DEFAULT_MAX_INSTANCES_PER_NODE = 1000
DEFAULT_MAX_INSTANCES_PER_CLUSTER = 3000

# Cluster port limits (docs/cluster-security.md). The budget must hold two of the largest frames
# a node accepts (16 MiB each, aether.transport.framing.DEFAULT_MAX_FRAME).
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
MIN_MAX_BUFFERED_BYTES = 32 * 1024 * 1024
DEFAULT_PRE_AUTH_MAX_FRAME = 4096
PRE_AUTH_MAX_FRAME_RANGE = (256, 1024 * 1024)
MAX_HANDSHAKE_TIMEOUT = 300.0
STORES = ("rabia", "etcd")
PARENT_PID_ENV = "AETHER_PARENT_PID"
"""Environment variable: a node whose parent process (this pid) goes away stops itself (Forge)."""
# with store = "etcd" the cluster name becomes the etcd key prefix /aether/NAME/
ETCD_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


CPU_SCHEDULING = ("batch", "normal")  # NodeConfig.cpu_scheduling


class NodeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything one node needs to start. `peers` includes every member, this node too."""

    node_id: str
    peers: list[PeerSpec]
    host: str = "127.0.0.1"
    cluster_port: int = CLUSTER_PORT_BASE
    management_port: int = MANAGEMENT_PORT_BASE
    http_port: int = HTTP_PORT_BASE
    data_dir: str = ".aether/data"
    cluster_name: str = "aether"
    fsync: str = "always"  # "always" (durable, group commit) | "snapshot" | "none"
    snapshot_every: int = 2000  # slots between local snapshots
    heartbeat_interval: float = 0.1
    heartbeat_timeout: float = 0.6
    request_timeout: float = 5.0
    api_key: str | None = None
    # seconds a connection to the management API or the HTTP router may take to send a complete
    # request head (from accept or the previous response), and may stay idle, before it is closed
    http_idle_timeout: float = 15.0
    # cluster port authentication (docs/cluster-security.md): the secret itself, or a file holding
    # it; required when `host` is not loopback. The CLI reads it from AETHER_CLUSTER_SECRET or
    # --cluster-secret-file, never from a flag value.
    cluster_secret: str | None = None
    cluster_secret_file: str | None = None
    # mutual TLS on the cluster port (docs/cluster-security.md): this node's certificate and key,
    # and the cluster CA certificate (`aether cert init` / `aether cert issue`); all three or none
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # HTTPS on the management API and the HTTP router (docs/cluster-security.md, *HTTPS*): a server
    # certificate and its key; `https` alone serves them with the node's tls_cert / tls_key
    https: bool = False
    http_tls_cert: str | None = None
    http_tls_key: str | None = None
    max_connections: int = 1024  # inbound cluster-port connections in total
    max_connections_per_host: int = 256  # inbound cluster-port connections from one address
    # bytes held in unfinished inbound frames on the cluster port, all connections together; a
    # client whose frame does not fit is closed, a peer waits (reads paused) until room frees
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    # largest frame a cluster-port connection may send before its handshake completed
    pre_auth_max_frame: int = DEFAULT_PRE_AUTH_MAX_FRAME
    # seconds a cluster-port connection has to complete its handshake (TLS included);
    # None: max(1, 5 x heartbeat_timeout)
    handshake_timeout: float | None = None
    # slice repository dir (default: $AETHER_REPOSITORY or ~/.aether/repository)
    repository: str | None = None
    # seconds the chunks of an upload that wrote no manifest (a crash or a failed write
    # interrupted it) stay in the repository's map (and its claim on a slice's coordinates)
    # before the leader removes them; an upload
    # that takes more than half of it to store its chunks is refused (docs/repository.md)
    repository_orphan_age: float = 3600.0
    # admission control: slice instances (all artifacts together) one node may run, and the whole
    # cluster; a blueprint, deploy or scale that would exceed either is rejected with a 400
    max_instances_per_node: int = DEFAULT_MAX_INSTANCES_PER_NODE
    max_instances_per_cluster: int = DEFAULT_MAX_INSTANCES_PER_CLUSTER
    # serve the Prometheus `/metrics` of the management API without an API key (scrapers); the
    # probes `/livez` and `/readyz` are always public
    metrics_public: bool = False
    # `aether node --join HOST:PORT`: a member's cluster address; the node asks it for the member
    # set at start and runs as a learner (catching up by snapshot) until it is added
    join: str | None = None
    # seconds between two calls of each slice instance's `health()` hook, and how long one may take
    # before it counts as failed (docs/slices.md, *Health checks*)
    health_interval: float = 5.0
    health_timeout: float = 2.0
    # slice worker processes this node may run at once (docs/slices.md, *Worker processes*): a slice
    # whose libraries or code conflict with what is loaded, or whose blueprint says isolation =
    # "process", runs in one; loading one more fails with a reason naming this limit
    max_workers: int = 8
    # append every observation the controller decides on while this node leads to this file (JSON
    # lines; `aether controller replay FILE` runs them through a controller config offline)
    controller_record: str | None = None
    # accept fault requests on the management API (`/api/v1/faults`: link latency, loss and
    # partitions injected in the transport, failing slice instances), for Aether Forge and tests;
    # off, a node refuses them (403). Never on a production node
    fault_injection: bool = False
    # tracing (docs/operations.md, *Tracing*): "off", or "otlp" to record spans with the
    # OpenTelemetry SDK (the extra aether-slices[otel]) and export them over OTLP/HTTP to otlp_endpoint
    # (default: the SDK's, http://localhost:4318/v1/traces, or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    tracing: str = "off"
    otlp_endpoint: str | None = None
    # how the node writes its log to stderr: "text" (one line per record, as always) or "json" (one
    # JSON object per line with node, request id, trace id, slice and instance); and how many recent
    # records it keeps in memory for `GET /api/v1/logs` / `aether logs` (docs/operations.md, *Logs*)
    log_format: str = "text"
    log_buffer: int = 5000
    # how the kernel schedules the node's threads (docs/operations.md, *CPU*): "batch" (Linux
    # SCHED_BATCH: a thread woken by another does not take that one's core at once; the default)
    # or "normal" (SCHED_OTHER, what a process gets unless it asks)
    cpu_scheduling: str = "batch"
    # the cluster state store (docs/operations.md, *Running on etcd*): "rabia" (embedded, the
    # default: nothing to run besides Aether) or "etcd" (an existing etcd v3 at etcd_endpoints; the
    # cluster's keys live under /aether/{cluster_name}/, membership and leader come from etcd leases)
    store: str = "rabia"
    etcd_endpoints: list[str] = []
    # etcd authentication: the user, and its password in etcd_password (the CLI takes it only from
    # AETHER_ETCD_PASSWORD, never a flag value) or in the file etcd_password_file
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_password_file: str | None = None
    # TLS to etcd: the CA of etcd's server certificates, and this node's client certificate and key
    # (etcd's --client-cert-auth)
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    # seconds a node's member key outlives its last lease renewal: a killed node leaves the member
    # set (and the leadership) this long after it died
    etcd_member_ttl: int = 5

    def validate(self) -> NodeConfig:
        check_node_id(self.node_id)
        if self.join is not None:
            Address.parse(self.join)  # ConfigError naming it
        ids = [p.id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate node ids in peers: {sorted(ids)}")
        if self.node_id not in ids:
            raise ConfigError(f"node id {self.node_id!r} is not among the peers {ids}")
        for name in ("cluster_port", "management_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"{name} {port} out of range 0-65535")
        if self.fsync not in ("none", "snapshot", "always"):
            raise ConfigError(f"fsync must be one of none, snapshot, always (got {self.fsync!r})")
        for name in ("heartbeat_interval", "heartbeat_timeout", "request_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 3600:  # (also refuses nan: every comparison with it is false)
                raise ConfigError(f"{name} must be > 0 and <= 3600 seconds (got {value})")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({self.heartbeat_timeout}) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval}): a peer is declared down after missing heartbeats"
            )
        if not 60 <= self.repository_orphan_age <= 30 * 86400:
            # an upload gives up after half of it: the other half is what a slow compare-and-set
            # of its manifest (5 s, outcome unknown) may take before its chunks could be collected
            raise ConfigError(
                "repository_orphan_age must be >= 60 and <= 2592000 seconds (30 days) (got "
                f"{self.repository_orphan_age})"
            )
        if not 0 < self.http_idle_timeout <= 3600:
            raise ConfigError(
                f"http_idle_timeout must be > 0 and <= 3600 seconds (got {self.http_idle_timeout})"
            )
        if not 0 < self.health_interval <= 3600 or not 0 < self.health_timeout <= 3600:
            raise ConfigError(
                f"health_interval and health_timeout must be > 0 and <= 3600 seconds (got "
                f"{self.health_interval} and {self.health_timeout})"
            )
        if self.cluster_secret and self.cluster_secret_file:
            raise ConfigError(
                "both a cluster secret (AETHER_CLUSTER_SECRET or cluster_secret) and a cluster secret file "
                "are set: use only one"
            )
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        if any(tls.values()) and not all(tls.values()):
            missing = ", ".join(f"--{k.replace('_', '-')}" for k, v in tls.items() if not v)
            raise ConfigError(
                f"mutual TLS needs a certificate, its key and the cluster CA: {missing} missing "
                "(create them with `aether cert init` and `aether cert issue NODE_ID`)"
            )
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            pair = ("--http-tls-cert", "--http-tls-key")
            given, missing = pair if self.http_tls_cert else pair[::-1]
            raise ConfigError(f"{given} needs {missing} too: HTTPS needs a certificate and its key")
        if self.https and not self.http_tls_cert and not self.tls_cert:
            raise ConfigError(
                "--https needs a server certificate: --http-tls-cert/--http-tls-key, or the node's "
                "--tls-cert/--tls-key (`aether cert issue NODE_ID`)"
            )
        if self.tracing not in ("off", "otlp"):
            raise ConfigError(f"tracing must be off or otlp (got {self.tracing!r})")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"otlp_endpoint must be an http:// or https:// URL, e.g. http://localhost:4318/v1/traces "
                f"(got {self.otlp_endpoint!r})"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json (got {self.log_format!r})")
        if self.cpu_scheduling not in CPU_SCHEDULING:
            raise ConfigError(f"cpu_scheduling must be batch or normal (got {self.cpu_scheduling!r})")
        if not 1 <= self.log_buffer <= 1_000_000:
            raise ConfigError(f"log_buffer must be between 1 and 1000000 records (got {self.log_buffer})")
        if self.snapshot_every < 1:
            raise ConfigError("snapshot_every must be >= 1")
        for name in ("max_instances_per_node", "max_instances_per_cluster", "max_connections",
                     "max_connections_per_host"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.max_workers <= 1024:
            raise ConfigError(f"max_workers must be between 0 and 1024 (got {self.max_workers})")
        if self.max_buffered_bytes < MIN_MAX_BUFFERED_BYTES:
            raise ConfigError(
                f"max_buffered_bytes must be at least {MIN_MAX_BUFFERED_BYTES} (32 MiB: room for two of "
                f"the largest, 16 MiB frames; got {self.max_buffered_bytes})"
            )
        low, high = PRE_AUTH_MAX_FRAME_RANGE
        if not low <= self.pre_auth_max_frame <= high:
            raise ConfigError(
                f"pre_auth_max_frame must be between {low} and {high} bytes (got {self.pre_auth_max_frame}): "
                "a hello needs a few hundred bytes, and more than that only lets unauthenticated "
                "connections hold memory"
            )
        self._validate_store()
        if self.handshake_timeout is not None and not 0 < self.handshake_timeout <= MAX_HANDSHAKE_TIMEOUT:
            raise ConfigError(
                f"handshake_timeout must be > 0 and <= {MAX_HANDSHAKE_TIMEOUT:g} seconds "
                f"(got {self.handshake_timeout})"
            )
        return self

    def _validate_store(self) -> None:
        if self.store not in STORES:
            raise ConfigError(f"store must be rabia or etcd (got {self.store!r})")
        etcd_only = {
            "etcd_endpoints": self.etcd_endpoints, "etcd_username": self.etcd_username,
            "etcd_password": self.etcd_password, "etcd_password_file": self.etcd_password_file,
            "etcd_ca": self.etcd_ca, "etcd_cert": self.etcd_cert, "etcd_key": self.etcd_key,
        }
        if self.store == "rabia":
            given = [k for k, v in etcd_only.items() if v]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} set but the store is rabia: add --store etcd (store = \"etcd\") "
                    "to keep the cluster state in etcd, or drop them"
                )
            return
        if not self.etcd_endpoints:
            raise ConfigError(
                "store etcd needs the etcd endpoints: --etcd-endpoints http://HOST:2379,... "
                "(etcd_endpoints in aether.toml)"
            )
        for url in self.etcd_endpoints:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(
                    f"etcd endpoint {url!r}: expected http://HOST:PORT or https://HOST:PORT (no path)"
                )
        if not ETCD_CLUSTER_NAME.match(self.cluster_name):
            raise ConfigError(
                f"cluster name {self.cluster_name!r}: with store etcd it becomes the key prefix "
                "/aether/NAME/: 1-63 letters, digits, '.', '_' or '-'"
            )
        if self.join is not None:
            raise ConfigError(
                "--join is for the rabia store: with store etcd a node joins by running with the same "
                "cluster name and etcd endpoints (membership comes from etcd)"
            )
        if self.etcd_password and self.etcd_password_file:
            raise ConfigError(
                "both an etcd password (AETHER_ETCD_PASSWORD or etcd_password) and an etcd password file "
                "are set: use only one"
            )
        has_password = bool(self.etcd_password or self.etcd_password_file)
        if bool(self.etcd_username) != has_password:
            raise ConfigError(
                "etcd authentication needs a user and its password: --etcd-username with "
                "--etcd-password-file (or AETHER_ETCD_PASSWORD), both or neither"
            )
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ConfigError(
                "--etcd-cert needs --etcd-key too (and the other way round): give both or neither"
            )
        if not 1 <= self.etcd_member_ttl <= 300:
            raise ConfigError(
                f"etcd_member_ttl must be between 1 and 300 seconds (got {self.etcd_member_ttl})"
            )

    def __repr__(self) -> str:  # never print the secret (or the API key)
        shown = {f: getattr(self, f) for f in self.__struct_fields__}
        for f in ("cluster_secret", "api_key", "etcd_password"):
            if shown[f]:
                shown[f] = "***"
        return f"NodeConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


class _TomlPeer(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    address: str


class _TomlNode(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: str | None = None
    peers: list[_TomlPeer | str] | None = None
    host: str | None = None
    cluster_port: int | None = None
    management_port: int | None = None
    http_port: int | None = None
    data_dir: str | None = None
    cluster_name: str | None = None
    fsync: str | None = None
    snapshot_every: int | None = None
    heartbeat_interval: float | None = None
    heartbeat_timeout: float | None = None
    request_timeout: float | None = None
    api_key: str | None = None
    http_idle_timeout: float | None = None
    cluster_secret: str | None = None
    cluster_secret_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    https: bool | None = None
    http_tls_cert: str | None = None
    http_tls_key: str | None = None
    max_connections: int | None = None
    max_connections_per_host: int | None = None
    max_buffered_bytes: int | None = None
    pre_auth_max_frame: int | None = None
    handshake_timeout: float | None = None
    repository: str | None = None
    repository_orphan_age: float | None = None
    max_instances_per_node: int | None = None
    max_instances_per_cluster: int | None = None
    metrics_public: bool | None = None
    fault_injection: bool | None = None
    max_workers: int | None = None
    tracing: str | None = None
    otlp_endpoint: str | None = None
    log_format: str | None = None
    log_buffer: int | None = None
    store: str | None = None
    etcd_endpoints: list[str] | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_password_file: str | None = None
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_member_ttl: int | None = None
    controller_record: str | None = None
    cpu_scheduling: str | None = None
    health_interval: float | None = None
    health_timeout: float | None = None


class _TomlTracing(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[tracing]`` of aether.toml: ``exporter = "otlp"`` (or "off") and its ``endpoint``."""

    exporter: str | None = None
    endpoint: str | None = None


def load_toml(path: str | Path) -> dict[str, object]:
    """Read an `aether.toml` and return the settings it gives (only those present).

    Peers may be `["node-2=127.0.0.1:7001", ...]` or `[{id = "...", address = "..."}]`. A
    ``[tracing]`` table (``exporter``, ``endpoint``) sets `tracing` and `otlp_endpoint`.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    if (found := number_problem(raw)) is not None:
        where, number, problem = found
        raise ConfigError(f"{p}: {format_path(where)} = {number!r} {problem}")
    tracing_table = raw.get("tracing")
    section = raw.get("node", raw)
    if section is raw and isinstance(tracing_table, dict):
        section = {k: v for k, v in raw.items() if k != "tracing"}
    if "node" in raw and (stray := [k for k in raw if k not in ("node", "tracing")]):
        # with a [node] table, a key above it or a table of its own (`[[peers]]` after `[node]` is
        # one) was silently ignored: the node started without the setting
        named = ", ".join(
            f"[[{k}]]" if isinstance(raw[k], list) and raw[k] and all(isinstance(v, dict) for v in raw[k])
            else f"[{k}]" if isinstance(raw[k], dict) else f"`{k}`"
            for k in stray
        )
        raise ConfigError(
            f"{p}: {named} outside the [node] table: a file with a [node] table takes its settings from "
            "it (and from [tracing]); move them into [node] (a key above [node] goes below it, "
            "[[peers]] becomes [[node.peers]])"
        )
    table = " [node]" if "node" in raw else ""
    try:
        parsed = msgspec.convert(section, _TomlNode)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{p}{table}: {e}") from None
    try:
        tracing = msgspec.convert(tracing_table, _TomlTracing) if isinstance(tracing_table, dict) else None
    except msgspec.ValidationError as e:
        raise ConfigError(f"{p} [tracing]: {e}") from None
    out: dict[str, object] = {
        f: getattr(parsed, f) for f in parsed.__struct_fields__ if getattr(parsed, f) is not None
    }
    if parsed.peers is not None:
        peers: list[PeerSpec] = []
        for item in parsed.peers:
            if isinstance(item, str):
                peers.append(PeerSpec.parse(item))
            else:
                peers.append(PeerSpec(check_node_id(item.id), Address.parse(item.address)))
        out["peers"] = peers
    if tracing is not None:
        if tracing.exporter is not None:
            out["tracing"] = tracing.exporter
        if tracing.endpoint is not None:
            out["otlp_endpoint"] = tracing.endpoint
    return out
