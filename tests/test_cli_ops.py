"""`aether health`, `nodes`, `events` and `doctor` against fake nodes and a real 3-process cluster."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from aether.api.server import ManagementServer
from aether.cli.main import main
from aether.core.status import KVEntry, MemberStatus, NodeStatus
from aether.transport import EventBus, PeerDown
from conftest import refusing_port

pytestmark = pytest.mark.timeout(60)


class FakeKV:
    def __init__(self) -> None:
        self.watches: dict[int, tuple[str, Callable[[Any], None]]] = {}

    def watch(self, prefix: str, cb: Callable[[Any], None]) -> Callable[[], None]:
        wid = len(self.watches) + 1
        self.watches[wid] = (prefix, cb)
        return lambda: self.watches.pop(wid, None)  # type: ignore[func-returns-value]


class FakeDeployments:
    """What `GET /api/v1/slices` answers: [{artifact, desired, active, instances}]."""

    def __init__(self) -> None:
        self.status: list[dict[str, Any]] = []

    def slices_status(self) -> list[dict[str, Any]]:
        return self.status


class FakeNode:
    def __init__(
        self, node_id: str = "node-1", *, leader: str | None = "node-1", quorum: bool = True
    ) -> None:
        self.node_id = node_id
        self.leader = leader
        self.quorum = quorum
        self.slices: list[KVEntry] = []  # any store entries: slices/, endpoints/, routes/
        self.bus = EventBus()
        self.kv = FakeKV()
        self.deployments = FakeDeployments()
        self.local_instances: dict[str, list[int]] = {}
        self.extra: dict[str, Any] = {}  # more NodeStatus fields
        self.published: dict[str, str] = {}  # node id -> the management address it published

    def status(self) -> NodeStatus:
        return NodeStatus(
            node_id=self.node_id,
            leader=self.leader,
            quorum=self.quorum,
            nodes=[
                MemberStatus("node-1", "127.0.0.1:7000", "up", self.published.get("node-1")),
                MemberStatus("node-2", "127.0.0.1:7001", "up", self.published.get("node-2")),
            ],
            local_instances=self.local_instances,
            **self.extra,
        )

    def kv_list(self, prefix: str) -> list[KVEntry]:
        return [e for e in self.slices if e.key.startswith(prefix)]


class Servers:
    """ManagementServers on an event loop in a background thread (the CLI client blocks)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[ManagementServer] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, node: FakeNode) -> ManagementServer:
        srv = ManagementServer(node, host="127.0.0.1", port=0)
        self.run(srv.start())
        self.servers.append(srv)
        return srv

    def close(self) -> None:
        for srv in self.servers:
            self.run(srv.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


def invoke(*args: str) -> Result:
    env = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "COLUMNS": "200"}
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def addr(srv: ManagementServer) -> str:
    return f"127.0.0.1:{srv.port}"


def dead_port() -> int:
    return refusing_port()  # bound, never listening: nobody else can take it meanwhile


# -- health and nodes ---------------------------------------------------------------------------------


def test_health_ready_and_not_ready(servers: Servers) -> None:
    ok = servers.start(FakeNode())
    r = invoke("--connect", addr(ok), "health")
    assert r.exit_code == 0 and "ready" in r.output and "node-1" in r.output
    r = invoke("--connect", addr(ok), "health", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ready"] is True
    bad = servers.start(FakeNode(quorum=False, leader=None))
    r = invoke("--connect", addr(bad), "health")
    assert r.exit_code == 1 and "not ready" in r.output and "quorum" in r.output
    r = invoke("--connect", addr(bad), "--json", "health")
    assert r.exit_code == 1 and json.loads(r.output)["ready"] is False


def test_health_unreachable_exits_3() -> None:
    r = invoke("--connect", f"127.0.0.1:{dead_port()}", "health")
    assert r.exit_code == 3 and "cannot reach" in r.output


def test_nodes_table_and_json(servers: Servers) -> None:
    node = FakeNode()
    node.published["node-1"] = "127.0.0.1:9100"
    srv = servers.start(node)
    r = invoke("--connect", addr(srv), "nodes")
    assert r.exit_code == 0 and "node-2" in r.output and "127.0.0.1:7001" in r.output and "★" in r.output
    assert "Management" in r.output and "127.0.0.1:9100" in r.output
    r = invoke("--connect", addr(srv), "nodes", "--json")
    first, second = json.loads(r.output)
    assert first == {"id": "node-1", "address": "127.0.0.1:7000", "state": "up", "leader": True,
                     "management": "127.0.0.1:9100", "http": None}  # fmt: skip
    assert second["management"] is None


# -- doctor ------------------------------------------------------------------------------------------


def _verdicts(output: str) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in json.loads(output)["checks"]}


