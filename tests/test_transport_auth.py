"""Cluster-secret authentication on the cluster port (issue 12): the pure handshake, then the
attacks against a real Transport pair a <-> b (impostor peers, displacement, unauthenticated
clients, pre-auth limits). Real node processes: tests/test_security_cluster_port.py."""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from unittest.mock import ANY

import msgspec
import pytest

from aether.core.errors import ConfigError
from aether.core.types import Address
from aether.transport import (
    DUPLICATE_NODE,
    ClientHello,
    DuplicateNode,
    EventBus,
    HelloAck,
    PeerDown,
    PeerHello,
    Reject,
    Transport,
    encode_frame,
    open_client_connection,
)
from aether.transport.auth import (
    AcceptorHandshake,
    AuthFailed,
    Credentials,
    DialerHandshake,
    client_key_of,
    load_secret,
    write_secret_file,
)
from test_transport import Note, PeerMsg, Resp, wait_until
from test_transport_badinput import CLUSTER, SECRET, Raw, env, frame

pytestmark = pytest.mark.timeout(30)

OTHER = b"some-other-secret-of-16+-bytes"


# ---------------------------------------------------------------------------------------------
# the handshake, sans IO


def _run(dialer_creds: Credentials, acceptor_creds: Credentials, kind: Any = "peer") -> None:
    d = DialerHandshake(dialer_creds, kind, "node-2", expect="node-1" if kind == "peer" else None)
    a = AcceptorHandshake(acceptor_creds, "node-1")
    nonce_a, proof_a = a.challenge(kind, "node-2", d.nonce)
    a.verify(d.answer("node-1", nonce_a, proof_a))


def test_same_secret_authenticates_both_ways() -> None:
    creds = Credentials(CLUSTER, secret=SECRET)
    _run(creds, creds)
    _run(Credentials(CLUSTER, client_key=client_key_of(SECRET)), creds, "client")
    _run(Credentials(CLUSTER), Credentials(CLUSTER))  # both open


@pytest.mark.parametrize(
    ("dialer", "acceptor", "error"),
    [
        (Credentials(CLUSTER, secret=OTHER), Credentials(CLUSTER, secret=SECRET), "did not prove"),
        (Credentials(CLUSTER), Credentials(CLUSTER, secret=SECRET), "sent no valid nonce|presented no"),
        (Credentials(CLUSTER, secret=SECRET), Credentials(CLUSTER), "runs without a cluster secret"),
        (Credentials("other", secret=SECRET), Credentials(CLUSTER, secret=SECRET), "did not prove"),
    ],
)
def test_mismatched_credentials_fail(dialer: Credentials, acceptor: Credentials, error: str) -> None:
    with pytest.raises(AuthFailed, match=error):
        _run(dialer, acceptor)


@pytest.mark.parametrize("kind", ["peer", "client"])
def test_an_open_acceptor_is_refused_naming_the_variable_to_set(kind: str) -> None:
    # the hint kept its case ("aether_cluster_secret" was a lowercased AETHER_CLUSTER_SECRET)
    with pytest.raises(AuthFailed, match=r"Set the same cluster secret on every node "
                       r"\(--cluster-secret-file or AETHER_CLUSTER_SECRET\)"):  # fmt: skip
        _run(Credentials(CLUSTER, secret=SECRET), Credentials(CLUSTER), kind)


def test_client_key_does_not_authenticate_a_peer() -> None:
    client_only = Credentials(CLUSTER, client_key=client_key_of(SECRET))
    with pytest.raises(AuthFailed):
        _run(client_only, Credentials(CLUSTER, secret=SECRET), "peer")


