"""`aether map ...` against an in-process 3-node cluster (the CLI's blocking client runs in a thread)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from aether.cli.main import EXIT_FAILED, EXIT_USAGE, main
from maps_cluster import MapCluster

pytestmark = pytest.mark.timeout(120)

NODES = ["node-1", "node-2", "node-3"]


class Cli:
    def __init__(self, cluster: MapCluster) -> None:
        self.cluster = cluster

    async def __call__(self, *args: str, node: str = "node-1", stdin: bytes | None = None) -> Result:
        port = self.cluster.node(node).management.port
        env = {"AETHER_CONNECT": f"127.0.0.1:{port}", "AETHER_API_KEY": None, "COLUMNS": "200"}
        argv = list(args)
        return await asyncio.to_thread(
            CliRunner(env=env).invoke, main, argv, input=stdin, catch_exceptions=False
        )

    async def json(self, *args: str, node: str = "node-1") -> Any:
        r = await self(*args, "--json", node=node)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    c = MapCluster(tmp_path, 3)
    try:
        await c.start(*NODES, management=True)
        await c.wait_table(NODES)
        yield Cli(c)
    finally:
        await c.stop_all()


def rows(text: str) -> list[list[str]]:
    """The cells of a rich table's rows, the header first."""
    lines = [line.replace("┃", "│").strip("│ ") for line in text.splitlines() if line[:1] in "│┃"]
    return [[c.strip() for c in line.split("│")] for line in lines if line]


