"""Attacks on the cluster port of real `aether node` processes (issue 12; docs/cluster-security.md).

Each test runs an attack that worked before the cluster secret existed and asserts it fails:
an impostor peer (and a loop of them) does not displace the genuine one, a client without the
secret is refused, a client with it cannot write cluster key families, unauthenticated half
frames cannot grow the node's memory, and a connection that never proves the secret is closed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec
import psutil
import pytest

from aether.core.errors import BadRequest, Unauthorized
from aether.transport.messages import Challenge, ClientHello, PeerHello, Proof
from conftest import HOST, ProcessCluster, aether_cli, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def three_nodes(make_module_process_cluster: Callable[..., ProcessCluster]) -> ProcessCluster:
    """A 3-node cluster shared by the impostor and the client test: they attack it from outside
    and check it keeps its peers and commits; neither stops a node or writes what the other reads."""
    return make_module_process_cluster(3)


@pytest.fixture(scope="module")
def one_node(make_module_process_cluster: Callable[..., ProcessCluster]) -> ProcessCluster:
    """A 1-node cluster shared by the half-frame and the handshake-deadline test (connections
    from outside that the node closes; the memory test measures the growth of its RSS)."""
    return make_module_process_cluster(1)


def _frame(obj: Any) -> bytes:
    payload = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(payload)) + payload


def _impostor(port: int, claim: str, cluster: str) -> str:
    """Claim to be node `claim` with a made-up proof, then send a forged frame; returns the reply."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(_frame(PeerHello(cluster, claim, os.urandom(16))))
        head = s.recv(4)
        if len(head) < 4:
            return "closed"
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                return "closed"
            body += chunk
        msgspec.msgpack.decode(body, type=Challenge)
        try:
            s.sendall(_frame(Proof(os.urandom(32))) + _frame([20, "forged"]))
            return s.recv(4096).decode("latin-1")
        except OSError:
            return "reset"


def _both_see_each_other(c: ProcessCluster) -> bool:
    s1, s2 = c.try_status(0), c.try_status(1)
    if s1 is None or s2 is None:
        return False
    up1 = {n["id"] for n in s1["nodes"] if n["state"] == "up"}
    up2 = {n["id"] for n in s2["nodes"] if n["state"] == "up"}
    return "node-2" in up1 and "node-1" in up2 and bool(s1["quorum"])


async def test_impostor_loop_neither_joins_nor_displaces_the_genuine_peer(
    three_nodes: ProcessCluster,
) -> None:
    c = three_nodes
    port = c.cluster_ports[0]
    stop = time.monotonic() + 6.0
    replies: list[str] = []

    def attack() -> None:
        while time.monotonic() < stop:
            replies.append(_impostor(port, "node-2", c.cluster_name))

    attacker = asyncio.create_task(asyncio.to_thread(attack))
    samples = 0
    while not attacker.done():
        # node-1 keeps node-2 up and node-2 keeps node-1 up the whole time (before: every impostor
        # connection replaced node-2's link, so node-2 saw node-1 go down again and again)
        assert await asyncio.to_thread(_both_see_each_other, c), "a peer went down during the attack"
        samples += 1
        await asyncio.sleep(0.1)
    await attacker
    assert len(replies) >= 20 and samples >= 10, (len(replies), samples)
    assert all("presented a wrong cluster secret" in r for r in replies[:3]), replies[:3]
    events = c.log_text(0) + c.log_text(1)
    assert "peer node-2 down" not in c.log_text(0) and "peer node-1 down" not in c.log_text(1), events[-2000:]
    assert "claiming peer 'node-2': peer 'node-2' presented a wrong cluster secret" in c.log_text(0)
    async with c.client() as cl:  # and the cluster still commits
        await cl.put("user/after-attack", b"1")


async def test_clients_need_the_secret_and_may_write_only_user_keys(
    three_nodes: ProcessCluster,
) -> None:
    c = three_nodes
    for secret in ("", "a-wrong-secret-of-enough-length"):
        bad = c.client(secret=secret or None, timeout=3.0)
        with pytest.raises(Unauthorized, match=r"every node refused this client.*cluster secret"):
            await bad.put("user/x", b"1")  # at once, not a retry loop ending in "no quorum"
        await bad.close()
    blueprint = msgspec.json.encode({"slices": [{"artifact": "org.evil:evil:1.0", "instances": 1}]})
    async with c.client() as cl:
        for key in ("blueprints/evil", "slices/org.evil:evil:1.0/node-1", "routes/GET/evil", "maps/table"):
            with pytest.raises(BadRequest, match="only user/ keys"):
                await cl.put(key, blueprint)
        with pytest.raises(BadRequest, match="only user/ keys"):
            await cl.get("maps/table")
        with pytest.raises(BadRequest, match="only user/ keys"):
            await cl.compare_and_set("blueprints/evil", None, blueprint)
        await cl.put("user/ok", b"fine")
        assert await cl.get("user/ok") == b"fine"
    assert c.kv(0, "blueprints/") == {}
    assert c.kv(0, "user/ok") != {}