def test_doctor_all_ok(servers: Servers) -> None:
    a, b = servers.start(FakeNode("node-1")), servers.start(FakeNode("node-2"))
    r = invoke("doctor", "--nodes", f"{addr(a)},{addr(b)}")
    assert r.exit_code == 0, r.output
    assert "✓ ok" in r.output and "✗" not in r.output
    r = invoke("doctor", "--nodes", f"{addr(a)},{addr(b)}", "--json")
    assert r.exit_code == 0
    assert _verdicts(r.output) == {
        "reachability": "ok",
        "membership": "ok",
        "quorum": "ok",
        "leader": "ok",
        "clock skew": "ok",
        "stuck instances": "ok",
        "failed instances": "ok",
        "store writes": "ok",
        "instances serving": "ok",
        "routes": "ok",
    }


def test_doctor_without_nodes_asks_the_members_where_they_published_their_apis(
    servers: Servers, tmp_path: Path
) -> None:
    node1 = FakeNode("node-1")
    a, b = servers.start(node1), servers.start(FakeNode("node-2"))
    no_cluster = str(tmp_path / "none")
    r = invoke("--connect", addr(a), "doctor", "--cluster-dir", no_cluster, "--json")
    report = json.loads(r.output)
    assert report["source"] == "--connect" and _verdicts(r.output)["reachability"] == "warning"
    assert "only 1 of 2 members checked" in report["checks"][0]["detail"]
    node1.published["node-2"] = addr(b)
    r = invoke("--connect", addr(a), "doctor", "--cluster-dir", no_cluster, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["source"] == "--connect and the addresses the members published"
    assert [n["address"] for n in report["nodes"]] == [addr(a), addr(b)]
    assert _verdicts(r.output)["reachability"] == "ok"


def test_doctor_failed_and_stuck_instances(servers: Servers) -> None:
    node = FakeNode()
    now = time.time()
    node.slices = [
        KVEntry(
            "slices/node-1/org.demo:a:1.0.0", {"state": "FAILED", "timestamp": now, "reason": "ImportError x"}
        ),
        KVEntry("slices/node-2/org.demo:b:1.0.0", {"state": "LOADING", "timestamp": now - 120}),
        KVEntry("slices/node-2/org.demo:c:1.0.0", {"state": "ACTIVATING", "timestamp": now - 1}),
        KVEntry("slices/node-1/org.demo:c:1.0.0", {"state": "ACTIVE", "timestamp": now - 500}),
    ]
    srv = servers.start(node)
    r = invoke("doctor", "--nodes", addr(srv))
    assert r.exit_code == 1
    assert "ImportError x" in r.output and "org.demo:b:1.0.0 on node-2 is LOADING" in r.output
    assert "✗ failed" in r.output and "! warning" in r.output
    v = _verdicts(invoke("doctor", "--nodes", addr(srv), "--json").output)
    # stuck is a failure now: the deployment does not converge (issue 11)
    assert v["failed instances"] == "failed" and v["stuck instances"] == "failed"
    # only 1 of the 2 members was checked: a warning that says so
    assert v["reachability"] == "warning"


HELLO = "org.example:hello:0.1.0"


def _serving_store(node: FakeNode) -> None:
    """One deployed artifact with one route and one endpoint, instance 0 on node-1 (as the store
    has it after a restart in issue 11: ACTIVE everywhere)."""
    now = time.time()
    node.slices = [
        KVEntry(f"slices/node-1/{HELLO}", {"state": "ACTIVE", "timestamp": now, "instances": [0]}),
        KVEntry(f"endpoints/{HELLO}/greet:0", {"node_id": "node-1", "state": "ACTIVE"}),
        KVEntry("routes/GET:/hello/{name}", {"artifact": HELLO, "method": "greet", "bindings": {}}),
    ]
    node.deployments.status = [{"artifact": HELLO, "desired": 1, "active": 1, "instances": []}]


def test_doctor_fails_when_the_store_says_active_but_no_node_runs_the_instance(servers: Servers) -> None:
    n1, n2 = FakeNode("node-1"), FakeNode("node-2")
    _serving_store(n1)
    a, b = servers.start(n1), servers.start(n2)
    nodes = f"{addr(a)},{addr(b)}"
    r = invoke("doctor", "--nodes", nodes)  # node-1 reports no local instance: every call fails
    assert r.exit_code == 1, r.output
    assert "GET /hello/{name}" in r.output and "runs no such instance" in r.output
    v = _verdicts(invoke("doctor", "--nodes", nodes, "--json").output)
    assert v["routes"] == "failed" and v["instances serving"] == "failed"
    assert v["failed instances"] == "ok" and v["stuck instances"] == "ok"  # what the old doctor saw

    n1.local_instances = {HELLO: [0]}  # the node runs it: healthy
    r = invoke("doctor", "--nodes", nodes, "--json")
    assert r.exit_code == 0, r.output
    v = _verdicts(r.output)
    assert v["routes"] == "ok" and v["instances serving"] == "ok"

    n1.slices = n1.slices[:1] + n1.slices[2:]  # the endpoint is gone from the store
    r = invoke("doctor", "--nodes", nodes)
    assert r.exit_code == 1 and "no endpoint in the store" in r.output


def test_doctor_fails_on_failing_store_writes_and_loop_lag(servers: Servers) -> None:
    n1, n2 = FakeNode("node-1"), FakeNode("node-2")
    a, b = servers.start(n1), servers.start(n2)
    nodes = f"{addr(a)},{addr(b)}"
    n2.extra = {"loop_lag_max_ms": 3.0}
    n1.extra = {"loop_lag_max_ms": 2.0, "store_write_failures": 4, "store_write_failing_for": 1.0,
                "store_write_error": "no quorum"}
    r = invoke("doctor", "--nodes", nodes, "--json")
    v = _verdicts(r.output)
    assert r.exit_code == 0 and v["store writes"] == "warning" and v["loop lag"] == "ok"  # a blip
    n1.extra = {"journal_error": "fsync of journal.bin failed: [Errno 5] EIO", "loop_lag_max_ms": 900.0}
    r = invoke("doctor", "--nodes", nodes)
    assert r.exit_code == 1, r.output
    assert "EIO" in r.output and "blocked for up to 900 ms" in r.output
    v = _verdicts(invoke("doctor", "--nodes", nodes, "--json").output)
    assert v["store writes"] == "failed" and v["loop lag"] == "failed"
    n1.extra = {"store_write_failing_for": 12.0, "store_write_error": "not committed within 5.0s"}
    r = invoke("doctor", "--nodes", nodes)
    assert r.exit_code == 1 and "writes fail for 12.0 s: not committed" in r.output


def test_doctor_checks_the_etcd_store(servers: Servers) -> None:
    n1, n2 = FakeNode("node-1"), FakeNode("node-2")
    a, b = servers.start(n1), servers.start(n2)
    nodes = f"{addr(a)},{addr(b)}"
    assert "store" not in _verdicts(invoke("doctor", "--nodes", nodes, "--json").output)  # rabia: none
    etcd = {"store": "etcd", "store_endpoints": ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]}
    n1.extra, n2.extra = dict(etcd), dict(etcd)
    r = invoke("doctor", "--nodes", nodes, "--json")
    (check,) = [c for c in json.loads(r.output)["checks"] if c["name"] == "store"]
    assert r.exit_code == 0 and check["verdict"] == "ok", r.output
    assert check["detail"] == (
        "etcd at http://10.0.0.1:2379, http://10.0.0.2:2379: 2 of 2 nodes reach it with a quorum"
    )
    n2.quorum = False
    n2.extra = {**etcd, "store_error": "etcd at http://10.0.0.1:2379: no leader"}
    r = invoke("doctor", "--nodes", nodes)
    assert r.exit_code == 1 and "node-2: etcd at http://10.0.0.1:2379: no leader" in r.output, r.output
    assert _verdicts(invoke("doctor", "--nodes", nodes, "--json").output)["store"] == "failed"
    n2.quorum, n2.extra = True, {}  # one node on the embedded store, one on etcd
    v = _verdicts(invoke("doctor", "--nodes", nodes, "--json").output)
    assert v["store"] == "failed"


