"""`aether cluster start|status|stop|demo` with real node processes on loopback.

These run against the real node runtime (`aether.node.runner`) and are skipped only while it is
not part of the installation. Every test uses free ports (a port offset), its own directory, and
stops every process it started in a `finally`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aether.cli import local_cluster as lc
from aether.slices.testing import build_slice_wheel
from conftest import aether_cli, free_port_offset, http_json
from local_cluster_cli import alive, running_demo, wait_gone

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("aether.node") is None
        or importlib.util.find_spec("aether.node.runner") is None,
        reason="the node runtime (aether.node.runner) is not installed yet",
    ),
    pytest.mark.slow,
    pytest.mark.timeout(180),
]



@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # the nodes' artifact repository is the test's own: with the default (~/.aether/repository)
    # a node publishes the wheels it finds there into the cluster's map `aether.repository`, and
    # `map list` is not the maps the test created
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["AETHER_REPOSITORY"] = str(tmp_path / "repository")
    return env


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "cluster"
    try:
        yield d
    finally:
        lc.stop_cluster(d, timeout=5.0)


def status_rows(env: dict[str, str], directory: Path) -> tuple[int, list[dict]]:
    r = aether_cli("cluster", "status", "--dir", str(directory), "--json", env=env)
    return r.returncode, json.loads(r.stdout)


def test_start_status_stop_and_start_again(cluster_dir: Path, env: dict[str, str]) -> None:
    for round_ in (1, 2):  # a second start in the same directory reuses the data dirs
        offset = free_port_offset(3)
        r = aether_cli(
            "cluster",
            "start",
            "--nodes",
            "3",
            "--dir",
            str(cluster_dir),
            "--base-port-offset",
            str(offset),
            env=env,
        )
        assert r.returncode == 0, f"round {round_}: {r.stderr}"
        assert "Quorum: yes" in r.stdout and "3/3 nodes up" in r.stdout

        code, rows = status_rows(env, cluster_dir)
        assert code == 0
        assert [row["id"] for row in rows] == ["node-1", "node-2", "node-3"]
        assert all(row["up"] for row in rows)
        assert sum(row["leader"] for row in rows) == 1
        assert [row["management_port"] for row in rows] == [9000 + offset + i for i in range(3)]
        pids = [row["pid"] for row in rows]
        assert all(alive(pid) for pid in pids)

        views = []
        for row in rows:
            s = aether_cli("--connect", f"127.0.0.1:{row['management_port']}", "--json", "status", env=env)
            assert s.returncode == 0, s.stderr
            views.append(json.loads(s.stdout))
        assert [v["node_id"] for v in views] == ["node-1", "node-2", "node-3"]
        assert all(v["quorum"] for v in views)
        leaders = {v["leader"] for v in views}
        assert len(leaders) == 1
        assert next(row["id"] for row in rows if row["leader"]) in leaders
        assert all(sorted(n["id"] for n in v["nodes"]) == ["node-1", "node-2", "node-3"] for v in views)

        kv = aether_cli(
            "--connect", f"127.0.0.1:{rows[0]['management_port']}", "--json", "kv", "list", env=env
        )
        assert kv.returncode == 0, kv.stderr
        listing = json.loads(kv.stdout)
        assert listing["prefix"] == "" and isinstance(listing["entries"], list)

        r = aether_cli("cluster", "stop", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 0, r.stderr
        assert all(f"Stopped node-{k} (pid {pid})" in r.stdout for k, pid in enumerate(pids, 1)), r.stdout
        assert wait_gone(pids)
        assert not list(cluster_dir.glob("*.pid"))
        code, rows = status_rows(env, cluster_dir)
        assert code == 1
        assert not any(row["up"] for row in rows)
        r = aether_cli("cluster", "status", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 1 and "0/3 nodes up" in r.stdout, r.stdout
        assert f"start the cluster with `aether cluster start --dir {cluster_dir}`" in r.stderr, r.stderr


def test_status_after_kill_9_of_one_node(cluster_dir: Path, env: dict[str, str]) -> None:
    offset = free_port_offset(3)
    r = aether_cli(
        "cluster", "start", "--nodes", "3", "--dir", str(cluster_dir), "--base-port-offset", str(offset),
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _, rows = status_rows(env, cluster_dir)
    victim = rows[2]
    os.kill(victim["pid"], signal.SIGKILL)
    assert wait_gone([victim["pid"]])
    deadline = time.monotonic() + 10
    while True:
        code, rows = status_rows(env, cluster_dir)
        if code == 0 and [row["up"] for row in rows] == [True, True, False]:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert sum(row["leader"] for row in rows) == 1
    assert not rows[2]["leader"]
    r = aether_cli("cluster", "stop", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 0, r.stderr
    assert "node-3" in r.stdout and "was not running" in r.stdout
    assert wait_gone([row["pid"] for row in rows])


def test_demo_stops_the_nodes_on_ctrl_c(cluster_dir: Path, env: dict[str, str]) -> None:
    with running_demo(env, cluster_dir) as demo:
        _, rows = status_rows(env, cluster_dir)
        pids = [row["pid"] for row in rows]
        assert all(alive(pid) for pid in pids)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
        assert demo.returncode == 0, err
        assert all(f"Stopped node-{k}" in out for k in (1, 2, 3)), out
        assert wait_gone(pids)


def test_writes_after_stop_and_start_on_the_same_directory_are_applied(
    cluster_dir: Path, env: dict[str, str]
) -> None:
    """Issue 10, bug 2: after `cluster stop` + `cluster start`, `map create m2` failed with
    "400 stale request sequence" and `map create m3` printed "Created" without creating the map."""
    offset = free_port_offset(3)
    start = ("cluster", "start", "--nodes", "3", "--dir", str(cluster_dir), "--base-port-offset", str(offset))

    def on(i: int, *args: str) -> subprocess.CompletedProcess[str]:
        return aether_cli("--connect", f"127.0.0.1:{9000 + offset + i}", *args, timeout=30, env=env)

    def maps() -> list[str]:
        r = on(2, "--json", "map", "list")
        assert r.returncode == 0, r.stderr
        return sorted(m["name"] for m in json.loads(r.stdout)["maps"])

    r = aether_cli(*start, env=env)
    assert r.returncode == 0, r.stderr
    for i, name in enumerate(("m1", "gone")):
        r = on(i, "map", "create", name)
        assert r.returncode == 0 and "Created map" in r.stdout, r.stderr
    assert maps() == ["gone", "m1"]
    r = aether_cli("cluster", "stop", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 0, r.stderr

    r = aether_cli(*start, env=env)
    assert r.returncode == 0, r.stderr
    for i, name in ((0, "m2"), (0, "m3"), (1, "m4")):
        r = on(i, "map", "create", name)
        assert r.returncode == 0 and f"Created map '{name}'" in r.stdout, (name, r.stdout, r.stderr)
    r = on(1, "map", "delete", "gone")
    assert r.returncode == 0, r.stderr
    assert maps() == ["m1", "m2", "m3", "m4"]
    r = on(0, "map", "put", "m3", "order-1", '{"qty": 2}')
    assert r.returncode == 0, r.stderr
    r = on(1, "--json", "map", "get", "m3", "order-1")
    assert r.returncode == 0 and json.loads(r.stdout) == {"qty": 2}, r.stderr
    r = on(2, "map", "remove", "m3", "order-1")
    assert r.returncode == 0, r.stderr
    r = on(0, "map", "get", "m3", "order-1")
    assert r.returncode != 0 and "404" in r.stderr
    r = aether_cli("cluster", "stop", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 0, r.stderr


def test_restart_one_node_start_only_the_missing_and_status_by_answer(
    cluster_dir: Path, env: dict[str, str]
) -> None:
    """Issue 11: no command restarted one node (`cluster start` refused while any node ran), and
    `cluster status` called a node restarted by hand "down" because its pid file was stale."""
    offset = free_port_offset(3)
    r = aether_cli(
        "cluster", "start", "--nodes", "3", "--dir", str(cluster_dir), "--base-port-offset", str(offset),
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _, rows = status_rows(env, cluster_dir)
    pids = [row["pid"] for row in rows]
    hand: subprocess.Popen[bytes] | None = None
    try:
        # node-3 dies; `cluster start` (no options) starts only node-3, with its ports and data
        os.kill(pids[2], signal.SIGKILL)
        assert wait_gone([pids[2]])
        r = aether_cli("cluster", "start", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 0, r.stderr
        assert "Started node-3" in r.stderr and "3/3 nodes up" in r.stdout
        _, rows = status_rows(env, cluster_dir)
        assert [row["pid"] for row in rows][:2] == pids[:2] and alive(rows[2]["pid"])
        assert rows[2]["pid"] != pids[2] and rows[2]["management_port"] == 9002 + offset
        # nothing missing: says so, starts nothing
        r = aether_cli("cluster", "start", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 0 and "already run" in r.stderr, r.stderr
        # --nodes that would change the running cluster is refused
        r = aether_cli("cluster", "start", "--nodes", "5", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 1 and "has 3 nodes" in r.stderr

        # one command restarts one node
        old = rows[2]["pid"]
        r = aether_cli("cluster", "restart", "node-3", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 0, r.stderr
        assert f"Stopped node-3 (pid {old})" in r.stderr and "3/3 nodes up" in r.stdout
        assert wait_gone([old])
        _, rows = status_rows(env, cluster_dir)
        assert all(row["up"] for row in rows) and rows[2]["pid"] not in (old, None)
        r = aether_cli("cluster", "restart", "node-9", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 2 and "node-1, node-2, node-3" in r.stderr

        # node-2 restarted by hand (`aether node ...` with the same flags): status asks the node
        record = lc.load_record(cluster_dir)
        assert record is not None
        os.kill(pids[1], signal.SIGTERM)
        assert wait_gone([pids[1]])
        hand = subprocess.Popen(
            lc.default_node_argv(record, record.nodes[1]), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            code, rows = status_rows(env, cluster_dir)
            if [row["up"] for row in rows] == [True, True, True]:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
        assert code == 0 and rows[1]["pid"] is None  # up, but not a process of this directory
        r = aether_cli("cluster", "status", "--dir", str(cluster_dir), env=dict(env, COLUMNS="200"))
        line = next(line for line in r.stdout.splitlines() if "node-2" in line)
        assert "up (started elsewhere)" in line and "3/3 nodes up" in r.stdout
        r = aether_cli("cluster", "restart", "node-2", "--dir", str(cluster_dir), env=env)
        assert r.returncode == 1 and "not started from" in r.stderr
    finally:
        if hand is not None:
            hand.kill()
            hand.wait(10)


def test_clusters_of_two_directories_do_not_share_their_repository(tmp_path: Path) -> None:
    """Every local cluster used ~/.aether/repository as its nodes' cache and start-up bootstrap, so
    a wheel uploaded to one cluster was published by every cluster started later (a new one said
    "Already stored (same sha256)" for a wheel never uploaded to it, and refused other bytes of
    that version, 409). Now each has DIR/repository, a copy of the default directory's wheels
    made when it is created: what is there before is published, what one cluster gets is its own."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["HOME"] = str(home)
    default = home / ".aether" / "repository"
    seed = build_slice_wheel(tmp_path / "seed", "org.example:seed:1.0.0", "class Seed: pass", "Seed")
    upload = build_slice_wheel(tmp_path / "up", "org.example:up:1.0.0", "class Up: pass", "Up")
    other = build_slice_wheel(tmp_path / "other", "org.example:up:1.0.0", "class Up:\n    x = 1", "Up")
    assert other.read_bytes() != upload.read_bytes()
    r = aether_cli("artifact", "deploy", "--repository", str(default), str(seed), env=env)
    assert r.returncode == 0, r.stderr
    a, b = tmp_path / "a", tmp_path / "b"

    def start(d: Path) -> int:
        """Start a 1-node cluster in `d`; its management port once its bootstrap was published."""
        offset = free_port_offset(1)
        r = aether_cli("cluster", "start", "--nodes", "1", "--dir", str(d), "--base-port-offset", str(offset),
                       env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        log = d / "node-1.log"
        wait_for(lambda: re.search(r"published \d+ wheel\(s\) of", log.read_text()), f"the bootstrap of {d}")
        return 9000 + offset

    def files(port: int) -> list[str]:
        status, manifests = http_json(port, "GET", "/api/v1/repository/artifacts")
        assert status == 200, manifests
        return sorted(m["filename"] for m in manifests)

    def deploy(port: int, wheel: Path) -> subprocess.CompletedProcess[str]:
        return aether_cli("--connect", f"127.0.0.1:{port}", "artifact", "deploy", str(wheel), env=env)

    try:
        port_a = start(a)
        assert files(port_a) == [seed.name]  # in the default directory before: published
        r = deploy(port_a, upload)
        assert r.returncode == 0 and "Stored org.example:up:1.0.0" in r.stdout, r.stdout + r.stderr
        # (the node placed the upload in its directory before it answered)

        port_b = start(b)  # A still runs
        assert files(port_b) == [seed.name]
        r = deploy(port_b, other)  # other bytes of A's version: B never had it
        assert r.returncode == 0 and "Stored org.example:up:1.0.0" in r.stdout, r.stdout + r.stderr
        assert files(port_a) == files(port_b) == sorted([seed.name, upload.name])
        up = Path("org", "example", "up", "1.0.0", upload.name)
        assert (a / "repository" / up).read_bytes() == upload.read_bytes()
        assert (b / "repository" / up).read_bytes() == other.read_bytes()
        assert not (default / up).parent.exists()
    finally:
        lc.stop_cluster(a, timeout=5.0)
        lc.stop_cluster(b, timeout=5.0)


def wait_for(pred: object, what: str, timeout: float = 30.0) -> None:
    assert callable(pred)
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def test_a_cluster_started_with_an_api_key_does_not_come_back_open(
    cluster_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """The management API key is a setting the cluster was started with: a later start without it
    is refused (the nodes' API would be open to every local process), and a key given with
    --api-key-file protects the nodes as AETHER_API_KEY does (it was only sent by the CLI)."""
    key = "local-admin-key-0123456789"
    offset = str(free_port_offset(1))
    start = ("cluster", "start", "--nodes", "1", "--dir", str(cluster_dir), "--base-port-offset", offset)
    r = aether_cli(*start, env=dict(env, AETHER_API_KEY=key))
    assert r.returncode == 0, r.stderr
    port = 9000 + int(offset)
    status, _ = http_json(port, "GET", "/api/v1/status")
    assert status == 401
    r = aether_cli("cluster", "stop", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 0, r.stderr

    r = aether_cli("cluster", "start", "--dir", str(cluster_dir), env=env)  # no key
    assert r.returncode == 1, r.stdout + r.stderr
    assert "was started with a management API key" in r.stderr and "AETHER_API_KEY" in r.stderr, r.stderr
    assert not list(cluster_dir.glob("*.pid"))
    key_file = tmp_path / "api.key"
    key_file.write_text(key + "\n")
    r = aether_cli("--api-key-file", str(key_file), "cluster", "start", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    status, _ = http_json(port, "GET", "/api/v1/status")
    assert status == 401  # the node requires the key given by file
    # a node restarted without the key would come back open beside the others: refused, kept running
    r = aether_cli("cluster", "restart", "node-1", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 1 and "API key" in r.stderr, r.stderr
    r = aether_cli("--api-key-file", str(key_file), "cluster", "status", "--dir", str(cluster_dir), env=env)
    assert r.returncode == 0 and "1/1 nodes up" in r.stdout, r.stdout + r.stderr


def test_a_first_start_that_failed_takes_other_settings_on_the_next_start(
    cluster_dir: Path, env: dict[str, str]
) -> None:
    # a user's first `cluster start` fails (here: another process holds node-3's data directory,
    # so node-3 exits at once), and they try again with another node count: it used to be refused
    # ("was created with 3 node(s) ... it cannot start with --nodes 1") although it never ran
    offset = free_port_offset(3)
    base = ["cluster", "start", "--dir", str(cluster_dir), "--base-port-offset", str(offset)]
    (cluster_dir / "node-3" / "data").mkdir(parents=True)
    held = os.open(cluster_dir / "node-3" / "data" / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = aether_cli(*base, "--nodes", "3", env=env, timeout=90)
    finally:
        os.close(held)
    assert r.returncode == 1 and "is in use by another process" in r.stderr, (r.stdout, r.stderr)
    record = lc.load_record(cluster_dir)
    assert record is not None and len(record.nodes) == 3
    r = aether_cli(*base, "--nodes", "1", env=env, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "never reached quorum" in r.stderr and "starts anew with 1 node" in r.stderr, r.stderr
    assert "Quorum: yes" in r.stdout and "1/1 nodes up" in r.stdout, r.stdout
    record = lc.load_record(cluster_dir)
    assert record is not None and [n.id for n in record.nodes] == ["node-1"] and record.established
    # the data of the first start's nodes is gone (node-1's would record 3 members)
    assert not (cluster_dir / "node-2").exists() and not (cluster_dir / "node-3").exists()
    code, rows = status_rows(env, cluster_dir)
    assert code == 0 and [row["id"] for row in rows] == ["node-1"] and rows[0]["up"], rows
    # once it ran, the node count is the cluster's: another one is refused, saying what to do
    assert aether_cli("cluster", "stop", "--dir", str(cluster_dir), env=env).returncode == 0
    r = aether_cli(*base, "--nodes", "3", env=env, timeout=90)
    assert r.returncode == 1 and "cannot start with --nodes 3" in r.stderr, r.stderr
