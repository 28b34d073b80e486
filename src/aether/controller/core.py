"""`Controller`: the layer-1 decisions as a sans-IO state machine (docs/controller.md).

`step(obs)` is a pure function of the observation (metrics, desired and actual state, wall-clock
time), the configuration and the controller's memory; it returns `Decision`s and updates the
memory. No clock, no I/O: the adapter (`aether.controller.service`) runs it once a second on the
leader and applies what it decides. The memory is a plain Struct (`ControllerMemory`) that the
leader syncs to every node, so a new leader continues with the windows and cooldowns it inherits.

Autoscaling, per artifact with a `[slices.NAME.scaling]` rule:

1. **Wanted instances per target** (the largest wins, as in Kubernetes' HPA):
   ``in_flight`` — the concurrency the load needs by Little's law (arrivals per second x mean
   execution time, queue wait excluded; the calls running and queued when no call finished in
   the interval) divided by the target;
   ``rate`` — arrivals per second divided by the target; ``p95_ms`` and ``cpu`` — the instances
   ACTIVE now times observed/target.
2. **Panic path** (as Knative's panic window): when the latest wanted count is at least
   `panic_threshold` times the current count and the surge is real (the previous sample said so
   too, or calls are queueing or being refused), scale up at once to the wanted count — no
   cooldown — and hold every scale-down for `panic_window` seconds after the last such sample.
3. **Ordinary path**: the mean wanted over `stable_window`; within the `tolerance` band of the
   current count nothing changes. Up (when the latest second wants more too): bounded by
   `max_step_up` (or 100 %, whichever is more)
   and `scale_up_cooldown`. Down: to the highest count recommended during
   `scale_down_stabilization` seconds, at most `max_step_down` at a time, and not before
   `scale_down_cooldown` after the last scaling.
4. Always within [min, max] (an operator's bounds win over the blueprint's). Held decisions
   (cooldown, bounds, missing metrics) are recorded as ``skip`` once per reason, not every second.

Health and recovery, for every artifact: an instance whose `health()` failed `failures` times in
a row, or whose error ratio over the last 30 s is at least `error_rate_min` and `error_rate_factor`
times its peers' median, is replaced (one per artifact per `replace_cooldown`); a slice key stuck
in a transitional state for `transition_timeout` is recovered (removed, so its instances are
placed again); a node whose event loop lags more than `loop_lag_ms` for `loop_lag_for` seconds
gets no new instances until it recovers. FAILED instances restarting with backoff and instances
of lost nodes being re-placed are the reconciler's (`aether.deploy.reconcile`); the adapter
records them here with `record`, so they appear among the decisions.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from aether.controller.alerts import evaluate
from aether.controller.config import ControllerConfig
from aether.controller.types import (
    ControllerMemory,
    Decision,
    DecisionKind,
    KeyObs,
    NodeObs,
    Observation,
    SliceMemory,
    SliceObs,
)

__all__ = ["ERROR_WINDOW", "TRANSITIONAL_STATES", "Controller", "wanted_by_target"]

ERROR_WINDOW = 30.0
"""Seconds of per-instance counters an error ratio is measured over."""
ERROR_SAMPLE = 5.0
"""Seconds between two samples of an instance's counters kept for its error ratio."""
TRANSITIONAL_STATES = frozenset({
    "LOAD", "LOADING", "ACTIVATE", "ACTIVATING", "DEACTIVATE", "DEACTIVATING", "UNLOAD", "UNLOADING",
})  # fmt: skip

Inputs = dict[str, float | int | str | None]