async def wait_defined(cli: Cli, name: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not all(name in n.maps.engines for n in cli.cluster.nodes.values()):
        assert loop.time() < end, f"map {name} not defined everywhere"
        await asyncio.sleep(0.01)


async def test_create_list_stats_delete(cli: Cli) -> None:
    r = await cli("map", "list")
    assert r.exit_code == 0 and "No maps defined" in r.stdout and "node-1, node-2, node-3" in r.stdout

    r = await cli("map", "create", "users", "--replicas", "2", "--engine", "sqlite")
    assert r.exit_code == 0, r.output
    assert "Created map 'users' (replicas 2, write quorum 2, sqlite" in r.stdout
    r = await cli("map", "create", "users", "--replicas", "2", "--engine", "sqlite", node="node-2")
    assert r.exit_code == 0 and "already exists" in r.stdout
    r = await cli("map", "create", "users")
    assert r.exit_code == EXIT_FAILED
    assert "(409)" in r.stderr and "replicas=2" in r.stderr and "aether map stats NAME" in r.stderr
    doc = await cli.json("map", "create", "small", "--replicas", "1", "--max-value-bytes", "32")
    assert doc == {
        "name": "small", "replicas": 1, "write_quorum": 1, "engine": "memory", "max_value_bytes": 32,
        "created": True,
    }
    await wait_defined(cli, "users")
    await wait_defined(cli, "small")

    r = await cli("map", "list", node="node-3")
    assert r.exit_code == 0
    assert rows(r.stdout)[1:] == [
        ["small", "1", "1", "memory", "32"], ["users", "2", "2", "sqlite", "1048576"]
    ], r.stdout
    doc = await cli.json("map", "list")
    assert [m["name"] for m in doc["maps"]] == ["small", "users"] and doc["members"] == NODES

    r = await cli("map", "stats", "users")
    assert r.exit_code == 0, r.output
    assert "Map users: replicas 2, write quorum 2, sqlite" in r.stdout
    table = rows(r.stdout)
    assert table[0] == [
        "Node", "Engine", "Entries", "Bytes", "Primary", "Replica", "Syncing", "Pending acks", "Lag ms"
    ]
    assert sorted(row[0] for row in table[1:]) == NODES and all(row[1] == "sqlite" for row in table[1:])
    doc = await cli.json("map", "stats", "users", node="node-2")
    assert sorted(n["node"] for n in doc["nodes"]) == NODES

    r = await cli("map", "delete", "small")
    assert (r.exit_code, r.stdout.strip()) == (0, "Deleted map 'small'")
    r = await cli("map", "delete", "small")
    assert r.exit_code == EXIT_FAILED and "(404)" in r.stderr and "aether map list" in r.stderr


async def test_bad_input(cli: Cli) -> None:
    r = await cli("map", "create", "Bad Name")
    assert r.exit_code == EXIT_FAILED and "(400)" in r.stderr and "invalid map name" in r.stderr
    r = await cli("map", "create", "x", "--replicas", "2", "--write-quorum", "3")
    assert r.exit_code == EXIT_FAILED and "write_quorum must be between 1 and replicas (2)" in r.stderr
    r = await cli("map", "create", "x", "--replicas", "0")
    assert r.exit_code == EXIT_USAGE and "--replicas" in r.stderr
    r = await cli("map", "create", "x", "--engine", "disk")
    assert r.exit_code == EXIT_USAGE and "--engine" in r.stderr
    r = await cli("map", "stats", "nope")
    assert r.exit_code == EXIT_FAILED and "(404)" in r.stderr and "'nope'" in r.stderr
    r = await cli("map", "get", "nope", "k")
    assert r.exit_code == EXIT_FAILED and "(404)" in r.stderr
    r = await cli("map", "put", "nope", "k", "{not json")
    assert r.exit_code == EXIT_USAGE and "not valid JSON" in r.stderr and "Quote strings" in r.stderr
    r = await cli("map", "put", "nope", "k", "1", "--ttl", "0")
    assert r.exit_code == EXIT_USAGE and "--ttl" in r.stderr
    r = await cli("map", "put", "nope", "k", "1", "--ttl", "soon")
    assert r.exit_code == EXIT_USAGE


async def test_entries(cli: Cli) -> None:
    assert (await cli("map", "create", "cache", "--max-value-bytes", "64")).exit_code == 0
    await wait_defined(cli, "cache")

    r = await cli("map", "put", "cache", "user/1", '{"name": "alice", "tags": [1, 2]}')
    assert r.exit_code == 0 and r.stdout.startswith("Stored cache['user/1'] (")
    r = await cli("map", "get", "cache", "user/1", node="node-3")
    assert (r.exit_code, json.loads(r.stdout)) == (0, {"name": "alice", "tags": [1, 2]})
    assert (await cli("map", "put", "cache", "user/2", '"bob"', node="node-2")).exit_code == 0
    assert (await cli("map", "put", "cache", "other key", "null")).exit_code == 0
    assert await cli.json("map", "get", "cache", "user/2") == "bob"
    assert await cli.json("map", "get", "cache", "other key") is None

    r = await cli("map", "keys", "cache")
    assert r.stdout.splitlines() == ["other key", "user/1", "user/2"]
    assert await cli.json("map", "keys", "cache", "--prefix", "user/") == ["user/1", "user/2"]

    r = await cli("map", "put", "cache", "big", json.dumps("x" * 100))
    assert r.exit_code == EXIT_FAILED and "(400)" in r.stderr and "exceeds the map's limit" in r.stderr

    # 1 s: the get before the expiry (a whole CLI run in a thread) must not lose to a stall of a
    # loaded machine (0.3 s could)
    doc = await cli.json("map", "put", "cache", "tmp", "1", "--ttl", "1")
    assert doc["ttl"] == 1.0
    assert (await cli("map", "get", "cache", "tmp")).stdout.strip() == "1"
    await asyncio.sleep(1.2)
    r = await cli("map", "get", "cache", "tmp")
    assert r.exit_code == EXIT_FAILED and "(404)" in r.stderr and "'tmp'" in r.stderr

    r = await cli("map", "remove", "cache", "user/1")
    assert (r.exit_code, r.stdout.strip()) == (0, "Removed cache['user/1']")
    r = await cli("map", "remove", "cache", "user/1")
    assert r.exit_code == EXIT_FAILED and "(404)" in r.stderr
    assert await cli.json("map", "keys", "cache") == ["other key", "user/2"]

    # the stats table counts the entries
    doc = await cli.json("map", "stats", "cache")
    assert max(n["entries"] for n in doc["nodes"]) >= 1


async def test_repl_completes_map_commands_and_names(cli: Cli) -> None:
    from aether.cli.main import Settings
    from aether.cli.repl import AetherCompleter, NodeData

    assert (await cli("map", "create", "orders")).exit_code == 0
    assert (await cli("map", "create", "other")).exit_code == 0
    port = cli.cluster.node("node-1").management.port
    c = AetherCompleter(main, NodeData(Settings(connect=f"127.0.0.1:{port}")))
    word, found = await asyncio.to_thread(c.candidates, "ma")
    assert ("map" in [v for v, _ in found]) and word == "ma"
    _, found = await asyncio.to_thread(c.candidates, "map ")
    assert [v for v, _ in found] == ["create", "delete", "get", "keys", "list", "put", "remove", "stats"]
    _, found = await asyncio.to_thread(c.candidates, "map stats o")
    assert [v for v, _ in found] == ["orders", "other"]
    _, found = await asyncio.to_thread(c.candidates, "map get orders ")
    assert found == []  # keys are not completed


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["map", "get", "cache", ""], "the key is empty"),  # was a 404 'no such endpoint: .../entries/'
        (["map", "remove", "cache", ""], "the key is empty"),
        (["map", "put", "cache", "", "1"], "the key is empty"),
        # bytes that are not UTF-8 reach Python as surrogates: these crashed with a traceback
        (["map", "get", "cache", "k\udcff"], "is not UTF-8 (byte b'\\xff' at character 1)"),
        (["map", "put", "cache", "k\udcff", "1"], "is not UTF-8"),
        (["map", "put", "cache", "k", '"\udcff"'], "is not UTF-8"),
        (["map", "remove", "cache", "\udcff"], "is not UTF-8"),
        (["map", "stats", "\udce9t\udce9"], "is not UTF-8 (byte b'\\xe9' at character 0)"),
        (["map", "keys", "cache", "--prefix", "\udcff"], "is not UTF-8"),
        # `aether kv list $'\xff'` said "cannot reach the Aether node ... (connection ...)", exit 3
        (["kv", "list", "user/\udcff"], "is not UTF-8 (byte b'\\xff' at character 5)"),
    ],
)
def test_keys_names_and_values_that_cannot_be_sent_are_usage_errors(argv: list[str], problem: str) -> None:
    """Refused before any request (no node runs at the address): exit 2 naming the argument."""
    env = {"AETHER_CONNECT": "127.0.0.1:9", "AETHER_API_KEY": None}
    r = CliRunner(env=env).invoke(main, argv, catch_exceptions=False)
    assert r.exit_code == EXIT_USAGE, r.output
    assert problem in r.stderr, r.stderr


