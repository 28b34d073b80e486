"""Distributed-map commands: `map list|stats|create|delete` and `map get|put|remove|keys`.

They talk to one node's management API (`--connect`); any node serves them. Values are JSON on
the command line and in the output (the node converts to and from the stored MessagePack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

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

if TYPE_CHECKING:
    from collections.abc import Callable

    from aether.cli.client import ManagementClient

_API = "/api/v1/maps"
_HINTS = {
    404: "`aether map list` shows the defined maps, `aether map keys NAME` the keys of one.",
    409: "`aether map stats NAME` shows the map's settings; create it with the same ones, "
    "or use another name.",
    413: "The management API takes bodies of at most 1 MiB.",
}


def hint_for(status: int, detail: str, *, write: bool) -> str | None:
    """The hint after a map endpoint's error answer. It never contradicts the answer: the outcome
    of a failed write is stated only when the answer does not state it itself."""
    if status != 503:
        return _HINTS.get(status)
    text = detail.lower()
    if "no quorum" in text:
        hint = (
            "The node cannot reach a majority of the cluster: start the missing nodes (`aether nodes` "
            "shows which are down; `aether cluster start` for a local cluster), then retry."
        )
    else:
        hint = (
            "The map's partition primary or a write quorum did not answer in time; check "
            "`aether map stats NAME` and `aether nodes`."
        )
    if "not applied" in text:
        return hint + " Nothing was written."
    if write and "may or may not" not in text:
        return hint + " The write may or may not have been applied: read the key before retrying."
    return hint


def _run(client: ManagementClient, fn: Callable[[ManagementClient], Any], *, write: bool = False) -> Any:
    """`_call` with hints for the map endpoints' 404, 409, 413 and 503 answers."""
    from aether.cli.client import ApiError

    def hinted(c: ManagementClient) -> Any:
        try:
            return fn(c)
        except ApiError as e:
            hint = hint_for(e.status, e.detail, write=write)
            if hint is None:
                raise
            fail(f"{e.address}: {e.title} ({e.status}): {e.detail}", EXIT_FAILED, hint=hint)

    return call(client, hinted)


def _map_path(name: str) -> str:
    return f"{_API}/{quote(name, safe='')}"


def _entry_path(name: str, key: str) -> str:
    return f"{_map_path(name)}/entries/{quote(key, safe='')}"


def _value_json(value: object) -> str:
    import msgspec

    return msgspec.json.encode(value).decode()


def _send(client: ManagementClient, method: str, path: str, body: bytes | None = None,
          params: dict[str, str] | None = None) -> Any:
    """One request with a raw JSON body; the decoded JSON answer."""
    import msgspec

    from aether.cli.client import ApiError

    raw = client.request_raw(method, path, params, body, "application/json")
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ApiError(client.target, 200, "Bad response", "the answer is not JSON") from None


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An argument the node gets as UTF-8: a shell passes bytes that are not UTF-8 as surrogates
    (`$'\\xff'`), which crashed the command with a UnicodeEncodeError traceback."""
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError as e:
            byte = value[e.start].encode("utf-8", "surrogateescape")
            raise click.BadParameter(
                f"is not UTF-8 (byte {byte!r} at character {e.start}); names, keys and values are UTF-8 text"
            ) from None
    return value


def _key(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value:
        raise click.BadParameter("the key is empty; a map key is 1 to 1024 bytes of UTF-8")
    return cast(str, _utf8(ctx, param, value))


_name_arg = click.argument("map_name", metavar="NAME", callback=_utf8)
_key_arg = click.argument("key", callback=_key)


@click.group("map")
def map_group() -> None:
    """Define, inspect and use distributed maps (values are JSON)."""


@map_group.command("list")
@json_option
@click.pass_obj
def map_list(settings: Settings, as_json: bool) -> None:
    """List the defined maps and the partition table's version and members."""
    client = make_client(settings)
    doc: Any = _run(client, lambda c: c.get_json(_API))
    if settings.json or as_json:
        echo_json(doc)
        return
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    out = render.console()
    version = doc.get("table_version")
    members = ", ".join(doc.get("members", [])) or "-"
    table_line = f"Partition table v{version}, members: {members}" if version is not None else (
        "No partition table yet (the leader writes one once the cluster has quorum)"
    )
    if not doc["maps"]:
        out.print("No maps defined. Create one with `aether map create NAME`.")
        out.print(Text(table_line))
        return
    table = Table(title="Maps", title_justify="left")
    for col in ("Name", "Replicas", "Write quorum", "Engine", "Max value bytes"):
        table.add_column(col, justify="right" if col not in ("Name", "Engine") else "left")
    for m in doc["maps"]:
        table.add_row(
            Text(m["name"]), str(m["replicas"]), str(m["write_quorum"]), m["engine"],
            str(m["max_value_bytes"]),
        )
    out.print(table)
    out.print(Text(table_line))


