"""`aether logs`: the recent log records of the cluster's nodes, merged by time, or followed live.

Each node keeps its last records in memory (`GET /api/v1/logs`, `GET /api/v1/logs/stream`;
docs/operations.md, *Logs*). This command asks the nodes named (node ids or management addresses
``HOST:PORT``), by default every member of the cluster, and prints their records merged by time,
each line naming its node and request id; `--follow` streams them from every node at once.

A node id is turned into the management address that node published (`GET /api/v1/nodes`,
``management``; every node records it under `nodes/{id}` when it starts), else through the local
cluster's ``cluster.json``, else the member's cluster host with the management port of the
`--connect` node (a node that has not published yet, e.g. one of an older version).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import click

from aether.cli.common import (
    DEFAULT_CLUSTER_DIR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Settings,
    call,
    fail,
    json_option,
    make_client,
)
from aether.core.errors import ConfigError

if TYPE_CHECKING:
    from aether.cli.client import ManagementClient

__all__ = ["follow_streams", "format_entry", "logs", "merge", "resolve_targets"]

READ_TIMEOUT = 45.0  # three missed keepalives: the stream is lost
WINDOW = 0.3  # seconds the follower gathers records before printing them in time order


def _is_address(text: str) -> bool:
    from aether.cli.client import parse_target

    try:
        parse_target(text)
    except ConfigError:
        return False
    return True


def resolve_targets(
    settings: Settings, names: Sequence[str], cluster_dir: str = DEFAULT_CLUSTER_DIR
) -> list[tuple[str, str]]:
    """(label, management address) of each node to ask: `names` (node ids or ``HOST:PORT``), or
    every member of the cluster of the `--connect` node when `names` is empty."""
    if names and all(_is_address(n) for n in names):
        return [(n, n) for n in names]
    from aether.cli.client import parse_target
    from aether.cli.local_cluster import load_record
    from aether.core.types import Address

    known: dict[str, str] = {}
    try:
        record = load_record(cluster_dir)
    except Exception:
        record = None
    if record is not None:
        scheme = "https://" if record.tls_ca else ""
        known = {n.id: f"{scheme}{record.host}:{n.management_port}" for n in record.nodes}
        if record.tls_ca and settings.ca is None:
            settings.ca = record.tls_ca
    client = make_client(settings)
    status: Any = call(client, lambda c: c.get_json("/api/v1/status"))
    members: Any = call(client, lambda c: c.get_json("/api/v1/nodes"))
    given_scheme, _ = parse_target(settings.connect)
    prefix = f"{given_scheme}://" if given_scheme else ""
    own_id, own_port = status.get("node_id"), status.get("management_port")
    addresses: dict[str, str] = {}
    for m in members if isinstance(members, list) else []:
        mid = m.get("id")
        if mid == own_id:
            addresses[mid] = settings.connect
        elif m.get("management"):  # the address the node published (`nodes/{id}`)
            addresses[mid] = m["management"]
        elif mid in known:
            addresses[mid] = known[mid]
        elif own_port:
            try:
                host = Address.parse(m.get("address", "")).host
            except ConfigError:
                continue
            addresses[mid] = f"{prefix}{host}:{own_port}"
    if not names:
        return sorted(addresses.items())
    out = []
    for n in names:
        if n in addresses:
            out.append((n, addresses[n]))
        elif _is_address(n):
            out.append((n, n))
        else:
            fail(
                f"no node {n!r} in the cluster of {client.target}",
                EXIT_USAGE,
                hint=f"Its members: {', '.join(sorted(addresses)) or 'none known'}; or name a node by its "
                "management address HOST:PORT.",
            )
    return out


def merge(pages: Iterable[Iterable[dict[str, Any]]], limit: int | None = None) -> list[dict[str, Any]]:
    """The entries of several nodes in one list, by time (then node and sequence number); the
    newest `limit`."""
    out = sorted(
        (e for page in pages for e in page),
        key=lambda e: (e.get("time", 0.0), e.get("node") or "", e.get("seq", 0)),
    )
    if limit is not None and len(out) > limit:
        out = out[len(out) - limit :]
    return out


def format_entry(e: dict[str, Any]) -> str:
    """One line of `aether logs`: local time, node, level, request id, slice#instance, logger: message
    (and the traceback on the lines after it)."""
    t = float(e.get("time") or 0.0)
    stamp = datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") + f".{int(t * 1000) % 1000:03d}"
    parts = [stamp, str(e.get("node") or "-"), f"{e.get('level', ''):<7}"]
    parts.append(f"[{e['request_id']}]" if e.get("request_id") else "[-]")
    if e.get("trace_id"):
        parts.append(f"trace={e['trace_id']}")
    if e.get("slice"):
        inst = f"#{e['instance']}" if e.get("instance") is not None else ""
        parts.append(f"{e['slice']}{inst}")
    line = " ".join(parts) + f" {e.get('logger', '')}: {e.get('message', '')}"
    if e.get("exc"):
        line += "\n" + str(e["exc"])
    return line


def _params(since: str | None, slice_: str | None, level: str | None) -> dict[str, str]:
    out = {"since": since, "slice": slice_, "level": level}
    return {k: v for k, v in out.items() if v}


def follow_streams(
    clients: Sequence[ManagementClient],
    params: dict[str, str],
    emit: Callable[[dict[str, Any]], None],
    notice: Callable[[str], None],
    stop: threading.Event,
    *,
    window: float = WINDOW,
) -> int:
    """Stream the log records of every client's node until `stop` is set or every stream ended:
    `emit` each record (gathered for `window` seconds, then in time order), `notice` what happens
    to the streams. Returns how many streams were open when it returned."""
    import msgspec

    from aether.cli.client import ApiError, ApiUnreachable, StreamLost

    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    path = "/api/v1/logs/stream" + ("?" + urlencode(params) if params else "")

    def read(client: ManagementClient) -> None:
        try:
            for ev in client.events(READ_TIMEOUT, path=path):
                if stop.is_set():
                    return
                try:
                    data = msgspec.json.decode(ev.data)
                except msgspec.DecodeError:
                    continue
                inbox.put((ev.event, data))
        except (ApiUnreachable, ApiError, StreamLost) as e:
            inbox.put(("lost", {"target": client.target, "error": str(e)}))
            return
        inbox.put(("lost", {"target": client.target, "error": "the stream ended"}))

    open_streams = len(clients)
    for c in clients:
        threading.Thread(target=read, args=(c,), name=f"aether-logs-{c.target}", daemon=True).start()
    pending: list[dict[str, Any]] = []
    flush_at: float | None = None
    while not stop.is_set() and open_streams > 0:
        try:
            kind, data = inbox.get(timeout=0.05)
        except queue.Empty:
            kind, data = "", None
        if kind == "log" and isinstance(data, dict):
            pending.append(data)
            if flush_at is None:
                flush_at = time.monotonic() + window
        elif kind == "hello" and isinstance(data, dict):
            notice(f"following the log of {data.get('node_id')} (Ctrl-C stops)")
        elif kind == "gap" and isinstance(data, dict):
            notice(f"{data.get('missed')} record(s) left a node's buffer before they could be sent")
        elif kind == "lost" and isinstance(data, dict):
            open_streams -= 1
            notice(f"lost the log stream of {data.get('target')}: {data.get('error')}")
        if pending and (flush_at is None or time.monotonic() >= flush_at or open_streams == 0):
            for e in merge([pending]):
                emit(e)
            pending, flush_at = [], None
    for e in merge([pending]):
        emit(e)
    return open_streams


@click.command()
@click.argument("nodes", nargs=-1, metavar="[NODE]...")
@click.option(
    "--slice",
    "slice_",
    metavar="NAME",
    help="Only records of this slice: group:artifact[:version] or the artifact name.",
)
@click.option(
    "--since",
    metavar="TIME",
    help="Only records from this time on: a duration (90s, 5m, 2h, 1d), "
    "an epoch timestamp or an ISO 8601 time [default: all the nodes keep].",
)
@click.option(
    "--level",
    type=click.Choice(["debug", "info", "warning", "error", "critical"]),
    help="Only records at this level or above.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="At most the newest N records (per node, and in all).",
)
@click.option("-f", "--follow", is_flag=True, help="Stream new records from every node until Ctrl-C.")
@click.option(
    "--dir",
    "cluster_dir",
    default=DEFAULT_CLUSTER_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="A local cluster's directory: its cluster.json names the management address of each node.",
)
@json_option
@click.pass_obj
def logs(
    settings: Settings,
    nodes: tuple[str, ...],
    slice_: str | None,
    since: str | None,
    level: str | None,
    limit: int,
    follow: bool,
    cluster_dir: str,
    as_json: bool,
) -> None:
    """Show the recent log records of the cluster's nodes, merged by time.

    NODE is a node id or a management address HOST:PORT; default: every member of the cluster
    of the --connect node. Each line names its node and the request id (`[-]` when none), and the
    slice and instance that logged it. Each node keeps its last 5000 records (`log_buffer`).

    \b
    Examples:
      aether logs --since 5m
      aether logs node-2 --since 5m --level warning
      aether logs --slice org.demo:place-order --follow
      aether logs 127.0.0.1:9001 --json
    """
    import msgspec

    from aether.cli.client import ApiError, ApiUnreachable
    from aether.core.logs import parse_since

    as_json = settings.json or as_json
    if since:
        try:
            parse_since(since)
        except ValueError as e:
            fail(f"--since: {e}", EXIT_USAGE)
    targets = resolve_targets(settings, nodes, cluster_dir)
    if not targets:
        fail("no node to ask", EXIT_USAGE, hint="Name one: `aether logs NODE` (a node id or HOST:PORT).")
    clients = [make_client(settings, address) for _, address in targets]
    params = _params(since, slice_, level)

    def emit(e: dict[str, Any]) -> None:
        click.echo(msgspec.json.encode(e).decode() if as_json else format_entry(e))

    if follow:
        stop = threading.Event()
        try:
            left = follow_streams(clients, params, emit, lambda m: click.echo(m, err=True), stop)
        except KeyboardInterrupt:
            stop.set()
            raise click.exceptions.Exit(EXIT_OK) from None
        if left == 0:
            fail(
                "every log stream was lost",
                EXIT_UNREACHABLE,
                hint="The nodes may have stopped; check them with `aether health`, then run this again.",
            )
        return
    pages: list[list[dict[str, Any]]] = []
    failed = 0
    for (label, _), client in zip(targets, clients, strict=True):
        try:
            page: Any = client.get_json("/api/v1/logs", {**params, "limit": str(limit)})
        except (ApiUnreachable, ApiError) as err:
            failed += 1
            click.secho(f"warning: {label}: {err}", fg="yellow", err=True)
            continue
        entries = page.get("entries", []) if isinstance(page, dict) else []
        answered = page.get("node_id") if isinstance(page, dict) else None
        if not _is_address(label) and answered != label:  # a guessed address, another node there
            click.secho(
                f"warning: asked {label} at {client.target}, but {answered} answered; name {label} by its "
                "management address HOST:PORT",
                fg="yellow",
                err=True,
            )
        for entry in entries:
            entry.setdefault("node", page.get("node_id"))
        pages.append(entries)
    for entry in merge(pages, limit):
        emit(entry)
    if failed == len(targets):
        fail("no node answered", EXIT_UNREACHABLE)
