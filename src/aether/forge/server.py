"""Forge's HTTP server: the dashboard page, its REST API and the API's OpenAPI document.

Every control of the page is an endpoint here, declared once as a `aether.api.routing.Route` (so
the OpenAPI document at `GET /api/openapi.json` is built from the same list the server registers,
like the management API's). The handlers only parse, delegate and answer: the cluster controls go
to the supervisor, the load controls to the load generator, both reached through the `Forge`
protocol below (the `aether.forge.app.Forge` object, or a fake in tests).

Authentication: Forge prints its URL with a random token (`http://127.0.0.1:8888/?token=T`, like
Jupyter). Opening it sets an HttpOnly, SameSite=Strict cookie and redirects to the bare URL; the
API accepts that cookie or `Authorization: Bearer T`. Anything else answers 401 (a problem
document; the page itself says how to get in). Writes from another origin (an `Origin` header
naming another host) are refused with 403. Request bodies are capped at 64 KiB before anything
else happens.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from aether.api.common import json_response, problem_answer, query, read_body
from aether.api.openapi import build_openapi
from aether.api.routing import Answer, Body, Route, path_param, query_param, register
from aether.core.errors import BadRequest, StatusError, Unauthorized
from aether.core.problem import is_internal, problem_for, problem_headers
from aether.forge.load import FailedRequest

__all__ = [
    "COOKIE",
    "STATIC_DIR",
    "ActionResult",
    "FailuresAnswer",
    "Forge",
    "ForgeServer",
    "LinkBody",
    "PartitionBody",
    "RampBody",
    "RateBody",
    "SliceFailBody",
    "UpdateBody",
    "build_forge_openapi",
]

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).parent / "static"
COOKIE: Final = "aether_forge_token"
MAX_BODY: Final = 64 * 1024
P: Final = "/api"
TRACE_CONTENT_TYPE: Final = "application/x-ndjson"


# -- bodies and answers ----------------------------------------------------------------------------


class ActionResult(msgspec.Struct, kw_only=True):
    """What a control did: a sentence for the status line, and the node it concerned."""

    ok: bool = True
    message: str
    node: str | None = None


class PartitionBody(msgspec.Struct, forbid_unknown_fields=True):
    """Split the nodes into groups that cannot reach each other (nodes not named form one more
    group)."""

    groups: list[list[str]]


class LinkBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Latency and loss on the link from `src` to `dst` (and back, with `both_ways`)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    both_ways: bool = True


class SliceFailBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Make the instances of a slice on one node fail (default: the first up node running it)."""

    node: str | None = None
    error_rate: float = 1.0
    delay_ms: float = 0.0
    unhealthy: bool = False


class UpdateBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Roll a slice over to `version` (a rollout: new instances first, traffic shifted, old ones
    drained; health gates and automatic rollback), with the blueprint's rollout settings or
    `strategy`."""

    version: str
    strategy: str | None = None


UPDATE_STRATEGIES: Final = ("rolling", "canary", "blue-green")


class RateBody(msgspec.Struct, forbid_unknown_fields=True):
    """The load generator's total rate, requests per second."""

    rate: float


class RampBody(msgspec.Struct, forbid_unknown_fields=True):
    """Go linearly from the current rate to `to` requests per second over `seconds`."""

    to: float
    seconds: float


class EventsAnswer(msgspec.Struct):
    """The timeline's events numbered above `since`, oldest first (at most its last 1000), and
    `next`: the number of the latest event (0 before any), to ask `since=next` next time. A `next`
    below the `since` asked means the numbering started again (another Forge on the same port)."""

    events: list[Any]
    next: int


class FailuresAnswer(msgspec.Struct):
    """The load generator's kept failed requests numbered above `after`, oldest first (at most its
    last 200), and `next`: the number of the latest failure (0 before any), to ask `after=next`
    next time. A `next` below the `after` asked means the numbering started again."""

    failures: list[FailedRequest]
    next: int


class SeriesAnswer(msgspec.Struct):
    points: list[Any]


class StateAnswer(msgspec.Struct):
    cluster: Any
    load: Any
    max_rate: float = 2000.0
    """The highest rate `PUT /api/load/rate` accepts (the dashboard's slider range)."""


