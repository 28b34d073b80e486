"""Mutual TLS on the cluster port (issue 12): the cluster CA and node certificates
(`aether.transport.tls`), then real Transports on loopback: a TLS cluster links up, and a
certificate from another CA, another node's certificate, plaintext and an expired certificate are
each refused with a log line naming the problem. Real node processes: tests/test_tls_process.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aether.core.errors import ConfigError
from aether.core.types import Address
from aether.transport import EventBus, PeerHello, Transport
from aether.transport.client import open_client_connection
from aether.transport.tls import (
    TlsFiles,
    cert_node_id,
    dialer_context,
    file_node_id,
    init_ca,
    issue_node_cert,
    server_context,
)
from test_transport import Note, PeerMsg, Resp, wait_until
from test_transport_badinput import frame

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
CLUSTER = "tls-cluster"


def files(ca_dir: Path, node_id: str, *, cert_of: str | None = None, ca_of: Path | None = None) -> TlsFiles:
    """TlsFiles of `node_id` from `ca_dir` (issuing them if needed); `cert_of` uses another node's
    certificate and key, `ca_of` trusts another CA."""
    owner = cert_of or node_id
    if not (ca_dir / f"{owner}.crt").exists():
        issue_node_cert(ca_dir, owner)
    ca = (ca_of or ca_dir) / "ca.crt"
    return TlsFiles(str(ca_dir / f"{owner}.crt"), str(ca_dir / f"{owner}.key"), str(ca))


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    init_ca(d)
    return d


# ---------------------------------------------------------------------------------------------
# the CA and certificates


def test_init_and_issue_write_private_files_naming_the_node(ca: Path) -> None:
    cert, key = issue_node_cert(ca, "node-2")
    for p in (ca / "ca.key", ca / "ca.crt", cert, key):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert stat.S_IMODE(os.stat(ca).st_mode) == 0o700
    assert file_node_id(str(cert)) == "node-2"
    # the certificate verifies against the CA and loads as a server and a dialer identity
    tls = TlsFiles(str(cert), str(key), str(ca / "ca.crt"))
    assert isinstance(server_context(tls), ssl.SSLContext)
    assert dialer_context(tls).minimum_version == ssl.TLSVersion.TLSv1_3


def test_init_refuses_to_replace_a_ca_and_issue_needs_one(tmp_path: Path, ca: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        init_ca(ca)
    with pytest.raises(ConfigError, match="aether cert init"):
        issue_node_cert(tmp_path / "nowhere", "node-1")
    with pytest.raises(ConfigError, match="invalid node id"):
        issue_node_cert(ca, "not a node id!")


def test_context_errors_name_the_flag(ca: Path) -> None:
    good = files(ca, "node-1")
    with pytest.raises(ConfigError, match=r"--tls-ca .*no such file"):
        server_context(TlsFiles(good.cert, good.key, str(ca / "missing.crt")))
    other = files(ca, "node-2")
    with pytest.raises(ConfigError, match="--tls-key"):
        server_context(TlsFiles(good.cert, other.key, good.ca))  # key of another certificate


def test_node_config_needs_all_three_files_and_its_own_certificate(ca: Path) -> None:
    from aether.core.config import NodeConfig
    from aether.core.types import PeerSpec
    from aether.transport.tls import tls_files

    peers = [PeerSpec("node-2", Address(HOST, 7001))]
    with pytest.raises(ConfigError, match="--tls-key, --tls-ca missing"):
        NodeConfig(node_id="node-2", peers=peers, tls_cert="x.crt").validate()
    assert tls_files(NodeConfig(node_id="node-2", peers=peers).validate()) is None
    mine, theirs = files(ca, "node-2"), files(ca, "node-3")
    cfg = NodeConfig(node_id="node-2", peers=peers, tls_cert=mine.cert, tls_key=mine.key, tls_ca=mine.ca)
    assert tls_files(cfg.validate()) == mine
    cfg = NodeConfig(node_id="node-2", peers=peers, tls_cert=theirs.cert, tls_key=theirs.key, tls_ca=mine.ca)
    with pytest.raises(ConfigError, match="issued to node 'node-3', but this is node 'node-2'"):
        tls_files(cfg.validate())


def test_cert_node_id_reads_the_san_or_cn() -> None:
    both = {"subjectAltName": (("DNS", "node-3"),), "subject": ((("commonName", "x"),),)}
    assert cert_node_id(both) == "node-3"
    assert cert_node_id({"subject": ((("commonName", "node-1"),),)}) == "node-1"
    assert cert_node_id({"subjectAltName": (("DNS", "a"), ("DNS", "b"))}) is None
    assert cert_node_id(None) is None and cert_node_id({}) is None


# ---------------------------------------------------------------------------------------------
# transports


class Nodes:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.tag = uuid.uuid4().hex[:8]
        self.t: dict[str, Transport] = {}
        self.inbox: dict[str, list[tuple[str, Any]]] = {}

    def log_name(self, node_id: str) -> str:
        return f"test.tls.{self.tag}.{node_id}"

    async def start(self, node_id: str, tls: TlsFiles | None, **kw: Any) -> Transport:
        self.inbox[node_id] = inbox = []
        t = Transport(
            node_id,
            {node_id: Address(HOST, 0)},
            listen=Address(HOST, 0),
            cluster_name=CLUSTER,
            message_type=PeerMsg,
            on_message=lambda sender, msg: inbox.append((sender, msg)),
            bus=EventBus(),
            logger=logging.getLogger(self.log_name(node_id)),
            tls=tls,
            **kw,
        )
        self.t[node_id] = t
        await t.start()
        return t

    def link(self) -> None:
        members = {i: Address(HOST, t.port) for i, t in self.t.items()}
        for t in self.t.values():
            t.set_members(members)

    def warnings(self, node_id: str) -> list[str]:
        return [
            r.getMessage()
            for r in self.caplog.records
            if r.name == self.log_name(node_id) and r.levelno >= logging.WARNING
        ]

    async def wait_warning(self, node_id: str, text: str) -> str:
        await wait_until(
            lambda: any(text in w for w in self.warnings(node_id)), what=f"{node_id} logs {text!r}"
        )
        return next(w for w in self.warnings(node_id) if text in w)


@contextlib.asynccontextmanager
async def nodes(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Nodes]:
    caplog.set_level(logging.INFO)
    n = Nodes(caplog)
    try:
        yield n
    finally:
        for t in n.t.values():
            await t.stop()


async def test_three_tls_nodes_link_up_and_exchange(ca: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with nodes(caplog) as n:
        for i in ("a", "b", "c"):
            await n.start(i, files(ca, i))
        n.link()
        await wait_until(
            lambda: all(t.up_peers == {"a", "b", "c"} - {i} for i, t in n.t.items()), what="all peers up"
        )
        assert all(t.has_quorum() for t in n.t.values())
        link = n.t["a"]._peers["b"].link
        assert link is not None and link.transport is not None
        ssl_object = link.transport.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.version() == "TLSv1.3"
        assert n.t["a"].send("b", Note(1, "over tls"))
        await wait_until(lambda: ("a", Note(1, "over tls")) in n.inbox["b"], what="delivery")
        assert not [w for i in n.t for w in n.warnings(i)]


async def test_tls_with_the_secret_on_top(ca: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = b"tls-and-a-cluster-secret"
    async with nodes(caplog) as n:
        await n.start("a", files(ca, "a"), secret=secret)
        await n.start("b", files(ca, "b"), secret=b"another-secret-16+-bytes")
        n.link()
        await n.wait_warning("a", "cluster secret")  # TLS passed, the secret did not
        assert n.t["a"].up_peers == set() and n.t["b"].up_peers == set()


async def test_a_node_with_a_certificate_from_another_ca_is_refused(
    tmp_path: Path, ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """"c" has the cluster's CA certificate (public) but its own from a CA it made itself."""
    other = tmp_path / "other-ca"
    init_ca(other)
    async with nodes(caplog) as n:
        await n.start("a", files(ca, "a"))
        await n.start("b", files(ca, "b"))
        await n.start("c", files(other, "c", ca_of=ca))
        n.link()
        await wait_until(lambda: n.t["a"].up_peers == {"b"} and n.t["b"].up_peers == {"a"}, what="a-b up")
        line = await n.wait_warning("a", "not signed by this cluster's CA")
        assert "aether cert issue" in line
        await n.wait_warning("a", "TLS handshake with peer 'c'")  # a's dial to c fails verification too
        await asyncio.sleep(0.5)
        assert "c" not in n.t["a"].up_peers and "c" not in n.t["b"].up_peers
        assert n.t["c"].up_peers == set()


