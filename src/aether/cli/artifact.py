"""`aether artifact deploy|list|versions|delete`: the artifact repository (click group `artifact`).

Two modes (docs/repository.md):

- **cluster** (the default): through a node's management API (the global `--connect`, default the
  local cluster's first node): uploads streamed with their sha256 (progress on stderr when an upload
  takes over a second), listings from the cluster's manifests;
- **directory**, with `--repository DIR` before or after the subcommand (`aether artifact
  --repository DIR deploy W` == `aether artifact deploy --repository DIR W`; after wins) or env
  `AETHER_REPOSITORY` (unless `--connect` is given on the command line; with a note): works on
  that directory directly, no node needed (preparing a machine's bootstrap directory before its
  nodes start; `--coords` only here). With neither, and no node answering at the default address,
  the directory `~/.aether/repository` is used, with a note.
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
    from collections.abc import Callable

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
    from aether.cli.common import echo_json  # JSON, or YAML under -o yaml

    echo_json(data)


def _cluster(ctx: click.Context, repository: str | None) -> Any:
    """The management client to use, or None for directory mode (see the module docstring)."""
    from click.core import ParameterSource

    if repository:
        return None
    root = ctx.find_root()
    settings = root.obj
    group_dir = ctx.meta.get("aether.artifact.repository")
    if settings is None or not hasattr(settings, "connect"):
        return None  # the group used on its own (tests): directory mode
    if group_dir:
        # AETHER_REPOSITORY (a local cluster's, say) does not win over a --connect typed with the
        # command: `aether --connect H:P artifact deploy W` copied W into that directory, where
        # the cluster never saw it
        from_env = ctx.meta.get("aether.artifact.repository_from_env", False)
        if not (from_env and root.get_parameter_source("connect") == ParameterSource.COMMANDLINE):
            if from_env:
                click.echo(
                    f"note: working on the directory {group_dir} (AETHER_REPOSITORY), not on a node; "
                    "pass --connect HOST:PORT for a cluster's repository",
                    err=True,
                )
            return None
    from aether.cli.common import make_client

    client = make_client(settings)
    explicit = root.get_parameter_source("connect") not in (None, ParameterSource.DEFAULT)
    if explicit:
        return client
    from aether.cli.client import ApiUnreachable

    try:
        client.request("GET", "/api/v1/repository/artifacts")
    except ApiUnreachable:
        click.echo(
            f"note: no node answers at {client.target}; using the directory ~/.aether/repository "
            "(pass --connect HOST:PORT for a cluster, --repository DIR for another directory)",
            err=True,
        )
        return None
    return client


def _repo(ctx: click.Context, repository: str | None) -> Repository:
    """The repository of `--repository` on the subcommand, else on the group (or its env/default)."""
    from aether.slices.repository import Repository

    root: str | None = repository or ctx.meta.get("aether.artifact.repository")
    return Repository(root)


def _json_option(f: Any) -> Any:
    from aether.cli.common import json_option  # --json and -o table|wide|json|yaml

    return json_option(f)


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
    from click.core import ParameterSource

    ctx.meta["aether.artifact.repository"] = repository
    ctx.meta["aether.artifact.repository_from_env"] = (
        ctx.get_parameter_source("repository") == ParameterSource.ENVIRONMENT
    )


@artifact.command("deploy")
@click.argument(
    "wheels", metavar="WHEEL...", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False)
)
@click.option(
    "--coords",
    metavar="G:A:V",
    default=None,
    help="Deploy under these coordinates instead of the ones the wheel declares (directory mode).",
)
@_repository_option
@_json_option
@click.pass_context
def deploy(
    ctx: click.Context, wheels: tuple[str, ...], coords: str | None, repository: str | None, as_json: bool
) -> None:
    """Upload WHEELs to the cluster's repository (or copy them into a directory).

    Through a node (default): each wheel is streamed with its sha256 and stored in the cluster; a
    version that is there with the same bytes is a no-op, with other bytes an error. With
    --repository DIR: a slice wheel (with an `aether.slices` entry point) goes to
    {group}/{artifact}/{version}/, replacing a wheel of the same version; a library wheel goes to
    the wheelhouse _libs/, from which nodes install libraries offline.
    """
    client = None if coords is not None else _cluster(ctx, repository)
    if client is not None:
        _upload_all(ctx, client, [Path(w) for w in wheels], as_json)
        return
    if len(wheels) > 1 and coords is not None:
        _fail("--coords takes one WHEEL", EXIT_USAGE)
    results = [_deploy_dir(ctx, w, coords, repository) for w in wheels]
    if _want_json(ctx, as_json):
        for r in results:
            r.pop("_text")
        _echo_json(results[0] if len(results) == 1 else results)
        return
    for r in results:
        click.echo(r.pop("_text"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _upload_all(ctx: click.Context, client: Any, wheels: list[Path], as_json: bool) -> None:
    import hashlib
    import time

    rows = []
    for w in wheels:
        h = hashlib.sha256()
        with open(w, "rb") as f:
            for data in iter(lambda: f.read(1 << 20), b""):
                h.update(data)
        shown = [False]

        def progress(
            sent: int, total: int, name: str = w.name, started: float = time.monotonic(),
            shown: list[bool] = shown,
        ) -> None:
            if time.monotonic() - started < 1.0 and not shown[0]:
                return  # progress only for uploads that take over a second
            shown[0] = True
            pct = 100 * sent // max(total, 1)
            click.echo(f"\ruploading {name}: {pct}% of {_size(total)}", nl=sent >= total, err=True)

        body = _upload_one(client, w, h.hexdigest(), progress, shown)
        import msgspec

        answer = msgspec.json.decode(body)
        m = answer["manifest"]
        row = {
            "kind": "slice" if m.get("coords") else "library",
            "artifact": m.get("coords"),
            "project": m["project"],
            "version": m["version"],
            "wheel": m["filename"],
            "size": m["size"],
            "sha256": m["sha256"],
            "created": answer["created"],
            "dependencies": m.get("dependencies", {}),
        }
        rows.append(row)
        if not _want_json(ctx, as_json):
            what = row["artifact"] or f"library {row['project']} {row['version']}"
            verb = "Stored" if row["created"] else "Already stored (same sha256):"
            click.echo(f"{verb} {what} ({row['wheel']}, {_size(row['size'])}, sha256 {row['sha256'][:12]}…)")
    if _want_json(ctx, as_json):
        _echo_json(rows)


UPLOAD_ATTEMPTS = 3


def _upload_one(
    client: Any, wheel: Path, sha256: str, progress: Callable[[int, int], None], shown: list[bool]
) -> bytes:
    """The node's answer to the upload of `wheel`, sent again (up to `UPLOAD_ATTEMPTS` times in
    all) while the node answers 503 with ``Retry-After``: its map did not take the chunks within
    the node's bound (a partition being taken over) and nothing was stored. Other failures exit
    with the CLI's message (`report`)."""
    import time

    from aether.cli.client import ApiError
    from aether.cli.common import report

    path = f"/api/v1/repository/files/{wheel.name}"
    attempt = 1
    while True:
        try:
            return bytes(client.upload(path, wheel, {"sha256": sha256}, progress))
        except Exception as e:
            if shown[0]:
                click.echo("", err=True)
                shown[0] = False
            if not isinstance(e, ApiError) or e.status != 503 or e.retry_after is None:
                report(e)
            if attempt == UPLOAD_ATTEMPTS:
                report(e)
            attempt += 1
            click.echo(
                f"{e.detail}\ntrying again in {e.retry_after:g} s (attempt {attempt} of "
                f"{UPLOAD_ATTEMPTS})",
                err=True,
            )
            time.sleep(e.retry_after)


