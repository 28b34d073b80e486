"""Deployment commands: `blueprint apply|list|show|delete`, `deploy`, `scale`, `undeploy`, `slices`.

They talk to one node's management API (`--connect`); any node serves them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from aether.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    FiniteFloatRange,
    Settings,
    call,
    echo_json,
    fail,
    json_option,
    make_client,
    watch_option,
    watching,
)


def _slice_rows(statuses: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Slices", title_justify="left")
    for col in ("Artifact", "Desired", "Active", "Node", "State", "Instance ids", "Reason"):
        table.add_column(col)
    for s in statuses:
        insts = s.get("instances") or [{}]
        for i, inst in enumerate(insts):
            state = inst.get("state", "")
            color = "green" if state == "ACTIVE" else "red" if state == "FAILED" else "yellow"
            table.add_row(
                s["artifact"] if i == 0 else "",
                str(s["desired"]) if i == 0 else "",
                str(s["active"]) if i == 0 else "",
                inst.get("node", ""),
                f"[{color}]{state}[/{color}]" if state else "",
                ",".join(str(x) for x in inst.get("instance_ids", [])),
                Text(inst.get("reason") or ""),  # plain text: a reason quotes `[slices.NAME.config]`
            )
    return table


def _converged(s: dict[str, Any]) -> bool:
    insts = s.get("instances", [])
    if s["desired"] == 0:
        return not insts
    return s["active"] == s["desired"] and all(i["state"] == "ACTIVE" for i in insts)


def _to_json(statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`slices --json`: {artifact, desired, active, instances: [{node, state, reason, instance_ids}]}."""
    return [
        {
            "artifact": s["artifact"],
            "desired": s["desired"],
            "active": s["active"],
            "instances": [
                {
                    "node": i["node"],
                    "state": i["state"],
                    "reason": i.get("reason"),
                    "instance_ids": i.get("instance_ids", []),
                }
                for i in s.get("instances", [])
            ],
        }
        for s in statuses
    ]


@click.command()
@json_option
@watch_option
@click.pass_obj
def slices(settings: Settings, as_json: bool, watch: bool) -> None:
    """Show every deployed artifact: desired and active instances, per-node state and failures."""
    settings.json = settings.json or as_json
    watching(settings, watch, lambda: _show_slices(settings))


def _show_slices(settings: Settings) -> None:
    client = make_client(settings)
    statuses: Any = call(client, lambda c: c.get_json("/api/v1/slices"))
    if settings.json:
        echo_json(_to_json(statuses))
        return
    from aether.cli import render

    out = render.console()
    if not statuses:
        out.print("Nothing deployed. Try `aether blueprint apply FILE` or `aether deploy G:A:V`.")
        return
    out.print(_slice_rows(statuses))


@click.group()
def blueprint() -> None:
    """Apply, list, show and delete blueprints (desired state in TOML)."""


