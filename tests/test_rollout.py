"""The rollout core (aether.deploy.rollout): strategies, gates, rollback, commands, desired counts."""

from __future__ import annotations

import pytest

from aether.core.errors import BadRequest
from aether.deploy.errors import RolloutConflict
from aether.deploy.reconcile import desired_state
from aether.deploy.rollout import (
    Observation,
    VersionState,
    Window,
    abort,
    advance,
    begin,
    check_policy,
    counts_window,
    overrides,
    pause,
    resume,
)
from aether.kv.keys import BlueprintSlice, BlueprintValue, RolloutPolicy, RolloutValue

A = "org.example:hello"


def start(n: int = 3, **policy: object) -> RolloutValue:
    return begin("r1", A, "0.1.0", "0.2.0", n, RolloutPolicy(**policy), 1000.0)  # type: ignore[arg-type]


def obs(old: int, new: int, *, failed: str | None = None, calls: int = 0, failures: int = 0,
        p99: float | None = None, old_calls: int = 0, old_p99: float | None = None) -> Observation:
    return Observation(
        VersionState(old), VersionState(new, failed), Window(old_calls, 0, old_p99),
        Window(calls, failures, p99),
    )


def run_rolling(r: RolloutValue, t: float = 1000.0) -> list[tuple[int, int, int]]:
    """Drive a rolling update where every wanted instance becomes ready one pass later; returns
    (old desired, new desired, ready total) per pass and checks the surge/availability bounds."""
    seen = []
    ready_old, ready_new = r.old_instances, 0
    for _ in range(30):
        t += 1
        step = advance(r, obs(ready_old, ready_new), t)
        if step.value is not None:
            r = step.value
        # the bounds hold for what runs (old instances go at once, new ones become ready a pass later)
        assert r.old_instances + r.new_instances <= r.instances + r.max_surge
        ready_old = min(ready_old, r.old_instances)
        assert ready_old + ready_new >= r.instances - r.max_unavailable
        seen.append((r.old_instances, r.new_instances, ready_old + ready_new))
        ready_new = r.new_instances
        if r.state == "succeeded":
            break
    assert r.state == "succeeded", r.history
    assert (r.old_instances, r.new_instances, r.weights) == (0, r.instances, {})
    return seen


def test_rolling_update_starts_new_instances_first_and_never_goes_below_the_count() -> None:
    seen = run_rolling(start(3))
    assert seen[0] == (3, 1, 3)  # one surge instance first, every old one kept
    assert all(total >= 3 for _, _, total in seen)


@pytest.mark.parametrize(("surge", "unavailable"), [(2, 0), (0, 1), (1, 1), (5, 0)])
def test_rolling_update_keeps_surge_and_unavailability_bounds(surge: int, unavailable: int) -> None:
    run_rolling(start(4, max_surge=surge, max_unavailable=unavailable))


def test_rolling_weights_follow_the_ready_instances() -> None:
    r = start(3)
    r = advance(r, obs(3, 0), 1001).value or r  # new x1
    step = advance(r, obs(3, 1), 1002)
    assert step.value is not None and step.value.weights == {"0.1.0": 2, "0.2.0": 1}


def test_a_failed_new_instance_rolls_back_and_ends_with_the_old_version_in_the_blueprints() -> None:
    r = advance(start(3), obs(3, 0), 1001).value
    assert r is not None
    step = advance(r, obs(3, 0, failed="start failed: boom (on node-2)"), 1002)
    assert step.value is not None
    r = step.value
    assert (r.state, r.old_instances, r.new_instances, r.weights) == ("rolling-back", 3, 0, {"0.1.0": 1})
    assert "boom" in r.reason and step.events
    assert advance(r, obs(2, 0), 1003).value is None  # waits for every old instance
    done = advance(r, obs(3, 0), 1004)
    assert done.value is not None and done.value.state == "rolled-back"
    assert done.blueprints_to == "0.1.0"


def test_new_instances_not_ready_within_the_progress_deadline_roll_back() -> None:
    r = advance(start(3, progress_deadline=10), obs(3, 0), 1001).value
    assert r is not None
    assert advance(r, obs(3, 0), 1010).value is None
    step = advance(r, obs(3, 0), 1012)
    assert step.value is not None and step.value.state == "rolling-back"
    assert "progress_deadline" in step.value.reason


