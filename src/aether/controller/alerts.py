"""Alert rules as a sans-IO state machine (like Prometheus alerting rules): each rule's metric is
read from the observation as series (one per label set), a series whose value meets the
condition is *pending*, and *firing* once it has met it for the rule's `for` seconds; a firing
series that stops meeting it (or disappears: no data) is *resolved*. Transitions come back as
`AlertEvent`s; the states live in `ControllerMemory.alerts`, so a new leader continues them.

Label matching: every `match` label must equal the series' label; for ``artifact``, a value
without a version (``group:artifact``) matches every version.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from aether.controller.config import AlertRule
from aether.controller.types import AlertState, Observation

__all__ = ["AlertEvent", "evaluate", "series", "series_key"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}  # fmt: skip

Labels = dict[str, str]


@dataclass(frozen=True, slots=True)
class AlertEvent:
    kind: Literal["firing", "resolved"]
    rule: AlertRule
    labels: Labels
    value: float | None
    """The value that fired (or the last one, for resolved); None when the series disappeared."""
    since: float
    """When the condition started to hold."""


def series(obs: Observation, metric: str) -> Iterator[tuple[Labels, float]]:
    """The series of `metric` in `obs`: (labels, value), skipping values that are unknown."""
    family, _, field = metric.partition(".")
    snap = obs.snapshot
    if family == "cluster" and snap is not None:
        v = getattr(snap.totals, field, None)
        if isinstance(v, int | float):
            yield {}, float(v)
    elif family == "node" and snap is not None:
        for n in snap.nodes:
            v = getattr(n, field, None)
            if isinstance(v, int | float):
                yield {"node": n.node_id}, float(v)
    elif family == "entry" and snap is not None:
        for e in snap.entries:
            labels = {"artifact": e.artifact, "entry": e.entry}
            if field == "error_ratio":
                yield labels, (e.failures_per_s / e.calls_per_s) if e.calls_per_s > 0 else 0.0
                continue
            v = getattr(e, field, None)
            if isinstance(v, int | float):
                yield labels, float(v)
    elif family == "slice":
        for s in obs.slices:
            if field == "instances":
                yield {"artifact": s.artifact}, float(s.active)
                continue
            v = getattr(s.load, field, None) if s.load is not None else None
            if isinstance(v, int | float):
                yield {"artifact": s.artifact}, float(v)
    elif family == "instance":
        for s in obs.slices:
            for i in s.instances:
                v = getattr(i, field, None)
                if isinstance(v, int | float):
                    yield {"node": i.node_id, "artifact": i.artifact, "instance": str(i.instance)}, float(v)


def _matches(match: Labels, labels: Labels) -> bool:
    for k, want in match.items():
        have = labels.get(k)
        if have is None:
            return False
        if have != want and not (k == "artifact" and want.count(":") == 1 and have.startswith(want + ":")):
            return False
    return True


def series_key(rule: str, labels: Labels) -> str:
    """The memory key of one series of a rule: ``name{a=x,b=y}``."""
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{rule}{{{inner}}}"


def evaluate(rules: list[AlertRule], states: dict[str, AlertState], obs: Observation) -> list[AlertEvent]:
    """Advance every rule's series to `obs.time`, updating `states` in place; the transitions."""
    now = obs.time
    out: list[AlertEvent] = []
    seen: set[str] = set()
    by_name = {r.name: r for r in rules}
    for rule in rules:
        cond = _OPS[rule.op]
        for labels, value in series(obs, rule.metric):
            if not _matches(rule.match, labels):
                continue
            key = series_key(rule.name, labels)
            seen.add(key)
            st = states.get(key)
            if not cond(value, rule.threshold):
                if st is not None:
                    del states[key]
                    if st.state == "firing":
                        out.append(AlertEvent("resolved", rule, labels, value, st.since))
                continue
            if st is None:
                st = states[key] = AlertState("pending", now, value, labels)
            st.value = value
            if st.state == "pending" and now - st.since >= rule.for_:
                st.state = "firing"
                out.append(AlertEvent("firing", rule, labels, value, st.since))
    for key in [k for k in states if k not in seen]:
        st = states.pop(key)
        gone_rule = by_name.get(key.partition("{")[0])
        if st.state == "firing" and gone_rule is not None:  # the series has no data any more
            out.append(AlertEvent("resolved", gone_rule, st.labels, None, st.since))
    return out
