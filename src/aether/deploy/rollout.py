"""Rollouts: replacing the running version of a slice with a new one without dropping a call.

A sans-IO core (docs/deployment.md, *Rolling and canary updates*). Owns the `RolloutValue`
transitions: starting a rollout (`begin`), the leader's step function (`advance`, called once per
reconciliation pass with what the store and the metrics say), the operator's commands (`pause`,
`resume`, `abort`) and the desired counts a rollout imposes on the two versions (`overrides`,
read by `aether.deploy.reconcile.desired_state`). No I/O, no clock: `now` (wall-clock seconds) is
passed in. May import `aether.core`, `aether.kv` and `aether.deploy.errors`.

Strategies (`RolloutPolicy.strategy`):

- **rolling** — new instances first: at most `instances + max_surge` instances run and at least
  `instances - max_unavailable` are ready at any time. Each pass starts new instances while the
  surge allows and removes old ones as new ones become ready. Traffic follows the ready
  instances (`weights` = ready counts per version). Done when every new instance is ready and no
  old one is left.
- **canary** — `steps` are percents of the calls for the new version (e.g. 10, 50, 100). Each step
  runs ``ceil(instances * percent / 100)`` new instances (at least one) beside all old ones, waits
  until they are ready, then sends the step's share of the calls to them and analyses the step
  for `interval` seconds. After the last step (100 %) the old instances are removed.
- **blue-green** — all new instances start beside the old ones; when they are ready every call
  goes to them at once, and the old ones stay for `interval` seconds (a rollback is instant)
  before they are removed.

Gates (every strategy, judged on the calls of the current step only, and only once the new
version has finished `min_calls` calls in it): the share of the new version's calls that failed
(5xx) must not exceed `max_error_rate` — judged continuously, so a bad version is rolled back as
soon as the evidence is there — and at the end of a canary step the p99 of the new version must
not exceed `max_p99_ratio` times the p99 of the old one (when the old one also has `min_calls`).
A new instance that FAILS (its `start` raised, it could not be loaded) or new instances not ready
within `progress_deadline` seconds also roll back.

A rollback sets the desired counts back (all old instances, no new ones) and sends every call to
the old version; once the old instances are all ready the rollout ends ``rolled-back`` (or
``aborted`` when an operator asked) and the leader writes the old version back into the
blueprints — the old slice as the rollout recorded it (`RolloutValue.old_slice`: its config,
limits, isolation and entry policies, not the new version's) — so what is stored is what runs.

A rollout of an artifact no blueprint lists any more (its blueprint deleted, the artifact
undeployed), in any active state, ends ``aborted`` at once: its counts would otherwise keep both
versions running (a paused rollout for ever).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from aether.core.errors import BadRequest
from aether.deploy.errors import RolloutConflict
from aether.kv.keys import BlueprintSlice, RolloutPolicy, RolloutValue

__all__ = [
    "ACTIVE_STATES",
    "STRATEGIES",
    "TERMINAL_STATES",
    "Observation",
    "RolloutStep",
    "VersionState",
    "Window",
    "abort",
    "advance",
    "begin",
    "check_policy",
    "counts_window",
    "overrides",
    "pause",
    "resume",
    "version_of",
]

STRATEGIES = ("rolling", "canary", "blue-green")
PROGRESSING, PAUSED, ROLLING_BACK = "progressing", "paused", "rolling-back"
SUCCEEDED, ROLLED_BACK, ABORTED = "succeeded", "rolled-back", "aborted"
ACTIVE_STATES = frozenset({PROGRESSING, PAUSED, ROLLING_BACK})
TERMINAL_STATES = frozenset({SUCCEEDED, ROLLED_BACK, ABORTED})
DEFAULT_CANARY_STEPS = (10, 50, 100)
MAX_HISTORY = 50


def version_of(coords: str) -> tuple[str, str]:
    """``group:artifact:version`` -> (``group:artifact``, ``version``)."""
    name, _, version = coords.rpartition(":")
    return name, version


def _float(x: float | None) -> float | None:
    # floats as floats: the store compares encoded values, and 30 would come back as 30.0
    return None if x is None else float(x)


def check_policy(p: RolloutPolicy) -> str | None:
    """What is wrong with a rollout policy (None: nothing)."""
    if p.strategy not in STRATEGIES:
        return f"strategy must be one of {', '.join(STRATEGIES)}, got {p.strategy!r}"
    if p.steps:
        if p.strategy != "canary":
            return f"steps apply to the canary strategy only (strategy is {p.strategy!r})"
        if any(not 0 < s <= 100 for s in p.steps) or list(p.steps) != sorted(set(p.steps)):
            return f"steps must be increasing percents in 1..100, e.g. [10, 50, 100], got {list(p.steps)}"
        if p.steps[-1] != 100:
            return f"the last step must be 100 (every call to the new version), got {list(p.steps)}"
    if p.max_surge < 0 or p.max_unavailable < 0:
        return "max_surge and max_unavailable must be >= 0"
    if p.max_surge == 0 and p.max_unavailable == 0:
        return "max_surge and max_unavailable cannot both be 0: the rollout could never make progress"
    for name in ("interval", "progress_deadline"):
        if not getattr(p, name) > 0:
            return f"{name} must be a number of seconds > 0, got {getattr(p, name)!r}"
    if p.max_error_rate is not None and not 0 <= p.max_error_rate <= 1:
        return f"max_error_rate must be a share between 0 and 1 (0.01 = 1 %), got {p.max_error_rate!r}"
    if p.max_p99_ratio is not None and not p.max_p99_ratio > 0:
        return (
            f"max_p99_ratio must be > 0 (e.g. 1.5: the new p99 may be 50 % above the old), "
            f"got {p.max_p99_ratio!r}"
        )
    if p.min_calls < 1:
        return f"min_calls must be >= 1, got {p.min_calls!r}"
    return None


def begin(
    rollout_id: str,
    artifact: str,
    old_version: str,
    new_version: str,
    instances: int,
    policy: RolloutPolicy,
    now: float,
    *,
    blueprint: str = "",
    old_slice: BlueprintSlice | None = None,
) -> RolloutValue:
    """A new rollout of `artifact` (``group:artifact``) from `old_version` to `new_version` with
    `instances` instances, in state ``progressing``; `old_slice` is the old version's slice of the
    blueprint (kept for the old instances and written back by a rollback). Raises `BadRequest`
    for a bad policy."""
    problem = check_policy(policy)
    if problem is not None:
        raise BadRequest(f"rollout of {artifact}: {problem}")
    if old_version == new_version:
        raise BadRequest(f"rollout of {artifact}: {new_version} is already the running version")
    if instances < 1:
        raise BadRequest(f"rollout of {artifact}: instances must be >= 1, got {instances}")
    steps = list(policy.steps)
    if policy.strategy == "canary" and not steps:
        steps = list(DEFAULT_CANARY_STEPS)
    elif policy.strategy == "blue-green":
        steps = [100]
    r = RolloutValue(
        id=rollout_id, artifact=artifact, old_version=old_version, new_version=new_version,
        strategy=policy.strategy, state=PROGRESSING, instances=instances, old_instances=instances,
        new_instances=0, weights={old_version: 1}, step=0, steps=steps, max_surge=policy.max_surge,
        max_unavailable=policy.max_unavailable, interval=float(policy.interval),
        max_error_rate=_float(policy.max_error_rate), max_p99_ratio=_float(policy.max_p99_ratio),
        progress_deadline=float(policy.progress_deadline),
        min_calls=policy.min_calls, started=now, updated=now, step_started=now, blueprint=blueprint,
        old_slice=old_slice,
    )  # fmt: skip
    return _log(
        r,
        f"{policy.strategy} update of {artifact} from {old_version} to {new_version} "
        f"({instances} instances) started",
    )


# --- what the leader observes ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionState:
    """One version as the store shows it: ACTIVE instances, and why a placement FAILED (if one did)."""

    ready: int = 0
    failed: str | None = None


@dataclass(frozen=True, slots=True)
class Window:
    """Calls one version finished since the current step started (from the metrics)."""

    calls: int = 0
    failures: int = 0
    p99_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    old: VersionState = VersionState()
    new: VersionState = VersionState()
    old_window: Window = Window()
    new_window: Window = Window()
    listed: bool = True  # does a blueprint still list the artifact (any version)?


@dataclass(frozen=True, slots=True)
class RolloutStep:
    """What `advance` decided: the new value (None: unchanged), the events to publish, and the
    version to write back into the blueprints (set when a rollback completes)."""

    value: RolloutValue | None = None
    events: list[str] = field(default_factory=list)
    blueprints_to: str | None = None


def counts_window(
    baseline: Mapping[str, tuple[int, int, int, list[int]]],
    current: Mapping[str, tuple[int, int, int, list[int]]],
    bounds: list[float],
) -> Window:
    """The calls between two readings of per-node cumulative counters ``{node: (incarnation, calls,
    failures, latency buckets)}``: a node absent from `baseline` or restarted since (other
    incarnation, or counters gone back) counts from zero. `bounds` are the buckets' upper bounds
    in seconds (the last bucket is overflow); p99 is the upper bound of the bucket holding it."""
    calls = failures = 0
    buckets = [0] * (len(bounds) + 1)
    for node, (inc, c, f, b) in current.items():
        base = baseline.get(node)
        if base is not None and base[0] == inc and base[1] <= c:
            c, f = c - base[1], f - base[2]
            b = [x - y for x, y in zip(b, base[3], strict=False)]
        calls += max(c, 0)
        failures += max(f, 0)
        for i, n in enumerate(b[: len(buckets)]):
            buckets[i] += max(n, 0)
    p99 = None
    total = sum(buckets)
    if total:
        rank = math.ceil(0.99 * total)
        seen = 0
        for i, n in enumerate(buckets):
            seen += n
            if seen >= rank:
                p99 = (bounds[i] if i < len(bounds) else bounds[-1] * 2) * 1000
                break
    return Window(calls, failures, p99)


# --- the leader's step -------------------------------------------------------------------------


def _log(r: RolloutValue, line: str) -> RolloutValue:
    history = [*r.history, line][-MAX_HISTORY:]
    return _replace(r, history=history)


def _replace(r: RolloutValue, **changes: object) -> RolloutValue:
    return msgspec.structs.replace(r, **changes)


def _rollback(r: RolloutValue, reason: str, now: float, *, aborted: bool = False) -> RolloutStep:
    v = _replace(
        r,
        state=ROLLING_BACK,
        old_instances=r.instances,
        new_instances=0,
        weights={r.old_version: 1},
        reason=("aborted: " if aborted else "") + reason,
        updated=now,
        step_started=now,
    )
    text = f"{'abort' if aborted else 'rollback'} of {r.artifact} {r.new_version}: {reason}"
    return RolloutStep(_log(v, text), [text])


def _gate(r: RolloutValue, obs: Observation, end_of_step: bool) -> str | None:
    """Why the current step fails its gates (None: it does not, or not enough calls yet)."""
    w = obs.new_window
    if w.calls < r.min_calls:
        return None
    if r.max_error_rate is not None and w.failures / w.calls > r.max_error_rate:
        return (
            f"{w.failures} of {w.calls} calls of {r.new_version} failed "
            f"({100 * w.failures / w.calls:.1f} % > max_error_rate {100 * r.max_error_rate:g} %)"
        )
    if end_of_step and r.max_p99_ratio is not None:
        o = obs.old_window
        judged = w.p99_ms is not None and o.p99_ms and o.calls >= r.min_calls
        if judged and w.p99_ms is not None and o.p99_ms and w.p99_ms > r.max_p99_ratio * o.p99_ms:
            return (
                f"p99 of {r.new_version} is {w.p99_ms:g} ms, {w.p99_ms / o.p99_ms:.1f}x the "
                f"{o.p99_ms:g} ms of {r.old_version} (max_p99_ratio {r.max_p99_ratio:g})"
            )
    return None


def _window_text(obs: Observation) -> str:
    w = obs.new_window
    if not w.calls:
        return "no calls"
    p99 = f", p99 {w.p99_ms:g} ms" if w.p99_ms is not None else ""
    return f"{w.calls} calls, {w.failures} failed{p99}"


def _count(r: RolloutValue, obs: Observation) -> RolloutValue:
    """Add the finished window's calls to the rollout's totals."""
    return _replace(r, calls=r.calls + obs.new_window.calls, failures=r.failures + obs.new_window.failures)


def advance(r: RolloutValue, obs: Observation, now: float) -> RolloutStep:
    """One step of an active rollout given what the store and the metrics show."""
    if r.state in TERMINAL_STATES:
        return RolloutStep()
    if not obs.listed:  # its blueprint was deleted (or the artifact undeployed): nothing to roll
        reason = f"no blueprint lists {r.artifact} any more (deleted or undeployed)"
        v = _replace(_count(r, obs), state=ABORTED, old_instances=0, new_instances=0, weights={},
                     reason=reason, updated=now)  # fmt: skip
        text = f"rollout of {r.artifact} to {r.new_version} ended: {reason}"
        return RolloutStep(_log(v, text), [text])
    if r.state == PAUSED:
        return RolloutStep()
    if r.state == ROLLING_BACK:
        if obs.old.ready >= r.instances:
            final = ABORTED if r.reason.startswith("aborted") else ROLLED_BACK
            v = _replace(_count(r, obs), state=final, weights={}, updated=now)
            text = f"{r.artifact} is back on {r.old_version} ({final})"
            return RolloutStep(_log(v, text), [text], blueprints_to=r.old_version)
        return RolloutStep()
    # progressing
    if obs.new.failed is not None:
        return _rollback(_count(r, obs), f"an instance of {r.new_version} failed: {obs.new.failed}", now)
    waiting = obs.new.ready < r.new_instances
    if waiting and now - r.step_started > r.progress_deadline:
        return _rollback(
            _count(r, obs),
            f"{obs.new.ready} of {r.new_instances} new instances ready after {r.progress_deadline:g} s "
            "(progress_deadline)", now,
        )  # fmt: skip
    if r.strategy == "rolling":
        return _advance_rolling(r, obs, now)
    return _advance_steps(r, obs, now)


def _advance_rolling(r: RolloutValue, obs: Observation, now: float) -> RolloutStep:
    failed = _gate(r, obs, end_of_step=False)
    if failed is not None:
        return _rollback(_count(r, obs), failed, now)
    n = r.instances
    new_target = max(r.new_instances, min(n, n + r.max_surge - r.old_instances))
    old_target = min(r.old_instances, max(0, n - r.max_unavailable - min(obs.new.ready, new_target)))
    weights = {r.old_version: min(old_target, obs.old.ready), r.new_version: min(obs.new.ready, new_target)}
    weights = {v: w for v, w in weights.items() if w > 0}
    if obs.new.ready >= n and old_target == 0 and new_target == n:
        v = _replace(
            _count(r, obs),
            state=SUCCEEDED,
            old_instances=0,
            new_instances=n,
            weights={},
            updated=now,
            reason="",
        )
        text = f"{r.artifact} runs {r.new_version} on all {n} instances (succeeded)"
        return RolloutStep(_log(v, text), [text])
    if (new_target, old_target) != (r.new_instances, r.old_instances):
        v = _replace(
            r,
            new_instances=new_target,
            old_instances=old_target,
            weights=weights or r.weights,
            step=r.step + 1,
            updated=now,
            step_started=now if new_target != r.new_instances else r.step_started,
        )
        text = (
            f"step {r.step + 1}: {r.new_version} x{new_target} ({min(obs.new.ready, new_target)} "
            f"ready), {r.old_version} x{old_target}"
        )
        return RolloutStep(_log(v, text), [text])
    if weights and weights != r.weights:
        return RolloutStep(_replace(r, weights=weights, updated=now))
    return RolloutStep()


def _advance_steps(r: RolloutValue, obs: Observation, now: float) -> RolloutStep:
    """canary and blue-green: the step's new instances, then its share of the calls, then analysis."""
    n = r.instances
    percent = r.steps[min(r.step, len(r.steps) - 1)]
    want_new = n if r.strategy == "blue-green" else max(1, min(n, math.ceil(n * percent / 100)))
    if r.new_instances < want_new:
        v = _replace(r, new_instances=want_new, updated=now, step_started=now)
        text = f"step {r.step + 1}: starting {want_new} instance(s) of {r.new_version}"
        return RolloutStep(_log(v, text), [text])
    if obs.new.ready < r.new_instances:
        return RolloutStep()  # waiting for readiness (the progress deadline is checked by advance)
    share = {r.new_version: 100} if percent >= 100 else {r.old_version: 100 - percent, r.new_version: percent}
    if r.weights != share:
        v = _replace(r, weights=share, updated=now, step_started=now)
        text = f"step {r.step + 1}: {percent} % of the calls to {r.new_version}"
        return RolloutStep(_log(v, text), [text])
    end = now - r.step_started >= r.interval
    failed = _gate(r, obs, end_of_step=end)
    if failed is not None:
        return _rollback(_count(r, obs), failed, now)
    if not end:
        return RolloutStep()
    done = _count(r, obs)
    if r.step + 1 < len(r.steps):
        v = _replace(done, step=r.step + 1, updated=now, step_started=now)
        text = f"step {r.step + 1} ({percent} %) passed: {_window_text(obs)}"
        return RolloutStep(_log(v, text), [text])
    v = _replace(done, state=SUCCEEDED, old_instances=0, new_instances=n, weights={}, updated=now, reason="")
    text = (
        f"step {r.step + 1} ({percent} %) passed: {_window_text(obs)}; {r.artifact} runs "
        f"{r.new_version} (succeeded)"
    )
    return RolloutStep(_log(v, text), [text])


