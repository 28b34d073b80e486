"""`EndpointRegistry`: every node's passive, in-memory cache of the `endpoints/…` keys.

Owns: discovery answers for the invoker and the HTTP router ("which instances of artifact X,
entry M are ACTIVE, and on which node"). It never writes. It fills itself from the local
replica (`list_local`) when started and follows the `endpoints/` watch afterwards (watch
events arrive in commit order, identical on every node; a `reset` after a snapshot install
re-reads everything). May import `aether.core` and `aether.kv`.

Lookups accept full coordinates (`org.demo:hello:1.0.0`: that version only) or
`group:artifact` (`org.demo:hello`: every version).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from aether.core.errors import BadRequest
from aether.kv.contract import ClusterStore, WatchEvent, decode_value
from aether.kv.keys import EndpointKey, EndpointValue, EntryPolicy, parse_key

PREFIX = "endpoints/"


@dataclass(frozen=True, slots=True, order=True)
class EndpointInfo:
    artifact: str  # full coordinates
    method: str  # entry point name
    instance: int
    node_id: str
    state: str
    # the entry's effective policy as its node published it (None: the defaults); the invoker follows it
    policy: EntryPolicy | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class EndpointChange:
    """`kind` is "put", "remove" or "reset" (then the other fields are empty: re-read everything)."""

    kind: str
    artifact: str = ""
    method: str = ""
    instance: int = -1
    info: EndpointInfo | None = None  # the new value for "put", the old one for "remove"


EndpointListener = Callable[[EndpointChange], None]


def _name_of(coords: str) -> str:
    parts = coords.split(":")
    return ":".join(parts[:2])


class EndpointRegistry:
    """Cache of endpoints. `start()` (idempotent) before use; `close()` stops following the store."""

    def __init__(self, kv: ClusterStore, *, logger: logging.Logger | None = None) -> None:
        self.kv = kv
        self.log = logger or logging.getLogger("aether.deploy.endpoints")
        # coords -> (method, instance) -> info
        self._by_artifact: dict[str, dict[tuple[str, int], EndpointInfo]] = {}
        self._names: dict[str, set[str]] = {}  # group:artifact -> coords
        self._listeners: list[EndpointListener] = []
        self._cancel: Callable[[], None] | None = None
        # `instances` answers, per (artifact, method): the invoker asks on every call (the policy of
        # a local attempt, the candidates of a remote one); emptied on every change
        self._answers: dict[tuple[str, str], tuple[EndpointInfo, ...]] = {}

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

    def instances(self, artifact: str, method: str) -> list[EndpointInfo]:
        """ACTIVE instances of `artifact` (coordinates or group:artifact) serving `method`,
        sorted by (artifact, instance)."""
        known = self._answers.get((artifact, method))
        if known is not None:
            return list(known)  # a copy: the caller may change its list
        out: list[EndpointInfo] = []
        for coords in self._coords(artifact):
            for (m, _), info in self._by_artifact.get(coords, {}).items():
                if m == method and info.state == "ACTIVE":
                    out.append(info)
        out.sort(key=lambda i: (i.artifact, i.instance))
        if len(self._answers) >= 4096:
            self._answers.clear()
        self._answers[(artifact, method)] = tuple(out)
        return out

    def cached_instances(self, artifact: str, method: str) -> tuple[EndpointInfo, ...] | None:
        """`instances(artifact, method)` as last answered, or None when it has not been asked since
        the last change. Only reads: safe from another thread (the shared slice loop's)."""
        return self._answers.get((artifact, method))

    def all(self, artifact: str | None = None) -> list[EndpointInfo]:
        """Every cached endpoint (any state), optionally of one artifact, sorted."""
        coords = self._coords(artifact) if artifact is not None else list(self._by_artifact)
        return sorted(i for c in coords for i in self._by_artifact.get(c, {}).values())

    def methods(self, artifact: str) -> list[str]:
        return sorted({m for c in self._coords(artifact) for (m, _), i in self._by_artifact[c].items()
                       if i.state == "ACTIVE"})

    def artifacts(self) -> list[str]:
        """Coordinates with at least one ACTIVE endpoint."""
        return sorted(c for c, eps in self._by_artifact.items()
                      if any(i.state == "ACTIVE" for i in eps.values()))

    def nodes(self, artifact: str) -> list[str]:
        return sorted({i.node_id for c in self._coords(artifact) for i in self._by_artifact[c].values()
                       if i.state == "ACTIVE"})

    def add_listener(self, listener: EndpointListener) -> Callable[[], None]:
        """Call `listener(change)` after every change; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    # --- internals ------------------------------------------------------------------------------

    def _coords(self, artifact: str) -> list[str]:
        if artifact.count(":") >= 2:
            return [artifact] if artifact in self._by_artifact else []
        return sorted(self._names.get(artifact, ()))

    def _reload(self) -> None:
        self._answers.clear()
        self._by_artifact.clear()
        self._names.clear()
        for key, value in self.kv.list_local(PREFIX):
            if isinstance(value, EndpointValue):
                self._put(key, value)

    def _put(self, key: str, value: EndpointValue) -> EndpointInfo | None:
        k = self._parse(key)
        if k is None:
            return None
        self._answers.clear()
        info = EndpointInfo(k.artifact, k.method, k.instance, value.node_id, value.state, value.policy)
        self._by_artifact.setdefault(k.artifact, {})[(k.method, k.instance)] = info
        self._names.setdefault(_name_of(k.artifact), set()).add(k.artifact)
        return info

    def _remove(self, key: str) -> EndpointInfo | None:
        k = self._parse(key)
        if k is None:
            return None
        self._answers.clear()
        eps = self._by_artifact.get(k.artifact)
        if eps is None:
            return None
        old = eps.pop((k.method, k.instance), None)
        if not eps:
            del self._by_artifact[k.artifact]
            names = self._names.get(_name_of(k.artifact))
            if names is not None:
                names.discard(k.artifact)
                if not names:
                    del self._names[_name_of(k.artifact)]
        return old

    def _parse(self, key: str) -> EndpointKey | None:
        try:
            k = parse_key(key)
        except BadRequest:
            self.log.warning("ignoring malformed endpoint key %r", key)
            return None
        return k if isinstance(k, EndpointKey) else None

    def _on_event(self, ev: WatchEvent) -> None:
        if ev.kind == "reset":
            self._reload()
            self._notify(EndpointChange("reset"))
            return
        if ev.kind == "put" and ev.value is not None:
            try:
                value = decode_value(ev.key, ev.value)
            except (msgspec.DecodeError, BadRequest):
                self.log.warning("ignoring undecodable endpoint value at %r", ev.key)
                return
            info = self._put(ev.key, value)
            if info is not None:
                self._notify(EndpointChange("put", info.artifact, info.method, info.instance, info))
        elif ev.kind == "remove":
            old = self._remove(ev.key)
            if old is not None:
                self._notify(EndpointChange("remove", old.artifact, old.method, old.instance, old))

    def _notify(self, change: EndpointChange) -> None:
        for cb in list(self._listeners):
            try:
                cb(change)
            except Exception:
                self.log.exception("endpoint listener failed")
