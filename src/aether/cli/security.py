"""`aether key create|list|revoke`: API keys with roles (`/api/v1/keys`, role admin).

A created key is printed once (stdout, alone on its line, or in `--json`); the cluster keeps
only its salted hash. See docs/management-api.md, *Roles and keys*.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import click

from aether.cli.common import Settings, call, echo_json, json_option, make_client

ROLE_CHOICE = click.Choice(["read", "operate", "admin"])


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "-"


@click.group()
def key() -> None:
    """Manage API keys with roles: read (GETs), operate (deploy, scale, blueprints, maps,
    invoke), admin (keys, audit, membership). Needs an admin key (the node's own key is one)."""


@key.command("create")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, required=True, help="What the key may do.")
@json_option
@click.pass_obj
def key_create(settings: Settings, name: str, role: str, as_json: bool) -> None:
    """Create key NAME with ROLE and print it, once: the cluster stores only its hash."""
    client = make_client(settings)
    doc: Any = call(client, lambda c: c.send_json("POST", "/api/v1/keys", {"name": name, "role": role}))
    if settings.json or as_json:
        echo_json(doc)
        return
    click.echo(
        f"Created key {doc['name']!r} with role {doc['role']}. It is shown only now; keep it safe:", err=True
    )
    click.echo(doc["key"])


@key.command("list")
@json_option
@click.pass_obj
def key_list(settings: Settings, as_json: bool) -> None:
    """List the keys stored in the cluster (names, roles, creation times; never the keys)."""
    client = make_client(settings)
    keys: Any = call(client, lambda c: c.get_json("/api/v1/keys"))
    if settings.json or as_json:
        echo_json(keys)
        return
    if not keys:
        click.echo("No keys stored (the node's own key is the bootstrap admin key).")
        return
    from rich.table import Table

    from aether.cli import render

    table = Table(title=f"API keys ({len(keys)})", title_justify="left")
    for col in ("Name", "Role", "Created"):
        table.add_column(col)
    for k in keys:
        table.add_row(str(k["name"]), str(k["role"]), _when(k.get("created")))
    render.console().print(table)


@key.command("revoke")
@click.argument("name")
@json_option
@click.pass_obj
def key_revoke(settings: Settings, name: str, as_json: bool) -> None:
    """Revoke key NAME: every node refuses it (401) once the removal is applied."""
    client = make_client(settings)
    doc: Any = call(client, lambda c: c.send_json("DELETE", f"/api/v1/keys/{quote(name, safe='')}"))
    if settings.json or as_json:
        echo_json(doc)
        return
    click.echo(f"Revoked key {name!r}.")


@click.command()
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="At most this many entries."
)
@json_option
@click.pass_obj
def audit(settings: Settings, limit: int, as_json: bool) -> None:
    """The newest write operations the connected node served: who (key, remote address), what
    (method, path, target), when, and the result (HTTP status). Needs an admin key.

    Each node keeps its own last 1000 in memory and logs every entry (logger aether.audit.NODE).
    """
    client = make_client(settings)
    entries: Any = call(client, lambda c: c.get_json("/api/v1/audit", {"limit": str(limit)}))
    if settings.json or as_json:
        echo_json(entries)
        return
    if not entries:
        click.echo(f"No write operations audited on {client.target} since it started.")
        return
    from rich.markup import escape
    from rich.table import Table

    from aether.cli import render

    node = escape(str(entries[0].get("node")))
    table = Table(title=f"Audit of {node} ({len(entries)})", title_justify="left")
    for col in ("Time", "Key", "Remote", "Method", "Path", "Target", "Status"):
        table.add_column(col, justify="right" if col == "Status" else "left")
    for e in entries:
        status = int(e.get("status", 0))
        color = "green" if status < 400 else "yellow" if status < 500 else "red"
        table.add_row(
            _when(e.get("time")),
            escape(str(e.get("key") or "-")),
            escape(str(e.get("remote") or "-")),
            str(e.get("method")),
            escape(str(e.get("path"))),
            escape(str(e.get("target") or "-")),
            f"[{color}]{status}[/{color}]",
        )
    render.console().print(table)