def test_doctor_leader_disagreement_and_unreachable_node(servers: Servers) -> None:
    a, b = servers.start(FakeNode("node-1")), servers.start(FakeNode("node-2", leader="node-2"))
    r = invoke("doctor", "--json", "--nodes", f"{addr(a)},{addr(b)},127.0.0.1:{dead_port()}")
    assert r.exit_code == 1
    v = _verdicts(r.output)
    assert v["leader"] == "failed" and v["reachability"] == "failed" and v["quorum"] == "ok"


def test_doctor_no_quorum_fails(servers: Servers) -> None:
    srv = servers.start(FakeNode(quorum=False, leader=None))
    r = invoke("doctor", "--json", "--nodes", addr(srv))
    assert r.exit_code == 1
    v = _verdicts(r.output)
    assert v["quorum"] == "failed" and v["leader"] == "failed"


def test_doctor_nothing_reachable_exits_3(tmp_path: Any) -> None:
    r = invoke("doctor", "--nodes", f"127.0.0.1:{dead_port()}", "--cluster-dir", str(tmp_path))
    assert r.exit_code == 3 and "no node answered" in r.output


def test_doctor_bad_nodes_is_usage_error() -> None:
    r = invoke("doctor", "--nodes", "nonsense")
    assert r.exit_code == 2 and "--nodes" in r.output


