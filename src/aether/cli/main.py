"""The `aether` command (click group `main`).

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or configuration, 3 cannot connect.

Start-up time matters: only click and `aether.core` are imported at module level; the HTTP
client, rich, psutil and the node runtime are imported inside the commands that need them.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from aether import __version__
from aether.cli import controller as controller_commands
from aether.cli import deploy as deploy_commands
from aether.cli import examples
from aether.cli import forge as forge_commands
from aether.cli import logs as log_commands
from aether.cli import maps as map_commands
from aether.cli import metrics as metrics_commands
from aether.cli import ops as ops_commands
from aether.cli import rollout as rollout_commands
from aether.cli import security as security_commands
from aether.cli import tls as cert_commands
from aether.cli.artifact import artifact
from aether.cli.common import (
    DEFAULT_CLUSTER_DIR,
    DEFAULT_CONNECT,
    DEFAULT_TIMEOUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    MIN_NODE_KEY_CHARS,
    OUTPUT_FORMATS,
    FiniteFloatRange,
    Settings,
    call,
    echo_json,
    echo_json_bytes,
    fail,
    json_option,
    make_client,
    resolve_api_key,
    watch_option,
    watching,
)
from aether.core.errors import ConfigError

if TYPE_CHECKING:
    from aether.cli.local_cluster import ClusterRecord, NodeObservation
    from aether.core.config import NodeConfig
    from aether.core.types import PeerSpec

_T = TypeVar("_T")

# -- the group ----------------------------------------------------------------------------------------


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--connect",
    envvar="AETHER_CONNECT",
    default=DEFAULT_CONNECT,
    show_default=True,
    metavar="HOST:PORT",
    help="Management API of the node to talk to (env AETHER_CONNECT); https://HOST:PORT for HTTPS.",
)
@click.option(
    "--ca",
    envvar="AETHER_CA",
    default=None,
    metavar="FILE",
    help="CA certificate (PEM) that verifies the node's HTTPS certificate, besides the system trust "
    "store (env AETHER_CA).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON instead of tables (for scripts and agents); -o json."
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(OUTPUT_FORMATS),
    default=None,
    help="Output format of every command: table (default), wide (tables never truncated), json, yaml.",
)
@click.option(
    "--api-key",
    envvar="AETHER_API_KEY",
    default=None,
    metavar="KEY",
    help="API key of the management API (env AETHER_API_KEY; the flag form shows it in ps).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Read the API key from FILE.",
)
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0.1),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for a node's answer (above the node's own 5-10 s deadlines, so its "
    "answer arrives).",
)
@click.version_option(__version__, "-V", "--version", prog_name="aether")
@click.pass_context
def main(
    ctx: click.Context,
    connect: str,
    ca: str | None,
    as_json: bool,
    output: str | None,
    api_key: str | None,
    api_key_file: str | None,
    timeout: float,
) -> None:
    """Aether: a distributed runtime for plain-Python slices.

    Talks to a node over its management API (--connect), runs a node (`aether node`) or a local
    multi-process cluster (`aether cluster start|status|stop|demo`). Without a command on a
    terminal it opens an interactive shell (history, completion, `help`).

    Exit codes: 0 ok, 1 operation failed, 2 bad usage or configuration, 3 cannot connect.
    """
    in_repl = ctx.obj is not None  # the REPL runs lines with obj=its Settings
    # (the REPL passes its key back as --api-key on every line, in-process: no warning then)
    api_key = resolve_api_key(ctx, "api_key", api_key, api_key_file, warn=not in_repl)
    if ca and not Path(ca).is_file():
        fail(f"--ca {ca}: no such file (the CA certificate that issued the node's HTTPS certificate)",
             EXIT_USAGE)
    output = output or ("json" if as_json else "table")
    ctx.obj = Settings(
        connect=connect, json=output in ("json", "yaml"), api_key=api_key, timeout=timeout, ca=ca or None,
        output=output,
    )
    if ctx.invoked_subcommand is None:
        if not in_repl and sys.stdin.isatty() and sys.stdout.isatty():
            from aether.cli.repl import run_repl

            ctx.exit(run_repl(ctx.obj, main))
        click.echo(ctx.get_help())
        ctx.exit(EXIT_OK)


# -- status and kv -----------------------------------------------------------------------------------


@main.command()
@json_option
@watch_option
@click.pass_obj
def status(settings: Settings, as_json: bool, watch: bool) -> None:
    """Show the cluster as one node sees it: members, their state, the leader and quorum."""
    settings.json = settings.json or as_json
    watching(settings, watch, lambda: _show_status(settings))


def _show_status(settings: Settings) -> None:
    client = make_client(settings)
    body = call(client, lambda c: c.get_raw("/api/v1/status"))
    if settings.json:
        echo_json_bytes(body)
        return
    from aether.cli import render
    from aether.core.status import NodeStatus

    st = _decode_answer(client.target, "/api/v1/status", body, NodeStatus)
    out = render.console()
    out.print(render.node_status_table(st, client.target))
    out.print(render.node_status_summary(st))


def _decode_answer(target: str, path: str, body: bytes, into: type[_T]) -> _T:
    """The node's JSON answer to `path` as `into`; fails (exit 1) naming the node and path if it is not."""
    import msgspec

    try:
        return msgspec.json.decode(body, type=into)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        fail(f"{target}: unexpected answer to {path}: {e}")


@main.group()
def kv() -> None:
    """Read the replicated key-value store (diagnostics)."""


@kv.command("list")
@click.argument("prefix", required=False, default="", callback=map_commands._utf8)
@json_option
@click.pass_obj
def kv_list(settings: Settings, prefix: str, as_json: bool) -> None:
    """List the keys starting with PREFIX (all keys without one) and their values."""
    client = make_client(settings)
    body = call(client, lambda c: c.get_raw("/api/v1/kv", {"prefix": prefix}))
    if settings.json or as_json:
        echo_json_bytes(body)
        return
    from aether.api.types import KVListing
    from aether.cli import render

    listing = _decode_answer(client.target, "/api/v1/kv", body, KVListing)
    out = render.console()
    if not listing.entries:
        what = f"with prefix {prefix!r}" if prefix else "in the store"
        out.print(f"No keys {what}.")
        return
    out.print(render.kv_table(listing.prefix, listing.entries))


