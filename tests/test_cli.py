"""CLI client commands against a real ManagementServer, plus `aether node` configuration handling."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from aether.api.server import ManagementServer
from aether.cli.main import build_node_config, main
from aether.core.config import NodeConfig
from aether.core.errors import ConfigError
from aether.core.status import KVEntry, MemberStatus, NodeStatus
from aether.core.types import Address, PeerSpec
from conftest import refusing_port

pytestmark = pytest.mark.timeout(60)


class FakeNode:
    def __init__(
        self, node_id: str = "node-2", *, quorum: bool = True, leader: str | None = "node-1"
    ) -> None:
        self.node_id = node_id
        self.quorum = quorum
        self.leader = leader
        self.entries = [
            KVEntry("blueprints/demo:0.1.0", {"slices": {"place_order": {"instances": 3}}}),
            KVEntry("slices/node-1/org.demo:place-order:0.1.0", "ACTIVE"),
            KVEntry("slices/node-2/org.demo:place-order:0.1.0", "[bold]LOADING[/bold]"),
        ]

    def status(self) -> NodeStatus:
        return NodeStatus(
            node_id=self.node_id,
            leader=self.leader,
            quorum=self.quorum,
            nodes=[
                MemberStatus("node-1", "127.0.0.1:7000", "up"),
                MemberStatus("node-2", "127.0.0.1:7001", "up"),
                MemberStatus("node-3", "127.0.0.1:7002", "down"),
            ],
            applied_slot=99,
        )

    def kv_list(self, prefix: str) -> list[KVEntry]:
        return [e for e in self.entries if e.key.startswith(prefix)]


class BrokenNode(FakeNode):
    def status(self) -> NodeStatus:
        raise RuntimeError("boom")


class OddNode(FakeNode):
    def status(self) -> NodeStatus:
        return {"node_id": self.node_id}  # type: ignore[return-value]  # not a NodeStatus: fields missing


StartServer = Callable[..., ManagementServer]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Runs ManagementServers on an event loop in a background thread (the CLI client blocks)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[ManagementServer] = []

    def run(coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    def start(node: FakeNode | None = None, api_key: str | None = None) -> ManagementServer:
        srv = ManagementServer(node or FakeNode(), host="127.0.0.1", port=0, api_key=api_key)
        run(srv.start())
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            run(srv.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    base = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "COLUMNS": "160"}
    return CliRunner(env={**base, **(env or {})}).invoke(main, list(args), catch_exceptions=False)


def connect(srv: ManagementServer) -> list[str]:
    return ["--connect", f"127.0.0.1:{srv.port}"]


def dead_port() -> int:
    return refusing_port()  # bound, never listening: nobody else can take it meanwhile


# -- status -------------------------------------------------------------------------------------------


def test_status_table(start_server: StartServer) -> None:
    srv = start_server()
    r = invoke(*connect(srv), "status")
    assert r.exit_code == 0, r.output
    out = r.stdout
    for needle in ("node-1", "node-2", "node-3", "127.0.0.1:7001", "down", "leader", "Quorum: yes"):
        assert needle in out
    leader_line = next(line for line in out.splitlines() if "127.0.0.1:7000" in line)
    assert "leader" in leader_line
    assert "leader" not in next(line for line in out.splitlines() if "127.0.0.1:7002" in line)
    assert f"127.0.0.1:{srv.port}" in out
    assert "2/3 nodes up" in out


def test_status_without_quorum_says_so(start_server: StartServer) -> None:
    srv = start_server(FakeNode(quorum=False, leader=None))
    r = invoke(*connect(srv), "status")
    assert r.exit_code == 0
    assert "Quorum: no" in r.stdout
    assert "Leader: none" in r.stdout


@pytest.mark.parametrize("where", ["group", "command"])
def test_status_json(start_server: StartServer, where: str) -> None:
    srv = start_server()
    args = [*connect(srv), "--json", "status"] if where == "group" else [*connect(srv), "status", "--json"]
    r = invoke(*args)
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["node_id"] == "node-2"
    assert data["leader"] == "node-1"
    assert data["quorum"] is True
    assert data["nodes"][2] == {
        "id": "node-3", "address": "127.0.0.1:7002", "state": "down", "management": None, "http": None
    }


def test_connect_from_environment(start_server: StartServer) -> None:
    srv = start_server()
    r = invoke("--json", "status", env={"AETHER_CONNECT": f"127.0.0.1:{srv.port}"})
    assert r.exit_code == 0
    assert json.loads(r.stdout)["node_id"] == "node-2"


# -- kv list ------------------------------------------------------------------------------------------


def test_kv_list_table_with_prefix(start_server: StartServer) -> None:
    srv = start_server()
    r = invoke(*connect(srv), "kv", "list", "slices/")
    assert r.exit_code == 0
    assert "slices/node-1/org.demo:place-order:0.1.0" in r.stdout
    assert "ACTIVE" in r.stdout
    assert "[bold]LOADING[/bold]" in r.stdout  # values are shown literally, never as markup
    assert "blueprints/" not in r.stdout


def test_kv_list_all_shows_json_values(start_server: StartServer) -> None:
    srv = start_server()
    r = invoke(*connect(srv), "kv", "list")
    assert r.exit_code == 0
    assert '{"slices":{"place_order":{"instances":3}}}' in r.stdout
    assert "(3)" in r.stdout


def test_kv_list_json_is_the_raw_document(start_server: StartServer) -> None:
    srv = start_server()
    r = invoke(*connect(srv), "--json", "kv", "list", "blueprints/")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {
        "prefix": "blueprints/",
        "entries": [{"key": "blueprints/demo:0.1.0", "value": {"slices": {"place_order": {"instances": 3}}}}],
    }
    r2 = invoke(*connect(srv), "kv", "list", "--json", "blueprints/")
    assert json.loads(r2.stdout) == json.loads(r.stdout)


def test_kv_list_empty(start_server: StartServer) -> None:
    srv = start_server()
    r = invoke(*connect(srv), "kv", "list", "nothing/")
    assert r.exit_code == 0
    assert "No keys with prefix 'nothing/'" in r.stdout


# -- failures and exit codes --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["kv", "list"], ["--json", "status"]])
def test_unreachable_node_exits_3_with_advice(command: list[str]) -> None:
    port = dead_port()
    r = invoke("--connect", f"127.0.0.1:{port}", *command)
    assert r.exit_code == 3
    assert r.stdout == ""
    assert f"127.0.0.1:{port}" in r.stderr
    assert "aether cluster start" in r.stderr
    assert "--connect HOST:PORT" in r.stderr


def test_default_connect_is_127_0_0_1_9000(monkeypatch: pytest.MonkeyPatch) -> None:
    from aether.cli import client

    seen: list[str] = []

    def fake_get_raw(self: client.ManagementClient, path: str, params: object = None) -> bytes:
        seen.append(f"{self.address}{path}")
        raise client.ApiUnreachable(str(self.address), "connection refused")

    monkeypatch.setattr(client.ManagementClient, "get_raw", fake_get_raw)
    r = invoke("status")
    assert r.exit_code == 3
    assert seen == ["127.0.0.1:9000/api/v1/status"]
    assert "127.0.0.1:9000" in r.stderr


@pytest.mark.parametrize("value", ["nope", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_connect_is_usage_error(value: str) -> None:
    r = invoke("--connect", value, "status")
    assert r.exit_code == 2
    assert "--connect" in r.stderr


def test_api_key_required(start_server: StartServer) -> None:
    srv = start_server(api_key="k-123")
    r = invoke(*connect(srv), "status")
    assert r.exit_code == 1
    assert "401" in r.stderr and "API key" in r.stderr and "AETHER_API_KEY" in r.stderr
    assert invoke(*connect(srv), "--api-key", "k-123", "status").exit_code == 0
    assert invoke(*connect(srv), "kv", "list", env={"AETHER_API_KEY": "k-123"}).exit_code == 0
    assert invoke(*connect(srv), "--api-key", "wrong", "status").exit_code == 1


def test_server_error_exits_1_with_problem_detail(start_server: StartServer) -> None:
    srv = start_server(BrokenNode())
    r = invoke(*connect(srv), "status")
    assert r.exit_code == 1
    assert "500" in r.stderr and "see the node log" in r.stderr
    assert "boom" not in r.stderr
    # the hint names the command that shows that node's log
    assert f"`aether logs 127.0.0.1:{srv.port} --since 5m --level error`" in r.stderr


def test_unexpected_answer_names_the_node_and_the_path(start_server: StartServer) -> None:
    srv = start_server(OddNode())
    r = invoke(*connect(srv), "status")
    assert r.exit_code == 1
    assert f"error: 127.0.0.1:{srv.port}: unexpected answer to /api/v1/status: Object missing" in r.stderr


def test_no_command_prints_help() -> None:
    r = invoke()
    assert r.exit_code == 0
    assert "Commands:" in r.stdout and "cluster" in r.stdout


def test_python_dash_m_works() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aether.cli.main", "--version"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0
    assert "aether" in r.stdout


# -- aether node: configuration -----------------------------------------------------------------------


@pytest.fixture
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> list[NodeConfig]:
    """Replace aether.node.runner with a module recording the config it is given."""
    seen: list[NodeConfig] = []
    mod = types.ModuleType("aether.node.runner")

    def run_node(config: NodeConfig, *, management_api: object = None) -> int:
        from aether.api.server import ManagementServer

        assert management_api is ManagementServer  # `aether node` hosts the management API
        seen.append(config)
        if config.cluster_name == "raise-config":
            raise ConfigError("management API would listen beyond loopback without an API key")
        return 7 if config.cluster_name == "exit-7" else 0

    mod.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aether.node.runner", mod)
    return seen


PEERS = "node-1=127.0.0.1:7000,node-2=127.0.0.1:7001,node-3=127.0.0.1:7002"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--id", "node-1", "--peers", "node-1"], "ID=HOST:PORT"),
        (["--id", "node-1", "--peers", "node-1=127.0.0.1"], "HOST:PORT"),
        (["--id", "node-1", "--peers", "node-1=127.0.0.1:99999"], "1-65535"),
        (["--id", "node-1", "--peers", " , "], "--peers is empty"),
        (["--id", "-bad", "--peers", PEERS], "invalid node id"),
        (["--id", "node 1"], "invalid node id"),
        (["--id", "node-9", "--peers", PEERS], "not among the peers"),
        (["--id", "node-1", "--peers", "node-1=h:1,node-1=h:2"], "duplicate"),
        (["--id", "node-1", "--peers", PEERS, "--cluster-port", "7005"], "differs"),
        (["--id", "node-1", "--management-port", "70000"], "management_port"),
        (["--config", "/nonexistent/aether.toml"], "not found"),
    ],
)
def test_node_config_errors_exit_2(fake_runner: list[NodeConfig], args: list[str], needle: str) -> None:
    r = invoke("node", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr
    assert r.stderr.startswith("error: ")
    assert fake_runner == []


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("heartbeat_interval = inf", "heartbeat_interval = inf is not a finite number"),
        ("request_timeout = nan", "request_timeout = nan is not a finite number"),
        ("snapshot_every = 99999999999999999999999", "= 99999999999999999999999 is out of range"),
        ("heartbeat_interval = 0.0", "heartbeat_interval must be > 0"),
        ("heartbeat_timeout = -1.0", "heartbeat_timeout must be > 0"),
        ("request_timeout = 0.0", "request_timeout must be > 0"),
        ("heartbeat_interval = 1.0\nheartbeat_timeout = 0.5", "heartbeat_timeout (0.5) must be longer"),
    ],
)
def test_node_toml_numbers_the_node_cannot_run_with_exit_2(
    tmp_path: Path, fake_runner: list[NodeConfig], toml: str, needle: str
) -> None:
    """A heartbeat interval of 0 or less made the heartbeat loop spin, inf or nan never sent one
    or never declared a peer down: all were accepted."""
    cfg = tmp_path / "aether.toml"
    cfg.write_text(f'[node]\nnode_id = "node-1"\npeers = ["node-1=127.0.0.1:7000"]\n{toml}\n')
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and r.stderr.startswith("error: ")
    assert fake_runner == []


def test_node_toml_with_unknown_key_exits_2(tmp_path: Path, fake_runner: list[NodeConfig]) -> None:
    cfg = tmp_path / "aether.toml"
    cfg.write_text('[node]\nnode_id = "node-1"\nmanagment_port = 9100\n')
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2
    assert "managment_port" in r.stderr
    assert fake_runner == []


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        # a key written above [node]: it belongs to the root table, not to [node]
        ('management_port = 9100\n[node]\nnode_id = "node-1"\n',
         "`management_port` outside the [node] table"),
        # [[peers]] after [node] is a root table of its own, not the node's peers
        ('[node]\nnode_id = "node-1"\n[[peers]]\nid = "node-1"\naddress = "127.0.0.1:7000"\n',
         "[[peers]] outside the [node] table"),
        ('[node]\nnode_id = "node-1"\n[tracng]\nexporter = "otlp"\n', "[tracng] outside the [node] table"),
    ],
)
def test_node_toml_settings_outside_the_node_table_exit_2(
    tmp_path: Path, fake_runner: list[NodeConfig], toml: str, needle: str
) -> None:
    """With a [node] table, everything else but [tracing] was ignored without a word: the node
    started without the setting (found walking docs/operations.md)."""
    cfg = tmp_path / "aether.toml"
    cfg.write_text(toml)
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and r.stderr.startswith(f"error: {cfg}: "), r.stderr
    assert fake_runner == []


def test_node_toml_unknown_key_names_its_table(tmp_path: Path, fake_runner: list[NodeConfig]) -> None:
    cfg = tmp_path / "aether.toml"
    cfg.write_text('[node]\nport = 7000\n[tracing]\nexporter = "off"\n')
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2 and f"{cfg} [node]: " in r.stderr and "`port`" in r.stderr, r.stderr
    cfg.write_text('[node]\nnode_id = "node-1"\n[tracing]\nsampler = 1\n')
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2 and f"{cfg} [tracing]: " in r.stderr and "`sampler`" in r.stderr, r.stderr
    assert fake_runner == []


def test_join_stands_instead_of_the_peers_of_the_file(tmp_path: Path, fake_runner: list[NodeConfig]) -> None:
    """docs/operations.md adds a host with `--join` instead of `peers`: with the aether.toml of the
    others (node-4's id, their `peers`), the node refused to start: 'node id 'node-4' is not among
    the peers'. The flag now overrides the file's peers; --join with --peers is an error."""
    cfg = tmp_path / "aether.toml"
    peers = ", ".join(f'"{p}"' for p in PEERS.split(","))
    cfg.write_text(f'[node]\nnode_id = "node-4"\npeers = [{peers}]\n')
    r = invoke("node", "--config", str(cfg), "--join", "127.0.0.1:7000", "--cluster-port", "7003")
    assert r.exit_code == 0, r.output
    (c,) = fake_runner
    assert c.join == "127.0.0.1:7000"
    assert c.peers == [PeerSpec("node-4", Address("127.0.0.1", 7003))]  # until the member answers
    r = invoke("node", "--id", "node-1", "--peers", PEERS, "--join", "127.0.0.1:7001")
    assert r.exit_code == 2 and "--join and --peers both given" in r.stderr, r.stderr
    assert len(fake_runner) == 1


def test_node_toml_syntax_error_exits_2(tmp_path: Path, fake_runner: list[NodeConfig]) -> None:
    cfg = tmp_path / "aether.toml"
    cfg.write_text("[node\nnode_id = 1\n")
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2
    assert str(cfg) in r.stderr


def test_fault_injection_is_off_by_default_and_set_by_flag_or_toml(
    tmp_path: Path, fake_runner: list[NodeConfig]
) -> None:
    assert invoke("node").exit_code == 0
    assert fake_runner[-1].fault_injection is False
    assert invoke("node", "--fault-injection").exit_code == 0
    assert fake_runner[-1].fault_injection is True
    cfg = tmp_path / "aether.toml"
    cfg.write_text("[node]\nfault_injection = true\n")
    assert invoke("node", "--config", str(cfg)).exit_code == 0
    assert fake_runner[-1].fault_injection is True
    cfg.write_text('[node]\nfault_injection = "yes"\n')
    r = invoke("node", "--config", str(cfg))
    assert r.exit_code == 2 and "fault_injection" in r.stderr


def test_tracing_is_off_by_default_and_set_by_flags_or_toml(
    tmp_path: Path, fake_runner: list[NodeConfig]
) -> None:
    assert invoke("node").exit_code == 0
    assert (fake_runner[-1].tracing, fake_runner[-1].otlp_endpoint) == ("off", None)
    url = "http://127.0.0.1:4318/v1/traces"
    assert invoke("node", "--tracing", "otlp", "--otlp-endpoint", url).exit_code == 0
    assert (fake_runner[-1].tracing, fake_runner[-1].otlp_endpoint) == ("otlp", url)
    cfg = tmp_path / "aether.toml"
    cfg.write_text(f'[node]\nnode_id = "node-1"\n\n[tracing]\nexporter = "otlp"\nendpoint = "{url}"\n')
    assert invoke("node", "--config", str(cfg)).exit_code == 0
    assert (fake_runner[-1].tracing, fake_runner[-1].otlp_endpoint) == ("otlp", url)
    cfg.write_text(f'node_id = "node-1"\n[tracing]\nexporter = "otlp"\nendpoint = "{url}"\n')  # no [node]
    assert invoke("node", "--config", str(cfg)).exit_code == 0
    assert (fake_runner[-1].node_id, fake_runner[-1].tracing) == ("node-1", "otlp")
    for bad, needle in (('exporter = "jaeger"', "tracing must be off or otlp"),
                        ('endpoint = "collector:4318"', "otlp_endpoint must be an http"),
                        ("sampler = 1", "sampler")):
        cfg.write_text(f"[tracing]\n{bad}\n")
        r = invoke("node", "--config", str(cfg))
        assert r.exit_code == 2 and needle in r.stderr, r.stderr
    r = invoke("node", "--tracing", "zipkin")
    assert r.exit_code == 2 and "zipkin" in r.stderr


def test_node_fsync_choice_is_usage_error(fake_runner: list[NodeConfig]) -> None:
    r = invoke("node", "--fsync", "sometimes")
    assert r.exit_code == 2
    assert fake_runner == []


def test_node_flags_override_toml(tmp_path: Path, fake_runner: list[NodeConfig]) -> None:
    cfg = tmp_path / "aether.toml"
    cfg.write_text(
        "[node]\n"
        'node_id = "node-2"\n'
        f'peers = ["{PEERS.replace(",", chr(34) + ", " + chr(34))}"]\n'
        "management_port = 9101\n"
        "http_port = 8181\n"
        'data_dir = "/from/toml"\n'
        'fsync = "always"\n'
        "heartbeat_interval = 0.05\n"
    )
    r = invoke("node", "--config", str(cfg), "--management-port", "9201", "--data-dir", str(tmp_path / "d"))
    assert r.exit_code == 0, r.output
    (c,) = fake_runner
    assert c.node_id == "node-2"
    assert [p.id for p in c.peers] == ["node-1", "node-2", "node-3"]
    assert c.cluster_port == 7001  # from its own entry in peers
    assert c.management_port == 9201  # flag beats file
    assert c.http_port == 8181  # file beats default
    assert c.data_dir == str(tmp_path / "d")
    assert c.fsync == "always"
    assert c.heartbeat_interval == 0.05
    assert c.api_key is None


def test_node_refuses_a_short_api_key_file(fake_runner: list[NodeConfig], tmp_path: Path) -> None:
    """A one-character bootstrap key in the node's key file was accepted: the management API, beyond
    loopback too, was protected by a key anyone could guess. Refused, naming the file and the fix."""
    f = tmp_path / "api-key"
    for weak in ("k", "0123456789abcde"):  # (15 characters: one short)
        f.write_text(weak + "\n")
        r = invoke("node", "--id", "node-1", "--api-key-file", str(f))
        assert r.exit_code == 2, r.output
        assert f"the API key file {f} holds a key of {len(weak)} characters" in r.output, r.output
        assert "needs at least 16" in r.output
        assert "python -c 'import secrets; print(secrets.token_urlsafe(32))' > " in r.output
    assert fake_runner == []  # no node started
    f.write_text("0123456789abcdef\n")
    assert invoke("node", "--id", "node-1", "--api-key-file", str(f)).exit_code == 0
    assert fake_runner[0].api_key == "0123456789abcdef"
    # the client's key file is not the node's: it holds whatever key the cluster gave
    f.write_text("k\n")
    r = invoke("--api-key-file", str(f), "--connect", f"127.0.0.1:{dead_port()}", "status")
    assert r.exit_code == 3 and "holds a key" not in r.output, r.output


def test_node_exit_code_and_api_key_from_env(fake_runner: list[NodeConfig]) -> None:
    r = invoke("node", "--id", "node-1", "--cluster-name", "exit-7", env={"AETHER_API_KEY": "env-key"})
    assert r.exit_code == 7
    (c,) = fake_runner
    assert c.api_key == "env-key"
    assert c.peers == [PeerSpec("node-1", Address("127.0.0.1", 7000))]


def test_node_config_error_from_runner_exits_2(fake_runner: list[NodeConfig]) -> None:
    r = invoke("node", "--cluster-name", "raise-config")
    assert r.exit_code == 2
    assert "beyond loopback" in r.stderr


def test_build_node_config_defaults() -> None:
    c = build_node_config(None, {})
    assert c.node_id == "node-1"
    assert c.peers == [PeerSpec("node-1", Address("127.0.0.1", 7000))]
    assert (c.cluster_port, c.management_port, c.http_port) == (7000, 9000, 8080)


def test_build_node_config_toml_peer_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "aether.toml"
    cfg.write_text(
        'node_id = "b"\n'
        "[[peers]]\n"
        'id = "a"\naddress = "10.0.0.1:7000"\n'
        "[[peers]]\n"
        'id = "b"\naddress = "10.0.0.2:7100"\n'
    )
    c = build_node_config(str(cfg), {"host": "0.0.0.0", "api_key": "k"})
    assert c.cluster_port == 7100
    assert c.host == "0.0.0.0"
    assert c.peers[0] == PeerSpec("a", Address("10.0.0.1", 7000))


def _documented_toml_keys() -> list[str]:
    """The `aether.toml` keys docs/cli.md's table of `aether node` settings names (2nd column)."""
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    table = doc.split("| flag | `aether.toml` key | default |", 1)[1].split("\n\n", 1)[0]
    keys = {k for row in table.replace("\\|", "/").splitlines()[2:]
            for k in re.findall(r"`([a-z_]+)`", row.split("|")[2])}
    return sorted(keys)


def test_every_documented_toml_key_is_accepted(tmp_path: Path) -> None:
    """Seen: docs/cli.md gave `health_interval`, `health_timeout`, `controller_record` and
    `cpu_scheduling` as aether.toml keys, and a node refused the file ("unknown field
    `health_interval`"). Each documented key, with its default value, must load into the config."""
    keys = _documented_toml_keys()
    assert {"health_interval", "cpu_scheduling", "node_id", "repository_orphan_age"} <= set(keys), keys
    defaults = NodeConfig(node_id="node-1", peers=[PeerSpec("node-1", Address("127.0.0.1", 7000))])
    samples: dict[str, Any] = {
        "peers": ["node-1=127.0.0.1:7000"], "controller_record": str(tmp_path / "rec.jsonl"),
        "etcd_endpoints": ["127.0.0.1:2379"],
    }  # fmt: skip
    for key in keys:
        value = samples.get(key, getattr(defaults, key, None))
        if value is None:
            value = str(tmp_path / key)  # a path or a name
        cfg = tmp_path / f"{key}.toml"
        cfg.write_text(f"{key} = {json.dumps(value)}\n")  # (JSON's scalars and lists are TOML's)
        try:
            c = build_node_config(str(cfg), {})
        except ConfigError as e:
            if "unknown field" in str(e):
                raise AssertionError(f"documented aether.toml key {key!r} refused: {e}") from None
            continue  # (another check of the value: the key itself was taken)
        if key != "peers":
            assert getattr(c, key) == value, key


# -- the HTTP client ----------------------------------------------------------------------------------


def test_silent_server_is_not_called_unreachable() -> None:
    """It took the connection, so "cannot reach … Is a node running there?" (exit 3) would be
    wrong: exit 1, saying it took the request, with the way to wait longer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel accepts; nobody answers
        port = s.getsockname()[1]
        r = invoke("--connect", f"127.0.0.1:{port}", "--timeout", "0.5", "status")
    assert r.exit_code == 1
    assert "took the request but gave no answer within 0.5 s" in r.stderr
    assert "Is a node running there?" not in r.stderr and "--timeout 15" in r.stderr


def test_default_timeout_exceeds_the_server_deadlines() -> None:
    from aether.cli import client as http
    from aether.cli.common import DEFAULT_TIMEOUT, Settings
    from aether.maps.core import MapTimings

    # the map service retries for op_timeout; invoke waits 10 s by default
    op_timeout = MapTimings().op_timeout
    assert max(op_timeout, 10.0) <= http.SERVER_DEADLINE
    assert DEFAULT_TIMEOUT == http.DEFAULT_TIMEOUT == Settings().timeout > http.SERVER_DEADLINE
    assert http.ManagementClient("127.0.0.1:1").timeout == DEFAULT_TIMEOUT


def test_non_http_server_is_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]

        def serve() -> None:
            conn, _ = s.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x01garbage frame\r\n\r\n")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        r = invoke("--connect", f"127.0.0.1:{port}", "status")
        t.join(5)
    assert r.exit_code == 3
    assert "not an HTTP answer" in r.stderr


def _answer_once(raw: bytes) -> tuple[socket.socket, threading.Thread]:
    """A listening socket that answers one connection with `raw` and closes it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()

    def serve() -> None:
        conn, _ = s.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(raw)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return s, t


@pytest.mark.parametrize(
    ("raw", "outcome"),
    [
        (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n',
         b'{"a":1}'),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n" + b'{"b":2}', b'{"b":2}'),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}", "404 Not Found"),
        (b'HTTP/1.1 409 Conflict\r\nContent-Length: 64\r\n\r\n'
         b'{"type":"about:blank","title":"Taken","status":409,"detail":"x"}', "409 Taken: x"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "in the middle of the answer"),
        (b"", "closed the connection without an answer: it may serve HTTPS"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "cannot reach"),
    ],
)
def test_client_reads_http_framing_and_failures(raw: bytes, outcome: bytes | str) -> None:
    """What the hand-written parser did is aiohttp's now: chunked and sized bodies, problem
    documents, truncated and malformed answers become the CLI's errors."""
    from aether.cli.client import ApiError, ApiUnreachable, ManagementClient

    s, t = _answer_once(raw)
    with s:
        client = ManagementClient(f"127.0.0.1:{s.getsockname()[1]}", timeout=5)
        if isinstance(outcome, bytes):
            assert client.get_raw("/x") == outcome
        else:
            with pytest.raises((ApiError, ApiUnreachable)) as e:
                client.get_raw("/x")
            assert outcome in str(e.value)
        t.join(5)
