"""`InvokeServer`: runs `InvokeRequest`s from other nodes on this node's slices and answers them.

Owns the executing side of a remote invocation: one task per request (with the request-id and
idempotency-key contextvars set), the request's time limit, bounded concurrency, mapping
exceptions to response kinds, and a graceful `stop`. The request's trace context (``traceparent``)
becomes the served call's `current_trace`; with a tracer enabled the execution is a span of kind
server (``run T.M``), a child of the caller's attempt span. Also owns `dispatch`, the single transport
callback for invoke messages (requests to this server, responses to the node's `Invoker`). May
import `aether.core` and `aether.invoke`; it reaches slices and the transport only through
`aether.invoke.ports`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Callable

from aether.core.context import enter_call
from aether.core.tracing import NOOP_TRACER, Span, Tracer, current_trace, parse_traceparent
from aether.invoke.context import RequestIdVar, current_request_id
from aether.invoke.errors import classify, describe_exception, error_text
from aether.invoke.invoker import Invoker
from aether.invoke.messages import (
    KIND_APP_ERROR,
    KIND_DEADLINE,
    KIND_INTERRUPTED,
    KIND_OVERLOADED,
    KIND_SHUTTING_DOWN,
    InvokeRequest,
    InvokeResponse,
    oversized,
)
from aether.invoke.ports import LocalSlices, PeerSender

__all__ = ["InvokeServer"]


class InvokeServer:
    """Serves invocations sent by other nodes' `Invoker`s.

    ``dispatch(sender, msg)`` is the callback to give the transport for invoke messages:
    `InvokeRequest` -> `on_request`, `InvokeResponse` -> ``invoker.on_response`` (when an
    `invoker` is set). At most `max_in_flight` requests run at once; more are answered
    "overloaded" (the caller retries elsewhere). A request runs for at most its ``timeout_ms``
    (capped by `max_timeout`) and is then answered "deadline".
    """

    def __init__(
        self,
        node_id: str,
        local: LocalSlices,
        sender: PeerSender,
        *,
        invoker: Invoker | None = None,
        max_in_flight: int = 1024,
        max_timeout: float = 300.0,
        request_id_var: RequestIdVar | None = None,
        logger: logging.Logger | None = None,
        hold_for: float = 10.0,
        max_held: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.node_id = node_id
        self.invoker = invoker
        self._local = local
        self._sender = sender
        # the transport's largest frame (None: not known): a larger response would make the caller
        # close the link, so it is answered with an error instead
        self._max_frame: int | None = getattr(sender, "max_frame", None)
        self._max_in_flight = max_in_flight
        self._max_timeout = max_timeout
        # the request-id context variable (tests may pass their own)
        self._rid_var: RequestIdVar = current_request_id if request_id_var is None else request_id_var
        self._log = logger or logging.getLogger(f"aether.invoke.server.{node_id}")
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.served = 0  # requests answered (any outcome)
        self.rejected = 0  # answered overloaded / shutting_down without running
        # Responses whose link back was not up (links are one per direction: a restarted peer can
        # reach us before our link to it is up again): sent when it comes up, for `hold_for` s,
        # at most `max_held` per peer (the oldest are dropped first)
        self._hold_for = hold_for
        self._max_held = max_held
        self._clock = clock
        self.tracer = tracer  # a span per served request when enabled (aether.core.tracing)
        self._held: dict[str, collections.deque[tuple[float, InvokeResponse]]] = {}
        self.held_dropped = 0
        # drops held responses past `hold_for` whether or not their peer comes back (`_prune_held`)
        self._prune_timer: asyncio.TimerHandle | None = None
        # requests cancelled by their time limit (`_expire`), answered "deadline" by `_serve`
        self._expired: set[asyncio.Task[None]] = set()

    # --- transport callback ---------------------------------------------------------------------

    def dispatch(self, sender: str, msg: object) -> None:
        """Route an invoke message from peer `sender`: requests here, responses to the invoker."""
        if isinstance(msg, InvokeRequest):
            self.on_request(sender, msg)
        elif isinstance(msg, InvokeResponse):
            if self.invoker is not None:
                self.invoker.on_response(sender, msg)
            else:
                self._log.debug("[%s] response %d from %s dropped: no invoker", self.node_id, msg.id, sender)
        else:
            self._log.warning("[%s] unexpected %s from %s dropped", self.node_id, type(msg).__name__, sender)

    # --- serving --------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests currently running."""
        return len(self._tasks)

    def on_request(self, sender_node: str, req: InvokeRequest) -> None:
        """Start running `req` from `sender_node` (never blocks; the answer is sent when it finishes)."""
        if self._stopping:
            self.rejected += 1
            self._reply(sender_node, req, None, f"node {self.node_id} is shutting down", KIND_SHUTTING_DOWN)
            return
        if len(self._tasks) >= self._max_in_flight:
            self.rejected += 1
            self._reply(
                sender_node,
                req,
                None,
                f"node {self.node_id} has {len(self._tasks)} calls in flight (limit {self._max_in_flight})",
                KIND_OVERLOADED,
            )
            return
        if req.timeout_ms <= 0:
            self._reply(sender_node, req, None, "the caller's deadline had already passed", KIND_DEADLINE)
            return
        ctx = contextvars.copy_context()
        var = self._request_id_var()
        if var is not None:
            ctx.run(var.set, req.request_id)
        if req.idempotency_key:  # the logical call's key, where the request id is (slices read it)
            ctx.run(enter_call, None, req.idempotency_key)
        span: Span | None = None
        if req.traceparent:  # the caller's attempt: the parent of this execution
            trace = parse_traceparent(req.traceparent, req.tracestate)
            if trace is not None and self.tracer.enabled:
                span = self.tracer.start_span(
                    f"run {req.target}.{req.method}", trace, "server",
                    {"aether.artifact": req.target, "aether.entry": req.method,
                     "aether.request_id": req.request_id, "aether.peer.node": sender_node,
                     "aether.node.id": self.node_id},
                )  # fmt: skip
                trace = span.context
            if trace is not None:
                ctx.run(current_trace.set, trace)
        coro = self._serve(sender_node, req) if span is None else self._serve_traced(sender_node, req, span)
        loop = asyncio.get_running_loop()
        task = loop.create_task(coro, context=ctx)
        limit = min(req.timeout_ms / 1000, self._max_timeout)
        # a plain loop timer: asyncio.timeout() cost 2.5 µs more per request (bench/README.md)
        deadline = loop.call_later(limit, self._expire, task)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, deadline))

    def _done(self, task: asyncio.Task[None], deadline: asyncio.TimerHandle) -> None:
        self._tasks.discard(task)
        deadline.cancel()
        if self._expired:
            self._expired.discard(task)

    def _expire(self, task: asyncio.Task[None]) -> None:
        """A request's time limit passed: cancel it; `_serve` answers "deadline"."""
        if not task.done():
            self._expired.add(task)
            task.cancel()

    async def _serve_traced(self, sender_node: str, req: InvokeRequest, span: Span) -> None:
        try:
            await self._serve(sender_node, req, span)
        finally:
            span.end()

    async def _serve(self, sender_node: str, req: InvokeRequest, span: Span | None = None) -> None:
        self._log.debug(
            "[%s] request %s %s.%s from %s", self.node_id, req.request_id, req.target, req.method, sender_node
        )
        try:
            result = await self._local.call(req.target, req.method, req.payload)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task in self._expired:  # our deadline (`_expire`), not stop(): answer "deadline"
                self._expired.discard(task)
                if task is not None:
                    task.uncancel()
                if span is not None:
                    span.record_error(TimeoutError())
                limit = min(req.timeout_ms / 1000, self._max_timeout)
                self._reply(
                    sender_node,
                    req,
                    None,
                    f"did not finish within {limit:g}s on {self.node_id}",
                    KIND_DEADLINE,
                )
                return
            # stop() gave up waiting: the call may have partly run, so the caller retries it
            # elsewhere only if the entry is idempotent (kind interrupted, docs/invocation.md)
            self._reply(
                sender_node,
                req,
                None,
                f"node {self.node_id} stopped before the call finished (it may have partly run)",
                KIND_INTERRUPTED,
            )
            raise
        except TimeoutError as exc:  # raised by the entry itself (its own time limit): its error
            if span is not None:
                span.record_error(exc)
            self._app_error(sender_node, req, exc)
            return
        except Exception as exc:
            if span is not None:
                span.record_error(exc)
            kind = classify(exc)
            if kind == KIND_APP_ERROR:
                self._app_error(sender_node, req, exc)
            else:
                self._reply(sender_node, req, None, error_text(exc, kind), kind)
            return
        if isinstance(result, bytes):
            self._reply(sender_node, req, result, None, None)
        elif isinstance(result, bytearray | memoryview):
            self._reply(sender_node, req, bytes(result), None, None)
        else:
            self._log.error(
                "[%s] request %s %s.%s: the slice runtime returned %s, expected bytes",
                self.node_id,
                req.request_id,
                req.target,
                req.method,
                type(result).__name__,
            )
            self._reply(
                sender_node,
                req,
                None,
                f"TypeError: result is {type(result).__name__}, not bytes",
                KIND_APP_ERROR,
            )

    def _app_error(self, sender_node: str, req: InvokeRequest, exc: BaseException) -> None:
        self._log.error(
            "[%s] request %s %s.%s (from %s) raised %s",
            self.node_id,
            req.request_id,
            req.target,
            req.method,
            sender_node,
            type(exc).__name__,
            exc_info=exc,
        )
        self._reply(sender_node, req, None, describe_exception(exc), KIND_APP_ERROR)

    def _reply(
        self, sender_node: str, req: InvokeRequest, payload: bytes | None, error: str | None, kind: str | None
    ) -> None:
        self.served += 1
        resp = InvokeResponse(req.id, payload, error, kind)
        limit = self._max_frame
        if limit is not None and (size := oversized(resp, limit)) is not None:
            what = "result" if payload is not None else "error"
            self._log.error(
                "[%s] request %s %s.%s (from %s): its %s of %d bytes is larger than the largest message "
                "between nodes (max_frame %d bytes); answered app_error instead",
                self.node_id, req.request_id, req.target, req.method, sender_node, what, size, limit,
            )  # fmt: skip
            resp = InvokeResponse(
                req.id,
                None,
                f"MessageTooLarge: its {what} of {size} bytes is larger than the largest message between "
                f"nodes (max_frame, {limit} bytes)",
                KIND_APP_ERROR,
            )
        try:
            sent = self._sender.send(sender_node, resp)
        except Exception:
            self._log.exception(
                "[%s] request %s: cannot send the response to %s", self.node_id, req.request_id, sender_node
            )
            return
        if not sent:
            held = self._held.setdefault(sender_node, collections.deque())
            if len(held) >= self._max_held:
                held.popleft()
                self.held_dropped += 1
            held.append((self._clock() + self._hold_for, resp))
            if self._prune_timer is None:
                self._prune_timer = asyncio.get_running_loop().call_later(self._hold_for, self._prune_held)
            self._log.debug(
                "[%s] request %s: link to %s not up; response held until it is",
                self.node_id, req.request_id, sender_node,
            )  # fmt: skip

    def peer_up(self, node_id: str) -> None:
        """The link to `node_id` is up: send the responses held for it (those not expired)."""
        held = self._held.pop(node_id, None)
        if not held:
            return
        now = self._clock()
        for expires, resp in held:
            if now > expires:
                self.held_dropped += 1
                continue
            if not self._sender.send(node_id, resp):
                self.held_dropped += 1

    def _prune_held(self) -> None:
        """Drop the held responses past their time (their callers gave up), also for a peer that
        never comes back (crashed, or replaced by a node of another id); again while any is held."""
        self._prune_timer = None
        now = self._clock()
        for node_id in list(self._held):
            held = self._held[node_id]
            while held and held[0][0] <= now:  # oldest first: their times never decrease
                held.popleft()
                self.held_dropped += 1
            if not held:
                del self._held[node_id]
        if self._held:
            first = min(held[0][0] for held in self._held.values())
            self._prune_timer = asyncio.get_running_loop().call_later(
                max(first - now, 0.001), self._prune_held
            )

    # --- lifecycle ------------------------------------------------------------------------------

    async def stop(self, grace: float = 5.0) -> None:
        """Answer new requests "shutting_down"; wait up to `grace` s for running ones, then cancel them
        (they are answered "shutting_down" too). Idempotent."""
        self._stopping = True
        if not self._tasks:
            return
        running = list(self._tasks)
        self._log.info("[%s] invoke server stopping: waiting for %d call(s)", self.node_id, len(running))
        _done, pending = await asyncio.wait(running, timeout=grace)
        if pending:
            self._log.warning(
                "[%s] %d call(s) still running after %gs; cancelling them", self.node_id, len(pending), grace
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _request_id_var(self) -> RequestIdVar:
        return self._rid_var