async def test_a_certificate_for_another_node_cannot_claim_its_id(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """node "b" runs with the certificate issued to "c" (both signed by the cluster CA)."""
    async with nodes(caplog) as n:
        await n.start("a", files(ca, "a"))
        await n.start("b", files(ca, "b", cert_of="c"))
        n.link()
        line = await n.wait_warning("a", "claims node 'b' but its TLS certificate is for 'c'")
        assert "aether cert issue b" in line
        await n.wait_warning("a", "its TLS certificate is for node 'c', not 'b'")  # a dialing b
        await asyncio.sleep(0.5)
        assert n.t["a"].up_peers == set() and n.t["b"].up_peers == set()
        assert not any(s == "b" for s, _ in n.inbox["a"])


async def test_plaintext_to_a_tls_node_is_refused_with_a_clear_log_line(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with nodes(caplog) as n:
        a = await n.start("a", files(ca, "a"))
        await n.start("b", None)  # a node without TLS
        n.link()
        await n.wait_warning("a", "did not start a TLS handshake")
        # a raw plaintext hello gets no answer and is closed
        reader, writer = await asyncio.open_connection(HOST, a.port)
        try:
            writer.write(frame(PeerHello(CLUSTER, "b", b"n" * 16)))
            await writer.drain()
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
            except ConnectionResetError:
                pass  # closed without an answer, with unread bytes
        finally:
            writer.close()
        line = await n.wait_warning("a", "did not start a TLS handshake")
        assert "--tls-cert/--tls-key/--tls-ca" in line
        assert a.up_peers == set() and not n.inbox["a"]
        await wait_until(lambda: not a._inbound, what="refused connections released")


async def test_a_client_without_tls_learns_the_node_may_need_it(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS node closes a plaintext client without an answer; the client's error says that this
    is what a TLS node does and how to connect (it only said "closed the connection")."""
    async with nodes(caplog) as n:
        a = await n.start("a", files(ca, "a"))
        with pytest.raises(ConnectionError, match=r"closed the connection during the handshake \(a node that "
                           r"runs mutual TLS .* tls=TlsFiles\(cert, key, ca\)"):  # fmt: skip
            await open_client_connection(
                Address(HOST, a.port), cluster_name=CLUSTER, client_id="c", message_type=Resp,
                on_message=lambda m: None, on_close=lambda x: None,
            )  # fmt: skip
        line = await n.wait_warning("a", "did not start a TLS handshake")
        assert "(a client: AetherClient(tls=TlsFiles(cert, key, ca)))" in line, line


async def test_tls_without_a_client_certificate_is_refused(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with nodes(caplog) as n:
        a = await n.start("a", files(ca, "a"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(ca / "ca.crt"))  # trusts the CA, has no certificate
        reader, writer = await asyncio.open_connection(HOST, a.port, ssl=ctx)
        try:
            writer.write(frame(PeerHello(CLUSTER, "b", b"n" * 16)))
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
        line = await n.wait_warning("a", "TLS handshake refused")
        assert "presented no certificate from this cluster's CA" in line, line
        await wait_until(lambda: not a._inbound, what="the connection released")


async def test_an_expired_certificate_is_refused(ca: Path, caplog: pytest.LogCaptureFixture) -> None:
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    issue_node_cert(ca, "b", _not_valid_after=yesterday)
    async with nodes(caplog) as n:
        await n.start("a", files(ca, "a"))
        await n.start("b", files(ca, "b"))
        n.link()
        line = await n.wait_warning("a", "certificate has expired")
        assert "aether cert issue" in line
        await asyncio.sleep(0.5)
        assert n.t["a"].up_peers == set() and n.t["b"].up_peers == set()


async def test_tls_without_a_secret_may_listen_beyond_loopback(ca: Path) -> None:
    kw: dict[str, Any] = dict(
        listen=Address("0.0.0.0", 0), cluster_name=CLUSTER, message_type=PeerMsg, on_message=lambda s, m: None
    )
    with pytest.raises(ConfigError, match="use mutual TLS"):
        await Transport("a", {"a": Address(HOST, 0)}, **kw).start()
    t = Transport("a", {"a": Address(HOST, 0)}, tls=files(ca, "a"), **kw)
    try:
        await t.start()
        assert t.port > 0
    finally:
        await t.stop()
