"""Rollout commands: `update ARTIFACT --to VERSION` and `rollout status|pause|resume|abort|undo`.

They talk to one node's management API (`--connect`); any node serves them. docs/deployment.md,
*Rolling and canary updates*, describes the machinery.
"""

from __future__ import annotations

import time
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
)

_ACTIVE = ("progressing", "paused", "rolling-back")
_COLORS = {"succeeded": "green", "rolled-back": "red", "aborted": "red", "paused": "yellow"}


def _weights(w: dict[str, int]) -> str:
    total = sum(w.values())
    if not total:
        return "by instance"
    return ", ".join(f"{v} {round(100 * n / total)}%" for v, n in sorted(w.items()))


def _table(rollouts: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Rollouts", title_justify="left")
    columns = ("Artifact", "From", "To", "Strategy", "State", "Step", "Old/new", "Traffic", "Reason")
    for col in columns:
        table.add_column(col)
    for r in rollouts:
        color = _COLORS.get(r["state"], "cyan")
        steps = r.get("steps") or []
        step = f"{r['step'] + 1}/{len(steps)}" if steps else str(r["step"])
        table.add_row(
            r["artifact"], r["old_version"], r["new_version"], r["strategy"],
            f"[{color}]{r['state']}[/{color}]", step, f"{r['old_instances']}/{r['new_instances']}",
            _weights(r.get("weights") or {}), Text(r.get("reason") or ""),
        )  # fmt: skip
    return table


def _show(r: dict[str, Any]) -> None:
    from aether.cli import render

    render.console().print(_table([r]))
    calls, failures = r.get("calls", 0), r.get("failures", 0)
    if calls:
        share = 100 * failures / calls
        click.echo(f"New version: {calls} calls analysed, {failures} failed ({share:.2f} %).")
    for line in r.get("history", [])[-10:]:
        click.echo(f"  {line}")


def _follow(settings: Settings, client: Any, name: str, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll the rollout until it is no longer active, printing each new step; exit 1 unless it
    succeeded."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        r: Any = call(client, lambda c: c.get_json(f"/api/v1/rollouts/{name}"))
        history = r.get("history", [])
        if not quiet:
            for line in history[seen:]:
                click.echo(f"  {line}", err=True)
        seen = len(history)
        if r["state"] not in _ACTIVE:
            break
        if time.monotonic() > deadline:
            fail(f"the rollout of {name} is still {r['state']} after {timeout:g} s", EXIT_FAILED,
                 hint=f"`aether rollout status {name}` follows it; `aether rollout abort {name}` goes back.")
        time.sleep(0.5)
    if quiet:
        echo_json(r)
    if r["state"] != "succeeded":
        fail(f"the rollout of {name} to {r['new_version']} ended {r['state']}: {r.get('reason') or ''}",
             EXIT_FAILED,
             hint=f"{r['old_version']} runs again; `aether rollout status {name}` shows the steps.")
    if not quiet:
        click.echo(f"{name} runs {r['new_version']}: rollout succeeded.")
    return dict(r)


def _name(artifact: str) -> str:
    parts = artifact.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        fail(f"invalid artifact {artifact!r}: expected GROUP:ARTIFACT", EXIT_USAGE)
    return ":".join(parts[:2])


@click.command()
@click.argument("artifact", metavar="GROUP:ARTIFACT")
@click.option("--to", "version", required=True, metavar="VERSION", help="The version to roll over to.")
@click.option("--strategy", type=click.Choice(["rolling", "canary", "blue-green"]), default=None,
              help="Default: the blueprint's [slices.NAME.rollout] strategy, else rolling.")
@click.option("--steps", default=None, metavar="P,P,..",
              help="Canary: percent of the calls for the new version per step (e.g. 10,50,100).")
@click.option("--interval", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Seconds each canary step is analysed.")
@click.option("--max-surge", type=click.IntRange(min=0), default=None,
              help="Rolling: instances above the count during the update (default 1).")
@click.option("--max-unavailable", type=click.IntRange(min=0), default=None,
              help="Rolling: instances below the count during the update (default 0).")
@click.option("--max-error-rate", type=FiniteFloatRange(0, 1), default=None,
              help="Gate: share of the new version's calls that may fail (default 0.05).")
@click.option("--max-p99-ratio", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Gate: p99 of the new version / p99 of the old (canary steps).")
@click.option("--wait", is_flag=True, help="Follow the rollout until it ends (exit 1 unless it succeeded).")
@click.option("--wait-timeout", type=FiniteFloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds to wait.")
@json_option
@click.pass_obj
def update(
    settings: Settings, artifact: str, version: str, strategy: str | None, steps: str | None,
    interval: float | None, max_surge: int | None, max_unavailable: int | None,
    max_error_rate: float | None, max_p99_ratio: float | None, wait: bool, wait_timeout: float, as_json: bool,
) -> None:
    """Roll ARTIFACT over to another version without dropping a call.

    New instances start first; traffic shifts to them as they become ready (or by the canary's
    steps); old instances drain and stop. A gate that fails (errors, p99) or a new instance that
    fails rolls back automatically.

    \b
    Examples:
      aether update org.example:hello --to 0.2.0 --wait
      aether update org.example:hello --to 0.3.0 --strategy canary --steps 5,50,100 --interval 30
    """
    name = _name(artifact)
    body: dict[str, Any] = {"artifact": name, "version": version}
    if steps is not None:
        try:
            body["steps"] = [int(p) for p in steps.split(",") if p.strip()]
        except ValueError:
            fail(f"--steps must be percents separated by commas (e.g. 10,50,100), got {steps!r}", EXIT_USAGE)
    for key, value in (("strategy", strategy), ("interval", interval), ("max_surge", max_surge),
                       ("max_unavailable", max_unavailable), ("max_error_rate", max_error_rate),
                       ("max_p99_ratio", max_p99_ratio)):
        if value is not None:
            body[key] = value
    client = make_client(settings)
    out: Any = call(client, lambda c: c.send_json("POST", "/api/v1/rollouts", body))
    quiet = settings.json or as_json
    if out["state"] not in ("progressing", "paused") and not quiet:
        # a repeated update answered with the rollout that already took the artifact there (or
        # is rolling it back: its blueprints still ask for the version until that ends)
        if out["state"] == "succeeded":
            click.echo(f"{name} is already at {out['new_version']}: its rollout from "
                       f"{out['old_version']} succeeded.")
        else:
            click.echo(f"{name}: the rollout from {out['old_version']} to {out['new_version']} is "
                       f"{out['state']}; follow it with `aether rollout status {name}`.")
        return
    if wait:
        if not quiet:
            click.echo(
                f"Rolling {name} from {out['old_version']} to {out['new_version']} ({out['strategy']}):"
            )
        _follow(settings, client, name, wait_timeout, quiet)
        return
    if quiet:
        echo_json(out)
    else:
        click.echo(f"Rolling {name} from {out['old_version']} to {out['new_version']} ({out['strategy']}); "
                   f"follow it with `aether rollout status {name}`.")


@click.group()
def rollout() -> None:
    """Follow and steer rollouts (started by `aether update` or by applying a blueprint with a new version).

    \b
    Examples:
      aether rollout status
      aether rollout pause org.example:hello
      aether rollout undo org.example:hello
    """


@rollout.command("status")
@click.argument("artifact", metavar="[GROUP:ARTIFACT]", required=False)
@click.option("--watch", is_flag=True, help="Follow the rollout until it ends.")
@json_option
@click.pass_obj
def rollout_status(settings: Settings, artifact: str | None, watch: bool, as_json: bool) -> None:
    """Show every rollout, or one with its step history."""
    client = make_client(settings)
    quiet = settings.json or as_json
    if artifact is None:
        if watch:
            fail("--watch follows one rollout: name its artifact", EXIT_USAGE)
        listing: Any = call(client, lambda c: c.get_json("/api/v1/rollouts"))
        if quiet:
            echo_json(listing)
        elif not listing:
            click.echo("No rollouts recorded; `aether update ARTIFACT --to VERSION` starts one.")
        else:
            from aether.cli import render

            render.console().print(_table(listing))
        return
    name = _name(artifact)
    if watch:
        _follow(settings, client, name, 24 * 3600.0, quiet)
        return
    r: Any = call(client, lambda c: c.get_json(f"/api/v1/rollouts/{name}"))
    if quiet:
        echo_json(r)
    else:
        _show(r)


def _undo_text(name: str, r: dict[str, Any]) -> str:
    if r["state"] == "rolling-back":
        return f"Aborting the rollout of {name}: every call goes to {r['old_version']} again."
    return (f"{name}: rolling back to {r['new_version']} ({r['strategy']}); "
            f"`aether rollout status {name}` follows it.")


_DONE: dict[str, Any] = {
    "pause": lambda name, r: (
        f"Paused the rollout of {name} at step {r['step'] + 1}: `aether rollout resume {name}` continues it."
    ),
    "resume": lambda name, r: f"Resumed the rollout of {name} to {r['new_version']}.",
    "abort": lambda name, r: f"Aborting the rollout of {name}: every call goes to {r['old_version']} again.",
    "undo": _undo_text,
}


def _command(command: str, help_text: str) -> Any:
    @rollout.command(command, help=help_text)
    @click.argument("artifact", metavar="GROUP:ARTIFACT")
    @json_option
    @click.pass_obj
    def run(settings: Settings, artifact: str, as_json: bool) -> None:
        name = _name(artifact)
        client = make_client(settings)
        r: Any = call(client, lambda c: c.send_json("POST", f"/api/v1/rollouts/{name}/{command}", {}))
        if settings.json or as_json:
            echo_json(r)
        else:
            click.echo(_DONE[command](name, r))

    return run


rollout_pause = _command("pause", "Freeze a rollout where it is (instances and traffic stay).")
rollout_resume = _command("resume", "Continue a paused rollout (the current step is analysed again).")
rollout_abort = _command("abort", "Stop a rollout and go back to the old version.")
rollout_undo = _command(
    "undo", "Abort a running rollout, or roll a finished one back to the version before it."
)