def _deploy_dir(ctx: click.Context, wheel: str, coords: str | None, repository: str | None) -> dict[str, Any]:
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
        text = f"Deployed {result} to {path}"
        if deps:
            text += "\nSlice dependencies: " + ", ".join(f"{k} {v}" for k, v in deps.items())
        return {
            "kind": "slice",
            "artifact": str(result),
            "path": str(path),
            "dependencies": {k: str(v) for k, v in deps.items()},
            "_text": text,
        }
    return {
        "kind": "library",
        "artifact": None,
        "path": str(result),
        "dependencies": {},
        "_text": f"Stored library wheel {result.name} in the wheelhouse {result.parent}",
    }


@artifact.command("list")
@click.option("--libs", is_flag=True, help="List the library wheels of the wheelhouse (_libs/) instead.")
@_repository_option
@_json_option
@click.pass_context
def list_artifacts(ctx: click.Context, libs: bool, repository: str | None, as_json: bool) -> None:
    """List the deployed slice artifacts (every version) with their slice dependencies."""
    from aether.slices.errors import InvalidWheel

    client = _cluster(ctx, repository)
    if client is not None:
        _list_cluster(ctx, client, libs, as_json)
        return
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
    from rich.markup import escape
    from rich.table import Table

    from aether.cli.render import console

    table = Table(title=f"Artifacts in {escape(str(repo.root))}", title_justify="left")
    table.add_column("Artifact")
    table.add_column("Version")
    table.add_column("Wheel")
    table.add_column("Calls")
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in r["dependencies"].items())
        wheel_cell = escape(r["wheel"]) if r["error"] is None else f"[red]{escape(r['error'])}[/red]"
        table.add_row(escape(r["name"]), escape(r["version"]), wheel_cell, escape(calls))
    console().print(table)  # full width when piped, no emoji codes in G:A:V