@map_group.command("stats")
@_name_arg
@json_option
@click.pass_obj
def map_stats(settings: Settings, map_name: str, as_json: bool) -> None:
    """Show map NAME's settings and each live node's entries, bytes, partitions and replication lag
    (a member that did not answer, or that the partition table left out, is listed as such)."""
    client = make_client(settings)
    doc: Any = _run(client, lambda c: c.get_json(_map_path(map_name)))
    if settings.json or as_json:
        echo_json(doc)
        return
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    out = render.console()
    table = Table(
        title=(
            f"Map {doc['name']}: replicas {doc['replicas']}, write quorum {doc['write_quorum']}, "
            f"{doc['engine']}, values up to {doc['max_value_bytes']} bytes"
        ),
        title_justify="left",
    )
    cols = ("Node", "Engine", "Entries", "Bytes", "Primary", "Replica", "Syncing", "Pending acks", "Lag ms")
    for col in cols:
        table.add_column(col, justify="left" if col in ("Node", "Engine") else "right")
    answered = {n["node"]: n for n in doc["nodes"]}
    in_table = set(doc.get("members", []))
    # every member: one that the table dropped (down, or not serving maps) used to just disappear
    # (`cluster_members`: absent from an older node's answer)
    for node in sorted(set(answered) | in_table | set(doc.get("cluster_members", []))):
        n = answered.get(node)
        if n is None:
            state = "[yellow]no answer[/yellow]" if node in in_table else "[red]down: not in the table[/red]"
            table.add_row(Text(node), state, *(["-"] * (len(cols) - 2)))
            continue
        lag = n["oldest_pending_ms"]
        table.add_row(
            Text(node), n["engine"], str(n["entries"]), str(n["bytes"]), str(n["primary_partitions"]),
            str(n["replica_partitions"]),
            f"[yellow]{n['syncing_partitions']}[/yellow]" if n["syncing_partitions"] else "0",
            str(n["pending_acks"]),
            f"[yellow]{lag}[/yellow]" if lag >= 1000 else str(lag),
        )
    out.print(table)
    version = doc.get("table_version")
    members = ", ".join(sorted(in_table)) or "-"
    out.print(Text(f"Partition table v{version if version is not None else '-'}, members: {members}"))


@map_group.command("create")
@_name_arg
@click.option("--replicas", type=click.IntRange(1, 9), help="Copies of every key, primary included [3].")
@click.option(
    "--write-quorum",
    type=click.IntRange(1, 9),
    help="Acknowledgements before a write returns [min(2, replicas)].",
)
@click.option("--engine", type=click.Choice(["memory", "log", "sqlite"]), help="Storage engine [memory].")
@click.option(
    "--max-value-bytes", type=click.IntRange(min=1), help="Largest encoded value in bytes [1048576]."
)
@json_option
@click.pass_obj
def map_create(
    settings: Settings,
    map_name: str,
    replicas: int | None,
    write_quorum: int | None,
    engine: str | None,
    max_value_bytes: int | None,
    as_json: bool,
) -> None:
    """Define map NAME (no change if it exists with the same settings; an error if with others)."""
    body: dict[str, Any] = {"name": map_name}
    for field, value in (
        ("replicas", replicas), ("write_quorum", write_quorum), ("engine", engine),
        ("max_value_bytes", max_value_bytes),
    ):
        if value is not None:
            body[field] = value
    client = make_client(settings)
    doc: Any = _run(client, lambda c: c.send_json("POST", _API, body), write=True)
    if settings.json or as_json:
        echo_json(doc)
        return
    verb = "Created map" if doc["created"] else "Map already exists:"
    click.echo(
        f"{verb} {doc['name']!r} (replicas {doc['replicas']}, write quorum {doc['write_quorum']}, "
        f"{doc['engine']}, values up to {doc['max_value_bytes']} bytes)"
    )