def test_proofs_are_fresh_and_not_reflectable() -> None:
    creds = Credentials(CLUSTER, secret=SECRET)
    d = DialerHandshake(creds, "peer", "node-2", expect="node-1")
    a = AcceptorHandshake(creds, "node-1")
    nonce_a, proof_a = a.challenge("peer", "node-2", d.nonce)
    with pytest.raises(AuthFailed, match="presented a wrong"):
        a.verify(proof_a)  # the acceptor's own proof, reflected back
    proof_d = d.answer("node-1", nonce_a, proof_a)
    # replaying a recorded dialer proof on a new connection (new acceptor nonce) fails
    a2 = AcceptorHandshake(creds, "node-1")
    a2.challenge("peer", "node-2", d.nonce)
    with pytest.raises(AuthFailed):
        a2.verify(proof_d)
    # and a proof for node-2 does not authenticate node-3
    a3 = AcceptorHandshake(creds, "node-1", nonce=nonce_a)
    a3.challenge("peer", "node-3", d.nonce)
    with pytest.raises(AuthFailed):
        a3.verify(proof_d)
    assert SECRET not in proof_d and SECRET not in proof_a


def test_a_failed_secret_write_leaves_no_copy_of_the_secret(tmp_path: Any) -> None:
    import os
    import time

    path = tmp_path / "secret"
    path.mkdir()  # the rename fails: a directory is in the way
    with pytest.raises(OSError):
        write_secret_file(path, "0123456789abcdef0123")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary holding it
    path.rmdir()
    killed = tmp_path / ".secret.4242.tmp"  # a process killed between writing and renaming it
    killed.write_text("an old secret")
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    write_secret_file(path, "0123456789abcdef0123")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_load_secret(tmp_path: Any) -> None:
    path = tmp_path / "secret"
    write_secret_file(path, "0123456789abcdef0123")
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret(file=path) == b"0123456789abcdef0123"
    assert load_secret("x" * 20) == b"x" * 20
    assert load_secret() is None
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret("short")
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(file=tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# against a running Transport pair


async def test_impostor_peer_is_rejected_and_does_not_displace_the_genuine_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with env(caplog) as e:
        downs: list[PeerDown] = []
        e.a.bus.subscribe(PeerDown, downs.append)
        genuine = set(e.a._peers["b"].inbound)
        for secret in (None, OTHER):
            raw = await Raw.connect(e.a.port)
            try:
                reply = await raw.handshake(PeerHello(CLUSTER, "b"), secret)
                assert isinstance(reply, Reject)
                assert "presented" in reply.reason and "cluster secret" in reply.reason, reply.reason
                await raw.wait_closed_by_node()
            finally:
                raw.close()
        # an impostor that sends the hello and then app messages without proving anything
        raw = await Raw.connect(e.a.port)
        try:
            await raw.send(frame(PeerHello(CLUSTER, "b", b"n" * 16)) + frame(Note(99, "forged")))
            await raw.wait_closed_by_node()
        finally:
            raw.close()
        assert ("b", Note(99, "forged")) not in e.inbox["a"]
        assert e.a._peers["b"].inbound == genuine  # the genuine link was never replaced
        assert downs == [] and e.a.up_peers == {"b"}
        await e.assert_still_working(1)


async def test_loop_of_impostors_keeps_the_peer_up(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        downs: list[PeerDown] = []
        e.a.bus.subscribe(PeerDown, downs.append)
        for _ in range(30):
            raw = await Raw.connect(e.a.port)
            try:
                assert isinstance(await raw.handshake(PeerHello(CLUSTER, "b"), None), Reject)
            finally:
                raw.close()
        assert downs == [] and e.a.has_quorum()
        # one warning for the 30 identical rejections
        assert len([r for r in e.warnings() if "presented no cluster secret" in r.getMessage()]) == 1
        await e.assert_still_working(1)


async def test_authenticated_reconnect_replaces_the_old_link(caplog: pytest.LogCaptureFixture) -> None:
    """Same id, proving the secret: that is the node restarted, so the new connection wins."""
    async with env(caplog) as e:
        old = set(e.a._peers["b"].inbound)
        raw = await Raw.connect(e.a.port)
        try:
            assert await raw.handshake(PeerHello(CLUSTER, "b")) == HelloAck("a", ANY)
            await wait_until(lambda: all(p.closing for p in old), what="old inbound closed")
            await raw.send(frame(Note(7, "from the restarted b")))
            await wait_until(lambda: ("b", Note(7, "from the restarted b")) in e.inbox["a"], what="delivery")
        finally:
            raw.close()


async def test_a_second_process_with_a_peers_id_is_refused_while_the_peer_answers_at_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by an audit with real processes (tests/test_duplicate_node_process.py): a second process
    started with b's id (and the secret) at another port was taken for b restarted: it displaced
    b's connection, b dialed again and displaced it, and so on. a's link to b's member address is
    answered by b's process (its HelloAck's instance), so a hello from another instance claiming b
    is refused, saying so (`DUPLICATE_NODE`); b's own instance and a hello without one (a node of
    an earlier version) are still taken as b reconnecting."""
    async with env(caplog) as e:
        downs: list[PeerDown] = []
        e.a.bus.subscribe(PeerDown, downs.append)
        genuine = set(e.a._peers["b"].inbound)
        assert e.a._peers["b"].link.instance == e.b.instance  # type: ignore[union-attr]
        raw = await Raw.connect(e.a.port)
        try:
            hello = PeerHello(CLUSTER, "b", instance=b"another!", listen="127.0.0.1:7999")
            reply = await raw.handshake(hello)
            assert isinstance(reply, Reject) and reply.code == DUPLICATE_NODE, reply
            assert reply.reason.startswith(
                f"node b is already running in the cluster, at 127.0.0.1:{e.b.port} (node a reaches it "
                "there); this process (listening on 127.0.0.1:7999) is a second one with its id"
            ), reply.reason
            await raw.wait_closed_by_node()
        finally:
            raw.close()
        assert e.a._peers["b"].inbound == genuine and downs == []
        [warning] = [r.getMessage() for r in e.warnings() if "second process" in r.getMessage()]
        assert (f"a second process with the id of b (listening on 127.0.0.1:7999): 'b' answers at its "
                f"member address 127.0.0.1:{e.b.port} as another process; rejected") in warning
        await e.assert_still_working(1)
        for same in (e.b.instance, b""):  # b itself reconnecting; a node of an earlier version
            raw = await Raw.connect(e.a.port)
            try:
                assert await raw.handshake(PeerHello(CLUSTER, "b", instance=same)) == HelloAck("a", ANY)
            finally:
                raw.close()


async def test_the_peer_at_its_address_wins_over_a_second_process_that_came_first() -> None:
    """b is down; a second process with b's id dials a and is accepted (nothing answers at b's
    address to contradict it). b starts at its address: a's link to it is answered by b, so a
    closes the second process's connection and refuses its next hellos; the second process is told
    why and publishes `DuplicateNode` (its node then exits 2). b restarted later is taken at once."""
    kw: dict[str, Any] = dict(
        listen=Address("127.0.0.1", 0), cluster_name=CLUSTER, message_type=PeerMsg, secret=SECRET
    )
    inbox: list[tuple[str, Any]] = []
    a = Transport("a", {"a": Address("127.0.0.1", 0)}, on_message=lambda s, m: inbox.append((s, m)), **kw)
    second = Transport(
        "b", {"b": Address("127.0.0.1", 0)}, on_message=lambda s, m: None, bus=EventBus(), **kw
    )
    dups: list[DuplicateNode] = []
    second.bus.subscribe(DuplicateNode, dups.append)
    ghost = socket.socket()  # b's member address, reserved while b is down
    ghost.bind(("127.0.0.1", 0))
    b_addr = Address("127.0.0.1", ghost.getsockname()[1])
    started: list[Transport] = []
    try:
        for t in (a, second):
            await t.start()
            started.append(t)
        a.set_members({"a": Address("127.0.0.1", a.port), "b": b_addr})
        second.set_members({"a": Address("127.0.0.1", a.port), "b": Address("127.0.0.1", second.port)})
        await wait_until(lambda: second.up_peers == {"a"}, what="the second process linked to a")
        assert second.send("a", Note(1, "from the second process"))
        await wait_until(lambda: ("b", Note(1, "from the second process")) in inbox, what="delivery")

        ghost.close()

        async def start_b() -> tuple[Transport, list[DuplicateNode]]:
            """b's process at its member address, and the `DuplicateNode` events it publishes."""
            t = Transport("b", {"b": b_addr}, on_message=lambda s, m: None, bus=EventBus(),
                          **{**kw, "listen": b_addr})
            told: list[DuplicateNode] = []
            t.bus.subscribe(DuplicateNode, told.append)
            await t.start()
            started.append(t)
            t.set_members({"a": Address("127.0.0.1", a.port), "b": b_addr})
            return t, told

        b, b_dups = await start_b()
        await wait_until(lambda: len(dups) == 1, timeout=10, what="the second process told it is one")
        assert dups[0].refused_by == "a"
        assert f"node b is already running in the cluster, at {b_addr}" in dups[0].reason
        assert a.up_peers == {"b"} and b.up_peers == {"a"} and b_dups == []
        assert {p.claimed_instance for p in a._peers["b"].inbound} == {b.instance}

        # b restarted at its address (a new process): accepted, never taken for a second one
        await b.stop()
        b2, b2_dups = await start_b()
        await wait_until(lambda: a.up_peers == {"b"} and b2.up_peers == {"a"}, what="b restarted, up")
        assert a._peers["b"].link.instance == b2.instance  # type: ignore[union-attr]
        await asyncio.sleep(2 * 0.6 + 0.3)  # longer than the grace before DuplicateNode
        assert b2_dups == [] and b2.up_peers == {"a"}
    finally:
        for t in started:
            await t.stop()
        ghost.close()


