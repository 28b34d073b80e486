"""`HttpRouter`: the node's HTTP front door (flow 3 in docs/architecture.md).

Keeps a `RouteTable` in sync with the replicated ``routes/`` keys (initial `list_local` + `watch`;
a ``reset`` event re-reads everything), serves HTTP/1.1 with `aether.http.wire.WireServer` (an
asyncio protocol over httptools: aiohttp's server cost several times the router's own work per
request; the route table does the routing), binds the request to the entry's argument
(`aether.http.routes.build_payload`) and calls the slice through the invoker (which prefers a
local instance and fails over itself). The call goes to the route's ``group:artifact``, not to
the version that registered the route: any live version serves it, split by a rollout's traffic
weights (docs/deployment.md, *Routes across versions*). May import `aether.core`, `aether.kv` and
`aether.invoke.errors`; reaches the KV store and the invoker only through the Protocols below.

Responses: the entry's MessagePack answer re-encoded as JSON (``application/json``; a ``str``
answer is a JSON string, ``None`` is ``null``). Every response carries ``X-Request-Id`` (the
request's header when it is sane, else a fresh id) which is also passed to the invoker. An
``Idempotency-Key`` header (1-128 letters, digits and ``._:@+=/-``; anything else is a 400 naming
the header) becomes the idempotency key of the call (the slice reads it as
``context.idempotency_key``); without one the invoker makes a new key per request.

A W3C ``traceparent`` header (with its ``tracestate``) makes the request part of that trace: the
router's span (one per request, kind server, named ``METHOD ROUTE``, when the node traces) is its
child and the call carries the context on (`aether.core.tracing`). A malformed ``traceparent`` is
ignored: a new trace starts, never an error (docs/operations.md, *Tracing*).

Errors are problem documents (``application/problem+json``, ``{type,title,status,detail}``); an
error of the invoker answers with the status it declares (`aether.core.problem.problem_for`, the
same mapping as the management API's invoke endpoint):

====  ===========================================================================================
400   malformed path/query/JSON, a bound header whose bytes are not UTF-8, bytes the HTTP parser
      refuses (plain text, logged as one line, the connection closes), JSON nested more than 64
      levels or an integer outside -2**63..2**64-1, an unknown query parameter or body field,
      body not an object, or the entry rejected the argument (`BadRequest` /
      `InvokeBadRequest`: the detail names the field and why)
404   no route for the path (detail names method and path; but see 503), or the route's artifact is not
      deployed / its instances have no such entry (`NotDeployed`, answered at once), or the
      route names an entry the artifact does not have (`UnknownEntryError`: the detail says the
      route is misconfigured)
405   the path exists for other methods (``Allow`` header lists them)
408   the client did not send its body within ``request_timeout`` (the connection closes)
413   body larger than ``max_body`` (answered as soon as the declared length or the bytes received
      pass it; the rest is not read and the connection closes)
414   a request target longer than 8190 bytes (plain text; the connection closes)
415   a body without a JSON content type (``Content-Type: application/json`` is required)
431   a request head of more than 100 fields or 32 KiB (plain text; the connection closes)
4xx   the entry raised a `SliceHttpError` (``NotFound`` 404, ``Conflict`` 409, ...), directly or by
      letting one from a slice it called escape: that status, its message as the detail
502   the slice raised (`SliceAppError`), nodes went down running the call (`PoisonRequest`), a
      call to an entry that is not idempotent may or may not have taken effect and was not
      repeated (`IndeterminateOutcome`: the detail says so and that retrying with the same
      ``Idempotency-Key`` is safe where the entry deduplicates), any other failed call
      (`InvokeError`), or the answer cannot be represented as JSON
503   the artifact is deployed but no instance is ACTIVE anywhere (`EndpointUnavailable`, answered
      at once, with ``Retry-After: 1``: an instance is starting, or every instance FAILED, with the
      nodes' reasons, and the cluster starts them again after a backoff; its routes stay in the
      table meanwhile, docs/deployment.md, so a deployed slice whose start failed is a 503 saying
      why, not a 404), no ACTIVE instance could be
      reached before the deadline (an `InvokeTimeout` of kind ``no_instance``: the last attempt found
      none, or there was none to try), or the invoker is closed; also a path that matches no route
      while the route table may be incomplete, with ``Retry-After: 1``, instead of a 404: this node
      has no quorum (starting, catching up after a join, cut off), or a deployed slice has not
      declared its routes yet (its wheel loading or failed to import, or it waits for its
      dependencies: `aether.http.unrouted`, which the detail quotes)
504   any other `InvokeTimeout` (the deadline passed while an attempt ran or peers were failing)
500   anything unexpected (logged with traceback; the response never contains one)
====  ===========================================================================================

A connection that has not sent a complete request head within ``idle_timeout`` seconds (15) of
being accepted, or of its previous response, is closed without an answer (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from aether.core.context import RandomHex, check_idempotency_key, current_request_id
from aether.core.errors import BadRequest, StatusError
from aether.core.problem import (
    INTERNAL_DETAIL,
    PROBLEM_CONTENT_TYPE,
    Problem,
    is_internal,
    problem_for,
    problem_headers,
)
from aether.core.tracing import NOOP_TRACER, Span, Tracer, current_trace, parse_traceparent
from aether.http.routes import ROUTE_PREFIX, Match, RouteTable, build_payload
from aether.http.unrouted import Unrouted, detail, unrouted
from aether.http.wire import WireReply, WireRequest, WireServer
from aether.invoke.errors import InvokerClosed, UnknownEntryError
from aether.kv.keys import RouteValue

__all__ = [
    "HttpRouter",
    "InvokerLike",
    "KVLike",
    "MiB",
    "ServerLogger",
    "start_site",
]

MiB = 1024 * 1024
REQUEST_ID_HEADER = "X-Request-Id"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
_RID_RE = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,128}\Z")
_MSGPACK_DEC = msgspec.msgpack.Decoder()
_JSON_ENC = msgspec.json.Encoder()
_ROUTE_DEC = msgspec.msgpack.Decoder(RouteValue)
_JSON_TYPE = "application/json"


class KVLike(Protocol):
    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...

    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]: ...


class InvokerLike(Protocol):
    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes: ...


class ServerLogger(logging.LoggerAdapter):
    """The `logger` of an aiohttp server (its own option): a request that aiohttp's parser
    rejects (bad bytes in a header, a line too long, not HTTP at all) is answered 400 by aiohttp
    and logged here as one line without a traceback, instead of an ERROR with a traceback per
    request (anyone can send those: a log flood, and not an error of the node). Any other
    exception is logged as before."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc_info, HttpProcessingError):
            first = (exc_info.message or type(exc_info).__name__).strip().splitlines()
            text = str(msg) % args if args else str(msg)
            reason = first[0] if first else ""
            self.info("%s: malformed HTTP request refused (%s %s)", text, exc_info.code, reason)
            return
        self.error(msg, *args, exc_info=exc_info, **kw)


