"""The small interfaces the invoker is written against (structural `Protocol`s, nothing concrete).

`aether.invoke` must not import the slices or deploy packages (they are written concurrently and
sit beside it in the layering), so it names only what it needs from them here:

- `LocalSlices` — this node's slice runtime (``SliceRuntime`` in ``aether.slices``, or an adapter);
- `Registry` / `Endpoint` — the endpoint cache (``EndpointRegistry`` in ``aether.deploy``);
- `Catalog` — the store's view of a target without reachable instances (`aether.invoke.catalog`);
- `Traffic` — the rollouts' traffic weights between versions (``TrafficTable`` in ``aether.deploy``);
- `PeerSender` / `PeerLink` — the node-to-node transport (`aether.transport.Transport` fits both).

This module imports nothing from `aether`; implementations are matched structurally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Catalog", "Endpoint", "LocalSlices", "PeerLink", "PeerSender", "Registry", "Traffic"]


@runtime_checkable
class LocalSlices(Protocol):
    """This node's running slice instances.

    `local_instances` and `call` accept the same target forms as the registry: full coordinates
    ``group:artifact:version`` or ``group:artifact`` (the invoker passes the caller's target on the
    local path, and the full coordinates chosen by the remote caller on the server path).

    `call` raises an exception whose `wire_kind` is ``no_instance`` when no ACTIVE local instance can
    take the call (``NoLocalInstance``), ``unknown_entry`` when the artifact has no such entry point
    (``UnknownEntry``), and `aether.core.errors.BadRequest` when the payload does not decode; anything
    else counts as the slice's own failure (`aether.core.errors.wire_kind_of`: the errors declare
    their kinds, so this package needs no import of the slices package).
    """

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        """Run `method` of a local ACTIVE instance of `artifact` on `payload`; returns the encoded result."""
        ...

    def local_instances(self, target: str) -> list[int]:
        """Instance numbers of ACTIVE local instances matching `target` (empty if none)."""
        ...

    def has_room(self, target: str, method: str) -> bool:
        """True when a local instance of `target` would run a call of `method` at once (one without
        a concurrency limit always would); False when every one is at its limit (calls would queue)
        or there is none (the invoker asks this first, `local_instances` only when it is False)."""
        ...


class Endpoint(Protocol):
    """One ACTIVE endpoint as the registry reports it (``EndpointInfo``).

    It may also have a ``policy`` attribute: the entry's `aether.core.policy.EntryPolicy` as its
    node published it; the invoker reads it with ``getattr`` (endpoints without one: the defaults)."""

    @property
    def artifact(self) -> str:
        """Full coordinates ``group:artifact:version``."""
        ...

    @property
    def method(self) -> str: ...

    @property
    def instance(self) -> int: ...

    @property
    def node_id(self) -> str: ...


class Registry(Protocol):
    """Discovery: where the ACTIVE instances of an entry point are."""

    def instances(self, target: str, method: str) -> Sequence[Endpoint]:
        """ACTIVE endpoints of `method` of `target` (``group:artifact`` or full coordinates)."""
        ...


class PeerSender(Protocol):
    """Sends a message to one peer node; False means the peer is not up and the message was dropped."""

    def send(self, peer: str, msg: object) -> bool: ...


class PeerLink(PeerSender, Protocol):
    """A `PeerSender` that also reports which peers are up (`aether.transport.Transport` is one)."""

    @property
    def up_peers(self) -> frozenset[str]: ...


class Catalog(Protocol):
    """What the store knows about a target that has no reachable instance (``StoreCatalog``)."""

    def presence(self, target: str, method: str) -> tuple[str, str]:
        """``(state, detail)``: state is one of the `aether.invoke.catalog` constants."""
        ...


@runtime_checkable
class Traffic(Protocol):
    """The traffic split between the versions of an artifact during a rollout (``TrafficTable``)."""

    def weights(self, group_artifact: str) -> Mapping[str, int]:
        """Version -> non-negative weight for calls to `group_artifact` (empty: no split; an
        unlisted version has weight 0). Asked on every call: must be one dict lookup."""
        ...
