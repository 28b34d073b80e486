"""What every `aether` command module shares: the global settings, exit codes, output helpers
and the management-API client factory with the CLI's error messages.

Imports point one way: `aether.cli.main` (the group) imports the command modules, which import
this module; nothing here imports a command module or `main`. Only click and `aether.core` are
imported at module level (start-up time: `aether --help` imports this); the HTTP client, msgspec
and rich are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from aether.core.errors import ConfigError

if TYPE_CHECKING:
    from aether.cli.client import ManagementClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_CONNECT = "127.0.0.1:9000"  # same as aether.cli.client.DEFAULT_CONNECT (not imported: start-up)
DEFAULT_TIMEOUT = 15.0  # same as aether.client.management.DEFAULT_TIMEOUT: above the server's own deadlines
DEFAULT_CLUSTER_DIR = ".aether/cluster"  # same as aether.cli.local_cluster.DEFAULT_DIR

UNREACHABLE_HINT = (
    "Is a node running there? Start a local cluster with `aether cluster start`, "
    "or point to a running node with --connect HOST:PORT (or AETHER_CONNECT)."
)

_T = TypeVar("_T")


@dataclass
class Settings:
    """Global options, shared by every command through the click context."""

    connect: str = DEFAULT_CONNECT
    json: bool = False
    api_key: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    ca: str | None = None  # CA certificate that verifies a node's HTTPS certificate (--ca)
    output: str = "table"  # -o: table | wide | json | yaml (json and yaml also set `json`)
    stream: bool = False  # --watch runs: JSON one document per line, YAML documents start with ---


# -- output helpers ---------------------------------------------------------------------------------


class FiniteFloatRange(click.FloatRange):
    """A float option (within the bounds given, if any) that refuses inf, -inf and nan: click's
    own FloatRange lets them through (inf > 0, and every comparison with nan is false), and a JSON
    body has no form for them (msgspec writes null, which the server reads as "not set":
    `aether update G:A --to V --interval inf` rolled out with the blueprint's interval)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = click.FLOAT.convert(value, param, ctx)  # the number, then its range
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number (inf and nan are not accepted)", param, ctx)
        return super().convert(rv, param, ctx)

    def _describe_range(self) -> str:
        # without bounds click's help said "x<=None"
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()


def fail(message: str, code: int = EXIT_FAILED, *, hint: str | None = None) -> NoReturn:
    """Print `error: message` in red (and a hint) to stderr and exit with `code`."""
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.echo(hint, err=True)
    raise click.exceptions.Exit(code)


def _settings() -> Settings | None:
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(Settings) if ctx is not None else None


def output_format() -> str:
    """The `-o` format of the running command: table (the default), wide, json or yaml."""
    settings = _settings()
    return settings.output if settings is not None else "table"


def _streaming() -> bool:
    settings = _settings()
    return settings is not None and settings.stream


def echo_json(data: object) -> None:
    """Print `data` as indented JSON, or as YAML under `-o yaml`."""
    import msgspec

    if output_format() == "yaml":
        echo_yaml(msgspec.to_builtins(data))
    elif _streaming():
        echo_json_line(data)
    else:
        click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


def echo_json_bytes(body: bytes) -> None:
    """Print a JSON answer indented, as the node sent it (or as text if it is not JSON); as YAML
    under `-o yaml`."""
    import msgspec

    try:
        if output_format() == "yaml":
            echo_yaml(msgspec.json.decode(body))
        elif _streaming():
            echo_json_line(msgspec.json.decode(body))
        else:
            click.echo(msgspec.json.format(body, indent=2).decode())
    except msgspec.DecodeError:
        click.echo(body.decode(errors="replace"))


def echo_yaml(data: object) -> None:
    """Print JSON-able `data` as a YAML document (keys in their order, block style)."""
    import yaml

    text = yaml.safe_dump(
        data, sort_keys=False, allow_unicode=True, default_flow_style=False, explicit_start=_streaming()
    )
    click.echo(text, nl=False)


def echo_json_line(data: object) -> None:
    """Print `data` as one line of JSON (a stream: `--watch -o json`, `events --json`)."""
    import msgspec

    click.echo(msgspec.json.encode(data).decode())


OUTPUT_FORMATS = ("table", "wide", "json", "yaml")


def _set_output(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    settings = ctx.find_object(Settings)
    if value is not None and settings is not None:
        settings.output = value
        settings.json = value in ("json", "yaml")


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`-o/--output table|wide|json|yaml` (sets `Settings.output`, and `Settings.json` for json
    and yaml): on the group (`aether -o json status`) and on every command with `json_option`."""
    return click.option(
        "-o",
        "--output",
        type=click.Choice(OUTPUT_FORMATS),
        default=None,
        expose_value=False,
        callback=_set_output,
        help="Output format: table (default), wide (tables never truncated), json, yaml.",
    )(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`-o table|wide|json|yaml` and `--json` (the same as `-o json`) on a subcommand too
    (`aether status -o json` == `aether status --json` == `aether --json status`)."""
    f = output_option(f)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (the same as -o json).")(f)


WATCH_INTERVAL = 2.0  # seconds between the refreshes of --watch
_sleep = time.sleep  # (tests replace it)


def watch_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--watch`: redraw every 2 s until Ctrl-C (with JSON, one document per line each time)."""
    return click.option(
        "-w",
        "--watch",
        is_flag=True,
        help="Redraw every 2 s until Ctrl-C (-o json: one JSON document per line).",
    )(f)


def watching(settings: Settings, watch: bool, show: Callable[[], None]) -> None:
    """Run `show()` once, or with `watch` every WATCH_INTERVAL seconds until Ctrl-C (exit 0).
    A table is redrawn on a cleared screen; JSON is printed as one compact line per refresh
    (line-delimited JSON), YAML as one `---` document per refresh."""
    if not watch:
        show()
        return
    settings.stream = True
    first = True
    try:
        while True:
            if not settings.json and not first:
                from aether.cli import render

                render.console().clear()
            show()
            first = False
            _sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None


# -- the management API --------------------------------------------------------------------------------


def make_client(settings: Settings, target: str | None = None) -> ManagementClient:
    """A client for `target` (default --connect): HTTPS for ``https://`` or a node of the local
    cluster in .aether/cluster started with --tls, verified with --ca or that cluster's CA."""
    from aether.cli.client import client_for

    try:
        return client_for(
            settings.connect if target is None else target,
            api_key=settings.api_key, timeout=settings.timeout, ca=settings.ca,
        )
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)


def call(client: ManagementClient, fn: Callable[[ManagementClient], _T]) -> _T:
    """Run one API call, turning failures into the CLI's messages and exit codes."""
    from aether.cli.client import ApiError, ApiUnreachable

    try:
        return fn(client)
    except (ApiUnreachable, ApiError) as e:
        report(e)
    except ConfigError as e:  # an argument that cannot be sent (not UTF-8)
        fail(str(e), EXIT_USAGE)


def report(e: Exception) -> NoReturn:
    """Exit with the CLI's message, hint and exit code for a failed API call (ApiUnreachable,
    ApiNoAnswer, ApiTlsError or ApiError)."""
    from aether.cli.client import SERVER_DEADLINE, ApiError, ApiNoAnswer, ApiTlsError, ApiUnreachable

    if isinstance(e, ApiTlsError):
        fail(str(e), EXIT_UNREACHABLE, hint=e.hint)
    if isinstance(e, ApiNoAnswer):
        longer = max(2 * e.timeout, SERVER_DEADLINE + 5)
        fail(
            str(e),
            EXIT_FAILED,
            hint=(
                "The node runs but is slow or busy; the operation may still complete. Check "
                f"`aether --connect {e.address} status`, or wait longer with --timeout {longer:g}."
            ),
        )
    if isinstance(e, ApiUnreachable):
        fail(str(e), EXIT_UNREACHABLE, hint=UNREACHABLE_HINT)
    if isinstance(e, ApiError):
        hint = None
        if e.status == 401:
            hint = (
                "Pass the cluster's API key with --api-key-file FILE or the AETHER_API_KEY "
                "environment variable."
            )
        elif e.status == 500:
            hint = f"The node logged the cause: `aether logs {e.address} --since 5m --level error` shows it."
        fail(f"{e.address}: {e.title} ({e.status}): {e.detail}", EXIT_FAILED, hint=hint)
    raise e


MIN_NODE_KEY_CHARS = 16  # a node's bootstrap key from a file (`aether node --api-key-file`)
MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def resolve_api_key(
    ctx: click.Context, param: str, value: str | None, key_file: str | None, *, warn: bool = True,
    min_file_chars: int = 0,
) -> str | None:
    """The API key from `--api-key` (or AETHER_API_KEY) or `--api-key-file`; never both.

    The flag form puts the key on the command line, where every local user sees it in `ps`: it
    works, with a warning on stderr. A key file is read whole, trailing whitespace stripped; a key
    in it shorter than `min_file_chars` is refused (a node's bootstrap key: one a client can guess
    is no protection).
    """
    from click.core import ParameterSource

    if key_file is not None:
        if value:
            fail(
                "give the API key once: --api-key (or AETHER_API_KEY) or --api-key-file, not both",
                EXIT_USAGE,
            )
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}", EXIT_USAGE)
        if not text or not text.isascii() or not text.isprintable():
            fail(f"the API key file {path} must hold one key of printable ASCII characters", EXIT_USAGE)
        if len(text) < min_file_chars:
            fail(
                f"the API key file {path} holds a key of {len(text)} characters: the node's key needs at "
                f"least {min_file_chars}, or anyone who can reach the management API could guess it. "
                f"Make one with: {MAKE_KEY} > {path}",
                EXIT_USAGE,
            )
        return text
    if value and warn and ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
        click.secho(
            "warning: --api-key KEY shows the key to every local user (ps, /proc); "
            "use --api-key-file FILE or the AETHER_API_KEY environment variable",
            fg="yellow",
            err=True,
        )
    return value or None
