"""Wire messages of the transport layer and the per-Transport codec.

Every wire message is a `msgspec.Struct` with ``array_like=True`` and an integer ``tag``.
Tags 1-9 are reserved for the transport's control messages defined here; application layers
define their own tagged structs with tags >= 10 and hand a ``typing.Union`` of them to the
`Transport` (peer messages) or to the client connector (client messages). A frame's payload is
one msgpack-encoded message.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Final, Union

import msgspec

from aether.transport.framing import MAX_PAYLOAD, encode_frame, frame_header

__all__ = [
    "CONTROL_TYPES",
    "DUPLICATE_NODE",
    "FIRST_APP_TAG",
    "Challenge",
    "ClientHello",
    "HelloAck",
    "PeerHello",
    "Ping",
    "Proof",
    "Reject",
    "WireCodec",
    "message_types",
]

FIRST_APP_TAG: Final = 10
"""Smallest tag an application message may use; 1-9 belong to the transport."""


class PeerHello(msgspec.Struct, array_like=True, frozen=True, tag=1):
    """First frame a node sends on a connection it dialed to another node."""

    cluster: str
    node_id: str
    nonce: bytes = b""  # the dialer's fresh nonce (see `aether.transport.auth`)
    # The dialer's `Transport.instance` (random, new at every start) and the address its cluster
    # port listens on: the acceptor tells the member restarted (a new instance, which the member's
    # address then answers as) from a second process with the member's id (another instance while
    # the member answers at its address). Empty from a node of an earlier version.
    instance: bytes = b""
    listen: str = ""


class ClientHello(msgspec.Struct, array_like=True, frozen=True, tag=2):
    """First frame a client sends on its connection to a node's cluster port."""

    cluster: str
    client_id: str
    nonce: bytes = b""


class HelloAck(msgspec.Struct, array_like=True, frozen=True, tag=3):
    """Last frame of the handshake: the dialer's proof was accepted; names the accepting node and
    its `Transport.instance` (empty from a node of an earlier version)."""

    node_id: str
    instance: bytes = b""


class Ping(msgspec.Struct, array_like=True, frozen=True, tag=4):
    """Heartbeat, sent on an otherwise idle node-to-node link."""


class Reject(msgspec.Struct, array_like=True, frozen=True, tag=5):
    """Reply to a refused hello (or a malformed first frame); the connection is closed after it.
    `code` says what the dialer should do about it, when anything (`DUPLICATE_NODE`)."""

    reason: str
    code: str = ""


DUPLICATE_NODE: Final = "duplicate_node"
"""`Reject.code`: the dialer's node id is already running in the cluster, as another process at the
member's address; the dialer is a second process with that id and must not run (exit status 2)."""


class Challenge(msgspec.Struct, array_like=True, frozen=True, tag=6):
    """The acceptor's answer to a hello: its nonce and its proof of the secret (empty when open)."""

    node_id: str
    nonce: bytes
    proof: bytes


class Proof(msgspec.Struct, array_like=True, frozen=True, tag=7):
    """The dialer's proof of the secret (empty when open); answered by HelloAck or Reject."""

    proof: bytes


CONTROL_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    PeerHello, ClientHello, HelloAck, Ping, Reject, Challenge, Proof
)  # fmt: skip


def message_types(message_type: object) -> tuple[type[msgspec.Struct], ...]:
    """Flatten a message union (``Union[A, B]``, ``A | B``, a single struct or None) into its members.

    Raises TypeError unless every member is an ``array_like`` msgspec Struct with an integer tag
    >= `FIRST_APP_TAG`; duplicate tags are rejected too.
    """
    if message_type is None:
        return ()
    origin = typing.get_origin(message_type)
    if origin is Union or origin is types.UnionType:
        members: tuple[object, ...] = typing.get_args(message_type)
    else:
        members = (message_type,)
    seen: dict[int, type] = {}
    out: list[type[msgspec.Struct]] = []
    for member in members:
        if not (isinstance(member, type) and issubclass(member, msgspec.Struct)):
            raise TypeError(f"wire message types must be msgspec.Struct subclasses, got {member!r}")
        config = member.__struct_config__
        tag = config.tag
        if not isinstance(tag, int) or isinstance(tag, bool):
            raise TypeError(f"{member.__name__} must have an integer tag (tag={tag!r})")
        if tag < FIRST_APP_TAG:
            raise TypeError(f"{member.__name__} uses tag {tag}; tags below {FIRST_APP_TAG} are reserved")
        if not config.array_like:
            raise TypeError(f"{member.__name__} must be declared with array_like=True")
        if tag in seen:
            raise TypeError(f"{member.__name__} and {seen[tag].__name__} share tag {tag}")
        seen[tag] = member
        out.append(member)
    return tuple(out)


class WireCodec:
    """Encoder + decoder for one message union plus the control messages.

    Build one per Transport / client link (no shared mutable state between them). ``frame``
    returns a complete length-prefixed frame ready to write.
    """

    __slots__ = ("app_types", "decoder", "encoder")

    def __init__(self, app_types: tuple[type[msgspec.Struct], ...]) -> None:
        self.app_types = frozenset(app_types)
        all_types = CONTROL_TYPES + tuple(app_types)
        self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Union[all_types])  # noqa: UP007
        self.encoder = msgspec.msgpack.Encoder()

    def frame(self, msg: object) -> bytes:
        """Encode `msg` and wrap it in a frame."""
        payload = self.encoder.encode(msg)
        if len(payload) > MAX_PAYLOAD:
            return encode_frame(payload)  # raises ValueError
        return frame_header(len(payload)) + payload  # the hot path: no extra call, no copy check

    def decode(self, payload: bytes) -> Any:
        """Decode one payload; raises msgspec.DecodeError (or ValidationError) on bad input."""
        return self.decoder.decode(payload)
