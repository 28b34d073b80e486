"""`StoreCatalog`: what the replicated store says about a call target that has no reachable instance.

The invoker asks it only on its slow path, when a call finds no ACTIVE instance to try, to decide
between waiting (an instance is ACTIVE somewhere, e.g. on a node that is down and may come back
or be replaced) and answering at once (the target is unknown, or deployed but not ACTIVE anywhere).

It reads the node's local replica through `list_local` (the `KVStore` method) and the decoded
values by attribute (``BlueprintValue.slices[].artifact``, ``SliceStateValue.state``/``reason``,
``EndpointValue.state``), so it imports nothing outside the standard library: `aether.invoke`
may not import `aether.kv` or `aether.deploy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

__all__ = [
    "ACTIVE",
    "FAILED",
    "STARTING",
    "UNKNOWN_ARTIFACT",
    "UNKNOWN_ENTRY",
    "StoreCatalog",
    "StoreReader",
]

ACTIVE = "active"  # an endpoint of this entry is ACTIVE in the store (maybe on a node that is down)
STARTING = "starting"  # a blueprint wants the artifact; no instance is ACTIVE yet
FAILED = "failed"  # a blueprint wants the artifact; every instance the store knows of FAILED
UNKNOWN_ARTIFACT = "unknown_artifact"  # no blueprint names it and no node hosts it
UNKNOWN_ENTRY = "unknown_entry"  # ACTIVE instances exist, but none has this entry

_STOPPING = frozenset({"DEACTIVATE", "DEACTIVATING", "UNLOAD", "UNLOADING"})


class StoreReader(Protocol):
    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...


def _matches(coords: str, target: str) -> bool:
    """`coords` (``g:a:v``) is `target` (``g:a:v``) or a version of it (``g:a``)."""
    return coords == target or (target.count(":") == 1 and coords.startswith(target + ":"))


class StoreCatalog:
    """Answers `presence(target, method) -> (state, detail)` from the local replica of the store.

    `state` is one of the module constants; `detail` is a sentence for the caller (empty for
    `ACTIVE`). Cost: one prefix scan of ``endpoints/`` for the target, and when nothing is ACTIVE
    a scan of ``blueprints/`` and ``slices/`` — only on the invoker's no-instance path.
    """

    def __init__(self, store: StoreReader) -> None:
        self._store = store

    def presence(self, target: str, method: str) -> tuple[str, str]:
        prefix = f"endpoints/{target}/" if target.count(":") >= 2 else f"endpoints/{target}:"
        entries: set[str] = set()
        for key, value in self._store.list_local(prefix):
            if getattr(value, "state", None) != "ACTIVE":
                continue
            entry = key.rsplit("/", 1)[-1].rpartition(":")[0]
            if entry == method:
                return ACTIVE, ""
            entries.add(entry)
        if entries:
            return UNKNOWN_ENTRY, (
                f"{target} has no entry {method!r}; its ACTIVE instances serve: {', '.join(sorted(entries))}"
            )
        desired = self._desired(target)
        states = self._states(target)
        if not desired:
            if states and not all(s in _STOPPING for s, _ in states.values()):
                # hosted somewhere although no blueprint names it (yet, or the blueprint was just
                # removed): treat it as starting rather than unknown
                return STARTING, self._starting_text(target, method, states)
            return UNKNOWN_ARTIFACT, (
                f"{target} is not deployed: no blueprint names it and no node hosts it "
                f"(deploy it, or check the coordinates)"
            )
        failed = {n: r for n, (s, r) in states.items() if s == "FAILED"}
        if failed and len(failed) == len(states):
            reasons = "; ".join(f"{n}: {r or 'no reason given'}" for n, r in sorted(failed.items()))
            return FAILED, (
                f"{target} is deployed but every instance FAILED ({reasons}); the cluster starts "
                "them again after a backoff"
            )
        return STARTING, self._starting_text(target, method, states)

    @staticmethod
    def _starting_text(target: str, method: str, states: dict[str, tuple[str, str | None]]) -> str:
        # a FAILED one with its reason: while the leader places a failed start again, the others
        # are back in LOAD/ACTIVATE, and the reason is the only sign of why nothing serves
        where = ", ".join(
            f"{s} on {n} ({r})" if s == "FAILED" and r else f"{s} on {n}"
            for n, (s, r) in sorted(states.items())
        ) or "not placed yet"
        return f"{target} has no ACTIVE instance serving {method!r} yet ({where}); retry shortly"

    def _desired(self, target: str) -> list[str]:
        out: list[str] = []
        for key, value in self._store.list_local("blueprints/"):
            slices: Iterable[Any] = getattr(value, "slices", None) or ()
            for s in slices:
                art = getattr(s, "artifact", "")
                if isinstance(art, str) and _matches(art, target) and getattr(s, "instances", 1) > 0:
                    out.append(key)
        return out

    def _states(self, target: str) -> dict[str, tuple[str, str | None]]:
        """node -> (state, reason) of the `slices/{node}/{coords}` records of the target."""
        out: dict[str, tuple[str, str | None]] = {}
        for key, value in self._store.list_local("slices/"):
            parts = key.split("/", 2)
            if len(parts) != 3 or not _matches(parts[2], target):
                continue
            state = getattr(value, "state", None)
            if isinstance(state, str):
                out[parts[1]] = (state, getattr(value, "reason", None))
        return out