# -- completion ---------------------------------------------------------------------------------------


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script of `aether` for SHELL (click's shell completion):
    commands, options and choices complete on Tab."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the three choices are click's built-in shells
    root = ctx.find_root().command
    click.echo(cls(root, {}, "aether", "_AETHER_COMPLETE").source())


# -- node ---------------------------------------------------------------------------------------------


def parse_peers(text: str) -> list[PeerSpec]:
    """Parse `--peers`: comma-separated `ID=HOST:PORT`, every member including this node."""
    from aether.core.types import PeerSpec

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("--peers is empty: give every member as ID=HOST:PORT, separated by commas")
    return [PeerSpec.parse(p) for p in parts]


_SIZE_UNITS = {
    "": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
}  # fmt: skip


def parse_size(value: str, what: str) -> int:
    """``"268435456"``, ``"256MiB"``, ``"1 GiB"``, ``"500MB"`` -> bytes; else a click error naming `what`."""
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("kmgib")
    unit = text[len(number) :]
    if not number.isdigit() or unit not in _SIZE_UNITS:
        raise click.BadParameter(f"{value!r} is not a size (use bytes or e.g. 256MiB, 1GiB)", param_hint=what)
    return int(number) * _SIZE_UNITS[unit]


def build_node_config(config_file: str | None, flags: dict[str, Any]) -> NodeConfig:
    """Merge defaults, the TOML file and flags (flags win) into a validated NodeConfig.

    `flags` maps NodeConfig field names to flag values (None = not given; `peers` as text).
    Without `peers` the node forms a cluster of one; without `cluster_port` it takes the port of
    its own entry in `peers`.
    """
    from aether.core.config import NodeConfig, load_toml
    from aether.core.types import CLUSTER_PORT_BASE, Address, PeerSpec, default_node_id

    settings: dict[str, Any] = dict(load_toml(config_file)) if config_file else {}
    given = {k: v for k, v in flags.items() if v is not None}
    if "join" in given:
        if "peers" in given:
            raise ConfigError(
                "--join and --peers both given: a node that joins gets the member set from the member "
                "it joins through; give only --join"
            )
        # --join stands instead of the peers an aether.toml copied from a member lists: a flag
        # overrides the file (they made the node refuse to start: 'not among the peers')
        settings.pop("peers", None)
    if "peers" in given:
        given["peers"] = parse_peers(given["peers"])
    settings.update(given)
    node_id = settings.setdefault("node_id", default_node_id(1))
    peers: list[PeerSpec] | None = settings.get("peers")
    if peers is None:
        port = settings.setdefault("cluster_port", CLUSTER_PORT_BASE)
        settings["peers"] = [PeerSpec(node_id, Address(settings.get("host", "127.0.0.1"), port))]
    else:
        own = next((p for p in peers if p.id == node_id), None)
        if own is not None:
            port = settings.setdefault("cluster_port", own.address.port)
            if port != own.address.port:
                raise ConfigError(
                    f"cluster port {port} differs from the port of {node_id} in peers ({own.address}): "
                    "make them equal"
                )
    return NodeConfig(**settings).validate()


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="aether.toml with node settings; flags override it.",
)
@click.option("--id", "node_id", metavar="ID", help="This node's id [default: node-1].")
@click.option(
    "--peers",
    metavar="ID=HOST:PORT,...",
    help="Every cluster member with its cluster address, this node included [default: only this node].",
)
@click.option(
    "--join",
    metavar="HOST:PORT",
    help="Join a running cluster through this member's cluster address: get the member set from it "
    "and catch up, then wait for `aether cluster add-node` (instead of --peers).",
)
@click.option("--host", metavar="HOST", help="Interface to listen on [default: 127.0.0.1].")
@click.option(
    "--cluster-port",
    type=int,
    metavar="PORT",
    help="Node-to-node port [default: own port in --peers, or 7000].",
)
@click.option("--management-port", type=int, metavar="PORT", help="Management API port [default: 9000].")
@click.option("--http-port", type=int, metavar="PORT", help="HTTP router port [default: 8080].")
@click.option("--data-dir", metavar="DIR", help="Where the node keeps its state [default: .aether/data].")
@click.option("--cluster-name", metavar="NAME", help="Name of the cluster [default: aether].")
@click.option(
    "--fsync",
    type=click.Choice(["none", "snapshot", "always"]),
    help=(
        "When to fsync local state: always (durable, group commit), snapshot (snapshots only: "
        "survives kill -9, not a power cut), none (tests, throwaway clusters) [default: always]."
    ),
)
@click.option(
    "--api-key",
    "node_api_key",
    envvar="AETHER_API_KEY",
    metavar="KEY",
    help="Require this key on the management API (env AETHER_API_KEY); needed beyond loopback. "
    "The flag form shows it in ps: prefer --api-key-file or the environment.",
)
@click.option(
    "--api-key-file",
    "node_api_key_file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read the management API key from FILE (the bootstrap admin key, at least 16 characters).",
)
@click.option(
    "--http-idle-timeout",
    type=FiniteFloatRange(min=0.1, max=3600),
    metavar="SECONDS",
    help="Close a management API or HTTP router connection that has not sent a complete request "
    "head this long after connecting (or after its last answer) [default: 15].",
)
@click.option(
    "--cluster-secret-file",
    metavar="FILE",
    envvar="AETHER_CLUSTER_SECRET_FILE",
    help=(
        "File holding the cluster secret, the same on every node (env AETHER_CLUSTER_SECRET_FILE; or "
        "the secret itself in env AETHER_CLUSTER_SECRET); needed beyond loopback. See "
        "docs/cluster-security.md."
    ),
)
@click.option("--tls-cert", metavar="FILE", help="This node's certificate (`aether cert issue NODE_ID`); "
              "with --tls-key and --tls-ca: mutual TLS between nodes. See docs/cluster-security.md.")
@click.option("--tls-key", metavar="FILE", help="The key of --tls-cert.")
@click.option("--tls-ca", metavar="FILE", help="The cluster CA certificate (`aether cert init`).")
@click.option(
    "--https",
    "https",
    is_flag=True,
    default=None,
    help="Serve the management API and the HTTP router over HTTPS, with --http-tls-cert/--http-tls-key, "
    "or else the node's --tls-cert/--tls-key.",
)
@click.option("--http-tls-cert", metavar="FILE", help="Server certificate (PEM, may hold its chain) of the "
              "management API and the HTTP router; implies --https.")
