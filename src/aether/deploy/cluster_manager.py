"""`ClusterDeploymentManager`: the leader's convergence loop (flow 2 in docs/architecture.md).

Owns: when reconciliation passes run and the execution of their writes. The decisions are the
pure `aether.deploy.reconcile.plan`. Runs on every node, dormant unless the node's
`LeaderManager` says it leads. May import `aether.core`, `aether.kv`, `aether.cluster` and
`aether.deploy.*`.

A pass runs:
- when this node becomes leader (failure counts and down-timers start fresh),
- on every change under `blueprints/`, `slices/`, `endpoints/`, `routes/`, `scale/` (debounced: all
  events that arrive while a pass runs cause exactly one more pass),
- when the set of live peers changes (polled every `membership_poll`),
- when a grace period or backoff expires, and at least every `reconcile_interval`.

Bounded work: the leader places at most `max_instances_per_node` instances on a node (admission
control's limit, also enforced here for state written before the limit) and one command starts
at most `max_starts_per_command` new instances (`reconcile.plan`); a large change converges in
several passes, each one triggered by the nodes' reports.

Each pass also removes the `scale/` values nothing needs any more (`reconcile.stale_scales`: no
blueprint autoscales the artifact and no active rollout names it), so a blueprint deleted and
applied again starts from its own count and bounds, not an old pin; `DeploymentService` does the
same right after a delete, undeploy or apply, this is the backstop (a scaling rule removed, a
rollout ended, a write that raced).

Hooks for the controller (`aether.controller`, wired by the node): `avoid()` is read each pass and
names the nodes that get no new instances (`reconcile.plan(avoid=...)`: saturated nodes; their
instances stay); `on_write(write)` is called for each write that succeeded, so the controller
records the reconciler's own recoveries (a FAILED instance unloaded, a lost node's keys removed)
as decisions.

Fencing: every write is `compare_and_set(key, value this leader observed, new value)`. If two
nodes briefly both believe they lead, each write still only succeeds when the key holds what
its writer based the decision on, so no write can overwrite a newer node report or a newer
command (no lost updates, no illegal transition applied on top of a state the writer did not
see). What CAS per key cannot prevent is two leaders placing instances on different keys at
the same time (e.g. instance 2 on node-b and on node-c). That is transient: allocation treats
a duplicated id as over-count and the one remaining leader's next pass (at most
`reconcile_interval` later, usually at once through the watch) scales the duplicate away. The
duplicate's host may have overwritten the endpoints of the node that keeps the id and removes
them when it lets the id go: that node publishes them again (`NodeDeploymentManager`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import msgspec

from aether.cluster.leader import LeaderChanged, LeaderManager
from aether.core.errors import BadRequest, CommitTimeout, QuorumLost
from aether.deploy.lifecycle import SliceState
from aether.deploy.reconcile import (
    FailureTracker,
    Plan,
    Write,
    desired_state,
    plan,
    scale_values,
    slice_states,
    stale_scales,
)
from aether.deploy.rollout import ACTIVE_STATES, Observation, VersionState, Window, advance, counts_window
from aether.kv.contract import ClusterStore, WatchEvent
from aether.kv.keys import (
    BlueprintSlice,
    BlueprintValue,
    EndpointValue,
    RolloutValue,
    RouteValue,
    SliceStateValue,
)

_WATCHED = ("blueprints/", "slices/", "endpoints/", "routes/", "scale/", "rollouts/")

# {node: (incarnation, calls, failures, latency buckets)}: one artifact's cumulative counters
Counters = dict[str, tuple[int, int, int, list[int]]]


class ClusterDeploymentManager:
    def __init__(
        self,
        kv: ClusterStore,
        leader: LeaderManager,
        *,
        reconcile_interval: float = 1.0,
        dead_node_grace: float = 1.5,
        membership_poll: float = 0.1,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_failures_per_node: int = 3,
        max_instances_per_node: int | None = None,
        max_starts_per_command: int | None = 200,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        avoid: Callable[[], Collection[str]] | None = None,
        on_write: Callable[[Write], None] | None = None,
        counters: Callable[[str], Counters] | None = None,
        latency_bounds: list[float] | None = None,
    ) -> None:
        self.kv = kv
        self.leader = leader
        self.node_id = leader.node_id
        self.reconcile_interval = reconcile_interval
        self.dead_node_grace = dead_node_grace
        self.membership_poll = membership_poll
        self.capacity = max_instances_per_node
        self.max_starts = max_starts_per_command
        self.log = logger or logging.getLogger(f"aether.deploy.cluster.{self.node_id}")
        self._backoff = (backoff_base, backoff_cap, max_failures_per_node)
        self.failures = FailureTracker(*self._backoff)
        self._clock = clock
        self._wall = wall
        self._avoid = avoid
        self._on_write = on_write
        self._counters = counters
        self._bounds = latency_bounds or [1.0]
        # counters of each version when a rollout's current step started: {(id, coords, step_started): ...}
        # (a new leader starts the windows afresh: it judges the calls from its first pass on)
        self._baselines: dict[tuple[str, str, float], Counters] = {}
        self._down_since: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._dirty = True
        self._cancels: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        self.last_plan: Plan | None = None

    @property
    def active(self) -> bool:
        """True while this node leads and the manager runs."""
        return self._task is not None and self.leader.is_leader

    async def start(self) -> None:
        if self._task is not None:
            return
        self.leader.listeners.append(self._on_leader)
        for prefix in _WATCHED:
            self._cancels.append(self.kv.watch(prefix, self._on_event))
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"aether-deploy-cluster-{self.node_id}"
        )

    async def stop(self) -> None:
        if self._task is None:
            return
        with contextlib.suppress(ValueError):
            self.leader.listeners.remove(self._on_leader)
        for c in self._cancels:
            c()
        self._cancels.clear()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    # --- triggers -------------------------------------------------------------------------------

    def _on_leader(self, ev: LeaderChanged) -> None:
        if ev.is_self:
            self.log.info("became leader: reconciling deployments")
            self.failures = FailureTracker(*self._backoff)
            self._down_since.clear()
        self._dirty = True
        self._wake.set()

    def _on_event(self, ev: WatchEvent) -> None:
        if self.leader.is_leader:
            self._dirty = True
            self._wake.set()

    # --- loop -----------------------------------------------------------------------------------

    async def _loop(self) -> None:
        last = float("-inf")
        last_up: frozenset[str] | None = None
        while True:
            if not self.leader.is_leader:
                last_up = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._clock()
            up = frozenset(self.leader.up)
            next_due = self._next_due(now)
            if self._dirty or up != last_up or now - last >= self.reconcile_interval or now >= next_due:
                self._dirty = False
                self._wake.clear()
                last_up = up
                try:
                    await self.reconcile_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.log.exception("reconciliation pass failed")
                last = self._clock()
                continue
            wait = min(
                self.membership_poll, max(0.0, last + self.reconcile_interval - now), max(0.0, next_due - now)
            )
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation
            # that stop() sends when it races with the wake-up, and the loop would never end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _next_due(self, now: float) -> float:
        due = [t + self.dead_node_grace for t in self._down_since.values() if t + self.dead_node_grace > now]
        due += [t for t in self.failures.blocked_until.values() if t > now]
        return min(due, default=float("inf"))

    # --- one pass -------------------------------------------------------------------------------

    def snapshot(
        self,
    ) -> tuple[
        list[BlueprintValue],
        dict[str, dict[str, SliceStateValue]],
        list[tuple[str, EndpointValue]],
        list[tuple[str, RouteValue]],
    ]:
        """What a pass reads from the local replica: blueprints, `{node: {artifact: state}}`,
        endpoints and routes."""
        blueprints = [v for _, v in self.kv.list_local("blueprints/") if isinstance(v, BlueprintValue)]
        slices = slice_states(self.kv.list_local("slices/"))
        endpoints = [(k, v) for k, v in self.kv.list_local("endpoints/") if isinstance(v, EndpointValue)]
        routes = [(k, v) for k, v in self.kv.list_local("routes/") if isinstance(v, RouteValue)]
        return blueprints, slices, endpoints, routes

    async def reconcile_once(self) -> Plan | None:
        """Run one pass now (if leader); returns the plan it executed."""
        if not self.leader.is_leader:
            return None
        blueprints, slices, endpoints, routes = self.snapshot()
        listed = {s.artifact.rpartition(":")[0] for bp in blueprints for s in bp.slices}
        rollouts, wrote = await self._advance_rollouts(slices, listed)
        if wrote:  # a rollback writes the old version back into the blueprints: plan on what is stored now
            blueprints, slices, endpoints, routes = self.snapshot()
        now = self._clock()
        up = sorted(self.leader.up | {self.node_id})
        known = set(self.leader.members) | set(slices) | {v.node_id for _, v in endpoints}
        for n in up:
            self._down_since.pop(n, None)
        for n in known - set(up):
            self._down_since.setdefault(n, now)
        grace = {n for n, t in self._down_since.items() if now - t < self.dead_node_grace}
        for n, t in list(self._down_since.items()):
            if now - t >= self.dead_node_grace and n not in slices:
                self.failures.forget_node(n)
        scales = scale_values(self.kv.list_local("scale/"))
        desired = desired_state(blueprints, scales, rollouts)
        avoid: Collection[str] = ()
        if self._avoid is not None:
            try:
                avoid = frozenset(self._avoid())
            except Exception:
                self.log.exception("cannot read the nodes to avoid; placing on every node")
        p = plan(
            desired,
            up,
            grace,
            slices,
            endpoints,
            routes,
            self.failures,
            now,
            self._wall(),
            capacity=self.capacity,
            max_starts=self.max_starts,
            avoid=avoid,
        )
        self.passes += 1
        self.last_plan = p
        writes = [*p.writes, *stale_scales(blueprints, scales, rollouts)]  # forgotten with their blueprint
        if writes and self.leader.is_leader:
            for w in writes:
                self.log.info("%s", _describe(w))
            await asyncio.gather(*(self._execute(w) for w in writes))
        return p

    # --- rollouts ---------------------------------------------------------------------------------

    def _window(self, r: RolloutValue, coords: str) -> Window:
        if self._counters is None:
            return Window()
        try:
            now = self._counters(coords)
        except Exception:
            self.log.exception("cannot read the metrics of %s", coords)
            return Window()
        base = self._baselines.setdefault((r.id, coords, r.step_started), now)
        return counts_window(base, now, self._bounds)

    async def _advance_rollouts(
        self, slices: dict[str, dict[str, SliceStateValue]], listed: set[str]
    ) -> tuple[list[RolloutValue], bool]:
        """One step of every active rollout (`aether.deploy.rollout.advance`; `listed`: the
        ``group:artifact`` names the blueprints list, any version); returns the rollouts
        as they stand after it (for the desired state) and whether blueprints were written."""
        out: list[RolloutValue] = []
        wrote = False
        live: set[tuple[str, str, float]] = set()
        for key, r in self.kv.list_local("rollouts/"):
            if not isinstance(r, RolloutValue):
                continue
            if r.state not in ACTIVE_STATES:
                out.append(r)
                continue
            obs = Observation(
                old=_version_state(slices, f"{r.artifact}:{r.old_version}"),
                new=_version_state(slices, f"{r.artifact}:{r.new_version}", r.started),
                old_window=self._window(r, f"{r.artifact}:{r.old_version}"),
                new_window=self._window(r, f"{r.artifact}:{r.new_version}"),
                listed=r.artifact in listed,
            )
            step = advance(r, obs, self._wall())
            new = step.value
            if new is not None:
                if step.blueprints_to is not None:
                    wrote = True
                    if not await self._pin_version(r, step.blueprints_to):
                        out.append(r)  # stays rolling-back (its counts hold) until the blueprints say it
                        continue
                try:
                    ok = await self.kv.compare_and_set(key, r, new)
                except (QuorumLost, CommitTimeout, BadRequest) as e:
                    self.log.warning("write of %s failed: %s", key, e)
                    ok = False
                if not ok:
                    out.append(r)
                    continue
                for text in step.events:
                    self.log.info("rollout: %s", text)
                r = new
            out.append(r)
            for v in (r.old_version, r.new_version):
                live.add((r.id, f"{r.artifact}:{v}", r.step_started))
        for k in [k for k in self._baselines if k not in live]:
            del self._baselines[k]
        return out, wrote

    async def _pin_version(self, r: RolloutValue, to_version: str) -> bool:
        """Write `to_version` in place of the rollout's new version into every blueprint listing it
        (a rollback ends with the blueprints saying what runs); False when a write failed. The
        blueprint whose change started the rollout gets the old slice back as the rollout recorded
        it (config, limits, isolation, entry policies: those the old version ran with), the others
        only the version (`update` changed nothing else in them)."""
        ok = True
        old, new = f"{r.artifact}:{r.new_version}", f"{r.artifact}:{to_version}"
        restore = r.old_slice if to_version == r.old_version and r.old_slice is not None else None
        for key, bp in self.kv.list_local("blueprints/"):
            if not isinstance(bp, BlueprintValue) or not any(s.artifact == old for s in bp.slices):
                continue
            back = restore if key == f"blueprints/{r.blueprint}" else None
            changed = BlueprintValue(
                [back if back is not None and s.artifact == old else _swap(s, old, new) for s in bp.slices],
                bp.source,
            )
            try:
                ok = await self.kv.compare_and_set(key, bp, changed) and ok
            except (QuorumLost, CommitTimeout, BadRequest) as e:
                self.log.warning("write of %s failed: %s", key, e)
                ok = False
        return ok

    async def _execute(self, w: Write) -> bool:
        try:
            ok = await self.kv.compare_and_set(w.key, w.expected, w.new)
        except (QuorumLost, CommitTimeout, BadRequest) as e:
            self.log.warning("write of %s failed: %s", w.key, e)
            return False
        if not ok:
            self.log.debug("%s changed meanwhile; next pass decides again", w.key)
        elif self._on_write is not None:
            try:
                self._on_write(w)
            except Exception:
                self.log.exception("on_write hook failed for %s", w.key)
        return ok


def _describe(w: Write) -> str:
    new: Any = w.new
    if new is None:
        return f"remove {w.key} ({w.why})"
    if isinstance(new, SliceStateValue):
        return f"{new.state} {w.key} instances={new.instances} ({w.why})"
    return f"write {w.key} ({w.why})"


def _swap(s: BlueprintSlice, old: str, new: str) -> BlueprintSlice:
    """`s` with coordinates `old` replaced by `new` (as the artifact and in its dependencies)."""
    return msgspec.structs.replace(
        s, artifact=new if s.artifact == old else s.artifact,
        depends_on=[new if d == old else d for d in s.depends_on],
    )  # fmt: skip


def _version_state(
    slices: dict[str, dict[str, SliceStateValue]], coords: str, since: float = 0.0
) -> VersionState:
    """ACTIVE instances of `coords` and the reason of a FAILED placement of it written at or after
    `since` (wall clock: an older failure belongs to an earlier attempt)."""
    ready = 0
    failed: str | None = None
    for node, per in sorted(slices.items()):
        v = per.get(coords)
        if v is None:
            continue
        if v.state == SliceState.ACTIVE:
            ready += len(v.instances)
        elif v.state == SliceState.FAILED and failed is None and v.timestamp >= since:
            failed = f"{v.reason or 'no reason given'} (on {node})"
    return VersionState(ready, failed)