def _r(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


def wanted_by_target(s: SliceObs) -> dict[str, float]:
    """Instances each of the slice's targets wants now (empty without a rule or load)."""
    rule, load = s.rule, s.load
    if rule is None or load is None:
        return {}
    out: dict[str, float] = {}
    ready = max(1, s.active)
    arrivals = load.arrivals_per_s + load.rejected_per_s
    if rule.in_flight is not None:
        if load.exec_ms is not None:
            # demand, not occupancy: while new instances drain a backlog every slot is busy, and
            # counting those calls would ask for more instances than the load needs
            concurrency = arrivals * (load.exec_ms / 1000.0)
        else:  # no call finished in the interval (long calls): what runs and waits now
            concurrency = float(load.in_flight + load.queued)
        out["in_flight"] = concurrency / rule.in_flight
    if rule.rate is not None:
        out["rate"] = arrivals / rule.rate
    if rule.p95_ms is not None and load.p95_ms is not None:
        out["p95_ms"] = ready * load.p95_ms / rule.p95_ms
    if rule.cpu is not None and load.cpu_percent is not None:
        out["cpu"] = ready * load.cpu_percent / rule.cpu
    return out


class Controller:
    """The layer-1 controller of one leader (see the module docstring)."""

    def __init__(self, config: ControllerConfig, memory: ControllerMemory | None = None) -> None:
        self.config = config
        self.memory = memory if memory is not None else ControllerMemory()
        self._out: list[Decision] = []

    def set_config(self, config: ControllerConfig) -> None:
        self.config = config

    @property
    def avoided(self) -> frozenset[str]:
        """Nodes that get no new instances (their event loop is saturated)."""
        return frozenset(self.memory.avoided)

    # --- decisions ------------------------------------------------------------------------------

    def record(self, time: float, kind: DecisionKind, rule: str, reason: str, **fields: Any) -> Decision:
        """A numbered decision (also for what was decided elsewhere: the reconciler's restarts and
        re-placements, which the adapter records here so they show among the decisions)."""
        self.memory.seq += 1
        applied = fields.pop("applied", kind != "skip")
        d = Decision(self.memory.seq, time, kind, rule, reason, applied=applied, **fields)
        self._out.append(d)
        return d

    def _act(self, time: float, kind: DecisionKind, rule: str, reason: str, **fields: Any) -> Decision:
        """A decision the adapter should carry out (unless in dry-run mode)."""
        dry = self.config.dry_run
        if dry and kind in ("scale_up", "scale_down"):
            self.memory.slices[fields["artifact"]].dry_count = fields["to_count"]
        return self.record(time, kind, rule, reason + (" (dry run: not applied)" if dry else ""),
                           applied=not dry, **fields)  # fmt: skip

    def step(self, obs: Observation) -> list[Decision]:
        """One second of the controller: every decision it makes for `obs`."""
        self._out = []
        live = {s.artifact for s in obs.slices}
        for a in [a for a in self.memory.slices if a not in live]:
            del self.memory.slices[a]
        for s in obs.slices:
            if s.rule is not None:
                self._scale(obs, s)
            self._health(obs, s)
        self._stuck(obs)
        self._nodes(obs)
        self._alerts(obs)
        out, self._out = self._out, []
        return out

    # --- autoscaling ----------------------------------------------------------------------------

    def _skip(self, obs: Observation, s: SliceObs, mem: SliceMemory, rule: str, reason: str,
              inputs: Inputs) -> None:  # fmt: skip
        if mem.last_skip != rule:
            mem.last_skip = rule
            self.record(obs.time, "skip", rule, reason, artifact=s.artifact, from_count=s.desired,
                        to_count=s.desired, inputs=inputs)  # fmt: skip

    def _scale(self, obs: Observation, s: SliceObs) -> None:
        cfg = self.config.scaling
        now = obs.time
        mem = self.memory.slices.setdefault(s.artifact, SliceMemory())
        if not self.config.dry_run:
            mem.dry_count = None
        # in dry-run mode the controller continues from the counts it would have set
        current = mem.dry_count if mem.dry_count is not None else s.desired
        inputs: Inputs = {"current": current, "active": s.active, "min": s.min, "max": s.max}
        # bounds first: an operator's new bounds are obeyed at once
        if current < s.min or current > s.max:
            to = min(s.max, max(s.min, current))
            kind: DecisionKind = "scale_up" if to > current else "scale_down"
            mem.last_skip = ""
            if kind == "scale_up":
                mem.last_up = now
            else:
                mem.last_down = now
            self._act(now, kind, "bounds", f"{current} instances are outside the bounds "
                      f"[{s.min}, {s.max}] ({s.bounds_source}): {to}", artifact=s.artifact,
                      from_count=current, to_count=to, inputs=inputs)  # fmt: skip
            return
        stale = obs.metrics_age is None or obs.metrics_age > cfg.metrics_max_age
        if stale or s.load is None:
            why = ("no metrics yet" if obs.metrics_age is None else
                   f"the metrics are {obs.metrics_age:.1f} s old" if stale else
                   "no instance reported metrics")  # fmt: skip
            inputs["metrics_age"] = _r(obs.metrics_age)
            self._skip(obs, s, mem, "missing_metrics", f"holding {current} instances: {why}", inputs)
            return
        load = s.load
        by_target = wanted_by_target(s)
        if not by_target:
            self._skip(obs, s, mem, "missing_metrics",
                       f"holding {current} instances: none of its targets has data yet", inputs)  # fmt: skip
            return
        target, wanted = max(by_target.items(), key=lambda kv: kv[1])
        inputs.update({
            "arrivals_per_s": _r(load.arrivals_per_s), "rejected_per_s": _r(load.rejected_per_s),
            "in_flight": load.in_flight, "queued": load.queued, "exec_ms": _r(load.exec_ms),
            "p95_ms": _r(load.p95_ms), "cpu_percent": _r(load.cpu_percent),
        })  # fmt: skip
        for name, v in by_target.items():
            inputs[f"wanted:{name}"] = _r(v, 2)
        assert s.rule is not None
        for name, goal in s.rule.targets().items():
            inputs[f"target:{name}"] = goal
        # windows
        horizon = max(cfg.stable_window, cfg.panic_window)
        prev = mem.samples[-1][1] if mem.samples else None
        mem.samples = [(t, w) for t, w in mem.samples if now - t < horizon] + [(now, wanted)]
        stable = [w for t, w in mem.samples if now - t < cfg.stable_window]
        stable_mean = sum(stable) / len(stable)
        inputs["wanted"] = _r(wanted, 2)
        inputs["wanted_mean"] = _r(stable_mean, 2)
        cap = min(s.max, max(s.min, current + max(cfg.max_step_up, current)))

        # panic: a real surge, at least panic_threshold times the current count; while it lasts
        # (panic_window after its last such second) the count follows the load up at once and
        # never down, as in Knative's panic mode
        surge = wanted >= cfg.panic_threshold * current
        confirmed = (prev is not None and prev >= cfg.panic_threshold * current) or load.queued > 0 \
            or load.rejected_per_s > 0
        if surge and confirmed:
            mem.panic_until = now + cfg.panic_window
        if now < mem.panic_until:
            to = min(cap, max(s.min, math.ceil(wanted * (1 - 1e-9))))
            self._remember(mem, now, max(to, current))
            if to > current and wanted > current * (1 + cfg.tolerance):
                mem.last_up = now
                mem.last_skip = ""
                what = "surge" if surge else "during a surge"
                self._act(now, "scale_up", "panic", f"{what}: {target} wants {wanted:.1f} instances, "
                          f"{wanted / current:.1f}x the {current} running: {to} at once",
                          artifact=s.artifact, from_count=current, to_count=to, inputs=inputs)  # fmt: skip
            elif current >= s.max and wanted > s.max:
                self._skip(obs, s, mem, "bounds", f"surge: {target} wants {wanted:.1f} instances; "
                           f"held at the maximum {s.max}", inputs)  # fmt: skip
            elif stable_mean < current * (1 - cfg.tolerance):
                self._skip(obs, s, mem, "panic", f"holding {current} instances: a surge was seen "
                           f"{now - (mem.panic_until - cfg.panic_window):.0f} s ago", inputs)  # fmt: skip
            return

        # what this second alone asks for; scale-down goes to the highest of the window
        self._remember(mem, now, min(s.max, max(s.min, math.ceil(wanted * (1 - 1e-9)))))
        ratio = stable_mean / current if current else float("inf")
        if abs(ratio - 1) <= cfg.tolerance:
            mem.last_skip = ""
            return
        if ratio > 1:
            if wanted <= current * (1 + cfg.tolerance):
                return  # the mean still remembers more load than this second has: hold
            want = math.ceil(stable_mean)
            to = min(cap, max(s.min, want))
            if to <= current:
                if want > s.max:
                    self._skip(obs, s, mem, "bounds", f"{target} wants {stable_mean:.1f} instances; "
                               f"held at the maximum {s.max}", inputs)  # fmt: skip
                return
            wait = mem.last_up + cfg.scale_up_cooldown - now
            if wait > 0:
                self._skip(obs, s, mem, "cooldown", f"{target} wants {stable_mean:.1f} instances; scale-up "
                           f"cooldown for {wait:.0f} s more", inputs)  # fmt: skip
                return
            mem.last_up = now
            mem.last_skip = ""
            self._act(now, "scale_up", f"target:{target}", f"{target} wants {stable_mean:.1f} instances "
                      f"(mean of {cfg.stable_window:g} s) for {current} running: {to}",
                      artifact=s.artifact, from_count=current, to_count=to, inputs=inputs)  # fmt: skip
            return
        # scale down: to the highest recommendation of the stabilization window, once the latest
        # second asks for it too (a transitional second, such as the one a drop happened in, does
        # not leave an intermediate step behind)
        highest = max(r for _, r in mem.recommendations)
        to = max(s.min, highest, current - cfg.max_step_down)
        inputs["stabilized"] = highest
        if to >= current or highest > mem.recommendations[-1][1]:
            return  # a recommendation of the window still wants more: stabilization holds
        wait = max(mem.last_up, mem.last_down) + cfg.scale_down_cooldown - now
        if wait > 0:
            self._skip(obs, s, mem, "cooldown", f"would scale down to {to}; scale-down cooldown for "
                       f"{wait:.0f} s more", inputs)  # fmt: skip
            return
        mem.last_down = now
        mem.last_skip = ""
        self._act(now, "scale_down", f"target:{target}", f"{target} wants {stable_mean:.1f} instances "
                  f"for {current} running, and no more than {highest} for "
                  f"{cfg.scale_down_stabilization:g} s: {to}",
                  artifact=s.artifact, from_count=current, to_count=to, inputs=inputs)  # fmt: skip

    def _remember(self, mem: SliceMemory, now: float, rec: int) -> None:
        window = self.config.scaling.scale_down_stabilization
        mem.recommendations = [(t, r) for t, r in mem.recommendations if now - t < window] + [(now, rec)]

    # --- health and recovery --------------------------------------------------------------------

    def _health(self, obs: Observation, s: SliceObs) -> None:
        cfg = self.config.health
        now = obs.time
        if not s.instances:
            return
        mem = self.memory.slices.setdefault(s.artifact, SliceMemory())
        ratios: dict[str, tuple[float, int]] = {}
        for i in s.instances:
            key = f"{i.node_id}/{i.instance}"
            window = [x for x in mem.errors.get(key, []) if now - x[0] <= ERROR_WINDOW]
            if window and (i.calls < window[-1][1] or i.failures < window[-1][2]):
                window = []  # a new instance under the same id: counters restarted
            if not window or now - window[-1][0] >= ERROR_SAMPLE:  # a few samples: the memory is synced
                window.append((now, i.calls, i.failures))
            mem.errors[key] = window
            calls = i.calls - window[0][1]
            fails = i.failures - window[0][2]
            if calls > 0:
                ratios[key] = (fails / calls, calls)
        live = {f"{i.node_id}/{i.instance}" for i in s.instances}
        for key in [k for k in mem.errors if k not in live]:
            del mem.errors[key]
        if now - mem.last_replace < cfg.replace_cooldown and mem.last_replace:
            return
        for i in s.instances:
            if i.node_id not in s.placement or i.instance not in s.placement[i.node_id]:
                continue  # not (or no longer) placed there: nothing to replace
            key = f"{i.node_id}/{i.instance}"
            inputs: Inputs = {"healthy": str(i.healthy), "health_failures": i.health_failures}
            if i.healthy is False and i.health_failures >= cfg.failures:
                mem.last_replace = now
                self._act(now, "replace", "health", f"instance {i.instance} on {i.node_id} failed "
                          f"{i.health_failures} health checks in a row ({i.health_reason or 'no reason'}): "
                          "replacing it", artifact=s.artifact, node=i.node_id, instance=i.instance,
                          inputs=inputs)  # fmt: skip
                return
            mine = ratios.get(key)
            if mine is None or mine[1] < cfg.error_min_calls:
                continue
            peers = [r for k, (r, n) in ratios.items() if k != key and n >= cfg.error_min_calls]
            if not peers:
                continue  # "far above its peers" needs peers to compare with
            median = statistics.median(peers)
            if mine[0] >= cfg.error_rate_min and mine[0] >= cfg.error_rate_factor * median:
                mem.last_replace = now
                inputs.update({"error_ratio": _r(mine[0]), "calls": mine[1], "peers_median": _r(median)})
                self._act(now, "replace", "error_rate", f"instance {i.instance} on {i.node_id} failed "
                          f"{mine[0]:.0%} of {mine[1]} calls in {ERROR_WINDOW:g} s, its peers "
                          f"{median:.0%}: replacing it", artifact=s.artifact, node=i.node_id,
                          instance=i.instance, inputs=inputs)  # fmt: skip
                return

    def _stuck(self, obs: Observation) -> None:
        limit = self.config.health.transition_timeout
        now = obs.time
        present: set[str] = set()
        for k in obs.keys:
            name = f"{k.node_id}/{k.artifact}"
            present.add(name)
            if k.state not in TRANSITIONAL_STATES or now - k.since < limit:
                continue
            if self.memory.recovered.get(name) == k.since:
                continue
            self.memory.recovered[name] = k.since
            self._recover(obs, k, now - k.since)
        for name in [n for n in self.memory.recovered if n not in present]:
            del self.memory.recovered[name]

    def _recover(self, obs: Observation, k: KeyObs, age: float) -> None:
        self._act(obs.time, "recover", "stuck", f"{k.artifact} on {k.node_id} has been {k.state} for "
                  f"{age:.0f} s (limit {self.config.health.transition_timeout:g} s): removing the key so "
                  "its instances are placed again", artifact=k.artifact, node=k.node_id,
                  inputs={"state": k.state, "since": k.since, "instances": len(k.instances)})  # fmt: skip

    def _nodes(self, obs: Observation) -> None:
        cfg = self.config.health
        now = obs.time
        mem = self.memory
        seen: dict[str, NodeObs] = {n.node_id: n for n in obs.nodes}
        for node_id, n in sorted(seen.items()):
            lag = n.loop_lag_ms
            inputs: Inputs = {"loop_lag_ms": _r(lag), "limit_ms": cfg.loop_lag_ms}
            if n.up and lag is not None and lag > cfg.loop_lag_ms:
                since = mem.lagging_since.setdefault(node_id, now)
                if node_id not in mem.avoided and now - since >= cfg.loop_lag_for:
                    mem.avoided.append(node_id)
                    mem.avoided.sort()
                    self._act(now, "avoid_node", "loop_lag", f"{node_id}'s event loop lags {lag:.0f} ms "
                              f"(limit {cfg.loop_lag_ms:g} ms) for {now - since:.0f} s: it gets no new "
                              "instances until it recovers", node=node_id, inputs=inputs)  # fmt: skip
                continue
            mem.lagging_since.pop(node_id, None)
            if node_id in mem.avoided and n.up and lag is not None:
                mem.avoided.remove(node_id)
                self._act(now, "allow_node", "loop_lag", f"{node_id}'s event loop lags {lag:.0f} ms again "
                          f"(limit {cfg.loop_lag_ms:g} ms): it may get new instances", node=node_id,
                          inputs=inputs)  # fmt: skip
        for node_id in [n for n in mem.avoided if n not in seen]:
            mem.avoided.remove(node_id)  # removed from the cluster
            mem.lagging_since.pop(node_id, None)

    # --- alerts ---------------------------------------------------------------------------------

    def _alerts(self, obs: Observation) -> None:
        for ev in evaluate(self.config.alerts, self.memory.alerts, obs):
            r = ev.rule
            labels = ",".join(f"{k}={v}" for k, v in sorted(ev.labels.items()))
            where = f"{r.metric}{{{labels}}}"
            inputs: Inputs = {"value": _r(ev.value), "threshold": r.threshold, "for": r.for_,
                              "severity": r.severity, **ev.labels}  # fmt: skip
            if ev.kind == "firing":
                reason = (f"{where} = {ev.value:g} {r.op} {r.threshold:g} for {obs.time - ev.since:.0f} s"
                          + (f": {r.summary}" if r.summary else ""))  # fmt: skip
                kind: DecisionKind = "alert_firing"
            else:
                now_v = "no data" if ev.value is None else f"{ev.value:g}"
                reason = f"{where} is {now_v} now (fired on {r.op} {r.threshold:g})"
                kind = "alert_resolved"
            inst = ev.labels.get("instance")
            self.record(obs.time, kind, r.name, reason, artifact=ev.labels.get("artifact"),
                        node=ev.labels.get("node"), instance=int(inst) if inst else None,
                        inputs=inputs, applied=True)  # fmt: skip