@click.option("--http-tls-key", metavar="FILE", help="The key of --http-tls-cert.")
@click.option(
    "--max-buffered-bytes",
    callback=lambda ctx, param, value: None if value is None else parse_size(value, "--max-buffered-bytes"),
    metavar="SIZE",
    help="Bytes the cluster port may hold in unfinished inbound frames, all connections together "
    "(e.g. 256MiB, 1GiB; at least 32MiB) [default: 256MiB]. See docs/cluster-security.md.",
)
@click.option(
    "--repository",
    metavar="DIR",
    envvar="AETHER_REPOSITORY",
    help="Slice artifact repository [default: ~/.aether/repository; env AETHER_REPOSITORY].",
)
@click.option(
    "--metrics-public",
    is_flag=True,
    default=None,
    help="Serve the Prometheus /metrics of the management API without an API key (for scrapers); "
    "/livez and /readyz never need one.",
)
@click.option(
    "--fault-injection",
    is_flag=True,
    default=None,
    help="Accept fault requests on the management API (/api/v1/faults: link latency, loss, "
    "partitions, failing slice instances; admin role), for Aether Forge and tests. Never in production.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(0, 1024),
    metavar="N",
    help="Slice worker processes this node may run at once (slices whose libraries conflict with "
    "what is loaded, or with isolation = \"process\"; docs/slices.md) [default: 8].",
)
@click.option(
    "--controller-record",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="While this node leads, append every observation its controller decides on to FILE (JSON "
    "lines, for `aether controller replay`).",
)
@click.option(
    "--tracing",
    type=click.Choice(["off", "otlp"]),
    help="Record spans of HTTP requests, slice calls and map operations and export them over OTLP "
    "(needs `pip install aether-slices[otel]`; docs/operations.md, Tracing) [default: off].",
)
@click.option(
    "--otlp-endpoint",
    metavar="URL",
    help="Where --tracing otlp sends spans (OTLP/HTTP) [default: http://localhost:4318/v1/traces].",
)
@click.option(
    "--store",
    type=click.Choice(["rabia", "etcd"]),
    help="The cluster state store: rabia (embedded consensus, nothing else to run) or etcd (an etcd "
    "v3 at --etcd-endpoints; membership and leader from etcd leases; docs/operations.md, Running on "
    "etcd) [default: rabia].",
)
@click.option(
    "--etcd-endpoints",
    metavar="URL,...",
    help="With --store etcd: the client URLs of the etcd members, e.g. http://h1:2379,http://h2:2379.",
)
@click.option("--etcd-username", metavar="USER", help="etcd user (with --etcd-password-file or env "
              "AETHER_ETCD_PASSWORD).")
@click.option(
    "--etcd-password-file",
    metavar="FILE",
    envvar="AETHER_ETCD_PASSWORD_FILE",
    help="File holding the etcd user's password (env AETHER_ETCD_PASSWORD_FILE; or the password itself "
    "in env AETHER_ETCD_PASSWORD; never a flag value).",
)
@click.option("--etcd-ca", metavar="FILE", help="CA certificate of etcd's server certificates "
              "(https endpoints).")
@click.option("--etcd-cert", metavar="FILE", help="Client certificate for etcd (--client-cert-auth), "
              "with --etcd-key.")
@click.option("--etcd-key", metavar="FILE", help="The key of --etcd-cert.")
@click.option(
    "--etcd-member-ttl",
    type=click.IntRange(1, 300),
    metavar="SECONDS",
    help="With --store etcd: TTL of this node's member lease; a killed node leaves the member set "
    "(and the leadership) within it [default: 5].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="AETHER_LOG_LEVEL",
    help="Log level (env AETHER_LOG_LEVEL).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="AETHER_LOG_FORMAT",
    help="How the log is written to stderr: text lines, or one JSON object per line with time, level, "
    "logger, message, node, request_id, trace_id, slice, instance (env AETHER_LOG_FORMAT; "
    "log_format in aether.toml) [default: text].",
)
@click.option(
    "--cpu-scheduling",
    type=click.Choice(["batch", "normal"]),
    envvar="AETHER_CPU_SCHEDULING",
    help="How Linux schedules the node's threads: batch (SCHED_BATCH: a woken thread does not take "
    "its waker's core at once; lower tail latency under load) or normal (SCHED_OTHER) (env "
    "AETHER_CPU_SCHEDULING; cpu_scheduling in aether.toml) [default: batch].",
)
def node(
    config_file: str | None,
    node_id: str | None,
    peers: str | None,
    join: str | None,
    host: str | None,
    cluster_port: int | None,
    management_port: int | None,
    http_port: int | None,
    data_dir: str | None,
    cluster_name: str | None,
    fsync: str | None,
    node_api_key: str | None,
    node_api_key_file: str | None,
    http_idle_timeout: float | None,
    cluster_secret_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    https: bool | None,
    http_tls_cert: str | None,
    http_tls_key: str | None,
    max_buffered_bytes: int | None,
    repository: str | None,
    metrics_public: bool | None,
    fault_injection: bool | None,
    max_workers: int | None,
    controller_record: str | None,
    tracing: str | None,
    otlp_endpoint: str | None,
    store: str | None,
    etcd_endpoints: str | None,
    etcd_username: str | None,
    etcd_password_file: str | None,
    etcd_ca: str | None,
    etcd_cert: str | None,
    etcd_key: str | None,
    etcd_member_ttl: int | None,
    log_level: str,
    log_format: str | None,
    cpu_scheduling: str | None,
) -> None:
    """Run one node in the foreground until SIGINT/SIGTERM."""
    ctx = click.get_current_context()
    node_api_key = resolve_api_key(
        ctx, "node_api_key", node_api_key, node_api_key_file, min_file_chars=MIN_NODE_KEY_CHARS
    )
    flags = {
        "node_id": node_id,
        "peers": peers,
        "join": join,
        "host": host,
        "cluster_port": cluster_port,
        "management_port": management_port,
        "http_port": http_port,
        "data_dir": data_dir,
        "cluster_name": cluster_name,
        "fsync": fsync,
        "api_key": node_api_key or None,
        "http_idle_timeout": http_idle_timeout,
        "cluster_secret": os.environ.get("AETHER_CLUSTER_SECRET") or None,
        "cluster_secret_file": cluster_secret_file or None,
        "tls_cert": tls_cert or None,
        "tls_key": tls_key or None,
        "tls_ca": tls_ca or None,
        "https": https or None,
        "http_tls_cert": http_tls_cert or None,
        "http_tls_key": http_tls_key or None,
        "max_buffered_bytes": max_buffered_bytes,
        "repository": repository or None,
        "metrics_public": metrics_public or None,
        "fault_injection": fault_injection or None,
        "max_workers": max_workers,
        "controller_record": controller_record or None,
        "tracing": tracing,
        "otlp_endpoint": otlp_endpoint or None,
        "log_format": log_format,
        "cpu_scheduling": cpu_scheduling,
        "store": store,
        "etcd_endpoints": [u.strip() for u in (etcd_endpoints or "").split(",") if u.strip()] or None,
        "etcd_username": etcd_username or None,
        "etcd_password": os.environ.get("AETHER_ETCD_PASSWORD") or None,
        "etcd_password_file": etcd_password_file or None,
        "etcd_ca": etcd_ca or None,
        "etcd_cert": etcd_cert or None,
        "etcd_key": etcd_key or None,
        "etcd_member_ttl": etcd_member_ttl,
    }
    try:
        config = build_node_config(config_file, flags)
        if config.store == "etcd":
            from aether.node.etcd_wiring import etcd_config

            etcd_config(config)  # fail now if the password file is unreadable
        from aether.transport.auth import load_secret

        load_secret(config.cluster_secret, config.cluster_secret_file)  # fail now if unreadable
        from aether.transport.tls import https_context, tls_files

        tls_files(config)  # fail now if missing or another node's
        https_context(config)  # fail now if unreadable or not a matching certificate and key
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    # The runtime's imports (~500 modules) create a few hundred thousand objects and no garbage:
    # the collections they triggered were ~15% of a node's start-up CPU (~0.15 s of ~1 s). Frozen
    # at once, they are not walked by the collections while the node starts either (once started,
    # the runner freezes what the start built, `aether.node.runner._serve`).
    gc.disable()
    try:
        try:
            from aether.node.runner import run_node
        except ModuleNotFoundError as e:
            if e.name and (e.name == "aether.node" or e.name.startswith("aether.node.")):
                fail("the node runtime (aether.node.runner) is missing from this installation")
            raise
        from aether.api.server import ManagementServer
        from aether.core.logs import configure_logging
    finally:
        gc.enable()
    gc.freeze()
    configure_logging(config.node_id, log_level, config.log_format, sys.stderr)
    try:
        code = run_node(config, management_api=ManagementServer)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    raise click.exceptions.Exit(int(code or 0))


