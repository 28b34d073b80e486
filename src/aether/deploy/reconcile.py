"""The leader's reconciliation pass as a pure function: store contents in, compare-and-set writes out.

Owns: how desired state is derived from blueprints, failure backoff bookkeeping, and which
lifecycle command the leader writes for every (node, artifact). The asyncio adapter
(`cluster_manager`) reads the local replica, calls `plan`, and executes the writes. May import
`aether.kv` (keys and values) and `aether.deploy.{allocation,lifecycle,rollout}`; no I/O, no clock
(`now` is passed in).

Per pass:

1. Keys and endpoints of nodes that are down (and past the grace period) are removed.
   Nodes down but within the grace period keep their placements and get no new ones.
2. The current placement is read from the keys (states LOAD..ACTIVE count as placed; FAILED
   pairs are dropped and their ids freed) and `allocation.allocate` computes the target.
3. For every (live node, artifact):
   - no key, target has ids           -> `LOAD(ids)`            (CAS absent -> LOAD)
   - LOADED, target has ids, every `depends_on` artifact has an ACTIVE instance somewhere
                                      -> `ACTIVATE(target ids)` (CAS LOADED -> ACTIVATE)
   - ACTIVE, target ids differ        -> `ACTIVE(target ids)`   (scale; CAS)
   - ACTIVE, target has none          -> `DEACTIVATE`
   - LOADED, target has none          -> `UNLOAD`
   - FAILED, backoff over             -> `UNLOAD` (keeps the reason); the instances were
     already re-placed elsewhere when the node reported FAILED
   - any state in transit             -> wait for the node
   Bounded work per pass: an ACTIVATE or a scale-up command starts at most `max_starts` new
   instances on a node (the lowest new ids); the next pass, triggered by the node's ACTIVE
   report, adds the next ones. Removals are never held back. A node starts instances in steps
   of bounded size, so its event loop (heartbeats, consensus, the API) is never blocked by one
   huge step, and a later change (e.g. deleting the blueprint) is picked up between steps.
4. Routes whose artifact has no endpoint and no key in ACTIVATE/ACTIVATING/ACTIVE anywhere,
   and that no blueprint wants (any version, instances > 0), are removed (backstop of the nodes'
   own route cleanup, e.g. when the last instance was on a node that died). A wanted artifact
   that is not serving (its start failed) keeps its routes: the router answers 503 with why.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aether.core.errors import BadRequest
from aether.deploy.allocation import Placement, allocate
from aether.deploy.lifecycle import PRESENT_STATES, SliceState
from aether.deploy.rollout import ACTIVE_STATES
from aether.deploy.rollout import overrides as rollout_overrides
from aether.kv.keys import (
    BlueprintValue,
    EndpointKey,
    EndpointValue,
    RolloutValue,
    RouteValue,
    ScaleValue,
    ScalingRule,
    SliceKey,
    SliceStateValue,
    parse_key,
)


@dataclass(frozen=True, slots=True)
class DesiredSlice:
    instances: int
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Autoscaled:
    """An autoscaled artifact: its rule, the bounds in force and the count they allow now."""

    rule: ScalingRule
    min: int
    max: int
    bounds_source: Literal["blueprint", "operator"]
    instances: int
    """The controller's (or operator's) count in `scale/{artifact}`, else the blueprint's, clamped
    to [min, max]."""
    count_source: str
    """Who set `instances`: ``controller``, ``operator`` or ``blueprint``."""


def autoscaled(
    blueprints: Iterable[BlueprintValue], scales: Mapping[str, ScaleValue] | None = None
) -> dict[str, Autoscaled]:
    """The artifacts that have a `[slices.NAME.scaling]` rule (the first blueprint that gives one
    wins), with the bounds in force: an operator's `min`/`max` in `scale/{artifact}` override the
    rule's while set."""
    out: dict[str, Autoscaled] = {}
    base: dict[str, int] = {}
    for bp in blueprints:
        for s in bp.slices:
            if s.scaling is not None and s.artifact not in out:
                sv = (scales or {}).get(s.artifact)
                lo = sv.min if sv is not None and sv.min is not None else s.scaling.min
                hi = sv.max if sv is not None and sv.max is not None else s.scaling.max
                hi = max(lo, hi)
                by_operator = sv is not None and (sv.min is not None or sv.max is not None)
                source: Literal["blueprint", "operator"] = "operator" if by_operator else "blueprint"
                count, by = (sv.instances, sv.source) if sv is not None else (s.instances, "blueprint")
                out[s.artifact] = Autoscaled(s.scaling, lo, hi, source, min(hi, max(lo, count)), by)
            base[s.artifact] = max(base.get(s.artifact, 0), s.instances)
    return out