def canary(**policy: object) -> RolloutValue:
    return start(3, strategy="canary", steps=[10, 50, 100], interval=30, max_error_rate=0.05, **policy)


def test_canary_steps_shift_traffic_only_to_ready_instances_and_analyse_each_step() -> None:
    r = canary()
    r = advance(r, obs(3, 0), 1001).value or r
    assert (r.new_instances, r.weights) == (1, {"0.1.0": 1})  # started, no traffic yet
    assert advance(r, obs(3, 0), 1002).value is None  # not ready: nothing changes
    r = advance(r, obs(3, 1), 1003).value or r
    assert r.weights == {"0.1.0": 90, "0.2.0": 10} and r.step_started == 1003
    assert advance(r, obs(3, 1, calls=100), 1020).value is None  # within the interval
    r = advance(r, obs(3, 1, calls=200, failures=2), 1034).value or r  # 1 % < 5 %: next step
    assert r.step == 1 and r.calls == 200 and r.failures == 2
    r = advance(r, obs(3, 1), 1035).value or r
    assert r.new_instances == 2  # ceil(3 * 50 %)
    r = advance(r, obs(3, 2), 1036).value or r
    assert r.weights == {"0.1.0": 50, "0.2.0": 50}
    r = advance(r, obs(3, 2, calls=50), 1067).value or r
    r = advance(r, obs(3, 2), 1068).value or r
    assert r.new_instances == 3
    r = advance(r, obs(3, 3), 1069).value or r
    assert r.weights == {"0.2.0": 100}
    r = advance(r, obs(3, 3, calls=80), 1100).value or r
    assert r.state == "succeeded" and r.old_instances == 0 and r.calls == 330


def test_canary_error_gate_rolls_back_as_soon_as_there_are_enough_calls() -> None:
    r = canary(min_calls=20)
    r = advance(r, obs(3, 0), 1001).value or r
    r = advance(r, obs(3, 1), 1002).value or r
    assert advance(r, obs(3, 1, calls=10, failures=5), 1003).value is None  # too few calls to judge
    step = advance(r, obs(3, 1, calls=20, failures=10), 1004)
    assert step.value is not None
    assert step.value.state == "rolling-back" and step.value.weights == {"0.1.0": 1}
    assert "10 of 20 calls of 0.2.0 failed" in step.value.reason


def test_canary_p99_gate_is_judged_at_the_end_of_the_step_against_the_old_version() -> None:
    r = canary(max_p99_ratio=1.5)
    r = advance(r, obs(3, 0), 1001).value or r
    r = advance(r, obs(3, 1), 1002).value or r
    slow = obs(3, 1, calls=50, p99=40.0, old_calls=500, old_p99=10.0)
    assert advance(r, slow, 1010).value is None
    step = advance(r, slow, 1033)
    assert step.value is not None and step.value.state == "rolling-back"
    assert "4.0x" in step.value.reason


def test_blue_green_starts_every_new_instance_then_switches_all_calls() -> None:
    r = start(3, strategy="blue-green", interval=5)
    r = advance(r, obs(3, 0), 1001).value or r
    assert r.new_instances == 3 and r.old_instances == 3
    r = advance(r, obs(3, 3), 1002).value or r
    assert r.weights == {"0.2.0": 100}
    r = advance(r, obs(3, 3), 1008).value or r
    assert r.state == "succeeded" and r.old_instances == 0