@blueprint.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--wait", is_flag=True, help="Wait until every instance is ACTIVE (exit 1 on failure or timeout)."
)
@click.option("--wait-timeout", type=FiniteFloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds to wait.")
@json_option
@click.pass_obj
def blueprint_apply(settings: Settings, file: Path, wait: bool, wait_timeout: float, as_json: bool) -> None:
    """Apply the blueprint in FILE (replaces a blueprint with the same id)."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        fail(f"cannot read blueprint {file}: {e.strerror or e}", EXIT_USAGE)
    except UnicodeDecodeError:
        fail(f"blueprint {file} is not UTF-8 text", EXIT_USAGE)
    client = make_client(settings)
    quiet = settings.json or as_json
    applied, statuses = apply_blueprint(
        settings, client, text, str(file), wait_timeout=wait_timeout if wait else None, quiet=quiet
    )
    if not wait:
        if quiet:
            echo_json(applied)
        else:
            artifacts = [s["artifact"] for s in applied.get("slices", [])]
            click.echo(
                f"Applied blueprint {applied['id']!r}: {len(artifacts)} slice(s): {', '.join(artifacts)}"
            )
        return
    if quiet:
        echo_json({"blueprint": applied, "slices": _to_json(statuses)})
    else:
        click.echo(f"Blueprint {applied['id']!r} is running: every instance is ACTIVE.")


def apply_blueprint(
    settings: Settings,
    client: Any,
    text: str,
    filename: str,
    *,
    wait_timeout: float | None = None,
    quiet: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """POST the blueprint `text`; with `wait_timeout`, wait (with a progress bar unless `quiet`)
    until every instance of its slices is ACTIVE. Returns the applied blueprint and the slice
    statuses (empty without waiting). Exits 1 naming the problem (`fail`) otherwise."""
    applied: Any = call(
        client, lambda c: c.send_json("POST", "/api/v1/blueprints", {"toml": text, "filename": filename})
    )
    if wait_timeout is None:
        return applied, []
    artifacts = [s["artifact"] for s in applied.get("slices", [])]
    return applied, _wait(settings, client, artifacts, wait_timeout, quiet=quiet)


def _wait(
    settings: Settings, client: Any, artifacts: list[str], timeout: float, *, quiet: bool
) -> list[dict[str, Any]]:
    """Poll /api/v1/slices until `artifacts` converge; exit 1 naming the reason otherwise."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from aether.cli import render

    wanted = set(artifacts)
    deadline = time.monotonic() + timeout
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} ACTIVE"),
        TimeElapsedColumn(),
        console=render.console(stderr=True),
        disable=quiet,
        transient=True,
    )
    finished_before = {r["id"] for r in _rollouts_of(client, wanted) if r["state"] not in _ROLLING}
    with progress:
        task = progress.add_task("Waiting for instances", total=None)
        while True:
            rolling = [r for r in _rollouts_of(client, wanted) if r["id"] not in finished_before]
            for r in rolling:
                if r["state"] in ("rolled-back", "aborted"):
                    progress.stop()
                    fail(
                        f"the rollout of {r['artifact']} to {r['new_version']} was {r['state']}: "
                        f"{r['reason']}",
                        EXIT_FAILED,
                        hint=f"`aether rollout status {r['artifact']}` shows its steps; "
                        f"{r['old_version']} runs.",
                    )
            busy = [r for r in rolling if r["state"] in _ROLLING]
            if busy:
                r = busy[0]
                progress.update(task, description=f"Rolling {r['artifact']} to {r['new_version']}")
            listing: Any = call(client, lambda c: c.get_json("/api/v1/slices"))
            statuses = [s for s in listing if s["artifact"] in wanted]
            total = sum(max(s["desired"], 1) for s in statuses) or len(wanted)
            done = sum(min(s["active"], s["desired"]) for s in statuses)
            progress.update(task, total=total, completed=done)
            failed = [(s["artifact"], i) for s in statuses for i in s["instances"] if i["state"] == "FAILED"]
            if failed and not busy:  # a rollout rolls a failed new version back itself
                art, inst = failed[0]
                progress.stop()
                fail(
                    f"{art} FAILED on {inst['node']}: {inst.get('reason') or 'no reason given'}",
                    EXIT_FAILED,
                    hint=f"See `aether slices` for every instance, and `aether logs {inst['node']} "
                    "--since 5m` for the node's log.",
                )
            if len(statuses) == len(wanted) and all(_converged(s) for s in statuses) and not busy:
                return statuses
            if time.monotonic() > deadline:
                progress.stop()
                pending = [
                    f"{s['artifact']} ({s['active']}/{s['desired']} ACTIVE)"
                    for s in statuses
                    if not _converged(s)
                ] or sorted(wanted - {s["artifact"] for s in statuses})
                fail(
                    f"not every instance became ACTIVE within {timeout:g} s: {', '.join(pending)}",
                    EXIT_FAILED,
                    hint="Check `aether slices` and the node logs (`aether logs --since 5m`); raise "
                    "--wait-timeout if slow.",
                )
            time.sleep(0.2)


_ROLLING = ("progressing", "paused", "rolling-back")


def _rollouts_of(client: Any, artifacts: set[str]) -> list[dict[str, Any]]:
    """The recorded rollouts whose old or new version is one of `artifacts`."""
    listing: Any = call(client, lambda c: c.get_json("/api/v1/rollouts"))
    return [
        r for r in listing
        if {f"{r['artifact']}:{r['new_version']}", f"{r['artifact']}:{r['old_version']}"} & artifacts
    ]  # fmt: skip