@artifact.command("versions")
@click.argument("name", metavar="GROUP:ARTIFACT")
@_repository_option
@_json_option
@click.pass_context
def versions(ctx: click.Context, name: str, repository: str | None, as_json: bool) -> None:
    """List the deployed versions of GROUP:ARTIFACT (or of a library's project), oldest first
    (exit 1 if there are none)."""
    from aether.core.errors import BadRequest

    client = _cluster(ctx, repository)
    if client is not None:
        rows = _manifests(client)
        listed = _versions_of(rows, name)
        if _want_json(ctx, as_json):
            _echo_json(listed)
        else:
            for text in listed:
                click.echo(text)
        if not listed:
            names = sorted({r["coords"].rsplit(":", 1)[0] if r.get("coords") else r["project"] for r in rows})
            hint = f"The cluster has: {', '.join(names)}." if names else "The cluster's repository is empty."
            _fail(
                f"no versions of {name} in the cluster's repository",
                hint=hint + " See `aether artifact list`.",
            )
        return
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


# --- cluster mode -------------------------------------------------------------------------------------


def _manifests(client: Any) -> list[dict[str, Any]]:
    from aether.cli.common import call

    rows = call(client, lambda c: c.get_json("/api/v1/repository/artifacts"))
    return list(rows) if isinstance(rows, list) else []


def _versions_of(rows: list[dict[str, Any]], name: str) -> list[str]:
    from packaging.utils import canonicalize_name

    if ":" in name:
        out = [
            r["coords"].rsplit(":", 1)[1]
            for r in rows
            if r.get("coords", "") and r["coords"].rsplit(":", 1)[0] == name
        ]
    else:
        out = [r["version"] for r in rows if r["project"] == canonicalize_name(name)]
    from packaging.version import InvalidVersion, Version

    def key(v: str) -> Any:
        try:
            return (0, Version(v))
        except InvalidVersion:
            return (1, v)

    return sorted(set(out), key=key)