def test_pause_resume_abort() -> None:
    r = advance(start(3), obs(3, 0), 1001).value
    assert r is not None
    p = pause(r, 1002)
    assert p.state == "paused" and advance(p, obs(3, 1), 1003).value is None
    with pytest.raises(RolloutConflict):
        pause(p, 1003)
    q = resume(p, 1004)
    assert q.state == "progressing" and q.step_started == 1004
    a = abort(q, 1005)
    assert a.state == "rolling-back" and a.reason.startswith("aborted")
    done = advance(a, obs(3, 0), 1006)
    assert done.value is not None and done.value.state == "aborted"
    with pytest.raises(RolloutConflict, match="undo"):
        abort(done.value, 1007)


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ({"strategy": "big-bang"}, "strategy must be one of"),
        ({"strategy": "canary", "steps": [50, 10, 100]}, "increasing"),
        ({"strategy": "canary", "steps": [10, 50]}, "last step must be 100"),
        ({"steps": [10, 100]}, "canary strategy only"),
        ({"max_surge": 0, "max_unavailable": 0}, "never make progress"),
        ({"max_error_rate": 2.0}, "between 0 and 1"),
        ({"interval": 0}, "interval"),
    ],
)
def test_bad_policies_are_named(policy: dict[str, object], problem: str) -> None:
    p = RolloutPolicy(**policy)  # type: ignore[arg-type]
    assert problem in (check_policy(p) or "")
    with pytest.raises(BadRequest, match=problem):
        begin("x", A, "1", "2", 3, p, 0.0)


def test_counts_window_diffs_per_node_and_restarts_count_from_zero() -> None:
    bounds = [0.001, 0.01, 0.1]
    base = {"n1": (1, 100, 5, [90, 10, 0, 0]), "n2": (1, 50, 0, [50, 0, 0, 0])}
    now = {
        "n1": (1, 200, 6, [100, 90, 10, 0]), "n2": (2, 10, 10, [0, 0, 0, 10]), "n3": (1, 5, 0, [5, 0, 0, 0]),
    }
    w = counts_window(base, now, bounds)
    assert (w.calls, w.failures) == (100 + 10 + 5, 1 + 10 + 0)
    assert w.p99_ms == 200.0  # the overflow bucket holds the 99th percentile: twice the last bound
    assert counts_window(now, now, bounds) == Window(0, 0, None)


def test_an_active_rollout_sets_the_desired_counts_of_both_versions() -> None:
    bp = BlueprintValue([
        BlueprintSlice(f"{A}:0.2.0", 3, depends_on=["org.example:dep:1.0.0"]),
        BlueprintSlice("org.example:dep:1.0.0", 1),
    ])  # fmt: skip
    r = advance(start(3), obs(3, 0), 1001).value
    assert r is not None
    d = desired_state([bp], None, [r])
    assert d[f"{A}:0.1.0"].instances == 3 and d[f"{A}:0.2.0"].instances == 1
    assert d[f"{A}:0.1.0"].depends_on == ("org.example:dep:1.0.0",)
    done = RolloutValue(**{**{f: getattr(r, f) for f in r.__struct_fields__}, "state": "succeeded"})
    assert overrides([done]) == {}
    assert desired_state([bp], None, [done])[f"{A}:0.2.0"].instances == 3
    assert f"{A}:0.1.0" not in desired_state([bp], None, [done])


def test_a_started_rollout_survives_a_store_round_trip_byte_for_byte() -> None:
    # the leader compares-and-sets the value it decoded: integers given for float settings (TOML
    # `interval = 60`) must be stored as floats, or every CAS would fail and the rollout never move
    import msgspec

    r = begin("r", A, "1", "2", 3, RolloutPolicy(interval=60, progress_deadline=10, max_p99_ratio=2), 0.0)
    raw = msgspec.msgpack.encode(r)
    assert msgspec.msgpack.encode(msgspec.msgpack.decode(raw, type=RolloutValue)) == raw


@pytest.mark.parametrize("state", ["progressing", "paused", "rolling-back"])
def test_a_rollout_no_blueprint_lists_any_more_ends_aborted_and_imposes_no_counts(state: str) -> None:
    import msgspec

    r = msgspec.structs.replace(advance(start(3), obs(3, 0), 1001).value, state=state)  # type: ignore[arg-type]
    step = advance(r, Observation(VersionState(3), VersionState(1), listed=False), 1002)
    assert step.value is not None and step.value.state == "aborted"
    assert (step.value.old_instances, step.value.new_instances, step.value.weights) == (0, 0, {})
    why = f"no blueprint lists {A} any more (deleted or undeployed)"
    assert step.events == [f"rollout of {A} to 0.2.0 ended: {why}"] and step.value.reason == why
    assert step.blueprints_to is None  # no blueprint to write back into
    assert desired_state([], None, [step.value]) == {}
    assert desired_state([], None, [r]) != {}  # what the active rollout alone kept running
