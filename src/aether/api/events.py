"""Cluster events for the management API's server-sent event stream (`GET /api/v1/events`).

`EventHub(node)` listens to what one node sees and fans every event out to any number of
subscribers, each with its own bounded queue:

- `node-joined` `{node}` / `node-left` `{node, reason}`: the transport's `PeerUp` / `PeerDown`
  (as seen by this node), from `node.bus`;
- `leader-changed` `{leader, previous}`: `LeaderChanged`, from `node.bus`;
- `slice-state` `{key, node, artifact, state, reason, instances}` / `slice-removed`
  `{key, node, artifact}`: puts and removes under `slices/` (`node.kv.watch`);
- `blueprint-applied` `{key, id, slices: [{artifact, instances}]}` / `blueprint-deleted` `{key, id}`:
  puts and removes under `blueprints/`;
- `slice-blocked` `{node, artifact, entry, seconds, where, quarantined}`: slice code held its
  own event loop longer than the limit (`quarantined`: it kept doing so and was taken down on
  that node), from `node.bus`;
- `controller-decision` `{seq, kind, rule, reason, artifact, node, instance, from_count, to_count,
  inputs, applied, source}`: a decision of the layer-1 controller (made here on the leader, or
  synced from it), and `alert-firing` / `alert-resolved` (same fields) for alert transitions,
  from `node.bus` (`aether.controller.service`);
- `fault` `{node, action, target, peer, artifact, fault, instances, by}`: a fault was set or
  cleared on this node (`aether.node.faults.FaultChanged`, from `node.bus`; Forge's timeline);
- `rollout` `{key, artifact, id, state, strategy, old_version, new_version, step, weights,
  old_instances, new_instances, reason, message}`: a rollout of a new version started, took a
  step, paused, rolled back or ended (`message`: the step's line of its history), from the
  `rollouts/` watch (every node sees every step, whichever node leads);
- `resync` `{prefix}`: the node installed a snapshot; state under `prefix` may have changed at once;
- `dropped` `{reason, last_id}`: the last event of a subscriber that fell `queue_size` events behind.

Every data object also carries `type` (the event name) and `time` (epoch seconds). Ids increase
by one per event of the hub (all subscribers see the same id for the same event). Callbacks run on
the node's event loop; nothing here blocks or buffers without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec

__all__ = ["DEFAULT_QUEUE_SIZE", "Event", "EventHub", "EventSource", "Subscription"]

DEFAULT_QUEUE_SIZE = 256


class _Bus(Protocol):
    def subscribe(self, msg_type: type[Any], handler: Callable[[Any], object]) -> Callable[[], None]: ...


class _KV(Protocol):
    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]: ...


class EventSource(Protocol):
    """What the hub needs of a node: its event bus and its replicated store."""

    node_id: str
    bus: _Bus
    kv: _KV


class Event(msgspec.Struct, frozen=True):
    """One event: its id, its type (`event:` line) and its JSON-able data (`data:` line)."""

    id: int
    type: str
    data: dict[str, Any]


class Subscription:
    """One subscriber's view of the hub: an async iterator of events, ended by `close()`."""

    def __init__(self, hub: EventHub, limit: int) -> None:
        self._hub = hub
        self._limit = limit
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._final: Event | None = None
        self.last_id = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _push(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._queue) >= self._limit:
            # too slow: no more events, just a final one after what is already queued
            last = self._queue[-1].id if self._queue else event.id - 1
            self._final = Event(
                event.id,
                "dropped",
                {
                    "type": "dropped",
                    "time": time.time(),
                    "reason": f"client fell {self._limit} events behind; reconnect to follow again",
                    "last_id": last,
                },
            )
            self._end()
            return
        self._queue.append(event)
        self._wake.set()

    def _end(self) -> None:
        self._closed = True
        self._hub._discard(self)
        self._wake.set()

    def close(self) -> None:
        """Unsubscribe (idempotent); the iterator ends after the events already queued."""
        self._end()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._queue:
                ev = self._queue.popleft()
                self.last_id = ev.id
                return ev
            if self._final is not None:
                ev, self._final = self._final, None
                return ev
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds (StopAsyncIteration at the end)."""
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except TimeoutError:
            return None


class EventHub:
    """Fans out one node's cluster events to subscribers (see the module docstring)."""

    def __init__(
        self,
        node: EventSource,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        logger: logging.Logger | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._node = node
        self._queue_size = queue_size
        self._log = logger or logging.getLogger("aether.api.events")
        self._ids = itertools.count(1)
        self._subs: set[Subscription] = set()
        self._cancels: list[Callable[[], None]] = []
        self.last_id = 0

    @property
    def started(self) -> bool:
        return bool(self._cancels)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def start(self) -> None:
        """Subscribe to the node's event bus and store (idempotent)."""
        if self._cancels:
            return
        from aether.cluster.leader import LeaderChanged
        from aether.controller.types import Decision
        from aether.node.faults import FaultChanged
        from aether.slices.isolation import SliceBlockedNotice
        from aether.transport import PeerDown, PeerUp

        bus, kv = self._node.bus, self._node.kv
        self._cancels = [
            bus.subscribe(PeerUp, lambda ev: self.publish("node-joined", {"node": ev.node_id})),
            bus.subscribe(
                PeerDown, lambda ev: self.publish("node-left", {"node": ev.node_id, "reason": ev.reason})
            ),
            bus.subscribe(
                LeaderChanged,
                lambda ev: self.publish("leader-changed", {"leader": ev.leader, "previous": ev.previous}),
            ),
            bus.subscribe(
                SliceBlockedNotice,
                lambda ev: self.publish("slice-blocked", msgspec.structs.asdict(ev)),
            ),
            bus.subscribe(Decision, self._on_decision),
            bus.subscribe(FaultChanged, lambda ev: self.publish("fault", msgspec.to_builtins(ev))),
            kv.watch("slices/", self._on_slice),
            kv.watch("blueprints/", self._on_blueprint),
            kv.watch("rollouts/", self._on_rollout),
        ]

    def stop(self) -> None:
        """Unsubscribe from the node and end every subscription (idempotent)."""
        cancels, self._cancels = self._cancels, []
        for cancel in cancels:
            cancel()
        for sub in list(self._subs):
            sub.close()

    def subscribe(self) -> Subscription:
        """A new subscription; iterate it (`async for ev in sub`) and `close()` it when done."""
        sub = Subscription(self, self._queue_size)
        self._subs.add(sub)
        return sub

    def _discard(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, type_: str, data: dict[str, Any]) -> Event:
        """Give an event the next id and queue it for every subscriber."""
        event_id = next(self._ids)
        self.last_id = event_id
        ev = Event(event_id, type_, {"type": type_, "time": time.time(), **data})
        for sub in list(self._subs):
            sub._push(ev)
        return ev

    def _on_decision(self, d: Any) -> None:
        kinds = {"alert_firing": "alert-firing", "alert_resolved": "alert-resolved"}
        self.publish(kinds.get(d.kind, "controller-decision"), msgspec.to_builtins(d))

    # -- store watches ----------------------------------------------------------------------------

    @staticmethod
    def _decode(key: str, raw: bytes | None) -> Any:
        if raw is None:
            return None
        from aether.kv.contract import decode_value

        try:
            return msgspec.to_builtins(decode_value(key, raw))
        except Exception:  # a value this version cannot decode: report the key anyway
            return None

    def _on_slice(self, ev: Any) -> None:
        if ev.kind == "reset":
            self.publish("resync", {"prefix": "slices/"})
            return
        node, _, artifact = ev.key[len("slices/") :].partition("/")
        base = {"key": ev.key, "node": node, "artifact": artifact}
        if ev.kind == "remove":
            self.publish("slice-removed", base)
            return
        v = self._decode(ev.key, ev.value)
        v = v if isinstance(v, dict) else {}
        self.publish(
            "slice-state",
            {**base, "state": v.get("state"), "reason": v.get("reason"), "instances": v.get("instances", [])},
        )

    def _on_rollout(self, ev: Any) -> None:
        if ev.kind == "reset":
            self.publish("resync", {"prefix": "rollouts/"})
            return
        artifact = ev.key[len("rollouts/") :]
        v = self._decode(ev.key, ev.value) if ev.kind != "remove" else None
        if not isinstance(v, dict):
            self.publish("rollout", {"key": ev.key, "artifact": artifact, "state": "removed"})
            return
        history = v.get("history") or []
        self.publish("rollout", {
            "key": ev.key, "artifact": artifact, "id": v.get("id"), "state": v.get("state"),
            "strategy": v.get("strategy"), "old_version": v.get("old_version"),
            "new_version": v.get("new_version"), "step": v.get("step"), "weights": v.get("weights", {}),
            "old_instances": v.get("old_instances"), "new_instances": v.get("new_instances"),
            "reason": v.get("reason", ""), "message": history[-1] if history else "",
        })  # fmt: skip

    def _on_blueprint(self, ev: Any) -> None:
        if ev.kind == "reset":
            self.publish("resync", {"prefix": "blueprints/"})
            return
        base = {"key": ev.key, "id": ev.key[len("blueprints/") :]}
        if ev.kind == "remove":
            self.publish("blueprint-deleted", base)
            return
        v = self._decode(ev.key, ev.value)
        slices = v.get("slices", []) if isinstance(v, dict) else []
        self.publish("blueprint-applied", {**base, "slices": slices})
