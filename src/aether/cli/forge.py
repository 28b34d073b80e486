"""`aether forge` and `aether forge scenario`: Aether Forge (docs/forge.md) from the command line.

`aether forge` runs until Ctrl-C: N real node processes, the blueprint, the load and the dashboard
(`aether.forge.app`). `aether forge scenario NAME...` runs scenarios headless and prints a pass/fail
table (`--json`: the reports), exit 0 only when every scenario passed.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from aether.cli.common import EXIT_FAILED, EXIT_USAGE, FiniteFloatRange, echo_json, fail, json_option

DEFAULT_CONFIG = "forge-config.toml"


def _options(f: Any) -> Any:
    for opt in reversed((
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help=f"forge-config.toml: [forge] defaults and the [load] "
                     f"[default: ./{DEFAULT_CONFIG} if present]."),
        click.option("--nodes", type=click.IntRange(1, 15), default=None,
                     help="Node processes to start [default: 5, or [forge] nodes]."),
        click.option("--blueprint", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Blueprint to apply once the nodes have quorum."),
        click.option("--wheels", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Deploy every *.whl in this directory into the nodes' repository first."),
        click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
                     default=Path(".aether/forge"), show_default=True,
                     help="Forge's directory (node data, logs, token); wiped at start if Forge made it."),
        click.option("--seed", type=int, default=None, help="Seed of the load's templates and the "
                     "scenarios' choices (reproducible runs)."),
    )):
        f = opt(f)
    return f


def _build_options(
    config_file: Path | None, nodes: int | None, blueprint: Path | None, wheels: Path | None,
    workdir: Path, seed: int | None, port: int | None,
) -> Any:
    from aether.core.errors import AetherError
    from aether.forge.app import options_from_config
    from aether.forge.config import load_forge_config

    if config_file is None and Path(DEFAULT_CONFIG).is_file():
        config_file = Path(DEFAULT_CONFIG)
    try:
        config = load_forge_config(config_file) if config_file is not None else None
        opts = options_from_config(config)
    except AetherError as e:
        fail(str(e), EXIT_USAGE)
    if nodes is not None:
        opts.nodes = nodes
    if blueprint is not None:
        opts.blueprint = blueprint
    if wheels is not None:
        opts.wheels = wheels
    if port is not None:
        opts.port = port
    opts.workdir = workdir
    opts.seed = seed
    return opts


def _run(coro_factory: Any, *, stops_itself: bool) -> Any:
    """Run `coro_factory(stop, started)` until it returns. The first SIGINT/SIGTERM sets `stop`;
    a coroutine that `stops_itself` (`run_forge`) then finishes on its own once it has `started()`
    (it stops the load, the server and the nodes); otherwise, or while still starting, the task is
    cancelled, and its cleanup still stops every node. Further signals are ignored meanwhile, so
    a second Ctrl-C cannot interrupt the cleanup. KeyboardInterrupt when it was cancelled."""

    async def main() -> Any:
        stop = asyncio.Event()
        running = [False]
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro_factory(stop, lambda: running.__setitem__(0, True)))

        def on_signal() -> None:
            if stop.is_set():
                return
            stop.set()
            if not (stops_itself and running[0]):
                task.cancel()

        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, on_signal)
        try:
            return await task
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    return asyncio.run(main())


@click.group(invoke_without_command=True)
@_options
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Dashboard and REST API port on 127.0.0.1 [default: 8888; 0 picks a free one].")
@click.option("--replay", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Replay this load trace (saved from `GET /api/load/trace`) once the load starts.")
@click.option("--replay-speed", type=FiniteFloatRange(0.01, 1000), default=1.0, show_default=True,
              help="Replay the trace this many times faster.")
@click.pass_context
def forge(
    ctx: click.Context, config_file: Path | None, nodes: int | None, blueprint: Path | None,
    wheels: Path | None, workdir: Path, seed: int | None, port: int | None, replay: Path | None,
    replay_speed: float,
) -> None:
    """Aether Forge: N real nodes on this machine, a dashboard, chaos controls and load.

    Runs until Ctrl-C, then stops everything it started. `make demo` runs it with the order demo
    (`--config examples/order_demo/forge-config.toml`). See docs/forge.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    from aether.core.errors import AetherError
    from aether.forge.app import run_forge

    opts = _build_options(config_file, nodes, blueprint, wheels, workdir, seed, port)
    if replay is not None:
        if opts.load is None or not opts.load.targets:
            fail("--replay needs load targets: a --config with [[load.targets]]", EXIT_USAGE)
        opts.replay, opts.replay_speed = replay, replay_speed

    def say(text: str) -> None:
        click.echo(text)

    try:
        _run(lambda stop, started: run_forge(opts, stop, say=say, ready=lambda *_: started()),
             stops_itself=True)
    except KeyboardInterrupt:
        click.echo("Stopped.", err=True)
        raise click.exceptions.Exit(130) from None
    except AetherError as e:
        fail(str(e))