# --- secrets -----------------------------------------------------------------------------------------


def _strip_newline(text: str) -> str:
    """One trailing newline off (what `echo` and editors add), nothing else."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


@click.group()
def secret() -> None:
    """Manage secrets that slice configs name (`db_password = { secret = "db-password" }` in a
    blueprint's [slices.NAME.config]). Values are never shown; set and delete need an admin key."""


@secret.command("set")
@click.argument("name")
@click.option(
    "--from-file", "from_file", type=click.File("rb"), metavar="FILE",
    help="Read the value from FILE (`-`: stdin). Without it the value is read from stdin, or asked "
    "for (hidden, twice) when stdin is a terminal. One trailing newline is dropped.",
)
@json_option
@click.pass_obj
def secret_set(settings: Settings, name: str, from_file: Any, as_json: bool) -> None:
    """Create or change secret NAME. Slices whose config names it get the new value: their instances
    restart one at a time (or reconfigure in place, if the slice has a reload hook)."""
    import sys

    from aether.cli.common import EXIT_USAGE, fail

    if from_file is not None:
        raw = from_file.read()
    elif sys.stdin.isatty():
        raw = click.prompt(f"Value of secret {name}", hide_input=True, confirmation_prompt=True,
                           err=True).encode()
    else:
        raw = sys.stdin.buffer.read()
    try:
        value = _strip_newline(raw.decode("utf-8"))
    except UnicodeDecodeError:
        fail(f"the value of secret {name!r} is not UTF-8 text; secrets are text (base64-encode binary data)",
             EXIT_USAGE)
    if not value:
        fail(f"the value of secret {name!r} is empty", EXIT_USAGE)
    client = make_client(settings)
    as_json = settings.json or as_json
    before: Any = None if as_json else call(client, lambda c: c.get_json("/api/v1/secrets"))
    doc: Any = call(client, lambda c: c.send_json("PUT", f"/api/v1/secrets/{quote(name, safe='')}",
                                                  {"value": value}))
    if as_json:
        echo_json(doc)
        return
    # the answer is the same for a new value and for the value the secret already had (no new
    # version, nothing restarts): tell them apart by the version it had before
    previous = next((i.get("version") for i in before or [] if i.get("name") == doc["name"]), None)
    if previous is None:
        click.echo(f"Created secret {doc['name']!r} (version {doc['version']}).")
    elif previous == doc["version"]:
        click.echo(f"Secret {doc['name']!r} already has this value: unchanged (version {doc['version']}).")
    else:
        click.echo(f"Changed secret {doc['name']!r} (version {doc['version']}).")


@secret.command("list")
@json_option
@click.pass_obj
def secret_list(settings: Settings, as_json: bool) -> None:
    """List the secrets stored in the cluster (names, times, versions; never the values)."""
    client = make_client(settings)
    items: Any = call(client, lambda c: c.get_json("/api/v1/secrets"))
    if settings.json or as_json:
        echo_json(items)
        return
    if not items:
        click.echo("No secrets stored.")
        return
    from rich.markup import escape
    from rich.table import Table

    from aether.cli import render

    table = Table(title=f"Secrets ({len(items)})", title_justify="left")
    for col in ("Name", "Version", "Created", "Changed"):
        table.add_column(col, justify="right" if col == "Version" else "left")
    for s in items:
        table.add_row(
            escape(str(s["name"])), str(s["version"]), _when(s.get("created")), _when(s.get("updated"))
        )
    render.console().print(table)


@secret.command("delete")
@click.argument("name")
@json_option
@click.pass_obj
def secret_delete(settings: Settings, name: str, as_json: bool) -> None:
    """Delete secret NAME (refused while a blueprint's config names it)."""
    client = make_client(settings)
    doc: Any = call(client, lambda c: c.send_json("DELETE", f"/api/v1/secrets/{quote(name, safe='')}"))
    if settings.json or as_json:
        echo_json(doc)
        return
    click.echo(f"Deleted secret {name!r}.")