def _list_cluster(ctx: click.Context, client: Any, libs: bool, as_json: bool) -> None:
    rows = []
    for m in _manifests(client):
        is_lib = not m.get("coords")
        if is_lib != libs:
            continue
        coords = m.get("coords") or ""
        rows.append(
            {
                "artifact": coords or None,
                "name": coords.rsplit(":", 1)[0] if coords else m["project"],
                "version": coords.rsplit(":", 1)[1] if coords else m["version"],
                "project": m["project"],
                "wheel": m["filename"],
                "size": m["size"],
                "sha256": m["sha256"],
                "dependencies": m.get("dependencies", {}),
                "error": None,
            }
        )
    if _want_json(ctx, as_json):
        _echo_json(rows)
        return
    if not rows:
        click.echo(
            f"No {'library wheels' if libs else 'artifacts'} in the cluster's repository ({client.target})."
        )
        click.echo("Upload one with `aether artifact deploy WHEEL`.")
        return
    from rich.markup import escape
    from rich.table import Table

    from aether.cli.render import console

    title = "Library wheels" if libs else "Artifacts"
    table = Table(
        title=f"{title} in the cluster's repository ({escape(client.target)})", title_justify="left"
    )
    for col in (
        "Project" if libs else "Artifact",
        "Version",
        "Wheel",
        "Size",
        "sha256",
        *(() if libs else ("Calls",)),
    ):
        table.add_column(col)
    for r in rows:
        cells = [
            escape(r["name"]),
            escape(r["version"]),
            escape(r["wheel"]),
            _size(r["size"]),
            r["sha256"][:12],
        ]
        if not libs:
            cells.append(escape(", ".join(f"{k} {v}" for k, v in r["dependencies"].items())))
        table.add_row(*cells)
    console().print(table)  # full width when piped, no emoji codes in G:A:V


@artifact.command("delete")
@click.argument("target", metavar="G:A:V | PROJECT")
@click.argument("version", required=False)
@_repository_option
@_json_option
@click.pass_context
def delete(
    ctx: click.Context, target: str, version: str | None, repository: str | None, as_json: bool
) -> None:
    """Remove one version: a slice by its coordinates (G:A:V), or a library by PROJECT VERSION.

    Nodes running it keep their loaded copy; new loads of it fail."""
    from urllib.parse import quote

    from aether.core.artifact import Artifact
    from aether.core.errors import BadRequest

    coords: Artifact | None = None
    if target.count(":") == 2:
        if version is not None:
            # `delete G:A:V X` once deleted G:A:V and ignored X: a typo deleted a version
            _fail(
                f"{target} names its version already; the extra argument {version!r} is not used",
                EXIT_USAGE,
                hint="Give a slice as GROUP:ARTIFACT:VERSION, a library as PROJECT VERSION.",
            )
        try:
            coords = Artifact.parse(target)
        except BadRequest as e:
            _fail(
                str(e),
                EXIT_USAGE,
                hint="Give a slice as GROUP:ARTIFACT:VERSION, a library as PROJECT VERSION.",
            )
    elif target.count(":") == 1 and version is not None:
        _fail(
            f"{target} is a slice's GROUP:ARTIFACT: give the slice as {target}:{version}",
            EXIT_USAGE,
        )
    elif version is None:
        _fail("give the version: PROJECT VERSION, or a slice as GROUP:ARTIFACT:VERSION", EXIT_USAGE)
    client = _cluster(ctx, repository)
    if client is None:
        import shutil

        if coords is None:
            _fail(
                "directory mode deletes slices only (G:A:V); remove library wheels from _libs/ by hand",
                EXIT_USAGE,
            )
        repo = _repo(ctx, repository)
        d = repo.artifact_dir(coords)
        if not d.is_dir():
            _fail(f"{coords} is not in {repo.root}")
        shutil.rmtree(d)
        removed: dict[str, Any] = {"artifact": str(coords), "path": str(d)}
    else:
        from aether.cli.common import call

        if coords is not None:
            found = [m for m in _manifests(client) if m.get("coords") == str(coords)]
            if not found:
                _fail(f"{coords} is not in the cluster's repository", hint="See `aether artifact list`.")
            project, ver = found[0]["project"], found[0]["version"]
        else:
            project, ver = target, str(version)
        path = f"/api/v1/repository/artifacts/{quote(project, safe='')}/{quote(ver, safe='')}"
        answer = call(client, lambda c: c.send_json("DELETE", path))
        removed = answer if isinstance(answer, dict) else {}
    if _want_json(ctx, as_json):
        _echo_json(removed)
        return
    click.echo(f"Deleted {removed.get('artifact') or removed.get('coords') or removed.get('filename')}")