def _finite(name: str, value: float, lo: float, hi: float) -> float:
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo:g} and {hi:g}, not {value!r}")
    return value


# -- what the server drives ------------------------------------------------------------------------


class Forge(Protocol):
    """The Forge the server drives (`aether.forge.app.Forge`)."""

    max_rate: float

    def state(self) -> StateAnswer: ...
    def series(self, since: float) -> list[Any]: ...
    def events(self, since: int) -> tuple[list[Any], int]: ...
    def failures(self, after: int) -> tuple[list[FailedRequest], int]: ...
    async def node_action(self, node: str, action: str) -> ActionResult: ...
    async def kill_leader(self) -> ActionResult: ...
    async def add_node(self) -> ActionResult: ...
    async def remove_node(self, node: str) -> ActionResult: ...
    async def rolling_restart(self) -> ActionResult: ...
    async def partition(self, groups: list[list[str]]) -> ActionResult: ...
    async def isolate(self, node: str) -> ActionResult: ...
    async def heal(self) -> ActionResult: ...
    async def set_link(self, src: str, dst: str, body: LinkBody) -> ActionResult: ...
    async def fail_slice(self, artifact: str, body: SliceFailBody) -> ActionResult: ...
    async def heal_slice(self, artifact: str) -> ActionResult: ...
    async def update(self, artifact: str, body: UpdateBody) -> ActionResult: ...
    def set_rate(self, rate: float) -> ActionResult: ...
    def ramp(self, to: float, seconds: float) -> ActionResult: ...
    def pause(self) -> ActionResult: ...
    def resume(self) -> ActionResult: ...
    def trace(self) -> bytes: ...
    def replay(self, trace: bytes, speed: float) -> ActionResult: ...


NODE_ACTIONS: Final = ("kill", "crash", "stop", "restart")


class _Routes:
    def __init__(self, forge: Forge) -> None:
        self.forge = forge

    async def state(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.forge.state())

    async def series(self, request: web.Request) -> web.Response:
        q = query(request, ("since",))
        since = _number_param(q, "since", 0.0)
        return json_response(SeriesAnswer(self.forge.series(since)))

    async def events(self, request: web.Request) -> web.Response:
        q = query(request, ("since",))
        since = int(_number_param(q, "since", 0))
        events, nxt = self.forge.events(since)
        return json_response(EventsAnswer(events, nxt))

    async def failures(self, request: web.Request) -> web.Response:
        q = query(request, ("after",))
        after = _count_param(q, "after", 0)
        failures, nxt = self.forge.failures(after)
        return json_response(FailuresAnswer(failures, nxt))

    async def node_action(self, request: web.Request) -> web.Response:
        query(request, ())
        action = request.match_info["action"]
        if action not in NODE_ACTIONS:
            raise BadRequest(f"unknown node action {action!r}; one of: {', '.join(NODE_ACTIONS)}")
        return json_response(await self.forge.node_action(request.match_info["id"], action))

    async def kill_leader(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.kill_leader())

    async def add_node(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.add_node(), status=201)

    async def remove_node(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.remove_node(request.match_info["id"]))

    async def rolling_restart(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.rolling_restart(), status=202)

    async def partition(self, request: web.Request) -> web.Response:
        query(request, ())
        body: PartitionBody = await read_body(request, PartitionBody)
        return json_response(await self.forge.partition(body.groups))

    async def isolate(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.isolate(request.match_info["id"]))

    async def heal(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.heal())

    async def set_link(self, request: web.Request) -> web.Response:
        query(request, ())
        body: LinkBody = await read_body(request, LinkBody)
        _finite("delay_ms", body.delay_ms, 0, 60_000)
        _finite("jitter_ms", body.jitter_ms, 0, 60_000)
        _finite("loss", body.loss, 0, 1)
        src, dst = request.match_info["src"], request.match_info["dst"]
        return json_response(await self.forge.set_link(src, dst, body))

    async def fail_slice(self, request: web.Request) -> web.Response:
        query(request, ())
        body: SliceFailBody = await read_body(request, SliceFailBody)
        _finite("error_rate", body.error_rate, 0, 1)
        _finite("delay_ms", body.delay_ms, 0, 60_000)
        return json_response(await self.forge.fail_slice(request.match_info["artifact"], body))

    async def heal_slice(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(await self.forge.heal_slice(request.match_info["artifact"]))

    async def update(self, request: web.Request) -> web.Response:
        query(request, ())
        body: UpdateBody = await read_body(request, UpdateBody)
        if not body.version.strip():
            raise BadRequest("version must not be empty (e.g. 0.1.1)")
        if body.strategy is not None and body.strategy not in UPDATE_STRATEGIES:
            raise BadRequest(
                f"unknown strategy {body.strategy!r}; one of: {', '.join(UPDATE_STRATEGIES)}"
            )
        return json_response(await self.forge.update(request.match_info["artifact"], body), status=202)

    async def set_rate(self, request: web.Request) -> web.Response:
        query(request, ())
        body: RateBody = await read_body(request, RateBody)
        _finite("rate", body.rate, 0, self.forge.max_rate)
        return json_response(self.forge.set_rate(body.rate))

    async def ramp(self, request: web.Request) -> web.Response:
        query(request, ())
        body: RampBody = await read_body(request, RampBody)
        _finite("to", body.to, 0, self.forge.max_rate)
        _finite("seconds", body.seconds, 0, 3600)
        return json_response(self.forge.ramp(body.to, body.seconds))

    async def pause(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.forge.pause())

    async def resume(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.forge.resume())

    async def trace(self, request: web.Request) -> web.Response:
        query(request, ())
        return web.Response(body=self.forge.trace(), content_type=TRACE_CONTENT_TYPE)

    async def replay(self, request: web.Request) -> web.Response:
        q = query(request, ("speed",))
        speed = _finite("speed", _number_param(q, "speed", 1.0), 0.01, 1000)
        raw = await request.read()
        if not raw.strip():
            raise BadRequest("POST /api/load/replay needs a trace (the body of GET /api/load/trace)")
        return json_response(self.forge.replay(raw, speed))


def _number_param(q: dict[str, str], name: str, default: float) -> float:
    text = q.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name} must be a finite number >= 0, not {text!r}")
    return value


