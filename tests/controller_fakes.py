"""Test doubles for the controller's adapter: a scripted core, an in-memory store, a transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aether.controller.config import ControllerConfig
from aether.controller.types import ControllerMemory, Decision, Observation
from aether.kv.machine import WatchEvent


class ScriptedCore:
    """A stand-in for `aether.controller.core.Controller`: `step` returns what `plan(obs)` says,
    numbered in the memory like the real core."""

    def __init__(self, config: ControllerConfig, memory: ControllerMemory | None = None) -> None:
        self.config = config
        self.memory = memory if memory is not None else ControllerMemory()
        self.observations: list[Observation] = []
        self.plan: Callable[[Observation], list[dict[str, Any]]] = lambda obs: []
        self._avoid: frozenset[str] = frozenset()

    def set_config(self, config: ControllerConfig) -> None:
        self.config = config

    @property
    def avoided(self) -> frozenset[str]:
        return frozenset(self.memory.avoided)

    def record(self, time: float, kind: Any, rule: str, reason: str, **fields: Any) -> Decision:
        self.memory.seq += 1
        applied = fields.pop("applied", kind != "skip")
        return Decision(self.memory.seq, time, kind, rule, reason, applied=applied, **fields)

    def step(self, obs: Observation) -> list[Decision]:
        self.observations.append(obs)
        out = []
        for d in self.plan(obs):
            d = dict(d)
            kind, rule, reason = d.pop("kind"), d.pop("rule", "test"), d.pop("reason", "scripted")
            if self.config.dry_run:
                d["applied"] = False
            out.append(self.record(obs.time, kind, rule, reason, **d))
        return out


class FakeKV:
    """A dict with the `StoreView` face: local reads, CAS, put, prefix watches."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})
        self.watches: list[tuple[str, Callable[[WatchEvent], None]]] = []
        self.refuse: dict[str, int] = {}  # key -> CAS calls to refuse (someone else wrote first)
        self.cas_calls: list[tuple[str, Any, Any]] = []

    def get_local(self, key: Any) -> Any:
        return self.data.get(str(key))

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def _set(self, key: str, new: Any) -> None:
        if new is None:
            self.data.pop(key, None)
        else:
            self.data[key] = new
        for prefix, cb in list(self.watches):
            if key.startswith(prefix):
                cb(WatchEvent("remove" if new is None else "put", key, None, 0))

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int:
        self._set(str(key), value)
        return 0

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        k = str(key)
        self.cas_calls.append((k, expected, new))
        if self.refuse.get(k, 0) > 0:
            self.refuse[k] -= 1
            return False
        if self.data.get(k) != expected:
            return False
        self._set(k, new)
        return True

    def watch(self, prefix: str, callback: Callable[[WatchEvent], None]) -> Callable[[], None]:
        entry = (prefix, callback)
        self.watches.append(entry)
        return lambda: self.watches.remove(entry) if entry in self.watches else None


class FakeLeader:
    def __init__(self, node_id: str, members: list[str], leader: str | None) -> None:
        self.node_id = node_id
        self.members = members
        self.up = {m for m in members if m != node_id}
        self.leader = leader

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id


class FakeTransport:
    """Delivers synchronously to the other services of a little in-memory cluster."""

    def __init__(self, node_id: str, net: dict[str, Any]) -> None:
        self.node_id = node_id
        self.net = net
        self.sent: list[tuple[str, object]] = []
        self.down: set[str] = set()

    def send(self, peer: str, msg: object) -> bool:
        self.sent.append((peer, msg))
        svc = self.net.get(peer)
        if svc is None or peer in self.down:
            return False
        svc.on_message(self.node_id, msg)
        return True

    @property
    def up_peers(self) -> frozenset[str]:
        return frozenset(p for p in self.net if p != self.node_id and p not in self.down)


class FakeMetrics:
    def __init__(self) -> None:
        self.snap: Any = None
        self.loads: dict[str, Any] = {}
        self.instances: list[Any] = []

    def snapshot(self) -> Any:
        return self.snap

    def slice_loads(self) -> dict[str, Any]:
        return self.loads

    def instance_stats(self) -> list[Any]:
        return self.instances


class ControllerNode:
    """A node for the management server with a controller over the fakes above (node-1 leads)."""

    def __init__(self, data: dict[str, Any] | None = None, *, api_key_kv: bool = False) -> None:
        from aether.controller.service import ControllerService
        from aether.transport import EventBus

        self.node_id = "node-1"
        self.bus = EventBus()
        self.kv = FakeKV(data)
        self.leader_view = FakeLeader("node-1", ["node-1", "node-2", "node-3"], "node-1")
        self.metrics_in = FakeMetrics()
        self.plan: Callable[[Observation], list[dict[str, Any]]] = lambda obs: []
        self.cores: list[ScriptedCore] = []

        def factory(cfg: ControllerConfig, mem: ControllerMemory | None) -> ScriptedCore:
            core = ScriptedCore(cfg, mem)
            core.plan = lambda obs: self.plan(obs)
            self.cores.append(core)
            return core

        self.controller = ControllerService(
            self.kv, self.leader_view, FakeTransport("node-1", {}), self.metrics_in,  # type: ignore[arg-type]
            core_factory=factory, publish=self.bus.publish,
        )

    def status(self) -> Any:
        from aether.core.status import MemberStatus, NodeStatus

        return NodeStatus(node_id=self.node_id, leader="node-1", quorum=True,
                          nodes=[MemberStatus("node-1", "127.0.0.1:7000", "up")])

    def kv_list(self, prefix: str) -> list[Any]:
        return []
