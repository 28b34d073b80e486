"""`aether metrics`: the cluster's metrics as the connected node has them (`GET /api/v1/metrics`).

Tables of the nodes (CPU, memory, uptime, calls) and of the entry points (calls, rate, errors,
p50/p99 latency, slow calls); `--json` prints the API's document unchanged; `--watch` redraws
every `--interval` seconds until Ctrl-C (with `--json`: one document per line), `--count N` stops
after N rounds.
"""

from __future__ import annotations

import time
from typing import Any

import click

from aether.cli.common import (
    EXIT_OK,
    FiniteFloatRange,
    Settings,
    call,
    echo_json,
    echo_json_line,
    json_option,
    make_client,
)


def _mib(n: Any) -> str:
    return f"{float(n) / (1024 * 1024):.1f}"


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def render_metrics(doc: dict[str, Any]) -> None:
    """Print the nodes and entries tables of a `GET /api/v1/metrics` document."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    con = render.console()
    node = escape(str(doc.get("node_id")))
    if doc.get("source") == "leader":
        age = float(doc.get("snapshot_age") or 0.0)
        where = f"snapshot #{doc.get('snapshot_seq')} of leader {doc.get('leader')}, {age:.1f} s old"
    else:
        where = f"[yellow]local view of {node}[/yellow]: {escape(str(doc.get('note')))}"
    t = doc.get("totals", {})
    con.print(
        f"Metrics via {node} ({where}) · {t.get('nodes', 0)} nodes · "
        f"{t.get('calls', 0)} calls, {t.get('calls_per_s', 0):.1f}/s · {t.get('failures', 0)} failed · "
        f"{t.get('slow', 0)} slow"
    )
    nodes = Table(title="Nodes", title_justify="left")
    for col in ("Node", "CPU %", "Memory MiB", "Loop lag ms", "Uptime", "Calls", "Calls/s", "Last heard"):
        nodes.add_column(col, justify="left" if col == "Node" else "right")
    for n in doc.get("nodes", []):
        nodes.add_row(
            Text(str(n["node_id"])) if n["node_id"] != doc.get("leader") else Text(f"{n['node_id']} ★"),
            f"{n['cpu_percent']:.1f}", _mib(n["rss_bytes"]), f"{n.get('loop_lag_ms', 0.0):.0f}",
            _duration(n["uptime"]), str(n["calls"]), f"{n['calls_per_s']:.1f}", f"{n['age']:.1f}s ago",
        )  # fmt: skip
    con.print(nodes)
    entries = Table(title="Entry points", title_justify="left")
    cols = (
        "Artifact", "Entry", "Calls", "Calls/s", "Failed", "4xx", "Blocked", "p50 ms", "p99 ms", "Slow",
        "Nodes",
    )  # fmt: skip
    for col in cols:
        entries.add_column(col, justify="left" if col in ("Artifact", "Entry", "Nodes") else "right")
    for e in doc.get("entries", []):
        calls = e["calls"]
        errors = f"{e['failures']} ({100 * e['failures'] / calls:.1f}%)" if calls else "0"
        blocked = int(e.get("blocked", 0))
        entries.add_row(
            Text(e["artifact"]), Text(e["entry"]), str(calls), f"{e['calls_per_s']:.1f}",
            f"[red]{errors}[/red]" if e["failures"] else errors, str(e.get("client_errors", 0)),
            f"[red]{blocked}[/red]" if blocked else "0", _num(e["p50_ms"]), _num(e["p99_ms"]),
            f"{e['slow']} / {e['slow_adaptive']}", Text(", ".join(e["nodes"])),
        )  # fmt: skip
    if not doc.get("entries"):
        entries.caption = "no entry point has been called yet"
    con.print(entries)
    if doc.get("instances"):
        inst = Table(title="Instances", title_justify="left")
        for col in ("Artifact", "Node", "#", "In flight", "Queued", "Arrivals/s", "Refused/s", "Exec ms",
                    "Health"):  # fmt: skip
            inst.add_column(col, justify="left" if col in ("Artifact", "Node", "Health") else "right")
        for i in doc["instances"]:
            healthy = i.get("healthy")
            why = escape(str(i.get("health_reason") or ""))
            health = ("-" if healthy is None else "[green]ok[/green]" if healthy else
                      f"[red]failing x{i.get('health_failures', 0)}[/red] {why}")  # fmt: skip
            inst.add_row(
                Text(i["artifact"]), Text(i["node_id"]), str(i["instance"]), str(i["in_flight"]),
                f"[yellow]{i['queued']}[/yellow]" if i["queued"] else "0", f"{i['arrivals_per_s']:.1f}",
                f"[red]{i['rejected_per_s']:.1f}[/red]" if i["rejected_per_s"] else "0",
                _num(i.get("exec_ms"), "{:.1f}"), health,
            )  # fmt: skip
        con.print(inst)
    con.print(
        "[dim]Failed: 5xx (the entry raised or was cancelled); 4xx: the caller's mistakes; Blocked: "
        "calls that blocked their slice's event loop; Slow: above the fixed threshold / above 3x "
        "the running mean.[/dim]"
    )


@click.command()
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option(
    "--interval",
    type=FiniteFloatRange(min=0.2, max=3600),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="With --watch: stop after N rounds.",
)
@json_option
@click.pass_obj
def metrics(settings: Settings, watch: bool, interval: float, count: int | None, as_json: bool) -> None:
    """Cluster metrics: nodes (CPU, memory) and entry points (calls, rate, errors, p50/p99, slow).

    Any node answers from the leader's latest snapshot (once a second). `--json` prints the
    `GET /api/v1/metrics` document.
    """
    from aether.cli import render

    client = make_client(settings)
    rounds = 0
    try:
        while True:
            doc: Any = call(client, lambda c: c.get_json("/api/v1/metrics"))
            if settings.json or as_json:
                if watch:
                    echo_json_line(doc)
                else:
                    echo_json(doc)  # or YAML under -o yaml
            else:
                if watch and rounds:
                    render.console().clear()
                render_metrics(doc)
            rounds += 1
            if not watch or (count is not None and rounds >= count):
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None
