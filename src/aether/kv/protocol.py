"""Client <-> node messages on the cluster port (integer tags 30-39), and what clients may touch.

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


class ClientMembers(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=33):
    """Ask for the member set (what `aether node --join` asks a member); the answer's `result`
    is an encoded `MembersInfo`."""

    id: int


class MembersInfo(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The member set a node knows: its epoch, members with their cluster addresses (`HOST:PORT`),
    and a pending set (committed, not yet in effect) if any."""

    epoch: int
    members: list[tuple[str, str]]
    pending: list[tuple[str, str]] | None = None


ClientMessage = Union[ClientRequest, ClientReadLocal, ClientMembers]  # noqa: UP007

CLIENT_KEY_PREFIXES = ("user/",)
"""Key families an external client on the cluster port may read and write. Every other family
(blueprints/, slices/, endpoints/, routes/, maps/, ...) is written only by the nodes themselves,
through the management API's checked operations."""


def client_key_refusal(key: str) -> str | None:
    """None if an external client may use `key`, else the error to answer with."""
    if key in CLIENT_KEY_PREFIXES:
        # checked here, before the command is proposed, not in `parse_key`: the replicated state
        # machine records parse_key's text in its results, which replicas of another version
        # must record alike
        return f"invalid key {key!r}: nothing after {key!r}; expected {key}NAME"
    if key.startswith(CLIENT_KEY_PREFIXES):
        return None
    if "/" not in key:
        return (f"key {key[:200]!r} has no key family: clients on the cluster port may use only user/ "
                "keys (user/NAME)")
    family = key.split("/", 1)[0] + "/"
    return (
        f"key {key[:200]!r}: clients on the cluster port may use only user/ keys; {family} belongs to "
        "the cluster and is changed through the management API (aether deploy, aether blueprint, ...)"
    )
ServerMessage = Union[ClientResponse]  # noqa: UP007
