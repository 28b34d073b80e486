"""A cluster of separate hosts: each node in its own network namespace with its own address, mutual
TLS between nodes, HTTPS and an API key on the management API and the router, its own data and
repository directories, nothing shared but the network (tests/netns.py builds the hosts).

Real `aether node` processes and the real CLI: the cluster forms; a wheel uploaded through one node
runs on every node, configured with a cluster secret; a map and the slice serve through every
node; a host that loses its network leaves the majority serving while it refuses writes with a
clear error, and after healing it converges; a fourth host joins (`--join`, over mutual TLS) and
is added through the log, one of the first three is removed (its slice instance is placed
again on the others), and writes go on. Skipped where
namespaces cannot be made (not root, no iproute2), with the reason.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aether.slices.testing import build_slice_wheel
from conftest import EXAMPLES
from netns import Hosts, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

T = TypeVar("T")

CLUSTER_PORT, MANAGEMENT_PORT, HTTP_PORT = 7000, 9000, 8080  # each host has its own ports
API_KEY = "netns-test-admin-key-0123456789abcdef"
# between two polls of a condition: each poll is a CLI process (~0.5 s), so more pause is only waiting
POLL = 0.1


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _each(fn: Callable[[int], T], items: Sequence[int]) -> list[T]:
    """`fn` of every item, side by side (each a CLI process: one after the other they add up)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass
class Cluster:
    hosts: Hosts
    dir: Path
    ids: list[str]
    ca: Path

    def address(self, i: int) -> str:
        return self.hosts[i].address

    def node_argv(self, i: int, peers: list[int]) -> list[str]:
        nid = self.ids[i]
        tls = self.dir / "tls"
        home = self.dir / nid
        return [
            sys.executable, "-m", "aether.cli.main", "node",
            "--id", nid,
            "--peers", ",".join(f"{self.ids[j]}={self.address(j)}:{CLUSTER_PORT}" for j in peers),
            "--host", self.address(i),
            "--cluster-port", str(CLUSTER_PORT),
            "--management-port", str(MANAGEMENT_PORT),
            "--http-port", str(HTTP_PORT),
            "--data-dir", str(home / "data"),
            "--repository", str(home / "repository"),
            "--fsync", "snapshot",
            "--tls-cert", str(tls / f"{nid}.crt"),
            "--tls-key", str(tls / f"{nid}.key"),
            "--tls-ca", str(tls / "ca.crt"),
            "--https",
            "--api-key-file", str(self.dir / "api-key"),
        ]

    def start(self, i: int, peers: list[int], *, join: int | None = None) -> subprocess.Popen[bytes]:
        """Start node `i` with `peers` as the member set, or (`join`) asking member `join` for it."""
        (self.dir / self.ids[i]).mkdir(exist_ok=True)
        argv = self.node_argv(i, peers)
        if join is not None:
            k = argv.index("--peers")
            argv[k : k + 2] = ["--join", f"{self.address(join)}:{CLUSTER_PORT}"]
        return self.hosts.run(i, argv, log=self.dir / f"{self.ids[i]}.log", env=_env())

    def members(self, node: int) -> list[str]:
        code, status = self.cli(node, "status")
        return sorted(m["id"] for m in status["nodes"]) if code == 0 else []

    def cli(self, node: int, *args: str, inside: int | None = None, timeout: float = 60) -> tuple[int, Any]:
        """`aether --json ARGS` against node `node`'s management API, run from the test's own
        namespace through the bridge, or from inside host `inside`: (exit code, JSON or text)."""
        argv = [
            sys.executable, "-m", "aether.cli.main", "--connect", f"https://{self.address(node)}:{MANAGEMENT_PORT}",
            "--ca", str(self.ca), "--api-key", API_KEY, "--timeout", "20", "--json", *args,
        ]
        if inside is None:
            res = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, env=_env(), check=False
            )
        else:
            res = self.hosts.exec(inside, argv, timeout=timeout, env=_env())
        out = res.stdout.strip()
        try:
            return res.returncode, json.loads(out) if out else res.stderr
        except ValueError:
            return res.returncode, out + res.stderr

    def https(self, node: int, path: str) -> tuple[int, Any]:
        """GET `path` on node `node`'s HTTP router (HTTPS, verified with the cluster CA)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        url = f"https://{self.address(node)}:{HTTP_PORT}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def wait_ready(self, nodes: list[int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            codes = _each(lambda i: self.cli(i, "health")[0], pending)
            pending = [i for i, code in zip(pending, codes, strict=True) if code != 0]
            if pending and time.monotonic() > deadline:
                logs = {self.ids[i]: (self.dir / f"{self.ids[i]}.log").read_text()[-3000:] for i in pending}
                late = [self.ids[i] for i in pending]
                raise AssertionError(f"not ready after {timeout:g}s: {late}\n{logs}")
            time.sleep(POLL)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    why = unavailable()
    if why:
        pytest.skip(why)
    hosts = Hosts(4)
    try:
        ids = [f"node-{i + 1}" for i in range(len(hosts))]
        tls = tmp_path / "tls"
        subprocess.run([sys.executable, "-m", "aether.cli.main", "cert", "init", "--dir", str(tls)],
                       check=True, capture_output=True, env=_env(), timeout=60)
        for i, nid in enumerate(ids):
            subprocess.run(
                [sys.executable, "-m", "aether.cli.main", "cert", "issue", nid, "--dir", str(tls),
                 "--san", hosts[i].address],
                check=True, capture_output=True, env=_env(), timeout=60,
            )
        (tmp_path / "api-key").write_text(API_KEY)
        os.chmod(tmp_path / "api-key", 0o600)
        yield Cluster(hosts, tmp_path, ids, tls / "ca.crt")
    finally:
        hosts.close()


def test_hosts_serve_through_every_node_survive_a_cut_and_change_members(
    cluster: Cluster, tmp_path: Path
) -> None:
    members = [0, 1, 2]
    procs = {i: cluster.start(i, members) for i in members}  # each with empty data and repository dirs
    cluster.wait_ready(members)

    code, status = cluster.cli(0, "status")
    assert code == 0 and status["quorum"] and status["leader"] in cluster.ids[:3], status
    assert {(m["id"], m["state"]) for m in status["nodes"]} == {(n, "up") for n in cluster.ids[:3]}

    # a map and slices serve through every node
    assert cluster.cli(0, "map", "create", "accounts")[0] == 0
    assert cluster.cli(1, "map", "put", "accounts", "alice", '{"balance": 10}')[0] == 0
    got = _each(lambda i: cluster.cli(i, "map", "get", "accounts", "alice"), members)
    for i, (code, value) in zip(members, got, strict=True):
        assert code == 0 and value == {"balance": 10}, (i, value)
    # the wheel is uploaded through one node; every node fetches it from the cluster to run it
    source = (EXAMPLES / "hello-slice" / "hello_slice" / "__init__.py").read_text()
    wheel = build_slice_wheel(
        tmp_path / "wheels", "org.example:hello:0.1.0", source, "Hello", module="hello_slice"
    )
    code, out = cluster.cli(0, "artifact", "deploy", str(wheel))
    assert code == 0, out
    # its configuration names a secret kept by the cluster
    code, out = cluster.cli(1, "secret", "set", "greeting", "--from-file", str(_write(tmp_path / "g", "Hej")))
    assert code == 0, out
    blueprint = tmp_path / "hello.toml"
    blueprint.write_text(
        'id = "hello:0.1.0"\n[slices.hello]\nartifact = "org.example:hello:0.1.0"\ninstances = 3\n'
        '[slices.hello.config]\ngreeting = { secret = "greeting" }\n'
    )
    code, out = cluster.cli(2, "blueprint", "apply", str(blueprint), "--wait")
    assert code == 0, out
    for i in members:
        cache = tmp_path / cluster.ids[i] / "repository"
        assert any(cache.rglob("hello*.whl")), f"{cluster.ids[i]} runs the slice from its own cache"
        status_code, doc = cluster.https(i, f"/hello/{cluster.ids[i]}")
        assert status_code == 200 and doc["message"] == f"Hej, {cluster.ids[i]}!", (i, doc)
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in cluster.ids[:3])
    assert "Hej" not in logs, "the secret's value reached a log"

    # host 3 loses its network: the majority keeps serving, host 3 refuses writes and says why
    cluster.hosts.cut(2)
    deadline = time.monotonic() + 30
    while True:
        code, _ = cluster.cli(0, "map", "put", "accounts", "bob", '{"balance": 20}')
        if code == 0:
            break
        assert time.monotonic() < deadline, "the majority stopped serving writes"
        time.sleep(POLL)
    assert cluster.cli(1, "map", "get", "accounts", "bob") == (0, {"balance": 20})
    for i in (0, 1):
        assert cluster.https(i, "/hello/majority")[0] == 200
    deadline = time.monotonic() + 30
    while True:  # (its own API still answers inside its host; it notices the loss within seconds)
        code, err = cluster.cli(2, "map", "put", "accounts", "carol", '{"balance": 30}', inside=2)
        if code != 0:
            break
        assert time.monotonic() < deadline, "the cut-off node kept accepting writes"
        time.sleep(POLL)
    text = json.dumps(err) if not isinstance(err, str) else err
    assert "quorum" in text.lower() or "unavailable" in text.lower(), text

    # healed, it converges: it serves what the majority wrote meanwhile
    cluster.hosts.heal(2)
    cluster.wait_ready([2])
    deadline = time.monotonic() + 30
    while cluster.cli(2, "map", "get", "accounts", "bob") != (0, {"balance": 20}):
        assert time.monotonic() < deadline, "the healed node did not converge"
        time.sleep(POLL)
    assert cluster.https(2, "/hello/healed")[0] == 200

    # a fourth host joins: it asks a member for the member set, catches up as a learner, and is
    # added through the log; then one of the first three is removed while writes go on
    procs[3] = cluster.start(3, [3], join=0)
    deadline = time.monotonic() + 60
    while cluster.cli(3, "status")[0] != 0:
        assert time.monotonic() < deadline, (tmp_path / "node-4.log").read_text()[-3000:]
        time.sleep(POLL)
    code, out = cluster.cli(0, "cluster", "add-node", "node-4", f"{cluster.address(3)}:{CLUSTER_PORT}")
    assert code == 0, out
    cluster.wait_ready([3])
    assert cluster.cli(3, "map", "put", "accounts", "dave", '{"balance": 40}')[0] == 0
    assert cluster.cli(0, "map", "get", "accounts", "dave") == (0, {"balance": 40})
    assert cluster.https(3, "/hello/newcomer")[0] == 200
    code, out = cluster.cli(0, "cluster", "remove-node", "node-2")
    assert code == 0, out
    deadline = time.monotonic() + 30
    while (seen := _each(cluster.members, (0, 2, 3))) != [["node-1", "node-3", "node-4"]] * 3:
        assert time.monotonic() < deadline, seen
        time.sleep(POLL)
    cluster.hosts.stop(procs[1])
    # the slice's instance that ran on node-2 is placed again, on the members that remain
    deadline = time.monotonic() + 60
    while True:
        code, out = cluster.cli(0, "slices")
        rows = out.get("slices", []) if isinstance(out, dict) else out if isinstance(out, list) else []
        hello = [r for r in rows if r["artifact"].startswith("org.example:hello")]
        on = {i["node"] for r in hello for i in r["instances"] if i["state"] == "ACTIVE"}
        if code == 0 and hello and hello[0]["active"] == 3 and on and "node-2" not in on:
            break
        assert time.monotonic() < deadline, out
        time.sleep(POLL)
    assert cluster.cli(2, "map", "put", "accounts", "erin", '{"balance": 50}')[0] == 0
    assert cluster.cli(3, "map", "get", "accounts", "erin") == (0, {"balance": 50})
    assert cluster.cli(0, "map", "get", "accounts", "bob") == (0, {"balance": 20})
