"""Client <-> node messages on the cluster port (integer tags 30-39).

A client sends encoded `Command`s (see `aether.kv.machine`) with a request id; the node
commits them through consensus and answers with the encoded `Result`, or an error kind:
"quorum" (no quorum; retry elsewhere), "timeout" (outcome unknown), "bad_request".
"""

from __future__ import annotations

from typing import Union

import msgspec


class ClientRequest(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=30):
    id: int
    command: bytes


class ClientResponse(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=31):
    id: int
    result: bytes | None = None
    error: str | None = None
    kind: str | None = None


class ClientReadLocal(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=32):
    """A non-linearizable read of this node's applied state (cheap diagnostics)."""

    id: int
    key: str


ClientMessage = Union[ClientRequest, ClientReadLocal]  # noqa: UP007
ServerMessage = Union[ClientResponse]  # noqa: UP007
