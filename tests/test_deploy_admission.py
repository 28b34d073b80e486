"""Admission control, pure parts: the instance limits, the allocation capacity and the bounded
number of instance starts per command (issue 11, item 3)."""

from __future__ import annotations

import pytest

from aether.core.config import NodeConfig, load_toml
from aether.core.errors import BadRequest, ConfigError
from aether.core.types import Address, PeerSpec
from aether.deploy.admission import InstanceLimits, check, per_node_total
from aether.deploy.allocation import allocate
from aether.deploy.errors import AdmissionRejected
from aether.deploy.reconcile import DesiredSlice, FailureTracker, plan
from aether.kv.keys import SliceStateValue

pytestmark = pytest.mark.timeout(10)

A = "org.demo:a:1.0.0"
B = "org.demo:b:1.0.0"
N = ["node-1", "node-2", "node-3"]
LIMITS = InstanceLimits(per_node=10, per_cluster=25)


def test_runaway_count_rejected_naming_the_cluster_limit_and_the_numbers() -> None:
    with pytest.raises(AdmissionRejected) as e:
        check({}, {A: 1_000_000}, 3, LIMITS, "blueprint 'big'")
    msg = str(e.value)
    assert "blueprint 'big'" in msg and "1000000" in msg
    assert "max_instances_per_cluster = 25" in msg and A in msg
    assert isinstance(e.value, BadRequest)  # answered with 400 by the management API


def test_per_node_limit_counts_the_spread_over_the_members() -> None:
    # 3 artifacts x 9 instances = 27 > 25: cluster limit
    with pytest.raises(AdmissionRejected, match="max_instances_per_cluster = 25"):
        check({}, {A: 9, B: 9, "org.demo:c:1.0.0": 9}, 3, LIMITS, "x")
    # 24 instances, but on 2 members each node runs 12 > 10
    assert per_node_total({A: 12, B: 12}, 2) == 12
    with pytest.raises(AdmissionRejected) as e:
        check({}, {A: 12, B: 12}, 2, LIMITS, "x")
    assert "max_instances_per_node = 10" in str(e.value) and "up to 12" in str(e.value)
    # ceil per artifact: 7 over 3 nodes puts 3 on one node
    assert per_node_total({A: 7, B: 1}, 3) == 4
    check({}, {A: 24}, 3, LIMITS, "x")  # 8 per node, 24 in all: admitted


def test_lowering_is_always_admitted_even_over_a_lowered_limit() -> None:
    check({A: 100}, {A: 50}, 3, LIMITS, "x")  # already over both limits, but asks for less
    check({A: 100}, {}, 3, LIMITS, "x")  # deleting
    with pytest.raises(AdmissionRejected):
        check({A: 100}, {A: 101}, 3, LIMITS, "x")


def test_allocation_never_fills_a_node_beyond_its_capacity() -> None:
    out = allocate({A: 1_000_000, B: 5}, N, {}, capacity=4)
    per_node = {n: sum(len(out.get(a, {}).get(n, [])) for a in (A, B)) for n in N}
    assert per_node == {"node-1": 4, "node-2": 4, "node-3": 4}
    # without a capacity the counts are exact as before
    assert sum(len(v) for v in allocate({A: 7}, N, {}).get(A, {}).values()) == 7
    # a node already over the capacity keeps its instances (only new placements are refused); the
    # spread still moves one of them to a node with room
    out = allocate({A: 10}, N, {A: {"node-1": [0, 1, 2, 3, 4]}}, capacity=3)
    assert out[A] == {"node-1": [0, 1, 2, 3], "node-2": [5, 7, 9], "node-3": [4, 6, 8]}


def _cmds(desired: dict[str, DesiredSlice], slices: dict[str, dict[str, SliceStateValue]],
          **kw: int) -> dict[str, tuple[str, list[int]]]:
    p = plan(desired, N, set(), slices, [], [], FailureTracker(), 100.0, 5.0, **kw)
    return {w.key: (w.new.state, w.new.instances) for w in p.writes if isinstance(w.new, SliceStateValue)}


def test_one_command_starts_at_most_max_starts_instances() -> None:
    loaded = {n: {A: SliceStateValue("LOADED", 1.0, None, list(range(i, 30, 3)))} for i, n in enumerate(N)}
    got = _cmds({A: DesiredSlice(30)}, loaded, max_starts=4)
    assert got[f"slices/node-1/{A}"] == ("ACTIVATE", [0, 3, 6, 9])
    # the next step adds the next ids to what runs, removals are not held back
    active = {"node-1": {A: SliceStateValue("ACTIVE", 1.0, None, [0, 3, 6, 9])}}
    got = _cmds({A: DesiredSlice(30)}, active, max_starts=4)
    assert got[f"slices/node-1/{A}"] == ("ACTIVE", [0, 3, 6, 9, 12, 15, 18, 21])
    many = {"node-1": {A: SliceStateValue("ACTIVE", 1.0, None, list(range(20)))}}
    got = _cmds({A: DesiredSlice(3)}, many, max_starts=4)
    assert got[f"slices/node-1/{A}"] == ("ACTIVE", [0])
    # without a bound the whole target is commanded at once (the previous behaviour)
    assert len(_cmds({A: DesiredSlice(30)}, loaded)[f"slices/node-1/{A}"][1]) == 10


def test_limits_are_node_config_settings(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "aether.toml"
    p.write_text("[node]\nmax_instances_per_node = 7\nmax_instances_per_cluster = 20\n")
    assert load_toml(p) == {"max_instances_per_node": 7, "max_instances_per_cluster": 20}
    peers = [PeerSpec("node-1", Address("127.0.0.1", 7000))]
    c = NodeConfig(node_id="node-1", peers=peers)
    assert (c.max_instances_per_node, c.max_instances_per_cluster) == (1000, 3000)
    with pytest.raises(ConfigError, match="max_instances_per_node must be >= 1"):
        NodeConfig(node_id="node-1", peers=peers, max_instances_per_node=0).validate()
