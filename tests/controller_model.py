"""A small fluid model of one autoscaled slice for driving the sans-IO controller in tests:
open-loop arrivals, instances that become ACTIVE `start_delay` seconds after they are wanted,
`max_concurrency` slots per instance, a bounded queue per instance, a fixed execution time.
One `tick()` is one second; it returns the `Observation` the controller would get."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from aether.controller.config import ControllerConfig
from aether.controller.core import Controller
from aether.controller.types import Decision, NodeObs, Observation, SliceObs
from aether.kv.keys import ScalingRule
from aether.metrics.messages import SliceLoad

ART = "org.example:work:1.0.0"


@dataclass
class SliceModel:
    rate: Callable[[float], float]
    """Arrivals per second at time t."""
    rule: ScalingRule = field(default_factory=lambda: ScalingRule(min=1, max=8, in_flight=6.0))
    exec_s: float = 0.05
    max_concurrency: int = 8
    max_queue: int = 80
    start_delay: float = 2.0
    desired: int = 1
    t: float = 1_000_000.0
    backlog: float = 0.0
    starting: list[float] = field(default_factory=list)  # when each wanted-but-not-active instance is ready
    active: int = 1
    rejected_total: float = 0.0
    served_total: float = 0.0
    history: list[tuple[float, int, int, float, float]] = field(default_factory=list)
    """(time, desired, active, rate, queued) per tick."""

    def apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if d.applied and d.kind in ("scale_up", "scale_down") and d.artifact == ART:
                assert d.to_count is not None
                self.desired = d.to_count

    def tick(self, metrics_age: float | None = 1.0) -> Observation:
        self.t += 1.0
        # instances converge on desired
        have = self.active + len(self.starting)
        if self.desired > have:
            self.starting += [self.t + self.start_delay] * (self.desired - have)
        elif self.desired < have:
            drop = have - self.desired
            while drop and self.starting:
                self.starting.pop()
                drop -= 1
            self.active -= drop
        ready = [s for s in self.starting if s <= self.t]
        self.starting = [s for s in self.starting if s > self.t]
        self.active += len(ready)
        lam = max(0.0, self.rate(self.t))
        capacity = self.active * self.max_concurrency / self.exec_s
        queue_cap = self.active * self.max_queue
        work = self.backlog + lam
        served = min(work, capacity)
        left = work - served
        rejected = max(0.0, left - queue_cap)
        self.backlog = left - rejected
        self.rejected_total += rejected
        self.served_total += served
        admitted = lam - rejected
        in_flight = min(self.active * self.max_concurrency, served * self.exec_s)
        wait = self.backlog / capacity if capacity else 0.0
        load = SliceLoad(
            artifact=ART, instances=self.active, in_flight=round(in_flight), queued=round(self.backlog),
            arrivals_per_s=admitted, calls_per_s=served, failures_per_s=0.0, rejected_per_s=rejected,
            exec_ms=self.exec_s * 1000 if served else None,
            p95_ms=(self.exec_s + wait) * 1000 if served else None,
            cpu_percent=min(100.0, served / max(1, self.active) * 0.1),
        )  # fmt: skip
        self.history.append((self.t, self.desired, self.active, lam, self.backlog))
        placement = {"node-1": list(range(self.active))}
        s = SliceObs(ART, self.desired, self.rule, self.rule.min, self.rule.max, "blueprint", placement,
                     self.active, load if self.active else None)  # fmt: skip
        return Observation(self.t, metrics_age, [NodeObs("node-1", True, 5.0, 20.0)], [s])


def run(model: SliceModel, seconds: int, config: ControllerConfig | None = None,
        controller: Controller | None = None) -> tuple[Controller, list[Decision]]:  # fmt: skip
    c = controller or Controller(config or ControllerConfig())
    out: list[Decision] = []
    for _ in range(seconds):
        ds = c.step(model.tick())
        model.apply(ds)
        out += ds
    return c, out


def scalings(decisions: list[Decision]) -> list[Decision]:
    return [d for d in decisions if d.kind in ("scale_up", "scale_down") and d.applied]


def direction_changes(decisions: list[Decision]) -> int:
    """How many times the scaling direction changed (the first scaling counts as one)."""
    n, last = 0, None
    for d in scalings(decisions):
        if d.kind != last:
            n += 1
            last = d.kind
    return n


def step_rate(t0: float, low: float, high: float, up_at: float, down_at: float) -> Callable[[float], float]:
    return lambda t: high if t0 + up_at <= t < t0 + down_at else low


def ceil_div(a: float, b: float) -> int:
    return math.ceil(a / b)