# -- events against a fake node ---------------------------------------------------------------------------


def test_events_follows_until_the_stream_is_lost(servers: Servers) -> None:
    node = FakeNode()
    srv = servers.start(node)
    results: list[Result] = []
    t = threading.Thread(target=lambda: results.append(invoke("--connect", addr(srv), "events", "--json")))
    t.start()
    deadline = time.monotonic() + 10
    while not (srv.events is not None and srv.events.subscriber_count == 1):
        assert time.monotonic() < deadline, "the CLI did not subscribe"
        time.sleep(0.02)
    servers.loop.call_soon_threadsafe(node.bus.publish, PeerDown("node-2", "link lost"))
    assert srv.events is not None  # an event with an `id` of its own (the blueprint's)
    servers.loop.call_soon_threadsafe(
        srv.events.publish, "blueprint-deleted", {"key": "blueprints/shop:1.0", "id": "shop:1.0"}
    )
    time.sleep(0.3)
    servers.run(srv.stop())
    t.join(15)
    assert not t.is_alive()
    (r,) = results
    assert r.exit_code == 3
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines and lines[0]["type"] == "node-left" and lines[0]["node"] == "node-2" and lines[0]["seq"] >= 1
    # the stream's event id is `seq`; the event's own `id` is kept, not replaced by it
    assert lines[1]["type"] == "blueprint-deleted" and lines[1]["id"] == "shop:1.0"
    assert lines[1]["seq"] == lines[0]["seq"] + 1
    assert "lost the event stream" in r.output


def test_events_unreachable_exits_3() -> None:
    r = invoke("--connect", f"127.0.0.1:{dead_port()}", "events")
    assert r.exit_code == 3 and "cannot reach" in r.output


# -- a real cluster -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_doctor_and_events_on_a_real_cluster(make_process_cluster: Any) -> None:
    cluster = make_process_cluster(3)
    nodes = ",".join(f"127.0.0.1:{p}" for p in cluster.management_ports)
    deadline = time.monotonic() + 30
    while True:  # leader agreement may take a moment after quorum, start-up loop lag 10 s to age out
        r = invoke("doctor", "--nodes", nodes, "--json")
        if (r.exit_code == 0 and set(_verdicts(r.output).values()) == {"ok"}) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.exit_code == 0, r.output
    assert set(_verdicts(r.output).values()) == {"ok"}

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("AETHER_API_KEY", None)
    watcher = 0 if cluster.leader_index() != 0 else 1
    victim = next(i for i in (2, 1, 0) if i != watcher)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aether.cli.main",
            "--connect",
            f"127.0.0.1:{cluster.management_ports[watcher]}",
            "events",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 20
        while cluster.try_status(watcher) is None or not _subscribed(proc):
            assert time.monotonic() < deadline and proc.poll() is None, "events did not start"
            time.sleep(0.1)
        cluster.stop(victim)
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not any("node-left" in x and cluster.ids[victim] in x for x in seen):
            assert time.monotonic() < deadline, f"no node-left event; got {seen}"
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()


def _subscribed(proc: subprocess.Popen[str]) -> bool:
    """True once the CLI announced it follows the stream (its first stderr line)."""
    assert proc.stderr is not None
    if not hasattr(proc, "_announced"):
        os.set_blocking(proc.stderr.fileno(), False)
        proc._announced = ""  # type: ignore[attr-defined]
    try:
        chunk = proc.stderr.read() or ""
    except (BlockingIOError, TypeError):
        chunk = ""
    proc._announced += chunk  # type: ignore[attr-defined]
    return "following events" in proc._announced  # type: ignore[attr-defined]
