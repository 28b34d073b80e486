"""Mutual TLS with real `aether node` processes (issue 12; docs/cluster-security.md, *Mutual TLS*):
the CA and certificates made with the real `aether cert` commands, a 3-node TLS cluster reaching
quorum and committing a client write, and a node refusing to start with another node's
certificate. Handshake refusals (wrong CA, wrong id, plaintext, expired) on real Transports:
tests/test_transport_tls.py."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aether.transport.tls import TlsFiles
from conftest import ProcessCluster, aether_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class TlsCluster(ProcessCluster):
    """Every node runs with its own certificate from `ca_dir` (or the one `cert_of` names)."""

    def __init__(self, n: int, base_dir: str | Path, *, ca_dir: Path, **kw: Any) -> None:
        super().__init__(n, base_dir, **kw)
        self.ca_dir = ca_dir
        self.cert_of: dict[int, str] = {}

    def command(self, i: int) -> list[str]:
        owner = self.cert_of.get(i, self.ids[i])
        d = self.ca_dir
        return [
            *super().command(i),
            "--tls-cert", str(d / f"{owner}.crt"),
            "--tls-key", str(d / f"{owner}.key"),
            "--tls-ca", str(d / "ca.crt"),
        ]  # fmt: skip


def _cli_ok(*args: str) -> str:
    r = aether_cli(*args)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    assert "Created the cluster CA" in _cli_ok("cert", "init", "--dir", str(d))
    for node_id in ("node-1", "node-2", "node-3", "client-1"):
        assert f"--tls-cert {d / node_id}.crt" in _cli_ok("cert", "issue", node_id, "--dir", str(d))
    return d


@pytest.fixture
def make_tls_cluster(tmp_path: Path, ca_dir: Path) -> Any:
    made: list[TlsCluster] = []

    def make(**kw: Any) -> TlsCluster:
        c = TlsCluster(3, tmp_path / f"cluster{len(made)}", ca_dir=ca_dir, **kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


def test_cert_commands_write_private_files_and_refuse_a_second_ca(ca_dir: Path) -> None:
    for name in ("ca.key", "ca.crt", "node-1.key", "node-1.crt"):
        assert stat.S_IMODE(os.stat(ca_dir / name).st_mode) == 0o600, name
    again = aether_cli("cert", "init", "--dir", str(ca_dir))
    assert again.returncode == 2 and "already exists" in again.stderr
    nowhere = aether_cli("cert", "issue", "node-9", "--dir", str(ca_dir / "missing"))
    assert nowhere.returncode == 2 and "aether cert init" in nowhere.stderr


async def test_three_tls_nodes_reach_quorum_and_commit_a_write(
    make_tls_cluster: Callable[..., TlsCluster], ca_dir: Path
) -> None:
    from aether.client import AetherClient

    c = make_tls_cluster()
    c.start_all()
    await c.await_quorum(30)
    client_tls = TlsFiles(str(ca_dir / "client-1.crt"), str(ca_dir / "client-1.key"), str(ca_dir / "ca.crt"))
    async with AetherClient(c.addresses, cluster_name=c.cluster_name, secret=c.secret, tls=client_tls) as cl:
        await cl.put("user/tls", b"committed over TLS")
        assert await cl.get("user/tls") == b"committed over TLS"
    for i in range(3):
        await c.await_quorum(10)
        assert "user/tls" in await c.akv(i, "user/")
        assert c.log_lines(i, "mutual TLS"), c.log_tail(i)
    # a client without TLS does not get in
    with pytest.raises(ConnectionError, match="closed the connection during the handshake"):
        async with AetherClient(c.addresses, cluster_name=c.cluster_name, secret=c.secret, timeout=2) as pl:
            await pl.put("user/plain", b"x")
    assert any(c.log_lines(i, "did not start a TLS handshake") for i in range(3))


def test_a_node_refuses_to_start_with_another_nodes_certificate(
    make_tls_cluster: Callable[..., TlsCluster],
) -> None:
    c = make_tls_cluster()
    c.cert_of[1] = "node-3"  # node-2 started with node-3's certificate
    r = subprocess.run(c.command(1), env=c.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "issued to node 'node-3', but this is node 'node-2'" in r.stderr
    assert "aether cert issue node-2" in r.stderr


def test_adding_an_unreachable_node_to_a_tls_cluster_says_it_needs_its_certificate(
    make_tls_cluster: Callable[..., TlsCluster],
) -> None:
    """Walking docs/operations.md (a mutual-TLS cluster): the refusal of `aether cluster add-node`
    for a node not started yet told the operator to start it '(same cluster secret)'."""
    c = make_tls_cluster()
    c.start_all()
    c.wait_quorum(30)
    r = aether_cli("--connect", f"127.0.0.1:{c.management_ports[0]}", "cluster", "add-node", "node-4",
                   "127.0.0.1:1", env=c.env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        f"start it with `aether node --id node-4 --join {c.address(0)}` with its certificate from the "
        "cluster CA (`aether cert issue node-4`) first"
    ) in r.stderr, r.stderr
    assert "cluster secret" not in r.stderr
