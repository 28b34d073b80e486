"""Transport layer: how nodes and clients talk.

Owns length-prefixed framing (`framing`, pure), the typed wire codec and control messages
(`messages`), TCP links between nodes with heartbeats, reconnects and peer liveness (`tcp`),
client sessions on the cluster port and the client-side connector (`client`), topology events
(`events`), the in-process typed `EventBus` (`bus`) and the link faults a node may inject in
what it sends (`faults`, pure; applied by `tcp`).

May import only `aether.core`. Nothing here keeps module-level mutable state, so any number of
`Transport` objects can run in one process and event loop.
"""

from aether.transport.bus import EventBus
from aether.transport.client import ClientLink, ConnectionRejected, open_client_connection
from aether.transport.events import DuplicateNode, PeerDown, PeerUp, QuorumChanged, TransportEvent
from aether.transport.faults import LinkFault
from aether.transport.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameTooLarge, encode_frame
from aether.transport.messages import (
    CONTROL_TYPES,
    DUPLICATE_NODE,
    FIRST_APP_TAG,
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
from aether.transport.tcp import ClientSession, Transport

__all__ = [
    "CONTROL_TYPES",
    "DEFAULT_MAX_FRAME",
    "DUPLICATE_NODE",
    "FIRST_APP_TAG",
    "Challenge",
    "ClientHello",
    "ClientLink",
    "ClientSession",
    "ConnectionRejected",
    "DuplicateNode",
    "EventBus",
    "FrameDecoder",
    "FrameTooLarge",
    "HelloAck",
    "LinkFault",
    "PeerDown",
    "PeerHello",
    "PeerUp",
    "Ping",
    "Proof",
    "QuorumChanged",
    "Reject",
    "Transport",
    "TransportEvent",
    "WireCodec",
    "encode_frame",
    "message_types",
    "open_client_connection",
]
