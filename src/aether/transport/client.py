"""Client-side connector to a node's cluster port (used by `aether.client`).

`open_client_connection` dials a node, performs the handshake of `aether.transport.auth`
(``ClientHello``, ``Challenge``, ``Proof``, ``HelloAck``; with a secret or client key the node must
prove it knows the cluster secret too) and returns a `ClientLink`.
Frames are coalesced exactly like node-to-node traffic. The link does not
reconnect and sends no heartbeats: the caller decides what to do when ``on_close`` fires.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aether.core.types import Address
from aether.transport._link import DEFAULT_MAX_WRITE_BUFFER, FramedEndpoint, LinkProtocol
from aether.transport.auth import Credentials, DialerHandshake
from aether.transport.framing import DEFAULT_MAX_FRAME
from aether.transport.messages import (
    CONTROL_TYPES,
    ClientHello,
    HelloAck,
    Ping,
    Reject,
    WireCodec,
    message_types,
)

__all__ = ["ClientLink", "ConnectionRejected", "open_client_connection"]

_CONTROL = frozenset(CONTROL_TYPES)


class ConnectionRejected(ConnectionError):
    """The node answered but refused this client (wrong cluster, no or wrong credentials): retrying
    elsewhere with the same credentials will not help. `cause`, for the client's hint: "open" (this
    client has a secret, the node runs without one), "other_secret" (the node proved another
    secret), "rejected" (the node sent its refusal: its reason is in the message), "" (else)."""

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause

class _ClientSideProtocol(LinkProtocol):
    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        log: logging.Logger,
        codec: WireCodec,
        hello: ClientHello,
        auth: DialerHandshake,
        address: Address,
        on_message: Callable[[Any], None],
        on_close: Callable[[Exception | None], None],
        max_frame: int,
        max_write_buffer: int,
        tls: bool = False,
    ) -> None:
        super().__init__(
            loop=loop,
            log=log,
            prefix=f"[client {hello.client_id}]",
            codec=codec,
            decode=codec.decode,
            max_frame=max_frame,
            max_write_buffer=max_write_buffer,
        )
        self._hello_frame = codec.frame(hello)
        self._auth = auth
        self._address = address
        self._on_message = on_message
        self._on_close = on_close
        self.handshake: asyncio.Future[str] = loop.create_future()
        self.closed_locally = False
        self._tls = tls

    def describe(self) -> str:
        return f"node at {self._address}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.write_now(self._hello_frame)

    def _fail_handshake(self, error: ConnectionError) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
            self.handshake.exception()  # mark retrieved: nobody may be waiting any more

    def _handle(self, msg: Any) -> None:
        cls = type(msg)
        if not self.established:
            end = self._dialer_handshake(self._auth, msg)
            if type(end) is HelloAck:
                self.established = True
                if not self.handshake.done():
                    self.handshake.set_result(end.node_id)
            elif type(end) is Reject:
                self._fail_handshake(ConnectionRejected(
                    f"aether node at {self._address} rejected the connection: {end.reason}", "rejected"
                ))  # fmt: skip
                self.close("rejected")
            return
        if cls is Ping:
            return
        if cls in _CONTROL:
            self._bad_frame(f"unexpected {cls.__name__} on an established connection")
            return
        try:
            self._on_message(msg)
        except Exception:
            self._log.exception("%s on_message failed for %s", self._prefix, cls.__name__)

    def _handshake_failed(self, problem: str) -> None:
        self._fail_handshake(
            ConnectionRejected(
                f"handshake with aether node at {self._address} failed: {problem}", self._auth.failure
            )
        )
        self.abort("handshake failed")

    def _on_closed(self, exc: Exception | None) -> None:
        # A node running mutual TLS closes a plaintext connection without a word (there is no TLS
        # to send a reason over): say so, since the client cannot tell it from other closes.
        hint = "" if self._tls else (
            " (a node that runs mutual TLS on its cluster port does this to a client without TLS: "
            "then connect with tls=TlsFiles(cert, key, ca), a certificate from the cluster CA; the "
            "node's log says why it closed)"
        )
        self._fail_handshake(ConnectionError(
            f"aether node at {self._address} closed the connection during the handshake{hint}"
        ))  # fmt: skip
        if self.established:
            error: Exception | None = None
            if not self.closed_locally:
                error = ConnectionError(
                    f"connection to aether node at {self._address} lost: {self.close_reason}"
                )
            try:
                self._on_close(error)
            except Exception:
                self._log.exception("%s on_close callback failed", self._prefix)


class ClientLink(FramedEndpoint):
    """An established client connection to one node."""

    __slots__ = ("_frame", "_proto", "address", "node_id")
    _proto: _ClientSideProtocol

    def __init__(
        self, proto: _ClientSideProtocol, node_id: str, address: Address, frame: Callable[[object], bytes]
    ) -> None:
        self._proto = proto
        self._frame = frame
        self.node_id = node_id
        """Id of the node that accepted the connection."""
        self.address = address

    def close(self) -> None:
        """Flush queued frames and close; ``on_close(None)`` follows once the socket is closed."""
        if not self._proto.closing:
            self._proto.closed_locally = True
            self._proto.close("closed by the client")

    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed."""
        await asyncio.shield(self._proto.finished)

    def __repr__(self) -> str:
        return f"<ClientLink to {self.node_id} at {self.address} {'closed' if self.closed else 'open'}>"