def desired_state(
    blueprints: Iterable[BlueprintValue],
    scales: Mapping[str, ScaleValue] | None = None,
    rollouts: Iterable[RolloutValue] = (),
) -> dict[str, DesiredSlice]:
    """Desired instances per artifact: the maximum over the blueprints listing it (two
    blueprints asking for 2 and 3 instances of one artifact share 3 instances, they do not get
    5); `depends_on` is the union over those blueprints. An autoscaled artifact (one with a
    `[slices.NAME.scaling]` rule) gets the count of `autoscaled` instead: the controller's within
    the bounds in force. While a rollout of an artifact is active (`aether.deploy.rollout`), its
    two versions get the rollout's counts instead of what the blueprints say about any version of
    it (a version with 0 is left out); both take the dependencies the blueprints give any version."""
    bps = list(blueprints)
    counts: dict[str, int] = {}
    deps: dict[str, set[str]] = {}
    for bp in bps:
        for s in bp.slices:
            if s.instances < 1:
                continue
            counts[s.artifact] = max(counts.get(s.artifact, 0), s.instances)
            deps.setdefault(s.artifact, set()).update(s.depends_on)
    for a, auto in autoscaled(bps, scales).items():
        if a in counts:
            counts[a] = auto.instances
    for name, versions in rollout_overrides(rollouts).items():
        shared: set[str] = set()
        for a in [a for a in counts if a.rpartition(":")[0] == name]:
            shared |= deps.get(a, set())
            del counts[a]
        for a, n in versions.items():
            if n > 0:
                counts[a] = n
                deps[a] = shared
    return {a: DesiredSlice(n, tuple(sorted(deps[a]))) for a, n in counts.items()}


def stale_scales(
    blueprints: Iterable[BlueprintValue],
    scales: Mapping[str, ScaleValue],
    rollouts: Iterable[RolloutValue] = (),
) -> list[Write]:
    """The removals of the `scale/` values nothing needs any more: those of an artifact that no
    blueprint autoscales (its blueprint deleted, the artifact undeployed or replaced by another
    version, its scaling rule removed) and no active rollout names as its old or new version (a
    rollback brings the old version back, with its count). As deleting a Kubernetes Deployment
    forgets its scale, a blueprint applied again starts from its own count and bounds, not from an
    operator's pin or the controller's count of before."""
    live = set(autoscaled(blueprints))
    for r in rollouts:
        if r.state in ACTIVE_STATES:
            live |= {f"{r.artifact}:{r.old_version}", f"{r.artifact}:{r.new_version}"}
    return [
        Write(f"scale/{a}", sv, None, f"no blueprint autoscales {a} any more")
        for a, sv in sorted(scales.items()) if a not in live
    ]  # fmt: skip


def slice_states(items: Iterable[tuple[str, object]]) -> dict[str, dict[str, SliceStateValue]]:
    """`{node: {artifact: state}}` from the `slices/` entries of a store listing (others skipped)."""
    out: dict[str, dict[str, SliceStateValue]] = {}
    for key, v in items:
        if not isinstance(v, SliceStateValue):
            continue
        try:
            k = parse_key(key)
        except BadRequest:
            continue
        if isinstance(k, SliceKey):
            out.setdefault(k.node_id, {})[k.artifact] = v
    return out


def scale_values(items: Iterable[tuple[str, object]]) -> dict[str, ScaleValue]:
    """`{artifact: ScaleValue}` from the `scale/` entries of a store listing."""
    return {k.removeprefix("scale/"): v for k, v in items if isinstance(v, ScaleValue)}


