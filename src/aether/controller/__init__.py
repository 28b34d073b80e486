"""The layer-1 controller: autoscaling, health and recovery, and alerts that explain themselves
(docs/controller.md).

Owns:

- `config` — the cluster-wide controller configuration (TOML, stored at `controller/config`):
  scaling windows and cooldowns, health and recovery limits, alert rules, webhooks;
- `core.Controller` (sans-IO) — a function of (metrics window, desired and actual state, config,
  time) -> `Decision`s: target tracking with a tolerance band, a panic path for surges, a
  scale-down stabilization window, cooldowns, bounded steps, min/max; replacing unhealthy
  instances, recovering stuck ones, keeping new instances off saturated nodes;
- `alerts.AlertEngine` (sans-IO) — threshold rules with `for` durations, firing and resolved;
- `service.ControllerService` — the asyncio adapter on every node: runs the core once a second
  on the leader, applies its decisions through the store, syncs its state to the other nodes
  (so a new leader continues with the windows, cooldowns and history it inherits), delivers
  webhooks.

May import `aether.core`, `aether.kv`, `aether.cluster`, `aether.metrics` and `aether.deploy`.
"""