_DIGITS: Final = re.compile(r"[0-9]+", re.ASCII)


def _count_param(q: dict[str, str], name: str, default: int) -> int:
    """A whole number >= 0 (a sequence number) from the query, else 400 naming `name`."""
    text = q.get(name)
    if text is None:
        return default
    value = None
    if _DIGITS.fullmatch(text):
        try:
            value = int(text)
        except ValueError:  # more digits than Python converts
            pass
    if value is None:
        raise BadRequest(f"{name} must be a whole number >= 0 (a sequence number), not {text[:40]!r}")
    return value


_ID = path_param("id", "a node id (node-K)")
_OK = {200: Answer(ActionResult, "Done; `message` says what happened")}
_CTL = ("control",)

ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", f"{P}/state", _Routes.state, "getState",
          "The cluster as Forge sees it (nodes, leader, links, placement, controller) and the load",
          {200: Answer(StateAnswer, "Cluster and load")}, (400,), tags=("observe",)),
    Route("GET", f"{P}/series", _Routes.series, "getSeries",
          "Per-second throughput, success rate, p50 and p99 (total, per target, per node)",
          {200: Answer(SeriesAnswer, "Points after `since` (unix seconds)")}, (400,),
          params=(query_param("since", "unix time; only points after it"),), tags=("observe",)),
    Route("GET", f"{P}/events", _Routes.events, "getEvents",
          "The event timeline: Forge's actions, node state changes, the cluster's events",
          {200: Answer(EventsAnswer, "Events after sequence number `since`; `next` for the next call")},
          (400,), params=(query_param("since", "sequence number; only events after it"),),
          tags=("observe",)),
    Route("POST", f"{P}/nodes/{{id}}/{{action}}", _Routes.node_action, "nodeAction",
          "kill (SIGKILL), crash (SIGSTOP: frozen with its connections open, as a crashed machine "
          "looks to its peers), stop (graceful) or restart a node",
          _OK, (400, 404, 409),
          params=(_ID, path_param("action", "kill, crash, stop or restart", enum=list(NODE_ACTIONS))),
          role="operate", tags=_CTL),
    Route("POST", f"{P}/leader/kill", _Routes.kill_leader, "killLeader", "SIGKILL the current leader",
          _OK, (409,), role="operate", tags=_CTL),
    Route("POST", f"{P}/nodes", _Routes.add_node, "addNode",
          "Start a new node, let it join and add it to the member set",
          {201: Answer(ActionResult, "Added")}, (409, 503), role="operate", tags=_CTL),
    Route("DELETE", f"{P}/nodes/{{id}}", _Routes.remove_node, "removeNode",
          "Remove a node from the member set, then stop it", _OK, (404, 409, 503),
          params=(_ID,), role="operate", tags=_CTL),
    Route("POST", f"{P}/rolling-restart", _Routes.rolling_restart, "rollingRestart",
          "Restart every node, one at a time, waiting for each to be ready (runs in the background)",
          {202: Answer(ActionResult, "Started")}, (409,), role="operate", tags=_CTL),
    Route("POST", f"{P}/network/partition", _Routes.partition, "partition",
          "Split the nodes into groups that cannot reach each other",
          _OK, (400, 404), body=Body(PartitionBody), role="operate", tags=_CTL),
    Route("POST", f"{P}/network/isolate/{{id}}", _Routes.isolate, "isolate",
          "Cut one node off from all the others", _OK, (404,), params=(_ID,), role="operate", tags=_CTL),
    Route("POST", f"{P}/network/heal", _Routes.heal, "heal",
          "Remove every partition, latency and loss", _OK, (), role="operate", tags=_CTL),
    Route("PUT", f"{P}/network/links/{{src}}/{{dst}}", _Routes.set_link, "setLink",
          "Latency, jitter and loss on a link (injected in the nodes' transport)", _OK, (400, 404),
          params=(path_param("src", "sending node"), path_param("dst", "receiving node")),
          body=Body(LinkBody), role="operate", tags=_CTL),
    Route("POST", f"{P}/slices/{{artifact}}/fail", _Routes.fail_slice, "failSlice",
          "Make a slice's instances on one node fail, slow down or report unhealthy", _OK,
          (400, 404), params=(path_param("artifact", "group:name:version"),),
          body=Body(SliceFailBody), role="operate", tags=_CTL),
    Route("POST", f"{P}/slices/{{artifact}}/heal", _Routes.heal_slice, "healSlice",
          "Remove the faults of a slice everywhere", _OK, (400, 404),
          params=(path_param("artifact", "group:name:version"),), role="operate", tags=_CTL),
    Route("POST", f"{P}/slices/{{artifact}}/update", _Routes.update, "updateSlice",
          "Roll a slice over to another version under load (POST /api/v1/rollouts on a node); its "
          "steps show in the timeline as `cluster:rollout` events",
          {202: Answer(ActionResult, "Started")}, (400, 409, 503),
          params=(path_param("artifact", "group:name (a version in it is ignored)"),),
          body=Body(UpdateBody), role="operate", tags=_CTL),
    Route("PUT", f"{P}/load/rate", _Routes.set_rate, "setRate", "Set the load generator's total rate",
          _OK, (400, 409), body=Body(RateBody), role="operate", tags=("load",)),
    Route("POST", f"{P}/load/ramp", _Routes.ramp, "ramp", "Ramp the load linearly to a rate",
          _OK, (400, 409), body=Body(RampBody), role="operate", tags=("load",)),
    Route("POST", f"{P}/load/pause", _Routes.pause, "pauseLoad", "Pause the load", _OK, (409,),
          role="operate", tags=("load",)),
    Route("POST", f"{P}/load/resume", _Routes.resume, "resumeLoad", "Resume the load", _OK, (409,),
          role="operate", tags=("load",)),
    Route("GET", f"{P}/load/trace", _Routes.trace, "getTrace",
          "The recorded trace: requests offered per target per second since the load started",
          {200: Answer({"type": "string"}, "JSON lines: a header `{start, targets, interval}`, then "
                       "one array of counts per second (`aether forge --replay FILE` takes it)",
                       media=TRACE_CONTENT_TYPE)},
          (400, 409), tags=("load",)),
    Route("GET", f"{P}/load/failures", _Routes.failures, "getLoadFailures",
          "The load generator's latest failed requests (its last 200) with what each was told",
          {200: Answer(FailuresAnswer, "Failures numbered above `after`, oldest first; `next` (the "
                       "latest failure's number) for the next call")},
          (400, 409),
          params=(query_param("after", "failure number (default 0: all kept); only failures after it",
                              type="integer", minimum=0),),
          tags=("load",)),
    Route("POST", f"{P}/load/replay", _Routes.replay, "replayLoad",
          "Offer the load of a recorded trace from now on (then the configured rate again)",
          _OK, (400, 409), params=(query_param("speed", "replay speed (2 = twice as fast)"),),
          body=Body({"type": "string"}, "A trace (JSON lines, as `GET /api/load/trace` answers)",
                    alternatives={TRACE_CONTENT_TYPE: {"type": "string"}}),
          role="operate", tags=("load",)),
)