# -- local cluster ------------------------------------------------------------------------------------


@main.group()
def cluster() -> None:
    """Run a local multi-process cluster; one directory holds its pid files, logs and data."""


def dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dir",
        "directory",
        default=DEFAULT_CLUSTER_DIR,
        show_default=True,
        type=click.Path(file_okay=False),
        help="Directory of the local cluster (pid files, logs, data, cluster.json).",
    )(f)


def _stop_timeout_option(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The option `name` of the commands that stop nodes: seconds from SIGTERM to SIGKILL."""
    return click.option(
        name,
        type=FiniteFloatRange(min=0.0),
        default=10.0,
        show_default=True,
        help="Seconds to wait after SIGTERM before SIGKILL.",
    )


def start_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--timeout",
        type=FiniteFloatRange(min=1.0),
        default=30.0,
        show_default=True,
        help="Seconds to wait for quorum.",
    )(f)
    f = click.option(
        "--base-port-offset",
        "port_offset",
        type=int,
        default=0,
        show_default=True,
        envvar="AETHER_PORT_OFFSET",
        metavar="K",
        help="Shift all port bases (7000, 9000, 8080) by K (env AETHER_PORT_OFFSET); a stopped cluster "
        "recorded in DIR keeps its own unless given.",
    )(f)
    f = dir_option(f)
    f = click.option(
        "--tls",
        is_flag=True,
        help="Generate a cluster CA and node certificates in DIR/tls; the nodes use mutual TLS between "
        "them and serve the management API and the HTTP router over HTTPS. A cluster created with "
        "--tls keeps it when started again.",
    )(f)
    return click.option(
        "--nodes",
        "-n",
        type=click.IntRange(1, 99),
        default=3,
        show_default=True,
        help="Number of nodes of a new cluster (odd: 2f+1 nodes tolerate f crashes); a cluster "
        "recorded in DIR keeps its own.",
    )(f)


def _start_cluster(
    settings: Settings,
    nodes: int | None,
    directory: str,
    port_offset: int | None,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    tls: bool = False,
) -> tuple[ClusterRecord, dict[str, Any], list[NodeObservation]]:
    """Start the nodes (environment `env`, default ours; with `tls`, mutual TLS and HTTPS with
    certificates generated in DIR/tls) and wait for quorum with a progress display; exit 1 on
    failure. `nodes` and `port_offset` are None when not given: the recorded cluster's (a new
    one's defaults); a recorded cluster keeps the settings it was created with (`plan_start`)."""
    from aether.cli import local_cluster as lc
    from aether.cli import render

    err = render.console(stderr=True)
    try:
        previous = lc.load_record(directory)
        record = lc.plan_start(directory, nodes, port_offset=port_offset, tls=tls)
        previous_tls = previous is not None and previous.established and previous.tls_ca is not None
        secret_before = record.secret_id
        procs = lc.launch_nodes(directory, record, env=_nodes_env(settings, env))
    except lc.ClusterError as e:
        fail(str(e))
    if previous is not None and not previous.established:
        n, before = len(record.nodes), len(previous.nodes)
        replaced = f" (the data of its {before} nodes is replaced)" if before != n else ""
        click.echo(
            f"The cluster of {directory} never reached quorum (its first start failed): it starts anew "
            f"with {n} node{'s' if n != 1 else ''}{replaced}.",
            err=True,
        )
    logs = Path(directory) / "node-K.log"
    err.print(f"Started {len(record.nodes)} node(s) from {directory} (logs: {logs}).")
    if secret_before is not None and record.secret_id != secret_before:
        click.echo(
            f"The cluster secret changed ({Path(directory) / lc.SECRET_FILE} is new): clients need the "
            "new one.", err=True,
        )  # fmt: skip
    if record.tls_ca and not previous_tls:
        click.echo("TLS is on for this cluster from now on (recorded in cluster.json).", err=True)
    click.echo(f"Artifact repository of the nodes: {lc.nodes_repository(record, env)}", err=True)
    if record.tls_ca:
        click.echo(
            f"TLS: mutual TLS between the nodes, HTTPS on APIs and routers (CA: {record.tls_ca}).", err=True
        )
    obs = _await_quorum(settings, record, procs, directory, timeout)
    lc.mark_established(directory)
    return record, procs, obs


def _nodes_env(settings: Settings, env: dict[str, str] | None) -> dict[str, str]:
    """The environment of local nodes: `env` (default ours) with the CLI's API key as
    AETHER_API_KEY, so a key given with --api-key-file protects the nodes as the variable does."""
    e = dict(os.environ if env is None else env)
    if settings.api_key and not e.get("AETHER_API_KEY"):
        e["AETHER_API_KEY"] = settings.api_key
    return e


def _await_quorum(
    settings: Settings,
    record: ClusterRecord,
    procs: dict[str, Any],
    directory: str,
    timeout: float,
    *,
    stop_on_failure: Sequence[str] | None = None,
) -> list[NodeObservation]:
    """Wait for quorum with a progress display; on failure stop the nodes `stop_on_failure`
    (default all) and exit 1."""
    from aether.cli import local_cluster as lc
    from aether.cli import render

    err = render.console(stderr=True)

    def progress(obs: list[NodeObservation], elapsed: float) -> None:
        answering = sum(1 for o in obs if o.up)
        with_quorum = sum(1 for o in obs if o.status is not None and o.status.quorum)
        spinner.update(
            f"Waiting for quorum: {answering}/{len(obs)} nodes answer, "
            f"{with_quorum}/{len(obs)} report quorum ({elapsed:.1f} s)"
        )

    try:
        with err.status("Waiting for the nodes to answer…") as spinner:
            obs = lc.wait_for_quorum(
                record, timeout=timeout, api_key=settings.api_key, procs=procs, on_poll=progress
            )
    except lc.ClusterStartError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        click.echo(f"Last lines of {e.log_path}:", err=True)
        click.echo("\n".join(f"  | {line}" for line in e.log_tail.splitlines()), err=True)
        _report_stop(lc.stop_cluster(directory, only=stop_on_failure), quiet=True)
        which = "the nodes" if stop_on_failure is None else ", ".join(stop_on_failure)
        click.echo(f"Stopped {which}; their logs are kept in {directory}.", err=True)
        raise click.exceptions.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        click.echo("Interrupted; stopping the nodes…", err=True)
        _report_stop(lc.stop_cluster(directory, only=stop_on_failure), quiet=True)
        raise click.exceptions.Exit(130) from None
    return obs


def _print_cluster(observations: list[NodeObservation], directory: str) -> None:
    from aether.cli import local_cluster as lc
    from aether.cli import render

    out = render.console()
    leader = lc.cluster_leader(observations)
    up = sum(1 for o in observations if o.up)
    out.print(render.cluster_table(observations, leader, directory))
    out.print(
        f"Quorum: {render.yes_no(lc.cluster_quorum(observations))} · Leader: {leader or '[red]none[/red]'}"
        f" · {up}/{len(observations)} nodes up"
    )


def _dir_arg(directory: str) -> str:
    return "" if directory == DEFAULT_CLUSTER_DIR else f" --dir {directory}"


def _connect_arg(record: ClusterRecord, directory: str) -> str:
    """The `--connect ...` (and `--ca ...`) arguments that reach node 1 of `record`; empty when
    the defaults do (port 9000 and, with TLS, the cluster in the default directory)."""
    first = record.nodes[0]
    default_dir = Path(directory).absolute() == Path(DEFAULT_CLUSTER_DIR).absolute()
    if not record.tls_ca:
        return "" if first.management_port == 9000 else f"--connect {record.host}:{first.management_port} "
    if default_dir:
        return "" if first.management_port == 9000 else f"--connect {record.host}:{first.management_port} "
    return f"--connect https://{record.host}:{first.management_port} --ca {record.tls_ca} "


def _connect_hint(record: ClusterRecord, directory: str, *, with_stop: bool = True) -> str:
    connect = _connect_arg(record, directory)
    tips = [
        f"`aether {connect}status`",
        f"`aether {connect}kv list`",
        f"`aether cluster status{_dir_arg(directory)}`",
    ]
    if with_stop:
        tips.append(f"`aether cluster stop{_dir_arg(directory)}`")
    text = "Try: " + ", ".join(tips) + "."
    if record.tls_ca:
        first = record.nodes[0]
        text += (
            f"\nHTTPS: management API https://{record.host}:{first.management_port}, HTTP router "
            f"https://{record.host}:{first.http_port}; e.g. `curl --cacert {record.tls_ca} "
            f"https://{record.host}:{first.management_port}/api/v1/status`."
        )
    return text


def _report_stop(results: list[Any], *, quiet: bool = False) -> bool:
    """Print what stop_cluster did; True if every node is gone."""
    ok = True
    for r in results:
        if r.outcome == "stopped":
            line = f"Stopped {r.id} (pid {r.pid})."
        elif r.outcome == "killed":
            line = f"Killed {r.id} (pid {r.pid}): it did not exit in time after SIGTERM."
        elif r.outcome == "not running":
            line = f"{r.id} (pid {r.pid}) was not running."
        else:
            ok = False
            click.secho(f"error: could not stop {r.id} (pid {r.pid}): {r.detail}", fg="red", err=True)
            continue
        if not quiet:
            click.echo(line)
    return ok


@cluster.command("start")
@start_options
@click.pass_context
def cluster_start(
    ctx: click.Context, nodes: int, tls: bool, directory: str, port_offset: int, timeout: float
) -> None:
    """Start N local node processes and wait until they have quorum and agree on a leader.

    If nodes of the cluster recorded in DIR still run (or answer), start only the missing ones,
    with their recorded ports, data and TLS setting. A stopped cluster starts again with the
    settings it was created with: its node count, TLS, secret, API key and (unless --base-port-offset moves
    it) ports. With --tls the nodes use mutual TLS on the cluster port and HTTPS for the
    management API and the HTTP router (certificates in DIR/tls); once on, TLS stays on.

    The nodes' artifact repository directory is DIR/repository (env AETHER_REPOSITORY overrides),
    a copy of the wheels of ~/.aether/repository made when the cluster is created.
    """
    from aether.cli import local_cluster as lc

    settings: Settings = ctx.obj
    try:
        record = lc.load_record(directory)
        running = lc.running_nodes(directory) if record is not None else []
        missing = lc.missing_nodes(record, api_key=settings.api_key) if record is not None else []
    except lc.ClusterError as e:
        fail(str(e))
    if record is not None and (running or len(missing) < len(record.nodes)):
        given = ctx.get_parameter_source
        src = click.core.ParameterSource.COMMANDLINE
        if given("nodes") == src and nodes != len(record.nodes):
            fail(
                f"the cluster of {directory} has {len(record.nodes)} nodes and some run; "
                f"--nodes {nodes} would change it",
                hint="Drop --nodes: a local cluster keeps the node count it was created with.",
            )
        if port_offset != record.port_offset and given("port_offset") in (
            src, click.core.ParameterSource.ENVIRONMENT
        ):
            listing = ", ".join(f"{nid} (pid {pid})" for nid, pid in running) or "nodes answer"
            fail(
                f"the cluster of {directory} is still running ({listing}) with --base-port-offset "
                f"{record.port_offset}, not {port_offset}",
                hint=f"Stop it first with `aether cluster stop{_dir_arg(directory)}`.",
            )
        if tls and not record.tls_ca:
            fail(
                f"the cluster of {directory} runs without TLS; --tls would change it",
                hint=f"Stop it first with `aether cluster stop{_dir_arg(directory)}`, then start it "
                "with --tls.",
            )
        if not missing:
            obs = lc.observe(record, api_key=settings.api_key, timeout=min(settings.timeout, 2.0))
            click.echo(f"All {len(record.nodes)} nodes of {directory} already run.", err=True)
            _print_cluster(obs, directory)
            return
        record, _, obs = _start_some(settings, directory, missing, timeout)
    else:
        given_nodes, given_offset = _given_start_options(ctx, nodes, port_offset)
        record, _, obs = _start_cluster(settings, given_nodes, directory, given_offset, timeout, tls=tls)
    _print_cluster(obs, directory)
    click.echo(_connect_hint(record, directory))


def _given_start_options(ctx: click.Context, nodes: int, port_offset: int) -> tuple[int | None, int | None]:
    """--nodes and --base-port-offset as given (None for a default: a recorded cluster's own)."""
    given = ctx.get_parameter_source
    explicit = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return (
        nodes if given("nodes") in explicit else None,
        port_offset if given("port_offset") in explicit else None,
    )


def _recorded_cluster(directory: str) -> ClusterRecord:
    """The record of the local cluster in `directory`; fails (exit 1) when it is unreadable or absent."""
    from aether.cli import local_cluster as lc

    try:
        record = lc.load_record(directory)
    except lc.ClusterError as e:
        fail(str(e))
    if record is None:
        fail(f"no local cluster recorded in {directory}", hint="Start one with `aether cluster start`.")
    return record


def _start_some(
    settings: Settings, directory: str, ids: list[str], timeout: float
) -> tuple[ClusterRecord, dict[str, Any], list[NodeObservation]]:
    """Start the recorded nodes `ids` again and wait for quorum (exit 1 on failure)."""
    from aether.cli import local_cluster as lc

    try:
        record, procs = lc.start_nodes(directory, ids, env=_nodes_env(settings, None))
    except lc.ClusterError as e:
        fail(str(e))
    click.echo(f"Started {', '.join(ids)} from {directory}.", err=True)
    obs = _await_quorum(settings, record, procs, directory, timeout, stop_on_failure=ids)
    lc.mark_established(directory)
    return record, procs, obs


@cluster.command("restart")
@click.argument("node_ids", nargs=-1, required=True, metavar="NODE...")
@dir_option
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=1.0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for quorum after the start.",
)
@_stop_timeout_option("--stop-timeout")
@click.pass_obj
def cluster_restart(
    settings: Settings, node_ids: tuple[str, ...], directory: str, timeout: float, stop_timeout: float
) -> None:
    """Restart NODE (e.g. node-3) of the local cluster: stop it if it runs, start it again with
    its recorded ports and data, and wait for quorum."""
    from aether.cli import local_cluster as lc

    record = _recorded_cluster(directory)
    known = [n.id for n in record.nodes]
    unknown = [i for i in node_ids if i not in known]
    if unknown:
        fail(f"no node {', '.join(unknown)} in the cluster of {directory}", EXIT_USAGE,
             hint=f"Its nodes: {', '.join(known)}.")
    ids = list(dict.fromkeys(node_ids))
    try:  # before stopping anything: a node started with another secret could not link
        lc.check_node_credentials(directory, record, _nodes_env(settings, None))
    except lc.ClusterError as e:
        fail(str(e))
    for o in lc.observe(record, api_key=settings.api_key, timeout=min(settings.timeout, 2.0)):
        if o.node.id in ids and o.up and not o.running:
            fail(
                f"{o.node.id} answers on port {o.node.management_port} but was not started from "
                f"{directory}, so it cannot be stopped from here",
                hint="Stop that process yourself (Ctrl-C where it runs), then run this again.",
            )
    for r in lc.stop_cluster(directory, timeout=stop_timeout, only=ids):
        if r.outcome == "failed":
            fail(f"could not stop {r.id} (pid {r.pid}): {r.detail}")
        if r.outcome in ("stopped", "killed"):
            click.echo(f"Stopped {r.id} (pid {r.pid}).", err=True)
    record, _, obs = _start_some(settings, directory, ids, timeout)
    _print_cluster(obs, directory)


