"""`aether artifact deploy|list|versions`: the local artifact repository (click group `artifact`).

Works on a repository directory directly (no node needed): `--repository DIR` before or after
the subcommand (`aether artifact --repository DIR deploy W` == `aether artifact deploy
--repository DIR W`; after wins), env `AETHER_REPOSITORY`, default `~/.aether/repository`.
Same conventions as the other commands (`aether.cli.common`): exit 0 ok, 1 the operation failed,
2 bad usage; errors in red on stderr with a hint; `--json` (on the command or the global
`aether --json`) for scripts.

Like every command module it does not import `aether.cli.main` (main registers the group); the
repository code, rich and msgspec are imported inside the commands (start-up time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from aether.slices.repository import Repository

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

__all__ = ["artifact"]


def _fail(message: str, code: int = EXIT_FAILED, *, hint: str | None = None) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.echo(hint, err=True)
    raise click.exceptions.Exit(code)


def _want_json(ctx: click.Context, as_json: bool) -> bool:
    root = ctx.find_root().obj
    return as_json or bool(getattr(root, "json", False))


def _echo_json(data: object) -> None:
    import msgspec

    click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


def _repo(ctx: click.Context, repository: str | None) -> Repository:
    """The repository of `--repository` on the subcommand, else on the group (or its env/default)."""
    from aether.slices.repository import Repository

    root: str | None = repository or ctx.meta.get("aether.artifact.repository")
    return Repository(root)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _repository_option(f: Any) -> Any:
    """`--repository` on a subcommand too (`aether artifact deploy --repository DIR WHEEL`)."""
    return click.option(
        "--repository",
        "repository",
        default=None,
        metavar="DIR",
        type=click.Path(file_okay=False),
        help="Repository directory [default: the group's --repository, env AETHER_REPOSITORY, "
        "~/.aether/repository].",
    )(f)


@click.group()
@click.option(
    "--repository",
    "repository",
    envvar="AETHER_REPOSITORY",
    default=None,
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Repository directory (env AETHER_REPOSITORY) [default: ~/.aether/repository].",
)
@click.pass_context
def artifact(ctx: click.Context, repository: str | None) -> None:
    """Manage the local artifact repository of slice wheels and library wheels.

    Layout: {group as path}/{artifact}/{version}/{wheel}; library wheels in _libs/.
    """
    ctx.meta["aether.artifact.repository"] = repository


@artifact.command("deploy")
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--coords",
    metavar="G:A:V",
    default=None,
    help="Deploy under these coordinates instead of the ones the wheel declares.",
)
@_repository_option
@_json_option
@click.pass_context
def deploy(ctx: click.Context, wheel: str, coords: str | None, repository: str | None, as_json: bool) -> None:
    """Copy WHEEL into the repository.

    A slice wheel (with an `aether.slices` entry point) goes to {group}/{artifact}/{version}/,
    replacing a wheel of the same version; a library wheel goes to the wheelhouse _libs/, from
    which nodes install libraries offline.
    """
    from aether.core.artifact import Artifact
    from aether.core.errors import BadRequest
    from aether.slices.errors import InvalidWheel, NotASliceWheel

    parsed: Artifact | None = None
    if coords is not None:
        try:
            parsed = Artifact.parse(coords)
        except BadRequest as e:
            _fail(
                str(e),
                EXIT_USAGE,
                hint="Give --coords as GROUP:ARTIFACT:VERSION, e.g. org.example:hello:0.1.0.",
            )
    repo = _repo(ctx, repository)
    try:
        result = repo.deploy_wheel(Path(wheel), parsed)
    except NotASliceWheel as e:
        _fail(str(e), EXIT_USAGE, hint="Library wheels take no --coords; drop the option.")
    except InvalidWheel as e:
        _fail(
            str(e),
            hint=(
                "A slice wheel declares its class in pyproject.toml: "
                '[project.entry-points."aether.slices"] "org.example:hello" = "hello_slice:Hello". '
                "See docs/slices.md."
            ),
        )
    except OSError as e:
        _fail(f"cannot write to the repository {repo.root}: {e}", hint="Check the --repository directory.")
    if isinstance(result, Artifact):
        path = repo.resolve(result)
        deps = repo.dependencies(result)
        if _want_json(ctx, as_json):
            _echo_json(
                {
                    "kind": "slice",
                    "artifact": str(result),
                    "path": str(path),
                    "dependencies": {k: str(v) for k, v in deps.items()},
                }
            )
            return
        click.echo(f"Deployed {result} to {path}")
        if deps:
            click.echo("Slice dependencies: " + ", ".join(f"{k} {v}" for k, v in deps.items()))
        return
    if _want_json(ctx, as_json):
        _echo_json({"kind": "library", "artifact": None, "path": str(result), "dependencies": {}})
        return
    click.echo(f"Stored library wheel {result.name} in the wheelhouse {result.parent}")


@artifact.command("list")
@click.option("--libs", is_flag=True, help="List the library wheels of the wheelhouse (_libs/) instead.")
@_repository_option
@_json_option
@click.pass_context
def list_artifacts(ctx: click.Context, libs: bool, repository: str | None, as_json: bool) -> None:
    """List the deployed slice artifacts (every version) with their slice dependencies."""
    from aether.slices.errors import InvalidWheel

    repo = _repo(ctx, repository)
    if libs:
        wheels = repo.library_wheels()
        if _want_json(ctx, as_json):
            _echo_json([{"wheel": w.name, "path": str(w)} for w in wheels])
            return
        if not wheels:
            click.echo(f"No library wheels in {repo.libs_dir}.")
            return
        for w in wheels:
            click.echo(w.name)
        return
    rows: list[dict[str, Any]] = []
    for a in repo.list():
        try:
            info = repo.info(a)
            deps = {k: str(v) for k, v in info.dependencies.items()}
            wheel = info.path.name
            problem = None
        except InvalidWheel as e:
            deps, wheel, problem = {}, "", str(e)
        rows.append(
            {
                "artifact": str(a),
                "name": a.name,
                "version": str(a.version),
                "wheel": wheel,
                "dependencies": deps,
                "error": problem,
            }
        )
    if _want_json(ctx, as_json):
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"No artifacts in {repo.root}.")
        click.echo("Deploy one with `aether artifact deploy WHEEL`.")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Artifacts in {escape(str(repo.root))}", title_justify="left")
    table.add_column("Artifact")
    table.add_column("Version")
    table.add_column("Wheel")
    table.add_column("Calls")
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in r["dependencies"].items())
        wheel_cell = escape(r["wheel"]) if r["error"] is None else f"[red]{escape(r['error'])}[/red]"
        table.add_row(escape(r["name"]), escape(r["version"]), wheel_cell, escape(calls))
    Console(highlight=False, soft_wrap=False).print(table)


@artifact.command("versions")
@click.argument("name", metavar="GROUP:ARTIFACT")
@_repository_option
@_json_option
@click.pass_context
def versions(ctx: click.Context, name: str, repository: str | None, as_json: bool) -> None:
    """List the deployed versions of GROUP:ARTIFACT, oldest first (exit 1 if there are none)."""
    from aether.core.errors import BadRequest

    repo = _repo(ctx, repository)
    try:
        found = repo.versions(name)
    except BadRequest as e:
        _fail(str(e), EXIT_USAGE, hint="Give the name as GROUP:ARTIFACT, e.g. org.example:hello.")
    if _want_json(ctx, as_json):
        _echo_json([str(v) for v in found])
    else:
        for v in found:
            click.echo(str(v))
    if not found:
        names = repo.names()
        hint = f"Deployed: {', '.join(names)}." if names else "The repository is empty."
        _fail(f"no versions of {name} in {repo.root}", hint=hint + " See `aether artifact list`.")
