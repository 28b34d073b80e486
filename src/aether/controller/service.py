"""`ControllerService`: the asyncio adapter of the layer-1 controller, one per node (docs/controller.md).

Every node runs one; it acts only while its node leads (`aether.cluster.leader.LeaderManager`):

- **Each second on the leader** (`interval`): builds the `Observation` from the local store replica
  (blueprints, `scale/`, `slices/`: placement, ACTIVE counts, keys in a transitional state with the
  time they were written) and the node's metrics (the aggregator's slice loads and instance stats,
  the node stats and age of the latest cluster snapshot), calls `core.step`, and carries out the
  decisions the core marks `applied` (dry-run decisions are only recorded):
  ``scale_up``/``scale_down`` compare-and-set `scale/{artifact}` (the operator's bounds kept; one
  re-read and retry on a conflict), ``replace`` takes the instance out of its ACTIVE key,
  ``recover`` removes the stuck key (both: the reconciler places the instances again),
  ``avoid_node``/``allow_node`` need no write (the reconciler reads `avoided()` each pass). Writes
  run as tasks bounded by `write_timeout`; the step never waits for them.
- The reconciler's own recoveries are recorded as decisions too: the node passes `on_write` to
  `ClusterDeploymentManager` (``restart`` for an unloaded FAILED instance, ``re_place`` for the keys
  of a lost node).
- **Sync**: after each step the leader sends `ControllerSync(leader, epoch, memory, latest 50
  decisions)` to every peer that is up. Followers keep the latest memory and merge the decisions
  by `seq` into their history, so any node answers `/api/v1/controller/...` and a new leader
  continues with the windows, cooldowns and history it inherits (`Controller(config, memory)`).
- **Config**: watches `controller/config` and calls `set_config`; a stored text that does not
  parse is logged and the previous configuration stays.
- Every new decision (made here or merged from the leader) is published on the node's event bus
  (`publish`, the management API's event stream shows it); the leader also submits it to the
  webhooks (`aether.controller.webhooks.WebhookSender`).
- Bounded: the history keeps the last `history` decisions; each step's duration is measured
  (`status().step_seconds`: the controller's share of the leader's CPU).

The core is built by `core_factory(config, memory)` (default: `aether.controller.core.Controller`);
tests may pass a fake. No module state: several services may run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import msgspec

from aether.controller.config import ControllerConfig, parse_config
from aether.controller.core import Controller
from aether.controller.recording import ObservationRecorder
from aether.controller.types import (
    ControllerMemory,
    ControllerSync,
    Decision,
    KeyObs,
    NodeObs,
    Observation,
    SliceObs,
)
from aether.controller.webhooks import WebhookSender, WebhookStats
from aether.core.errors import BadRequest, CommitTimeout, QuorumLost
from aether.core.periodic import run_every
from aether.deploy.lifecycle import PRESENT_STATES, SliceState
from aether.deploy.reconcile import Write, autoscaled, desired_state, scale_values, slice_states
from aether.deploy.rollout import ACTIVE_STATES as ROLLOUT_ACTIVE
from aether.kv.contract import WatchEvent
from aether.kv.keys import (
    BlueprintValue,
    ControllerConfigKey,
    ControllerConfigValue,
    RolloutValue,
    ScaleKey,
    ScaleValue,
    SliceKey,
    SliceStateValue,
    parse_key,
)
from aether.metrics.messages import ClusterMetricsSnapshot, InstanceStats, SliceLoad

__all__ = [
    "HISTORY",
    "SYNC_DECISIONS",
    "TRANSITIONAL",
    "AlertView",
    "ArtifactStatus",
    "ControllerCore",
    "ControllerService",
    "ControllerStatus",
    "StoreView",
    "build_observation",
]

HISTORY = 1000
"""Decisions each node keeps."""
SYNC_DECISIONS = 50
"""Decisions each `ControllerSync` carries."""
TRANSITIONAL = frozenset({
    SliceState.LOAD, SliceState.LOADING, SliceState.ACTIVATE, SliceState.ACTIVATING, SliceState.DEACTIVATE,
    SliceState.DEACTIVATING, SliceState.UNLOAD, SliceState.UNLOADING,
})  # fmt: skip
"""Slice key states that are a command or a step in progress (`KeyObs`)."""


# --- what the service needs of the node ------------------------------------------------------------


class ControllerCore(Protocol):
    """The sans-IO controller (`aether.controller.core.Controller`)."""

    config: ControllerConfig
    memory: ControllerMemory

    def set_config(self, config: ControllerConfig) -> None: ...

    def step(self, obs: Observation) -> list[Decision]: ...

    def record(self, time: float, kind: Any, rule: str, reason: str, **fields: Any) -> Decision: ...

    @property
    def avoided(self) -> frozenset[str]: ...


CoreFactory = Callable[[ControllerConfig, ControllerMemory | None], ControllerCore]


class StoreView(Protocol):
    """The node's replicated store (an `aether.kv.contract.ClusterStore` fits)."""

    def get_local(self, key: Any) -> Any: ...

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int: ...

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool: ...

    def watch(self, prefix: str, callback: Callable[[WatchEvent], None]) -> Callable[[], None]: ...