@cluster.command("stop")
@dir_option
@_stop_timeout_option("--timeout")
def cluster_stop(directory: str, timeout: float) -> None:
    """Stop the node processes started from DIR (SIGTERM, then SIGKILL after the timeout)."""
    from aether.cli import local_cluster as lc

    try:
        results = lc.stop_cluster(directory, timeout=timeout)
    except lc.ClusterError as e:
        fail(str(e))
    if not results:
        recorded = lc.load_record(directory) is not None
        click.echo(f"No node of {directory} runs; nothing to stop." if recorded
                   else f"No nodes recorded in {directory}; nothing to stop.")  # fmt: skip
        return
    if not _report_stop(results):
        raise click.exceptions.Exit(EXIT_FAILED)


@cluster.command("status")
@dir_option
@json_option
@click.pass_obj
def cluster_status(settings: Settings, directory: str, as_json: bool) -> None:
    """Show each local node up or down, the leader and quorum (exit 1 without quorum)."""
    from aether.cli import local_cluster as lc

    record = _recorded_cluster(directory)
    obs = lc.observe(record, api_key=settings.api_key, timeout=min(settings.timeout, 2.0))
    leader = lc.cluster_leader(obs)
    if settings.json or as_json:
        echo_json(
            [
                {
                    "id": o.node.id,
                    "pid": o.node.pid if o.running else None,
                    "up": o.up,
                    "leader": leader is not None and o.node.id == leader,
                    "cluster_port": o.node.cluster_port,
                    "management_port": o.node.management_port,
                    "http_port": o.node.http_port,
                }
                for o in obs
            ]
        )
    else:
        _print_cluster(obs, directory)
    if not lc.cluster_quorum(obs):
        # what to do next, on stderr (the JSON on stdout stays a document)
        down = [o.node.id for o in obs if not o.up]
        start = f"`aether cluster start{_dir_arg(directory)}`"
        if len(down) == len(obs):
            click.echo(f"No node of {directory} answers: start the cluster with {start}.", err=True)
        elif down:
            click.echo(
                f"No quorum: {', '.join(down)} down; {start} starts the missing nodes "
                f"(their logs: {Path(directory) / 'node-K.log'}).",
                err=True,
            )
        raise click.exceptions.Exit(EXIT_FAILED)