@blueprint.command("list")
@json_option
@click.pass_obj
def blueprint_list(settings: Settings, as_json: bool) -> None:
    """List the blueprints in the cluster."""
    client = make_client(settings)
    items: Any = call(client, lambda c: c.get_json("/api/v1/blueprints"))
    if settings.json or as_json:
        echo_json(items)
        return
    from rich.table import Table

    from aether.cli import render

    if not items:
        render.console().print("No blueprints. Apply one with `aether blueprint apply FILE`.")
        return
    table = Table(title="Blueprints", title_justify="left")
    for col in ("Id", "Source", "Slices"):
        table.add_column(col)
    for bp in items:
        table.add_row(
            bp["id"],
            bp.get("source", ""),
            ", ".join(f"{s['artifact']} x{s['instances']}" for s in bp.get("slices", [])),
        )
    render.console().print(table)


@blueprint.command("show")
@click.argument("blueprint_id", metavar="ID")
@json_option
@click.pass_obj
def blueprint_show(settings: Settings, blueprint_id: str, as_json: bool) -> None:
    """Show one blueprint, expanded (dependencies included, in deployment order)."""
    from urllib.parse import quote

    client = make_client(settings)
    bp: Any = call(client, lambda c: c.get_json(f"/api/v1/blueprints/{quote(blueprint_id, safe='')}"))
    if settings.json or as_json:
        echo_json(bp)
        return
    from rich.table import Table

    from aether.cli import render

    table = Table(title=f"Blueprint {bp['id']} (source: {bp.get('source', '')})", title_justify="left")
    configs = any(s.get("config") for s in bp.get("slices", []))
    for col in ("Slice", "Artifact", "Instances", "Depends on", *(("Config",) if configs else ())):
        table.add_column(col)
    from rich.markup import escape

    for s in bp.get("slices", []):
        table.add_row(
            s.get("name") or "(dependency)",
            s["artifact"],
            str(s["instances"]),
            ", ".join(s.get("depends_on", [])),
            *((escape("\n".join(_config_lines(s.get("config") or {}))),) if configs else ()),
        )
    render.console().print(table)


def _config_lines(config: Any, prefix: str = "") -> list[str]:
    """`key=value` per setting, nested tables dotted; a secret reference reads `secret(NAME)` (the
    blueprint holds only the name)."""
    import json

    out: list[str] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and set(value) == {"secret"}:
            out.append(f"{name}=secret({value['secret']})")
        elif isinstance(value, dict) and value:
            out.extend(_config_lines(value, f"{name}."))
        else:
            out.append(f"{name}={json.dumps(value)}")
    return out


@blueprint.command("delete")
@click.argument("blueprint_id", metavar="ID")
@click.pass_obj
def blueprint_delete(settings: Settings, blueprint_id: str) -> None:
    """Delete a blueprint: its slices are undeployed unless another blueprint lists them."""
    from urllib.parse import quote

    client = make_client(settings)
    call(client, lambda c: c.send_json("DELETE", f"/api/v1/blueprints/{quote(blueprint_id, safe='')}"))
    click.echo(f"Deleted blueprint {blueprint_id!r}.")


@click.command()
@click.argument("artifact", metavar="G:A:V")
@click.option("-n", "--instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--wait", is_flag=True, help="Wait until every instance is ACTIVE.")
@click.option("--wait-timeout", type=FiniteFloatRange(min=0, min_open=True), default=120.0, show_default=True)
@json_option
@click.pass_obj
def deploy(
    settings: Settings, artifact: str, instances: int, wait: bool, wait_timeout: float, as_json: bool
) -> None:
    """Deploy ARTIFACT with N instances (a single-slice blueprint of its own)."""
    client = make_client(settings)
    out: Any = call(
        client,
        lambda c: c.send_json("POST", "/api/v1/deploy", {"artifact": artifact, "instances": instances}),
    )
    if wait:
        _wait(
            settings,
            client,
            [s["artifact"] for s in out.get("slices", [])],
            wait_timeout,
            quiet=settings.json or as_json,
        )
    if settings.json or as_json:
        echo_json(out)
    else:
        click.echo(
            f"Deploying {artifact} with {instances} instance(s)."
            if not wait
            else f"{artifact}: {instances} instance(s) ACTIVE."
        )


