"""Asynchronous client with pipelining, sessions and immediate failover across nodes."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from aether.core.calls import NoAnswer, PendingCalls
from aether.core.errors import (
    AetherError,
    BadRequest,
    CommitTimeout,
    QuorumLost,
    SessionConflict,
    TooLarge,
    Unauthorized,
)
from aether.core.types import Address
from aether.kv.machine import (
    MAX_VALUE_BYTES,
    UNKNOWN_SESSION,
    Cas,
    Get,
    Op,
    Put,
    Remove,
    Result,
    decode_result,
    encode_command,
    session_error_kind,
)
from aether.kv.protocol import ClientRequest, ClientResponse, ServerMessage
from aether.transport import ClientLink, ConnectionRejected, open_client_connection
from aether.transport.auth import SECRET_ENV, SECRET_FILE_ENV, load_secret, secret_from_env
from aether.transport.tls import TlsFiles, dialer_context

_OPEN_KEY = "user/.session"  # read (never written) to open a session


class _Lane:
    """A session: at most one request in flight, so sequence numbers apply in order.

    A lane goes back to the pool only after a definite answer (its last seq is then recorded
    by the store); after a failure it is dropped, so a lane never continues a session whose
    last command the store may not have seen."""

    __slots__ = ("id", "seq")

    def __init__(self, lane_id: str) -> None:
        self.id = lane_id
        self.seq = 0


class AetherClient:
    """Client of a cluster. `addresses` are cluster ports (HOST:PORT strings or Address).

    ```python
    async with AetherClient(["127.0.0.1:7000", "127.0.0.1:7001"], secret=SECRET) as c:
        await c.put("user/greeting", b"hello")
        assert await c.get("user/greeting") == b"hello"
    ```

    Credentials (docs/cluster-security.md): `secret` is the cluster secret (bytes or str), or
    `client_key` the client key derived from it; with neither, the secret is taken from
    ``AETHER_CLUSTER_SECRET`` or the file named by ``AETHER_CLUSTER_SECRET_FILE``, and without
    those the client connects open (accepted only by a node running without a secret). A client
    may read and write only ``user/`` keys; other key families belong to the cluster. Nodes
    running mutual TLS accept only TLS clients with a certificate from the cluster CA: pass
    `tls` (e.g. ``TlsFiles("client.crt", "client.key", "ca.crt")`` from ``aether cert issue``).
    """

    def __init__(
        self,
        addresses: Sequence[str | Address],
        *,
        cluster_name: str = "aether",
        timeout: float = 5.0,
        prefer: int | None = None,
        client_id: str | None = None,
        secret: bytes | str | None = None,
        client_key: bytes | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("AetherClient needs at least one node address")
        if secret is not None:
            self._secret: bytes | None = load_secret(secret)
            self._credential = "secret=..."
        elif client_key is None:
            self._secret = secret_from_env()
            self._credential = "AETHER_CLUSTER_SECRET" if os.environ.get(SECRET_ENV) else SECRET_FILE_ENV
        else:
            self._secret = None
            self._credential = "client_key=..."
        self._client_key = client_key
        self._ssl = None if tls is None else dialer_context(tls)
        self.addresses = [a if isinstance(a, Address) else Address.parse(a) for a in addresses]
        self.cluster_name = cluster_name
        self.timeout = timeout
        self.client_id = client_id or f"c{os.getpid()}-{random.getrandbits(40):x}"
        # Session (lane) ids are unique per client object even with an explicit client_id: the
        # replicated session table outlives processes, and a reused (session, seq) is refused.
        self._sessions = self.client_id if client_id is None else f"{client_id}-{random.getrandbits(40):x}"
        self._index = prefer if prefer is not None else random.randrange(len(self.addresses))
        self._link: ClientLink | None = None
        self._connecting: asyncio.Future[ClientLink] | None = None
        self._pending: PendingCalls[ClientResponse] = PendingCalls()  # on the one link in use
        self._lanes: list[_Lane] = []
        self._lane_ids = itertools.count(1)
        self._closed = False
        self.failovers = 0

    @property
    def connected_to(self) -> Address | None:
        return self.addresses[self._index] if self._link is not None and not self._link.closed else None

    async def __aenter__(self) -> AetherClient:
        await self._ensure_link(time.monotonic() + self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._link is not None:
            self._link.close()
            self._link = None
        self._pending.fail_all(lambda: ConnectionError("client closed"))

    # --- public operations ----------------------------------------------------------------------

    async def put(self, key: str, value: bytes) -> int:
        """Write `value`; returns the store revision after the write."""
        res = await self._call(Put(key, value))
        return res.revision

    async def get(self, key: str) -> bytes | None:
        """Linearizable read (through consensus)."""
        return (await self._call(Get(key))).value

    async def remove(self, key: str) -> bool:
        return (await self._call(Remove(key))).value is not None

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        return (await self._call(Cas(key, expected, new))).ok

    # --- machinery ------------------------------------------------------------------------------

    async def _call(self, op: Op) -> Result:
        _check_op(op)
        res, sends = await self._on_lane(op)
        if session_error_kind(res.error) == UNKNOWN_SESSION:
            if sends > 1:
                # an earlier send of this very command may have been applied before the store
                # forgot the session, so the refusal does not tell whether it ran
                raise CommitTimeout(f"outcome unknown: the command was sent {sends} times and the "
                                    f"store then no longer knew its session ({res.error})")
            # Sent once and refused: certainly not applied (a lane only continues a session whose
            # last command the store recorded, so the store evicted it). Resubmit once, on a new lane.
            res, _ = await self._on_lane(op)
        if res.error:
            if session_error_kind(res.error) is not None:
                raise SessionConflict(f"the store refused the request (not applied): {res.error}")
            raise BadRequest(res.error)
        return res

    async def _on_lane(self, op: Op) -> tuple[Result, int]:
        """Send `op` on a lane; returns the result and how many times the command was sent."""
        lane = self._lanes.pop() if self._lanes else _Lane(f"{self._sessions}.{next(self._lane_ids)}")
        if lane.seq == 0:
            # Open the session with a read. Seq 1 is the one command a store that evicted the
            # session would run again if a resend of it arrived late, so it must be harmless;
            # the caller's command then goes as seq 2, which a forgetful store refuses instead.
            lane.seq = 1
            opened = await self._request(encode_command(Get(_OPEN_KEY), lane.id, 1))
            if session_error_kind(opened.error) is not None:
                return opened, 0
        lane.seq += 1
        cmd = encode_command(op, lane.id, lane.seq)
        sends = [0]
        res = await self._request(cmd, sends)  # on failure the lane is dropped
        if session_error_kind(res.error) is None:
            self._lanes.append(lane)
        return res, sends[0]

    async def _request(self, command: bytes, sends: list[int] | None = None) -> Result:
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        attempts_without_quorum = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if isinstance(last, QuorumLost):
                    raise last
                raise CommitTimeout(
                    f"no answer within {self.timeout:.1f}s (outcome unknown); last error: {last}"
                )
            try:
                link = await self._ensure_link(deadline)
            except ConnectionRejected as e:
                hint = self._refused_hint(e.cause)
                raise Unauthorized(f"every node refused this client: {e}; {hint}") from None
            except ConnectionError as e:
                raise QuorumLost(f"no node reachable: {e}") from None
            rid, _ = self._pending.open(None)
            link.send(ClientRequest(rid, command))
            if sends is not None:
                sends[0] += 1
            try:
                resp = await self._pending.wait(rid, remaining)
            except NoAnswer:
                continue
            except ConnectionError as e:  # our node went away: fail over and retry (same session seq)
                last = e
                continue
            if resp.error is None:
                assert resp.result is not None
                return decode_result(resp.result)
            if resp.kind == "bad_request":
                raise BadRequest(resp.error)
            if resp.kind == "quorum":
                last = QuorumLost(resp.error)
                attempts_without_quorum += 1
                if attempts_without_quorum >= len(self.addresses):
                    raise last
                self._switch()
                continue
            if resp.kind == "timeout":
                last = CommitTimeout(resp.error)
                continue
            raise AetherError(resp.error)

    def _refused_hint(self, cause: str) -> str:
        """What to do when every node refused this client, by why (`ConnectionRejected.cause`): the
        same "give the cluster's secret" for all was wrong for a client that has one."""
        see = "see docs/cluster-security.md"
        if cause == "open":
            return (
                f"this client has a cluster secret ({self._credential}) but the nodes run open, without "
                "one: connect without a secret, or start the nodes with the cluster's secret "
                f"(--cluster-secret-file); {see}"
            )
        if cause == "other_secret":
            return (
                f"the nodes run with a cluster secret other than this client's ({self._credential}): give "
                "the client the nodes' secret (for a local cluster, AETHER_CLUSTER_SECRET_FILE="
                f"DIR/cluster.secret); {see}"
            )
        if cause == "rejected" and self._secret is None and self._client_key is None:
            return (
                "give the cluster's secret (secret=..., or AETHER_CLUSTER_SECRET / "
                f"AETHER_CLUSTER_SECRET_FILE), {see}"
            )
        return see  # the node's reason says why (another cluster's name, ...)

    def _switch(self) -> None:
        """Leave this node for the next one. The requests still waiting on its link are sent again
        there (same session seq): its answers cannot arrive once the link is closed."""
        if self._link is not None:
            self._link.close()  # (its close callback comes later, and is then not ours: `_on_close`)
            self._link = None
            self._pending.fail_all(lambda: ConnectionError("switched to another node"))
        self._index = (self._index + 1) % len(self.addresses)

    async def _ensure_link(self, deadline: float) -> ClientLink:
        if self._link is not None:
            if not self._link.closed:
                return self._link
            self._lost(None)  # closed under us (a protocol error), its close callback still to come
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            link = await self._connect_any(deadline)
            self._connecting.set_result(link)
            return link
        except BaseException as e:
            self._connecting.set_exception(e)
            self._connecting.exception()  # mark retrieved
            raise
        finally:
            self._connecting = None

    async def _connect_any(self, deadline: float) -> ClientLink:
        errors = []
        causes: set[str] = set()
        rejected = 0
        n = len(self.addresses)
        for i in range(n):
            idx = (self._index + i) % n
            addr = self.addresses[idx]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            taken: list[ClientLink] = []  # the link, once it is ours (its close callback says which)
            try:
                link = await open_client_connection(
                    addr,
                    cluster_name=self.cluster_name,
                    client_id=self.client_id,
                    message_type=ServerMessage,
                    on_message=self._on_message,
                    on_close=functools.partial(self._on_close, taken),
                    timeout=min(remaining, 2.0),
                    secret=self._secret,
                    client_key=self._client_key,
                    ssl_context=self._ssl,
                )
            except ConnectionRejected as e:
                errors.append(f"{addr}: {e}")
                causes.add(e.cause)
                rejected += 1
                continue
            except (ConnectionError, OSError) as e:
                errors.append(f"{addr}: {e}")
                continue
            taken.append(link)
            self._index = idx
            self._link = link
            return link
        if errors and rejected == len(errors):  # every node answered, and refused us
            raise ConnectionRejected("; ".join(errors), causes.pop() if len(causes) == 1 else "")
        raise ConnectionError("; ".join(errors) or "deadline passed")

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, ClientResponse):
            self._pending.resolve(msg.id, None, msg)

    def _on_close(self, taken: list[ClientLink], exc: Exception | None) -> None:
        """A link closed. Only the current one's loss is a failover: the close of a link this
        client left (`_switch`, `close`), whose callback may come after the next link is up (a TLS
        close takes a while), must not drop that link or fail the requests waiting on it."""
        if not taken or taken[0] is not self._link:
            return
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        """The current link is gone, not by this client's choice: fail over."""
        self._link = None
        if self._closed:
            return
        # move on to the next node right away; pending requests retry there
        self._index = (self._index + 1) % len(self.addresses)
        self.failovers += 1
        err = ConnectionError(f"connection lost: {exc}" if exc else "connection closed by node")
        self._pending.fail_all(lambda: err)