_DESCRIPTION = """\
REST API of Aether Forge: everything the dashboard shows and does. Authenticate with the token
Forge printed: `Authorization: Bearer TOKEN` (or the cookie the page sets when opened with
`?token=TOKEN`). Errors are RFC 9457 problem documents.
"""


def build_forge_openapi(routes: Sequence[Route] = ROUTES) -> dict[str, Any]:
    """The OpenAPI document of Forge's REST API (the management API's builder, Forge's info)."""
    doc = build_openapi([*routes, _OPENAPI_ROUTE])
    doc["info"] = {"title": "Aether Forge API", "version": "1", "description": _DESCRIPTION}
    doc["tags"] = [{"name": t} for t in ("observe", "control", "load", "meta")]
    doc["security"] = [{"bearer": []}]
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for ops in doc["paths"].values():
        for op in ops.values():
            op.pop("x-required-role", None)
    return doc


async def _openapi(_self: object, request: web.Request) -> web.Response:
    query(request, ())
    return json_response(build_forge_openapi())


_OPENAPI_ROUTE: Final = Route(
    "GET", f"{P}/openapi.json", _openapi, "getOpenapi", "This document",
    {200: Answer(dict[str, Any], "OpenAPI 3.1")}, (400,), tags=("meta",),
)

_UNAUTHORIZED_PAGE: Final = """<!doctype html><html><head><meta charset="utf-8">
<title>Aether Forge</title></head><body style="font-family: sans-serif; margin: 3em">
<h1>Aether Forge</h1><p>Open the address Forge printed when it started (it ends in
<code>?token=...</code>); the token is also in <code>{token_file}</code>.</p></body></html>
"""


