"""The node on etcd (`aether node --store etcd`, issue 20): the configuration and its checks, the
leader choice from the member keys (sans-IO), and a 3-node cluster of real `aether node` processes
on a real 3-member etcd (tests/etcd_cluster.py): ready, the cluster-port client protocol, a
distributed map, the hello example through the router, kill -9 of the leader (the next oldest
member leads, the slice and the map are served), 503 naming etcd while etcd has no quorum, and
back; and a node waiting for an unreachable etcd."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aether.cluster.leader import LeaderChanged
from aether.core.config import NodeConfig, load_toml
from aether.core.errors import BadRequest, ConfigError
from aether.core.types import Address, PeerSpec
from aether.etcd import EtcdConfig, EtcdStore
from aether.kv.machine import Command, Put
from aether.node.etcd_wiring import EtcdLeaderManager, choose_leader, client_command, etcd_config
from conftest import ProcessCluster, deploy_hello_examples, free_ports, http_json
from etcd_cluster import HAVE_ETCD, MISSING, EtcdCluster

# --- configuration ------------------------------------------------------------------------------


def _config(**kw: Any) -> NodeConfig:
    peers = [PeerSpec("node-1", Address("127.0.0.1", 7000))]
    return NodeConfig(node_id="node-1", peers=peers, **kw)


def test_store_defaults_to_rabia_and_etcd_needs_endpoints() -> None:
    assert _config().validate().store == "rabia"
    with pytest.raises(ConfigError, match="store must be rabia or etcd"):
        _config(store="zookeeper").validate()
    with pytest.raises(ConfigError, match="--etcd-endpoints http://HOST:2379"):
        _config(store="etcd").validate()
    with pytest.raises(ConfigError, match="etcd endpoint 'h1:2379': expected http://HOST:PORT"):
        _config(store="etcd", etcd_endpoints=["h1:2379"]).validate()
    ok = _config(store="etcd", etcd_endpoints=["http://h1:2379", "https://h2:2379"]).validate()
    assert etcd_config(ok).endpoints == ("http://h1:2379", "https://h2:2379")
    assert etcd_config(ok).root == "/aether/aether/"


def test_etcd_settings_are_refused_with_the_rabia_store_and_join_with_etcd() -> None:
    with pytest.raises(ConfigError, match="etcd_endpoints set but the store is rabia: add --store etcd"):
        _config(etcd_endpoints=["http://h1:2379"]).validate()
    with pytest.raises(ConfigError, match="--join is for the rabia store"):
        _config(store="etcd", etcd_endpoints=["http://h:2379"], join="127.0.0.1:7001").validate()
    with pytest.raises(ConfigError, match="key prefix /aether/NAME/"):
        _config(store="etcd", etcd_endpoints=["http://h:2379"], cluster_name="a/b").validate()


def test_etcd_auth_needs_user_and_one_password_source(tmp_path: Path) -> None:
    base: dict[str, Any] = {"store": "etcd", "etcd_endpoints": ["http://h:2379"]}
    with pytest.raises(ConfigError, match="needs a user and its password"):
        _config(**base, etcd_username="aether").validate()
    with pytest.raises(ConfigError, match="use only one"):
        _config(**base, etcd_username="u", etcd_password="p", etcd_password_file="f").validate()
    with pytest.raises(ConfigError, match="--etcd-cert needs --etcd-key"):
        _config(**base, etcd_cert="c.pem").validate()
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = _config(**base, etcd_username="aether", etcd_password_file=str(pw)).validate()
    assert etcd_config(cfg).password == "s3cret"
    assert "s3cret" not in repr(_config(**base, etcd_username="u", etcd_password="s3cret"))
    missing = _config(**base, etcd_username="aether", etcd_password_file=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"etcd password file .*none"):
        etcd_config(missing.validate())


def test_toml_gives_the_store_settings(tmp_path: Path) -> None:
    f = tmp_path / "aether.toml"
    f.write_text(
        '[node]\nstore = "etcd"\netcd_endpoints = ["http://h1:2379", "http://h2:2379"]\n'
        'etcd_ca = "ca.pem"\netcd_member_ttl = 3\n'
    )
    got = load_toml(f)
    assert got == {
        "store": "etcd", "etcd_endpoints": ["http://h1:2379", "http://h2:2379"], "etcd_ca": "ca.pem",
        "etcd_member_ttl": 3,
    }  # fmt: skip


# --- the leader from the member keys (sans-IO) ---------------------------------------------------


def test_the_oldest_live_member_key_leads() -> None:
    assert choose_leader({}) is None
    assert choose_leader({"node-1": 30, "node-2": 12, "node-3": 20}) == "node-2"
    assert choose_leader({"node-b": 7, "node-a": 7}) == "node-a"  # one transaction: by id


def test_etcd_leader_manager_follows_the_live_keys() -> None:
    seen: list[LeaderChanged] = []
    lm = EtcdLeaderManager("node-2")
    lm.listeners.append(seen.append)
    assert lm.leader is None
    lm.set_live({"node-1": 5})  # this node's key is not live yet: no leader for it
    assert lm.leader is None and lm.members == ["node-1"]
    lm.set_live({"node-1": 5, "node-2": 9, "node-3": 11})
    assert lm.leader == "node-1" and not lm.is_leader
    lm.peer_up("node-3")
    lm.peer_up("node-4")  # not a live member: not counted
    assert lm.up == {"node-3"}
    lm.set_live({"node-2": 9, "node-3": 11})  # node-1's lease expired
    assert lm.leader == "node-2" and lm.is_leader and lm.members == ["node-2", "node-3"]
    lm.set_live({"node-1": 40, "node-2": 9, "node-3": 11})  # node-1 back: a new key, younger
    assert lm.leader == "node-2"
    lm.set_live(None)  # etcd unreachable
    assert lm.leader is None
    assert [(e.leader, e.previous, e.is_self) for e in seen] == [
        ("node-1", None, False), ("node-2", "node-1", True), (None, "node-2", False),
    ]  # fmt: skip
    assert lm.changes == 3


# --- real processes ---------------------------------------------------------------------------------

HELLO = "org.example:hello:0.1.0"


def _wait(check: Callable[[], Any], what: str, c: ProcessCluster, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as e:
            last = e
        if last and not isinstance(last, OSError):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout}s (last: {last})\n{c.logs_report()}")


async def _client_round(c: ProcessCluster) -> None:
    async with c.client(prefer=1) as client:
        rev = await client.put("user/k", b"v1")
        assert rev > 0 and await client.get("user/k") == b"v1"
        assert await client.compare_and_set("user/k", b"v1", b"v2")
        assert not await client.compare_and_set("user/k", b"v1", b"v3")
        assert await client.compare_and_set("user/new", None, b"n")
        assert await client.remove("user/new") and not await client.remove("user/new")
        with pytest.raises(BadRequest, match="may use only user/ keys"):
            await client.put("blueprints/x", b"no")


async def _exactly_once(etcd: EtcdCluster, name: str) -> None:
    """A command's session (client, seq) is its request id: sent again (a retry through another
    node after a lost answer) it is not applied a second time."""
    store = EtcdStore(EtcdConfig(endpoints=etcd.endpoints, cluster=name), "test")
    await store.start()
    try:
        await store.wait_synced()
        first = await client_command(store, Command(Put("user/once", b"1"), "lane-a", 1), 5.0)
        again = await client_command(store, Command(Put("user/once", b"2"), "lane-a", 1), 5.0)
        assert again.ok and again.revision == first.revision
        assert await store.get("user/once") == b"1"
        await client_command(store, Command(Put("user/once", b"3"), "lane-a", 2), 5.0)
        assert await store.get("user/once") == b"3"
    finally:
        await store.stop()


def _hello(c: ProcessCluster, i: int) -> bool:
    status, body = http_json(c.http_ports[i], "GET", "/hello/world", timeout=3)
    return status == 200 and body.get("message") == "Hello, world!"


@pytest.mark.skipif(not HAVE_ETCD, reason=MISSING)
@pytest.mark.timeout(120)
def test_three_nodes_on_etcd_serve_survive_kill9_and_refuse_writes_without_etcd_quorum(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    etcd = EtcdCluster(tmp_path / "etcd", 3)
    c: ProcessCluster | None = None
    try:
        etcd.start()
        name = f"t{uuid.uuid4().hex[:8]}"
        c = make_process_cluster(
            3, start=False, cluster_name=name,
            extra_args=["--store", "etcd", "--etcd-endpoints", ",".join(etcd.endpoints),
                        "--etcd-member-ttl", "2", "--fsync", "none"],
        )  # fmt: skip
        deploy_hello_examples(c.repository, tmp_path / "wheels")
        c.start_all()
        statuses = c.wait_quorum(30)
        st = statuses[0]
        assert st["store"] == "etcd" and st["store_endpoints"] == list(etcd.endpoints), st
        assert (tmp_path / "cluster0" / "node-1" / "data" / "consensus").exists() is False  # no journal
        # Prometheus figures from the etcd store (no consensus slots)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{c.management_ports[0]}/metrics", timeout=5)
        text = metrics.read().decode()
        figures = {
            ln.split("{")[0]: ln.rsplit(" ", 1)[1] for ln in text.splitlines() if ln.startswith("aether_")
        }
        assert (figures["aether_cluster_quorum"], figures["aether_cluster_members"]) == ("1.0", "3.0")
        # every node sees the same leader, chosen from the member keys
        leaders = {c.status(i)["leader"] for i in range(3)}
        assert len(leaders) == 1 and None not in leaders, leaders
        # the membership routes say how membership works here
        status, doc = http_json(c.management_ports[0], "DELETE", "/api/v1/cluster/nodes/node-3")
        assert status == 409 and "etcd" in doc["detail"], (status, doc)

        # the cluster-port client protocol (AetherClient) on the etcd store
        asyncio.run(_client_round(c))
        assert c.kv(2, "user/")["user/k"] == "v2"  # every node's cache
        asyncio.run(_exactly_once(etcd, name))

        bp = f'id = "hello:1"\n\n[slices.hello]\nartifact = "{HELLO}"\ninstances = 3\n'
        status, doc = http_json(
            c.management_ports[0], "POST", "/api/v1/blueprints", {"toml": bp, "filename": "h.blueprint"}
        )
        assert status in (200, 201), (status, doc)
        _wait(lambda: all(_hello(c, i) for i in range(3)), "GET /hello/world on every node", c)

        # a distributed map (its definition in the etcd store, its data on the nodes)
        status, doc = http_json(
            c.management_ports[0], "POST", "/api/v1/maps", {"name": "m", "replicas": 3, "write_quorum": 2}
        )
        assert status == 201, (status, doc)
        _wait(
            lambda: http_json(c.management_ports[1], "PUT", "/api/v1/maps/m/entries/a", {"n": 1})[0] == 200,
            "a map write through node-2", c,
        )  # fmt: skip

        # kill -9 the leader: its lease expires, the oldest other member leads, the slice is served
        leader = c.leader_index()
        c.kill9(leader)
        survivors = [i for i in range(3) if i != leader]
        gone = c.ids[leader]

        def moved() -> bool:
            for i in survivors:
                st = c.status(i)
                if st["leader"] in (None, gone):
                    return False
                if next(m for m in st["nodes"] if m["id"] == gone)["state"] != "down":
                    return False
            return True

        took = time.monotonic()
        _wait(moved, f"a new leader after {gone} was killed", c, timeout=15)
        took = time.monotonic() - took
        assert took < 8, f"the leader moved after {took:.1f}s (member ttl 2s)"
        _wait(lambda: all(_hello(c, i) for i in survivors), "GET /hello/world on the survivors", c)
        for i in survivors:  # (the dead primary's partitions are served once taken over: wait for it)
            port = c.management_ports[i]
            _wait(
                lambda port=port: http_json(port, "GET", "/api/v1/maps/m/entries/a") == (200, {"n": 1}),
                f"the map entry through {c.ids[i]}", c, timeout=15,
            )  # fmt: skip

        # etcd without quorum: writes answer 503 naming etcd, /readyz is not ready; then back
        etcd.kill(1)
        etcd.kill(2)
        via = survivors[0]

        def refused() -> Any:
            status, doc = http_json(
                c.management_ports[via], "POST", "/api/v1/blueprints",
                {"toml": bp.replace("hello:1", "hello:2"), "filename": "h2.blueprint"}, timeout=20,
            )  # fmt: skip
            return doc if status == 503 else None

        doc = _wait(refused, "a write refused with 503", c, timeout=30)
        assert "etcd" in doc["detail"], doc
        _wait(lambda: http_json(c.management_ports[via], "GET", "/readyz")[0] == 503, "/readyz 503", c)
        status, doc = http_json(c.management_ports[via], "GET", "/api/v1/status")
        assert status == 200 and doc["quorum"] is False and "etcd" in (doc["store_error"] or ""), doc
        assert _hello(c, via)  # reads (the route table, the endpoints) come from the cache
        etcd.restart(1)
        etcd.restart(2)
        c.wait_quorum(30, survivors, all_up=False)
        status, doc = http_json(
            c.management_ports[via], "POST", "/api/v1/blueprints",
            {"toml": bp.replace("hello:1", "hello:3"), "filename": "h3.blueprint"}, timeout=20,
        )  # fmt: skip
        assert status in (200, 201), (status, doc)
    finally:
        if c is not None:
            c.close()  # the nodes first (by PID), then etcd
        etcd.stop()


@pytest.mark.timeout(60)
def test_a_node_waits_for_an_unreachable_etcd_and_stops_while_waiting(
    make_process_cluster: Callable[..., ProcessCluster],
) -> None:
    """Nothing answers at the endpoint: the node says it waits for etcd (naming it) and retries;
    SIGTERM ends it at once, cleanly (it does not wait for etcd to come back)."""
    (port,) = free_ports(1)  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    c = make_process_cluster(
        1, start=False, extra_args=["--store", "etcd", "--etcd-endpoints", url, "--fsync", "none"]
    )
    c.start(0)
    _wait(lambda: len(c.log_lines(0, "waits for etcd", url)) >= 2, "two 'waits for etcd' lines", c, 20)
    assert c.try_status(0) is None  # it serves nothing before it has the cluster's state
    t0 = time.monotonic()
    assert c.stop(0, timeout=10) == 0
    assert time.monotonic() - t0 < 5