# --- operator commands -------------------------------------------------------------------------


def pause(r: RolloutValue, now: float) -> RolloutValue:
    """Freeze a progressing rollout where it is (counts and weights stay)."""
    if r.state != PROGRESSING:
        raise RolloutConflict(
            f"rollout of {r.artifact} is {r.state}; only a progressing rollout can be paused"
        )
    return _log(_replace(r, state=PAUSED, updated=now), f"paused by the operator at step {r.step + 1}")


def resume(r: RolloutValue, now: float) -> RolloutValue:
    """Continue a paused rollout; the current step's analysis starts again."""
    if r.state != PAUSED:
        raise RolloutConflict(f"rollout of {r.artifact} is {r.state}; only a paused rollout can be resumed")
    return _log(_replace(r, state=PROGRESSING, updated=now, step_started=now), "resumed by the operator")


def abort(r: RolloutValue, now: float) -> RolloutValue:
    """Go back to the old version (ends ``aborted``)."""
    if r.state not in (PROGRESSING, PAUSED):
        raise RolloutConflict(
            f"rollout of {r.artifact} is {r.state}; only a progressing or paused rollout "
            "can be aborted (use undo to go back after it finished)"
        )
    step = _rollback(r, "by the operator", now, aborted=True)
    assert step.value is not None
    return step.value


# --- desired state -----------------------------------------------------------------------------


def overrides(rollouts: Iterable[RolloutValue]) -> dict[str, dict[str, int]]:
    """``{group:artifact: {coords: desired instances}}`` for the rollouts that are active: while
    one runs, its two versions' counts replace what the blueprints say about the artifact."""
    out: dict[str, dict[str, int]] = {}
    for r in rollouts:
        if r.state in ACTIVE_STATES:
            out[r.artifact] = {
                f"{r.artifact}:{r.old_version}": r.old_instances,
                f"{r.artifact}:{r.new_version}": r.new_instances,
            }
    return out
