"""Management API endpoints of fault injection (thin: the node's `aether.node.faults.FaultInjector`
does the work), for Aether Forge and tests (docs/management-api.md, *Fault injection*):

- `GET /api/v1/faults` -> `FaultsView`: whether the node accepts faults, the fault of each link
  (by peer) and of each artifact's instances here;
- `PUT /api/v1/faults/links/{peer}` with a `LinkFault` -> the fault stored: every frame this node
  sends to `peer` is delayed, dropped or blocked; `DELETE` heals that link;
- `PUT /api/v1/faults/slices/{artifact}` with a `SliceFault` -> the fault and the instances of the
  artifact (coordinates) running here that got it; `DELETE` removes it;
- `DELETE /api/v1/faults` heals everything on this node.

Every write needs the admin role and a node started with ``--fault-injection``: otherwise 403, its
detail saying so (a production node cannot be broken through its API). 404 names a peer that is
not a member (or is this node) and an artifact with no instance here; 400 names a bad field.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from aether.api.common import API_PREFIX, json_response, query, read_body
from aether.api.routing import PRINCIPAL, Answer, Body, Route, path_param
from aether.core.errors import StatusError
from aether.node.faults import DISABLED, FaultsView, LinkFault, SliceFault, SliceFaultView

__all__ = ["ROUTES", "FaultRoutes"]


class FaultRoutes:
    def __init__(self, faults: Any) -> None:
        self.faults = faults

    def _writable(self, request: web.Request) -> str | None:
        """The caller's key name; 403 before anything else when the node refuses faults."""
        if not self.faults.enabled:
            raise StatusError(DISABLED, status=403)
        query(request, ())
        principal = request.get(PRINCIPAL)
        return principal.name if principal is not None else None

    async def get(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.faults.view())

    async def clear_all(self, request: web.Request) -> web.Response:
        by = self._writable(request)
        return json_response(self.faults.clear_all(by=by))

    async def put_link(self, request: web.Request) -> web.Response:
        by = self._writable(request)
        fault = await read_body(request, LinkFault)
        return json_response(self.faults.set_link(request.match_info["peer"], fault, by=by))

    async def delete_link(self, request: web.Request) -> web.Response:
        by = self._writable(request)
        return json_response(self.faults.clear_link(request.match_info["peer"], by=by))

    async def put_slice(self, request: web.Request) -> web.Response:
        by = self._writable(request)
        fault = await read_body(request, SliceFault)
        return json_response(self.faults.set_slice(request.match_info["artifact"], fault, by=by))

    async def delete_slice(self, request: web.Request) -> web.Response:
        by = self._writable(request)
        return json_response(self.faults.clear_slice(request.match_info["artifact"], by=by))


P = API_PREFIX
_TAGS = ("faults",)
_PEER = path_param("peer", "a member's node id (not this node's)")
_ARTIFACT = path_param("artifact", "artifact coordinates GROUP:ARTIFACT:VERSION with instances on this node")
_WRITE_ERRORS = {403: "The node runs without --fault-injection (the detail says so), or the key is not admin"}
ROUTES: Final = (
    Route(
        "GET", f"{P}/faults", FaultRoutes.get, "getFaults",
        "The faults this node injects: whether it accepts any (`enabled`), each link's (by peer) and "
        "each artifact's (with the instances that have it)",
        {200: Answer(FaultsView, "The faults of this node")}, (400,), tags=_TAGS,
    ),
    Route(
        "DELETE", f"{P}/faults", FaultRoutes.clear_all, "clearFaults",
        "Heal every link and every slice instance of this node",
        {200: Answer(FaultsView, "The faults left (none)")}, (400,), role="admin", tags=_TAGS,
        descriptions=_WRITE_ERRORS,
    ),
    Route(
        "PUT", f"{P}/faults/links/{{peer}}", FaultRoutes.put_link, "setLinkFault",
        "Delay (with jitter), drop (loss) or block every frame this node sends to a peer, heartbeats "
        "included; it replaces the link's previous fault. Block both directions (on both nodes) for a "
        "clean partition",
        {200: Answer(LinkFault, "The fault stored")}, (400, 404), role="admin",
        body=Body(LinkFault, "the fault (every field optional)"), params=(_PEER,), tags=_TAGS,
        descriptions={**_WRITE_ERRORS, 400: "A field is invalid (the detail names it)",
                      404: "The peer is not a member, or is this node"},
    ),
    Route(
        "DELETE", f"{P}/faults/links/{{peer}}", FaultRoutes.delete_link, "clearLinkFault",
        "Heal the link to a peer (frames already delayed still leave at their time)",
        {200: Answer(FaultsView, "The faults left")}, (400, 404), role="admin", params=(_PEER,), tags=_TAGS,
        descriptions={**_WRITE_ERRORS, 404: "The peer is not a member, or is this node"},
    ),
    Route(
        "PUT", f"{P}/faults/slices/{{artifact}}", FaultRoutes.put_slice, "setSliceFault",
        "Make the instances of an artifact running on this node now fail calls (`error_rate`), slow "
        "them (`delay_ms`) or fail their health checks (`unhealthy`); instances started later are "
        "healthy (a controller replacement heals it)",
        {200: Answer(SliceFaultView, "The fault and the instances that got it")}, (400, 404), role="admin",
        body=Body(SliceFault, "the fault (every field optional; error_rate defaults to 1)"),
        params=(_ARTIFACT,), tags=_TAGS,
        descriptions={**_WRITE_ERRORS, 400: "Invalid coordinates or field (the detail names it)",
                      404: "No instance of the artifact runs on this node"},
    ),
    Route(
        "DELETE", f"{P}/faults/slices/{{artifact}}", FaultRoutes.delete_slice, "clearSliceFault",
        "Remove the fault of an artifact's instances on this node",
        {200: Answer(FaultsView, "The faults left")}, (400,), role="admin", params=(_ARTIFACT,), tags=_TAGS,
        descriptions={**_WRITE_ERRORS, 400: "Invalid coordinates"},
    ),
)
"""The fault injection endpoints (served when the node has a fault injector: every real node)."""