@click.command()
@click.argument("artifact", metavar="G:A[:V]")
@click.argument("count", metavar="[N]", type=click.IntRange(min=1), required=False)
@click.option(
    "-n", "--instances", type=click.IntRange(min=1), default=None, help="The instance count (or give N)."
)
@click.option("--min", "min_", type=click.IntRange(min=1), default=None, metavar="A",
              help="Autoscaled slices: the fewest instances the controller may run (the operator's bound).")
@click.option("--max", "max_", type=click.IntRange(min=1), default=None, metavar="B",
              help="Autoscaled slices: the most instances the controller may run (the operator's bound).")
@click.option("--auto", is_flag=True,
              help="Autoscaled slices: clear the operator's bounds and pin (back to the blueprint's bounds).")
@click.option("--wait", is_flag=True, help="Wait until every instance is ACTIVE (exit 1 on failure).")
@click.option("--wait-timeout", type=FiniteFloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds to wait.")
@json_option
@click.pass_obj
def scale(
    settings: Settings, artifact: str, count: int | None, instances: int | None, min_: int | None,
    max_: int | None, auto: bool, wait: bool, wait_timeout: float, as_json: bool,
) -> None:
    """Set the instance count of ARTIFACT (G:A: every version) in every blueprint that lists it.

    For an autoscaled slice (one with a [slices.NAME.scaling] rule), `aether scale ART N` pins it
    at N instances (the controller keeps it there), `--min A --max B` sets the bounds the controller
    scales within (they win over the blueprint's; the count is kept, clamped), and `--auto` clears
    them again. See docs/controller.md.
    """
    if count is not None and instances is not None and count != instances:
        fail(f"two instance counts given ({count} and -n {instances}): give one", EXIT_USAGE)
    n = count if count is not None else instances
    if n is None and min_ is None and max_ is None and not auto:
        fail("give an instance count N, --min/--max bounds, or --auto", EXIT_USAGE,
             hint=f"e.g. `aether scale {artifact} 3`; `aether slices` shows the current counts.")
    if auto and (n is not None or min_ is not None or max_ is not None):
        fail("--auto clears the operator's bounds and count: give it alone", EXIT_USAGE)
    body: dict[str, Any] = {"artifact": artifact}
    if n is not None:
        body["instances"] = n
    if min_ is not None:
        body["min"] = min_
    if max_ is not None:
        body["max"] = max_
    if auto:
        body["auto"] = True
    client = make_client(settings)
    out: Any = call(client, lambda c: c.send_json("POST", "/api/v1/scale", body))
    quiet = settings.json or as_json
    if not quiet:
        if out.get("blueprints"):
            click.echo(f"Scaling {artifact} to {n} instance(s) (blueprints: {', '.join(out['blueprints'])}).")
        for b in out.get("autoscaled", []):
            if auto:
                what = "operator's bounds cleared"
            elif b["min"] == b["max"] and b["bounds_source"] == "operator":
                what = f"pinned at {b['instances']} instance(s)"
            else:
                what = f"bounds {b['min']}..{b['max']}"
            click.echo(
                f"{b['artifact']} (autoscaled): {what}; count {b['instances']} ({b['count_source']}), "
                f"bounds {b['min']}..{b['max']} ({b['bounds_source']})."
            )
    if wait:
        statuses: Any = call(client, lambda c: c.get_json("/api/v1/slices"))
        matching = [
            s["artifact"] for s in statuses
            if s["artifact"] == artifact or s["artifact"].startswith(artifact + ":")
        ]
        _wait(settings, client, matching, wait_timeout, quiet=quiet)
        if not quiet:
            click.echo(f"{', '.join(matching)}: every instance ACTIVE.")
    if quiet:
        echo_json(out)


@click.command()
@click.argument("artifact", metavar="G:A[:V]")
@json_option
@click.pass_obj
def undeploy(settings: Settings, artifact: str, as_json: bool) -> None:
    """Remove ARTIFACT from the blueprints that list it; its instances are stopped."""
    client = make_client(settings)
    out: Any = call(client, lambda c: c.send_json("POST", "/api/v1/undeploy", {"artifact": artifact}))
    if settings.json or as_json:
        echo_json(out)
    else:
        click.echo(f"Undeploying {artifact} (blueprints: {', '.join(out['blueprints'])}).")