async def test_unauthenticated_half_frames_do_not_grow_memory(
    one_node: ProcessCluster,
) -> None:
    """100 connections each announce a 1 MiB frame and send 512 KiB of it, and 100 more hold a
    half-sent 4,000-byte frame. Before the 4 KiB pre-auth limit the node buffered all of it
    (~50 MiB here; 1.4 GiB with 16 MiB frames). Bound: RSS grows by less than 20 MiB."""
    c = one_node
    proc = psutil.Process(c.pid(0))
    before = proc.memory_info().rss
    port = c.cluster_ports[0]

    def flood() -> list[socket.socket]:
        held: list[socket.socket] = []
        chunk = b"\x00" * 65536
        for _ in range(100):
            s = socket.create_connection((HOST, port), timeout=5)
            held.append(s)
            try:
                s.sendall(struct.pack(">I", 1 << 20))
                for _ in range(8):
                    s.sendall(chunk)
            except OSError:
                pass  # closed by the node at the header: that is the point
        for _ in range(100):
            s = socket.create_connection((HOST, port), timeout=5)
            held.append(s)
            s.sendall(struct.pack(">I", 4000) + b"\x00" * 3000)
        return held

    held = await asyncio.to_thread(flood)
    try:
        await asyncio.sleep(0.5)
        grown = (proc.memory_info().rss - before) / 2**20
        assert grown < 20, f"RSS grew by {grown:.1f} MiB under 200 unauthenticated connections"
        print(f"RSS before {before / 2**20:.1f} MiB, grown by {grown:.1f} MiB")
        assert c.try_status(0) is not None
    finally:
        for s in held:
            s.close()


async def test_handshake_deadline_closes_a_connection_that_never_proves(
    one_node: ProcessCluster,
) -> None:
    c = one_node

    def stalled() -> float:
        with socket.create_connection((HOST, c.cluster_ports[0]), timeout=10) as s:
            s.sendall(_frame(ClientHello(c.cluster_name, "stalling", os.urandom(16))))  # then no proof
            t0 = time.monotonic()
            while True:
                try:
                    if not s.recv(4096):
                        return time.monotonic() - t0
                except ConnectionResetError:
                    return time.monotonic() - t0

    waited = await asyncio.to_thread(stalled)
    assert waited < 6.0, waited  # handshake deadline: 3 s with the default heartbeat timeout
    assert "no proof of the cluster secret within the handshake deadline" in c.log_text(0)


def test_node_beyond_loopback_refuses_to_start_without_a_secret(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    cport, mport, hport = free_ports(3)
    r = aether_cli(
        "node", "--host", "0.0.0.0", "--cluster-port", str(cport), "--management-port", str(mport),
        "--http-port", str(hport), "--data-dir", str(tmp_path / "data"), "--api-key", "k" * 20,
        env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "beyond loopback, without a cluster secret" in r.stderr, r.stderr
    # refused before anything was written: no data directory (it used to hold a new node.lock and
    # consensus/incarnation), and the same for the management API without a key
    assert not (tmp_path / "data").exists(), sorted(str(p) for p in (tmp_path / "data").rglob("*"))
    r = aether_cli(
        "node", "--host", "0.0.0.0", "--cluster-port", str(cport), "--management-port", str(mport),
        "--http-port", str(hport), "--data-dir", str(tmp_path / "data"),
        env={**env, "AETHER_CLUSTER_SECRET": "s" * 32}, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "management API would listen on '0.0.0.0'" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists(), sorted(str(p) for p in (tmp_path / "data").rglob("*"))
    # a secret that is too short is refused too, naming the fix
    env["AETHER_CLUSTER_SECRET"] = "short"
    r = aether_cli("node", "--data-dir", str(tmp_path / "data"), env=env, timeout=60)
    assert r.returncode == 2 and "at least 16" in r.stderr, r.stderr