@dataclass(frozen=True, slots=True)
class Write:
    """`compare_and_set(key, expected, new)`; `new=None` removes the key."""

    key: str
    expected: Any
    new: Any
    why: str


class FailureTracker:
    """Per (artifact, node) failure counts with exponential backoff (leader-local memory).

    A FAILED report is counted once (by its timestamp). After the k-th failure, the pair is
    blocked for `min(cap, base * 2**(k-1))` seconds: the FAILED key stays (its reason visible to
    operators) and the pair receives no new instances; then the leader UNLOADs it. A pair with
    `max_per_node` or more failures is avoided while another node is eligible. Reaching ACTIVE
    resets the count.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, max_per_node: int = 3) -> None:
        self.base = base
        self.cap = cap
        self.max_per_node = max_per_node
        self.failures: dict[tuple[str, str], int] = {}
        self.blocked_until: dict[tuple[str, str], float] = {}
        self._seen: dict[tuple[str, str], float] = {}

    def observe(self, slices: Mapping[str, Mapping[str, SliceStateValue]], now: float) -> None:
        for node, per in slices.items():
            for artifact, v in per.items():
                pair = (artifact, node)
                if v.state == SliceState.FAILED:
                    if self._seen.get(pair) != v.timestamp:
                        self._seen[pair] = v.timestamp
                        k = self.failures.get(pair, 0) + 1
                        self.failures[pair] = k
                        self.blocked_until[pair] = now + min(self.cap, self.base * 2 ** (k - 1))
                elif v.state == SliceState.ACTIVE:
                    self.failures.pop(pair, None)
                    self.blocked_until.pop(pair, None)

    def in_backoff(self, artifact: str, node: str, now: float) -> bool:
        return now < self.blocked_until.get((artifact, node), 0.0)

    def excluded(self, artifact: str, nodes: Sequence[str], now: float) -> set[tuple[str, str]]:
        backoff = {n for n in nodes if self.in_backoff(artifact, n, now)}
        avoided = {n for n in nodes if self.failures.get((artifact, n), 0) >= self.max_per_node}
        if set(nodes) - backoff - avoided:
            backoff |= avoided
        return {(artifact, n) for n in backoff}

    def forget_node(self, node: str) -> None:
        for d in (self.failures, self.blocked_until, self._seen):
            for pair in [p for p in d if p[1] == node]:
                del d[pair]


@dataclass(slots=True)
class Plan:
    writes: list[Write] = field(default_factory=list)
    target: Placement = field(default_factory=dict)
    current: Placement = field(default_factory=dict)


def _state(v: SliceStateValue) -> SliceState | None:
    try:
        return SliceState(v.state)
    except ValueError:
        return None


def _bounded(running: Sequence[int], target: Sequence[int], max_starts: int | None) -> list[int]:
    """`target`, but with at most `max_starts` ids that are not `running` yet (the lowest)."""
    have = set(running)
    keep = [i for i in target if i in have]
    new = sorted(i for i in target if i not in have)
    if max_starts is not None:
        new = new[: max(1, max_starts)]
    return sorted(keep + new)


def plan(
    desired: Mapping[str, DesiredSlice],
    up: Sequence[str],
    grace: Collection[str],
    slices: Mapping[str, Mapping[str, SliceStateValue]],
    endpoints: Sequence[tuple[str, EndpointValue]],
    routes: Sequence[tuple[str, RouteValue]],
    failures: FailureTracker,
    now: float,
    wall: float,
    *,
    capacity: int | None = None,
    max_starts: int | None = None,
    avoid: Collection[str] = (),
) -> Plan:
    """One reconciliation pass. `slices` is `{node: {artifact: value}}` for every key in the store;
    `up` the live nodes (the leader included); `grace` the nodes down for less than the grace
    period; `now` a monotonic clock for backoff, `wall` the timestamp written into commands;
    `capacity` the instances one node may run (admission control), `max_starts` the new
    instances one command may start (None: unbounded); `avoid` the nodes that get no new
    instances (the controller's saturated nodes: their existing instances stay), ignored when it
    holds every live node."""
    out = Plan()
    up_set = set(up)
    known = up_set | set(grace)
    nodes = sorted(known)

    # 1. dead nodes
    for node in sorted(slices):
        if node in known:
            continue
        for artifact, dv in sorted(slices[node].items()):
            out.writes.append(Write(str(SliceKey(node, artifact)), dv, None, f"node {node} is down"))
    live_endpoint_artifacts: set[str] = set()
    for key, ev in endpoints:
        if ev.node_id not in known:
            out.writes.append(Write(key, ev, None, f"node {ev.node_id} is down"))
            continue
        try:
            k = parse_key(key)
        except BadRequest:
            continue
        if isinstance(k, EndpointKey) and ev.state == SliceState.ACTIVE:
            live_endpoint_artifacts.add(k.artifact)

    # 2. current and target placement
    live_slices = {n: slices.get(n, {}) for n in nodes}
    failures.observe(live_slices, now)
    current: Placement = {}
    failed: set[tuple[str, str]] = set()
    idle: set[tuple[str, str]] = set()
    activating: set[str] = set()
    active: set[str] = set()
    for n, per in live_slices.items():
        for a, sv in per.items():
            st = _state(sv)
            if st in PRESENT_STATES and sv.instances:
                current.setdefault(a, {})[n] = list(sv.instances)
                if st is not SliceState.ACTIVE:
                    idle.add((a, n))
            elif st is SliceState.FAILED:
                failed.add((a, n))
            if st in (SliceState.ACTIVATE, SliceState.ACTIVATING, SliceState.ACTIVE):
                activating.add(a)
            if st is SliceState.ACTIVE and sv.instances:
                active.add(a)
    excluded: set[tuple[str, str]] = {(a, n) for a in desired for n in grace}
    avoided = set(avoid) & up_set
    if avoided and up_set - avoided:
        excluded |= {(a, n) for a in desired for n in avoided}
    for a in desired:
        excluded |= failures.excluded(a, sorted(up_set), now)
    target = allocate(
        {a: d.instances for a, d in desired.items()},
        nodes,
        current,
        failed=failed,
        excluded=excluded,
        capacity=capacity,
        idle=idle,
    )
    out.current, out.target = current, target

    # 3. commands
    for n in sorted(up_set):
        per = live_slices.get(n, {})
        wanted = {a for a, placed in target.items() if n in placed}
        for a in sorted(set(per) | wanted):
            key = str(SliceKey(n, a))
            v = per.get(a)
            ids = target.get(a, {}).get(n, [])

            def cmd(
                state: str,
                instances: list[int],
                why: str,
                reason: str | None = None,
                key: str = key,
                v: SliceStateValue | None = v,
            ) -> None:
                out.writes.append(Write(key, v, SliceStateValue(state, wall, reason, instances), why))

            if v is None:
                if ids:
                    cmd("LOAD", ids, "place")
                continue
            st = _state(v)
            if st is SliceState.FAILED:
                if not failures.in_backoff(a, n, now):
                    cmd("UNLOAD", list(v.instances), "unload failed instance", v.reason)
            elif st is SliceState.LOADED:
                if not ids:
                    cmd("UNLOAD", list(v.instances), "not wanted here")
                elif all(d in active for d in desired[a].depends_on):
                    cmd("ACTIVATE", _bounded([], ids, max_starts), "activate")
            elif st is SliceState.ACTIVE:
                if not ids:
                    cmd("DEACTIVATE", list(v.instances), "not wanted here")
                elif ids != sorted(v.instances):
                    cmd("ACTIVE", _bounded(v.instances, ids, max_starts), "scale")

    # 4. routes without any instance of any version of their artifact (the router calls
    #    group:artifact, so a route another version registered serves the live one as well)
    #    and no blueprint wants: a deployed artifact that is not serving (its start failed, it
    #    waits for a retry) keeps them, so a request answers 503 with why rather than 404
    live_names = {a.rpartition(":")[0] for a in activating | live_endpoint_artifacts}
    live_names |= {a.rpartition(":")[0] for a, d in desired.items() if d.instances > 0}
    for key, rv in routes:
        if rv.artifact.rpartition(":")[0] not in live_names:
            out.writes.append(Write(key, rv, None, f"no instance of {rv.artifact} left"))
    return out
