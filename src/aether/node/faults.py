"""`FaultInjector`: the faults one node injects on purpose, for Aether Forge and tests.

The management API's ``/api/v1/faults`` (`aether.api.fault_routes`) drives it. It owns nothing
itself: link faults live in the transport (`aether.transport.faults`: latency, jitter, loss and
partitions applied to what this node sends to a peer) and slice faults in the slice runtime
(`aether.slices.faults`: calls failing or slowed down, health checks failing). It adds what the
API needs around them:

- the switch: a node started without ``fault_injection`` (``aether node --fault-injection``,
  ``fault_injection = true`` in aether.toml) refuses every change with 403, so a production
  node cannot be broken through its API; reading (`view`) always works and says ``enabled``;
- answers naming what is wrong: 404 for a peer that is not a member (or is this node) or an
  artifact with no instance here, 400 for invalid coordinates;
- loud changes: every change is logged at WARNING and published on the node's event bus as a
  `FaultChanged` (the event stream shows it as ``fault``, so Forge's timeline does).

Faults are this node's only and are not persisted: a restart clears them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec

from aether.core.artifact import Artifact
from aether.core.errors import StatusError
from aether.slices.errors import NoLocalInstance
from aether.slices.faults import SliceFault
from aether.transport.faults import LinkFault

__all__ = [
    "DISABLED", "FaultChanged", "FaultInjector", "FaultsView", "LinkFault", "SliceFault", "SliceFaultView",
]

DISABLED = "fault injection is off on this node; start it with --fault-injection"


class SliceFaultView(msgspec.Struct, frozen=True):
    """A slice fault with the instances that have it (none left once they were all replaced)."""

    error_rate: float
    delay_ms: float
    unhealthy: bool
    instances: list[int]


class FaultsView(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/faults`: the faults this node injects now."""

    node_id: str
    enabled: bool
    """False: the node was started without ``--fault-injection`` and refuses changes."""
    links: dict[str, LinkFault]
    """By peer id: the fault of the frames this node sends to that peer."""
    slices: dict[str, SliceFaultView]
    """By artifact coordinates: the fault of its instances on this node."""


class FaultChanged(msgspec.Struct, frozen=True):
    """A fault was set or cleared on a node (published on its event bus; event ``fault``)."""

    node: str
    action: Literal["set", "cleared"]
    target: Literal["link", "slice", "all"]
    peer: str | None = None
    artifact: str | None = None
    fault: dict[str, Any] | None = None
    instances: list[int] | None = None
    by: str | None = None
    """The API key that asked (its name)."""


class _Links(Protocol):
    def set_link_fault(self, peer: str, fault: LinkFault | None) -> None: ...

    def link_faults(self) -> dict[str, LinkFault]: ...

    def clear_faults(self) -> None: ...


class _Slices(Protocol):
    def inject_fault(self, artifact: Artifact, fault: SliceFault) -> list[int]: ...

    def clear_fault(self, artifact: Artifact) -> bool: ...

    def faults(self) -> dict[Artifact, tuple[SliceFault, list[int]]]: ...


