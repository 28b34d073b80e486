"""Local-cluster process management (`aether cluster ...`) with stand-in node processes.

The stand-in is a small script serving the real ManagementServer, so start/status/stop, pid
files, port checks and failure reports are exercised with real processes without needing the
node runtime. `tests/test_cluster_cli.py` runs the same commands against real nodes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest
from click.testing import CliRunner, Result

from aether.cli import local_cluster as lc
from aether.cli.main import main
from aether.slices.repository import Repository
from aether.slices.testing import build_library_wheel, build_slice_wheel
from conftest import aether_cli, free_port_offset
from local_cluster_cli import alive, running_demo, wait_gone

pytestmark = pytest.mark.timeout(90)

FAKE_NODE = r"""
import argparse, asyncio, signal, sys
from aether.api.server import ManagementServer
from aether.core.status import MemberStatus, NodeStatus

ap = argparse.ArgumentParser()
ap.add_argument("--mode", default="ok")
ap.add_argument("--id")
ap.add_argument("--peers")
ap.add_argument("--management-port", type=int)
args, _ = ap.parse_known_args()
peers = [p.split("=", 1) for p in args.peers.split(",")]
print(f"fake node {args.id} starting in mode {args.mode}", flush=True)
if args.mode == "crash":
    print("fatal: cannot open data dir", file=sys.stderr, flush=True)
    sys.exit(3)

class View:
    node_id = args.id
    def status(self):
        ok = args.mode != "noquorum"
        return NodeStatus(
            node_id=args.id,
            leader=min(p[0] for p in peers) if ok else None,
            quorum=ok,
            nodes=[MemberStatus(i, a, "up") for i, a in peers],
        )
    def kv_list(self, prefix):
        return []

async def run():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if args.mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with ManagementServer(View(), host="127.0.0.1", port=args.management_port):
        print("serving", flush=True)
        await stop.wait()
    print("stopped cleanly", flush=True)

asyncio.run(run())
"""


# Installed as sitecustomize.py on PYTHONPATH: replaces the node runtime in every Python process
# started with that environment, so the real `aether cluster start|demo` and `aether node` commands
# run end to end with stand-in nodes.
FAKE_RUNTIME = r"""
import sys, types

def run_node(config, *, management_api=None):
    import asyncio, json, signal
    from aether.api.server import ManagementServer
    from aether.core.status import MemberStatus, NodeStatus

    print("CONFIG " + json.dumps({
        "node_id": config.node_id, "host": config.host, "cluster_port": config.cluster_port,
        "management_port": config.management_port, "http_port": config.http_port,
        "data_dir": config.data_dir, "peers": [f"{p.id}={p.address}" for p in config.peers],
        "repository": config.repository,
    }), flush=True)

    class View:
        node_id = config.node_id
        def status(self):
            return NodeStatus(
                node_id=config.node_id, leader=min(p.id for p in config.peers), quorum=True,
                nodes=[MemberStatus(p.id, str(p.address), "up") for p in config.peers],
                management_port=config.management_port,
            )
        def kv_list(self, prefix):
            return []

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with ManagementServer(View(), host=config.host, port=config.management_port):
            await stop.wait()
        print("stopped cleanly", flush=True)
        return 0

    return asyncio.run(run())

