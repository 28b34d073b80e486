"""`TrafficTable`: every node's passive, in-memory cache of the `rollouts/…` keys' traffic weights.

Owns: the answer to "how is the traffic to ``group:artifact`` split between its versions right
now" for the invoker (`aether.invoke.ports.Traffic`) and through it the HTTP router. It never
writes: the leader's rollout manager writes `rollouts/{group:artifact}` (`RolloutValue`). It fills
itself from the local replica (`list_local`) when started and follows the `rollouts/` watch
afterwards (commit order, identical on every node; a `reset` after a snapshot install re-reads
everything), like `aether.deploy.endpoints.EndpointRegistry`. May import `aether.core` and `aether.kv`.

Only the weights are kept (the invoker's question is asked on every call: one dict lookup). A
rollout without weights, a removed rollout, and an artifact that never had one all answer an empty
mapping (no split). The meaning of the weights is `RolloutValue`'s (aether/kv/keys.py) and the
invoker applies it (docs/invocation.md, *Weighted version choice*).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType

import msgspec

from aether.core.errors import BadRequest
from aether.kv.contract import ClusterStore, WatchEvent, decode_value
from aether.kv.keys import RolloutKey, RolloutValue, parse_key

__all__ = ["PREFIX", "TrafficTable"]

PREFIX = "rollouts/"
_NONE: Mapping[str, int] = MappingProxyType({})


class TrafficTable:
    """Cache of the rollouts' weights. `start()` (idempotent) before use; `close()` stops following."""

    def __init__(self, kv: ClusterStore, *, logger: logging.Logger | None = None) -> None:
        self.kv = kv
        self.log = logger or logging.getLogger("aether.deploy.traffic")
        self._weights: dict[str, Mapping[str, int]] = {}  # group:artifact -> version -> weight
        self._cancel: Callable[[], None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._cancel is not None:
            return
        self._cancel = self.kv.watch(PREFIX, self._on_event)
        self._reload()

    def close(self) -> None:
        if self._cancel is not None:
            self._cancel()
            self._cancel = None

    # --- queries --------------------------------------------------------------------------------

    def weights(self, group_artifact: str) -> Mapping[str, int]:
        """Version -> weight of the calls to `group_artifact` (read-only; empty: no split)."""
        return self._weights.get(group_artifact, _NONE)

    def split(self) -> dict[str, dict[str, int]]:
        """Every artifact with a split now: ``{group:artifact: {version: weight}}`` (a copy)."""
        return {a: dict(w) for a, w in sorted(self._weights.items())}

    # --- internals ------------------------------------------------------------------------------

    def _reload(self) -> None:
        self._weights.clear()
        for key, value in self.kv.list_local(PREFIX):
            self._put(key, value)

    def _artifact(self, key: str) -> str | None:
        try:
            k = parse_key(key)
        except BadRequest:
            self.log.warning("ignoring malformed rollout key %r", key)
            return None
        return k.artifact if isinstance(k, RolloutKey) else None

    def _put(self, key: str, value: object) -> None:
        artifact = self._artifact(key)
        if artifact is None:
            return
        if not isinstance(value, RolloutValue):
            self.log.warning("ignoring unreadable rollout at %r", key)
            self._weights.pop(artifact, None)
            return
        bad = {v: w for v, w in value.weights.items() if isinstance(w, bool) or w < 0}
        if bad:
            self.log.warning("rollout %s: ignoring negative weights %s", artifact, bad)
        weights = {v: w for v, w in value.weights.items() if v not in bad}
        if weights:
            self._weights[artifact] = MappingProxyType(weights)
        else:
            self._weights.pop(artifact, None)

    def _on_event(self, ev: WatchEvent) -> None:
        if ev.kind == "reset":
            self._reload()
            return
        if ev.kind == "put" and ev.value is not None:
            try:
                value = decode_value(ev.key, ev.value)
            except (msgspec.DecodeError, BadRequest):
                value = None
            self._put(ev.key, value)
        elif ev.kind == "remove":
            artifact = self._artifact(ev.key)
            if artifact is not None:
                self._weights.pop(artifact, None)
