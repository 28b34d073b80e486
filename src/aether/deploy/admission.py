"""Admission control: may the cluster take on a desired state? Pure functions, no I/O.

Owns the instance limits and the arithmetic that checks desired state against them. The
`DeploymentService` calls `check` before it writes a blueprint (apply, deploy, scale); the
leader's allocation uses the per-node limit as each node's capacity so that even a state
written before the limits existed (or under higher limits on another node) never makes a node
start more than `per_node` instances. May import nothing from Aether but `aether.deploy.errors`.

Rules:
- The cluster runs `sum(desired)` instances; that must stay <= `per_cluster`.
- Allocation spreads every artifact evenly over the members, so a node runs
  `sum(ceil(desired[a] / members))` instances when every member is up; that must stay
  <= `per_node`.
- A change is rejected only if it exceeds a limit *and* asks for more than the current desired
  state does under that measure: lowering counts, or deleting, is always admitted, even when the
  current state is already over a (since lowered) limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aether.deploy.errors import AdmissionRejected


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    per_node: int
    per_cluster: int


def cluster_total(desired: Mapping[str, int]) -> int:
    return sum(max(0, n) for n in desired.values())


def per_node_total(desired: Mapping[str, int], members: int) -> int:
    """Instances one node runs when `desired` is spread evenly over `members` nodes (the most
    loaded node's count)."""
    m = max(1, members)
    return sum(-(-max(0, n) // m) for n in desired.values())


def check(
    before: Mapping[str, int], after: Mapping[str, int], members: int, limits: InstanceLimits, what: str
) -> None:
    """Raise `AdmissionRejected` if going from `before` to `after` (desired instances per artifact)
    breaks a limit; `what` names the change in the message (e.g. "blueprint 'shop'")."""
    largest = max(after.items(), key=lambda kv: (kv[1], kv[0]), default=None)
    biggest = f"; the largest is {largest[0]} with {largest[1]} instances" if largest else ""
    fix = ("lower `instances`, or raise the limit in the `[node]` config (aether.toml) of every node "
           "and restart them")
    total_before, total_after = cluster_total(before), cluster_total(after)
    if total_after > limits.per_cluster and total_after > total_before:
        raise AdmissionRejected(
            f"{what} would make the cluster run {total_after} slice instances, over the limit "
            f"max_instances_per_cluster = {limits.per_cluster}{biggest}; {fix}"
        )
    node_before, node_after = per_node_total(before, members), per_node_total(after, members)
    if node_after > limits.per_node and node_after > node_before:
        raise AdmissionRejected(
            f"{what} would make each node run up to {node_after} slice instances ({total_after} spread "
            f"over {members} nodes), over the limit max_instances_per_node = {limits.per_node}"
            f"{biggest}; {fix}"
        )
