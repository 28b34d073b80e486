"""The management API server of one node (aiohttp, JSON encoded with msgspec).

Endpoints (all `GET`, all JSON):

- `/api/v1/status` -> `aether.core.status.NodeStatus`
- `/api/v1/kv?prefix=P` -> `{"prefix": P, "entries": [{"key": ..., "value": ...}, ...]}`
- `/api/v1/health` -> 200 `{"status": "ok", "live": true, "ready": true, node_id, quorum, leader, time}`
  when the node has quorum, else 503 with `ready: false` and `reason` (also a problem document)
- `/livez` -> 200 `{"status": "ok", "live": true, node_id, time}` (no quorum needed), and `/readyz` ->
  200 like `/api/v1/health` when the node has quorum and serves, else 503 with `reason`: both without
  an API key (probes of load balancers and Kubernetes)
- `/api/v1/nodes` -> `[{"id", "address", "state", "leader": bool}]`
- `/api/v1/events` (only when the node has `bus` and `kv`): server-sent events, see
  `aether.api.events`; a `: keepalive` comment every `heartbeat` seconds

Deployment endpoints, when the node runs a deployment service (`node.deployments`):

- `GET /api/v1/slices` -> `[{artifact, desired, active, instances: [{node, state, reason, instance_ids}]}]`
- `GET /api/v1/blueprints`, `GET /api/v1/blueprints/{id}`, `DELETE /api/v1/blueprints/{id}`
- `POST /api/v1/blueprints` with `{"toml": TEXT, "filename": NAME}` (or a raw TOML body) -> the
  expanded blueprint; `POST /api/v1/blueprints/{id}/wait?timeout=S` waits for convergence
- `POST /api/v1/deploy` `{"artifact": "G:A:V", "instances": N}`, `POST /api/v1/scale` (same body),
  `POST /api/v1/undeploy` `{"artifact": "G:A[:V]"}`
- `POST /api/v1/invoke/{artifact}/{method}?timeout=S` with the entry's argument as JSON: calls the
  entry through the node's invoker (local instance first, else a remote one) and returns its answer

Distributed-map endpoints, when the node runs a map service (`node.maps`; see
`aether.api.map_routes`): `GET|POST /api/v1/maps`, `GET|DELETE /api/v1/maps/{name}`,
`GET /api/v1/maps/{name}/keys?prefix=P` and `GET|PUT|DELETE /api/v1/maps/{name}/entries/{key}`.
Metrics endpoints, when the node runs a metrics service (`node.metrics`), see `aether.api.metrics_routes`:

- `GET /api/v1/metrics` -> the cluster snapshot (`aether.metrics.MetricsView`)
- `GET /api/v1/metrics/history?seconds=N` -> per-second cluster points of the last N seconds
- `GET /metrics` -> Prometheus text exposition of this node (needs the API key like the rest, unless
  the node's `metrics_public` setting makes it public)

Controller endpoints, when the node runs a controller service (`node.controller`), see
`aether.api.controller_routes`: `GET /api/v1/controller/status`, `GET|PUT /api/v1/controller/config`,
`GET /api/v1/controller/decisions` (and `/stream`), `GET /api/v1/alerts`.

Log endpoints, when the node keeps its recent log records (`node.logs`), see `aether.api.log_routes`:
`GET /api/v1/logs`, `GET /api/v1/logs/stream`.

Fault injection endpoints, when the node has a fault injector (`node.faults`), see
`aether.api.fault_routes`: `GET|DELETE /api/v1/faults`, `PUT|DELETE /api/v1/faults/links/{peer}`,
`PUT|DELETE /api/v1/faults/slices/{artifact}` (writes refused with 403 unless the node runs with
``--fault-injection``).

Errors are RFC 9457 problem documents (`application/problem+json`):
`{"type": "about:blank", "title": ..., "status": ..., "detail": ...}`, the title being the status's
reason phrase. Every error answers with the status it declares (`aether.core.problem.problem_for`,
shared with the HTTP router and the CLI). Unexpected exceptions are logged with their traceback and
answered with a 500 that never contains it. A `SessionConflict` (the store refused the node's own
command: an internal error, the request was not applied) is a 500 whose detail says so.

If an API key is configured, every request (but `/livez`, `/readyz` and a public `/metrics`) must
carry it in `X-API-Key: KEY` or `Authorization: Bearer KEY` (or as the password of
`Authorization: Basic`, which pip sends for `http://USER:KEY@HOST/...` index URLs), else 401. A
server bound beyond loopback without an API key refuses to start (`ConfigError`). Several servers
may run in one process (no module-level state).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import ssl
from typing import Any, Protocol

from aiohttp import web

from aether.api.auth import required_role
from aether.api.common import API_PREFIX, MAX_BODY, Handler, problem_answer, problem_response
from aether.api.node_routes import AUTH_PREFIX, CreateKey, NodeRoutes
from aether.api.node_routes import ROUTES as NODE_ROUTES
from aether.api.routing import PRINCIPAL, Route, register
from aether.api.types import KVListing
from aether.core.errors import ConfigError, Forbidden, RequestTimeout, Unauthorized
from aether.core.problem import Problem, is_internal, problem_for, problem_headers
from aether.core.status import KVEntry, NodeStatus
from aether.core.types import is_loopback_host, open_management_api_problem
from aether.http.server import ServerLogger, start_site

__all__ = [
    "API_PREFIX",
    "AUTH_PREFIX",
    "PRINCIPAL",
    "SERVED",
    "CreateKey",
    "KVListing",
    "ManagementServer",
    "NodeView",
    "Problem",
    "is_loopback_host",
    "problem_answer",
    "problem_response",
]

# A connection must send a complete request head within this many seconds of being accepted (or of
# its previous response), else it is closed; also the keep-alive idle time. aiohttp's
# `keepalive_timeout` does both (its timer starts at `connection_made` and closes the connection
# while it still waits for a complete request head), see docs/management-api.md.
DEFAULT_IDLE_TIMEOUT = 15.0
# A request body must arrive completely within this many seconds (408 otherwise).
DEFAULT_BODY_TIMEOUT = 10.0

BODY = web.RequestKey("aether.body", bytes)  # the request body, once the middleware read it
SERVED = web.AppKey("aether.routes", list[Route])  # the routes an application serves (and documents)


class NodeView(Protocol):
    """What a node offers the management API.

    `status` and `kv_list` may also return awaitables; the server awaits them. They may raise
    `NotReady` / `QuorumLost` (answered 503), `CommitTimeout` (504), `BadRequest` (400) or
    `SessionConflict` (500).
    """

    node_id: str

    def status(self) -> NodeStatus: ...

    def kv_list(self, prefix: str) -> list[KVEntry]: ...


def _basic_password(token: str) -> str:
    try:
        decoded = base64.b64decode(token, validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials: expected base64 of USER:KEY") from None
    return decoded.partition(":")[2]


def presented_key(request: web.Request) -> str | None:
    """The API key a request presents (`X-API-Key: KEY` or `Authorization: Bearer KEY`), None if
    it presents none; raises `Unauthorized` if the header is malformed. aiohttp decodes header
    bytes as UTF-8 with surrogate escapes, so bytes that are not UTF-8 arrive as surrogates: a
    key must be printable ASCII, and anything else is refused here, before it is encoded."""
    given = request.headers.get("X-API-Key")
    if given is None:
        auth = request.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "basic":  # pip: http://USER:KEY@host/.../simple/ (the user is ignored)
            given = _basic_password(token.strip())
        elif scheme.lower() != "bearer":
            raise Unauthorized(
                "unsupported Authorization scheme: send the API key as 'X-API-Key: KEY', "
                "'Authorization: Bearer KEY' or as the password of 'Authorization: Basic'"
            )
        else:
            given = token.strip()
    if not given or not given.isascii() or not given.isprintable():
        raise Unauthorized("the API key is empty or contains bytes that are not printable ASCII")
    return given


class ManagementServer:
    """Serves the management API of one node on `host:port` (port 0 picks a free port)."""

    def __init__(
        self,
        node: NodeView,
        *,
        host: str,
        port: int,
        api_key: str | None = None,
        logger: logging.Logger | None = None,
        heartbeat: float = 15.0,
        event_queue_size: int | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        metrics_public: bool = False,
    ) -> None:
        self._ssl_context = ssl_context  # HTTPS when given
        self._metrics_public = metrics_public  # `/metrics` without a key (node setting metrics_public)
        self._public: frozenset[str] = frozenset()  # paths served without authentication
        if idle_timeout <= 0 or body_timeout <= 0:
            raise ConfigError("idle_timeout and body_timeout must be > 0 seconds")
        self._idle_timeout = idle_timeout
        self._body_timeout = body_timeout
        self._node = node
        self._heartbeat = heartbeat
        self._event_queue_size = event_queue_size
        self.events: Any = None  # the EventHub while an app with the events endpoint runs
        self._host = host
        self._port = port
        self._api_key = api_key or None
        from aether.api.auth import KeyRing

        self.keys = KeyRing(self._api_key, getattr(node, "kv", None))
        from aether.api.audit import AuditLog

        self.audit = AuditLog(str(getattr(node, "node_id", "")))
        self._log = logger or logging.getLogger("aether.api")
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port actually bound once started (the configured one before)."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'https' if self._ssl_context is not None else 'http'}://{host}:{self.port}"

    def make_app(self) -> web.Application:
        """The aiohttp application (routes and middleware), e.g. for aiohttp's test client.

        The routes are those the routes modules declare (`ROUTES`, see `aether.api.routing`) that
        this node can serve; the OpenAPI document describes exactly these."""
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        hub = None
        if getattr(self._node, "bus", None) is not None and getattr(self._node, "kv", None) is not None:
            from aether.api.events import DEFAULT_QUEUE_SIZE, EventHub

            hub = EventHub(
                self._node,  # type: ignore[arg-type]
                queue_size=self._event_queue_size or DEFAULT_QUEUE_SIZE,
                logger=self._log,
            )
            started = hub

            async def start_hub(_app: web.Application) -> None:
                started.start()
                self.events = started

            async def stop_hub(_app: web.Application) -> None:
                started.stop()  # ends every stream, so shutdown does not wait for them

            app.on_startup.append(start_hub)
            app.on_shutdown.append(stop_hub)
            app.on_cleanup.append(stop_hub)

        served: list[Route] = []
        app[SERVED] = served

        def document() -> dict[str, Any]:
            from aether.api.openapi import build_openapi

            return build_openapi(served)

        own = NodeRoutes(
            self._node, keys=self.keys, audit=self.audit, log=self._log, heartbeat=self._heartbeat, hub=hub,
            document=document,
        )
        served += register(app, own, NODE_ROUTES)
        if getattr(self._node, "deployments", None) is not None:
            from aether.api import deploy_routes

            deployments = deploy_routes.DeploymentRoutes(
                self._node.deployments,  # type: ignore[attr-defined]
                getattr(self._node, "invoker", None),
            )
            served += register(app, deployments, deploy_routes.ROUTES)
        if getattr(self._node, "maps", None) is not None:
            from aether.api import map_routes

            maps = map_routes.MapRoutes(self._node.maps)  # type: ignore[attr-defined]
            served += register(app, maps, map_routes.ROUTES)
        if getattr(self._node, "artifacts", None) is not None:
            from aether.api import repository_routes

            repo = repository_routes.RepositoryRoutes(
                self._node.artifacts, idle_timeout=self._body_timeout  # type: ignore[attr-defined]
            )
            served += register(app, repo, repository_routes.ROUTES)
        if getattr(self._node, "metrics", None) is not None:
            from aether.api import metrics_routes

            metrics = metrics_routes.MetricsRoutes(self._node.metrics)  # type: ignore[attr-defined]
            routes = [
                dataclasses.replace(r, public=True) if r.path == "/metrics" and self._metrics_public else r
                for r in metrics_routes.ROUTES
            ]
            served += register(app, metrics, routes)
        if getattr(self._node, "controller", None) is not None:
            from aether.api import controller_routes

            controller = controller_routes.ControllerRoutes(self._node.controller)  # type: ignore[attr-defined]
            served += register(app, controller, controller_routes.ROUTES)
        if getattr(self._node, "logs", None) is not None:
            from aether.api import log_routes

            log_streams = log_routes.LogRoutes(self._node, heartbeat=self._heartbeat)
            served += register(app, log_streams, log_routes.ROUTES)

            async def end_log_streams(_app: web.Application) -> None:
                log_streams.close()

            app.on_shutdown.append(end_log_streams)
        if getattr(self._node, "faults", None) is not None:
            from aether.api import fault_routes

            faults = fault_routes.FaultRoutes(self._node.faults)  # type: ignore[attr-defined]
            served += register(app, faults, fault_routes.ROUTES)
        self._public = frozenset(r.path for r in served if r.public and r.method == "GET")
        return app

    async def start(self) -> None:
        """Bind and serve. Raises ConfigError (beyond loopback without key) or OSError (bind)."""
        if self._runner is not None:
            raise RuntimeError("management server already started")
        if (problem := open_management_api_problem(self._host, self._api_key)) is not None:
            raise ConfigError(problem)
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            logger=ServerLogger(self._log, {}),
            shutdown_timeout=1.0,
            keepalive_timeout=self._idle_timeout,
            lingering_time=2.0,  # after an error answer, read the unread rest of a body this long at most
        )
        await runner.setup()
        try:
            await start_site(runner, self._host, self._port, self._ssl_context, self._idle_timeout)
        except OSError as e:
            await runner.cleanup()
            raise OSError(
                e.errno, f"management API cannot listen on {self._host}:{self._port}: {e.strerror or e}"
            ) from e
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])
        self._log.info("management API listening on %s", self.url)

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            self._log.info("management API on %s stopped", self.url)

    async def __aenter__(self) -> ManagementServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- middleware: authentication and error mapping -------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in ("GET", "HEAD"):
            return await self._serve(request, handler)
        status = 500
        try:
            response = await self._serve(request, handler)
            status = response.status
            return response
        except web.HTTPException as e:  # a redirect or success raised by a handler
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer (nginx's convention)
            raise
        finally:
            self._audit(request, status)

    def _audit(self, request: web.Request, status: int) -> None:
        from aether.api.audit import target_of

        principal = request.get(PRINCIPAL)
        body = request.get(BODY)  # the body, if the middleware read it (not for refused keys)
        try:
            match_info = dict(request.match_info)
        except (AttributeError, RuntimeError):
            match_info = {}
        self.audit.record(
            key=None if principal is None else principal.name,
            remote=request.remote,
            method=request.method,
            path=request.path,
            target=target_of(match_info, body),
            status=status,
        )

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path in self._public and request.method in ("GET", "HEAD"):
                return await handler(request)  # the probes (and /metrics when public): no key asked
            principal = await self.keys.authenticate(presented_key(request) if self.keys.enabled else None)
            request[PRINCIPAL] = principal
            length = request.content_length
            # a handler marked `streams_body` (an artifact upload) reads and meters its body itself
            streamed = getattr(request.match_info.handler, "streams_body", False)
            if request.can_read_body and not streamed and (length is None or length <= MAX_BODY):
                # read the whole body here, under a deadline: a client trickling its body would
                # otherwise hold the handler forever (handlers' own `read()` gets the cached bytes)
                try:
                    async with asyncio.timeout(self._body_timeout):
                        request[BODY] = await request.read()
                except web.HTTPRequestEntityTooLarge:
                    return problem_response(413, f"request body exceeds the {MAX_BODY}-byte limit")
                except TimeoutError:
                    resp = self.problem_for(
                        request, RequestTimeout(f"request body not received within {self._body_timeout:g} s")
                    )
                    resp.force_close()  # the rest of the body may still trickle in: not on this connection
                    return resp
            # after the body (an authenticated client's): the audit names what a refused write was for
            need = required_role(request.method, request.path)
            if not principal.allows(need):
                raise Forbidden(
                    f"{request.method} {request.path} needs the {need!r} role; "
                    f"key {principal.name!r} has {principal.role!r}",
                    required_role=need,
                )
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return self._http_problem(request, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return self.problem_for(request, e)

    def problem_for(self, request: web.Request, e: Exception) -> web.Response:
        """The problem document answering `e`: `aether.core.problem.problem_for`, the mapping the
        HTTP router uses too. An error without a status of its own is logged with its traceback
        (the answer is a generic 500); a declared 500 (`SessionConflict`: the store refused the
        node's own command, not applied) is logged as one line."""
        problem = problem_for(e)
        if is_internal(e):
            self._log.error("management API: %s %s failed", request.method, request.path, exc_info=e)
        elif problem.status == 500:
            self._log.error("management API: %s %s failed: %s", request.method, request.path, e)
        return problem_answer(problem, problem_headers(e))

    @staticmethod
    def _http_problem(request: web.Request, e: web.HTTPException) -> web.Response:
        headers: dict[str, str] = {}
        if isinstance(e, web.HTTPNotFound):
            detail = f"no such endpoint: {request.path}"
        elif isinstance(e, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(e.allowed_methods))
            headers["Allow"] = allowed
            detail = f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
        else:
            detail = e.text or e.reason
        return problem_response(e.status, detail, title=e.reason, headers=headers)