@forge.command("scenario")
@click.argument("names", nargs=-1, metavar="NAME...")
@_options
@click.option("--rate", type=FiniteFloatRange(0, 100_000), default=None,
              help="The load's total rate (requests/s) while the scenarios run [default: the config's].")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
@json_option
def scenario(
    names: tuple[str, ...], config_file: Path | None, nodes: int | None, blueprint: Path | None,
    wheels: Path | None, workdir: Path, seed: int | None, rate: float | None, list_only: bool,
    as_json: bool,
) -> None:
    """Run scenarios headless and report pass/fail per criterion (exit 1 if any failed).

    NAME is a scenario, `ci` (the subset CI runs) or `all`; several run one after the other on
    one Forge. The blueprint, wheels and load come from the config (as for `aether forge`).
    """
    import msgspec

    from aether.core.errors import AetherError
    from aether.forge.scenarios import CI_SUBSET, SCENARIOS, resolve_names, run_scenarios

    if list_only or not names:
        if as_json:
            echo_json([{"name": s.name, "description": s.description, "ci": s.name in CI_SUBSET}
                       for s in SCENARIOS.values()])
            return
        for s in SCENARIOS.values():
            click.echo(f"  {s.name:<20} {s.description}{'  [ci]' if s.name in CI_SUBSET else ''}")
        if not list_only:
            fail("name one or more scenarios (or `ci`, `all`)", EXIT_USAGE)
        return
    try:
        resolve_names(names)
    except AetherError as e:
        fail(str(e), EXIT_USAGE)
    opts = _build_options(config_file, nodes, blueprint, wheels, workdir, seed, 0)

    def say(text: str) -> None:
        click.echo(text, err=as_json)

    try:
        rates = None if rate is None else dict.fromkeys(resolve_names(names), rate)
        reports = _run(lambda stop, started: run_scenarios(names, opts, say=say, seed=seed, rates=rates),
                       stops_itself=False)
    except KeyboardInterrupt:
        click.echo("Stopped.", err=True)
        raise click.exceptions.Exit(130) from None
    except AetherError as e:
        fail(str(e))
    if as_json:
        echo_json(msgspec.to_builtins(reports))
    else:
        _print_reports(reports)
    if not all(r.passed for r in reports):
        raise click.exceptions.Exit(EXIT_FAILED)


def _print_reports(reports: list[Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    from aether.cli.render import console

    table = Table(title="Forge scenarios", show_lines=False)
    for col in ("scenario", "criterion", "expected", "observed", "result"):
        table.add_column(col)
    for r in reports:
        for i, c in enumerate(r.criteria):
            table.add_row(
                Text(r.scenario if i == 0 else ""), Text(c.name), Text(c.expected), Text(c.observed),
                "[green]pass[/green]" if c.passed else "[red]FAIL[/red]",
            )
    console().print(table)  # full width when piped; criteria text as written (no markup, no emoji)
    for r in reports:
        if not r.passed and r.failures:
            click.echo(f"Failed requests during {r.scenario} (examples):")
            for line in r.failures:
                click.echo(f"  {line}")
    passed = sum(r.passed for r in reports)
    click.echo(f"{passed} of {len(reports)} scenario(s) passed.")