class LeaderView(Protocol):
    """Who leads and who is up (`aether.cluster.leader.LeaderManager` fits)."""

    node_id: str
    members: list[str]
    up: set[str]

    @property
    def leader(self) -> str | None: ...

    @property
    def is_leader(self) -> bool: ...


class PeerLink(Protocol):
    """The node-to-node transport (`aether.transport.Transport` fits)."""

    def send(self, peer: str, msg: object) -> bool: ...

    @property
    def up_peers(self) -> frozenset[str]: ...


class MetricsInputs(Protocol):
    """The node's metrics, as the controller reads them (the node adapts its `MetricsService`)."""

    def snapshot(self) -> ClusterMetricsSnapshot | None:
        """The latest cluster snapshot (made here on the leader)."""
        ...

    def slice_loads(self) -> Mapping[str, SliceLoad]:
        """Per artifact, its load in the last interval (the leader's aggregator)."""
        ...

    def instance_stats(self) -> Sequence[InstanceStats]:
        """Per instance, its gauges and rates in the last interval (the leader's aggregator)."""
        ...


# --- the observation ------------------------------------------------------------------------------


def _slice_keys(kv: StoreView) -> dict[str, dict[str, SliceStateValue]]:
    return slice_states(kv.list_local("slices/"))


def _scales(kv: StoreView) -> dict[str, ScaleValue]:
    return scale_values(kv.list_local("scale/"))


def _blueprints(kv: StoreView) -> list[BlueprintValue]:
    return [v for _, v in kv.list_local("blueprints/") if isinstance(v, BlueprintValue)]


