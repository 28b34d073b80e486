"""The per-node, per-artifact slice lifecycle (docs/deployment.md) as a sans-IO state machine.

Owns: `SliceState` (the state names every deployment component shares), the legal transitions,
per-step deadlines and what a node does when its `slices/{node}/{artifact}` key changes.
May import `aether.core` and `aether.kv` (for `SliceStateValue`); does no I/O, reads no clock.

```
 leader writes          node reaches (and writes back)
 ─────────────          ─────────────────────────────────────────────────────────
 LOAD       ──────────► LOADING ──► LOADED
 ACTIVATE   (LOADED)  ► ACTIVATING ──► ACTIVE          (scale: leader rewrites ACTIVE
 DEACTIVATE (ACTIVE)  ► DEACTIVATING ──► LOADED         with another instance list)
 UNLOAD (LOADED|FAILED) ► UNLOADING ──► (key removed)
                        LOADING / ACTIVATING / DEACTIVATING / scale ──► FAILED (+ reason)
```

Inputs (`SliceLifecycle.handle`): `Observed(value)` — the key was written (or removed: None);
`StepSucceeded(seq)`, `StepFailed(seq, reason)` — a step the adapter started finished;
`Tick(now)` — time passed (deadlines); `EndpointsLost(instance)` — someone removed an endpoint of
an instance of this artifact. `SliceLifecycle.recover(value)` is the input for a key found at node
start-up. Every input carries `now` (any monotonic clock, seconds).

Outputs (lists of actions, executed in order by the adapter): `StartStep` (with a deadline),
`AbortStep` (a step exceeded its deadline: cancel it, its late result is ignored),
`WriteState` (write the state back, compare-and-set against the value observed), `RemoveKey`,
`Reject` (an illegal command: log it, it was not applied) and `Note` (informational log).

Rules worth knowing:
- A command that is illegal in the local state is rejected and never applied. If no step is
  running, the machine immediately re-states its real state (so the leader, which decides from
  what nodes report, sees the truth and re-issues what it still wants); if a step is running,
  the step's own write-back does that.
- A repeated command that is already being carried out (LOAD while LOADING, ...) is a no-op;
  one already carried out (LOAD while LOADED, DEACTIVATE while LOADED, ACTIVATE while ACTIVE
  with the same instances) is acknowledged by re-writing the state.
- Every observed command bumps `epoch`; `WriteState`/`RemoveKey` carry the epoch they were
  decided in, and the adapter drops those whose epoch is stale (a newer command superseded them).
- The key being removed by someone else (the leader removed this node's keys because it
  thought the node was dead) tears the slice down locally without writing anything.
- Start-up (`recover`): a key saying LOAD/LOADING/LOADED/ACTIVATE/ACTIVATING/ACTIVE while
  nothing is loaded here (the process restarted) loads the slice again and reports LOADED: the
  leader then activates it as usual. DEACTIVATE*/UNLOAD* keys are removed (nothing to tear
  down); a FAILED key is adopted (the leader will UNLOAD it).
- UNLOADING cannot fail: an unload error or timeout is logged and the key removed.
- Configuration (`ConfigChanged(fingerprint)`, fed by the adapter whenever the config an
  artifact's instances should run changes: a blueprint's `config` or a secret it names): the
  machine remembers which fingerprint its instances were started with. While ACTIVE and idle,
  a different one starts a RECONFIGURE step over its instances in id order, one at a time (the
  adapter restarts each make-before-break, or calls the slice's reload hook), staying ACTIVE;
  if a step is running (activate, scale, deactivate...) the change waits for it to end. A failed
  or timed-out reconfigure does not take the slice down: it stays ACTIVE (its instances keep
  serving with the config they had) with a `reason` saying the change was not applied and why,
  and the same config is not tried again; the next change is. (Instances started afresh with a
  config that does not work — a new placement, a restarted node — fail to start and go FAILED as
  usual.) Its deadline is the activate plus the deactivate deadline per instance.
- Endpoints removed by someone else (`EndpointsLost(instance)`, fed by the adapter when an
  endpoint of this artifact is deleted): while the node runs that instance (ACTIVE, or an
  activate/scale step that keeps or starts it) the machine starts a REPUBLISH step when idle
  (after the running step otherwise), staying ACTIVE: the adapter publishes the missing
  endpoints of its instances again. How it happens: two nodes that both believed they led
  placed one instance id on two nodes; the later host's publish (a put) overwrote the
  endpoints, and when the duplicate was scaled away that host removed "its" endpoints (CAS on
  its own value), leaving the first host running the instance with no endpoint. Or a stale
  leader removed the endpoints of a node it believed dead while the node's key survived.
  Nothing else would ever publish them again: the leader decides from `slices/` keys, and those
  say ACTIVE. The node's own removals (scale-down, deactivation, cleanup after a failure) are of
  instances it does not keep, so they are ignored. A failed REPUBLISH leaves the slice ACTIVE.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from aether.kv.keys import SliceStateValue


class SliceState(StrEnum):
    LOAD = "LOAD"
    LOADING = "LOADING"
    LOADED = "LOADED"
    ACTIVATE = "ACTIVATE"
    ACTIVATING = "ACTIVATING"
    ACTIVE = "ACTIVE"
    DEACTIVATE = "DEACTIVATE"
    DEACTIVATING = "DEACTIVATING"
    UNLOAD = "UNLOAD"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


COMMANDS = frozenset({SliceState.LOAD, SliceState.ACTIVATE, SliceState.DEACTIVATE, SliceState.UNLOAD})
"""States written by the leader."""

NODE_STATES = frozenset(SliceState) - COMMANDS
"""States written by the node that hosts the slice."""

PRESENT_STATES = frozenset({
    SliceState.LOAD, SliceState.LOADING, SliceState.LOADED,
    SliceState.ACTIVATE, SliceState.ACTIVATING, SliceState.ACTIVE,
})
"""States in which the instances of a key count as placed on that node."""


class Step(StrEnum):
    LOAD = "load"
    ACTIVATE = "activate"
    SCALE = "scale"
    DEACTIVATE = "deactivate"
    UNLOAD = "unload"
    RECONFIGURE = "reconfigure"
    REPUBLISH = "republish"


@dataclass(frozen=True, slots=True)
class LifecycleTimeouts:
    """Deadline of each step, seconds. A scale change uses the activate deadline; a reconfigure
    gets activate + deactivate per instance."""

    load: float = 60.0
    activate: float = 10.0
    deactivate: float = 10.0
    unload: float = 10.0

    def for_step(self, step: Step) -> float:
        if step is Step.LOAD:
            return self.load
        if step is Step.RECONFIGURE:  # per instance: start the new object, drain and stop the old
            return self.activate + self.deactivate
        if step in (Step.ACTIVATE, Step.SCALE, Step.REPUBLISH):
            return self.activate
        if step is Step.DEACTIVATE:
            return self.deactivate
        return self.unload


# --- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observed:
    value: SliceStateValue | None
    now: float


@dataclass(frozen=True, slots=True)
class StepSucceeded:
    seq: int
    now: float


@dataclass(frozen=True, slots=True)
class StepFailed:
    seq: int
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Quarantine:
    """The node's runtime gives up on the slice (it keeps blocking its loop): take it down, FAILED."""

    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """The config the artifact's instances should run now has this fingerprint."""

    fingerprint: str
    now: float


