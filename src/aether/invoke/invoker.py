"""`Invoker`: slice-to-slice (and router-to-slice) calls with local preference, round robin, retries,
backoff, failover and deadlines.

Owns the calling side of an invocation: choosing an instance, sending `InvokeRequest`s, matching
`InvokeResponse`s to waiting calls, and deciding what is retried. May import `aether.core`,
`aether.transport` (for `EventBus` / `PeerDown` only) and `aether.invoke`; it reaches slices,
the endpoint registry and the transport only through the Protocols in `aether.invoke.ports`.

Semantics
---------
- A call prefers a local ACTIVE instance; otherwise it round-robins (per target and method) over
  the registry's ACTIVE endpoints on other nodes that the transport reports up. A local instance
  at its concurrency limit (`max_concurrency`: the call would queue) is not preferred: the call
  goes to another node's instance first, and joins the local queue only when none is left.
- Versions (docs/invocation.md, *Weighted version choice*): a call to ``group:artifact`` may run any
  version; while a rollout publishes traffic weights (the `traffic` port, ``rollouts/`` keys) the
  first attempt of each round first picks a version by weight among the versions with a
  candidate for the entry (a shuffled deck of the weights per target and method: exact per deck,
  random within it, from the seeded rng), then
  an instance of that version as above; retries after a failed attempt may go to any version. A
  call to full coordinates ignores weights. Without weights the choice costs one dict lookup more.
- Retryable failures (no instance, peer down or unreachable, the peer went down while the call was
  pending, no response within the per-attempt timeout, "overloaded", "shutting_down") fail over to
  another instance at once; when every candidate failed in this round, or there is no ACTIVE
  instance at all, the call waits with exponential backoff (jittered, 5 ms doubling up to 200 ms by
  default) and tries again, until its deadline (default 10 s) -> `InvokeTimeout`.
- Overload fails fast: when every candidate of a round answered "overloaded" (its instance's queue
  is full, docs/slices.md *Concurrency limits*), the call raises `InvokeOverloaded` (503 with
  ``Retry-After: 1``) at once rather than retry until its deadline.
- Fail fast: when a call finds no ACTIVE instance to try before its first attempt and a `catalog`
  (the store's view, `aether.invoke.catalog.StoreCatalog`) is wired, it asks the catalog: an
  unknown artifact or entry raises `NotDeployed` (404) and a deployed artifact with no ACTIVE
  instance anywhere (starting, or every instance FAILED) raises `EndpointUnavailable` (503) at
  once. Only when an ACTIVE endpoint exists on a node that is down does the call wait as above.
- Non-retryable failures raise at once: `InvokeBadRequest`, `UnknownEntryError`, `SliceAppError`,
  and `InvokeTimeout` when the executing node reports that the call's deadline passed.
- Delivery is AT LEAST ONCE across retries for entries that are idempotent (the default): an
  attempt whose response was lost (or that timed out) may still have run, or still be running,
  while a retry runs elsewhere. Calls may run concurrently.
- Entry policies (`aether.core.policy.EntryPolicy`, published with each endpoint): `timeout` is the
  per-attempt wait, `retries` bounds the attempts after the first, `backoff` the first pause.
  An entry declared ``idempotent=False`` is AT MOST ONCE per logical call: an attempt that may have
  reached the target (sent, then its node went down, no answer within the attempt timeout, or the
  node stopped it mid-run, or the worker process running it died: kind ``interrupted``) is not
  repeated: `IndeterminateOutcome` (502).
  An entry that lets an `IndeterminateOutcome` escape answers kind ``indeterminate``: never
  retried (that would repeat its non-idempotent call), raised as `IndeterminateOutcome`.
  Failures that certainly did not reach it (no instance, peer not up, send refused, "overloaded",
  "shutting_down" answers) are still retried and failed over. Without an explicit `timeout`, an
  attempt of a non-idempotent entry waits for the whole remaining deadline.
- Every logical call carries one idempotency key (`InvokeRequest.idempotency_key`), the same on
  every attempt: the caller's, else derived from the key of the call being served
  (`aether.core.context.child_idempotency_key`), else a new one, made up (`MINTED` first: the callee
  can tell that no earlier logical call had it, `idempotency_key_given`).
- Tracing (docs/invocation.md, *Trace context*): the call carries the trace context of the call
  being served (`aether.core.tracing.current_trace`) to the node that runs it (`InvokeRequest`'s
  ``traceparent``/``tracestate``; locally through the same context variable). With a tracer
  enabled, each call is a span (``call T.M``), each attempt a child span of kind client
  (``attempt T.M``) whose context the callee gets, and a local attempt's execution a span of kind
  server (``run T.M``), as the invoke server makes for a remote one.
- A circuit breaker per (node, artifact) (`aether.invoke.breaker`) skips instances that keep
  failing while another candidate exists.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aether.core.calls import Answer, NoAnswer, PendingCalls, RetryPolicy
from aether.core.context import (
    RandomHex,
    check_call_key,
    child_idempotency_key,
    enter_call,
    exit_call,
    idempotency_key_given,
    mint_idempotency_key,
)
from aether.core.deadlines import SWEPT_FROM, DeadlineSweep
from aether.core.policy import DEFAULT_POLICY, EntryPolicy
from aether.core.tracing import NOOP_TRACER, Span, TraceContext, Tracer, current_trace, trace_fields
from aether.invoke.breaker import CircuitBreaker
from aether.invoke.catalog import ACTIVE, FAILED, STARTING, UNKNOWN_ENTRY
from aether.invoke.context import RequestIdVar, current_request_id, read_request_id
from aether.invoke.errors import (
    EndpointUnavailable,
    IndeterminateOutcome,
    InvokeBadRequest,
    InvokeError,
    InvokeOverloaded,
    InvokerClosed,
    InvokeTimeout,
    NotDeployed,
    PoisonRequest,
    SliceAppError,
    UnknownEntryError,
    classify,
    describe_exception,
    error_text,
)
from aether.invoke.messages import (
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_DEADLINE,
    KIND_INDETERMINATE,
    KIND_INJECTED_FAULT,
    KIND_INTERRUPTED,
    KIND_NO_INSTANCE,
    KIND_OVERLOADED,
    KIND_UNKNOWN_ENTRY,
    RETRYABLE_KINDS,
    InvokeRequest,
    InvokeResponse,
    kind_status,
    oversized,
)
from aether.invoke.ports import Catalog, Endpoint, LocalSlices, PeerLink, Registry, Traffic
from aether.transport import EventBus, PeerDown

__all__ = ["Invoker", "InvokerStats"]

@dataclass(slots=True)
class _Deck:
    """The versions left to deal for one (target, method) during a rollout (`Invoker._deal`)."""

    hand: tuple[tuple[str, int], ...]  # the candidate versions and weights it was dealt for
    counts: list[int]  # cards left per version of `hand`
    left: int  # their sum


_MAX_KEYS = 4096  # bound on per-(target, method) bookkeeping (round-robin index, warning limiter)
# A local attempt whose limit is at least SWEPT_FROM s away is not given a timer of its own: the
# node's loop's `DeadlineSweep` cancels it once past its limit (aether.core.deadlines).


class _Retry(Exception):
    """An attempt failed in a way worth retrying elsewhere (internal)."""

    def __init__(
        self, reason: str, kind: str | None = None, *, node_lost: bool = False, maybe_ran: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.node_lost = node_lost  # the node running the call went down meanwhile
        # the attempt may have reached the entry (sent and then lost): not repeated if not idempotent
        self.maybe_ran = maybe_ran or node_lost or kind == KIND_INTERRUPTED

    @property
    def unhealthy(self) -> bool:
        """Says the instance is unhealthy (counts for the circuit breaker); overloaded does not."""
        return self.kind != KIND_OVERLOADED


class InvokerStats:
    """Counters (monotonic) for metrics and tests."""

    __slots__ = (
        "attempts", "calls", "failed", "indeterminate", "local_attempts", "remote_attempts", "retries",
        "skipped_open", "succeeded",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.succeeded = 0
        self.failed = 0
        self.attempts = 0
        self.local_attempts = 0
        self.remote_attempts = 0
        self.retries = 0
        self.indeterminate = 0  # calls ended with IndeterminateOutcome
        self.skipped_open = 0  # candidates passed over because their circuit was open

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"InvokerStats({self.as_dict()})"


class Invoker:
    """Calls entry points of slices anywhere in the cluster (implements `aether.slices.SliceCaller`).

    Wiring: feed `InvokeResponse`s from the transport to `on_response` (the `InvokeServer`'s
    `dispatch` does it) and let it see `PeerDown` events (pass the node's `bus`, or call
    `peer_down`). One instance per node; it keeps no module-level state.
    """

    def __init__(
        self,
        node_id: str,
        local: LocalSlices,
        registry: Registry,
        transport: PeerLink,
        *,
        bus: EventBus | None = None,
        default_timeout: float = 10.0,
        attempt_timeout: float | None = 1.0,
        backoff_min: float = 0.005,
        backoff_max: float = 0.2,
        request_id_var: RequestIdVar | None = None,
        warn_interval: float = 5.0,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
        catalog: Catalog | None = None,
        max_nodes_lost: int = 2,
        traffic: Traffic | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] | None = None,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        if max_nodes_lost < 1:
            raise ValueError("max_nodes_lost must be at least 1")
        # poison-request protection: a call cut short this many times (a distinct node went down
        # while running it, or an attempt answered `interrupted`) is not retried
        self.max_nodes_lost = max_nodes_lost
        # deadline, per-attempt wait and backoff (the same policy the map client uses)
        self.retry = RetryPolicy(default_timeout, attempt_timeout, backoff_min, backoff_max)
        self.node_id = node_id
        self._local = local
        self._registry = registry
        self._link = transport
        # the transport's largest frame (None: not known): a larger request would make the callee
        # close the link, so it is refused before it is sent
        self._max_frame: int | None = getattr(transport, "max_frame", None)
        self._catalog = catalog
        # the rollouts' weights between versions (None: never split, as without a rollout)
        self._traffic = traffic
        # the request-id context variable (tests may pass their own)
        self._rid_var: RequestIdVar = current_request_id if request_id_var is None else request_id_var
        self._warn_interval = warn_interval
        self._rng = rng or random.Random()
        self._log = logger or logging.getLogger(f"aether.invoke.{node_id}")
        # Call ids must not repeat across restarts of this node: a peer that ran a call of our
        # previous process holds its answer until its link to us is up again (`InvokeServer`), and
        # would hand it to whichever call of ours has the same id. A random start (48 bits of
        # `os.urandom`, not `rng`, which tests seed alike) keeps the processes' ranges apart.
        self._calls: PendingCalls[InvokeResponse] = PendingCalls(int.from_bytes(os.urandom(6), "big") + 1)
        self._ids = RandomHex()  # new request ids (16 hex digits) and idempotency keys (32)
        self._deadlines = DeadlineSweep()  # the limits of local attempts far enough away
        self._rr: dict[tuple[str, str], int] = {}
        # the shuffled decks of the versions' weights: (target, method) -> deck (`_choose_weighted`)
        self._decks: dict[tuple[str, str], _Deck] = {}
        self._warned: dict[tuple[str, str], tuple[float, int]] = {}
        self._closed = False
        self._unsubscribe: Callable[[], None] | None = None
        # per-(node, artifact) circuits; `clock` (default: the running loop's) times them
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self._clock = clock
        self.stats = InvokerStats()
        self.tracer = tracer  # spans of calls and attempts when enabled (aether.core.tracing)
        if bus is not None:
            self.attach(bus)

    # --- wiring ---------------------------------------------------------------------------------

    def attach(self, bus: EventBus) -> None:
        """Subscribe to `PeerDown` on `bus` (calls pending on a node that goes down fail over)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = bus.subscribe(PeerDown, self._on_peer_down_event)

    def _on_peer_down_event(self, event: PeerDown) -> None:
        self.peer_down(event.node_id, event.reason)

    def peer_down(self, node_id: str, reason: str = "peer down") -> None:
        """Fail every call pending on `node_id` at once with a retryable error (they go elsewhere)."""
        failed = self._calls.fail_peer(node_id, lambda: _Retry(
            f"node {node_id} went down while the call was pending ({reason})", node_lost=True
        ))  # fmt: skip
        if failed:
            self._log.info(
                "[%s] %d pending call(s) on %s fail over: %s", self.node_id, failed, node_id, reason
            )

    def on_response(self, sender: str, msg: InvokeResponse) -> None:
        """Complete the call waiting for `msg` (late or unknown responses are dropped)."""
        answer = self._calls.resolve(msg.id, sender, msg)
        if answer is Answer.UNKNOWN:
            self._log.debug(
                "[%s] response %d from %s matches no pending call (late?)", self.node_id, msg.id, sender
            )
        elif answer is Answer.WRONG_PEER:
            self._log.warning(
                "[%s] response %d came from %s but the call was sent to %s; dropped",
                self.node_id,
                msg.id,
                sender,
                self._calls.peer_of(msg.id),
            )

    def close(self) -> None:
        """Stop: unsubscribe, fail pending calls with `InvokerClosed`; later `invoke` calls raise it."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._calls.fail_all(lambda: InvokerClosed(f"invoker of node {self.node_id} closed", kind=None))

    @property
    def pending_count(self) -> int:
        """Remote attempts currently waiting for a response."""
        return len(self._calls)

    # --- the call -------------------------------------------------------------------------------

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        """Call `method` of `target` (``group:artifact`` or full coordinates) with the encoded `payload`.

        Returns the encoded result. `request_id` defaults to the slices contextvar, else a new id.
        `timeout` (seconds, default `default_timeout`) bounds the whole call including retries.
        `idempotency_key` identifies the logical call on every attempt (default: derived from the
        key of the call being served, else new; see the module docstring).
        Raises `InvokeTimeout`, `InvokeBadRequest`, `UnknownEntryError`, `SliceAppError`,
        `IndeterminateOutcome`, `InvokerClosed`. At-least-once unless the entry's policy says it
        is not idempotent: see the module docstring.
        """
        if self._closed:
            raise InvokerClosed(f"invoker of node {self.node_id} is closed", target=target, method=method)
        rid = request_id or read_request_id(self._request_id_var()) or self._ids.take(8)
        if idempotency_key is not None:
            problem = check_call_key(idempotency_key)
            if problem is not None:
                raise InvokeBadRequest(
                    f"call {target}.{method} (request {rid}): idempotency key {idempotency_key[:40]!r} "
                    f"{problem}", target=target, method=method, kind=KIND_BAD_REQUEST, request_id=rid,
                )  # fmt: skip
            ikey = idempotency_key
        else:
            ikey = child_idempotency_key(target, method) or mint_idempotency_key(self._ids)
        budget = self.retry.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        stats = self.stats
        stats.calls += 1
        attempts = 0
        rounds = 0
        last_error = "no attempt made"
        last_kind: str | None = None  # KIND_NO_INSTANCE when the last obstacle was "nowhere to run it"
        last_node: str | None = None
        tried: set[str] = set()
        round_failed = round_overloaded = 0  # attempts of this round that failed, and how many overloaded
        # poison evidence: the distinct nodes that went down while running this call (a node
        # counts once, however often: one node whose heartbeat flaps is not two nodes the call
        # brought down), plus each attempt answered `interrupted` (its node stayed up, the worker
        # process running it died or the node stopped it: a restarted worker is a new process, and
        # a call that kills each one it reaches must stop before the worker's restart policy gives up)
        cut: list[str] = []  # the node of each counted attempt, in order
        down: set[str] = set()  # the nodes that went down while running it
        interrupted = 0  # counted attempts answered `interrupted`
        policy = DEFAULT_POLICY  # of the instance tried last (all instances of a version share it)
        tracer = self.tracer
        call_span: Span | None = None
        if tracer.enabled:
            call_span = tracer.start_span(
                f"call {target}.{method}", current_trace.get(), "internal",
                {"aether.target": target, "aether.entry": method, "aether.request_id": rid,
                 "aether.node.id": self.node_id},
            )  # fmt: skip
        try:
            while True:
                if self._closed:
                    raise InvokerClosed(
                        f"invoker of node {self.node_id} closed during {target}.{method} (request {rid})",
                        target=target,
                        method=method,
                        request_id=rid,
                        attempts=attempts,
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if attempts == 0 and last_kind is None and self._choose(target, method, tried)[1] == 0:
                        last_kind = KIND_NO_INSTANCE
                    raise self._timeout(
                        target, method, rid, budget, attempts, last_error, last_node, last_kind
                    )
                choice, candidates = self._choose(target, method, tried)
                if choice is None:
                    if candidates == 0 and attempts == 0 and rounds == 0 and self._catalog is not None:
                        self._fail_fast(target, method, rid)
                    if candidates == 0:
                        last_kind = KIND_NO_INSTANCE
                        last_error = f"no ACTIVE instance of {target} with entry {method!r} is reachable"
                        self._warn_retry(target, method, rid, f"waiting: {last_error}")
                    elif round_failed and round_overloaded == round_failed:
                        raise InvokeOverloaded(
                            f"call {target}.{method} (request {rid}): every instance that could take it "
                            f"is at its limit ({round_failed} tried); last error: {last_error}",
                            target=target, method=method, kind=KIND_OVERLOADED, node=last_node,
                            request_id=rid, attempts=attempts,
                        )  # fmt: skip
                    tried.clear()
                    round_failed = round_overloaded = 0
                    delay = self._backoff(policy, rounds)
                    rounds += 1
                    self._log.debug(
                        "[%s] request %s %s.%s: %s; retrying in %.0f ms",
                        self.node_id,
                        rid,
                        target,
                        method,
                        last_error,
                        delay * 1000,
                    )
                    await asyncio.sleep(min(delay, remaining))
                    continue
                node, artifact = choice
                policy = self._policy(target, method, node, artifact)
                if policy.retries is not None and attempts > policy.retries:
                    raise self._timeout(
                        target, method, rid, budget, attempts, last_error, last_node, last_kind,
                        gave_up=f"gave up after {attempts} attempt(s): the entry's policy allows "
                                f"{policy.retries} retr{'y' if policy.retries == 1 else 'ies'}",
                    )  # fmt: skip
                attempts += 1
                stats.attempts += 1
                if attempts > 1:
                    stats.retries += 1
                    self._warn_retry(
                        target, method, rid, f"retrying (attempt {attempts}, on {node}) after: {last_error}"
                    )
                self._log.debug(
                    "[%s] request %s %s.%s attempt %d on %s",
                    self.node_id,
                    rid,
                    target,
                    method,
                    attempts,
                    node,
                )
                circuit = (node, artifact)
                attempt_span: Span | None = None
                if call_span is not None:
                    attempt_span = tracer.start_span(
                        f"attempt {target}.{method}", call_span.context, "client",
                        {"aether.artifact": artifact, "aether.entry": method, "aether.attempt": attempts,
                         "aether.peer.node": node, "aether.node.id": self.node_id},
                    )  # fmt: skip
                    trace = attempt_span.context
                else:
                    trace = current_trace.get()
                try:
                    if node == self.node_id:
                        stats.local_attempts += 1
                        result = await self._call_local(
                            artifact, method, payload, rid, deadline, attempts, ikey, policy, trace
                        )
                    else:
                        stats.remote_attempts += 1
                        breaker = self.breaker
                        if not breaker.idle:  # (skipped, no clock read, when nothing failed lately)
                            breaker.started(circuit, self._now())
                        result = await self._call_remote(
                            node, artifact, method, payload, rid, deadline, attempts, ikey, policy, trace
                        )
                        if not breaker.idle:
                            breaker.success(circuit, self._now())
                except _Retry as retry:
                    if attempt_span is not None:
                        attempt_span.record_error(retry)
                    if node != self.node_id and retry.unhealthy:
                        self.breaker.failure(circuit, self._now())
                    if retry.maybe_ran and not policy.is_idempotent:
                        stats.indeterminate += 1
                        raise IndeterminateOutcome(
                            f"call {target}.{method} (request {rid}, idempotency key {ikey}) on {node}: "
                            f"{retry.reason}",
                            target=target, method=method, kind=KIND_INDETERMINATE, node=node,
                            request_id=rid, attempts=attempts, key_given=idempotency_key_given(ikey),
                        ) from None
                    last_kind = retry.kind
                    last_error = f"{node}: {retry.reason}"
                    last_node = node
                    tried.add(node)
                    round_failed += 1
                    if retry.kind == KIND_OVERLOADED:
                        round_overloaded += 1
                    # an attempt cut short where it ran (its node went down, or answered
                    # `interrupted`: the worker process running it died, the node stopped it) counts
                    # towards poison: a call that kills each worker it reaches was retried until its
                    # deadline, killing every instance's worker again as soon as it was restarted
                    if retry.node_lost or retry.kind == KIND_INTERRUPTED:
                        if not retry.node_lost:
                            interrupted += 1
                            cut.append(node)
                        elif node not in down:
                            down.add(node)
                            cut.append(node)
                        if len(cut) >= self.max_nodes_lost:
                            what = (
                                f"it was cut short {len(cut)} times (on {', '.join(cut)}: its node "
                                f"went down or stopped it, or the worker process running it died); "
                                f"not tried again (it may be what kills them)"
                                if interrupted
                                else f"nodes {', '.join(cut)} went down while running it; not tried "
                                f"on another node (it may be what brings them down)"
                            )
                            raise PoisonRequest(
                                f"{target}.{method} (request {rid}): {what}; last error: {retry.reason}",
                                target=target, method=method, kind=KIND_APP_ERROR, node=node,
                                request_id=rid, attempts=attempts,
                            ) from None
                    continue
                except InvokeError as err:
                    if attempt_span is not None:
                        attempt_span.record_error(err)
                    # the instance answered (with an error): it is up; an error raised before
                    # anything was sent (a request too large to send) names no node
                    if node != self.node_id and err.node is not None:
                        self.breaker.success(circuit, self._now())
                    raise
                finally:
                    if attempt_span is not None:
                        attempt_span.end()
                stats.succeeded += 1
                return result
        except BaseException as exc:
            stats.failed += 1
            if call_span is not None:
                call_span.record_error(exc)
            raise
        finally:
            if call_span is not None:
                call_span.end()

    def _fail_fast(self, target: str, method: str, rid: str) -> None:
        """Raise at once when the store shows no ACTIVE endpoint of the entry anywhere (see module)."""
        assert self._catalog is not None
        state, detail = self._catalog.presence(target, method)
        if state == ACTIVE:
            return  # an instance is ACTIVE on a node that is down: wait for it, or its replacement
        text = f"call {target}.{method} (request {rid}): {detail}"
        if state in (STARTING, FAILED):
            # Retry-After: 1 in both states: a FAILED instance is not the end either, the leader
            # starts it again after its backoff (0.5 s doubling to 30 s, docs/deployment.md), and
            # asking again costs a store scan here, not a slice call (a larger value would stall a
            # client that sleeps what it is told, also when the first restart serves 0.5 s later)
            raise EndpointUnavailable(
                text, target=target, method=method, kind=KIND_NO_INSTANCE, request_id=rid
            )
        kind = KIND_UNKNOWN_ENTRY if state == UNKNOWN_ENTRY else None
        raise NotDeployed(text, target=target, method=method, kind=kind, request_id=rid)

    # --- choosing an instance -------------------------------------------------------------------

    def _choose(self, target: str, method: str, tried: set[str]) -> tuple[tuple[str, str] | None, int]:
        """((node, artifact) to try next, or None; number of candidates including tried ones).

        `artifact` is what the attempt calls: `target` itself, or the full coordinates of the
        version the traffic weights chose (then on this node too: the local call runs that version).
        """
        if self._traffic is not None and not tried:  # weights pick the first attempt of a round
            weights = self._traffic.weights(target)  # the fast path: one dict lookup, empty
            if weights:
                picked = self._choose_weighted(target, method, weights)
                if picked is not None:
                    return picked
        me = self.node_id
        if me not in tried and self._local.has_room(target, method):  # (the usual: one question)
            return (me, target), 1
        local = bool(self._local.local_instances(target))
        candidates = 1 if local else 0
        up = self._link.up_peers
        remote = [
            ep for ep in self._registry.instances(target, method) if ep.node_id != me and ep.node_id in up
        ]
        candidates += len(remote)
        if remote:
            remote.sort(key=lambda ep: (ep.node_id, ep.instance, ep.artifact))
            key = (target, method)
            start = self._rr.get(key, 0)
            n = len(remote)
            skip = self._open_circuits(remote, tried)  # the circuit breaker's hook
            for k in range(n):
                ep = remote[(start + k) % n]
                if ep.node_id not in tried and (ep.node_id, ep.artifact) not in skip:
                    if key not in self._rr and len(self._rr) >= _MAX_KEYS:
                        self._rr.clear()
                    self._rr[key] = (start + k + 1) % 1_000_000_007
                    return (ep.node_id, ep.artifact), candidates
        # every local instance is at its concurrency limit and no other node is left to try: the
        # local queue (a call does not join it while an instance elsewhere may have a free slot)
        if local and me not in tried:
            return (me, target), candidates
        return None, candidates

    def _choose_weighted(
        self, target: str, method: str, weights: Mapping[str, int]
    ) -> tuple[tuple[str, str], int] | None:
        """The first attempt of a call to ``group:artifact`` during a rollout: a version by weight
        among the versions with a candidate (this node's instance of it with room, or an ACTIVE
        endpoint on a reachable node), then an instance of that version as `_choose` does (local
        first, else round robin). None when no version of positive weight has a candidate (the
        caller then chooses among every version: a weight never makes a call fail).

        The version is drawn from a shuffled deck per (target, method): the candidates' weights
        divided by their greatest common divisor (90/10: a deck of 9 + 1 cards), drawn at random
        without replacement (the invoker's seeded rng) and dealt again once empty, or once the
        candidates or their weights change. Exact over each deck (90/10 sends exactly 1 of every
        10 calls to the second version: no bursts) and random within it, so a client's own pattern
        cannot line up with the choice: with a fixed rotation (the smooth weighted round robin
        used before), 50/50 alternated strictly, and a client alternating two kinds of requests
        sent every one of the first kind to the old version and every one of the second to the
        new one (a canary step judged the new version on half of its traffic only).
        """
        me = self.node_id
        up = self._link.up_peers
        remote: dict[str, list[Endpoint]] = {}
        here: set[str] = set()  # versions this node publishes an endpoint of `method` for
        for ep in self._registry.instances(target, method):
            version = ep.artifact.rpartition(":")[2]
            if weights.get(version, 0) <= 0:
                continue
            if ep.node_id == me:
                here.add(version)
            elif ep.node_id in up:
                remote.setdefault(version, []).append(ep)
        local: set[str] = set()
        for version in here:  # published and still accepting (not draining), with a free slot
            coords = f"{target}:{version}"
            if self._local.local_instances(coords) and self._local.has_room(coords, method):
                local.add(version)
        eligible = sorted(local.union(remote))
        if not eligible:
            return None
        best = self._deal(target, method, tuple((v, weights[v]) for v in eligible))
        coords = f"{target}:{best}"
        candidates = len(local) + sum(len(eps) for eps in remote.values())
        if best in local:
            return (me, coords), candidates
        eps = sorted(remote[best], key=lambda ep: (ep.node_id, ep.instance))
        rr_key = (coords, method)
        start = self._rr.get(rr_key, 0)
        if rr_key not in self._rr and len(self._rr) >= _MAX_KEYS:
            self._rr.clear()
        self._rr[rr_key] = (start + 1) % 1_000_000_007
        return (eps[start % len(eps)].node_id, coords), candidates

    def _deal(self, target: str, method: str, hand: tuple[tuple[str, int], ...]) -> str:
        """One card of the (target, method) deck for the candidate versions and weights `hand`
        (see `_choose_weighted`); a new deck when the hand changed or the deck is empty."""
        key = (target, method)
        deck = self._decks.get(key)
        if deck is None or deck.hand != hand or deck.left == 0:
            if deck is None and len(self._decks) >= _MAX_KEYS:
                self._decks.clear()
            g = 0
            for _, w in hand:
                g = math.gcd(g, w)
            counts = [w // g for _, w in hand]
            deck = self._decks[key] = _Deck(hand, counts, sum(counts))
        pick = self._rng.randrange(deck.left)
        for i, n in enumerate(deck.counts):
            if pick < n:
                deck.counts[i] = n - 1
                deck.left -= 1
                return hand[i][0]
            pick -= n
        raise AssertionError("a deck's counts add up to what is left")  # pragma: no cover

    def _open_circuits(self, remote: list[Any], tried: set[str]) -> set[tuple[str, str]]:
        """The (node, artifact) of the candidates not tried yet whose circuit is open, unless every
        one of them is (then none is skipped: a breaker never makes a call fail on its own)."""
        breaker = self.breaker
        if breaker.idle:  # no circuit at all: nothing to skip
            return set()
        now = self._now()
        left = [(ep.node_id, ep.artifact) for ep in remote if ep.node_id not in tried]
        skip = {c for c in left if not breaker.allows(c, now)}
        if not skip or len(skip) == len(set(left)):
            return set()
        self.stats.skipped_open += 1
        return skip

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _policy(self, target: str, method: str, node: str, artifact: str) -> EntryPolicy:
        """The policy the registry publishes for `method` of the instance chosen (node, artifact);
        the defaults when it has none (an endpoint of an older node, or a registry without them)."""
        for ep in self._registry.instances(target, method):
            if ep.node_id == node and (node == self.node_id or ep.artifact == artifact):
                policy = getattr(ep, "policy", None)
                if isinstance(policy, EntryPolicy):
                    return policy
        return DEFAULT_POLICY

    def _backoff(self, policy: EntryPolicy, rounds: int) -> float:
        if policy.backoff is None:
            return self.retry.backoff(rounds, self._rng)
        base = min(max(self.retry.backoff_max, policy.backoff), policy.backoff * (2 ** min(rounds, 30)))
        return base / 2 + self._rng.uniform(0.0, base / 2)

    def _attempt_wait(self, policy: EntryPolicy, remaining: float) -> float:
        """How long one attempt waits: the policy's timeout; else, for an entry that must not run
        twice, the whole remaining deadline (giving up early would only make it indeterminate);
        else the invoker's `attempt_timeout`."""
        if policy.timeout is not None:
            return min(remaining, policy.timeout)
        if not policy.is_idempotent:
            return remaining
        return self.retry.attempt_wait(remaining)

    # --- one attempt ----------------------------------------------------------------------------

    async def _call_local(
        self,
        target: str,
        method: str,
        payload: bytes,
        rid: str,
        deadline: float,
        attempts: int,
        ikey: str = "",
        policy: EntryPolicy = DEFAULT_POLICY,
        trace: TraceContext | None = None,
    ) -> bytes:
        var = self._request_id_var()
        token = var.set(rid) if var is not None and var.get(None) != rid else None
        span: Span | None = None
        if trace is not None and self.tracer.enabled:  # the callee side of a local attempt
            span = self.tracer.start_span(
                f"run {target}.{method}", trace, "server",
                {"aether.artifact": target, "aether.entry": method, "aether.request_id": rid,
                 "aether.node.id": self.node_id},
            )  # fmt: skip
            trace = span.context
        keys = enter_call(None, ikey or None, trace)  # where the request id goes, the key goes
        try:
            loop = asyncio.get_running_loop()
            limit = deadline
            if policy.timeout is not None:
                limit = min(deadline, loop.time() + policy.timeout)
            try:
                if limit - loop.time() < SWEPT_FROM:
                    timer = asyncio.timeout_at(limit)
                    try:
                        async with timer:
                            return await self._local.call(target, method, payload)
                    except TimeoutError:
                        if not timer.expired():
                            raise  # the entry's own: an application error (below)
                else:  # a far deadline: watched by the sweep, not by a timer of its own
                    watch = self._deadlines.watch(limit, asyncio.current_task(loop))
                    try:
                        return await self._local.call(target, method, payload)
                    except asyncio.CancelledError:
                        if not watch.expired_here():
                            raise  # cancelled by someone else (the caller went away)
                    finally:
                        self._deadlines.done(watch)
            except Exception as exc:
                raise self._local_failure(exc, target, method, rid, attempts) from exc
            # the limit passed while the call ran here
            if limit < deadline:
                raise _Retry(
                    f"no answer within the entry's attempt timeout ({policy.timeout:g}s) on this node",
                    maybe_ran=True,
                ) from None
            raise self._local_deadline(target, method, rid, attempts) from None
        except BaseException as exc:
            if span is not None:
                span.record_error(exc)
            raise
        finally:
            if span is not None:
                span.end()
            exit_call(keys)
            if token is not None and var is not None:
                var.reset(token)

    def _local_failure(
        self, exc: Exception, target: str, method: str, rid: str, attempts: int
    ) -> InvokeError | _Retry:
        """What a local attempt that raised `exc` comes to: the caller's error, or a retry."""
        if isinstance(exc, TimeoutError):  # the entry's own (not the attempt's limit)
            return self._app_error(exc, target, method, rid, attempts)
        kind = classify(exc)
        # interrupted: the instance's worker process died mid-call (it may have partly run), retried
        # only for an idempotent entry, as the same answer from another node (`_call_remote`)
        if kind in RETRYABLE_KINDS or kind == KIND_INTERRUPTED:
            return _Retry(f"{kind}: {describe_exception(exc)}", kind)
        return self._error(kind, error_text(exc, kind), target, method, self.node_id, rid, attempts)

    def _local_deadline(self, target: str, method: str, rid: str, attempts: int) -> InvokeTimeout:
        return InvokeTimeout(
            f"call {target}.{method} (request {rid}) timed out running on this node ({self.node_id}) "
            f"after {attempts} attempt(s)",
            target=target,
            method=method,
            kind=KIND_DEADLINE,
            node=self.node_id,
            request_id=rid,
            attempts=attempts,
        )

    # --- direct calls on the shared slice loop ----------------------------------------------------

    def direct_ready(self, target: str, method: str, timeout: float | None) -> float | None:
        """For a call slice code on the node's shared slice loop makes to a slice on the same loop
        (`aether.slices.isolation.SharedInvoker`): its time limit in seconds when it may run there
        directly, as `invoke`'s local attempt would run it now; None when it must go through
        `invoke`: the invoker is closed, tracing is on (spans are made here), a rollout splits
        `target`, the entry's policy sets a timeout or retries of its own (`invoke`'s rounds apply
        them), or the entry's endpoints are not cached since the last change. Called from the shared
        loop's thread, so it only reads. Direct calls are not counted in `stats` (the slice metrics
        count them as any call)."""
        if self._closed or self.tracer.enabled:
            return None
        if self._traffic is not None and self._traffic.weights(target):
            return None
        cached = getattr(self._registry, "cached_instances", None)
        eps = cached(target, method) if cached is not None else None
        if eps is None:
            return None
        policy = DEFAULT_POLICY
        for ep in eps:
            if ep.node_id == self.node_id:
                found = getattr(ep, "policy", None)
                if isinstance(found, EntryPolicy):
                    policy = found
                break
        if policy.timeout is not None or policy.retries is not None:
            return None
        budget = self.retry.timeout if timeout is None else timeout
        return budget if budget > 0 else None

    def direct_error(
        self, exc: BaseException | None, target: str, method: str, rid: str, *, expired: bool = False
    ) -> InvokeError | None:
        """The error the caller of a direct call sees (as `invoke` reports a local attempt that raised
        `exc`, or whose deadline passed when `expired`); None when `invoke` would retry it (the
        caller then makes the call through `invoke`)."""
        if expired or not isinstance(exc, Exception):
            return self._local_deadline(target, method, rid, 1)
        failure = self._local_failure(exc, target, method, rid, 1)
        return None if isinstance(failure, _Retry) else failure

    def _app_error(
        self, exc: BaseException, target: str, method: str, rid: str, attempts: int
    ) -> InvokeError:
        return self._error(
            KIND_APP_ERROR, describe_exception(exc), target, method, self.node_id, rid, attempts
        )

    async def _call_remote(
        self,
        node: str,
        artifact: str,
        method: str,
        payload: bytes,
        rid: str,
        deadline: float,
        attempts: int,
        ikey: str = "",
        policy: EntryPolicy = DEFAULT_POLICY,
        trace: TraceContext | None = None,
    ) -> bytes:
        remaining = deadline - asyncio.get_running_loop().time()
        cid, _ = self._calls.open(node)
        tp, ts = trace_fields(trace)
        request = InvokeRequest(
            cid, artifact, method, payload, rid, max(1, int(remaining * 1000)), ikey, tp, ts
        )
        limit = self._max_frame
        if limit is not None and (size := oversized(request, limit)) is not None:
            self._calls.discard(cid)
            bad = InvokeBadRequest(
                f"call {artifact}.{method} (request {rid}): the request of {size} bytes is larger than "
                f"the largest message between nodes (max_frame, {limit} bytes); not sent",
                target=artifact, method=method, kind=KIND_BAD_REQUEST, request_id=rid, attempts=attempts,
            )  # fmt: skip
            bad.detail = f"the request of {size} bytes is larger than the largest message between nodes"
            raise bad
        if not self._link.send(node, request):
            self._calls.discard(cid)
            raise _Retry("not reachable (send failed: peer not up)")
        try:
            resp = await self._calls.wait(cid, self._attempt_wait(policy, remaining))
        except NoAnswer as e:
            raise _Retry(str(e), maybe_ran=True) from None
        if resp.error is None and resp.payload is not None:
            return resp.payload
        kind = resp.kind
        error = resp.error or "empty response"
        if kind in RETRYABLE_KINDS or kind == KIND_INTERRUPTED:
            raise _Retry(f"{kind}: {error}", kind)
        raise self._error(kind, error, artifact, method, node, rid, attempts)

    def _error(
        self, kind: str | None, error: str, target: str, method: str, node: str, rid: str, attempts: int
    ) -> InvokeError:
        where = f"{target}.{method} on {node} (request {rid})"
        cls: type[InvokeError]
        if kind == KIND_BAD_REQUEST:
            bad = InvokeBadRequest(
                f"bad request to {where}: {error}",
                target=target, method=method, kind=kind, node=node, request_id=rid, attempts=attempts,
            )
            bad.detail = error
            return bad
        elif kind == KIND_UNKNOWN_ENTRY:
            cls, message = UnknownEntryError, f"unknown entry point {where}: {error}"
        elif kind == KIND_INDETERMINATE:  # the entry let a nested IndeterminateOutcome escape
            cls, message = IndeterminateOutcome, f"{where}: a call it made is indeterminate: {error}"
        elif kind == KIND_APP_ERROR:
            cls, message = SliceAppError, f"{where} raised {error}"
        elif (status := kind_status(kind)) is not None:
            err = SliceAppError(
                f"{where} answered {status}: {error}",
                target=target, method=method, kind=kind, node=node, request_id=rid, attempts=attempts,
            )
            err.status, err.detail = status, error
            return err
        elif kind == KIND_INJECTED_FAULT:  # an injected fault (aether.slices.faults): its own 500
            injected = InvokeError(
                f"{where} failed: {error}",
                target=target, method=method, kind=kind, node=node, request_id=rid, attempts=attempts,
            )
            injected.status = 500
            return injected
        elif kind == KIND_DEADLINE:
            cls = InvokeTimeout
            message = f"call {where} did not finish before its deadline after {attempts} attempt(s): {error}"
        else:
            cls, message = InvokeError, f"call {where} failed ({kind or 'no kind'}): {error}"
        return cls(
            message, target=target, method=method, kind=kind, node=node, request_id=rid, attempts=attempts
        )

    def _timeout(
        self,
        target: str,
        method: str,
        rid: str,
        budget: float,
        attempts: int,
        last_error: str,
        last_node: str | None,
        last_kind: str | None = None,
        *,
        gave_up: str | None = None,
    ) -> InvokeTimeout:
        why = gave_up or f"did not succeed within {budget:g}s after {attempts} attempt(s)"
        return InvokeTimeout(
            f"call {target}.{method} (request {rid}) {why}; last error: {last_error}",
            target=target,
            method=method,
            kind=last_kind,
            node=last_node,
            request_id=rid,
            attempts=attempts,
        )

    # --- helpers --------------------------------------------------------------------------------

    def _request_id_var(self) -> RequestIdVar:
        return self._rid_var

    def _warn_retry(self, target: str, method: str, rid: str, text: str) -> None:
        """WARNING about a retry, at most once per `warn_interval` per (target, method); DEBUG otherwise."""
        key = (target, method)
        now = time.monotonic()
        last, suppressed = self._warned.get(key, (float("-inf"), 0))
        if now - last >= self._warn_interval:
            if len(self._warned) >= _MAX_KEYS and key not in self._warned:
                self._warned.clear()
            self._warned[key] = (now, 0)
            more = f" ({suppressed} similar messages not logged)" if suppressed else ""
            self._log.warning("[%s] request %s %s.%s: %s%s", self.node_id, rid, target, method, text, more)
        else:
            self._warned[key] = (last, suppressed + 1)
            self._log.debug("[%s] request %s %s.%s: %s", self.node_id, rid, target, method, text)