class ForgeServer:
    """The aiohttp application serving the page, the static assets and the API."""

    def __init__(self, forge: Forge, token: str, *, token_file: str = "the Forge directory") -> None:
        self.forge = forge
        self._token = token
        self._token_file = token_file

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        register(app, _Routes(self.forge), ROUTES)
        register(app, self, (_OPENAPI_ROUTE,))
        return app

    def _authorized(self, request: web.Request) -> bool:
        given = request.cookies.get(COOKIE)
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self._token.encode())

    async def _index(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None:
            if not hmac.compare_digest(token.encode(), self._token.encode()):
                raise Unauthorized("wrong token; open the address Forge printed")
            resp = web.HTTPFound("/")
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise resp
        if not self._authorized(request):
            page = _UNAUTHORIZED_PAGE.format(token_file=self._token_file)
            return web.Response(text=page, status=401, content_type="text/html")
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.path != "/":
                if not self._authorized(request):
                    raise Unauthorized("missing or wrong Forge token: send `Authorization: Bearer TOKEN` "
                                       "or open the address Forge printed")
                origin = request.headers.get("Origin")
                cross = origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host)
                if request.method not in ("GET", "HEAD") and cross:
                    raise StatusError(f"cross-origin write from {origin} refused", status=403)
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return problem_answer(problem_for(e))
        except Exception as e:
            if is_internal(e):
                log.exception("Forge API %s %s failed", request.method, request.path)
            return problem_answer(problem_for(e), problem_headers(e))
