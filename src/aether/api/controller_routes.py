"""Management API endpoints of the layer-1 controller (thin: the node's `ControllerService` does the work).

- `GET /api/v1/controller/status` -> `ControllerStatus`: who runs the controller, dry run, the
  configuration in force, per autoscaled artifact its bounds and their source, its count and who set
  it, the last decision and the cooldowns left; avoided nodes; step timing; webhook counters;
- `GET /api/v1/controller/config` -> `ControllerConfigView` (the TOML text, when and by whom it was
  set, the parsed configuration); `PUT` with the TOML text as body (``application/toml`` or
  ``text/plain``, or JSON ``{"toml": TEXT}``) validates it (400 naming the problem) and stores it
  through consensus (role ``operate``);
- `GET /api/v1/controller/decisions?since=SEQ&limit=N` -> the decisions after `since`, the last N
  (default 100, at most 1000), oldest first;
- `GET /api/v1/controller/decisions/stream?since=SEQ` -> server-sent events: ``event: decision``
  (``id:`` its seq) for each decision after `since`, then each new one as it arrives;
- `GET /api/v1/alerts` -> `AlertsView`: the alert series pending or firing.

Any node answers: the leader from its running controller, the others from the memory and
decisions the leader syncs to them once a second. Decisions and alert transitions also appear in
`GET /api/v1/events` (``controller-decision``, ``alert-firing``, ``alert-resolved``).
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec
from aiohttp import web

from aether.api import sse
from aether.api.common import API_PREFIX, MAX_BODY, json_response, query
from aether.api.routing import PRINCIPAL, Answer, Body, Route, query_param
from aether.controller.service import AlertView, ControllerStatus
from aether.controller.types import Decision
from aether.core.errors import BadRequest
from aether.core.jsonbody import decode_json_body, require_json_content_type

__all__ = ["ROUTES", "AlertsView", "ControllerConfigView", "ControllerRoutes", "SetControllerConfig"]

DECISIONS_LIMIT = 1000
KEEPALIVE_SECONDS = 15.0


class SetControllerConfig(msgspec.Struct, forbid_unknown_fields=True):
    toml: str


class ControllerConfigView(msgspec.Struct, frozen=True):
    """Answer of `GET|PUT /api/v1/controller/config`."""

    text: str
    """The TOML text in force (empty: every default). A stored text that was refused is not shown
    here: `error` says why."""
    updated: float | None
    """When it was set (Unix seconds); null: never set."""
    by: str | None
    """The API key that set it."""
    config: dict[str, Any]
    """The configuration in force, every field (defaults filled in)."""
    error: str | None
    """Why the stored text was refused (the previous configuration stays in force), if it was."""


class AlertsView(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/alerts`."""

    node_id: str
    leader: str | None
    firing: int
    pending: int
    alerts: list[AlertView]


def _int_param(name: str, text: str | None, default: int, lo: int, hi: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}, not {text!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be from {lo} to {hi}, not {value}")
    return value


class ControllerRoutes:
    def __init__(self, service: Any) -> None:
        self.svc = service

    def _config_view(self) -> ControllerConfigView:
        v = self.svc.config_value
        return ControllerConfigView(
            v.text if v is not None else "", v.updated if v is not None else None,
            (v.by or None) if v is not None else None, msgspec.to_builtins(self.svc.config),
            self.svc.config_error,
        )  # fmt: skip

    async def status(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.svc.status())

    async def get_config(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self._config_view())

    async def put_config(self, request: web.Request) -> web.Response:
        query(request, ())
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"config of {len(raw)} bytes exceeds the {MAX_BODY}-byte limit")
        if request.content_type in ("application/toml", "text/plain", "application/octet-stream"):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the controller config is not UTF-8 text") from None
        else:
            require_json_content_type(request.headers.get("Content-Type"))
            try:
                text = msgspec.convert(decode_json_body(raw), SetControllerConfig).toml
            except msgspec.ValidationError as e:
                raise BadRequest(f"invalid request body: {e}; send the TOML text as application/toml "
                                 'or {"toml": TEXT}') from None
        principal = request.get(PRINCIPAL)
        value = await self.svc.set_config_text(text, by=principal.name if principal is not None else "")
        v = self._config_view()
        if v.updated != value.updated:  # the watch has not run yet (it does before the answer, normally)
            from aether.controller.config import parse_config

            v = ControllerConfigView(text, value.updated, value.by or None,
                                     msgspec.to_builtins(parse_config(text)), None)
        return json_response(v)

    async def decisions(self, request: web.Request) -> web.Response:
        q = query(request, ("since", "limit"))
        since = _int_param("since", q.get("since"), 0, 0, 2**62)
        limit = _int_param("limit", q.get("limit"), 100, 1, DECISIONS_LIMIT)
        return json_response(self.svc.decisions(since=since, limit=limit))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        q = query(request, ("since",))
        last = _int_param("since", q.get("since"), 0, 0, 2**62)
        resp = sse.stream_response()
        try:
            await resp.prepare(request)
            next_beat = time.monotonic() + KEEPALIVE_SECONDS
            while True:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                batch: list[Decision] = await self.svc.wait_decisions(last, 1.0)
                for d in batch:
                    await resp.write(sse.frame("decision", d, d.seq))
                    last = max(last, d.seq)
                if batch:
                    next_beat = time.monotonic() + KEEPALIVE_SECONDS
                elif time.monotonic() >= next_beat:
                    await resp.write(sse.KEEPALIVE)
                    next_beat = time.monotonic() + KEEPALIVE_SECONDS
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    async def alerts(self, request: web.Request) -> web.Response:
        query(request, ())
        alerts = self.svc.alerts()
        firing = sum(1 for a in alerts if a.state == "firing")
        return json_response(AlertsView(
            self.svc.node_id, self.svc.leader.leader, firing, len(alerts) - firing, alerts
        ))  # fmt: skip