def _check_op(op: Op) -> None:
    """Refuse, before anything is sent, a key or value the store would refuse or that cannot be
    encoded: a key that is not a str or not UTF-8 (a lone surrogate such as ``"\\udc80"``, which
    used to escape as a bare UnicodeEncodeError), a value that is not bytes, and (`TooLarge`, 413)
    a value over the store's limit: the command would travel to every node first, and one beyond a
    message between nodes not at all."""
    if not isinstance(op.key, str):
        raise BadRequest(f"key must be a str, got {type(op.key).__name__}: {op.key!r:.200}")
    try:
        op.key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"key {op.key[:200]!r} is not valid UTF-8: {e.reason} at position {e.start}; "
            "keys are UTF-8 text (not sent)"
        ) from None
    values: list[tuple[str, bytes | None]]
    if isinstance(op, Put):
        values = [("value", op.value)]
    elif isinstance(op, Cas):
        values = [("expected value", op.expected), ("new value", op.new)]
    else:
        return
    for what, value in values:
        if value is None and what != "value":
            continue
        if not isinstance(value, (bytes, bytearray)):
            raise BadRequest(
                f"{what} for {op.key[:200]!r} must be bytes, got {type(value).__name__} "
                "(encode text with .encode())"
            )
        if len(value) > MAX_VALUE_BYTES:
            raise TooLarge(
                f"{what} for {op.key[:200]!r} is {len(value)} bytes; the store's limit is {MAX_VALUE_BYTES} "
                "bytes per value (not sent)"
            )