@dataclass(frozen=True, slots=True)
class EndpointsLost:
    """An endpoint of `instance` of this artifact was removed (by anyone: the machine ignores the
    removals that are not of an instance it keeps running)."""

    instance: int
    now: float


LifecycleEvent = Observed | StepSucceeded | StepFailed | Tick | Quarantine | ConfigChanged | EndpointsLost


# --- actions ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartStep:
    step: Step
    seq: int
    instances: tuple[int, ...]
    deadline: float


@dataclass(frozen=True, slots=True)
class AbortStep:
    step: Step
    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class WriteState:
    state: SliceState
    reason: str | None
    instances: tuple[int, ...]
    epoch: int


@dataclass(frozen=True, slots=True)
class RemoveKey:
    epoch: int


@dataclass(frozen=True, slots=True)
class Reject:
    command: str
    local: SliceState | None
    message: str


@dataclass(frozen=True, slots=True)
class Note:
    message: str


LifecycleAction = StartStep | AbortStep | WriteState | RemoveKey | Reject | Note

_STEP_STATE = {
    Step.LOAD: SliceState.LOADING,
    Step.ACTIVATE: SliceState.ACTIVATING,
    Step.SCALE: SliceState.ACTIVE,
    Step.DEACTIVATE: SliceState.DEACTIVATING,
    Step.UNLOAD: SliceState.UNLOADING,
    Step.RECONFIGURE: SliceState.ACTIVE,
    Step.REPUBLISH: SliceState.ACTIVE,
}