def build_observation(
    time: float,
    *,
    blueprints: Iterable[BlueprintValue],
    scales: Mapping[str, ScaleValue],
    slices: Mapping[str, Mapping[str, SliceStateValue]],
    members: Iterable[str],
    up: Collection[str],
    snapshot: ClusterMetricsSnapshot | None,
    slice_loads: Mapping[str, SliceLoad],
    instance_stats: Sequence[InstanceStats],
    rollouts: Iterable[RolloutValue] = (),
) -> Observation:
    """The controller's input for one step (pure: every input is given).

    `slices` is `{node: {artifact: value}}` of the store; `up` the live nodes (the leader too);
    `metrics_age` is the age of `snapshot` by its wall-clock time (None without one). An artifact
    with an active rollout is observed without its scaling rule: its count holds until the rollout
    ends (the rollout fixed its counts; the new version's load is only its share of the calls)."""
    bps = list(blueprints)
    desired = desired_state(bps, scales)
    rolling = {r.artifact for r in rollouts if r.state in ROLLOUT_ACTIVE}
    auto = {a: v for a, v in autoscaled(bps, scales).items() if a.rpartition(":")[0] not in rolling}
    lag: dict[str, tuple[float, float]] = {}
    if snapshot is not None:
        lag = {n.node_id: (n.loop_lag_ms, n.cpu_percent) for n in snapshot.nodes}
    nodes = [
        NodeObs(n, n in up, *(lag.get(n) or (None, None)))
        for n in sorted(set(members) | set(up) | set(slices))
    ]
    placement: dict[str, dict[str, list[int]]] = {}
    active: dict[str, int] = {}
    keys: list[KeyObs] = []
    for node in sorted(slices):
        for artifact, v in sorted(slices[node].items()):
            try:
                st = SliceState(v.state)
            except ValueError:
                continue
            if st in PRESENT_STATES and v.instances:
                placement.setdefault(artifact, {})[node] = sorted(v.instances)
            if st is SliceState.ACTIVE:
                active[artifact] = active.get(artifact, 0) + len(v.instances)
            if st in TRANSITIONAL:
                keys.append(KeyObs(node, artifact, v.state, v.timestamp, sorted(v.instances)))
    per_instance: dict[str, list[InstanceStats]] = {}
    for i in instance_stats:
        per_instance.setdefault(i.artifact, []).append(i)
    out = []
    for artifact in sorted(desired):
        a = auto.get(artifact)
        lo, hi = (a.min, a.max) if a is not None else (desired[artifact].instances,) * 2
        out.append(SliceObs(
            artifact, desired[artifact].instances, rule=a.rule if a is not None else None, min=lo, max=hi,
            bounds_source=a.bounds_source if a is not None else "blueprint",
            placement=placement.get(artifact, {}), active=active.get(artifact, 0),
            load=slice_loads.get(artifact), instances=per_instance.get(artifact, []),
        ))  # fmt: skip
    age = None if snapshot is None else max(0.0, time - snapshot.time)
    return Observation(time, age, nodes, out, keys, snapshot)


# --- views ---------------------------------------------------------------------------------------


class ArtifactStatus(msgspec.Struct, frozen=True):
    """One autoscaled artifact in the controller status."""

    artifact: str
    min: int
    max: int
    bounds_source: str
    """``blueprint`` or ``operator`` (`aether scale --min/--max` or a pin)."""
    instances: int
    """The count in force (within the bounds)."""
    count_source: str
    """Who set it: ``controller``, ``operator`` or ``blueprint``."""
    active: int
    last_decision: Decision | None
    scale_up_cooldown: float
    """Seconds until an ordinary scale-up may happen again (0: now)."""
    scale_down_cooldown: float
    """Seconds until a scale-down may happen again (0: now)."""


class ControllerStatus(msgspec.Struct, frozen=True):
    """Answer of `GET /api/v1/controller/status`."""

    node_id: str
    """The node that answered."""
    leader: str | None
    running: bool
    """True on the leader while its controller steps."""
    dry_run: bool
    config: dict[str, Any]
    """The configuration in force: `scaling` and `health` settings, alert names, webhook URLs."""
    config_updated: float | None
    config_by: str | None
    config_error: str | None
    """Why the stored configuration was refused (the previous one stays), if it was."""
    synced_from: str | None
    """Followers: the leader whose memory this node has; null on the leader."""
    sync_age: float | None
    """Followers: seconds since the last sync arrived."""
    last_seq: int
    artifacts: list[ArtifactStatus]
    avoided: list[str]
    steps: int
    """Steps this node ran (while leading)."""
    step_seconds: float
    """Time spent in those steps (observation, decisions, dispatch; not the writes)."""
    step_last_ms: float
    step_max_ms: float
    writes_failed: int
    webhooks: list[WebhookStats]


class AlertView(msgspec.Struct, frozen=True):
    """One alert series in `GET /api/v1/alerts`."""

    name: str
    key: str
    """Rule name and labels: ``name{label=value,...}``."""
    state: Literal["pending", "firing"]
    since: float
    value: float
    labels: dict[str, str]
    severity: str | None
    summary: str | None
    metric: str | None
    threshold: float | None
    op: str | None
    for_: float | None = msgspec.field(name="for", default=None)


# --- the service ---------------------------------------------------------------------------------


