"""`aether controller status|config|decisions` and `aether alerts`: the layer-1 controller
(docs/controller.md) through `GET|PUT /api/v1/controller/...` and `GET /api/v1/alerts`.

Any node answers (the others from the copy the leader syncs to them once a second). Tables for
humans; `--json` prints the API's documents unchanged (`decisions --follow --json`: one decision
per line).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from aether.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Settings,
    call,
    echo_json,
    fail,
    json_option,
    make_client,
    report,
)

FOLLOW_READ_TIMEOUT = 45.0  # three missed keepalives (15 s): the stream is lost


def _clock(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(float(t)))


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    return f"{stamp} ({max(0.0, time.time() - t):.0f} s ago)"


def _target(d: dict[str, Any]) -> str:
    parts = []
    if d.get("artifact"):
        parts.append(str(d["artifact"]))
    if d.get("node"):
        parts.append(f"on {d['node']}")
    if d.get("instance") is not None:
        parts.append(f"#{d['instance']}")
    return " ".join(parts) or "-"


def _change(d: dict[str, Any]) -> str:
    if d.get("from_count") is not None or d.get("to_count") is not None:
        return f"{d.get('from_count', '?')} → {d.get('to_count', '?')}"
    return ""


def _kind(d: dict[str, Any]) -> str:
    kind = str(d.get("kind"))
    color = {
        "scale_up": "green", "scale_down": "cyan", "skip": "dim", "replace": "yellow", "recover": "yellow",
        "restart": "yellow", "re_place": "yellow", "avoid_node": "magenta", "allow_node": "magenta",
        "alert_firing": "red", "alert_resolved": "green",
    }.get(kind)  # fmt: skip
    return f"[{color}]{kind}[/{color}]" if color else kind


def decision_line(d: dict[str, Any]) -> str:
    """One decision as a line of text (for `--follow`)."""
    change = _change(d)
    applied = "" if d.get("applied", True) else " (not applied)"
    return (
        f"{_clock(d.get('time'))}  #{d.get('seq'):<5} {d.get('kind'):<14} {_target(d)}"
        f"{' ' + change if change else ''}  [{d.get('rule')}]{applied}  {d.get('reason')}"
    )


def render_decisions(decisions: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    table = Table(title="Controller decisions", title_justify="left")
    for col in ("Seq", "Time", "Kind", "Target", "Change", "Rule", "Applied", "Reason"):
        table.add_column(col, justify="right" if col == "Seq" else "left", overflow="fold")
    for d in decisions:
        table.add_row(
            str(d.get("seq")), _clock(d.get("time")), _kind(d), Text(_target(d)), _change(d),
            Text(str(d.get("rule"))), "yes" if d.get("applied", True) else "[dim]no[/dim]",
            Text(str(d.get("reason"))),
        )  # fmt: skip
    if not decisions:
        table.caption = "no decision yet"
    render.console().print(table)


def render_status(doc: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    con = render.console()
    where = (
        f"[green]running[/green] on {doc['node_id']}" if doc.get("running")
        else f"leader {doc.get('leader') or 'none'}; {doc['node_id']} shows "
        + (f"the copy synced from {doc['synced_from']} {doc.get('sync_age') or 0:.1f} s ago"
           if doc.get("synced_from") else "no synced copy yet")
    )  # fmt: skip
    dry = " · [yellow]DRY RUN: decisions are recorded, not applied[/yellow]" if doc.get("dry_run") else ""
    con.print(f"Controller: {where} · last decision #{doc.get('last_seq', 0)}{dry}")
    if doc.get("config_error"):
        refused = escape(doc["config_error"])
        con.print(f"[red]the stored config was refused (the previous one stays): {refused}[/red]")
    by = f" by {doc['config_by']}" if doc.get("config_by") else ""
    con.print(f"Config set {_ago(doc.get('config_updated'))}{by}")
    table = Table(title="Autoscaled slices", title_justify="left")
    for col in ("Artifact", "Count", "Active", "Bounds", "Cooldown up/down", "Last decision"):
        table.add_column(col, justify="right" if col in ("Active",) else "left", overflow="fold")
    for a in doc.get("artifacts", []):
        last = a.get("last_decision")
        table.add_row(
            Text(a["artifact"]), f"{a['instances']} ({a['count_source']})", str(a["active"]),
            f"{a['min']}..{a['max']} ({a['bounds_source']})",
            f"{a['scale_up_cooldown']:.0f} s / {a['scale_down_cooldown']:.0f} s",
            Text(f"#{last['seq']} {last['kind']}: {last['reason']}") if last else "-",
        )  # fmt: skip
    if not doc.get("artifacts"):
        table.caption = Text("no slice has a [slices.NAME.scaling] rule")  # not markup
    con.print(table)
    avoided = doc.get("avoided") or []
    con.print(f"Avoided nodes (no new instances): {', '.join(avoided) if avoided else 'none'}")
    steps = int(doc.get("steps", 0))
    mean = 1000 * float(doc.get("step_seconds", 0.0)) / steps if steps else 0.0
    con.print(
        f"Steps on this node: {steps} · {doc.get('step_seconds', 0):.3f} s in total · mean {mean:.2f} ms · "
        f"last {doc.get('step_last_ms', 0):.2f} ms · max {doc.get('step_max_ms', 0):.2f} ms · "
        f"failed writes {doc.get('writes_failed', 0)}"
    )
    hooks = doc.get("webhooks") or []
    if hooks:
        wt = Table(title="Webhooks", title_justify="left")
        for col in ("URL", "Events", "Queued", "Sent", "Failed", "Dropped", "Last error"):
            wt.add_column(col, overflow="fold")
        for w in hooks:
            wt.add_row(
                Text(w["url"]), ", ".join(w["events"]), str(w["queued"]), str(w["sent"]), str(w["failed"]),
                str(w["dropped"]), Text(w.get("last_error") or "-"),
            )  # fmt: skip
        con.print(wt)


@click.group("controller")
def controller() -> None:
    """The layer-1 controller: autoscaling, health and recovery (docs/controller.md)."""


@controller.command("status")
@json_option
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """Where the controller runs, dry run, the autoscaled slices (count, bounds, cooldowns, last
    decision), avoided nodes and the time its steps take."""
    client = make_client(settings)
    doc: Any = call(client, lambda c: c.get_json("/api/v1/controller/status"))
    if settings.json or as_json:
        echo_json(doc)
    else:
        render_status(doc)


@controller.command("config")
@click.option(
    "--set", "set_file", type=click.Path(dir_okay=False, allow_dash=True), default=None, metavar="FILE",
    help="Validate and store the TOML configuration in FILE ('-': stdin).",
)
@json_option
@click.pass_obj
def config(settings: Settings, set_file: str | None, as_json: bool) -> None:
    """Print the controller configuration (TOML), or set it with --set FILE.

    The file is checked by the node (unknown keys, wrong types and out-of-range values are refused
    naming the key) and stored through consensus; every node uses it from the next second.
    """
    client = make_client(settings)
    if set_file is not None:
        try:
            raw = sys.stdin.buffer.read() if set_file == "-" else Path(set_file).read_bytes()
        except OSError as e:
            fail(f"cannot read {set_file}: {e.strerror or e}", EXIT_USAGE)
        from aether.cli.client import ApiError, ApiUnreachable

        try:
            body = client.request_raw("PUT", "/api/v1/controller/config", None, raw, "application/toml")
        except ApiError as e:
            if e.status == 400:
                fail(f"{set_file}: {e.detail}", EXIT_FAILED,
                     hint="Fix the file and run the command again; docs/controller.md lists every key.")
            report(e)
        except ApiUnreachable as e:
            report(e)
        import msgspec

        doc: Any = msgspec.json.decode(body)
        if settings.json or as_json:
            echo_json(doc)
        else:
            by = f" by {doc['by']}" if doc.get("by") else ""
            dry = "yes" if doc["config"]["dry_run"] else "no"
            click.echo(f"Controller config set{by} (dry run: {dry}).")
        return
    doc = call(client, lambda c: c.get_json("/api/v1/controller/config"))
    if settings.json or as_json:
        echo_json(doc)
        return
    if doc.get("error"):
        click.secho(f"the stored config was refused (the previous one stays): {doc['error']}", fg="red",
                    err=True)
    if doc.get("updated") is None:
        click.echo("# no controller config set: every default applies (docs/controller.md)", err=True)
    else:
        by = f" by {doc['by']}" if doc.get("by") else ""
        click.echo(f"# set {_ago(doc['updated'])}{by}", err=True)
    click.echo(doc.get("text", ""), nl=not str(doc.get("text", "")).endswith("\n"))


@controller.command("decisions")
@click.option(
    "--follow", "-f", is_flag=True, help="Then print each new decision as it is made, until Ctrl-C."
)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, metavar="N",
              help="How many of the latest decisions to print.")
@click.option("--since", type=click.IntRange(min=0), default=0, metavar="SEQ",
              help="Only decisions after this number.")
@json_option
@click.pass_obj
def decisions(settings: Settings, follow: bool, limit: int, since: int, as_json: bool) -> None:
    """The controller's latest decisions: what it decided (scale, skip, replace, restart, recover,
    avoid, alert), on what inputs, by which rule, and why."""
    import msgspec

    client = make_client(settings)
    as_json = settings.json or as_json
    docs: Any = call(
        client,
        lambda c: c.get_json("/api/v1/controller/decisions", {"since": str(since), "limit": str(limit)}),
    )
    if not follow:
        if as_json:
            echo_json(docs)
        else:
            render_decisions(docs)
        return
    last = since
    for d in docs:
        click.echo(msgspec.json.encode(d).decode() if as_json else decision_line(d))
        last = max(last, int(d["seq"]))
    from aether.cli.client import ApiError, ApiUnreachable, StreamLost

    click.echo(f"following the decisions at {client.target} (Ctrl-C stops)", err=True)
    try:
        for ev in client.events(FOLLOW_READ_TIMEOUT, f"/api/v1/controller/decisions/stream?since={last}"):
            if ev.event != "decision":
                continue
            try:
                d = msgspec.json.decode(ev.data)
            except msgspec.DecodeError:
                continue
            click.echo(msgspec.json.encode(d).decode() if as_json else decision_line(d))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None
    except (ApiUnreachable, ApiError) as e:
        report(e)
    except StreamLost as e:
        fail(f"lost the decision stream of {client.target}: {e}", EXIT_UNREACHABLE,
             hint="The node may have stopped; check it with `aether health`, then run the command again.")


@controller.command("replay")
@click.argument("recording", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="TOML", help="The controller configuration to replay with [default: every default].")
@click.option("--skips/--no-skips", default=False, show_default=True, help="Also print held decisions.")
@json_option
@click.pass_obj
def replay(settings: Settings, recording: str, config_file: str | None, skips: bool, as_json: bool) -> None:
    """Run a recording of observations (`aether node --controller-record FILE`) through a controller
    with the configuration in TOML, offline, and print what it decides.

    Open loop: the recorded load and counts do not respond to the replayed decisions, so the replay
    shows when and how this configuration would have reacted, up to its first different decision.
    """
    import msgspec

    from aether.controller.config import parse_config
    from aether.controller.recording import read_recording
    from aether.controller.recording import replay as run_replay
    from aether.core.errors import BadRequest

    try:
        cfg = parse_config(Path(config_file).read_text() if config_file else "")
    except (BadRequest, OSError, UnicodeDecodeError) as e:
        fail(f"{config_file}: {e}", EXIT_USAGE, hint="docs/controller.md lists every key.")
    try:
        observations = list(read_recording(recording))
    except (BadRequest, OSError) as e:
        fail(str(e), EXIT_USAGE, hint="Pass a file written by `aether node --controller-record FILE`.")
    made = run_replay(observations, cfg)
    docs = [msgspec.to_builtins(d) for d in made if skips or d.kind != "skip"]
    if settings.json or as_json:
        echo_json(docs)
        return
    if not observations:
        click.echo(f"{recording} holds no observations.")
        return
    span = observations[-1].time - observations[0].time
    click.echo(f"{len(observations)} observations over {span:.0f} s; {len(docs)} decisions:", err=True)
    render_decisions(docs)


@click.command()
@json_option
@click.pass_obj
def alerts(settings: Settings, as_json: bool) -> None:
    """Alerts pending (the condition holds, its `for` is not over yet) or firing, from the rules of
    the controller config (`[[alerts]]`)."""
    client = make_client(settings)
    doc: Any = call(client, lambda c: c.get_json("/api/v1/alerts"))
    if settings.json or as_json:
        echo_json(doc)
        return
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    table = Table(title=f"Alerts ({doc['firing']} firing, {doc['pending']} pending)", title_justify="left")
    for col in ("State", "Alert", "Labels", "Value", "Since", "Severity", "Summary"):
        table.add_column(col, overflow="fold")
    for a in doc.get("alerts", []):
        state = "[red]firing[/red]" if a["state"] == "firing" else "[yellow]pending[/yellow]"
        labels = ", ".join(f"{k}={v}" for k, v in sorted(a.get("labels", {}).items()))
        cond = f" ({a['metric']} {a['op']} {a['threshold']:g})" if a.get("metric") else ""
        table.add_row(
            state, Text(a["name"] + cond), Text(labels or "-"), f"{a['value']:g}", _ago(a["since"]),
            a.get("severity") or "-", Text(a.get("summary") or ""),
        )  # fmt: skip
    if not doc.get("alerts"):
        table.caption = "no alert is pending or firing"
    render.console().print(table)