async def open_client_connection(
    address: Address,
    *,
    cluster_name: str,
    client_id: str,
    message_type: object,
    on_message: Callable[[Any], None],
    on_close: Callable[[Exception | None], None],
    max_frame: int = DEFAULT_MAX_FRAME,
    timeout: float = 5.0,
    logger: logging.Logger | None = None,
    max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
    secret: bytes | None = None,
    client_key: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ClientLink:
    """Connect to a node's cluster port as client `client_id` and complete the handshake.

    `message_type` is the union of messages the node sends to clients (tags >= 10). `on_message`
    gets each of them; `on_close(exc)` is called once when an established link closes (``None``
    after a local ``close()``). Raises ConnectionError, with a message naming the node address,
    if the node cannot be reached, rejects the hello or does not answer within `timeout` seconds.

    `secret` (the cluster secret) or `client_key` (derived from it, `auth.client_key_of`) is the
    credential to prove; with neither the connection is open, which only an open node accepts.
    `ssl_context` (`aether.transport.tls.dialer_context`): connect with TLS, for a node running
    mutual TLS (it requires a certificate from the cluster CA).
    """
    loop = asyncio.get_running_loop()
    codec = WireCodec(message_types(message_type))
    creds = Credentials(cluster_name, secret=secret, client_key=client_key)
    auth = DialerHandshake(creds, "client", client_id)
    proto = _ClientSideProtocol(
        loop=loop,
        log=logger or logging.getLogger("aether.transport.client"),
        codec=codec,
        hello=ClientHello(cluster_name, client_id, auth.nonce),
        auth=auth,
        address=address,
        on_message=on_message,
        on_close=on_close,
        max_frame=max_frame,
        max_write_buffer=max_write_buffer,
        tls=ssl_context is not None,
    )
    try:
        async with asyncio.timeout(timeout):
            try:
                if ssl_context is None:
                    await loop.create_connection(lambda: proto, address.host, address.port)
                else:
                    await loop.create_connection(
                        lambda: proto, address.host, address.port,
                        ssl=ssl_context, server_hostname=address.host,
                    )
            except OSError as exc:
                raise ConnectionError(f"cannot connect to aether node at {address}: {exc}") from exc
            node_id = await asyncio.shield(proto.handshake)
    except TimeoutError:
        proto.abort("handshake timeout")
        raise ConnectionError(
            f"no answer to the client hello from aether node at {address} within {timeout}s"
        ) from None
    except BaseException:
        proto.abort("handshake failed")
        raise
    return ClientLink(proto, node_id, address, codec.frame)
