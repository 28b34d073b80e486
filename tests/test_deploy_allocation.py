"""Allocation core: examples and hypothesis properties (exact counts, spread, stability, minimal movement)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.deploy.allocation import Placement, allocate, changes, spread

pytestmark = pytest.mark.timeout(120)

N3 = ["node-1", "node-2", "node-3"]


def test_round_robin_from_empty() -> None:
    assert allocate({"a": 5}, N3, {}) == {"a": {"node-1": [0, 3], "node-2": [1, 4], "node-3": [2]}}


def test_ties_broken_by_total_instances_then_node_id() -> None:
    out = allocate({"a": 1, "b": 1, "c": 1, "d": 1}, N3, {})
    assert out == {"a": {"node-1": [0]}, "b": {"node-2": [0]}, "c": {"node-3": [0]}, "d": {"node-1": [0]}}


def test_existing_placements_kept_and_lost_ones_replaced_with_their_ids() -> None:
    cur = {"a": {"node-1": [0], "node-2": [1], "node-3": [2]}}
    out = allocate({"a": 3}, ["node-1", "node-2"], cur)  # node-3 died
    assert out == {"a": {"node-1": [0, 2], "node-2": [1]}}


def test_scale_down_removes_highest_ids_from_fullest_nodes() -> None:
    cur = {"a": {"node-1": [0, 3], "node-2": [1, 4], "node-3": [2]}}
    assert allocate({"a": 3}, N3, cur) == {"a": {"node-1": [0], "node-2": [1], "node-3": [2]}}
    assert allocate({"a": 0}, N3, cur) == {}
    assert allocate({}, N3, cur) == {}


def test_scale_down_removes_instances_that_do_not_serve_first() -> None:
    # node-1 holds more instances overall (another artifact), so it would be the victim; but the
    # instance on node-3 was just deactivated (idle): it goes, and nothing serving is stopped
    current = {"a": {"n1": [0], "n2": [1], "n3": [2]}, "b": {"n1": [0]}}
    without = allocate({"a": 2, "b": 1}, ["n1", "n2", "n3"], current)
    assert without["a"] == {"n2": [1], "n3": [2]}
    target = allocate({"a": 2, "b": 1}, ["n1", "n2", "n3"], current, idle=[("a", "n3")])
    assert target["a"] == {"n1": [0], "n2": [1]}


def test_freed_ids_reused_lowest_first() -> None:
    cur = {"a": {"node-1": [0, 5], "node-2": [3]}}
    out = allocate({"a": 5}, N3, cur)
    assert sorted(i for ids in out["a"].values() for i in ids) == [0, 1, 2, 3, 5]


def test_failed_placement_replaced_elsewhere_and_excluded_nodes_get_nothing_new() -> None:
    cur = {"a": {"node-1": [0], "node-2": [1], "node-3": [2]}}
    out = allocate({"a": 3}, N3, cur, failed={("a", "node-3")})
    assert "node-3" not in out["a"] and sorted(i for ids in out["a"].values() for i in ids) == [0, 1, 2]
    out = allocate({"a": 4}, N3, {}, excluded={("a", "node-1")})
    assert out == {"a": {"node-2": [0, 2], "node-3": [1, 3]}}
    assert allocate({"a": 2}, N3, {}, excluded={("a", n) for n in N3}) == {}


def test_duplicate_ids_from_two_leaders_are_resolved() -> None:
    cur = {"a": {"node-1": [0, 1], "node-2": [1], "node-3": [2]}}
    out = allocate({"a": 3}, N3, cur)
    ids = [i for ids in out["a"].values() for i in ids]
    assert sorted(ids) == [0, 1, 2] and len(set(ids)) == 3


def test_join_only_moves_when_spread_exceeds_one() -> None:
    cur = {"a": {"node-1": [0, 3], "node-2": [1], "node-3": [2]}}
    # 4 instances on 3 nodes + a new node: spread (2 vs 0) > 1 -> exactly one move
    out = allocate({"a": 4}, [*N3, "node-4"], cur)
    assert out == {"a": {"node-1": [0], "node-2": [1], "node-3": [2], "node-4": [3]}}
    # 2 instances on 3 nodes + a new node: spread stays <= 1 -> nothing moves
    cur2 = {"a": {"node-1": [0], "node-2": [1]}}
    assert allocate({"a": 2}, [*N3, "node-4"], cur2) == cur2


def test_changes_lists_differences() -> None:
    assert changes({"a": {"n1": [0]}}, {"a": {"n1": [0], "n2": [1]}}) == {("a", "n2"): ([], [1])}


# --- properties -------------------------------------------------------------------------------------

node_ids = st.lists(st.sampled_from([f"node-{i}" for i in range(1, 8)]), min_size=1, max_size=7, unique=True)
desired_st = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 12), max_size=4)


Scenario = tuple[dict[str, int], list[str], Placement]


@st.composite
def scenario(draw: st.DrawFn) -> Scenario:
    nodes = draw(node_ids)
    desired = draw(desired_st)
    # an arbitrary (possibly messy) current placement: dead nodes, duplicates, over/under count
    all_nodes = sorted({*nodes, "node-8", "node-9"})
    cur: Placement = {}
    for a in draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), unique=True, max_size=5)):
        per = draw(st.dictionaries(st.sampled_from(all_nodes), st.lists(st.integers(0, 15), max_size=5),
                                   max_size=len(all_nodes)))
        cur[a] = {n: ids for n, ids in per.items() if ids}
    return desired, nodes, cur


def _ids(p: Placement, a: str) -> list[int]:
    return [i for ids in p.get(a, {}).values() for i in ids]


def _check_invariants(desired: dict[str, int], nodes: list[str], out: Placement) -> None:
    for a, want in desired.items():
        ids = _ids(out, a)
        assert len(ids) == want, (a, want, out)  # counts exact
        assert len(set(ids)) == len(ids)  # ids unique per artifact
        assert set(out.get(a, {})) <= set(nodes)  # only live nodes
        assert spread(out, a, nodes) <= 1, (a, out)  # spread
    assert set(out) <= {a for a, n in desired.items() if n > 0}
    for per in out.values():
        for ids in per.values():
            assert ids == sorted(ids) and ids


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_property_counts_exact_ids_unique_spread_at_most_one(sc: Scenario) -> None:
    desired, nodes, cur = sc
    _check_invariants(desired, nodes, allocate(desired, nodes, cur))


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_property_stable_under_no_op(sc: Scenario) -> None:
    desired, nodes, cur = sc
    once = allocate(desired, nodes, cur)
    assert allocate(desired, nodes, once) == once
    assert allocate(desired, list(reversed(nodes)), once) == once  # node order does not matter


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_property_valid_instances_never_move_without_reason(sc: Scenario) -> None:
    """An instance on a live node stays on that node with its id unless its artifact is over
    count, or the spread was violated by more than 1 (then it may move)."""
    desired, nodes, cur = sc
    out = allocate(desired, nodes, cur)
    for a, want in desired.items():
        per = cur.get(a, {})
        live_ids = sorted({i for n, ids in per.items() if n in nodes for i in ids})
        counts = [len(set(per.get(n, []))) for n in nodes]
        if len(live_ids) <= want and max(counts, default=0) - min(counts, default=0) <= 1 and \
                sum(counts) == len(live_ids):
            for n in nodes:
                assert set(per.get(n, [])) <= set(out.get(a, {}).get(n, [])), (a, n, cur, out)


@settings(max_examples=300, deadline=None)
@given(node_ids.filter(lambda ns: len(ns) >= 2), desired_st, st.data())
def test_property_minimal_movement_on_node_loss(
    nodes: list[str], desired: dict[str, int], data: st.DataObject
) -> None:
    before = allocate(desired, nodes, {})
    lost = data.draw(st.sampled_from(nodes))
    survivors = [n for n in nodes if n != lost]
    after = allocate(desired, survivors, before)
    _check_invariants(desired, survivors, after)
    for a in desired:
        for n in survivors:  # survivors keep everything they had
            assert set(before.get(a, {}).get(n, [])) <= set(after.get(a, {}).get(n, []))
        # exactly the lost instances were re-placed, with the ids that were freed
        gained = sorted(set(_ids(after, a)) - set(_ids(before, a)))
        assert len(gained) == 0
        lost_ids = before.get(a, {}).get(lost, [])
        moved = [i for n in survivors for i in after.get(a, {}).get(n, [])
                 if i not in before.get(a, {}).get(n, [])]
        assert sorted(moved) == sorted(lost_ids)


@settings(max_examples=300, deadline=None)
@given(node_ids.filter(lambda ns: len(ns) <= 6), desired_st)
def test_property_minimal_movement_on_node_join(nodes: list[str], desired: dict[str, int]) -> None:
    before = allocate(desired, nodes, {})
    joined = next(f"node-{i}" for i in range(1, 9) if f"node-{i}" not in nodes)
    after = allocate(desired, [*nodes, joined], before)
    _check_invariants(desired, [*nodes, joined], after)
    for a, want in desired.items():
        for n in nodes:  # old nodes only ever lose instances, never gain
            assert set(after.get(a, {}).get(n, [])) <= set(before.get(a, {}).get(n, []))
        moved = len(after.get(a, {}).get(joined, []))
        old_counts = [len(before.get(a, {}).get(n, [])) for n in nodes]
        if max(old_counts, default=0) <= 1:
            assert moved == 0  # spread not violated by the join: nothing moves
        assert moved <= -(-want // (len(nodes) + 1))  # at most ceil(want / nodes)
        assert sorted(_ids(after, a)) == sorted(_ids(before, a))  # ids are stable


@settings(max_examples=200, deadline=None)
@given(node_ids, desired_st, st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 12)))
def test_property_scaling_only_adds_or_removes(
    nodes: list[str], d1: dict[str, int], d2: dict[str, int]
) -> None:
    before = allocate(d1, nodes, {})
    after = allocate({**d1, **d2}, nodes, before)
    for a, want in d2.items():
        have = len(_ids(before, a))
        for n in nodes:
            b, c = set(before.get(a, {}).get(n, [])), set(after.get(a, {}).get(n, []))
            if want >= have:
                assert b <= c
            else:
                assert c <= b