class FaultInjector:
    """See the module docstring. `links` is the node's transport, `slices` its slice runtime,
    `publish` its event bus's ``publish``."""

    def __init__(
        self,
        node_id: str,
        *,
        enabled: bool,
        links: _Links,
        slices: _Slices,
        publish: Callable[[Any], object] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.node_id = node_id
        self.enabled = enabled
        self._links = links
        self._slices = slices
        self._publish = publish
        self.log = logger or logging.getLogger(f"aether.faults.{node_id}")

    # --- reading ----------------------------------------------------------------------------------

    def view(self) -> FaultsView:
        slices = {
            str(a): SliceFaultView(f.error_rate, f.delay_ms, f.unhealthy, ids)
            for a, (f, ids) in self._slices.faults().items()
        }
        return FaultsView(self.node_id, self.enabled, dict(sorted(self._links.link_faults().items())), slices)

    # --- changes ----------------------------------------------------------------------------------

    def set_link(self, peer: str, fault: LinkFault, *, by: str | None = None) -> LinkFault:
        """Apply `fault` to what this node sends to `peer` (replacing its previous fault)."""
        self._require_enabled()
        self._set_link(peer, fault)
        self.log.warning("[%s] FAULT on the link to %s: %s%s", self.node_id, peer, fault.describe(), _by(by))
        self._event(FaultChanged(
            self.node_id, "set", "link", peer=peer, fault=msgspec.to_builtins(fault), by=by
        ))  # fmt: skip
        return fault

    def clear_link(self, peer: str, *, by: str | None = None) -> FaultsView:
        """Heal the link to `peer` (no error if it had no fault)."""
        self._require_enabled()
        had = peer in self._links.link_faults()
        self._set_link(peer, None)
        if had:
            self.log.warning("[%s] fault on the link to %s cleared%s", self.node_id, peer, _by(by))
            self._event(FaultChanged(self.node_id, "cleared", "link", peer=peer, by=by))
        return self.view()

    def set_slice(self, artifact: str, fault: SliceFault, *, by: str | None = None) -> SliceFaultView:
        """Give `fault` to the instances of `artifact` (coordinates) running here now."""
        self._require_enabled()
        coords = Artifact.parse(artifact)  # BadRequest (400) naming the problem
        try:
            ids = self._slices.inject_fault(coords, fault)
        except NoLocalInstance:
            raise StatusError(
                f"no instance of {coords} runs on {self.node_id}: a slice fault applies to the "
                "instances running on the node it is sent to (GET /api/v1/slices shows where they run)",
                status=404,
            ) from None
        self.log.warning(
            "[%s] FAULT on %s instances %s: %s%s", self.node_id, coords, ids, fault.describe(), _by(by)
        )
        self._event(FaultChanged(
            self.node_id, "set", "slice", artifact=str(coords), fault=msgspec.to_builtins(fault),
            instances=ids, by=by,
        ))  # fmt: skip
        return SliceFaultView(fault.error_rate, fault.delay_ms, fault.unhealthy, ids)

    def clear_slice(self, artifact: str, *, by: str | None = None) -> FaultsView:
        """Remove the fault of `artifact`'s instances (no error if it had none)."""
        self._require_enabled()
        coords = Artifact.parse(artifact)
        if self._slices.clear_fault(coords):
            self.log.warning("[%s] fault on %s cleared%s", self.node_id, coords, _by(by))
            self._event(FaultChanged(self.node_id, "cleared", "slice", artifact=str(coords), by=by))
        return self.view()

    def clear_all(self, *, by: str | None = None) -> FaultsView:
        """Heal every link and every slice of this node."""
        self._require_enabled()
        links = self._links.link_faults()
        slices = self._slices.faults()
        self._links.clear_faults()
        for artifact in slices:
            self._slices.clear_fault(artifact)
        if links or slices:
            self.log.warning(
                "[%s] every fault cleared (links to %s; slices %s)%s", self.node_id,
                ", ".join(sorted(links)) or "none", ", ".join(str(a) for a in slices) or "none", _by(by),
            )  # fmt: skip
            self._event(FaultChanged(self.node_id, "cleared", "all", by=by))
        return self.view()

    # --- internals --------------------------------------------------------------------------------

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise StatusError(DISABLED, status=403)

    def _set_link(self, peer: str, fault: LinkFault | None) -> None:
        try:
            self._links.set_link_fault(peer, fault)
        except KeyError:
            what = "this node itself" if peer == self.node_id else "not a member of the cluster"
            raise StatusError(
                f"no link from {self.node_id} to {peer!r}: {what} (GET /api/v1/nodes lists the members)",
                status=404,
            ) from None

    def _event(self, ev: FaultChanged) -> None:
        if self._publish is not None:
            self._publish(ev)


def _by(name: str | None) -> str:
    return f" (by {name})" if name else ""