@cluster.command("add-node")
@click.argument("node_id", metavar="ID")
@click.argument("address", metavar="HOST:PORT")
@json_option
@click.pass_obj
def cluster_add_node(settings: Settings, node_id: str, address: str, as_json: bool) -> None:
    """Add node ID (cluster address HOST:PORT) to the member set, through the log.

    Start the node first with `aether node --id ID --join MEMBER_HOST:PORT`; the member asked
    (--url) dials it, waits until it has caught up, then commits the change. Refused (exit 1,
    with the reason) when it is unreachable, not caught up, already a member, or another change
    is pending.
    """
    client = make_client(settings)
    ans = call(client, lambda c: c.send_json(
        "POST", "/api/v1/cluster/nodes", {"id": node_id, "address": address}))
    if settings.json or as_json:
        echo_json(ans)
        return
    _echo_member_change(node_id, "added", ans)


@cluster.command("remove-node")
@click.argument("node_id", metavar="ID")
@json_option
@click.pass_obj
def cluster_remove_node(settings: Settings, node_id: str, as_json: bool) -> None:
    """Remove node ID from the member set, through the log.

    Refused (exit 1, with the reason) when it is not a member, is the last one, another change is
    pending, or the remaining members this node reaches could not make progress. The removed node
    keeps running as a non-member until you stop it.
    """
    client = make_client(settings)
    ans = call(client, lambda c: c.send_json("DELETE", f"/api/v1/cluster/nodes/{node_id}"))
    if settings.json or as_json:
        echo_json(ans)
        return
    _echo_member_change(node_id, "removed", ans)