@map_group.command("delete")
@_name_arg
@json_option
@click.pass_obj
def map_delete(settings: Settings, map_name: str, as_json: bool) -> None:
    """Delete map NAME and its entries on every node."""
    client = make_client(settings)
    doc: Any = _run(client, lambda c: c.send_json("DELETE", _map_path(map_name)), write=True)
    if settings.json or as_json:
        echo_json(doc)
    else:
        click.echo(f"Deleted map {map_name!r}")


@map_group.command("get")
@_name_arg
@_key_arg
@json_option
@click.pass_obj
def map_get(settings: Settings, map_name: str, key: str, as_json: bool) -> None:
    """Print the value of KEY in map NAME as JSON (exit 1 if absent)."""
    client = make_client(settings)
    value = _run(client, lambda c: _send(c, "GET", _entry_path(map_name, key)))
    if settings.json or as_json:
        echo_json(value)
    else:
        click.echo(_value_json(value))


@map_group.command("put")
@_name_arg
@_key_arg
@click.argument("value", metavar="[JSON]", required=False, callback=_utf8)
@click.option(
    "--file", "value_file", type=click.File("rb"), metavar="PATH",
    help="Read the JSON value from PATH (`-`: stdin) instead of the JSON argument: for values larger "
    "than a shell argument (about 128 KiB).",
)
@click.option("--ttl", type=FiniteFloatRange(), metavar="SECONDS",
              help="Expire the entry after this many seconds.")
@json_option
@click.pass_obj
def map_put(
    settings: Settings, map_name: str, key: str, value: str | None, value_file: Any, ttl: float | None,
    as_json: bool,
) -> None:
    """Store the JSON value under KEY in map NAME (a string needs JSON quotes: '"text"'), given as
    the JSON argument or read with --file PATH (`-`: stdin)."""
    import msgspec

    if (value is None) == (value_file is None):
        fail(
            "give the value once: the JSON argument or --file PATH (`-`: stdin)"
            if value is not None else "no value: give the JSON argument or --file PATH (`-`: stdin)",
            EXIT_USAGE,
        )
    source = "the value"
    if value_file is not None:
        name = getattr(value_file, "name", "<stdin>")
        source = f"the value in {'stdin' if name == '<stdin>' else name}"
        try:
            value = value_file.read().decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"{source} is not UTF-8 (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                 "map values are JSON text", EXIT_USAGE)  # fmt: skip
    assert value is not None
    try:
        msgspec.json.decode(value)
    except msgspec.DecodeError as e:
        fail(
            f"{source} is not valid JSON: {e}",
            EXIT_USAGE,
            hint="Quote strings as JSON, e.g. aether map put NAME KEY '\"text\"'; numbers, true/false, "
            "null, [..] and {..} are JSON as they are.",
        )
    if ttl is not None and not 0 < ttl <= 10 * 365 * 24 * 3600:
        fail(f"--ttl must be more than 0 seconds and at most ten years, not {ttl:g}", EXIT_USAGE)
    params = {"ttl": repr(ttl)} if ttl is not None else None
    client = make_client(settings)
    doc = _run(
        client, lambda c: _send(c, "PUT", _entry_path(map_name, key), value.encode(), params), write=True
    )
    if settings.json or as_json:
        echo_json(doc)
    else:
        expires = f", expires in {ttl:g} s" if ttl is not None else ""
        click.echo(f"Stored {map_name}[{key!r}] ({doc['bytes']} bytes{expires})")


@map_group.command("remove")
@_name_arg
@_key_arg
@json_option
@click.pass_obj
def map_remove(settings: Settings, map_name: str, key: str, as_json: bool) -> None:
    """Remove KEY from map NAME (exit 1 if it was absent)."""
    client = make_client(settings)
    doc = _run(client, lambda c: _send(c, "DELETE", _entry_path(map_name, key)), write=True)
    if settings.json or as_json:
        echo_json(doc)
    else:
        click.echo(f"Removed {map_name}[{key!r}]")


@map_group.command("keys")
@_name_arg
@click.option("--prefix", default="", callback=_utf8, help="Only keys starting with this.")
@json_option
@click.pass_obj
def map_keys(settings: Settings, map_name: str, prefix: str, as_json: bool) -> None:
    """List the keys of map NAME, one per line, sorted."""
    client = make_client(settings)
    params = {"prefix": prefix} if prefix else None
    doc: Any = _run(client, lambda c: c.get_json(f"{_map_path(map_name)}/keys", params))
    if settings.json or as_json:
        echo_json(doc["keys"])
        return
    for k in doc["keys"]:
        click.echo(k)
