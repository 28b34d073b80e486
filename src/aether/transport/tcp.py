"""Node-to-node TCP transport and server-side client sessions (asyncio, optionally mutual TLS).

Authentication
--------------
Every connection on the cluster port starts with the handshake of `aether.transport.auth`
(hello, challenge, proof, ack): with a cluster secret, only a dialer that proves it becomes a peer
(or, proving the client key, a client session), and a node only sends on an outbound link whose
acceptor proved it too. Until then a connection may send frames of at most ``pre_auth_max_frame``
bytes (default `PRE_AUTH_MAX_FRAME`) and must finish within the handshake deadline, and the number
of inbound connections is capped per remote host and in total. After it, the bytes all connections
hold in unfinished frames share one budget, ``max_buffered_bytes`` (`_link.BufferBudget`): a
client or an unauthenticated connection whose frame does not fit is closed; a peer's makes room by
closing clients, or else waits with its reads paused until room frees. Without a secret or TLS
the transport runs open, which `start()` allows only on a loopback address.

With ``tls`` (`aether.transport.tls.TlsFiles`) every connection on the cluster port is TLS 1.3
with a certificate required and verified against the cluster CA on both sides. The acceptor
runs TLS itself over memory BIOs (`_ServerTls`) so that a failed handshake (plaintext, wrong CA,
expired) is logged with its cause; the node id in the peer's certificate
must equal the id its ``PeerHello`` claims, and the dialer checks that the acceptor's certificate
names the node it meant to dial. The secret handshake, when a secret is set, runs on top.

A second process with a member's id (it proves the secret: a copied command line with other
ports) is told from the member restarted by the process answering at the member's address: every
Transport draws a random ``instance`` at construction and sends it in its ``PeerHello`` and
``HelloAck``. While our link to a peer's member address is established, a hello claiming the peer's
id from another instance is refused with ``Reject.code`` ``DUPLICATE_NODE``, and connections from
another instance accepted before (while nothing answered there) are closed when that link comes
up. A Transport refused so for longer than ``2 * heartbeat_timeout``, with none of its links
established meanwhile, publishes `DuplicateNode` (the node stops, exit status 2).

Link model
----------
Every node dials every other member. The connection a node dials (its *outbound link*) is the only
one it SENDS peer messages on; it opens with ``PeerHello`` and becomes usable when ``HelloAck``
arrives. Connections other nodes dial to us (*inbound*) are only RECEIVED from (plus the ack).
So between two nodes there are two TCP connections, one per direction.

A peer is UP when our outbound link to it is established and something arrived from it (any frame
on either connection, or the ack) within ``heartbeat_timeout``. It goes DOWN immediately when the
outbound link closes or errors, or when nothing was heard for ``heartbeat_timeout`` (checked every
``heartbeat_interval``); the outbound link is then closed and redialed with jittered exponential
backoff between ``reconnect_min`` and ``reconnect_max``. Each outbound link carries a ``Ping``
every ``heartbeat_interval`` in which nothing else was written.

Since a node sends only on its own outbound link, a peer that dials us (and so sees us UP on our
ack) hears from us only once our dial to it is established. So when a peer proves itself on an
inbound connection while our dial to it sleeps in its backoff (grown while the peer was away, up
to ``reconnect_max``), the sleep is cut short and we dial at once; otherwise a node restarted
at once (kill -9, start) would hear nothing for up to ``reconnect_max`` and time us out after
``heartbeat_timeout``, losing quorum for a moment. Likewise when our dial is still connecting
(SYN retries towards a machine that was down) or waiting for its ``HelloAck`` (a half-open
connection), which could last up to the handshake timeout: once that dial is
``heartbeat_timeout / 4`` old it is given up and made again at once. The proof also makes the
next dial after a failed one start without backoff. Each proof buys at most one such prompt dial
and failures still grow the backoff, so a peer that reaches us while we cannot reach it makes us
dial at most once per proof (i.e. per its own reconnect). Nothing changes on the wire. Every change publishes
`PeerUp` / `PeerDown`, and `QuorumChanged` whenever `has_quorum()` flips, on the event bus.

Delivery guarantees (what a consensus layer may rely on)
--------------------------------------------------------
- Messages sent to one peer over one link are delivered in the order of the ``send`` calls.
- At most once: ``send`` returns False and drops the message if the link is not up; frames queued
  on a link that then drops are lost. Nothing is retransmitted or buffered across reconnects.
- A message whose frame would exceed ``max_frame`` is never written (the peer would close the link
  on it, losing what is queued with it): ``send`` returns False, ``broadcast`` sends it to nobody,
  and it is logged as an error naming the limit.
- Messages from a peer are delivered as they arrive on its inbound connection, even while we
  consider it down (e.g. our dial to it failed); after a reconnect the new inbound connection
  replaces the old one, so there is no reordering within one connection but no ordering across
  a reconnect either.
- ``on_message`` / ``on_client_message`` run synchronously in the event loop; they must not
  block. An exception they raise is logged with its traceback and the link stays open.
- ``send(node_id_of_self, ...)`` returns False: local delivery is the caller's business.

Link faults
-----------
``set_link_fault(peer, fault)`` makes this node delay, drop or block every frame it sends to `peer`
(app messages, pings, and the frames of the handshakes on both connections), as the network would
(`aether.transport.faults`): a blocked link makes the peer see this node down, and then this node
see the peer down, like a partition. ``link_faults()`` lists them, ``clear_faults()`` heals every
link. A peer removed from the members loses its fault. With no fault set, sending costs one
attribute test more.

Membership / ports
------------------
``members`` maps node id -> cluster address and normally includes this node (never dialed).
Listening on port 0 is supported: start every Transport with the members known so far (e.g. only
itself), read ``.port`` after ``start()``, then call ``set_members`` with the full map on each of
them without awaiting in between (so no node dials a peer that does not know it yet).

A Transport is single use: ``start()`` once, ``stop()`` any number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import msgspec

from aether.core.errors import ConfigError
from aether.core.types import Address, check_node_id
from aether.transport._link import (
    DEFAULT_MAX_WRITE_BUFFER,
    BufferBudget,
    FramedEndpoint,
    HeardFrom,
    LinkProtocol,
)
from aether.transport.auth import (
    AcceptorHandshake,
    AuthFailed,
    Credentials,
    DialerHandshake,
    Kind,
    is_loopback_host,
)
from aether.transport.bus import EventBus
from aether.transport.events import DuplicateNode, PeerDown, PeerUp, QuorumChanged
from aether.transport.faults import LinkFault
from aether.transport.framing import DEFAULT_MAX_FRAME, HEADER_SIZE
from aether.transport.messages import (
    CONTROL_TYPES,
    DUPLICATE_NODE,
    Challenge,
    ClientHello,
    HelloAck,
    PeerHello,
    Ping,
    Proof,
    Reject,
    WireCodec,
    message_types,
)
from aether.transport.tls import TlsFiles, cert_node_id, dialer_context, server_context, tls_problem

__all__ = [
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_HOST",
    "PRE_AUTH_MAX_FRAME",
    "ClientSession",
    "Transport",
    "open_cluster_port_problem",
]

PRE_AUTH_MAX_FRAME = 4096
"""Largest frame accepted on a connection before its handshake completed (default)."""
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
"""Bytes a node holds at most in unfinished inbound frames, over all its connections (default)."""
DEFAULT_MAX_CONNECTIONS = 1024
"""Inbound connections (peers, clients and handshakes together) a node keeps open at most."""
DEFAULT_MAX_CONNECTIONS_PER_HOST = 256
"""Inbound connections from one remote host a node keeps open at most."""

_CONTROL = frozenset(CONTROL_TYPES)
_REJECT_LOG_INTERVAL = 60.0  # repeated identical hello rejections are logged at DEBUG within this window


def _same(proto: _OutboundProtocol) -> _OutboundProtocol:
    return proto


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ClientSession(FramedEndpoint):
    """Server side of one client connection on the cluster port.

    ``send`` queues a reply (coalesced like peer traffic); returns False once the session is closed.
    """

    __slots__ = ("_frame", "_proto", "client_id")

    def __init__(self, proto: _InboundProtocol, client_id: str, frame: Callable[[object], bytes]) -> None:
        self._proto = proto
        self._frame = frame
        self.client_id = client_id

    @property
    def remote_address(self) -> str:
        """``host:port`` of the client."""
        return self._proto.remote

    def close(self) -> None:
        """Flush queued replies and close the connection."""
        self._proto.close("closed by the server")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ClientSession {self.client_id!r} from {self.remote_address} {state}>"


class _Peer(HeardFrom):
    """Per-member bookkeeping."""

    __slots__ = (
        "active", "address", "attempts", "connecting", "inbound", "link", "logged", "node_id",
        "proven", "task", "up", "wake",
    )  # fmt: skip

    def __init__(self, node_id: str, address: Address) -> None:
        super().__init__()
        self.node_id = node_id
        self.address = address
        self.active = True
        self.up = False
        self.link: _OutboundProtocol | None = None  # the current outbound link (dialing or established)
        self.inbound: set[_InboundProtocol] = set()
        self.task: asyncio.Task[None] | None = None
        self.attempts = 0
        self.logged: set[str] = set()  # dial problems already logged since the last time it was up
        self.wake: asyncio.Future[None] | None = None  # while the dial loop sleeps its backoff: ends it
        self.connecting: asyncio.Timeout | None = None  # while `link` connects: the connect deadline
        self.proven = False  # it proved itself inbound since our current dial began: no backoff after it


class _OutboundProtocol(LinkProtocol):
    """A link we dialed to a peer: we send on it."""

    def __init__(self, owner: Transport, peer: _Peer) -> None:
        loop = owner._require_loop()
        super().__init__(
            loop=loop,
            log=owner._log,
            prefix=owner._prefix,
            codec=owner._codec,
            decode=owner._codec.decode,
            max_frame=min(owner._pre_auth_max_frame, owner._max_frame),  # raised once the peer proved itself
            max_write_buffer=owner._max_write_buffer,
            budget=owner._budget,
        )
        self._owner = owner
        self.peer = peer
        self.established_at = 0.0
        self.started_at = loop.time()
        self.cut_short = False  # given up by `Transport._cut_dial`: the peer dialed us meanwhile
        self.instance = b""  # the acceptor's `Transport.instance`, from its HelloAck
        self._timer: asyncio.TimerHandle | None = None
        self._auth = DialerHandshake(owner._creds, "peer", owner.node_id, expect=peer.node_id)
        fault = owner._faults.get(peer.node_id)
        if fault is not None:
            self.set_fault(fault, owner._fault_rng)

    def describe(self) -> str:
        return f"peer {self.peer.node_id!r} at {self.remote}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._owner._stopped or self.peer.link is not self:
            self.abort("stale dial")
            return
        owner = self._owner
        if owner._dial_ssl is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            named = cert_node_id(ssl_object.getpeercert() if ssl_object is not None else None)
            if named != self.peer.node_id:
                self._handshake_failed(
                    f"its TLS certificate is for node {named!r}, not {self.peer.node_id!r}: the address "
                    f"of {self.peer.node_id!r} in the member list is wrong, or the node there uses another "
                    f"node's certificate (issue its own with `aether cert issue {self.peer.node_id}`)"
                )
                return
        hello = PeerHello(
            owner.cluster_name, owner.node_id, self._auth.nonce, owner.instance, owner.listen_address
        )
        self.write_now(owner._codec.frame(hello))
        self._timer = self._loop.call_later(owner._handshake_timeout, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if not self.established and not self.closing:
            self._owner._dial_problem(
                self.peer,
                "handshake",
                logging.WARNING,
                f"{self.describe()}: no HelloAck within {self._owner._handshake_timeout}s",
            )
            self.abort("handshake timeout")

    def _handle(self, msg: Any) -> None:
        cls = type(msg)
        if not self.established:
            end = self._dialer_handshake(self._auth, msg)
            if type(end) is HelloAck:
                if end.node_id != self.peer.node_id:
                    self._handshake_failed(
                        f"HelloAck names node {end.node_id!r}, expected {self.peer.node_id!r}"
                    )
                    return
                if self._timer is not None:
                    self._timer.cancel()
                self.established = True
                self.instance = end.instance
                self._frames.max_frame = self._owner._max_frame
                self.established_at = self._loop.time()
                self.heard = self.peer
                self._owner._outbound_established(self)
            elif type(end) is Reject:
                self._owner._dial_problem(
                    self.peer,
                    "rejected",
                    logging.WARNING,
                    f"{self.describe()} rejected our hello: {end.reason}",
                )
                self.close("rejected by the peer")
                if end.code == DUPLICATE_NODE:
                    self._owner._refused_as_duplicate(self.peer, end.reason)
            return
        if cls is Ping:
            return
        if cls in _CONTROL:
            self._bad_frame(f"unexpected {cls.__name__} on an established link")
            return
        self._owner._deliver(self.peer.node_id, msg)

    def _handshake_failed(self, problem: str) -> None:
        self._owner._dial_problem(self.peer, "handshake", logging.WARNING, f"{self.describe()}: {problem}")
        self.abort("handshake failed")

    def may_wait_for_budget(self) -> bool:
        return self.established

    def _on_closed(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._owner._outbound_closed(self)


class _ServerTls:
    """Server-side TLS of one accepted connection over memory BIOs, standing in for the asyncio
    transport it wraps (what `LinkProtocol` uses of one: write, close, abort, buffer size, extra
    info). Done here rather than with ``loop.start_tls`` so that no byte can reach the frame
    decoder unencrypted whatever the event loop (uvloop starts reading right after
    ``connection_made``) and every handshake failure can be logged with its cause."""

    __slots__ = ("_in", "_out", "raw", "sslobj")

    def __init__(self, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self._in, self._out, server_side=True)

    def flush(self) -> None:
        out = self._out.read()
        if out and not self.raw.is_closing():
            self.raw.write(out)

    def handshake(self, data: bytes) -> bool:
        """Feed `data`; True once the handshake completed (raises ssl.SSLError if it failed)."""
        self._in.write(data)
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return False
        self.flush()
        return True

    def decrypt(self, data: bytes) -> bytes:
        if data:
            self._in.write(data)
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(262144)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        self.flush()  # e.g. session tickets or key updates
        return b"".join(chunks)

    # -- the asyncio.Transport subset LinkProtocol uses --
    def write(self, data: bytes) -> None:
        self.sslobj.write(data)
        self.flush()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        return self.raw.get_extra_info(name, default)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # e.g. the handshake never completed
            self.sslobj.unwrap()  # close_notify
        with contextlib.suppress(Exception):
            self.flush()
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


class _InboundProtocol(LinkProtocol):
    """A connection accepted on the cluster port: a peer (we receive on it) or a client session."""

    def __init__(self, owner: Transport) -> None:
        super().__init__(
            loop=owner._require_loop(),
            log=owner._log,
            prefix=owner._prefix,
            codec=owner._codec,
            decode=owner._hello_decoder.decode,
            max_frame=min(owner._pre_auth_max_frame, owner._max_frame),
            max_write_buffer=owner._max_write_buffer,
            budget=owner._budget,
        )
        self._owner = owner
        self.peer: _Peer | None = None
        self.session: ClientSession | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.host = "?"
        self.counted = False  # counted in the owner's per-host connection numbers
        self.auth: AcceptorHandshake | None = None  # set once a hello was answered with a Challenge
        self.client_id = ""
        self.claimed_peer: str | None = None  # the node id a peer hello claimed (once challenged)
        self.claimed_instance = b""  # the `PeerHello.instance` and `.listen` it sent
        self.claimed_listen = ""
        self.tls_pending = False  # the TLS handshake is running
        self.cert_id: str | None = None  # with TLS: the node id named by the verified certificate
        self._tls: _ServerTls | None = None

    def describe(self) -> str:
        if self.peer is not None:
            return f"peer {self.peer.node_id!r} at {self.remote}"
        if self.session is not None:
            return f"client {self.session.client_id!r} at {self.remote}"
        if self.auth is not None:
            return f"connection from {self.remote} claiming {self.auth.kind} {self.auth.dialer_id!r}"
        return f"connection from {self.remote}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._owner._stopped:
            self.abort("transport stopped")
            return
        self.host = self.remote.rpartition(":")[0]
        if not self._owner._admit_connection(self):
            return
        self._timer = self._loop.call_later(self._owner._handshake_timeout, self._hello_expired)
        ctx = self._owner._server_ssl
        if ctx is not None:
            assert self.transport is not None
            self._tls = _ServerTls(self.transport, ctx)
            self.transport = self._tls  # type: ignore[assignment]  # frames written are encrypted
            self.tls_pending = True

    def data_received(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            super().data_received(data)
            return
        if self.closing:
            return
        try:
            if self.tls_pending:
                if not tls.handshake(data):
                    return  # needs more bytes
                data = b""
                self.tls_pending = False
                self.cert_id = cert_node_id(tls.sslobj.getpeercert())
            plain = tls.decrypt(data)
        except ssl.SSLZeroReturnError:  # close_notify
            self.close("closed by the remote side (TLS close_notify)")
            return
        except (ssl.SSLError, OSError) as exc:
            problem = tls_problem(exc)
            what = "TLS handshake refused" if self.tls_pending else "TLS error"
            self._owner._log_limited(
                f"tls|{self.host}|{problem}", f"{self.describe()}: {what}: {problem}; closing the connection"
            )
            tls.flush()  # the alert, so the other side learns why
            self.close(f"{what}: {problem}")
            return
        if plain:
            super().data_received(plain)

    def _hello_expired(self) -> None:
        if not self.established and not self.closing:
            what = "no hello" if self.auth is None else "no proof of the cluster secret"
            if self.tls_pending:
                what = "no completed TLS handshake"
            self._warn(f"{what} within the handshake deadline of {self._owner._handshake_timeout}s; closing")
            self.abort("handshake deadline")

    def challenged(self, auth: AcceptorHandshake) -> None:
        """The hello was answered with a Challenge: only a Proof may follow."""
        self.auth = auth
        self._decode = self._owner._proof_decoder.decode

    def become_peer(self, peer: _Peer) -> None:
        self._finish_handshake()
        self.peer = peer
        self.heard = peer
        self._decode = self._owner._codec.decode

    def become_client(self, session: ClientSession, decode: Callable[[bytes], Any]) -> None:
        self._finish_handshake()
        self.session = session
        self._decode = decode

    def _finish_handshake(self) -> None:
        self.established = True
        self._frames.max_frame = self._owner._max_frame
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, msg: Any) -> None:
        cls = type(msg)
        if not self.established:
            if self.auth is not None:
                if cls is Proof:
                    self._owner._on_proof(self, self.auth, msg)
                else:  # unreachable with the proof decoder, kept for safety
                    self._handshake_failed(f"expected a Proof, got {cls.__name__}")
            elif cls is PeerHello:
                self._owner._accept_peer(self, msg)
            elif cls is ClientHello:
                self._owner._accept_client(self, msg)
            else:  # unreachable with the hello decoder, kept for safety
                self._handshake_failed(f"first frame is {cls.__name__}, expected a hello")
            return
        if cls is Ping:
            return
        if cls in _CONTROL:
            self._bad_frame(f"unexpected {cls.__name__} on an established connection")
            return
        if self.session is not None:
            self._owner._client_message(self.session, msg)
        elif self.peer is not None:
            self._owner._deliver(self.peer.node_id, msg)

    def _handshake_failed(self, problem: str) -> None:
        if self.auth is not None:
            self._warn(f"handshake frame is not a valid Proof: {problem}; closing the connection")
            self.reject("protocol error: expected a Proof frame")
            return
        self._warn(f"first frame is not a valid hello: {problem}; closing the connection")
        self.reject("protocol error: the first frame must be a PeerHello or ClientHello")

    def may_wait_for_budget(self) -> bool:
        return self.peer is not None

    def _budget_log(self, kind: str, text: str) -> None:
        self._owner._log_limited(f"{kind}|{self.host}", f"{self.describe()}: {text}")

    def _on_closed(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._owner._connection_gone(self)
        if self.peer is not None:
            self.peer.inbound.discard(self)
        if self.session is not None:
            self._owner._client_closed(self.session)



def open_cluster_port_problem(host: str, *, authenticated: bool) -> str | None:
    """Why a cluster port must not listen on `host` (beyond loopback when its peers and clients
    prove nothing: no cluster secret, no mutual TLS, `authenticated` False), else None. The node
    checks it from its configuration before it writes anything (`aether.node.node.listen_problem`)
    and `Transport.start` again when it binds."""
    if authenticated or is_loopback_host(host):
        return None
    return (
        f"the cluster port would listen on {host!r}, beyond loopback, without a "
        "cluster secret: anyone who can reach it could join as a node or write to the store. "
        "Set one (--cluster-secret-file FILE or AETHER_CLUSTER_SECRET, the same on every node), "
        "use mutual TLS (--tls-cert/--tls-key/--tls-ca), or bind to 127.0.0.1"
    )

class Transport:
    """TCP links between the members of one cluster, plus client sessions on the same port.

    See the module docstring for the link model, liveness rules and delivery guarantees.
    """

    def __init__(
        self,
        node_id: str,
        members: Mapping[str, Address],
        *,
        listen: Address,
        cluster_name: str,
        message_type: object,
        on_message: Callable[[str, Any], None],
        bus: EventBus | None = None,
        client_message_type: object | None = None,
        on_client_message: Callable[[ClientSession, Any], None] | None = None,
        on_client_closed: Callable[[ClientSession], None] | None = None,
        heartbeat_interval: float = 0.1,
        heartbeat_timeout: float = 0.6,
        max_frame: int = DEFAULT_MAX_FRAME,
        reconnect_min: float = 0.02,
        reconnect_max: float = 1.0,
        logger: logging.Logger | None = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        secret: bytes | None = None,
        handshake_timeout: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_host: int = DEFAULT_MAX_CONNECTIONS_PER_HOST,
        tls: TlsFiles | None = None,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        pre_auth_max_frame: int = PRE_AUTH_MAX_FRAME,
    ) -> None:
        check_node_id(node_id)
        if heartbeat_interval <= 0 or heartbeat_timeout <= heartbeat_interval:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if reconnect_min <= 0 or reconnect_max < reconnect_min:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        if max_frame <= 0:
            raise ValueError("max_frame must be positive")
        if max_connections < 1 or max_connections_per_host < 1:
            raise ValueError("max_connections and max_connections_per_host must be >= 1")
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if pre_auth_max_frame <= 0:
            raise ValueError("pre_auth_max_frame must be positive")
        if max_buffered_bytes < max_frame + HEADER_SIZE:
            raise ValueError(
                f"max_buffered_bytes ({max_buffered_bytes}) must hold at least one largest frame "
                f"(max_frame + {HEADER_SIZE} = {max_frame + HEADER_SIZE} bytes)"
            )
        self.node_id = node_id
        self.cluster_name = cluster_name
        self.bus = bus if bus is not None else EventBus(logger)
        self._listen = listen
        self._on_message = on_message
        self._on_client_message = on_client_message
        self._on_client_closed = on_client_closed
        self._hb_interval = heartbeat_interval
        self._hb_timeout = heartbeat_timeout
        # A dial this old and still not established when the peer proves itself inbound is given up
        # and made again (`_dial_back`): the peer, which sees us up, then hears from us in time.
        self._stuck_dial = heartbeat_timeout / 4
        self._handshake_timeout = (
            handshake_timeout if handshake_timeout is not None else max(1.0, 5 * heartbeat_timeout)
        )
        self._creds = Credentials(cluster_name, secret=secret)
        self._server_ssl = None if tls is None else server_context(tls)
        self._dial_ssl = None if tls is None else dialer_context(tls)
        self._max_connections = max_connections
        self._max_per_host = max_connections_per_host
        self._per_host: dict[str, int] = {}
        self._max_frame = max_frame
        self._pre_auth_max_frame = pre_auth_max_frame
        self._budget = BufferBudget(max_buffered_bytes)
        self._max_write_buffer = max_write_buffer
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._log = logger or logging.getLogger("aether.transport")
        self._prefix = f"[{node_id}]"
        self._rng = random.Random()
        self._faults: dict[str, LinkFault] = {}  # peer -> the fault of the frames we send it
        self._fault_rng = random.Random()

        self._codec = WireCodec(message_types(message_type))
        client_types = None if client_message_type is None else message_types(client_message_type)
        self._client_codec = None if client_types is None else WireCodec(client_types)
        self._hello_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            Union[PeerHello, ClientHello]  # noqa: UP007
        )
        self._proof_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Proof)
        # This process's id in hellos and acks (`PeerHello.instance`): new at every start, so a member
        # restarted is told from a second process started with its id (`_second_process`).
        self.instance = secrets.token_bytes(8)
        self._ack_frame = self._codec.frame(HelloAck(node_id, self.instance))
        # Refused as a second process with our id (`DUPLICATE_NODE`) since when, with no link of ours
        # established since; once that lasts `_duplicate_grace` (longer than a member's view of a
        # dead process at our address can last: its heartbeat timeout) `DuplicateNode` is published.
        self._duplicate_since: float | None = None
        self._duplicate_grace = 2 * heartbeat_timeout
        self._duplicate_published = False
        self._ping_frame = self._codec.frame(Ping())

        self._members: dict[str, Address] = {}
        self._voters: frozenset[str] | None = None  # who counts for quorum (None: every member)
        self._peers: dict[str, _Peer] = {}
        self._up: dict[str, _Peer] = {}
        self._up_frozen: frozenset[str] | None = frozenset()
        self._inbound: set[_InboundProtocol] = set()
        self._reject_logged: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._started = False
        self._stopped = False
        self._last_quorum = False
        self.oversized_refused = 0  # messages not sent because they exceed max_frame
        self._apply_members(members)

    # ---- public API ---------------------------------------------------------------------------

    def listen_problem(self) -> str | None:
        """Why the cluster port must not listen where it is asked to (beyond loopback with nothing
        to prove: no cluster secret, no mutual TLS), else None. `start` raises it as a ConfigError."""
        return open_cluster_port_problem(
            self._listen.host, authenticated=not self._creds.open or self._server_ssl is not None
        )

    async def start(self) -> None:
        """Bind the listener (``listen.port`` may be 0) and start dialing every other member."""
        if self._started:
            raise RuntimeError("Transport.start() may be called only once")
        if (problem := self.listen_problem()) is not None:
            raise ConfigError(problem)
        if self._creds.open and self._server_ssl is None:
            self._log.warning(
                "%s no cluster secret: the cluster port is open to any local process (as a node or a "
                "client); set --cluster-secret-file or AETHER_CLUSTER_SECRET to require one",
                self._prefix,
            )
        self._started = True
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _InboundProtocol(self), self._listen.host, self._listen.port, reuse_address=True
        )
        sockets = self._server.sockets
        self._port = sockets[0].getsockname()[1] if sockets else self._listen.port
        self._log.info(
            "%s listening on %s:%s (cluster %r%s)",
            self._prefix,
            self._listen.host,
            self._port,
            self.cluster_name,
            ", mutual TLS" if self._server_ssl is not None else "",
        )
        for peer in self._peers.values():
            self._start_dialing(peer)
        self._heartbeat_task = loop.create_task(
            self._heartbeat_loop(), name=f"aether-heartbeat-{self.node_id}"
        )
        self._check_quorum()

    async def stop(self) -> None:
        """Close every connection and cancel every task. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            return
        tasks = [t for t in [self._heartbeat_task, *(p.task for p in self._peers.values())] if t is not None]
        for task in tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for peer in self._peers.values():
            if peer.up:
                self._mark_down(peer, "transport stopped")
        links: list[LinkProtocol] = [p.link for p in self._peers.values() if p.link is not None]
        links.extend(self._inbound)
        for link in links:
            link.abort("transport stopped")
        self._check_quorum()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # Let every aborted connection run connection_lost (which closes its socket).
        pending = [link.finished for link in links if link.transport is not None]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self._log.info("%s transport stopped", self._prefix)

    @property
    def port(self) -> int:
        """The actually bound cluster port (valid after ``start()``)."""
        if self._port is None:
            raise RuntimeError("Transport not started")
        return self._port

    @property
    def listen_address(self) -> str:
        """``host:port`` the cluster port listens on (the port once bound), as sent in hellos."""
        return f"{self._listen.host}:{self._port if self._port is not None else self._listen.port}"

    @property
    def max_frame(self) -> int:
        """The largest frame payload a peer accepts (bytes; the same setting on every node). `send`
        and `broadcast` refuse a larger message (False, logged as an error) rather than write what
        the peer would close the link on; the layers above keep theirs under it."""
        return self._max_frame

    @property
    def buffered_bytes(self) -> int:
        """Bytes reserved now by unfinished inbound frames, over all connections (see `BufferBudget`)."""
        return self._budget.used

    @property
    def buffer_budget(self) -> BufferBudget:
        """The node-wide budget of bytes in unfinished inbound frames (``max_buffered_bytes``)."""
        return self._budget

    @property
    def members(self) -> Mapping[str, Address]:
        """A copy of the current member map (including this node)."""
        return dict(self._members)

    @property
    def up_peers(self) -> frozenset[str]:
        """Ids of the peers currently UP (this node excluded)."""
        up = self._up_frozen
        if up is None:
            up = self._up_frozen = frozenset(self._up)
        return up

    def has_quorum(self) -> bool:
        """True while running and ``len(up_peers) + 1 >= len(members) // 2 + 1``; with voters set
        (`set_voters`), while this node is one and a majority of them (itself included) is up."""
        if not self._started or self._stopped:
            return False
        voters = self._voters
        if voters is None:
            return len(self._up) + 1 >= len(self._members) // 2 + 1
        if self.node_id not in voters:
            return False
        return sum(1 for p in self._up if p in voters) + 1 >= len(voters) // 2 + 1

    def set_voters(self, voters: Iterable[str] | None) -> None:
        """The members quorum counts (the consensus member set in effect), when the member map also
        holds nodes that do not count (being added, or just removed); None: every member counts."""
        self._voters = None if voters is None else frozenset(voters)
        if self._started and not self._stopped:
            self._check_quorum()

    def send(self, peer: str, msg: object) -> bool:
        """Queue `msg` for `peer`; False (message dropped) if that peer is not up. Never blocks.
        True is no promise of delivery (at most once; a link fault may delay or drop it).

        Raises TypeError if `msg` is not one of the peer message types given to the constructor.
        """
        if type(msg) not in self._codec.app_types:
            raise TypeError(f"{type(msg).__name__} is not one of this transport's peer message types")
        p = self._up.get(peer)
        if p is None or p.link is None:
            return False
        frame = self._codec.frame(msg)
        if len(frame) - HEADER_SIZE > self._max_frame:
            self._refuse_oversized(msg, frame)
            return False
        return p.link.write_frame(frame)

    def broadcast(self, msg: object, to: Iterable[str] | None = None) -> None:
        """Queue `msg` (encoded once) for every up peer, or those of `to` that are up; this node
        is not included."""
        if type(msg) not in self._codec.app_types:
            raise TypeError(f"{type(msg).__name__} is not one of this transport's peer message types")
        if not self._up:
            return
        frame = self._codec.frame(msg)
        if len(frame) - HEADER_SIZE > self._max_frame:
            self._refuse_oversized(msg, frame)
            return
        if to is None:
            targets: Iterable[_Peer] = self._up.values()
        else:
            targets = [p for p in (self._up.get(n) for n in to) if p is not None]
        for p in targets:
            if p.link is not None:
                p.link.write_frame(frame)

    def _refuse_oversized(self, msg: object, frame: bytes) -> None:
        """A message the peers would close the link on (their decoder refuses frames over
        ``max_frame``): it is dropped here instead, with the error naming the limit, so the link and
        whatever else is queued on it survive. The layers above keep their messages under it."""
        self.oversized_refused += 1
        name = type(msg).__name__
        self._log_limited(
            f"oversized|{name}",
            f"{name} of {len(frame) - HEADER_SIZE} bytes exceeds the max_frame of {self._max_frame} bytes "
            "between nodes; not sent (a bug of the layer that built it: please report it)",
            level=logging.ERROR,
        )

    # ---- link faults (aether.transport.faults) -------------------------------------------------

    def set_link_fault(self, peer: str, fault: LinkFault | None) -> None:
        """Apply `fault` to every frame this node sends to `peer` from now on (None: heal the link;
        frames already delayed still leave at their time). `KeyError` if `peer` is not a member
        (this node is not one of its own peers)."""
        if peer not in self._peers:
            what = "this node itself" if peer == self.node_id else "not a member"
            raise KeyError(f"no link to {peer!r} ({what})")
        if fault is None:
            self._faults.pop(peer, None)
        else:
            self._faults[peer] = fault
        for link in self._links_to(peer):
            link.set_fault(fault, self._fault_rng)

    def link_faults(self) -> dict[str, LinkFault]:
        """The fault of each faulted link, by peer id."""
        return dict(self._faults)

    def clear_faults(self) -> None:
        """Heal every link."""
        for peer in list(self._faults):
            self.set_link_fault(peer, None)

    def _links_to(self, peer: str) -> list[LinkProtocol]:
        """Every connection this node writes to `peer` on: our outbound link, and the inbound ones
        whose hello claimed `peer` (we answer their handshake, then the ack)."""
        links: list[LinkProtocol] = [p for p in self._inbound if p.claimed_peer == peer]
        p = self._peers.get(peer)
        if p is not None and p.link is not None:
            links.append(p.link)
        return links

    def set_members(self, members: Mapping[str, Address]) -> None:
        """Replace the member map: dial new members, drop removed ones, redial moved ones."""
        self._apply_members(members)
        if self._started and not self._stopped:
            self._check_quorum()

    def __repr__(self) -> str:
        return f"<Transport {self.node_id} port={self._port} up={sorted(self._up)}>"

    # ---- membership ---------------------------------------------------------------------------

    def _apply_members(self, members: Mapping[str, Address]) -> None:
        new: dict[str, Address] = {}
        for node_id, address in members.items():
            check_node_id(node_id)
            if not isinstance(address, Address):
                raise TypeError(f"address of member {node_id!r} must be an Address, got {address!r}")
            new[node_id] = address
        self._members = new
        running = self._started and not self._stopped
        for node_id in [n for n in self._peers if n not in new or n == self.node_id]:
            removed = self._peers.pop(node_id)
            removed.active = False
            if self._faults.pop(node_id, None) is not None:
                self._log.warning(
                    "%s fault on the link to %s cleared: no longer a member", self._prefix, node_id
                )
            self._drop_peer_links(removed, "removed from membership", inbound_too=True)
            self._log.info("%s member %s removed", self._prefix, node_id)
        for node_id, address in new.items():
            if node_id == self.node_id:
                continue
            peer = self._peers.get(node_id)
            if peer is None:
                self._peers[node_id] = peer = _Peer(node_id, address)
                if running:
                    self._start_dialing(peer)
            elif peer.address != address:
                peer.address = address
                peer.attempts = 0
                self._drop_peer_links(peer, f"address changed to {address}", inbound_too=False)
                if running:
                    self._start_dialing(peer)

    def _drop_peer_links(self, peer: _Peer, reason: str, *, inbound_too: bool) -> None:
        if peer.task is not None:
            peer.task.cancel()
            peer.task = None
        if peer.up:
            self._mark_down(peer, reason)
        link, peer.link = peer.link, None
        if link is not None:
            link.abort(reason)
        if inbound_too:
            for proto in list(peer.inbound):
                proto.abort(reason)

    # ---- dialing ------------------------------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("Transport not started")
        return self._loop

    def _start_dialing(self, peer: _Peer) -> None:
        loop = self._require_loop()
        peer.task = loop.create_task(self._dial_loop(peer), name=f"aether-dial-{self.node_id}-{peer.node_id}")

    def _backoff(self, attempts: int) -> float:
        base = min(self._reconnect_max, self._reconnect_min * (2 ** min(attempts - 1, 30)))
        return base / 2 + self._rng.uniform(0, base / 2)

    async def _dial_loop(self, peer: _Peer) -> None:
        loop = self._require_loop()
        proto: _OutboundProtocol | None = None
        try:
            while not self._stopped and peer.active:
                if peer.attempts and not peer.proven:
                    await self._back_off(peer)
                    if self._stopped or not peer.active:
                        return
                peer.attempts += 1
                peer.proven = False  # one prompt redial per proof of the peer (`_dial_back`)
                address = peer.address
                proto = _OutboundProtocol(self, peer)
                peer.link = proto
                try:
                    async with asyncio.timeout(self._handshake_timeout) as peer.connecting:
                        if self._dial_ssl is None:
                            await loop.create_connection(
                                functools.partial(_same, proto), address.host, address.port
                            )
                        else:
                            await loop.create_connection(
                                functools.partial(_same, proto), address.host, address.port,
                                ssl=self._dial_ssl,
                                ssl_handshake_timeout=self._handshake_timeout,
                            )
                except (OSError, TimeoutError, ValueError) as exc:
                    peer.connecting = None
                    if peer.link is proto:
                        peer.link = None
                    proto.abort("connect failed")
                    if proto.cut_short:
                        continue  # `_cut_dial` logged it; peer.proven is set: dial again at once
                    if isinstance(exc, ssl.SSLError):
                        self._dial_problem(
                            peer,
                            "tls",
                            logging.WARNING,
                            f"TLS handshake with peer {peer.node_id!r} at {address} failed: "
                            f"{tls_problem(exc).replace('its certificate', 'the peer certificate')}; "
                            "retrying with backoff",
                        )
                        continue
                    self._dial_problem(
                        peer,
                        "connect",
                        logging.INFO,
                        f"cannot connect to peer {peer.node_id!r} at {address}: "
                        f"{exc or type(exc).__name__}; retrying with backoff",
                    )
                    continue
                peer.connecting = None
                await proto.finished
                if proto.established and loop.time() - proto.established_at >= self._hb_timeout:
                    peer.attempts = 0  # the link was healthy for a while: redial promptly
                proto = None
        except asyncio.CancelledError:
            peer.connecting = None
            if proto is not None and not proto.established:
                if peer.link is proto:
                    peer.link = None
                proto.abort("dialing cancelled")
            raise

    async def _back_off(self, peer: _Peer) -> None:
        """Sleep the backoff before the next dial to `peer`, unless `_dial_back` ends it sooner."""
        loop = self._require_loop()
        wake = peer.wake = loop.create_future()
        timer = loop.call_later(self._backoff(peer.attempts), _wake, wake)
        try:
            await wake
        finally:
            timer.cancel()
            peer.wake = None

    def _dial_back(self, peer: _Peer) -> None:
        """`peer` just proved itself on an inbound connection, so it is reachable and sees us up
        (it has our ack) but hears nothing from us until our own link to it is established: if our
        dial sleeps in its backoff, dial now; if it is still connecting or handshaking, give it up
        once it is `_stuck_dial` seconds old and dial again; if it fails, dial again without the
        backoff, once (module docstring, *Link model*)."""
        proto = peer.link
        if proto is not None and proto.established:
            return
        peer.proven = True
        wake = peer.wake
        if wake is not None and not wake.done():
            self._log.debug("%s peer %s dialed us: dialing it back now", self._prefix, peer.node_id)
            wake.set_result(None)
            return
        if proto is None or proto.closing:
            return  # between two dials: the next one starts at once
        loop = self._require_loop()
        wait = proto.started_at + self._stuck_dial - loop.time()
        if wait <= 0:
            self._cut_dial(proto)
        else:
            loop.call_later(wait, self._cut_dial, proto)

    def _cut_dial(self, proto: _OutboundProtocol) -> None:
        """Give up dial `proto` if it is still connecting or handshaking (`_dial_back`)."""
        peer = proto.peer
        if self._stopped or peer.link is not proto or proto.established or proto.closing or proto.cut_short:
            return
        loop = self._require_loop()
        proto.cut_short = True
        connecting = peer.connecting
        self._dial_problem(
            peer,
            "stuck",
            logging.INFO,
            f"peer {peer.node_id!r} dialed us while our dial to it at {peer.address} was still "
            f"{'connecting' if connecting is not None else 'waiting for its HelloAck'} after "
            f"{loop.time() - proto.started_at:.2f}s: dialing it again",
        )
        if connecting is not None:  # the dial loop awaits the connect: end it as if it timed out
            if not connecting.expired():
                connecting.reschedule(loop.time())
        else:
            proto.abort("dial given up: the peer dialed us meanwhile")

    def _dial_problem(self, peer: _Peer, kind: str, level: int, text: str) -> None:
        """Log a dial/handshake problem once per kind until the peer is up again, then at DEBUG."""
        if kind in peer.logged:
            self._log.debug("%s %s", self._prefix, text)
        else:
            peer.logged.add(kind)
            self._log.log(level, "%s %s", self._prefix, text)

    def _outbound_established(self, proto: _OutboundProtocol) -> None:
        peer = proto.peer
        if self._stopped or not peer.active or peer.link is not proto:
            proto.abort("stale link")
            return
        peer.last_heard = proto.established_at
        peer.logged.clear()
        peer.proven = False
        self._duplicate_since = None
        self._mark_up(peer)
        # The process answering at the peer's member address is the peer: a connection from another
        # process claiming its id (accepted while nothing answered there) is a second process.
        for other in list(peer.inbound):
            if self._second_process(peer, other.claimed_instance):
                self._log_limited(
                    f"dup|{peer.node_id}|{other.claimed_instance.hex()}",
                    f"{other.describe()} (listening on {other.claimed_listen or 'an unknown address'}) is "
                    f"a second process with the id of {peer.node_id}: {peer.node_id!r} answers at its "
                    f"member address {peer.address} as another process; closing its connection",
                )
                other.abort(f"a second process with the id of {peer.node_id}")

    def _second_process(self, peer: _Peer, instance: bytes) -> bool:
        """True if a connection from process `instance` claiming `peer`'s id is not `peer`: our
        established link to the peer's member address is answered by another process. Unknown
        (an earlier version's empty instance on either side, or no such link): False."""
        link = peer.link
        return bool(
            instance and link is not None and link.established and not link.closing
            and link.instance and link.instance != instance
        )

    def _refused_as_duplicate(self, peer: _Peer, reason: str) -> None:
        """`peer` refused our hello: our id runs in the cluster as another process. Once that has
        lasted `_duplicate_grace` with no link of ours established meanwhile, publish
        `DuplicateNode` (once): the node stops. (A member's stale view of an earlier process of ours
        at our address, after a restart, ends within its heartbeat timeout.)"""
        now = self._require_loop().time()
        if self._duplicate_since is None:
            self._duplicate_since = now
        elif now - self._duplicate_since >= self._duplicate_grace and not self._duplicate_published:
            self._duplicate_published = True
            self.bus.publish(DuplicateNode(peer.node_id, reason))

    def _outbound_closed(self, proto: _OutboundProtocol) -> None:
        peer = proto.peer
        if peer.link is proto:
            peer.link = None
            if peer.up:
                self._mark_down(peer, proto.close_reason or "link closed")

    # ---- liveness and events --------------------------------------------------------------------

    def _mark_up(self, peer: _Peer) -> None:
        if peer.up:
            return
        peer.up = True
        self._up[peer.node_id] = peer
        self._up_frozen = None
        self._log.info("%s peer %s up", self._prefix, peer.node_id)
        self.bus.publish(PeerUp(peer.node_id))
        self._check_quorum()

    def _mark_down(self, peer: _Peer, reason: str) -> None:
        if not peer.up:
            return
        peer.up = False
        self._up.pop(peer.node_id, None)
        self._up_frozen = None
        self._log.info("%s peer %s down: %s", self._prefix, peer.node_id, reason)
        self.bus.publish(PeerDown(peer.node_id, reason))
        self._check_quorum()

    def _check_quorum(self) -> None:
        quorum = self.has_quorum()
        if quorum != self._last_quorum:
            self._last_quorum = quorum
            self._log.info(
                "%s quorum %s (up peers: %s)", self._prefix, "gained" if quorum else "lost", sorted(self._up)
            )
            self.bus.publish(QuorumChanged(quorum, self.up_peers))

    async def _heartbeat_loop(self) -> None:
        loop = self._require_loop()
        interval = self._hb_interval
        last = loop.time()
        skipped = False
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            # If this loop itself was stalled, data may be waiting in socket buffers: judge next tick.
            stalled = now - last > interval + self._hb_timeout / 2
            last = now
            judge = not stalled or skipped
            skipped = not judge
            self._heartbeat_tick(now, judge)

    def _heartbeat_tick(self, now: float, judge: bool) -> None:
        timeout = self._hb_timeout
        ping = self._ping_frame
        for peer in list(self._up.values()):
            link = peer.link
            if link is None:
                continue
            silent = now - peer.last_heard
            if judge and silent > timeout:
                reason = f"heartbeat timeout: nothing heard for {silent:.2f}s"
                self._mark_down(peer, reason)
                link.abort(reason)
                continue
            if not link.wrote:
                link.write_frame(ping)
            link.wrote = False

    # ---- inbound ------------------------------------------------------------------------------

    def _reject_hello(
        self, proto: _InboundProtocol, key: str, problem: str, reason: str, code: str = ""
    ) -> None:
        now = time.monotonic()
        last = self._reject_logged.get(key)
        if last is None or now - last >= _REJECT_LOG_INTERVAL:
            if len(self._reject_logged) > 1024:
                self._reject_logged.clear()
            self._reject_logged[key] = now
            proto._warn(f"{problem}; rejected")
        else:
            self._log.debug("%s %s: %s; rejected (repeat)", self._prefix, proto.describe(), problem)
        proto.reject(reason, code)

    def _admit_connection(self, proto: _InboundProtocol) -> bool:
        """Count a new inbound connection; refuse (abort) it beyond the total or per-host cap."""
        host = proto.host
        count = self._per_host.get(host, 0)
        if len(self._inbound) >= self._max_connections:
            problem = f"{len(self._inbound)} inbound connections already open (max_connections)"
        elif count >= self._max_per_host:
            problem = f"{count} connections from {host} already open (max_connections_per_host)"
        else:
            self._inbound.add(proto)
            self._per_host[host] = count + 1
            proto.counted = True
            return True
        self._log_limited(f"cap|{host}", f"{proto.describe()}: {problem}; refusing it")
        proto.abort("connection cap")
        return False

    def _connection_gone(self, proto: _InboundProtocol) -> None:
        self._inbound.discard(proto)
        if proto.counted:
            proto.counted = False
            left = self._per_host.get(proto.host, 1) - 1
            if left > 0:
                self._per_host[proto.host] = left
            else:
                self._per_host.pop(proto.host, None)

    def _log_limited(self, key: str, text: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        last = self._reject_logged.get(key)
        if last is None or now - last >= _REJECT_LOG_INTERVAL:
            if len(self._reject_logged) > 1024:
                self._reject_logged.clear()
            self._reject_logged[key] = now
            self._log.log(level, "%s %s", self._prefix, text)
        else:
            self._log.debug("%s %s (repeat)", self._prefix, text)

    def _challenge(self, proto: _InboundProtocol, kind: Kind, dialer_id: str, nonce: bytes) -> None:
        if kind == "peer":
            proto.claimed_peer = dialer_id
            fault = self._faults.get(dialer_id)
            if fault is not None:  # what we answer it goes through the fault too
                proto.set_fault(fault, self._fault_rng)
        auth = AcceptorHandshake(self._creds, self.node_id)
        try:
            my_nonce, proof = auth.challenge(kind, dialer_id, nonce)
        except AuthFailed as exc:
            self._reject_hello(proto, f"auth|{proto.host}|{dialer_id}", str(exc), str(exc))
            return
        proto.challenged(auth)
        proto.write_now(self._codec.frame(Challenge(self.node_id, my_nonce, proof)))

    def _accept_peer(self, proto: _InboundProtocol, hello: PeerHello) -> None:
        host = proto.host
        if hello.cluster != self.cluster_name:
            self._reject_hello(
                proto,
                f"cluster|{host}|{hello.cluster}",
                f"peer hello for cluster {hello.cluster!r} (node {hello.node_id!r}), "
                f"this is cluster {self.cluster_name!r}",
                f"wrong cluster: this is {self.cluster_name!r}",
            )
            return
        if self._unknown_peer(proto, hello.node_id):
            return
        if self._server_ssl is not None and proto.cert_id != hello.node_id:
            self._reject_hello(
                proto,
                f"certid|{host}|{hello.node_id}|{proto.cert_id}",
                f"peer hello claims node {hello.node_id!r} but its TLS certificate is for "
                f"{proto.cert_id!r}: a node may only use its own certificate (issue one with "
                f"`aether cert issue {hello.node_id}`)",
                f"your TLS certificate is for {proto.cert_id!r}, not {hello.node_id!r}",
            )
            return
        proto.claimed_instance, proto.claimed_listen = hello.instance, hello.listen
        self._challenge(proto, "peer", hello.node_id, hello.nonce)

    def _unknown_peer(self, proto: _InboundProtocol, node_id: str) -> bool:
        if node_id in self._peers:
            return False
        what = "this node's own id" if node_id == self.node_id else "not a member"
        self._reject_hello(
            proto,
            f"node|{proto.host}|{node_id}",
            f"peer hello from unknown node id {node_id!r} ({what})",
            f"unknown node id {node_id!r}",
        )
        return True

    def _accept_client(self, proto: _InboundProtocol, hello: ClientHello) -> None:
        host = proto.host
        if self._client_codec is None:
            self._reject_hello(
                proto,
                f"noclients|{host}",
                f"client hello from {hello.client_id!r} but this node accepts no clients",
                "this node does not accept client connections",
            )
            return
        if hello.cluster != self.cluster_name:
            self._reject_hello(
                proto,
                f"ccluster|{host}|{hello.cluster}",
                f"client hello for cluster {hello.cluster!r}, this is cluster {self.cluster_name!r}",
                f"wrong cluster: this is {self.cluster_name!r}",
            )
            return
        self._challenge(proto, "client", hello.client_id, hello.nonce)

    def _on_proof(self, proto: _InboundProtocol, auth: AcceptorHandshake, msg: Proof) -> None:
        try:
            auth.verify(msg.proof)
        except AuthFailed as exc:
            self._reject_hello(proto, f"proof|{proto.host}|{auth.kind}|{auth.dialer_id}", str(exc), str(exc))
            return
        if auth.kind == "client":
            assert self._client_codec is not None
            session = ClientSession(proto, auth.dialer_id, self._client_codec.frame)
            proto.become_client(session, self._client_codec.decode)
            proto.write_now(self._ack_frame)
            self._log.debug("%s client %r connected from %s", self._prefix, auth.dialer_id, proto.remote)
            return
        if self._unknown_peer(proto, auth.dialer_id):  # removed from membership meanwhile
            return
        peer = self._peers[auth.dialer_id]
        if self._second_process(peer, proto.claimed_instance):
            # It proved the secret, but the peer's member address answers our link as another
            # process, alive: this is a second process started with the peer's id (a copied command
            # line with other ports). Taken for the peer restarted, it displaced the peer's
            # connection, the peer dialed again and displaced it, and so on.
            listen = proto.claimed_listen or "an unknown address"
            self._reject_hello(
                proto,
                f"dup|{peer.node_id}|{proto.claimed_instance.hex()}",
                f"a second process with the id of {peer.node_id} (listening on {listen}): "
                f"{peer.node_id!r} answers at its member address {peer.address} as another process",
                f"node {peer.node_id} is already running in the cluster, at {peer.address} (node "
                f"{self.node_id} reaches it there); this process (listening on {listen}) is a second one "
                f"with its id: stop it, or give it an id that is not a member's",
                DUPLICATE_NODE,
            )
            return
        # Authenticated: this is the peer (restarted or reconnected). It keeps one outbound link to
        # us, so older connections from it are dead. An unauthenticated hello never gets here.
        for old in list(peer.inbound):
            old.abort("replaced by a newer authenticated connection from the same peer")
        peer.inbound.add(proto)
        proto.become_peer(peer)
        peer.last_heard = self._require_loop().time()
        proto.write_now(self._ack_frame)
        self._log.debug("%s accepted peer %s from %s", self._prefix, auth.dialer_id, proto.remote)
        self._dial_back(peer)

    # ---- callbacks into the application -------------------------------------------------------

    def _deliver(self, sender: str, msg: object) -> None:
        try:
            self._on_message(sender, msg)
        except Exception:
            self._log.exception(
                "%s on_message failed for %s from %s", self._prefix, type(msg).__name__, sender
            )

    def _client_message(self, session: ClientSession, msg: object) -> None:
        handler = self._on_client_message
        if handler is None:
            return
        try:
            handler(session, msg)
        except Exception:
            self._log.exception(
                "%s on_client_message failed for %s from client %r",
                self._prefix,
                type(msg).__name__,
                session.client_id,
            )

    def _client_closed(self, session: ClientSession) -> None:
        handler = self._on_client_closed
        if handler is None:
            return
        try:
            handler(session)
        except Exception:
            self._log.exception("%s on_client_closed failed for client %r", self._prefix, session.client_id)