def _echo_member_change(node_id: str, change: str, ans: object) -> None:
    """One line for a committed member change (the node's answer to add-node / remove-node)."""
    assert isinstance(ans, dict)
    click.echo(f"{node_id} {change}: members {', '.join(ans['members'])} (epoch {ans['epoch']}, "
               f"from slot {ans['from_slot']})")


@cluster.command("demo")
@start_options
@click.option(
    "--blueprint",
    "blueprint_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Apply this blueprint once the cluster has quorum and wait until every instance is ACTIVE.",
)
@click.option(
    "--wheels",
    "wheels_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Deploy every *.whl in this directory into the nodes' repository before starting.",
)
@click.option(
    "--repository",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Artifact repository of the nodes [default: DIR/repository with --wheels, else "
    "$AETHER_REPOSITORY, else the cluster's own, as for `cluster start`].",
)
@click.option(
    "--wait-timeout",
    type=FiniteFloatRange(min=1.0),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the blueprint's instances.",
)
@click.pass_obj
def cluster_demo(
    settings: Settings,
    nodes: int,
    tls: bool,
    directory: str,
    port_offset: int,
    timeout: float,
    blueprint_file: Path | None,
    wheels_dir: Path | None,
    repository: Path | None,
    wait_timeout: float,
) -> None:
    """Start a local cluster, optionally deploy wheels and apply a blueprint, and keep it running
    until Ctrl-C (SIGINT/SIGTERM), then stop every node.

    `make demo` runs the order demo this way: `--wheels build/examples/order_demo --blueprint
    examples/order_demo/demo-order.blueprint`. Lines of the blueprint starting with `# try:` are
    printed once it runs, with `{http}` (or `{http1}`, `{http2}`, ...) replaced by the HTTP
    address of node 1 (node 2, ...).
    """
    import os
    import signal
    import time

    from aether.cli import local_cluster as lc

    text = None
    if blueprint_file is not None:
        try:
            text = blueprint_file.read_text(encoding="utf-8")
        except OSError as e:
            fail(f"cannot read blueprint {blueprint_file}: {e.strerror or e}", EXIT_USAGE)
        except UnicodeDecodeError:
            fail(f"blueprint {blueprint_file} is not UTF-8 text", EXIT_USAGE)
    if repository is None and wheels_dir is not None:
        repository = Path(directory) / "repository"
    env: dict[str, str] | None = None
    if repository is not None:
        env = dict(os.environ, AETHER_REPOSITORY=str(repository.resolve()))
    if wheels_dir is not None:
        assert repository is not None
        _deploy_wheels(wheels_dir, repository)

    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # While starting, SIGTERM acts like Ctrl-C: _start_cluster stops the nodes it started.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        given_nodes, given_offset = _given_start_options(click.get_current_context(), nodes, port_offset)
        record, procs, obs = _start_cluster(
            settings, given_nodes, directory, given_offset, timeout, env=env, tls=tls
        )
        _print_cluster(obs, directory)
        if text is not None:
            assert blueprint_file is not None
            try:
                applied = _demo_apply(settings, record, text, str(blueprint_file), wait_timeout)
            except (click.exceptions.Exit, KeyboardInterrupt) as e:
                click.echo("Stopping the cluster…", err=True)
                _report_stop(lc.stop_cluster(directory), quiet=True)
                raise click.exceptions.Exit(
                    e.exit_code if isinstance(e, click.exceptions.Exit) else 130
                ) from None
            _print_demo_guide(settings, record, directory, applied, text)
        else:
            click.echo(_connect_hint(record, directory, with_stop=False))
        for s in old:
            signal.signal(s, on_signal)
        click.echo("The cluster runs until you press Ctrl-C.")
        reported: set[str] = set()
        while not stop_requested:
            for nid, p in procs.items():
                code = p.poll()
                if code is not None and nid not in reported:
                    reported.add(nid)
                    log = next(n.log for n in record.nodes if n.id == nid)
                    click.secho(f"warning: {nid} exited with code {code}; see {log}", fg="yellow", err=True)
            time.sleep(0.2)
        click.echo("\nStopping the cluster…")
        results = lc.stop_cluster(directory)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if not _report_stop(results):
        raise click.exceptions.Exit(EXIT_FAILED)


def _deploy_wheels(wheels_dir: Path, repository: Path) -> None:
    """Deploy every wheel in `wheels_dir` into `repository` (slices by coordinates, libraries to
    `_libs/`); exit 2 if there are none, 1 if one is invalid."""
    from aether.core.errors import BadRequest
    from aether.slices.repository import Repository

    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        fail(
            f"no wheels (*.whl) in {wheels_dir}",
            EXIT_USAGE,
            hint="Build them first, e.g. `python examples/build.py --only order_demo --no-deploy "
            f"--out {wheels_dir}`.",
        )
    repo = Repository(repository)
    deployed = []
    for w in wheels:
        try:
            deployed.append(str(repo.deploy_wheel(w)))
        except (BadRequest, OSError) as e:
            fail(f"cannot deploy {w}: {e}")
    names = [d if "/" not in d else Path(d).name for d in deployed]
    click.echo(f"Deployed {len(wheels)} wheel(s) into {repo.root}: {', '.join(names)}")


def _demo_apply(
    settings: Settings, record: ClusterRecord, text: str, filename: str, wait_timeout: float
) -> dict[str, Any]:
    from aether.cli import local_cluster as lc
    from aether.cli.deploy import apply_blueprint

    first = record.nodes[0]
    client = lc.node_client(record, first, api_key=settings.api_key, timeout=settings.timeout)
    click.echo(f"Applying blueprint {filename} through {first.id}…")
    applied, statuses = apply_blueprint(settings, client, text, filename, wait_timeout=wait_timeout)
    total = sum(s["active"] for s in statuses)
    click.echo(
        f"Blueprint {applied['id']!r} is running: {len(statuses)} slice(s), {total} instance(s), "
        "every instance ACTIVE."
    )
    return applied


def _aether_command() -> str:
    """How the user runs this command: `aether` if that is on PATH, else the path it was run as
    (e.g. `.venv/bin/aether` under `make demo`)."""
    import shutil

    argv0 = Path(sys.argv[0])
    if argv0.name != "aether" or shutil.which("aether") is not None:
        return "aether"
    return str(argv0)


def _blueprint_maps(text: str) -> list[str]:
    """The map names a blueprint's ``[maps.NAME]`` sections declare (none if it does not parse)."""
    import tomllib

    try:
        maps = tomllib.loads(text).get("maps", {})
    except tomllib.TOMLDecodeError:
        return []
    return sorted(maps) if isinstance(maps, dict) else []


def _print_demo_guide(
    settings: Settings, record: ClusterRecord, directory: str, applied: dict[str, Any], text: str
) -> None:
    from aether.cli import local_cluster as lc
    from aether.deploy.blueprint import try_lines

    first = record.nodes[0]
    client = lc.node_client(record, first, api_key=settings.api_key, timeout=settings.timeout)
    routes: list[str] = []
    try:
        listing: Any = client.get_json("/api/v1/kv", {"prefix": "routes/"})
        keys = [str(e["key"]) for e in listing["entries"]]
        routes = sorted(k.removeprefix("routes/").replace(":", " ", 1) for k in keys)
    except Exception:  # the guide is a courtesy; the cluster runs either way
        routes = []
    http = [f"{record.host}:{n.http_port}" for n in record.nodes]
    click.echo("")
    click.echo(f"HTTP on every node: {', '.join(record.scheme + '://' + a for a in http)}")
    if record.tls_ca:
        click.echo(f"HTTPS with the cluster's CA: curl --cacert {record.tls_ca} https://{http[0]}/...")
    if routes:
        click.echo("Routes:")
        for r in routes:
            click.echo(f"  {r}")
    tries = try_lines(text, http)
    if record.tls_ca:  # the blueprint's lines say http://; this cluster serves HTTPS
        tries = [
            t.replace("curl ", f"curl --cacert {record.tls_ca} ").replace("http://", "https://")
            for t in tries
        ]
    if tries:
        click.echo("")
        click.echo("Try it (any node serves any route):")
        for t in tries:
            click.echo(f"  {t}")
    connect = _connect_arg(record, directory)
    aether = _aether_command()
    click.echo("")
    click.echo("Look around:")
    for cmd in (
        f"{aether} {connect}slices",
        f"{aether} {connect}blueprint show {applied['id']}",
        *(f"{aether} {connect}map keys {name}" for name in _blueprint_maps(text)),
        f"{aether} {connect}status",
        f"{aether} cluster status{_dir_arg(directory)}",
    ):
        click.echo(f"  {cmd}")
    click.echo(f"Node logs: {Path(directory) / 'node-K.log'}")


# The commands defined in their own modules (they import aether.cli.common, never this module).
for _command in (
    deploy_commands.slices, deploy_commands.blueprint, deploy_commands.deploy, deploy_commands.scale,
    deploy_commands.undeploy, map_commands.map_group, metrics_commands.metrics, ops_commands.health,
    ops_commands.nodes, ops_commands.events, ops_commands.doctor, security_commands.key,
    security_commands.secret, security_commands.audit, cert_commands.cert, artifact,
    controller_commands.controller, controller_commands.alerts, forge_commands.forge,
    rollout_commands.update, rollout_commands.rollout, log_commands.logs,
):
    main.add_command(_command)
examples.attach(main)  # the "Examples:" section of every command's help

if __name__ == "__main__":
    main(prog_name="aether")