async def test_node_does_not_send_to_an_acceptor_that_cannot_prove_the_secret() -> None:
    """An impostor listening on a member's address (wrong secret) never becomes an up peer."""
    kw: dict[str, Any] = dict(
        listen=Address("127.0.0.1", 0),
        cluster_name=CLUSTER,
        message_type=PeerMsg,
        on_message=lambda s, m: None,
    )
    a = Transport("a", {"a": Address("127.0.0.1", 0)}, secret=SECRET, **kw)
    fake_b = Transport("b", {"b": Address("127.0.0.1", 0)}, secret=OTHER, **kw)
    try:
        await a.start()
        await fake_b.start()
        a.set_members({"a": Address("127.0.0.1", a.port), "b": Address("127.0.0.1", fake_b.port)})
        fake_b.set_members({"a": Address("127.0.0.1", a.port), "b": Address("127.0.0.1", fake_b.port)})
        await asyncio.sleep(1.0)
        assert a.up_peers == frozenset() and fake_b.up_peers == frozenset()
        assert not a.send("b", Note(1))
    finally:
        await a.stop()
        await fake_b.stop()


async def _fake_acceptor(replies: list[Any]) -> asyncio.Server:
    """A listener that answers any hello with `replies` (skipping the real handshake), then waits."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)  # the hello
        writer.write(b"".join(frame(r) for r in replies))
        await writer.drain()
        await reader.read(4096)
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("kind", ["peer", "client"])
async def test_dialer_refuses_an_ack_without_a_challenge(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """An acceptor that skips the Challenge (so never proves the secret) and acks at once is refused
    by both dialers: a node's peer link and a client (the shared `_dialer_handshake`)."""
    server = await _fake_acceptor([HelloAck("b")])
    port = server.sockets[0].getsockname()[1]
    try:
        if kind == "client":
            with pytest.raises(ConnectionError, match="expected Challenge, got HelloAck"):
                await open_client_connection(
                    Address("127.0.0.1", port), cluster_name=CLUSTER, client_id="c", message_type=Resp,
                    on_message=lambda m: None, on_close=lambda x: None, secret=SECRET,
                )  # fmt: skip
            return
        a = Transport(
            "a", {"a": Address("127.0.0.1", 0)}, listen=Address("127.0.0.1", 0), cluster_name=CLUSTER,
            message_type=PeerMsg, on_message=lambda s, m: None, secret=SECRET,
        )  # fmt: skip
        try:
            await a.start()
            a.set_members({"a": Address("127.0.0.1", a.port), "b": Address("127.0.0.1", port)})
            await wait_until(
                lambda: any("expected Challenge, got HelloAck" in r.getMessage() for r in caplog.records),
                what="the dialer refusing the early ack",
            )
            assert a.up_peers == frozenset() and not a.send("b", Note(1))
        finally:
            await a.stop()
    finally:
        server.close()
        await server.wait_closed()