async def test_stats_lists_a_member_the_table_dropped(cli: Cli) -> None:
    """A member down is dropped from the partition table, and `map stats` listed the table's
    members only: the dead node just disappeared. It is listed, marked, from the member set."""
    assert (await cli("map", "create", "users")).exit_code == 0
    await wait_defined(cli, "users")
    await cli.cluster.stop("node-3")
    await cli.cluster.wait_table(["node-1", "node-2"])
    r = await cli("map", "stats", "users")
    assert r.exit_code == 0, r.output
    table = rows(r.stdout)
    assert [row[0] for row in table[1:]] == NODES, r.stdout
    assert table[3][1:] == ["down: not in the table"] + ["-"] * 7, r.stdout
    assert all(row[1] == "memory" for row in table[1:3])
    assert "members: node-1, node-2" in r.stdout
    doc = await cli.json("map", "stats", "users")
    assert doc["cluster_members"] == NODES and doc["members"] == ["node-1", "node-2"]
    assert sorted(n["node"] for n in doc["nodes"]) == ["node-1", "node-2"]


async def test_put_reads_a_large_value_from_a_file_or_stdin(cli: Cli, tmp_path: Path) -> None:
    """A value larger than a shell argument (about 128 KiB: `aether map put m k "$(cat big.json)"`
    fails with 'Argument list too long') could not be put with the CLI: --file PATH, `-` for stdin."""
    assert (await cli("map", "create", "docs")).exit_code == 0
    await wait_defined(cli, "docs")
    big = {"text": "x" * 300_000, "n": [1, 2, 3]}
    f = tmp_path / "big.json"
    f.write_text(json.dumps(big) + "\n")
    r = await cli("map", "put", "docs", "big", "--file", str(f))
    assert r.exit_code == 0 and r.stdout.startswith("Stored docs['big'] ("), r.output
    assert await cli.json("map", "get", "docs", "big", node="node-2") == big
    r = await cli("map", "put", "docs", "piped", "--file", "-", "--ttl", "60", stdin=b'"from stdin"')
    assert r.exit_code == 0 and "expires in 60 s" in r.stdout, r.output
    assert await cli.json("map", "get", "docs", "piped") == "from stdin"
    # bad input: a usage error naming the problem, nothing sent
    r = await cli("map", "put", "docs", "k", "1", "--file", str(f))
    assert r.exit_code == EXIT_USAGE and "give the value once" in r.stderr, r.output
    r = await cli("map", "put", "docs", "k")
    assert r.exit_code == EXIT_USAGE and "no value: give the JSON argument or --file PATH" in r.stderr
    f.write_text("{not json")
    r = await cli("map", "put", "docs", "k", "--file", str(f))
    assert r.exit_code == EXIT_USAGE and f"the value in {f} is not valid JSON" in r.stderr, r.output
    f.write_bytes(b'"caf\xe9"')
    r = await cli("map", "put", "docs", "k", "--file", str(f))
    assert r.exit_code == EXIT_USAGE
    assert f"the value in {f} is not UTF-8 (byte b'\\xe9' at offset 4)" in r.stderr, r.output
    r = await cli("map", "put", "docs", "k", "--file", str(tmp_path / "missing.json"))
    assert r.exit_code == EXIT_USAGE and "missing.json" in r.stderr
    assert await cli.json("map", "keys", "docs") == ["big", "piped"]
