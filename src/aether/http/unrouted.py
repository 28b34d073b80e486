"""Deployed artifacts whose routes the route table cannot have yet (sans-IO).

A slice declares its routes in its class (``@route``), so they are known only once a node has
loaded the class, and a node claims them (``routes/`` keys) when it begins to activate the slice
(docs/deployment.md). Before that, a path of a freshly deployed slice matches no route: while the
wheel loads, while the slice waits for the slices it depends on, and for good when the wheel fails
to import. Answering 404 "no route" then is wrong (the path may well be the slice's, and the user
goes looking for a mistake in the path), so the router asks `unrouted` on a path that matches no
route: while it lists an artifact, the route table may be incomplete, and the router answers 503
with ``Retry-After: 1`` and this module's `detail` (which artifact, where it is, why it failed)
instead, as it does while its node has no quorum.

An artifact is listed when a blueprint wants it (some version, ``instances > 0``) and its routes
cannot be in the table yet:

- no route of the table calls it (``group:artifact``: any version's routes count), and
- no node has it ACTIVE, DEACTIVATE or DEACTIVATING (a node that activated it claimed its routes
  first: an artifact that got that far without a route declares none; not ACTIVATING, which the
  node writes just before its claim: a route table that saw the one and not yet the other answered
  a 404 in between), and
- no node reports it FAILED past loading (a reason not starting with ``load``: its activation
  began, so its routes were claimed and are kept while the blueprint wants it, or it declares
  none, or they belong to another artifact).

So listed: not placed yet, LOAD/LOADING/LOADED/ACTIVATE/ACTIVATING somewhere (loading, waiting
for its dependencies, starting a slice that turns out to declare no route), or FAILED to load on
every node that tried (``load failed: ...`` / ``load timed out ...``, the reasons
`SliceLifecycle` writes for its load step). The cost is a scan of ``blueprints/``
and ``slices/`` of the local replica, which the router does only for a path that matches no route
and caches until one of those prefixes or ``routes/`` changes.

Values are read by attribute (``BlueprintValue.slices[].artifact``/``instances``,
``SliceStateValue.state``/``reason``), as `aether.invoke.catalog` does. May import nothing of
aether.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_LISTED", "Unrouted", "detail", "unrouted"]

MAX_LISTED = 5
"""How many artifacts a detail names (the rest are counted)."""

# states in which a node has activated the artifact: its routes are claimed (ACTIVATING is written
# before the claim, so it is not one of them)
_ACTIVATED = frozenset({"ACTIVE", "DEACTIVATE", "DEACTIVATING"})
# the reasons of a FAILED load step (`SliceLifecycle`: "{step} failed: ..." / "{step} timed out ...")
_LOAD_FAILURES = ("load failed", "load timed out")


@dataclass(frozen=True, slots=True)
class Unrouted:
    """A deployed artifact (``group:artifact``) whose routes are not known yet, and what the nodes
    report of it: ``(node, state, reason)`` sorted by node (empty: not placed yet)."""

    name: str
    states: tuple[tuple[str, str, str | None], ...]

    @property
    def failed(self) -> bool:
        """Every node that has it reports FAILED (to load it)."""
        return bool(self.states) and all(s == "FAILED" for _, s, _ in self.states)


def _name(coords: str) -> str:
    return ":".join(coords.split(":", 2)[:2])


def unrouted(
    blueprints: Iterable[tuple[str, Any]], slices: Iterable[tuple[str, Any]], routed: Iterable[str]
) -> list[Unrouted]:
    """The artifacts of the module docstring, sorted by name. `blueprints` and `slices` are the
    ``blueprints/`` and ``slices/`` items of the store; `routed` the ``group:artifact`` targets of
    the route table."""
    wanted: set[str] = set()
    for _, value in blueprints:
        for s in getattr(value, "slices", None) or ():
            art = getattr(s, "artifact", None)
            if isinstance(art, str) and getattr(s, "instances", 1) > 0:
                wanted.add(_name(art))
    wanted.difference_update(routed)
    if not wanted:
        return []
    states: dict[str, list[tuple[str, str, str | None]]] = {n: [] for n in wanted}
    known: set[str] = set()
    for key, value in slices:
        parts = key.split("/", 2)
        if len(parts) != 3:
            continue
        name = _name(parts[2])
        if name not in states:
            continue
        state = getattr(value, "state", None)
        if not isinstance(state, str):
            continue
        reason = getattr(value, "reason", None)
        reason = reason if isinstance(reason, str) else None
        if state in _ACTIVATED or (state == "FAILED" and not (reason or "").startswith(_LOAD_FAILURES)):
            known.add(name)
        states[name].append((parts[1], state, reason))
    return [Unrouted(n, tuple(sorted(states[n]))) for n in sorted(wanted - known)]


def detail(method: str, path: str, pending: list[Unrouted]) -> str:
    """The 503's detail for a request to `method` `path` that matched no route while `pending`
    (non-empty) lists artifacts whose routes are not known yet."""
    parts: list[str] = []
    for u in pending[:MAX_LISTED]:
        if u.failed:
            reasons = "; ".join(f"{n}: {r or 'no reason given'}" for n, _, r in u.states)
            parts.append(f"{u.name} failed to load on every node that tried ({reasons}); the cluster "
                         "loads it again after a backoff")  # fmt: skip
        elif u.states:
            where = ", ".join(
                f"{s} on {n} ({r})" if s == "FAILED" and r else f"{s} on {n}" for n, s, r in u.states
            )
            parts.append(f"{u.name} is still loading, waiting for the slices it depends on, or starting "
                         f"({where})")  # fmt: skip
        else:
            parts.append(f"{u.name} is not placed on a node yet")
    more = len(pending) - MAX_LISTED
    if more > 0:
        parts.append(f"and {more} more")
    return (
        f"no route for {method} {path} yet, and it may be a route of a deployed slice that has not "
        f"declared its routes (a slice's routes are known once a node has loaded its class and "
        f"begun to activate it): {'; '.join(parts)}; retry shortly, or check the path"
    )
