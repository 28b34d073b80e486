"""Deployment: desired state (blueprints) → placement → per-node lifecycle → endpoints and routes.

Modules and what they own (flow 2 in docs/architecture.md; docs/deployment.md):

- `lifecycle`   sans-IO per-node, per-artifact lifecycle state machine; `SliceState`.
- `blueprint`   TOML blueprint parsing/validation and dependency expansion.
- `allocation`  pure instance placement (round-robin spread, minimal movement, stable ids).
- `reconcile`   the leader's pure reconciliation pass (desired + store contents → CAS writes).
- `endpoints`   `EndpointRegistry`, every node's cache of `endpoints/…`.
- `traffic`     `TrafficTable`, every node's cache of the rollouts' traffic weights (`rollouts/…`).
- `node_manager`    `NodeDeploymentManager`, every node: drives the slice runtime.
- `cluster_manager` `ClusterDeploymentManager`, leader only: writes lifecycle commands.
- `operations`  `DeploymentService`: apply/delete blueprints, deploy/scale/undeploy, status, wait.
- `ports`       Protocols for the slice runtime and the artifact repository (implemented elsewhere).
- `errors`      `BlueprintError`, `DeploymentFailed`, `ConvergenceTimeout`.

Layering: `aether.deploy` may import `aether.core`, `aether.kv` and `aether.cluster`; it must not
import `aether.slices`, `aether.invoke`, `aether.node` or `aether.api` (those depend on it).
"""

from aether.deploy.allocation import Placement, allocate
from aether.deploy.blueprint import Blueprint, BlueprintSliceSpec, expand, load_blueprint, parse_blueprint
from aether.deploy.cluster_manager import ClusterDeploymentManager
from aether.deploy.endpoints import EndpointChange, EndpointInfo, EndpointRegistry
from aether.deploy.errors import BlueprintError, ConvergenceTimeout, DeploymentFailed
from aether.deploy.lifecycle import LifecycleTimeouts, SliceLifecycle, SliceState
from aether.deploy.node_manager import NodeDeploymentManager, RouteConflict
from aether.deploy.operations import DeploymentService, SliceInstanceStatus, SliceStatus
from aether.deploy.ports import RouteInfo, SliceInfo, SliceRuntimePort
from aether.deploy.traffic import TrafficTable

__all__ = [
    "Blueprint",
    "BlueprintError",
    "BlueprintSliceSpec",
    "ClusterDeploymentManager",
    "ConvergenceTimeout",
    "DeploymentFailed",
    "DeploymentService",
    "EndpointChange",
    "EndpointInfo",
    "EndpointRegistry",
    "LifecycleTimeouts",
    "NodeDeploymentManager",
    "Placement",
    "RouteConflict",
    "RouteInfo",
    "SliceInfo",
    "SliceInstanceStatus",
    "SliceLifecycle",
    "SliceRuntimePort",
    "SliceState",
    "SliceStatus",
    "TrafficTable",
    "allocate",
    "expand",
    "load_blueprint",
    "parse_blueprint",
]
