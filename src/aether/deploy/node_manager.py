"""`NodeDeploymentManager`: runs on every node and makes the local slice runtime follow the
`slices/{this node}/{artifact}` keys (docs/deployment.md).

Owns: the asyncio side of the lifecycle (one `SliceLifecycle` per artifact, a worker per artifact
that executes its actions in order, step tasks with deadlines, a periodic tick), the state
written back, and this node's endpoints (`endpoints/{artifact}/{entry}:{instance}`) and route
registrations (`routes/{METHOD}:{path}`). May import `aether.core`, `aether.kv` and
`aether.deploy.*`; the slice runtime is reached through `aether.deploy.ports.SliceRuntimePort`.

Protocol with the store (all writes are compare-and-set against the local replica's current
value, which already includes every committed write this node made, so a write never
overwrites a leader command this node has not processed):

- LOAD → writes LOADING, `store.load`, writes LOADED (or FAILED + reason).
- ACTIVATE(ids) → writes ACTIVATING, claims the slice's routes with CAS(absent → value) (a
  route held by another artifact name fails the activation before any instance starts: routes
  claimed by this attempt released, state FAILED "activate failed: route GET /x is owned by
  org.x:y:1.0.0"; a route held by another version of the same artifact is taken over),
  `store.activate(ids)`, publishes one endpoint per entry and instance, writes ACTIVE. The routes
  come first so that a request to one while the instances start, or after they failed to, finds
  it: the invoker answers 503 with why (`EndpointUnavailable`), not the router 404 "no route".
- ACTIVE(other ids) (scale) → removes the endpoints of dropped instances, `store.set_instances`
  (dropped instances drain as on DEACTIVATE), publishes the endpoints of new ones.
- DEACTIVATE → writes DEACTIVATING, removes this node's endpoints (new calls go elsewhere), hands
  the routes of the version's last instance to another version that serves (see below),
  `store.deactivate` (in-flight calls finish within its bounded drain; calls that still arrive are
  answered the retryable ``shutting_down`` and fail over), writes LOADED; if no endpoint of the
  artifact is left anywhere and no other node has it in ACTIVATE/ACTIVATING/ACTIVE, its routes go
  to another version of the same artifact that has one (the highest), else they are removed
  unless a blueprint still wants some version of the artifact (automatic route cleanup: a route
  lives while any version of the artifact serves or is deployed; a deployed artifact whose start
  failed keeps its routes, which answer 503 with the reasons until it serves or is undeployed).
- UNLOAD → writes UNLOADING, `store.unload`, removes the key.
- A config change (a blueprint's `[slices.NAME.config]` or a secret it names; watched under
  `blueprints/` and `secrets/` when the manager has a `config_version`) → the lifecycle's
  RECONFIGURE step: `store.reconfigure(artifact, id)` for each instance in turn, one at a time
  (each restarted make-before-break, or given the config through the slice's reload hook),
  state ACTIVE throughout; a failure leaves the slice ACTIVE and serving (no cleanup), with a
  reason saying the change was not applied.
- A step that fails or exceeds its deadline cleans up (endpoints removed, slice deactivated
  if it had been activated) before FAILED is written.
- A route this node's ACTIVATING/ACTIVE slice claimed that someone removes is claimed again
  (closes the race with another node's route cleanup).
- An endpoint of an instance this node runs that someone else removes is published again (the
  lifecycle's REPUBLISH step: CAS(absent → this node) for each missing endpoint of its instances).
  Another node that briefly ran the same instance id (two leaders at once) overwrote it with its
  own publish and then withdrew it, or a stale leader removed it believing this node dead; the
  leader cannot notice (the `slices/` key says ACTIVE), so the node that runs the instance must.

Start-up reconciliation (e.g. after a restart): endpoints this node published earlier are
removed first; then every key for this node is fed to `SliceLifecycle.recover`: keys in
LOAD..ACTIVE load the slice again and report LOADED (the leader re-activates it), keys in
DEACTIVATE*/UNLOAD* are removed, FAILED keys are kept for the leader to UNLOAD.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from aether.core.artifact import Artifact
from aether.core.errors import AetherError, BadRequest, CommitTimeout, QuorumLost
from aether.core.policy import DEFAULT_POLICY, EntryPolicy
from aether.deploy.lifecycle import (
    AbortStep,
    ConfigChanged,
    EndpointsLost,
    LifecycleAction,
    LifecycleTimeouts,
    Note,
    Observed,
    Quarantine,
    Reject,
    RemoveKey,
    SliceLifecycle,
    SliceState,
    StartStep,
    Step,
    StepFailed,
    StepSucceeded,
    Tick,
    WriteState,
)
from aether.deploy.ports import RouteInfo, SliceInfo, SliceRuntimePort
from aether.kv.contract import ClusterStore, WatchEvent, decode_value
from aether.kv.keys import (
    BlueprintValue,
    EndpointKey,
    EndpointValue,
    RouteKey,
    RouteValue,
    SliceKey,
    SliceStateValue,
    parse_key,
)

_WRITE_BATCH = 128  # endpoint writes one step keeps in flight at a time
_SERVING = frozenset({SliceState.ACTIVATE, SliceState.ACTIVATING, SliceState.ACTIVE})
_KEEPS_SERVING = frozenset({Step.LOAD, Step.RECONFIGURE, Step.REPUBLISH})  # no cleanup when they fail


class RouteConflict(AetherError):
    """A route the slice declares is registered by another artifact."""


class UnknownEntryPolicy(AetherError):
    """A blueprint sets the policy of an entry the artifact does not have (`[slices.NAME.entries.X]`)."""


def effective_policies(
    artifact: str, info: SliceInfo, overrides: Mapping[str, EntryPolicy]
) -> dict[str, EntryPolicy]:
    """The policy of each entry of the loaded slice: the blueprint's `overrides` over what the code
    declares (`EntryInfo.policy`). An override for an entry the slice lacks is `UnknownEntryPolicy`
    naming it and the entries there are."""
    unknown = sorted(set(overrides) - set(info.entries))
    if unknown:
        raise UnknownEntryPolicy(
            f"the blueprint sets a policy for {', '.join(repr(u) for u in unknown)} ([slices.NAME."
            f"entries.{unknown[0]}]), which is not an entry of {artifact}; its entries: "
            f"{', '.join(sorted(info.entries))}"
        )
    out: dict[str, EntryPolicy] = {}
    for name, e in info.entries.items():
        code = getattr(e, "policy", None)
        base = code if isinstance(code, EntryPolicy) else DEFAULT_POLICY
        out[name] = overrides[name].over(base) if name in overrides else base
    return out


def route_value(artifact: str, route: RouteInfo) -> RouteValue:
    """The stored route: artifact, entry point and where each argument binds from.

    Uses the route's own `bindings` (`{"name": "path", "qty": "query", ...}`) when it has them,
    else binds every path parameter from the path.
    """
    bindings = getattr(route, "bindings", None)
    if not isinstance(bindings, Mapping) or not bindings:
        bindings = {p: "path" for p in route.path_params}
    return RouteValue(artifact, route.entry, {str(k): str(v) for k, v in bindings.items()})


class NodeDeploymentManager:
    def __init__(
        self,
        kv: ClusterStore,
        node_id: str,
        store: SliceRuntimePort,
        *,
        timeouts: LifecycleTimeouts | None = None,
        tick_interval: float = 0.1,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        config_version: Callable[[str], str] | None = None,
        policies_for: Callable[[str], Mapping[str, EntryPolicy]] | None = None,
    ) -> None:
        """`config_version(artifact)` is the fingerprint of the config the artifact's instances
        should run (`aether.deploy.config.SliceConfigs.fingerprint`); without it configs are
        never changed on running instances. `policies_for(artifact)` gives the blueprints'
        per-entry policy overrides (`SliceConfigs.entry_policies`), published with the endpoints
        on top of the code's policies (read on activation)."""
        self.kv = kv
        self.node_id = node_id
        self.store = store
        self.timeouts = timeouts or LifecycleTimeouts()
        self.tick_interval = tick_interval
        self.log = logger or logging.getLogger(f"aether.deploy.node.{node_id}")
        self._clock = clock
        self._wall = wall
        self.prefix = f"slices/{node_id}/"
        self._machines: dict[str, SliceLifecycle] = {}
        self._queues: dict[str, deque[tuple[SliceLifecycle, LifecycleAction]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._steps: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._info: dict[str, SliceInfo] = {}
        self._activated: set[str] = set()
        self._claimed: dict[str, list[tuple[str, RouteValue]]] = {}
        self._cancels: list[Callable[[], None]] = []
        self._tick_task: asyncio.Task[None] | None = None
        self._starting = False
        self._running = False
        self.config_version = config_version
        self.policies_for = policies_for
        self._policies: dict[str, dict[str, EntryPolicy]] = {}  # artifact -> entry -> effective policy

    # --- public ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._starting = True
        self._cancels.append(self.kv.watch(self.prefix, self._on_slice_event))
        self._cancels.append(self.kv.watch("routes/", self._on_route_event))
        self._cancels.append(self.kv.watch("endpoints/", self._on_endpoint_event))
        if self.config_version is not None:
            self._cancels.append(self.kv.watch("blueprints/", self._on_config_event))
            self._cancels.append(self.kv.watch("secrets/", self._on_config_event))
        stale = [(k, v) for k, v in self.kv.list_local("endpoints/")
                 if isinstance(v, EndpointValue) and v.node_id == self.node_id]
        if stale:
            self.log.info("removing %d endpoints this node published before it (re)started", len(stale))
            await asyncio.gather(*(self._cas(k, v, None) for k, v in stale))
        self._starting = False
        now = self._clock()
        for key, value in self.kv.list_local(self.prefix):
            if isinstance(value, SliceStateValue):
                artifact = key[len(self.prefix):]
                m = self._machine(artifact)
                self._dispatch(artifact, m, m.recover(value, now))
        self._tick_task = asyncio.get_running_loop().create_task(
            self._tick_loop(), name=f"aether-deploy-tick-{self.node_id}"
        )

    async def stop(self) -> None:
        """Stop following the store and cancel running steps (slices stay as they are)."""
        if not self._running:
            return
        self._running = False
        for c in self._cancels:
            c()
        self._cancels.clear()
        tasks = [t for t in [self._tick_task, *self._workers.values(), *self._steps.values(), *self._bg]
                 if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tick_task = None

    def state(self, artifact: str) -> SliceState | None:
        m = self._machines.get(artifact)
        return m.state if m else None

    def states(self) -> dict[str, str]:
        return {a: str(m.state) for a, m in sorted(self._machines.items()) if m.state is not None}

    def quarantine(self, artifact: str, reason: str) -> None:
        """Take `artifact` down on this node and report it FAILED with `reason` (it keeps blocking)."""
        m = self._machines.get(artifact)
        if m is None or not self._running:
            return
        self._dispatch(artifact, m, m.handle(Quarantine(reason, self._clock())))

    # --- events ---------------------------------------------------------------------------------

    def _machine(self, artifact: str) -> SliceLifecycle:
        m = self._machines.get(artifact)
        if m is None:
            m = self._machines[artifact] = SliceLifecycle(artifact, self.timeouts)
            if self.config_version is not None:  # nothing runs yet: only remembered
                m.handle(ConfigChanged(self.config_version(artifact), self._clock()))
        return m

    def _on_config_event(self, ev: WatchEvent) -> None:
        """A blueprint or a secret changed: tell every machine whose config it changes."""
        if self._starting or not self._running or self.config_version is None:
            return
        now = self._clock()
        for artifact, m in list(self._machines.items()):
            fp = self.config_version(artifact)
            if fp != m.wanted_config:
                self._dispatch(artifact, m, m.handle(ConfigChanged(fp, now)))

    def _on_slice_event(self, ev: WatchEvent) -> None:
        if self._starting or not self._running:
            return
        now = self._clock()
        if ev.kind == "reset":
            present = {k[len(self.prefix):]: v for k, v in self.kv.list_local(self.prefix)
                       if isinstance(v, SliceStateValue)}
            for artifact in sorted(set(present) | set(self._machines)):
                m = self._machine(artifact)
                now_value = present.get(artifact)
                if now_value != m.observed:
                    self._dispatch(artifact, m, m.handle(Observed(now_value, now)))
                self._maybe_drop(artifact)
            return
        artifact = ev.key[len(self.prefix):]
        value: SliceStateValue | None = None
        if ev.kind == "put" and ev.value is not None:
            try:
                value = decode_value(ev.key, ev.value)
            except Exception:
                self.log.warning("ignoring undecodable value at %s", ev.key)
                return
        m = self._machine(artifact)
        self._dispatch(artifact, m, m.handle(Observed(value, now)))
        self._maybe_drop(artifact)

    def _on_route_event(self, ev: WatchEvent) -> None:
        if not self._running or self._starting or ev.kind == "put":
            return
        for artifact, claimed in self._claimed.items():
            if self.state(artifact) not in (SliceState.ACTIVE, SliceState.ACTIVATING):
                continue
            for key, value in claimed:
                if (ev.kind == "reset" or key == ev.key) and self.kv.get_local(key) is None:
                    self.log.info("route %s of active %s was removed: registering it again", key, artifact)
                    self._spawn(self._cas(key, None, value))

    def _on_endpoint_event(self, ev: WatchEvent) -> None:
        """An endpoint was removed: if it is of an instance this node runs, the lifecycle publishes
        it again (`EndpointsLost`; it ignores this node's own removals)."""
        if not self._running or self._starting or ev.kind == "put":
            return
        now = self._clock()
        if ev.kind == "reset":
            for artifact, m in list(self._machines.items()):
                info = self._info.get(artifact)
                if info is None:
                    continue
                for i in m.serving:
                    keys = (EndpointKey(artifact, entry, i) for entry in info.entries)
                    if any(self.kv.get_local(k) is None for k in keys):
                        self._dispatch(artifact, m, m.handle(EndpointsLost(i, now)))
            return
        try:
            k = parse_key(ev.key)
        except BadRequest:
            return
        lost = self._machines.get(k.artifact) if isinstance(k, EndpointKey) else None
        if isinstance(k, EndpointKey) and lost is not None:
            self._dispatch(k.artifact, lost, lost.handle(EndpointsLost(k.instance, now)))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            now = self._clock()
            for artifact, m in list(self._machines.items()):
                if m.busy:
                    self._dispatch(artifact, m, m.handle(Tick(now)))

    # --- actions --------------------------------------------------------------------------------

    def _dispatch(self, artifact: str, m: SliceLifecycle, actions: list[LifecycleAction]) -> None:
        for a in actions:
            if isinstance(a, Reject):
                self.log.warning("%s", a.message)
            elif isinstance(a, Note):
                self.log.info("%s", a.message)
            elif isinstance(a, AbortStep):
                self.log.warning("%s: %s; cancelling it", artifact, a.reason)
                task = self._steps.get((artifact, a.seq))
                if task is not None:
                    task.cancel()
            else:
                self._queues.setdefault(artifact, deque()).append((m, a))
        if self._queues.get(artifact) and artifact not in self._workers and self._running:
            self._workers[artifact] = asyncio.get_running_loop().create_task(
                self._work(artifact), name=f"aether-deploy-{self.node_id}-{artifact}"
            )

    def _maybe_drop(self, artifact: str) -> None:
        m = self._machines.get(artifact)
        if m is not None and m.finished and artifact not in self._workers and not self._queues.get(artifact):
            del self._machines[artifact]
            self._queues.pop(artifact, None)

    async def _work(self, artifact: str) -> None:
        q = self._queues[artifact]
        try:
            while q:
                m, action = q.popleft()
                try:
                    if isinstance(action, WriteState | RemoveKey):
                        if action.epoch == m.epoch:
                            await self._write_state(artifact, m, action)
                    elif isinstance(action, StartStep) and m.running_seq == action.seq:
                        task = asyncio.get_running_loop().create_task(
                            self._run_step(artifact, m, action),
                            name=f"aether-deploy-{self.node_id}-{artifact}-{action.step}",
                        )
                        self._steps[(artifact, action.seq)] = task
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.log.exception("%s: executing %s failed", artifact, action)
        finally:
            self._workers.pop(artifact, None)
        self._maybe_drop(artifact)

    async def _write_state(self, artifact: str, m: SliceLifecycle, action: WriteState | RemoveKey) -> None:
        key = str(SliceKey(self.node_id, artifact))
        delay = 0.05
        failures = 0
        while self._running and action.epoch == m.epoch:
            expected = self.kv.get_local(key)
            if expected is None:
                return  # removed by someone else: never re-create it
            new = None
            if isinstance(action, WriteState):
                new = SliceStateValue(str(action.state), self._wall(), action.reason, list(action.instances))
            try:
                ok = await self.kv.compare_and_set(key, expected, new)
            except (QuorumLost, CommitTimeout) as e:
                failures += 1
                # a warning once: a node waiting for its quorum (a cluster starting, a restart
                # while the others are down) retries every second, a line each time per slice
                self.log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "%s: writing %s failed (%s); retrying until it commits", artifact, new and new.state, e,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except BadRequest as e:
                self.log.error("%s: writing %s rejected: %s", artifact, new and new.state, e)
                return
            if failures:
                state = new and new.state
                self.log.info("%s: wrote %s after %d failed attempt(s)", artifact, state, failures)
            if not ok:
                self.log.debug("%s: %s not written, the key changed meanwhile", artifact, new and new.state)
            return

    # --- steps ----------------------------------------------------------------------------------

    async def _run_step(self, artifact: str, m: SliceLifecycle, action: StartStep) -> None:
        step, seq, ids = action.step, action.seq, list(action.instances)
        old_ids = list(m.instances)
        try:
            a = Artifact.parse(artifact)
            if step is Step.LOAD:
                self._info[artifact] = await self.store.load(a)
            elif step is Step.ACTIVATE:
                await self._activate(a, artifact, ids)
            elif step is Step.SCALE:
                await self._scale(a, artifact, old_ids, ids)
            elif step is Step.RECONFIGURE:
                for iid in ids:  # one instance at a time: the others keep serving
                    await self.store.reconfigure(a, iid)
            elif step is Step.REPUBLISH:
                await self._republish(artifact, self._slice_info(a, artifact), ids)
            elif step is Step.DEACTIVATE:
                await self._deactivate(a, artifact)
            else:
                await self._unload(a, artifact)
        except asyncio.CancelledError:
            self._steps.pop((artifact, seq), None)
            if self._running and step not in _KEEPS_SERVING:
                self._spawn(self._cleanup_failed(artifact, step))
            raise
        except Exception as e:
            reason = str(e) or type(e).__name__
            self.log.warning("%s: %s failed: %s", artifact, step, reason)
            if step not in _KEEPS_SERVING:  # a failed reconfigure: the old instances serve
                try:
                    await self._cleanup_failed(artifact, step)
                except Exception:
                    self.log.exception("%s: cleanup after failed %s failed", artifact, step)
            events = m.handle(StepFailed(seq, reason, self._clock()))
        else:
            events = m.handle(StepSucceeded(seq, self._clock()))
        self._steps.pop((artifact, seq), None)
        self._dispatch(artifact, m, events)

    def _slice_info(self, a: Artifact, artifact: str) -> SliceInfo:
        info = self._info.get(artifact) or self.store.info(a)
        if info is None:
            raise RuntimeError(f"{artifact} is not loaded in the slice runtime")
        self._info[artifact] = info
        return info

    async def _activate(self, a: Artifact, artifact: str, ids: list[int]) -> None:
        info = self._slice_info(a, artifact)
        overrides = self.policies_for(artifact) if self.policies_for is not None else {}
        self._policies[artifact] = effective_policies(artifact, info, overrides)
        self._activated.add(artifact)
        # the routes first: while the instances start, and if they fail to, a request to a route
        # finds it and answers 503 with why (the invoker's fail fast), not 404 "no route"
        await self._claim_routes(a, artifact, info)
        await self.store.activate(a, ids)
        await self._publish(artifact, info, ids)

    async def _scale(self, a: Artifact, artifact: str, old: list[int], new: list[int]) -> None:
        info = self._slice_info(a, artifact)
        # the endpoints of dropped instances go first, so new calls go elsewhere while they drain
        await self._remove_endpoints(artifact, {i for i in old if i not in new})
        await self.store.set_instances(a, new)
        await self._publish(artifact, info, [i for i in new if i not in old])

    async def _deactivate(self, a: Artifact, artifact: str) -> None:
        await self._remove_endpoints(artifact)
        # the last instance of this version: its routes go to a version that still serves now,
        # before the drain (the leader's sweep would otherwise remove them meanwhile)
        await self._cleanup_routes(artifact, remove=False)
        await self.store.deactivate(a)
        self._activated.discard(artifact)
        self._claimed.pop(artifact, None)
        await self._cleanup_routes(artifact)

    async def _unload(self, a: Artifact, artifact: str) -> None:
        if artifact in self._activated:
            await self._remove_endpoints(artifact)
            try:
                await self.store.deactivate(a)
            except Exception as e:
                self.log.warning("%s: deactivate before unload failed: %s", artifact, e)
            self._activated.discard(artifact)
        self._claimed.pop(artifact, None)
        self._info.pop(artifact, None)
        self._policies.pop(artifact, None)
        await self.store.unload(a)
        await self._cleanup_routes(artifact)

    async def _cleanup_failed(self, artifact: str, step: Step) -> None:
        """After a failed or timed-out step: this node must not advertise the slice any more."""
        await self._remove_endpoints(artifact)
        if step in (Step.ACTIVATE, Step.SCALE) and artifact in self._activated:
            try:
                a = Artifact.parse(artifact)
                await asyncio.wait_for(self.store.deactivate(a), self.timeouts.deactivate)
            except Exception as e:
                self.log.warning("%s: deactivate after failed %s failed: %s", artifact, step, e)
            self._activated.discard(artifact)
        self._claimed.pop(artifact, None)
        await self._cleanup_routes(artifact)

    # --- endpoints and routes -------------------------------------------------------------------

    async def _claim_routes(self, a: Artifact, artifact: str, info: SliceInfo) -> None:
        claimed = self._claimed.setdefault(artifact, [])
        for r in info.routes:
            method = r.http_method.upper()
            key = str(RouteKey(method, r.path))
            value = route_value(artifact, r)
            for _ in range(10):
                cur = self.kv.get_local(key)
                if cur is None:
                    if await self.kv.compare_and_set(key, None, value):
                        break
                    continue
                if not isinstance(cur, RouteValue):
                    await self._release(claimed)
                    raise RouteConflict(f"route {method} {r.path} holds an unreadable value")
                if cur == value:
                    break
                owner = _name_of(cur.artifact)
                if cur.artifact != artifact and owner != a.name:
                    await self._release(claimed)
                    raise RouteConflict(f"route {method} {r.path} is owned by {cur.artifact}")
                # same artifact (entry changed) or another version of it: take the route over
                if await self.kv.compare_and_set(key, cur, value):
                    break
            else:
                await self._release(claimed)
                raise RouteConflict(f"route {method} {r.path} keeps changing; giving up")
            claimed.append((key, value))

    async def _release(self, claimed: list[tuple[str, RouteValue]]) -> None:
        """Give up the routes a failed claim took (the slice cannot serve them: a conflict is not
        a start that may succeed on the next attempt), unless another version took them meanwhile.
        They leave `claimed` first: the watch of routes/ registers again a claimed route of an
        activating slice that disappears, and took each of these removals for one, so the route of
        a slice that could never serve came back (or not, by timing: the route-conflict test waited
        0.02-8 s for it to go)."""
        pairs = list(claimed)
        claimed.clear()
        await asyncio.gather(*(self._cas(k, v, None) for k, v in pairs))

    def _endpoint_value(self, artifact: str, entry: str, info: SliceInfo) -> EndpointValue:
        """This node's endpoint of `entry`, with the entry's effective policy (None: the defaults)."""
        policies = self._policies.get(artifact)
        if policies is None:  # activated before this manager knew it (not expected): as on activation
            overrides = self.policies_for(artifact) if self.policies_for is not None else {}
            overrides = {k: v for k, v in overrides.items() if k in info.entries}
            policies = self._policies[artifact] = effective_policies(artifact, info, overrides)
        policy = policies.get(entry)
        return EndpointValue(self.node_id, "ACTIVE", None if policy in (None, DEFAULT_POLICY) else policy)

    async def _publish(self, artifact: str, info: SliceInfo, ids: list[int]) -> None:
        pairs = [(EndpointKey(artifact, entry, i), self._endpoint_value(artifact, entry, info))
                 for entry in sorted(info.entries) for i in ids]
        for k in range(0, len(pairs), _WRITE_BATCH):  # bounded: never thousands of writes in flight
            await asyncio.gather(*(self.kv.put(key, value) for key, value in pairs[k:k + _WRITE_BATCH]))

    async def _republish(self, artifact: str, info: SliceInfo, ids: list[int]) -> None:
        """Publish the endpoints of `ids` that are missing, each CAS(absent → this node). One that
        another node holds is left alone: that node runs the same id only until the leader
        removes the duplicate, and when it withdraws its endpoint this runs again."""
        missing = [(key, self._endpoint_value(artifact, entry, info))
                   for entry in sorted(info.entries) for i in ids
                   if self.kv.get_local(key := str(EndpointKey(artifact, entry, i))) is None]
        for k in range(0, len(missing), _WRITE_BATCH):
            batch = missing[k:k + _WRITE_BATCH]
            await asyncio.gather(*(self._put_if_absent(key, value) for key, value in batch))
        if missing:
            self.log.info("%s: published %d endpoints again", artifact, len(missing))

    async def _put_if_absent(self, key: str, value: EndpointValue) -> None:
        delay = 0.05
        failures = 0
        while True:  # until written, or the step's deadline cancels it
            try:
                await self.kv.compare_and_set(key, None, value)
                return
            except (QuorumLost, CommitTimeout) as e:
                failures += 1  # a warning once (as in _write_state)
                self.log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                             "publishing %s again failed (%s); retrying until it commits", key, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _remove_endpoints(self, artifact: str, ids: set[int] | None = None) -> None:
        mine = []
        for key, v in self.kv.list_local(f"endpoints/{artifact}/"):
            if not isinstance(v, EndpointValue) or v.node_id != self.node_id:
                continue
            k = parse_key(key)
            if isinstance(k, EndpointKey) and (ids is None or k.instance in ids):
                mine.append((key, v))
        for j in range(0, len(mine), _WRITE_BATCH):
            await asyncio.gather(*(self._cas(key, v, None) for key, v in mine[j:j + _WRITE_BATCH]))

    async def _cleanup_routes(self, artifact: str, *, remove: bool = True) -> None:
        """When no instance of this version of the artifact is left in the cluster: hand the routes
        it holds to another version that still serves (or is being activated), else remove them.

        A route belongs to the artifact, not to one version (the router calls ``group:artifact``):
        the last instance of the old version going away during an update must not take down a route
        the new version serves, nor the last instance of a new version rolled back one the old
        version serves. With `remove` False only the hand-over happens."""
        if self.kv.list_local(f"endpoints/{artifact}/"):
            return
        for key, v in self.kv.list_local("slices/"):
            k = parse_key(key)
            if (isinstance(k, SliceKey) and k.artifact == artifact and k.node_id != self.node_id
                    and isinstance(v, SliceStateValue) and v.state in _SERVING):
                return
        routes = [(k, v) for k, v in self.kv.list_local("routes/")
                  if isinstance(v, RouteValue) and v.artifact == artifact]
        if not routes:
            return
        heir = self._live_version(artifact)
        if heir is None:
            if not remove:
                return
            if _wanted(self.kv.list_local("blueprints/"), _name_of(artifact)):
                # deployed but not serving (its start failed, it was quarantined, it waits for a
                # retry): the routes stay, so a request answers 503 with why, not 404 "no route";
                # they go with the blueprint (or the leader's sweep, reconcile step 4)
                self.log.info("%s: last instance gone, its %d routes stay (a blueprint still wants it)",
                              artifact, len(routes))
                return
            self.log.info("%s: last instance gone, removing its %d routes", artifact, len(routes))
            await asyncio.gather(*(self._cas(k, v, None) for k, v in routes))
            return
        self.log.info("%s: last instance gone, its %d routes go to %s (it still serves)",
                      artifact, len(routes), heir)
        claimed = dict(self._claimed.get(heir, ()))
        await asyncio.gather(*(
            self._cas(k, v, claimed.get(k) or RouteValue(heir, v.method, dict(v.bindings))) for k, v in routes
        ))

    def _live_version(self, artifact: str) -> str | None:
        """The highest other version of `artifact` with an endpoint, or a node serving it or being
        told to (ACTIVATE/ACTIVATING/ACTIVE); None when there is none."""
        name = _name_of(artifact)
        live: set[str] = set()
        for key, _ in self.kv.list_local(f"endpoints/{name}:"):
            k = _parse_or_none(key)
            if isinstance(k, EndpointKey) and k.artifact != artifact and _name_of(k.artifact) == name:
                live.add(k.artifact)
        for key, v in self.kv.list_local("slices/"):
            k = _parse_or_none(key)
            if (isinstance(k, SliceKey) and k.artifact != artifact and _name_of(k.artifact) == name
                    and isinstance(v, SliceStateValue) and v.state in _SERVING):
                live.add(k.artifact)
        versions = []
        for coords in live:
            try:
                versions.append(Artifact.parse(coords))
            except (BadRequest, ValueError):
                continue
        return str(max(versions)) if versions else None

    async def _cas(self, key: str, expected: Any, new: Any) -> bool:
        try:
            return await self.kv.compare_and_set(key, expected, new)
        except (QuorumLost, CommitTimeout, BadRequest) as e:
            self.log.warning("compare-and-set of %s failed: %s", key, e)
            return False

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)


def _wanted(blueprints: list[tuple[str, Any]], name: str) -> bool:
    """Whether a blueprint wants an instance of some version of `name` (``group:artifact``)."""
    for _, bv in blueprints:
        if isinstance(bv, BlueprintValue) and any(
            _name_of(s.artifact) == name and s.instances > 0 for s in bv.slices
        ):
            return True
    return False


def _name_of(coords: str) -> str:
    return ":".join(coords.split(":")[:2])


def _parse_or_none(key: str) -> object:
    try:
        return parse_key(key)
    except BadRequest:
        return None