async def test_clients_must_prove_the_client_key(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        kw: dict[str, Any] = dict(
            cluster_name=CLUSTER, client_id="c", message_type=Resp, on_message=lambda m: None,
            on_close=lambda x: None,
        )  # fmt: skip
        address = Address("127.0.0.1", e.a.port)
        with pytest.raises(ConnectionError, match="presented no cluster secret"):
            await open_client_connection(address, **kw)
        with pytest.raises(ConnectionError, match=r"did not prove|wrong cluster secret"):
            await open_client_connection(address, secret=OTHER, **kw)
        for cred in ({"secret": SECRET}, {"client_key": client_key_of(SECRET)}):
            link = await open_client_connection(address, **cred, **kw)
            link.close()
            await link.wait_closed()
        # the client key is not the cluster secret: it cannot open a peer link
        raw = await Raw.connect(e.a.port)
        try:
            assert isinstance(await raw.handshake(PeerHello(CLUSTER, "b"), client_key_of(SECRET)), Reject)
        finally:
            raw.close()


async def test_pre_auth_frames_are_limited_to_4_kib(caplog: pytest.LogCaptureFixture) -> None:
    async with env(caplog) as e:
        for hello in (PeerHello(CLUSTER, "b", b"x" * 5000), ClientHello(CLUSTER, "c", b"x" * 5000)):
            raw = await Raw.connect(e.a.port)
            try:
                await raw.send(frame(hello))  # a 5 KB hello: its header alone closes the connection
                await raw.wait_closed_by_node()
            finally:
                raw.close()
        assert len([r for r in e.warnings() if "more than the limit of 4096" in r.getMessage()]) == 2
        # after authentication the normal limit applies (a 100 KB frame is delivered)
        raw = await Raw.connect(e.a.port)
        try:
            assert await raw.handshake(PeerHello(CLUSTER, "ghost")) == HelloAck("a", ANY)
            await raw.send(frame(Note(1, "y" * 100_000)))
            await wait_until(lambda: ("ghost", Note(1, "y" * 100_000)) in e.inbox["a"], what="big frame")
        finally:
            raw.close()


async def test_handshake_deadline_closes_a_connection_that_never_proves() -> None:
    t = Transport(
        "a", {"a": Address("127.0.0.1", 0)}, listen=Address("127.0.0.1", 0), cluster_name=CLUSTER,
        message_type=PeerMsg, on_message=lambda s, m: None, secret=SECRET, handshake_timeout=0.5,
    )  # fmt: skip
    try:
        await t.start()
        t.set_members({"a": Address("127.0.0.1", t.port), "b": Address("127.0.0.1", 1)})
        silent = await Raw.connect(t.port)
        stalled = await Raw.connect(t.port)
        try:
            await stalled.send(frame(PeerHello(CLUSTER, "b", b"n" * 16)))  # hello, then no proof
            loop = asyncio.get_running_loop()
            started = loop.time()
            await silent.wait_closed_by_node(timeout=3)
            await stalled.wait_closed_by_node(timeout=3)
            assert loop.time() - started < 2.0
            assert not t._inbound
        finally:
            silent.close()
            stalled.close()
    finally:
        await t.stop()


async def test_connection_caps_per_host_and_total() -> None:
    t = Transport(
        "a", {"a": Address("127.0.0.1", 0)}, listen=Address("127.0.0.1", 0), cluster_name=CLUSTER,
        message_type=PeerMsg, on_message=lambda s, m: None, secret=SECRET,
        max_connections_per_host=3, max_connections=5,
    )  # fmt: skip
    try:
        await t.start()
        raws = [await Raw.connect(t.port) for _ in range(3)]
        await wait_until(lambda: len(t._inbound) == 3, what="3 connections")
        extra = await Raw.connect(t.port)
        await extra.wait_closed_by_node(timeout=3)  # the 4th from 127.0.0.1 is refused at once
        extra.close()
        assert len(t._inbound) == 3
        raws[0].close()
        await wait_until(lambda: len(t._inbound) == 2, what="one closed")
        again = await Raw.connect(t.port)  # a slot is free again
        assert await again.is_open()
        assert t._per_host == {"127.0.0.1": 3}
        for r in [*raws, again]:
            r.close()
        await wait_until(lambda: not t._inbound and not t._per_host, what="all closed")
    finally:
        await t.stop()


async def test_open_transport_refuses_to_listen_beyond_loopback() -> None:
    t = Transport(
        "a", {"a": Address("0.0.0.0", 0)}, listen=Address("0.0.0.0", 0), cluster_name=CLUSTER,
        message_type=PeerMsg, on_message=lambda s, m: None, bus=EventBus(),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="beyond loopback, without a cluster secret"):
        await t.start()
    await t.stop()


async def test_hello_without_nonce_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A two-field hello (an older or open dialer) decodes, and is refused for lacking a nonce."""
    async with env(caplog) as e:
        raw = await Raw.connect(e.a.port)
        try:
            await raw.send(encode_frame(msgspec.msgpack.encode([1, CLUSTER, "b"])))
            reply = await raw.read_reply()
            assert isinstance(reply, Reject) and "no valid nonce" in reply.reason, reply
        finally:
            raw.close()
        await e.assert_still_working(1)


def test_node_config_repr_hides_the_secret() -> None:
    from aether.core.config import NodeConfig
    from aether.core.types import PeerSpec

    peers = [PeerSpec("n1", Address("127.0.0.1", 7000))]
    c = NodeConfig(node_id="n1", peers=peers, cluster_secret="s3cr3t-value-long-enough")
    assert "s3cr3t" not in repr(c) and "cluster_secret='***'" in repr(c)
    with pytest.raises(ConfigError, match="use only one"):
        NodeConfig(
            node_id="n1", peers=[PeerSpec("n1", Address("127.0.0.1", 7000))],
            cluster_secret="x" * 20, cluster_secret_file="/f",
        ).validate()  # fmt: skip


async def test_a_refused_aether_client_is_told_what_fits_its_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """`AetherClient` refused by every node: the hint fits why. It always said "give the cluster's
    secret", also to a client that had one while the node runs open, or had another secret."""
    from aether.client import AetherClient
    from aether.core.errors import Unauthorized
    from test_transport import Req

    monkeypatch.delenv("AETHER_CLUSTER_SECRET", raising=False)
    monkeypatch.delenv("AETHER_CLUSTER_SECRET_FILE", raising=False)
    nodes = {
        name: Transport(
            name, {name: Address("127.0.0.1", 0)}, listen=Address("127.0.0.1", 0), cluster_name=CLUSTER,
            message_type=PeerMsg, on_message=lambda s, m: None, bus=EventBus(), secret=secret,
            client_message_type=Req, on_client_message=lambda s, m: None,
        )
        for name, secret in (("open", None), ("secured", SECRET))
    }

    async def refusal(node: str, **creds: Any) -> str:
        client = AetherClient([f"127.0.0.1:{nodes[node].port}"], cluster_name=CLUSTER, timeout=3.0, **creds)
        try:
            with pytest.raises(Unauthorized) as e:
                await client.put("user/x", b"1")
        finally:
            await client.close()
        return str(e.value)

    for t in nodes.values():
        await t.start()
    try:
        text = await refusal("open", secret=SECRET)
        assert "this client has a cluster secret (secret=...) but the nodes run open" in text, text
        assert "give the cluster's secret" not in text
        text = await refusal("secured", secret=OTHER)
        assert "the nodes run with a cluster secret other than this client's (secret=...)" in text, text
        assert "give the cluster's secret" not in text
        text = await refusal("secured", client_key=client_key_of(OTHER))
        assert "other than this client's (client_key=...)" in text, text
        monkeypatch.setenv("AETHER_CLUSTER_SECRET", OTHER.decode())
        text = await refusal("secured")
        assert "other than this client's (AETHER_CLUSTER_SECRET)" in text, text
        monkeypatch.delenv("AETHER_CLUSTER_SECRET")
        text = await refusal("secured")  # no secret at all: the hint it always gave
        assert "presented no cluster secret" in text, text
        assert "; give the cluster's secret (secret=..." in text, text
    finally:
        for t in nodes.values():
            await t.stop()
