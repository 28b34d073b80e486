"""The controller's values: what it observes each second, what it decides, and the memory a new
leader inherits. All msgspec Structs, so observations can be recorded and replayed in tests,
decisions are the API's JSON and the memory travels in `ControllerSync` (tag 70)."""

from __future__ import annotations

from typing import Literal, Union

import msgspec

from aether.kv.keys import ScalingRule
from aether.metrics.messages import ClusterMetricsSnapshot, InstanceStats, SliceLoad

__all__ = [
    "CONTROLLER_MESSAGE_TYPES",
    "AlertState",
    "ControllerMemory",
    "ControllerMessage",
    "ControllerSync",
    "Decision",
    "DecisionKind",
    "KeyObs",
    "NodeObs",
    "Observation",
    "SliceMemory",
    "SliceObs",
]


class NodeObs(msgspec.Struct, frozen=True):
    node_id: str
    up: bool
    loop_lag_ms: float | None = None
    """None: no metrics from the node."""
    cpu_percent: float | None = None


class SliceObs(msgspec.Struct, frozen=True):
    """One artifact the blueprints ask for."""

    artifact: str
    desired: int
    """The instance count the reconciler works toward now."""
    rule: ScalingRule | None = None
    """The blueprint's `[slices.NAME.scaling]`; None: a fixed count (health and recovery only)."""
    min: int = 1
    max: int = 1
    """Effective bounds: the blueprint's, or the operator's while set (`bounds_source`)."""
    bounds_source: Literal["blueprint", "operator"] = "blueprint"
    placement: dict[str, list[int]] = {}
    """Node -> instance ids placed there (any present state)."""
    active: int = 0
    """Instances ACTIVE now."""
    load: SliceLoad | None = None
    """The artifact's load in the last interval; None: no metrics for it."""
    instances: list[InstanceStats] = []


class KeyObs(msgspec.Struct, frozen=True):
    """A `slices/{node}/{artifact}` key in a transitional state (a command or a step in progress)."""

    node_id: str
    artifact: str
    state: str
    since: float
    """Wall-clock time the state was written."""
    instances: list[int] = []


class Observation(msgspec.Struct, frozen=True):
    """Everything one controller step looks at."""

    time: float
    """Wall-clock time of the step (seconds): windows and cooldowns survive a change of leader."""
    metrics_age: float | None
    """Seconds since the metrics below were refreshed; None: there are none."""
    nodes: list[NodeObs] = []
    slices: list[SliceObs] = []
    keys: list[KeyObs] = []
    snapshot: ClusterMetricsSnapshot | None = None
    """The cluster metrics snapshot, for alert rules."""


DecisionKind = Literal[
    "scale_up", "scale_down", "skip", "replace", "recover", "avoid_node", "allow_node", "restart",
    "re_place", "alert_firing", "alert_resolved",
]


class Decision(msgspec.Struct, frozen=True):
    """One decision with its inputs, the rule that fired and a sentence of reason."""

    seq: int
    time: float
    kind: DecisionKind
    rule: str
    """What fired: ``target:in_flight``, ``panic``, ``cooldown``, ``bounds``, ``health``, ..."""
    reason: str
    artifact: str | None = None
    node: str | None = None
    instance: int | None = None
    from_count: int | None = None
    to_count: int | None = None
    inputs: dict[str, float | int | str | None] = {}
    applied: bool = True
    """False in dry-run mode and for skips (nothing was changed)."""
    source: str = "controller"


class SliceMemory(msgspec.Struct):
    """What the controller remembers about one autoscaled artifact."""

    samples: list[tuple[float, float]] = []
    """(time, instances wanted by the targets) of recent steps: the averaging windows."""
    recommendations: list[tuple[float, int]] = []
    """(time, recommended count) of the stabilization window."""
    last_up: float = 0.0
    last_down: float = 0.0
    panic_until: float = 0.0
    last_replace: float = 0.0
    last_skip: str = ""
    """The rule of the last skip recorded, so a held decision is recorded once, not every second."""
    dry_count: int | None = None
    """In dry-run mode, the count the controller would have set (it continues from it)."""
    errors: dict[str, list[tuple[float, int, int]]] = {}
    """``node/instance`` -> recent (time, calls, failures) samples of its cumulative counters: the
    window its error rate is measured over."""


class AlertState(msgspec.Struct):
    state: Literal["pending", "firing"]
    since: float
    value: float
    labels: dict[str, str] = {}


class ControllerMemory(msgspec.Struct):
    """The controller's memory: what a new leader inherits."""

    seq: int = 0
    """The last decision's number."""
    slices: dict[str, SliceMemory] = {}
    lagging_since: dict[str, float] = {}
    """Node -> when its loop lag went above the limit."""
    avoided: list[str] = []
    """Nodes that get no new instances."""
    alerts: dict[str, AlertState] = {}
    """Series key (rule name and labels) -> its pending or firing state."""
    recovered: dict[str, float] = {}
    """``node/artifact`` -> the `since` of the stuck key the controller recovered (acted on once)."""


class ControllerSync(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=70):
    """Leader -> every node, once a second: the controller's memory and its latest decisions, so
    every node can answer `/api/v1/controller/...` and a new leader continues where this one was."""

    leader: str
    epoch: int
    """Increases per sync of one leader."""
    memory: ControllerMemory
    decisions: list[Decision]
    """The latest decisions (at most 50); receivers merge them by `seq`."""


ControllerMessage = Union[ControllerSync]  # noqa: UP007 - a runtime Union for msgspec
CONTROLLER_MESSAGE_TYPES: tuple[type[msgspec.Struct], ...] = (ControllerSync,)
