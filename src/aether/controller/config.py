"""`ControllerConfig`: the cluster-wide controller configuration and its TOML form.

Stored as text under `controller/config` (`aether.kv.keys.ControllerConfigValue`), set with
`aether controller config --set FILE` or `PUT /api/v1/controller/config`, parsed here once per
change. Every field has a default, so an empty text is a valid configuration. Durations are
seconds. Unknown keys, wrong types and out-of-range values are refused with a message naming the
key (`BadRequest`), and so is any inf, -inf or nan (`aether.core.numbers`: a window, cooldown or
timeout of inf never ends, an alert threshold of nan is never crossed).

```toml
dry_run = false                   # record decisions without applying them

[scaling]
tolerance = 0.1                   # no change while every target is within 10 % of its goal
panic_threshold = 2.0             # wanted/current at or above this: scale up at once (surge)
panic_window = 6.0                # averaging window of the panic path, and how long panic holds
stable_window = 20.0              # averaging window of ordinary decisions
scale_down_stabilization = 30.0   # scale down only to the highest count wanted in this window
scale_up_cooldown = 5.0           # after a scale-up, no further ordinary scale-up for this long
scale_down_cooldown = 15.0        # after any scaling, no scale-down for this long
max_step_up = 4                   # instances added per decision (or 100 %, whichever is more)
max_step_down = 4                 # instances removed per decision
metrics_max_age = 5.0             # metrics older than this count as missing: no scaling

[health]
failures = 3                      # consecutive failed health() checks before a replacement
error_rate_factor = 5.0           # an instance failing this many times its peers' rate ...
error_rate_min = 0.25             # ... and at least this share of its calls ...
error_min_calls = 20              # ... over at least this many calls is replaced
replace_cooldown = 30.0           # per artifact, between two replacements
transition_timeout = 120.0        # a key stuck in a transitional state longer is recovered
loop_lag_ms = 250.0               # a node whose event loop lags more ...
loop_lag_for = 5.0                # ... for this long gets no new instances

[[alerts]]
name = "orders-slow"
metric = "entry.p99_ms"           # see docs/controller.md for the metric names
match = { artifact = "org.demo:place-order:0.1.0" }
op = ">"
threshold = 250.0
for = 30.0
severity = "warning"
summary = "placing orders is slow"

[[webhooks]]
url = "http://127.0.0.1:9000/hook"
events = ["alert"]                # "alert" and/or "decision"
timeout = 2.0
retries = 3
```
"""

from __future__ import annotations

import re
import tomllib
from typing import Annotated, Literal

import msgspec

from aether.core.errors import BadRequest
from aether.core.numbers import format_path, number_problem

__all__ = [
    "ALERT_METRICS",
    "AlertRule",
    "ControllerConfig",
    "HealthConfig",
    "ScalingConfig",
    "Webhook",
    "parse_config",
]

_Pos = Annotated[float, msgspec.Meta(gt=0)]
_NonNeg = Annotated[float, msgspec.Meta(ge=0)]

ALERT_METRICS: dict[str, tuple[str, ...]] = {
    # metric name -> the labels its series carry
    "cluster.calls_per_s": (),
    "cluster.failures_per_s": (),
    "cluster.nodes": (),
    "cluster.cpu_percent": (),
    "node.cpu_percent": ("node",),
    "node.rss_bytes": ("node",),
    "node.loop_lag_ms": ("node",),
    "node.calls_per_s": ("node",),
    "entry.calls_per_s": ("artifact", "entry"),
    "entry.failures_per_s": ("artifact", "entry"),
    "entry.error_ratio": ("artifact", "entry"),
    "entry.mean_ms": ("artifact", "entry"),
    "entry.p50_ms": ("artifact", "entry"),
    "entry.p95_ms": ("artifact", "entry"),
    "entry.p99_ms": ("artifact", "entry"),
    "slice.instances": ("artifact",),
    "slice.in_flight": ("artifact",),
    "slice.queued": ("artifact",),
    "slice.arrivals_per_s": ("artifact",),
    "slice.rejected_per_s": ("artifact",),
    "slice.failures_per_s": ("artifact",),
    "slice.p95_ms": ("artifact",),
    "instance.in_flight": ("node", "artifact", "instance"),
    "instance.queued": ("node", "artifact", "instance"),
    "instance.failures_per_s": ("node", "artifact", "instance"),
}
"""The metrics alert rules may name, with the labels of their series."""


class ScalingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tolerance: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    panic_threshold: Annotated[float, msgspec.Meta(gt=1)] = 2.0
    panic_window: _Pos = 6.0
    stable_window: _Pos = 20.0
    scale_down_stabilization: _NonNeg = 30.0
    scale_up_cooldown: _NonNeg = 5.0
    scale_down_cooldown: _NonNeg = 15.0
    max_step_up: Annotated[int, msgspec.Meta(ge=1)] = 4
    max_step_down: Annotated[int, msgspec.Meta(ge=1)] = 4
    metrics_max_age: _Pos = 5.0


class HealthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    error_rate_factor: Annotated[float, msgspec.Meta(ge=1)] = 5.0
    error_rate_min: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25
    error_min_calls: Annotated[int, msgspec.Meta(ge=1)] = 20
    replace_cooldown: _NonNeg = 30.0
    transition_timeout: _Pos = 120.0
    loop_lag_ms: _Pos = 250.0
    loop_lag_for: _NonNeg = 5.0


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AlertRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    metric: str
    threshold: float
    op: Literal[">", ">=", "<", "<="] = ">"
    for_: _NonNeg = msgspec.field(name="for", default=0.0)
    match: dict[str, str] = {}
    severity: Literal["info", "warning", "critical"] = "warning"
    summary: str = ""


class Webhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    events: list[Literal["alert", "decision"]] = msgspec.field(default_factory=lambda: ["alert"])
    timeout: _Pos = 2.0
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3


class ControllerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dry_run: bool = False
    scaling: ScalingConfig = ScalingConfig()
    health: HealthConfig = HealthConfig()
    alerts: list[AlertRule] = []
    webhooks: list[Webhook] = []


def _check(cfg: ControllerConfig) -> None:
    names: set[str] = set()
    for i, a in enumerate(cfg.alerts):
        where = f"alerts[{i}]"
        if not _NAME.fullmatch(a.name):
            raise BadRequest(f"{where}.name {a.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if a.name in names:
            raise BadRequest(f"{where}.name {a.name!r} is used twice: alert names must be unique")
        names.add(a.name)
        labels = ALERT_METRICS.get(a.metric)
        if labels is None:
            known = ", ".join(sorted(ALERT_METRICS))
            raise BadRequest(f"{where}.metric {a.metric!r} is unknown; known: {known}")
        for label in a.match:
            if label not in labels:
                allowed = ", ".join(labels) or "none"
                raise BadRequest(f"{where}.match: {a.metric} has no label {label!r} (labels: {allowed})")
    for i, w in enumerate(cfg.webhooks):
        if not w.url.startswith(("http://", "https://")):
            raise BadRequest(f"webhooks[{i}].url {w.url!r}: must start with http:// or https://")
        if not w.events:
            raise BadRequest(f"webhooks[{i}].events is empty: list 'alert' and/or 'decision'")


def parse_config(text: str) -> ControllerConfig:
    """Parse and check a controller configuration; `BadRequest` naming the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadRequest(f"controller config is not valid TOML: {e}") from None
    found = number_problem(data)
    if found is not None:  # inf passes `gt=0` and nan any unconstrained float: refuse them all here
        path, value, problem = found
        raise BadRequest(f"controller config: {format_path(path)} = {value} {problem}")
    try:
        cfg = msgspec.convert(data, ControllerConfig)
    except msgspec.ValidationError as e:
        raise BadRequest(f"controller config: {e}") from None
    _check(cfg)
    return cfg