mod = types.ModuleType("aether.node.runner")
mod.run_node = run_node
sys.modules["aether.node.runner"] = mod
"""



@pytest.fixture
def fake_node_script(tmp_path: Path) -> Path:
    p = tmp_path / "fake_aether_node.py"
    p.write_text(FAKE_NODE)
    return p


def fake_argv(script: Path, mode: str | dict[str, str] = "ok") -> lc.NodeArgv:
    def argv(record: lc.ClusterRecord, node: lc.NodeRecord) -> list[str]:
        m = mode if isinstance(mode, str) else mode.get(node.id, "ok")
        return [
            sys.executable,
            str(script),
            "--mode",
            m,
            "--id",
            node.id,
            "--peers",
            record.peers_arg(),
            "--management-port",
            str(node.management_port),
        ]

    return argv


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "cluster"
    try:
        yield d
    finally:
        lc.stop_cluster(d, timeout=2.0)  # never leave processes behind


def invoke(*args: str) -> Result:
    env = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "AETHER_PORT_OFFSET": None, "COLUMNS": "160"}
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


# -- planning -----------------------------------------------------------------------------------------


def test_plan_ports_and_paths(tmp_path: Path) -> None:
    rec = lc.plan_cluster(tmp_path / "c", 3)
    n2 = rec.nodes[1]
    assert [n.id for n in rec.nodes] == ["node-1", "node-2", "node-3"]
    assert (n2.cluster_port, n2.management_port, n2.http_port) == (7001, 9001, 8081)
    assert n2.data_dir == str((tmp_path / "c" / "node-2" / "data").absolute())
    assert n2.log.endswith("/c/node-2.log") and n2.pid_file.endswith("/c/node-2.pid")
    assert rec.peers_arg() == "node-1=127.0.0.1:7000,node-2=127.0.0.1:7001,node-3=127.0.0.1:7002"
    shifted = lc.plan_cluster(tmp_path / "c", 1, port_offset=500).nodes[0]
    assert (shifted.cluster_port, shifted.management_port, shifted.http_port) == (7500, 9500, 8580)


@pytest.mark.parametrize(("nodes", "offset"), [(0, 0), (100, 0), (3, 60000), (3, -8000)])
def test_plan_rejects_bad_sizes_and_offsets(tmp_path: Path, nodes: int, offset: int) -> None:
    with pytest.raises(lc.ClusterError):
        lc.plan_cluster(tmp_path, nodes, port_offset=offset)


def test_a_recorded_cluster_keeps_the_settings_it_was_created_with(tmp_path: Path) -> None:
    d = tmp_path / "c"
    assert lc.plan_start(d).tls_ca is None and len(lc.plan_start(d, 5).nodes) == 5  # nothing recorded
    created = lc.plan_cluster(d, 3, port_offset=100, tls=True)
    created.secret_id = "0123456789abcdef"
    lc.save_record(d, created)
    again = lc.plan_start(d)  # no flags: TLS, node count, ports and secret as created
    assert again.tls_ca == str(d.absolute() / "tls" / "ca.crt"), again
    assert (len(again.nodes), again.port_offset, again.secret_id) == (3, 100, "0123456789abcdef")
    assert lc.plan_start(d, 3, port_offset=200).nodes[0].cluster_port == 7200  # ports may move
    with pytest.raises(lc.ClusterError, match="created with 3 node"):
        lc.plan_start(d, 5)
    lc.save_record(d, lc.plan_cluster(d, 3))  # created without TLS: --tls turns it on
    assert lc.plan_start(d).tls_ca is None and lc.plan_start(d, tls=True).tls_ca is not None


def test_a_cluster_started_with_a_secret_from_the_environment_needs_it_again(tmp_path: Path) -> None:
    d = tmp_path / "c"
    record = lc.plan_cluster(d, 1)
    record.secret_id = lc.secret_id(b"s" * 32)  # started with AETHER_CLUSTER_SECRET=sss...
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_CLUSTER_SECRET")}
    lc.check_node_credentials(d, record, dict(env, AETHER_CLUSTER_SECRET="s" * 32))
    with pytest.raises(lc.ClusterError, match="there is no such file"):
        lc.check_node_credentials(d, record, env)
    assert not (d / "cluster.secret").exists()  # not replaced by a new one behind the user's back
    with pytest.raises(lc.ClusterError, match="both"):
        lc.check_node_credentials(
            d, record, dict(env, AETHER_CLUSTER_SECRET="s" * 32, AETHER_CLUSTER_SECRET_FILE="f")
        )
    with pytest.raises(lc.ClusterError, match="cannot read the cluster secret file"):
        lc.check_node_credentials(d, record, dict(env, AETHER_CLUSTER_SECRET_FILE=str(tmp_path / "none")))


def test_the_clusters_own_secret_file_exported_for_clients_is_generated_on_first_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/cluster-security.md has clients `export AETHER_CLUSTER_SECRET_FILE=.aether/cluster/cluster.secret`;
    # a first `aether cluster start` in that shell must still create it (it refused: no such file)
    monkeypatch.chdir(tmp_path)
    d = Path(".aether/cluster")
    record = lc.plan_cluster(d, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_CLUSTER_SECRET")}
    exported = dict(env, AETHER_CLUSTER_SECRET_FILE=".aether/cluster/cluster.secret")
    lc.check_node_credentials(d, record, exported)
    assert len((d / "cluster.secret").read_text().strip()) == 64


# -- full flow with stand-in nodes --------------------------------------------------------------------


def test_start_status_stop_twice(cluster_dir: Path, fake_node_script: Path) -> None:
    secrets_seen: set[str] = set()
    for round_ in range(2):  # the same directory can be used again after a stop
        offset = free_port_offset(3)
        rec = lc.plan_cluster(cluster_dir, 3, port_offset=offset)
        procs = lc.launch_nodes(cluster_dir, rec, node_argv=fake_argv(fake_node_script))
        obs = lc.wait_for_quorum(rec, timeout=30, procs=procs)
        assert all(o.up for o in obs)
        assert lc.cluster_leader(obs) == "node-1"
        pids = [n.pid for n in rec.nodes]
        assert all(pid and alive(pid) for pid in pids)
        for n in rec.nodes:
            assert Path(n.pid_file).read_text().strip() == str(n.pid)
        saved = json.loads((cluster_dir / "cluster.json").read_text())
        assert [n["pid"] for n in saved["nodes"]] == pids
        # the cluster secret is generated once, owner-only, and kept for the next start
        secret_file = cluster_dir / "cluster.secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        secrets_seen.add(secret)
        assert len(secret) == 64 and len(secrets_seen) == 1
        assert saved["port_offset"] == offset

        r = invoke("cluster", "status", "--dir", str(cluster_dir), "--json")
        assert r.exit_code == 0, r.output
        rows = json.loads(r.stdout)
        assert rows == [
            {
                "id": f"node-{k}",
                "pid": pids[k - 1],
                "up": True,
                "leader": k == 1,
                "cluster_port": 7000 + offset + k - 1,
                "management_port": 9000 + offset + k - 1,
                "http_port": 8080 + offset + k - 1,
            }
            for k in (1, 2, 3)
        ]
        r = invoke("cluster", "status", "--dir", str(cluster_dir))
        assert r.exit_code == 0
        assert "Quorum: yes" in r.stdout and "Leader: node-1" in r.stdout and "3/3 nodes up" in r.stdout

        r = invoke("cluster", "stop", "--dir", str(cluster_dir))
        assert r.exit_code == 0, r.output
        for k, pid in enumerate(pids, 1):
            assert f"Stopped node-{k} (pid {pid})" in r.stdout
            assert not alive(pid)
        assert not list(cluster_dir.glob("*.pid"))
        assert "stopped cleanly" in Path(rec.nodes[0].log).read_text()  # SIGTERM, not SIGKILL

        r = invoke("cluster", "status", "--dir", str(cluster_dir), "--json")
        assert r.exit_code == 1  # no quorum
        assert [(row["up"], row["pid"], row["leader"]) for row in json.loads(r.stdout)] == [
            (False, None, False)
        ] * 3
        assert round_ in (0, 1)


def test_status_reports_a_dead_node_down(cluster_dir: Path, fake_node_script: Path) -> None:
    rec = lc.plan_cluster(cluster_dir, 3, port_offset=free_port_offset(3))
    procs = lc.launch_nodes(cluster_dir, rec, node_argv=fake_argv(fake_node_script))
    lc.wait_for_quorum(rec, timeout=30, procs=procs)
    procs["node-3"].kill()
    procs["node-3"].wait(10)
    r = invoke("cluster", "status", "--dir", str(cluster_dir))
    assert r.exit_code == 0
    line = next(line for line in r.stdout.splitlines() if "node-3" in line)
    assert "down" in line
    assert "2/3 nodes up" in r.stdout
    rows = json.loads(invoke("cluster", "status", "--dir", str(cluster_dir), "--json").stdout)
    assert [row["up"] for row in rows] == [True, True, False]


def test_start_refuses_while_nodes_run(cluster_dir: Path, fake_node_script: Path) -> None:
    offset = free_port_offset(1)
    rec = lc.plan_cluster(cluster_dir, 1, port_offset=offset)
    procs = lc.launch_nodes(cluster_dir, rec, node_argv=fake_argv(fake_node_script))
    lc.wait_for_quorum(rec, timeout=30, procs=procs)
    r = invoke(
        "cluster", "start", "--nodes", "1", "--dir", str(cluster_dir), "--base-port-offset", str(offset + 1)
    )
    assert r.exit_code == 1
    assert "still running" in r.stderr and f"pid {procs['node-1'].pid}" in r.stderr
    assert f"--base-port-offset {offset}, not {offset + 1}" in r.stderr
    assert "aether cluster stop" in r.stderr
    assert alive(procs["node-1"].pid)


def test_start_refuses_busy_port(cluster_dir: Path) -> None:
    offset = free_port_offset(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 9001 + offset))  # management port of node-2
        s.listen()
        r = invoke(
            "cluster", "start", "--nodes", "2", "--dir", str(cluster_dir), "--base-port-offset", str(offset)
        )
    assert r.exit_code == 1
    assert f"port {9001 + offset}" in r.stderr and "node-2" in r.stderr and "already in use" in r.stderr
    assert "--base-port-offset" in r.stderr
    assert not list(cluster_dir.glob("*.pid"))


def test_crashing_node_fails_fast_with_its_log(cluster_dir: Path, fake_node_script: Path) -> None:
    rec = lc.plan_cluster(cluster_dir, 3, port_offset=free_port_offset(3))
    procs = lc.launch_nodes(cluster_dir, rec, node_argv=fake_argv(fake_node_script, {"node-2": "crash"}))
    t0 = time.monotonic()
    with pytest.raises(lc.ClusterStartError) as ei:
        lc.wait_for_quorum(rec, timeout=30, procs=procs)
    assert time.monotonic() - t0 < 15
    assert ei.value.node_id == "node-2"
    assert "exited with code 3" in str(ei.value)
    assert "fatal: cannot open data dir" in ei.value.log_tail
    assert "=== aether cluster start" not in ei.value.log_tail  # only this run's output


def test_no_quorum_times_out_naming_the_node(cluster_dir: Path, fake_node_script: Path) -> None:
    rec = lc.plan_cluster(cluster_dir, 2, port_offset=free_port_offset(2))
    procs = lc.launch_nodes(cluster_dir, rec, node_argv=fake_argv(fake_node_script, "noquorum"))
    # the stand-ins up first (a loaded machine took over 2 s to start them, and the log then had no
    # "serving" yet): what is tested is the wait that times out on nodes without a quorum
    deadline = time.monotonic() + 30
    while not all("serving" in lc.log_tail(n) for n in rec.nodes) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(lc.ClusterStartError) as ei:
        lc.wait_for_quorum(rec, timeout=2, procs=procs)
    assert "within 2 s" in str(ei.value) and "no quorum" in str(ei.value)
    assert "serving" in ei.value.log_tail


def test_stop_kills_a_node_that_ignores_sigterm(cluster_dir: Path, fake_node_script: Path) -> None:
    rec = lc.plan_cluster(cluster_dir, 1, port_offset=free_port_offset(1))
    procs = lc.launch_nodes(cluster_dir, rec, node_argv=fake_argv(fake_node_script, "ignore-term"))
    lc.wait_for_quorum(rec, timeout=30, procs=procs)
    pid = procs["node-1"].pid
    t0 = time.monotonic()
    (res,) = lc.stop_cluster(cluster_dir, timeout=0.5)
    assert (res.id, res.pid, res.outcome) == ("node-1", pid, "killed")
    assert time.monotonic() - t0 < 8
    assert not alive(pid)


# -- never signal processes that are not ours ---------------------------------------------------------


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait(10)


def test_a_failed_record_write_leaves_no_temporary_and_stale_ones_are_removed(tmp_path: Path) -> None:
    # Each `aether` process writes cluster.json through a temporary named after its pid: a write
    # that failed (a full disk) or a process killed while writing left one, another every time.
    d = tmp_path / "c"
    rec = lc.plan_cluster(d, 1)
    d.mkdir(parents=True, exist_ok=True)
    (d / lc.CLUSTER_FILE).mkdir()  # the rename fails: a directory is in the way
    with pytest.raises(OSError):
        lc.save_record(d, rec)
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    (d / lc.CLUSTER_FILE).rmdir()
    hour_ago = time.time() - 3600
    killed = d / f".{lc.CLUSTER_FILE}.4242.tmp"  # of a process killed while writing
    running = d / f".{lc.CLUSTER_FILE}.4243.tmp"  # of a write running now in another process
    other = d / f".{lc.CLUSTER_FILE}.notes.tmp"  # not a name it writes
    for f in (killed, running, other):
        f.write_text("{}")
    for f in (killed, other):
        os.utime(f, (hour_ago, hour_ago))
    lc.save_record(d, rec)
    left = sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))
    assert left == sorted([running.name, other.name])
    assert lc.load_record(d) == rec


def test_stop_ignores_pid_with_other_create_time(tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    d = tmp_path / "c"
    rec = lc.plan_cluster(d, 1)
    rec.nodes[0].pid = bystander.pid
    rec.nodes[0].create_time = psutil.Process(bystander.pid).create_time() - 100  # pid reused since
    lc.save_record(d, rec)
    Path(rec.nodes[0].pid_file).write_text(f"{bystander.pid}\n")
    r = invoke("cluster", "stop", "--dir", str(d))
    assert r.exit_code == 0
    assert "was not running" in r.stdout
    time.sleep(0.2)
    assert bystander.poll() is None
    assert not Path(rec.nodes[0].pid_file).exists()  # the stale pid file is cleaned up


def test_stop_ignores_bare_pid_file_of_other_program(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "node-1.pid").write_text(f"{bystander.pid}\n")
    r = invoke("cluster", "stop", "--dir", str(d))
    assert r.exit_code == 0
    assert bystander.poll() is None


def test_stop_terminates_recorded_process(tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    d = tmp_path / "c"
    rec = lc.plan_cluster(d, 1)
    rec.nodes[0].pid = bystander.pid
    rec.nodes[0].create_time = psutil.Process(bystander.pid).create_time()
    lc.save_record(d, rec)
    r = invoke("cluster", "stop", "--dir", str(d))
    assert r.exit_code == 0
    assert f"Stopped node-1 (pid {bystander.pid})" in r.stdout
    assert bystander.wait(5) == -signal.SIGTERM
    assert json.loads((d / "cluster.json").read_text())["nodes"][0]["pid"] is None


def test_stop_and_status_without_cluster(tmp_path: Path) -> None:
    r = invoke("cluster", "stop", "--dir", str(tmp_path / "none"))
    assert r.exit_code == 0
    assert "No nodes recorded" in r.stdout and "nothing to stop" in r.stdout
    lc.save_record(tmp_path / "stopped", lc.plan_cluster(tmp_path / "stopped", 3))  # recorded, none runs
    r = invoke("cluster", "stop", "--dir", str(tmp_path / "stopped"))
    assert r.exit_code == 0
    assert "runs; nothing to stop" in r.stdout and "No nodes recorded" not in r.stdout, r.stdout
    for command in (["status"], ["restart", "node-1"]):
        r = invoke("cluster", *command, "--dir", str(tmp_path / "none"))
        assert r.exit_code == 1
        assert "no local cluster" in r.stderr and "aether cluster start" in r.stderr


def test_damaged_cluster_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text("{not json")
    for command in (["status"], ["restart", "node-1"]):
        r = invoke("cluster", *command, "--dir", str(tmp_path))
        assert r.exit_code == 1
        assert "damaged" in r.stderr


# -- the real commands, end to end, with a stand-in node runtime -------------------------------------


@pytest.fixture
def stand_in_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_RUNTIME)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return aether_cli(*args, env=env, timeout=timeout)


def test_cluster_start_and_stop_commands(cluster_dir: Path, stand_in_env: dict[str, str]) -> None:
    offset = free_port_offset(3)
    r = run_cli(
        stand_in_env,
        "cluster",
        "start",
        "--nodes",
        "3",
        "--dir",
        str(cluster_dir),
        "--base-port-offset",
        str(offset),
    )
    assert r.returncode == 0, r.stderr
    assert "Quorum: yes" in r.stdout and "Leader: node-1" in r.stdout and "3/3 nodes up" in r.stdout
    assert f"--connect 127.0.0.1:{9000 + offset}" in r.stdout
    rec = lc.load_record(cluster_dir)
    assert rec is not None
    node2 = rec.nodes[1]
    config_line = next(
        line for line in Path(node2.log).read_text().splitlines() if line.startswith("CONFIG ")
    )
    assert json.loads(config_line[len("CONFIG ") :]) == {
        "node_id": "node-2",
        "host": "127.0.0.1",
        "cluster_port": 7001 + offset,
        "management_port": 9001 + offset,
        "http_port": 8081 + offset,
        "data_dir": str(cluster_dir.absolute() / "node-2" / "data"),
        "peers": [f"node-{k}=127.0.0.1:{7000 + offset + k - 1}" for k in (1, 2, 3)],
        "repository": str(cluster_dir.absolute() / "repository"),
    }
    pids = [n.pid for n in rec.nodes]
    assert all(pid and alive(pid) for pid in pids)

    r = run_cli(stand_in_env, "--connect", f"127.0.0.1:{9002 + offset}", "--json", "status")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["node_id"] == "node-3"

    r = run_cli(stand_in_env, "cluster", "stop", "--dir", str(cluster_dir))
    assert r.returncode == 0, r.stderr
    assert all(f"Stopped node-{k} (pid {pid})" in r.stdout for k, pid in enumerate(pids, 1))
    assert wait_gone(pids, 5)
    assert "stopped cleanly" in Path(node2.log).read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cluster_demo_runs_until_signal(cluster_dir: Path, stand_in_env: dict[str, str], sig: int) -> None:
    with running_demo(stand_in_env, cluster_dir) as demo:
        rec = lc.load_record(cluster_dir)
        assert rec is not None
        pids = [n.pid for n in rec.nodes]
        assert all(pid and alive(pid) for pid in pids)
        time.sleep(0.5)
        assert demo.poll() is None  # it keeps running until told to stop
        demo.send_signal(sig)
        out, err = demo.communicate(timeout=30)
        assert demo.returncode == 0, err
        assert all(f"Stopped node-{k} (pid {pid})" in out for k, pid in enumerate(pids, 1))
        assert not any(alive(pid) for pid in pids if pid)


def _node_configs(rec: lc.ClusterRecord) -> list[dict[str, object]]:
    """The last CONFIG line each stand-in node of `rec` printed (this run's)."""
    out = []
    for n in rec.nodes:
        lines = [ln for ln in Path(n.log).read_text().splitlines() if ln.startswith("CONFIG ")]
        out.append(json.loads(lines[-1][len("CONFIG ") :]))
    return out


def test_each_cluster_has_its_own_repository_seeded_once_from_the_default(
    tmp_path: Path, stand_in_env: dict[str, str]
) -> None:
    """The nodes of a local cluster get DIR/repository, not the machine's ~/.aether/repository
    (which every local cluster shared: a wheel uploaded to one appeared in all, a delete in one
    took it from the others); it is a copy of the default directory's wheels made when the cluster
    is created, kept (not copied again) on later starts; AETHER_REPOSITORY overrides it; a
    cluster.json without it (an older release) keeps the default directory."""
    home = tmp_path / "home"
    env = dict(stand_in_env, HOME=str(home))
    default = Repository(home / ".aether" / "repository")
    default.deploy(build_slice_wheel(tmp_path / "w1", "org.example:one:1.0.0", "class One: pass", "One"))
    default.deploy_library(build_library_wheel(tmp_path / "w1", "tinylib", "1.0", {"tinylib.py": "X = 1"}))
    offset = free_port_offset(2)
    a, b = tmp_path / "a", tmp_path / "b"

    def start(d: Path, env: dict[str, str]) -> lc.ClusterRecord:
        r = run_cli(env, "cluster", "start", "--nodes", "2", "--dir", str(d),
                    "--base-port-offset", str(offset))  # fmt: skip
        assert r.returncode == 0, r.stderr
        rec = lc.load_record(d)
        assert rec is not None
        return rec

    def stop(d: Path) -> None:
        r = run_cli(env, "cluster", "stop", "--dir", str(d))
        assert r.returncode == 0, r.stderr

    try:
        rec = start(a, env)
        own = a.absolute() / "repository"
        assert [c["repository"] for c in _node_configs(rec)] == [str(own)] * 2
        assert rec.repository == str(own)
        seeded = Repository(own)
        assert [str(x) for x in seeded.list()] == ["org.example:one:1.0.0"]
        assert [w.name for w in seeded.library_wheels()] == ["tinylib-1.0-py3-none-any.whl"]
        # what the nodes put in their directory stays in this cluster's
        seeded.deploy(build_slice_wheel(tmp_path / "w2", "org.example:two:1.0.0", "class Two: pass", "Two"))
        stop(a)

        # a later start keeps the directory and does not copy the default directory's wheels again
        default.deploy(build_slice_wheel(tmp_path / "w3", "org.example:three:1.0.0", "class T: pass", "T"))
        rec = start(a, env)
        assert rec.repository == str(own)
        assert [c["repository"] for c in _node_configs(rec)] == [str(own)] * 2
        assert [str(x) for x in seeded.list()] == ["org.example:one:1.0.0", "org.example:two:1.0.0"]
        stop(a)

        # AETHER_REPOSITORY in the environment is what the nodes get (the record keeps the cluster's)
        explicit = tmp_path / "explicit"
        rec = start(a, dict(env, AETHER_REPOSITORY=str(explicit)))
        assert rec.repository == str(own)
        assert [c["repository"] for c in _node_configs(rec)] == [str(explicit)] * 2
        stop(a)

        # a new cluster: its own copy of the default directory, without the other cluster's wheels
        rec = start(b, env)
        assert rec.repository == str(b.absolute() / "repository")
        assert [str(x) for x in Repository(rec.repository).list()] == [
            "org.example:one:1.0.0", "org.example:three:1.0.0"
        ]
        assert [str(x) for x in default.list()] == ["org.example:one:1.0.0", "org.example:three:1.0.0"]
        stop(b)

        # a cluster.json of an older release (no `repository`): the nodes keep the default directory
        saved = json.loads((b / "cluster.json").read_text())
        del saved["repository"]
        (b / "cluster.json").write_text(json.dumps(saved))
        rec = start(b, env)
        assert rec.repository is None
        assert [c["repository"] for c in _node_configs(rec)] == [None] * 2
    finally:
        lc.stop_cluster(a, timeout=2.0)
        lc.stop_cluster(b, timeout=2.0)


def test_a_cluster_started_with_an_api_key_needs_it_again(tmp_path: Path) -> None:
    d = tmp_path / "c"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AETHER_CLUSTER_SECRET", "AETHER_API_KEY"))
    }
    record = lc.plan_cluster(d, 1)
    lc.check_node_credentials(d, record, env)  # an older cluster.json: not known, anything goes
    lc.check_node_credentials(d, record, dict(env, AETHER_API_KEY="k1"))
    probe = msgspec.structs.replace(record)
    lc.apply_node_credentials(d, probe, dict(env, AETHER_API_KEY="k1"), whole=True)
    assert probe.api_key_id
    with pytest.raises(lc.ClusterError, match="open to every local process"):
        lc.check_node_credentials(d, probe, env)
    with pytest.raises(lc.ClusterError, match="with another management API key"):
        lc.check_node_credentials(d, probe, dict(env, AETHER_API_KEY="k2"))
    lc.check_node_credentials(d, probe, dict(env, AETHER_API_KEY="k1"))
    lc.apply_node_credentials(d, probe, dict(env, AETHER_API_KEY="k2"), whole=True)  # changed while stopped
    opened = msgspec.structs.replace(record)
    lc.apply_node_credentials(d, opened, env, whole=True)
    assert opened.api_key_id == ""
    with pytest.raises(lc.ClusterError, match="without a management API key"):
        lc.check_node_credentials(d, opened, dict(env, AETHER_API_KEY="k1"))
    lc.apply_node_credentials(d, opened, dict(env, AETHER_API_KEY="k1"), whole=True)  # set while stopped