def _default_core(config: ControllerConfig, memory: ControllerMemory | None) -> ControllerCore:
    return Controller(config, memory)


class ControllerService:
    """The controller of one node (see the module docstring)."""

    def __init__(
        self,
        kv: StoreView,
        leader: LeaderView,
        transport: PeerLink,
        metrics: MetricsInputs,
        *,
        interval: float = 1.0,
        history: int = HISTORY,
        write_timeout: float = 2.0,
        core_factory: CoreFactory | None = None,
        publish: Callable[[object], None] | None = None,
        webhooks: WebhookSender | None = None,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
        recorder: ObservationRecorder | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be a positive number of seconds")
        self.kv = kv
        self.leader = leader
        self.node_id = leader.node_id
        self.transport = transport
        self.metrics = metrics
        self.interval = interval
        self.write_timeout = write_timeout
        self._factory: CoreFactory = core_factory or _default_core
        self._publish = publish
        self.webhooks = webhooks if webhooks is not None else WebhookSender(
            logger=logging.getLogger(f"aether.controller.webhooks.{self.node_id}")
        )
        self._clock = clock
        self.recorder = recorder
        self.log = logger or logging.getLogger(f"aether.controller.{self.node_id}")
        self.config = ControllerConfig()
        self.config_value: ControllerConfigValue | None = None
        self.config_error: str | None = None
        self.core: ControllerCore | None = None
        self.memory: ControllerMemory | None = None
        """The latest memory: synced from the leader (followers), or the core's (leader)."""
        self.history: deque[Decision] = deque(maxlen=history)
        self._seqs: set[int] = set()
        self.last_seq = 0
        self._changed = asyncio.Event()
        self._epoch = 0
        self._synced: tuple[str, int] | None = None  # (leader, epoch) of the last sync taken
        self._synced_at: float | None = None
        self.steps = 0
        self.step_seconds = 0.0
        self.step_last = 0.0
        self.step_max = 0.0
        self.writes_failed = 0
        self._writes: set[asyncio.Task[None]] = set()
        self._observed: dict[tuple[str, str], SliceStateValue] = {}
        self._cancels: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._load_config()
        self._cancels.append(self.kv.watch(ControllerConfigKey.prefix, self._on_config))
        await self.webhooks.start()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"aether-controller-{self.node_id}"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        for c in self._cancels:
            c()
        self._cancels.clear()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        writes = list(self._writes)
        for t in writes:
            t.cancel()
        for t in writes:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.webhooks.stop()
        if self.recorder is not None:
            self.recorder.close()
        self._lose_lead()

    async def _run(self) -> None:
        await run_every(self.interval, self.tick, self.log, f"controller step on {self.node_id}")

    # --- config ---------------------------------------------------------------------------------

    def _on_config(self, ev: WatchEvent) -> None:
        self._load_config()

    def _load_config(self) -> None:
        v = self.kv.get_local(ControllerConfigKey())
        if not isinstance(v, ControllerConfigValue):
            cfg, v = ControllerConfig(), None
        else:
            try:
                cfg = parse_config(v.text)
            except BadRequest as e:
                self.config_error = str(e)
                self.log.error("the stored controller config is refused, the previous one stays: %s", e)
                return
        self.config, self.config_value, self.config_error = cfg, v, None
        self.webhooks.set_webhooks(cfg.webhooks)
        if self.core is not None:
            self.core.set_config(cfg)

    async def set_config_text(self, text: str, by: str = "", timeout: float = 5.0) -> ControllerConfigValue:
        """Validate `text` (`BadRequest` naming the problem) and store it through consensus."""
        parse_config(text)
        value = ControllerConfigValue(text, self._clock(), by)
        await self.kv.put(ControllerConfigKey(), value, timeout)
        return value

    # --- one second -----------------------------------------------------------------------------

    def _take_lead(self) -> ControllerCore:
        core = self._factory(self.config, self.memory)
        self.core = core
        self.memory = core.memory
        self._synced = None
        self._synced_at = None
        self.log.info("controller running on %s (decision #%d inherited)", self.node_id, core.memory.seq)
        return core

    def _lose_lead(self) -> None:
        if self.core is not None:
            self.memory = self.core.memory
            self.core = None
            self.log.info("controller on %s stopped: no longer the leader", self.node_id)

    def observe(self, now: float) -> Observation:
        """The observation of this node's store and metrics at `now` (wall-clock)."""
        slices = _slice_keys(self.kv)
        self._observed = {(n, a): v for n, per in slices.items() for a, v in per.items()}
        return build_observation(
            now,
            blueprints=_blueprints(self.kv), scales=_scales(self.kv), slices=slices,
            members=self.leader.members, up=self.leader.up | {self.node_id},
            snapshot=self.metrics.snapshot(), slice_loads=self.metrics.slice_loads(),
            instance_stats=self.metrics.instance_stats(),
            rollouts=[v for _, v in self.kv.list_local("rollouts/") if isinstance(v, RolloutValue)],
        )  # fmt: skip

    def tick(self) -> list[Decision]:
        """One step if this node leads (the loop calls it every `interval`): observe, decide, carry
        out, sync. Returns the step's decisions."""
        if not self.leader.is_leader:
            self._lose_lead()
            return []
        t0 = time.perf_counter()
        core = self.core or self._take_lead()
        obs = self.observe(self._clock())
        if self.recorder is not None:
            self.recorder.add(obs)
        decisions = core.step(obs)
        self.memory = core.memory
        for d in decisions:
            self._carry_out(d)
        self._add(decisions, submit=True)
        self._broadcast()
        spent = time.perf_counter() - t0
        self.steps += 1
        self.step_seconds += spent
        self.step_last = spent
        self.step_max = max(self.step_max, spent)
        return decisions

    def _broadcast(self) -> None:
        if self.memory is None:
            return
        self._epoch += 1
        msg = ControllerSync(self.node_id, self._epoch, self.memory, list(self.history)[-SYNC_DECISIONS:])
        for peer in sorted(self.transport.up_peers):
            self.transport.send(peer, msg)

    def _add(self, decisions: Iterable[Decision], *, submit: bool) -> None:
        new = False
        for d in decisions:
            if d.seq in self._seqs:
                continue
            if len(self.history) == self.history.maxlen:
                self._seqs.discard(self.history[0].seq)
            self.history.append(d)
            self._seqs.add(d.seq)
            self.last_seq = max(self.last_seq, d.seq)
            new = True
            if self._publish is not None:
                try:
                    self._publish(d)
                except Exception:
                    self.log.exception("publishing decision #%d failed", d.seq)
            if submit:
                self.webhooks.submit(d)
        if new:
            self._changed.set()
            self._changed = asyncio.Event()

    # --- carrying out ---------------------------------------------------------------------------

    def _carry_out(self, d: Decision) -> None:
        if not d.applied or d.artifact is None:
            return
        if d.kind in ("scale_up", "scale_down") and d.to_count is not None:
            self._spawn(self._write_scale(d.artifact, d.to_count, d.time, d.reason))
        elif d.kind == "replace" and d.node is not None and d.instance is not None:
            self._spawn(self._write_replace(d.artifact, d.node, d.instance, d.time, d.reason))
        elif d.kind == "recover" and d.node is not None:
            seen = self._observed.get((d.node, d.artifact))
            if seen is not None:
                self._spawn(self._cas(SliceKey(d.node, d.artifact), seen, None))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._writes.add(t)
        t.add_done_callback(self._writes.discard)

    async def _cas(self, key: Any, expected: Any, new: Any) -> bool:
        try:
            async with asyncio.timeout(self.write_timeout):
                return await self.kv.compare_and_set(key, expected, new, self.write_timeout)
        except (TimeoutError, QuorumLost, CommitTimeout, BadRequest) as e:
            self.writes_failed += 1
            self.log.warning("controller write of %s failed: %s", key, e or type(e).__name__)
            return False

    async def _write_scale(self, artifact: str, count: int, when: float, reason: str) -> None:
        key = ScaleKey(artifact)
        for _ in range(2):  # one re-read and retry on a conflict
            cur = self.kv.get_local(key)
            cur = cur if isinstance(cur, ScaleValue) else None
            lo = cur.min if cur is not None else None
            hi = cur.max if cur is not None else None
            n = count
            if lo is not None:
                n = max(lo, n)
            if hi is not None:
                n = min(hi, n)
            if cur is not None and cur.instances == n and cur.source == "controller":
                return
            new = ScaleValue(n, "controller", when, reason, lo, hi)
            if await self._cas(key, cur, new):
                return
        self.log.info("scale/%s changed twice meanwhile; the next step decides again", artifact)

    async def _write_replace(self, artifact: str, node: str, instance: int, when: float, reason: str) -> None:
        key = SliceKey(node, artifact)
        cur = self.kv.get_local(key)
        ok = isinstance(cur, SliceStateValue) and cur.state == SliceState.ACTIVE and instance in cur.instances
        if not ok or not isinstance(cur, SliceStateValue):
            self.log.info("replace of %s #%d on %s: no longer ACTIVE there", artifact, instance, node)
            return
        rest = [i for i in cur.instances if i != instance]
        # the last instance on that node: deactivate the slice there (the reconciler activates it
        # again, or places the instance elsewhere), rather than an ACTIVE key with no instances
        new = (SliceStateValue(cur.state, when, reason, rest) if rest
               else SliceStateValue(SliceState.DEACTIVATE, when, reason, list(cur.instances)))  # fmt: skip
        await self._cas(key, cur, new)

    # --- the reconciler's writes ----------------------------------------------------------------

    def on_write(self, w: Write) -> None:
        """`ClusterDeploymentManager`'s hook: record its restarts and re-placements as decisions."""
        core = self.core
        if core is None or not self.leader.is_leader or not w.key.startswith("slices/"):
            return
        try:
            k = parse_key(w.key)
        except BadRequest:
            return
        if not isinstance(k, SliceKey):
            return
        old = w.expected if isinstance(w.expected, SliceStateValue) else None
        ids = list(old.instances) if old is not None else []
        if w.why == "unload failed instance":
            why = old.reason if old is not None and old.reason else "it failed"
            d = core.record(
                self._clock(), "restart", "failed",
                f"{k.artifact} on {k.node_id} FAILED ({why}): unloading it; its instances start again "
                "(with backoff)",
                artifact=k.artifact, node=k.node_id, inputs={"instances": len(ids)}, source="reconciler",
            )
        elif w.why.startswith("node ") and w.why.endswith(" is down"):
            d = core.record(
                self._clock(), "re_place", "node_down",
                f"{k.node_id} is down: its {len(ids)} instance(s) of {k.artifact} are placed on other nodes",
                artifact=k.artifact, node=k.node_id, inputs={"instances": len(ids)}, source="reconciler",
            )
        else:
            return
        self._add([d], submit=True)

    # --- followers ------------------------------------------------------------------------------

    def on_message(self, sender: str, msg: object) -> None:
        """A controller peer message (`ControllerSync`) from `sender`."""
        if not isinstance(msg, ControllerSync):
            self.log.warning("unexpected %s from %s dropped", type(msg).__name__, sender)
            return
        if msg.leader != sender:
            self.log.warning("controller sync of %s arrived from %s; dropped", msg.leader, sender)
            return
        if self.leader.is_leader:
            self.log.debug("controller sync from %s ignored: %s leads", sender, self.node_id)
            return
        self._lose_lead()  # led until a moment ago: the sender's memory is the newer one
        if self._synced is not None and self._synced[0] == sender and msg.epoch <= self._synced[1]:
            return  # an older sync of the same leader
        self._synced = (sender, msg.epoch)
        self._synced_at = time.monotonic()
        self.memory = msg.memory
        self._add(sorted(msg.decisions, key=lambda d: d.seq), submit=False)

    # --- views ----------------------------------------------------------------------------------

    def avoided(self) -> frozenset[str]:
        """Nodes that get no new instances (the reconciler's `avoid` hook)."""
        if self.core is not None:
            return self.core.avoided
        return frozenset(self.memory.avoided) if self.memory is not None else frozenset()

    def decisions(self, *, since: int = 0, limit: int = 100) -> list[Decision]:
        """The last `limit` decisions with `seq` > `since`, oldest first."""
        out = [d for d in self.history if d.seq > since]
        return out[-limit:] if limit > 0 else []

    async def wait_decisions(self, since: int, timeout: float) -> list[Decision]:
        """Decisions after `since`, waiting up to `timeout` seconds for one to arrive."""
        found = self.decisions(since=since, limit=self.history.maxlen or HISTORY)
        if found:
            return found
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()
        return self.decisions(since=since, limit=self.history.maxlen or HISTORY)

    def status(self) -> ControllerStatus:
        now = self._clock()
        mem = self.memory
        cfg = self.config
        bps = _blueprints(self.kv)
        scales = _scales(self.kv)
        auto = autoscaled(bps, scales)
        active: dict[str, int] = {}
        for per in _slice_keys(self.kv).values():
            for a, v in per.items():
                if v.state == SliceState.ACTIVE:
                    active[a] = active.get(a, 0) + len(v.instances)
        last: dict[str, Decision] = {}
        for d in self.history:
            if d.artifact is not None and d.kind in ("scale_up", "scale_down", "skip", "replace", "restart"):
                last[d.artifact] = d
        arts = []
        for a, info in sorted(auto.items()):
            sm = mem.slices.get(a) if mem is not None else None
            up_left = down_left = 0.0
            if sm is not None:
                up_left = max(0.0, sm.last_up + cfg.scaling.scale_up_cooldown - now)
                down_left = max(0.0, max(sm.last_up, sm.last_down) + cfg.scaling.scale_down_cooldown - now)
            arts.append(ArtifactStatus(
                a, info.min, info.max, info.bounds_source, info.instances, info.count_source,
                active.get(a, 0), last.get(a), round(up_left, 3), round(down_left, 3),
            ))  # fmt: skip
        summary = {
            "scaling": msgspec.to_builtins(cfg.scaling),
            "health": msgspec.to_builtins(cfg.health),
            "alerts": [r.name for r in cfg.alerts],
            "webhooks": [w.url for w in cfg.webhooks],
        }
        leading = self.core is not None and self.leader.is_leader
        return ControllerStatus(
            node_id=self.node_id, leader=self.leader.leader, running=leading, dry_run=cfg.dry_run,
            config=summary,
            config_updated=self.config_value.updated if self.config_value is not None else None,
            config_by=self.config_value.by if self.config_value is not None else None,
            config_error=self.config_error,
            synced_from=None if leading or self._synced is None else self._synced[0],
            sync_age=(None if leading or self._synced_at is None
                      else round(time.monotonic() - self._synced_at, 3)),
            last_seq=max(self.last_seq, mem.seq if mem is not None else 0),
            artifacts=arts, avoided=sorted(self.avoided()), steps=self.steps,
            step_seconds=round(self.step_seconds, 6), step_last_ms=round(self.step_last * 1000, 3),
            step_max_ms=round(self.step_max * 1000, 3), writes_failed=self.writes_failed,
            webhooks=self.webhooks.stats(),
        )  # fmt: skip

    def alerts(self) -> list[AlertView]:
        """Pending and firing alert series (from the latest memory), firing first."""
        mem = self.memory
        if mem is None:
            return []
        rules = {r.name: r for r in self.config.alerts}
        out = []
        for key, st in mem.alerts.items():
            name = key.partition("{")[0]
            r = rules.get(name)
            out.append(AlertView(
                name, key, st.state, st.since, st.value, dict(st.labels),
                r.severity if r else None, r.summary if r else None, r.metric if r else None,
                r.threshold if r else None, r.op if r else None, r.for_ if r else None,
            ))  # fmt: skip
        out.sort(key=lambda a: (a.state != "firing", a.since, a.key))
        return out