@dataclass(slots=True)
class _Running:
    step: Step
    seq: int
    deadline: float
    instances: tuple[int, ...]
    fail_reason: str | None = None  # a quarantine: the step succeeding still ends FAILED
    config: str | None = None  # ACTIVATE / RECONFIGURE: the config fingerprint the instances get
    limit: float = 0.0  # seconds it may take


class SliceLifecycle:
    """Lifecycle of one artifact on one node. Feed events to `handle`, execute what it returns."""

    def __init__(self, artifact: str, timeouts: LifecycleTimeouts | None = None) -> None:
        self.artifact = artifact
        self.timeouts = timeouts or LifecycleTimeouts()
        self.state: SliceState | None = None  # what this node has reached (None: nothing here)
        self.instances: tuple[int, ...] = ()
        self.reason: str | None = None
        self.observed: SliceStateValue | None = None
        self.epoch = 0
        self._running: _Running | None = None
        self._seq = 0
        self._orphan = False  # key removed by someone else: tearing down silently
        self._deferred = False  # key re-created during that teardown: handle it afterwards
        self.config: str | None = None  # config fingerprint the active instances were given
        self.wanted_config: str | None = None  # the one they should have (ConfigChanged)
        self._config_failed: str | None = None  # a config whose reconfigure failed: not retried
        self._republish = False  # endpoints of a running instance were removed: publish them again

    # --- queries --------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def running_step(self) -> Step | None:
        return self._running.step if self._running else None

    @property
    def running_seq(self) -> int | None:
        return self._running.seq if self._running else None

    @property
    def serving(self) -> tuple[int, ...]:
        """The instances this node runs and keeps (or is starting): those whose endpoints it owns."""
        r = self._running
        if self._orphan:
            return ()
        if r is not None and r.step in (Step.ACTIVATE, Step.SCALE):
            return r.instances
        return self.instances if self.state is SliceState.ACTIVE else ()

    @property
    def finished(self) -> bool:
        """Nothing here, nothing running and no key: the adapter may drop this machine."""
        return self.state is None and self._running is None and self.observed is None

    # --- inputs ---------------------------------------------------------------------------------

    def handle(self, event: LifecycleEvent) -> list[LifecycleAction]:
        if isinstance(event, Observed):
            return self._observe(event.value, event.now)
        if isinstance(event, StepSucceeded):
            return self._step_done(event.seq, True, None, event.now)
        if isinstance(event, StepFailed):
            return self._step_done(event.seq, False, event.reason, event.now)
        if isinstance(event, Quarantine):
            return self._quarantine(event.reason, event.now)
        if isinstance(event, ConfigChanged):
            self.wanted_config = event.fingerprint
            return self._maybe_reconfigure(event.now)
        if isinstance(event, EndpointsLost):
            if event.instance not in self.serving:
                return []  # this node's own removal (scale-down, deactivation, cleanup) or not ours
            self._republish = True
            return self._maybe_republish(event.now)
        return self._tick(event.now)

    def _maybe_republish(self, now: float) -> list[LifecycleAction]:
        """ACTIVE, idle, and endpoints of its instances were removed: publish them again."""
        if (not self._republish or self.state is not SliceState.ACTIVE or self._running is not None
                or self._orphan):
            return []
        self._republish = False
        out = self._start(Step.REPUBLISH, tuple(sorted(self.instances)), now, write=None)
        return [Note(f"{self.artifact}: endpoints of its instances were removed by another node while "
                     f"ACTIVE: publishing those of {list(self.instances)} again"), *out]

    def _maybe_reconfigure(self, now: float) -> list[LifecycleAction]:
        """ACTIVE, idle and running another config than wanted: reconfigure every instance."""
        if self.state is not SliceState.ACTIVE or self._running is not None or self._orphan:
            return []
        if self.wanted_config == self.config and self._config_failed is not None:
            # back to the config the instances run: the failed change no longer matters
            self._config_failed = self.reason = None
            return [WriteState(SliceState.ACTIVE, None, self.instances, self.epoch)]
        if self.wanted_config is None or self.wanted_config in (self.config, self._config_failed):
            return []
        out = self._start(Step.RECONFIGURE, tuple(sorted(self.instances)), now, write=None)
        return [Note(f"{self.artifact}: its config changed: giving instances {list(self.instances)} the new "
                     "one, one at a time"), *out]

    def _quarantine(self, reason: str, now: float) -> list[LifecycleAction]:
        """ACTIVE and idle: deactivate here and report FAILED with `reason` (the leader places the
        instances elsewhere and backs off this node). Otherwise there is nothing to take down now."""
        if self.state is not SliceState.ACTIVE or self._running is not None or self._orphan:
            return [Note(f"{self.artifact}: not quarantined ({self._local_name()}): {reason}")]
        self.epoch += 1
        out = self._start(Step.DEACTIVATE, self.instances, now, write=SliceState.DEACTIVATING)
        assert self._running is not None
        self._running.fail_reason = f"quarantined: {reason}"
        return [Note(f"{self.artifact}: quarantined: {reason}"), *out]

    def recover(self, value: SliceStateValue | None, now: float) -> list[LifecycleAction]:
        """Start-up: `value` is what the store holds for this node and artifact; nothing is loaded."""
        self.observed = value
        if value is None or self.state is not None or self._running is not None:
            return self._observe(value, now)
        st = _parse_state(value.state)
        inst = tuple(value.instances)
        if st in PRESENT_STATES:
            self.epoch += 1
            note = Note(
                f"{self.artifact}: the store says {st} but nothing is loaded on this node "
                "(restarted?): loading it again; the leader activates it"
            )
            return [note, *self._start(Step.LOAD, inst, now, write=SliceState.LOADING)]
        if st is SliceState.FAILED:
            self.state, self.instances, self.reason = st, inst, value.reason
            return []
        self.epoch += 1
        return [Note(f"{self.artifact}: the store says {value.state} and nothing is loaded here: "
                     "removing the key"), RemoveKey(self.epoch)]

    # --- observed key values --------------------------------------------------------------------

    def _observe(self, value: SliceStateValue | None, now: float) -> list[LifecycleAction]:
        self.observed = value
        if value is None:
            if self.state is None and self._running is None:
                return []
            self.epoch += 1
            if self._orphan:
                self._deferred = False
                return []
            self._orphan = True
            return [Note(f"{self.artifact}: key removed by another node while {self._local_name()}: "
                         "tearing the slice down here"), *self._teardown(now)]
        st = _parse_state(value.state)
        if self._orphan:
            self.epoch += 1
            self._deferred = True
            return [Note(f"{self.artifact}: {value.state} arrived while tearing down; handled afterwards")]
        if st is None:
            self.epoch += 1
            return self._reject(value.state, "unknown state")
        inst = tuple(value.instances)
        if self.state is None and self._running is None:
            return self._from_nothing(st, inst, value, now)
        if st in COMMANDS:
            self.epoch += 1
            return self._command(st, inst, now)
        if st is SliceState.ACTIVE and self.state is SliceState.ACTIVE and inst != self._target():
            # the leader rewrote ACTIVE with another instance list: a scale change
            self.epoch += 1
            if self._running is not None:
                return self._reject(f"ACTIVE{list(inst)}", f"busy: {self._local_name()}")
            return self._start(Step.SCALE, inst, now, write=None)
        return []  # the echo of our own write, or an older report

    def _from_nothing(
        self, st: SliceState, inst: tuple[int, ...], value: SliceStateValue, now: float
    ) -> list[LifecycleAction]:
        self.epoch += 1
        if st is SliceState.LOAD:
            self.instances = inst
            return self._start(Step.LOAD, inst, now, write=SliceState.LOADING)
        if st in (SliceState.UNLOAD, SliceState.UNLOADING, SliceState.DEACTIVATE, SliceState.DEACTIVATING):
            return [RemoveKey(self.epoch)]  # nothing here: that is what was asked
        if st is SliceState.FAILED:
            self.state, self.instances, self.reason = st, inst, value.reason
            return []
        return self._reject(str(st), "the slice is not loaded on this node")

    def _command(self, st: SliceState, inst: tuple[int, ...], now: float) -> list[LifecycleAction]:
        s = self.state
        idle = self._running is None
        if st is SliceState.LOAD:
            if s is SliceState.LOADING:
                self.instances = inst
                return []
            if s is SliceState.LOADED and idle:
                self.instances = inst
                return [WriteState(SliceState.LOADED, None, inst, self.epoch)]
        elif st is SliceState.ACTIVATE:
            if s is SliceState.LOADED and idle:
                return self._start(Step.ACTIVATE, inst, now, write=SliceState.ACTIVATING)
            if s is SliceState.ACTIVATING:
                return []
            if s is SliceState.ACTIVE and idle:
                if inst == self.instances:
                    return [WriteState(SliceState.ACTIVE, None, inst, self.epoch)]
                return self._start(Step.SCALE, inst, now, write=None)
        elif st is SliceState.DEACTIVATE:
            if s is SliceState.ACTIVE and idle:
                return self._start(Step.DEACTIVATE, self.instances, now, write=SliceState.DEACTIVATING)
            if s is SliceState.DEACTIVATING:
                return []
            if s is SliceState.LOADED and idle:
                return [WriteState(SliceState.LOADED, None, self.instances, self.epoch)]
        elif st is SliceState.UNLOAD:
            if s in (SliceState.LOADED, SliceState.FAILED) and idle:
                return self._start(Step.UNLOAD, self.instances, now, write=SliceState.UNLOADING)
            if s is SliceState.UNLOADING:
                return []
        return self._reject(str(st), f"illegal while {self._local_name()}")

    def _reject(self, command: str, why: str) -> list[LifecycleAction]:
        out: list[LifecycleAction] = [
            Reject(command, self.state, f"{self.artifact}: rejected {command}: {why}")
        ]
        if self._running is None:  # re-state the truth so the leader decides again
            if self.state is None:
                out.append(RemoveKey(self.epoch))
            else:
                keep = self.state in (SliceState.FAILED, SliceState.ACTIVE)  # ACTIVE: a config not applied
                out.append(WriteState(self.state, self.reason if keep else None, self.instances, self.epoch))
        return out

    # --- steps ----------------------------------------------------------------------------------

    def _start(
        self, step: Step, inst: tuple[int, ...], now: float, *, write: SliceState | None
    ) -> list[LifecycleAction]:
        self._seq += 1
        per = max(1, len(inst)) if step is Step.RECONFIGURE else 1  # one instance after the other
        limit = self.timeouts.for_step(step) * per
        self._running = _Running(step, self._seq, now + limit, inst, limit=limit)
        if step in (Step.ACTIVATE, Step.RECONFIGURE):
            self._running.config = self.wanted_config
        self.state = _STEP_STATE[step]
        if step is Step.LOAD:
            self.instances = inst
        out: list[LifecycleAction] = []
        if write is not None and not self._orphan:
            out.append(WriteState(write, None, inst, self.epoch))
        out.append(StartStep(step, self._seq, inst, self._running.deadline))
        return out

    def _tick(self, now: float) -> list[LifecycleAction]:
        r = self._running
        if r is None or now < r.deadline:
            return []
        reason = f"{r.step} timed out after {r.limit:.1f}s"
        return [AbortStep(r.step, r.seq, reason), *self._finish(r, False, reason, now)]

    def _step_done(self, seq: int, ok: bool, reason: str | None, now: float) -> list[LifecycleAction]:
        r = self._running
        if r is None or r.seq != seq:
            return []  # the result of an aborted step
        return self._finish(r, ok, None if ok else f"{r.step} failed: {reason}", now)

    def _finish(self, r: _Running, ok: bool, reason: str | None, now: float) -> list[LifecycleAction]:
        self._running = None
        out: list[LifecycleAction] = []
        if r.step is Step.UNLOAD:
            if not ok:
                out.append(Note(f"{self.artifact}: {reason}; forgetting it anyway (unload cannot fail)"))
            self.state, self.instances, self.reason = None, (), None
            if self._orphan:
                return out + self._teardown(now)
            return [*out, RemoveKey(self.epoch)]
        if r.step is Step.REPUBLISH:  # the instances ran throughout: ACTIVE, reason unchanged
            self.state = SliceState.ACTIVE
            if not ok:
                out.append(Note(f"{self.artifact}: {reason}; its instances keep running"))
        elif ok and r.fail_reason is not None:
            self.state, self.reason = SliceState.FAILED, r.fail_reason
        elif ok:
            self.reason = None
            if r.step in (Step.ACTIVATE, Step.SCALE):
                self.state, self.instances = SliceState.ACTIVE, r.instances
            elif r.step is Step.RECONFIGURE:  # the same instances, in the same order
                self.state = SliceState.ACTIVE
            else:  # LOAD, DEACTIVATE
                self.state = SliceState.LOADED
            if r.step in (Step.ACTIVATE, Step.RECONFIGURE):
                self.config, self._config_failed = r.config, None
        elif r.step is Step.RECONFIGURE and r.fail_reason is None:  # the old instances still serve
            self.state = SliceState.ACTIVE
            self.reason = (f"config change not applied: {reason}; the instances serve with their "
                           "previous config")
            self._config_failed = r.config
        else:
            self.state, self.reason = SliceState.FAILED, r.fail_reason or reason
        if self.state is not SliceState.ACTIVE:
            self.config = None
            self._republish = False
        if self._orphan:
            return out + self._teardown(now)
        write = WriteState(self.state, self.reason, self.instances, self.epoch)
        return [*out, write, *self._maybe_reconfigure(now), *self._maybe_republish(now)]

    def _teardown(self, now: float) -> list[LifecycleAction]:
        """Key removed by someone else: go back to nothing without writing anything."""
        if self._running is not None:
            return []  # continue when the running step ends
        if self.state is SliceState.ACTIVE:
            return self._start(Step.DEACTIVATE, self.instances, now, write=None)
        if self.state is not None:
            return self._start(Step.UNLOAD, self.instances, now, write=None)
        self._orphan = False
        if self._deferred and self.observed is not None:
            self._deferred = False
            return self._observe(self.observed, now)
        self._deferred = False
        return []

    def _target(self) -> tuple[int, ...]:
        r = self._running
        return r.instances if r is not None and r.step is Step.SCALE else self.instances

    def _local_name(self) -> str:
        if self._running is not None and self._running.step is Step.SCALE:
            return "ACTIVE (changing instances)"
        if self._running is not None and self._running.step is Step.RECONFIGURE:
            return "ACTIVE (reconfiguring)"
        if self._running is not None and self._running.step is Step.REPUBLISH:
            return "ACTIVE (publishing endpoints again)"
        return str(self.state) if self.state is not None else "nothing is loaded"


def _parse_state(text: str) -> SliceState | None:
    try:
        return SliceState(text)
    except ValueError:
        return None