class _TcpSite(web.TCPSite):
    """`web.TCPSite` with a TLS handshake deadline: aiohttp's keepalive timeout (the idle
    timeout) starts only once the handshake is done, so a client that connects and never sends a
    ClientHello would otherwise hold its connection for the event loop's default of 60 s."""

    __slots__ = ("_handshake_timeout",)

    def __init__(self, *args: Any, handshake_timeout: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = (
            {}
            if self._ssl_context is None
            else {"ssl": self._ssl_context, "ssl_handshake_timeout": self._handshake_timeout}
        )
        self._server = await loop.create_server(server, self._host, self._port, backlog=self._backlog, **tls)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


async def start_site(
    runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None, idle_timeout: float
) -> None:
    """Listen with `runner` on host:port, over TLS with `ssl_context` (HTTPS) if given; a TLS
    handshake must complete within `idle_timeout` seconds."""
    site = _TcpSite(runner, host, port, ssl_context=ssl_context, handshake_timeout=idle_timeout)
    await site.start()


class HttpRouter:
    """Serves the cluster's routes on `host`:`port` (0 picks a free port; read `.port` after start)."""

    def __init__(
        self,
        node_id: str,
        kv: KVLike,
        invoker: InvokerLike,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body: int = MiB,
        request_timeout: float = 10.0,
        idle_timeout: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
        logger: logging.Logger | None = None,
        has_quorum: Callable[[], bool] | None = None,
        tracer: Tracer = NOOP_TRACER,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.node_id = node_id
        # `stop` lets requests in flight finish for up to this many seconds (the slices' drain
        # timeout: a node stopping in a rolling restart answers what it took), then aborts the rest
        self.shutdown_timeout = shutdown_timeout
        self.tracer = tracer  # one span per request when enabled (aether.core.tracing)
        self._tracing = tracer.enabled
        self.has_quorum = has_quorum
        """Whether this node is part of a quorum now: without one (starting, catching up after a
        join, cut off) its route table may be incomplete, so a path that matches no route answers
        503 with Retry-After instead of a 404 that would be wrong."""
        self.kv = kv
        self.invoker = invoker
        self.host = host
        self._port = port
        self.max_body = max_body
        self.request_timeout = request_timeout
        # a connection must send a complete request head within `idle_timeout` s of being accepted
        # (or of its previous response) and may stay idle that long: aiohttp's keepalive_timeout
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context  # HTTPS when given
        self.log = logger or logging.getLogger(f"aether.http.{node_id}")
        self.table = RouteTable()
        self._ids = RandomHex()  # request ids of requests without a sane X-Request-Id
        self._cancel_watch: Callable[[], None] | None = None
        self._cancel_stale: list[Callable[[], None]] = []
        # deployed artifacts whose routes are not known yet (`aether.http.unrouted`), computed on a
        # path that matches no route; None: to compute (a change under routes/, blueprints/, slices/)
        self._unrouted: list[Unrouted] | None = None
        self._server: WireServer | None = None

    @property
    def port(self) -> int:
        """The bound port (the configured one before `start`)."""
        if self._server is not None:
            port = self._server.port
            if port is not None:
                return port
        return self._port

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT`` of the router."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context is not None else 'http'}://{host}:{self.port}"

    # --- route table sync -----------------------------------------------------------------------

    def _reload(self) -> None:
        items: list[tuple[str, RouteValue]] = []
        for key, value in self.kv.list_local(ROUTE_PREFIX):
            if isinstance(value, bytes):
                try:
                    value = _ROUTE_DEC.decode(value)
                except msgspec.DecodeError as e:
                    self.log.warning("ignoring route %s: undecodable value (%s)", key, e)
                    continue
            items.append((key, value))
        for key, problem in self.table.replace_all(items):
            self.log.warning("ignoring route %s: %s", key, problem)
        self.log.debug("route table loaded: %d route(s)", len(self.table))

    def _stale(self, ev: Any = None) -> None:
        self._unrouted = None

    def _pending(self) -> list[Unrouted]:
        """Deployed artifacts whose routes the table cannot have yet (see `aether.http.unrouted`)."""
        pending = self._unrouted
        if pending is None:
            pending = self._unrouted = unrouted(
                self.kv.list_local("blueprints/"),
                self.kv.list_local("slices/"),
                {r.target for r in self.table.routes()},
            )
        return pending

    def _on_event(self, ev: Any) -> None:
        self._unrouted = None
        kind = getattr(ev, "kind", None)
        if kind == "reset":
            self._reload()
            return
        key = getattr(ev, "key", "")
        if not isinstance(key, str) or not key.startswith(ROUTE_PREFIX):
            return
        try:
            if kind == "put":
                value = ev.value
                if isinstance(value, bytes):
                    value = _ROUTE_DEC.decode(value)
                self.table.update(key, value)
            elif kind == "remove":
                self.table.remove(key)
        except (ValueError, msgspec.DecodeError) as e:
            self.log.warning("ignoring route event %s %s: %s", kind, key, e)
            if kind == "put":  # a route that no longer compiles must not keep its old target
                try:
                    self.table.remove(key)
                except ValueError:
                    pass

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the route table, watch `routes/`, and start listening."""
        if self._server is not None:
            return
        self._cancel_watch = self.kv.watch(ROUTE_PREFIX, self._on_event)
        self._cancel_stale = [self.kv.watch(p, self._stale) for p in ("blueprints/", "slices/")]
        self._reload()
        # our own HTTP/1.1 protocol over httptools (aether.http.wire): the route table does the
        # routing, and aiohttp's server machinery cost several times the router's own work
        server = WireServer(
            self._handle,
            name=f"HTTP router of {self.node_id}",
            max_body=self.max_body,
            idle_timeout=self.idle_timeout,
            body_timeout=self.request_timeout,
            on_body_timeout=self._body_timeout,
            logger=self.log,
            shutdown_timeout=self.shutdown_timeout,
        )
        try:
            await server.start(self.host, self._port, self.ssl_context)
        except BaseException:
            await server.stop()
            self._unwatch()
            raise
        self._server = server
        self.log.info("HTTP router of %s listening on %s", self.node_id, self.url)

    async def stop(self) -> None:
        """Stop listening and stop watching; idempotent."""
        self._unwatch()
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    def _unwatch(self) -> None:
        if self._cancel_watch is not None:
            self._cancel_watch()
            self._cancel_watch = None
        for cancel in self._cancel_stale:
            cancel()
        self._cancel_stale = []
        self._unrouted = None

    # --- request handling -----------------------------------------------------------------------

    def _body_timeout(self) -> WireReply:
        return self._problem(
            408, f"request body not received within {self.request_timeout:g}s", self._ids.take(8)
        )

    def _problem(
        self, status: int, detail: str, rid: str, headers: dict[str, str] | None = None
    ) -> WireReply:
        return self._answer(Problem.of(status, detail), rid, headers)

    @staticmethod
    def _answer(problem: Problem, rid: str, headers: dict[str, str] | None = None) -> WireReply:
        h = [(REQUEST_ID_HEADER, rid)]
        if headers:
            h.extend(headers.items())
        return WireReply(problem.status, problem.encode(), PROBLEM_CONTENT_TYPE, h)

    async def _handle(self, request: WireRequest) -> WireReply:
        given = request.headers.get(REQUEST_ID_HEADER)
        rid = given if given is not None and _RID_RE.match(given) else self._ids.take(8)
        method = request.method
        token = current_request_id.set(rid)  # the request id of the log records it causes here
        try:
            tp = request.headers.get(TRACEPARENT_HEADER)
            if tp is None and not self._tracing:  # the fast path: nothing to trace, nothing to pass on
                try:
                    return await self._serve(request, rid, method, request.path, request.query)
                except Exception:
                    self.log.exception("HTTP %s %s (request %s) failed", method, request.path, rid)
                    return self._problem(500, INTERNAL_DETAIL.replace("NODE", self.node_id), rid)
            return await self._handle_traced(request, rid, method, tp)
        finally:
            current_request_id.reset(token)

    async def _handle_traced(
        self, request: WireRequest, rid: str, method: str, tp: str | None
    ) -> WireReply:
        """`_handle` with a trace context to pass on, a span to record, or both."""
        raw_path = request.path
        parent = parse_traceparent(tp, request.headers.get(TRACESTATE_HEADER)) if tp is not None else None
        span: Span | None = None
        if self._tracing:
            span = self.tracer.start_span(
                f"HTTP {method}", parent, "server",
                {"http.request.method": method, "url.path": raw_path, "aether.request_id": rid,
                 "aether.node.id": self.node_id},
            )  # fmt: skip
            parent = span.context
        token = current_trace.set(parent) if parent is not None else None
        try:
            resp = await self._serve(request, rid, method, raw_path, request.query, span)
        except Exception as exc:
            self.log.exception("HTTP %s %s (request %s) failed", method, raw_path, rid)
            if span is not None:
                span.record_error(exc)
            resp = self._problem(500, INTERNAL_DETAIL.replace("NODE", self.node_id), rid)
        finally:
            if token is not None:
                current_trace.reset(token)
        if span is not None:
            span.set_attribute("http.response.status_code", resp.status)
            if resp.status >= 500:  # a server error (OpenTelemetry's HTTP conventions); 4xx are the client's
                span.set_error(str(resp.status), f"answered {resp.status}")
            span.end()
        return resp

    async def _serve(
        self,
        request: WireRequest,
        rid: str,
        method: str,
        raw_path: str,
        raw_query: str,
        span: Span | None = None,
    ) -> WireReply:
        try:
            m = self.table.match(method, raw_path)
        except BadRequest as e:
            return self._problem(400, str(e), rid)
        if span is not None and isinstance(m, Match):
            span.update_name(f"{method} {m.route.pattern}")
            span.set_attribute("http.route", m.route.pattern)
            span.set_attribute("aether.target", f"{m.route.target}.{m.route.method}")
        if not isinstance(m, Match):
            if m.allowed_methods:
                return self._problem(
                    405,
                    f"method {method} is not allowed for {raw_path}; allowed: {', '.join(m.allowed_methods)}",
                    rid,
                    {"Allow": ", ".join(m.allowed_methods)},
                )
            if self.has_quorum is not None and not self.has_quorum():
                return self._problem(
                    503,
                    f"no route for {method} {raw_path} here, but {self.node_id} has no quorum (it is "
                    "starting, catching up or cut off), so its routes may be incomplete; retry, or "
                    "ask another node",
                    rid,
                    {"Retry-After": "1"},
                )
            pending = self._pending()
            if pending:  # the route table may lack this path: the routes of these are not known yet
                return self._problem(503, detail(method, raw_path, pending), rid, {"Retry-After": "1"})
            return self._problem(404, f"no route for {method} {raw_path}", rid)
        if request.too_large is not None:  # (the body was not read; the connection closes)
            return self._problem(
                413,
                f"request body of at least {request.too_large} bytes exceeds the limit of "
                f"{self.max_body} bytes",
                rid,
            )
        body = request.body
        route = m.route
        ikey = request.headers.get(IDEMPOTENCY_KEY_HEADER)
        if ikey is not None and (problem := check_idempotency_key(ikey)) is not None:
            return self._problem(400, f"{IDEMPOTENCY_KEY_HEADER} header: {problem}", rid)
        try:
            payload = build_payload(
                m,
                query_string=raw_query,
                headers=request.headers,
                body=body,
                content_type=request.headers.get("Content-Type"),
                max_body=self.max_body,
            )
        except (BadRequest, StatusError) as e:  # BodyTooLarge (413), UnsupportedMediaType (415), ...
            return self._answer(problem_for(e), rid)
        try:
            if ikey is None:  # the invoker makes a new key for the call
                answer = await self.invoker.invoke(
                    route.target, route.method, payload, request_id=rid, timeout=self.request_timeout
                )
            else:
                answer = await self.invoker.invoke(
                    route.target,
                    route.method,
                    payload,
                    request_id=rid,
                    timeout=self.request_timeout,
                    idempotency_key=ikey,
                )
        except Exception as e:
            if is_internal(e):
                raise  # logged with its traceback by `_handle`, answered 500
            p = problem_for(e)
            if isinstance(e, UnknownEntryError):
                p = msgspec.structs.replace(
                    p, detail=f"route {route.http_method} {route.pattern} is misconfigured: {p.detail}"
                )
            elif isinstance(e, InvokerClosed):
                p = msgspec.structs.replace(p, detail=f"node {self.node_id} is shutting down: {p.detail}")
            return self._answer(p, rid, problem_headers(e))
        try:
            out = _JSON_ENC.encode(_MSGPACK_DEC.decode(answer)) if answer else b"null"
        except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError) as e:
            self.log.warning(
                "answer of %s.%s (request %s) is not JSON-representable: %s",
                route.artifact,
                route.method,
                rid,
                e,
            )
            return self._problem(
                502, f"the answer of {route.artifact}.{route.method} cannot be represented as JSON: {e}", rid
            )
        return WireReply(200, out, _JSON_TYPE, [(REQUEST_ID_HEADER, rid)])