P = API_PREFIX
_TAGS = ("controller",)
_SINCE = query_param("since", "only decisions with a larger seq (default 0: all)", type="integer", minimum=0)
ROUTES: Final = (
    Route(
        "GET", f"{P}/controller/status", ControllerRoutes.status, "getControllerStatus",
        "The layer-1 controller: where it runs, dry run, configuration, per autoscaled artifact its "
        "bounds (and their source), count (and who set it), last decision and cooldowns; avoided "
        "nodes; step timing; webhook counters",
        {200: Answer(ControllerStatus, "The controller as this node knows it")}, (400,), tags=_TAGS,
    ),
    Route(
        "GET", f"{P}/controller/config", ControllerRoutes.get_config, "getControllerConfig",
        "The controller configuration: TOML text, when and by whom it was set, the parsed values",
        {200: Answer(ControllerConfigView, "The configuration")}, (400,), tags=_TAGS,
    ),
    Route(
        "PUT", f"{P}/controller/config", ControllerRoutes.put_config, "setControllerConfig",
        "Validate and store the controller configuration (TOML; docs/controller.md)",
        {200: Answer(ControllerConfigView, "The configuration stored")}, (400, 503, 504), role="operate",
        body=Body(
            SetControllerConfig, "the TOML text (or send it raw as application/toml or text/plain)",
            alternatives={"application/toml": {"type": "string"}, "text/plain": {"type": "string"}},
        ),
        tags=_TAGS, descriptions={400: "Not valid TOML or not a valid configuration; detail names the key"},
    ),
    Route(
        "GET", f"{P}/controller/decisions", ControllerRoutes.decisions, "listControllerDecisions",
        "The controller's recent decisions (the last 1000 are kept, and survive a change of leader), "
        "oldest first, each with its inputs, the rule that fired and its reason",
        {200: Answer(list[Decision], "Decisions")}, (400,),
        params=(
            _SINCE,
            query_param("limit", f"at most this many, the latest (default 100, at most {DECISIONS_LIMIT})",
                        type="integer", minimum=1, maximum=DECISIONS_LIMIT),
        ),
        tags=_TAGS,
    ),
    Route(
        "GET", f"{P}/controller/decisions/stream", ControllerRoutes.stream, "streamControllerDecisions",
        "Server-sent events: `event: decision` (`id:` its seq) for each decision after `since`, then "
        "each new one as it is made, until the client disconnects",
        {200: Answer(
            {"type": "string"}, "An endless event stream; each data line is a JSON decision",
            media=sse.MEDIA_TYPE,
        )},
        (400,), params=(_SINCE,), tags=_TAGS,
    ),
    Route(
        "GET", f"{P}/alerts", ControllerRoutes.alerts, "listAlerts",
        "Alert series pending (condition met, `for` not yet over) or firing, firing first",
        {200: Answer(AlertsView, "Alerts")}, (400,), tags=_TAGS,
    ),
)
"""The controller endpoints (served when the node runs a controller service)."""
