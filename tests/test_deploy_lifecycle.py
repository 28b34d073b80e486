"""The sans-IO slice lifecycle (SPEC §3.3): legal paths, illegal commands, timeouts, recovery."""

from __future__ import annotations

import pytest

from aether.deploy.lifecycle import (
    AbortStep,
    ConfigChanged,
    EndpointsLost,
    LifecycleTimeouts,
    Note,
    Observed,
    Quarantine,
    Reject,
    RemoveKey,
    SliceLifecycle,
    SliceState,
    StartStep,
    Step,
    StepFailed,
    StepSucceeded,
    Tick,
    WriteState,
)
from aether.kv.keys import SliceStateValue

pytestmark = pytest.mark.timeout(10)

A = "org.demo:hello:1.0.0"
S = SliceState


def v(state: str, instances: list[int] | None = None, reason: str | None = None) -> SliceStateValue:
    return SliceStateValue(state, 0.0, reason, instances or [])


def writes(actions: list[object]) -> list[tuple[SliceState, str | None, tuple[int, ...]]]:
    return [(a.state, a.reason, a.instances) for a in actions if isinstance(a, WriteState)]


def step_of(actions: list[object]) -> StartStep:
    (s,) = [a for a in actions if isinstance(a, StartStep)]
    return s


def echo(m: SliceLifecycle, actions: list[object], now: float = 0.0) -> None:
    """Feed back the writes the adapter would commit, checking they are ignored as echoes."""
    for w in actions:
        if isinstance(w, WriteState):
            assert m.handle(Observed(v(w.state, list(w.instances), w.reason), now)) == []


def test_full_legal_path_load_activate_deactivate_unload() -> None:
    m = SliceLifecycle(A)
    out = m.handle(Observed(v("LOAD", [0, 1]), 0.0))
    assert writes(out) == [(S.LOADING, None, (0, 1))]
    load = step_of(out)
    assert load.step is Step.LOAD and load.deadline == 60.0 and m.state is S.LOADING
    echo(m, out)
    out = m.handle(StepSucceeded(load.seq, 1.0))
    assert writes(out) == [(S.LOADED, None, (0, 1))] and m.state is S.LOADED and not m.busy
    echo(m, out)

    out = m.handle(Observed(v("ACTIVATE", [0, 1]), 2.0))
    assert writes(out) == [(S.ACTIVATING, None, (0, 1))]
    act = step_of(out)
    assert act.step is Step.ACTIVATE and act.instances == (0, 1) and act.deadline == 12.0
    echo(m, out)
    out = m.handle(StepSucceeded(act.seq, 3.0))
    assert writes(out) == [(S.ACTIVE, None, (0, 1))] and m.state is S.ACTIVE
    echo(m, out)

    out = m.handle(Observed(v("DEACTIVATE", [0, 1]), 4.0))
    assert writes(out) == [(S.DEACTIVATING, None, (0, 1))]
    deact = step_of(out)
    echo(m, out)
    out = m.handle(StepSucceeded(deact.seq, 5.0))
    assert writes(out) == [(S.LOADED, None, (0, 1))]
    echo(m, out)

    out = m.handle(Observed(v("UNLOAD", [0, 1]), 6.0))
    assert writes(out) == [(S.UNLOADING, None, (0, 1))]
    unload = step_of(out)
    echo(m, out)
    out = m.handle(StepSucceeded(unload.seq, 7.0))
    assert [type(a) for a in out] == [RemoveKey] and m.state is None
    assert m.handle(Observed(None, 8.0)) == []
    assert m.finished


@pytest.mark.parametrize(
    ("running", "command"),
    [
        ("LOADING", "ACTIVATE"),  # ACTIVATE while LOADING
        ("LOADING", "DEACTIVATE"),
        ("LOADING", "UNLOAD"),
        ("ACTIVATING", "DEACTIVATE"),
        ("ACTIVATING", "UNLOAD"),
        ("ACTIVATING", "LOAD"),
        ("DEACTIVATING", "ACTIVATE"),
        ("DEACTIVATING", "UNLOAD"),
        ("UNLOADING", "LOAD"),
        ("UNLOADING", "ACTIVATE"),
    ],
)
def test_illegal_commands_while_a_step_runs_are_rejected_not_applied(running: str, command: str) -> None:
    m = SliceLifecycle(A)
    seq = step_of(m.handle(Observed(v("LOAD", [0]), 0.0))).seq
    path = {"LOADING": [], "ACTIVATING": ["ACTIVATE"], "DEACTIVATING": ["ACTIVATE", "DEACTIVATE"],
            "UNLOADING": ["UNLOAD"]}[running]
    for cmd in path:
        m.handle(StepSucceeded(seq, 1.0))
        seq = step_of(m.handle(Observed(v(cmd, [0]), 1.0))).seq
    assert m.state == running
    out = m.handle(Observed(v(command, [0]), 2.0))
    assert len(out) == 1 and isinstance(out[0], Reject), out
    assert out[0].local == running and f"rejected {command}" in out[0].message
    assert m.state == running and m.running_seq == seq  # nothing applied, the step still runs


@pytest.mark.parametrize(
    ("state", "command"),
    [
        (S.LOADED, "DEACTIVATE"),  # acknowledged, not rejected (idempotent) -> checked separately
        (S.ACTIVE, "UNLOAD"),  # must DEACTIVATE first
        (S.ACTIVE, "LOAD"),
        (S.FAILED, "ACTIVATE"),  # FAILED only goes to UNLOAD
        (S.FAILED, "LOAD"),
        (S.FAILED, "DEACTIVATE"),
        (S.LOADED, "ACTIVE"),  # a node state written by someone else: ignored
    ],
)
def test_illegal_commands_while_idle_are_rejected_and_the_truth_restated(
    state: SliceState, command: str
) -> None:
    m = _machine_in(state)
    before = (m.state, m.instances, m.reason)
    out = m.handle(Observed(v(command, [0]), 50.0))
    if (state, command) == (S.LOADED, "DEACTIVATE"):
        assert writes(out) == [(S.LOADED, None, (0,))]
        return
    if command == "ACTIVE":
        assert out == []
        return
    assert isinstance(out[0], Reject) and f"rejected {command}" in out[0].message
    # re-stated: the leader sees the real state again (FAILED keeps its reason)
    assert writes(out) == [(state, m.reason if state is S.FAILED else None, m.instances)]
    assert not any(isinstance(a, StartStep) for a in out)
    assert (m.state, m.instances, m.reason) == before


def _machine_in(state: SliceState, timeouts: LifecycleTimeouts | None = None) -> SliceLifecycle:
    m = SliceLifecycle(A, timeouts)
    seq = step_of(m.handle(Observed(v("LOAD", [0]), 0.0))).seq
    if state is S.FAILED:
        m.handle(StepFailed(seq, "boom", 1.0))
        return m
    m.handle(StepSucceeded(seq, 1.0))
    if state is S.LOADED:
        return m
    seq = step_of(m.handle(Observed(v("ACTIVATE", [0]), 1.0))).seq
    m.handle(StepSucceeded(seq, 1.0))
    assert state is S.ACTIVE
    return m


def test_unknown_state_is_rejected() -> None:
    m = _machine_in(S.LOADED)
    out = m.handle(Observed(v("EXPLODE"), 2.0))
    assert isinstance(out[0], Reject) and "unknown state" in out[0].message
    assert m.state is S.LOADED


def test_activate_timeout_fails_with_reason_and_aborts_the_step() -> None:
    m = SliceLifecycle(A, LifecycleTimeouts(activate=10))
    seq = step_of(m.handle(Observed(v("LOAD", [0]), 0.0))).seq
    m.handle(StepSucceeded(seq, 1.0))
    act = step_of(m.handle(Observed(v("ACTIVATE", [0]), 100.0)))
    assert m.handle(Tick(109.9)) == []
    out = m.handle(Tick(110.0))
    assert out[0] == AbortStep(Step.ACTIVATE, act.seq, "activate timed out after 10.0s")
    assert writes(out) == [(S.FAILED, "activate timed out after 10.0s", (0,))]
    assert m.state is S.FAILED and not m.busy
    # the late result of the aborted step is ignored
    assert m.handle(StepSucceeded(act.seq, 111.0)) == []
    assert m.state is S.FAILED
    # FAILED -> UNLOAD is legal
    out = m.handle(Observed(v("UNLOAD", [0], "activate timed out after 10.0s"), 112.0))
    assert writes(out) == [(S.UNLOADING, None, (0,))]


@pytest.mark.parametrize(("step", "limit"), [("load", 60.0), ("deactivate", 10.0)])
def test_other_step_timeouts(step: str, limit: float) -> None:
    if step == "load":
        m = SliceLifecycle(A)
        m.handle(Observed(v("LOAD", [0]), 0.0))
        start = 0.0
    else:
        m = _machine_in(S.ACTIVE)
        start = 5.0
        m.handle(Observed(v("DEACTIVATE", [0]), start))
    out = m.handle(Tick(start + limit))
    assert writes(out) == [(S.FAILED, f"{step} timed out after {limit:.1f}s", (0,))]


def test_unload_cannot_fail_key_removed_anyway() -> None:
    m = _machine_in(S.LOADED)
    seq = step_of(m.handle(Observed(v("UNLOAD", [0]), 2.0))).seq
    out = m.handle(StepFailed(seq, "disk on fire", 3.0))
    assert isinstance(out[0], Note) and "disk on fire" in out[0].message
    assert isinstance(out[-1], RemoveKey) and m.state is None
    m2 = _machine_in(S.LOADED)
    m2.handle(Observed(v("UNLOAD", [0]), 2.0))
    out = m2.handle(Tick(12.0))
    assert isinstance(out[0], AbortStep) and isinstance(out[-1], RemoveKey)


def test_failures_of_each_step_go_to_failed_with_reason() -> None:
    m = SliceLifecycle(A)
    seq = step_of(m.handle(Observed(v("LOAD", [3]), 0.0))).seq
    out = m.handle(StepFailed(seq, "no such wheel", 1.0))
    assert writes(out) == [(S.FAILED, "load failed: no such wheel", (3,))]
    m = _machine_in(S.LOADED)
    seq = step_of(m.handle(Observed(v("ACTIVATE", [0]), 2.0))).seq
    out = m.handle(StepFailed(seq, "start() raised ValueError: nope", 3.0))
    assert writes(out) == [(S.FAILED, "activate failed: start() raised ValueError: nope", (0,))]


def test_scale_change_by_rewritten_active_and_by_activate() -> None:
    m = _machine_in(S.ACTIVE)
    assert m.handle(Observed(v("ACTIVE", [0]), 2.0)) == []  # echo
    out = m.handle(Observed(v("ACTIVE", [0, 4]), 3.0))
    s = step_of(out)
    assert s.step is Step.SCALE and s.instances == (0, 4) and writes(out) == []
    # a second scale while one runs is rejected (no restate: the step's write-back follows)
    out2 = m.handle(Observed(v("ACTIVE", [0, 4, 5]), 3.5))
    assert [type(a) for a in out2] == [Reject]
    out = m.handle(StepSucceeded(s.seq, 4.0))
    assert writes(out) == [(S.ACTIVE, None, (0, 4))] and m.instances == (0, 4)
    # ACTIVATE with the same instances while ACTIVE: acknowledged
    assert writes(m.handle(Observed(v("ACTIVATE", [0, 4]), 5.0))) == [(S.ACTIVE, None, (0, 4))]
    # ACTIVATE with other instances while ACTIVE: a scale change too
    assert step_of(m.handle(Observed(v("ACTIVATE", [1]), 6.0))).step is Step.SCALE


def test_scale_failure_goes_to_failed() -> None:
    m = _machine_in(S.ACTIVE)
    s = step_of(m.handle(Observed(v("ACTIVE", [0, 1]), 3.0)))
    out = m.handle(StepFailed(s.seq, "no memory", 4.0))
    assert writes(out) == [(S.FAILED, "scale failed: no memory", (0,))]


def test_duplicate_commands_are_no_ops_or_acks() -> None:
    m = SliceLifecycle(A)
    seq = step_of(m.handle(Observed(v("LOAD", [0]), 0.0))).seq
    assert m.handle(Observed(v("LOAD", [0, 1]), 0.5)) == []  # in progress; instances updated
    assert writes(m.handle(StepSucceeded(seq, 1.0))) == [(S.LOADED, None, (0, 1))]
    assert writes(m.handle(Observed(v("LOAD", [0, 1]), 2.0))) == [(S.LOADED, None, (0, 1))]


def test_epoch_marks_writes_superseded_by_newer_commands() -> None:
    m = SliceLifecycle(A)
    out = m.handle(Observed(v("LOAD", [0]), 0.0))
    (w,) = [a for a in out if isinstance(a, WriteState)]
    assert w.epoch == m.epoch
    m.handle(Observed(v("LOAD", [0, 1]), 0.1))  # a newer command: the queued LOADING is stale
    assert w.epoch != m.epoch


def test_commands_with_nothing_loaded() -> None:
    m = SliceLifecycle(A)
    assert [type(a) for a in m.handle(Observed(v("UNLOAD", [0]), 0.0))] == [RemoveKey]
    m = SliceLifecycle(A)
    out = m.handle(Observed(v("ACTIVATE", [0]), 0.0))
    assert isinstance(out[0], Reject) and "not loaded" in out[0].message
    assert isinstance(out[1], RemoveKey)  # the truth: nothing here
    m = SliceLifecycle(A)
    assert m.handle(Observed(v("FAILED", [0], "old"), 0.0)) == []
    assert m.state is S.FAILED and m.reason == "old"


@pytest.mark.parametrize("state", ["LOAD", "LOADING", "LOADED", "ACTIVATE", "ACTIVATING", "ACTIVE"])
def test_recover_after_restart_loads_again(state: str) -> None:
    m = SliceLifecycle(A)
    out = m.recover(v(state, [2, 5]), 0.0)
    assert isinstance(out[0], Note)
    assert writes(out) == [(S.LOADING, None, (2, 5))]
    s = step_of(out)
    assert s.step is Step.LOAD
    assert writes(m.handle(StepSucceeded(s.seq, 1.0))) == [(S.LOADED, None, (2, 5))]


@pytest.mark.parametrize("state", ["DEACTIVATE", "DEACTIVATING", "UNLOAD", "UNLOADING"])
def test_recover_removes_keys_of_slices_on_their_way_out(state: str) -> None:
    m = SliceLifecycle(A)
    out = m.recover(v(state, [1]), 0.0)
    assert isinstance(out[-1], RemoveKey)


def test_recover_keeps_failed() -> None:
    m = SliceLifecycle(A)
    assert m.recover(v("FAILED", [1], "boom"), 0.0) == []
    assert m.state is S.FAILED
    assert step_of(m.handle(Observed(v("UNLOAD", [1]), 1.0))).step is Step.UNLOAD


def test_key_removed_by_someone_else_tears_down_silently() -> None:
    m = _machine_in(S.ACTIVE)
    out = m.handle(Observed(None, 2.0))
    assert isinstance(out[0], Note)
    s = step_of(out)
    assert s.step is Step.DEACTIVATE and writes(out) == []
    # a LOAD for the re-created key while tearing down is deferred
    out = m.handle(Observed(v("LOAD", [7]), 2.5))
    assert [type(a) for a in out] == [Note]
    out = m.handle(StepSucceeded(s.seq, 3.0))
    u = step_of(out)
    assert u.step is Step.UNLOAD and writes(out) == []
    out = m.handle(StepSucceeded(u.seq, 4.0))
    # teardown done: the deferred LOAD is carried out now
    assert writes(out) == [(S.LOADING, None, (7,))] and step_of(out).step is Step.LOAD


def test_key_removed_while_loading_unloads_after_the_load() -> None:
    m = SliceLifecycle(A)
    seq = step_of(m.handle(Observed(v("LOAD", [0]), 0.0))).seq
    m.handle(Observed(None, 0.5))
    out = m.handle(StepSucceeded(seq, 1.0))
    u = step_of(out)
    assert u.step is Step.UNLOAD and writes(out) == []
    assert m.handle(StepSucceeded(u.seq, 2.0)) == []
    assert m.finished


# -- configuration changes -------------------------------------------------------------------------


def _active_with_config(fp: str, instances: list[int]) -> SliceLifecycle:
    m = SliceLifecycle(A)
    assert m.handle(ConfigChanged(fp, 0.0)) == []  # nothing here yet: only remembered
    seq = step_of(m.handle(Observed(v("LOAD", instances), 0.0))).seq
    m.handle(StepSucceeded(seq, 1.0))
    seq = step_of(m.handle(Observed(v("ACTIVATE", instances), 1.0))).seq
    assert m.handle(ConfigChanged(fp, 1.5)) == []  # activating: the instances start with fp anyway
    m.handle(StepSucceeded(seq, 2.0))
    assert m.config == fp and m.state is S.ACTIVE
    return m


def test_a_config_change_reconfigures_active_instances_in_one_step() -> None:
    m = _active_with_config("c1", [2, 0, 1])
    assert m.handle(ConfigChanged("c1", 3.0)) == []  # unchanged: nothing to do
    out = m.handle(ConfigChanged("c2", 3.0))
    s = step_of(out)
    assert s.step is Step.RECONFIGURE and s.instances == (0, 1, 2) and writes(out) == []  # in id order
    assert s.deadline == 3.0 + 3 * (10.0 + 10.0)  # activate + deactivate deadlines per instance
    assert m.state is S.ACTIVE and m.busy and m.config == "c1"
    # another change meanwhile is remembered, handled when this step ends
    assert m.handle(ConfigChanged("c3", 3.5)) == []
    out = m.handle(StepSucceeded(s.seq, 4.0))
    assert writes(out) == [(S.ACTIVE, None, (2, 0, 1))] and m.config == "c2"
    again = step_of(out)
    assert again.step is Step.RECONFIGURE
    out = m.handle(StepSucceeded(again.seq, 5.0))
    assert m.config == "c3" and not m.busy and writes(out) == [(S.ACTIVE, None, (2, 0, 1))]


def test_a_config_change_waits_for_a_running_step() -> None:
    m = _active_with_config("c1", [0])
    scale = step_of(m.handle(Observed(v("ACTIVE", [0, 1]), 3.0)))
    assert m.handle(ConfigChanged("c2", 3.1)) == []
    out = m.handle(StepSucceeded(scale.seq, 4.0))
    assert writes(out) == [(S.ACTIVE, None, (0, 1))]
    assert step_of(out).step is Step.RECONFIGURE and step_of(out).instances == (0, 1)


def test_a_failed_or_timed_out_reconfigure_keeps_the_slice_active_with_a_reason() -> None:
    m = _active_with_config("c1", [0])
    s = step_of(m.handle(ConfigChanged("c2", 3.0)))
    out = m.handle(StepFailed(s.seq, "the config does not fit Settings: ...", 4.0))
    reason = ("config change not applied: reconfigure failed: the config does not fit Settings: ...; "
              "the instances serve with their previous config")
    assert writes(out) == [(S.ACTIVE, reason, (0,))] and not m.busy
    assert m.config == "c1" and m.state is S.ACTIVE
    assert m.handle(ConfigChanged("c2", 5.0)) == []  # the same broken config is not tried again
    echo(m, out)
    # a command arriving meanwhile and refused restates ACTIVE with the reason
    out = m.handle(Observed(v("LOAD", [0]), 5.5))
    assert writes(out) == [(S.ACTIVE, reason, (0,))]
    # back to the config the instances run: the reason goes, nothing restarts
    out = m.handle(ConfigChanged("c1", 5.7))
    assert out == [WriteState(S.ACTIVE, None, (0,), m.epoch)]
    assert m.handle(ConfigChanged("c2", 5.8)) != []  # c2 may be tried again after that
    m = _active_with_config("c1", [0])
    s = step_of(m.handle(ConfigChanged("c2", 3.0)))
    m.handle(StepFailed(s.seq, "bad", 4.0))
    # the next config is tried; its success clears the reason
    s = step_of(m.handle(ConfigChanged("c3", 6.0)))
    out = m.handle(StepSucceeded(s.seq, 7.0))
    assert writes(out) == [(S.ACTIVE, None, (0,))] and m.config == "c3"
    # a timeout too
    m = _active_with_config("c1", [0, 1])
    s = step_of(m.handle(ConfigChanged("c2", 3.0)))
    assert m.handle(Tick(3.0 + 39.0)) == []
    out = m.handle(Tick(3.0 + 40.0))
    assert isinstance(out[0], AbortStep)
    assert writes(out) == [(S.ACTIVE, "config change not applied: reconfigure timed out after 40.0s; the "
                            "instances serve with their previous config", (0, 1))]
    # a quarantine still takes it down
    out = m.handle(Quarantine("blocked", 50.0))
    assert step_of(out).step is Step.DEACTIVATE


def test_commands_during_a_reconfigure_are_rejected_then_restated() -> None:
    m = _active_with_config("c1", [0])
    s = step_of(m.handle(ConfigChanged("c2", 3.0)))
    out = m.handle(Observed(v("DEACTIVATE"), 3.1))
    assert [type(a) for a in out] == [Reject] and "ACTIVE (reconfiguring)" in out[0].message  # type: ignore[attr-defined]
    out = m.handle(StepSucceeded(s.seq, 4.0))
    assert writes(out) == [(S.ACTIVE, None, (0,))]  # the truth: the leader re-issues DEACTIVATE


def test_no_reconfigure_when_not_active() -> None:
    m = _machine_in(S.LOADED)
    assert m.handle(ConfigChanged("c2", 3.0)) == []
    m = _machine_in(S.FAILED)
    assert m.handle(ConfigChanged("c2", 3.0)) == []


# --- endpoints removed by someone else --------------------------------------------------------------


def _active(ids: list[int]) -> SliceLifecycle:
    m = SliceLifecycle(A)
    m.handle(StepSucceeded(step_of(m.handle(Observed(v("LOAD", ids), 0.0))).seq, 1.0))
    m.handle(StepSucceeded(step_of(m.handle(Observed(v("ACTIVATE", ids), 1.0))).seq, 2.0))
    assert m.state is S.ACTIVE and not m.busy
    return m


def test_endpoints_of_a_running_instance_removed_by_others_are_published_again() -> None:
    """The interleaving of a real-process run (leader killed and restarted, two leaders for a
    moment): node-1's key is removed while ACTIVE (a stale leader thought it dead), it tears down;
    the new leader's LOAD arrives during the teardown and is carried out after it, then ACTIVATE;
    node-1 runs instance 2. Then its endpoints of 2 disappear (another node that briefly ran a
    duplicate 2 withdrew them): nothing else would publish them again, the key says ACTIVE."""
    m = _active([2])
    teardown = m.handle(Observed(None, 3.0))
    d = step_of(teardown)
    assert d.step is Step.DEACTIVATE and writes(teardown) == []
    assert m.serving == () and m.handle(EndpointsLost(2, 3.05)) == []  # its own teardown: not republished
    assert [type(a) for a in m.handle(Observed(v("LOAD", [2]), 3.1))] == [Note]  # deferred
    u = step_of(m.handle(StepSucceeded(d.seq, 3.2)))
    out = m.handle(StepSucceeded(u.seq, 3.3))
    assert writes(out) == [(S.LOADING, None, (2,))]
    m.handle(StepSucceeded(step_of(out).seq, 3.4))
    act = step_of(m.handle(Observed(v("ACTIVATE", [2]), 3.5)))
    assert m.serving == (2,)  # starting: its endpoints are about to be its own
    assert writes(m.handle(StepSucceeded(act.seq, 3.6))) == [(S.ACTIVE, None, (2,))]

    assert m.handle(EndpointsLost(0, 4.0)) == []  # not an instance of this node
    out = m.handle(EndpointsLost(2, 4.0))
    assert isinstance(out[0], Note) and "publishing" in out[0].message
    r = step_of(out)
    assert r.step is Step.REPUBLISH and r.instances == (2,) and r.deadline == 4.0 + 10.0
    assert writes(out) == [] and m.state is S.ACTIVE and m.busy
    assert m.handle(EndpointsLost(2, 4.1)) == []  # the second entry's endpoint: after this step
    out = m.handle(StepSucceeded(r.seq, 4.2))
    assert writes(out) == [(S.ACTIVE, None, (2,))] and step_of(out).step is Step.REPUBLISH
    out = m.handle(StepSucceeded(step_of(out).seq, 4.3))
    assert writes(out) == [(S.ACTIVE, None, (2,))] and not m.busy


def test_own_endpoint_removals_are_not_republished() -> None:
    # scale-down: the dropped ids' endpoints are this node's own removals
    m = _active([0, 1])
    s = step_of(m.handle(Observed(v("ACTIVE", [1, 2]), 3.0)))
    assert m.serving == (1, 2)
    assert m.handle(EndpointsLost(0, 3.1)) == []
    assert [a for a in m.handle(StepSucceeded(s.seq, 3.2)) if isinstance(a, StartStep)] == []
    # deactivation
    m = _active([0])
    d = step_of(m.handle(Observed(v("DEACTIVATE", [0]), 3.0)))
    assert m.handle(EndpointsLost(0, 3.1)) == []
    assert writes(m.handle(StepSucceeded(d.seq, 3.2))) == [(S.LOADED, None, (0,))]
    assert m.handle(EndpointsLost(0, 3.3)) == []
    # the cleanup after a failed scale removes the endpoints before the failure is reported
    m = _active([0])
    s = step_of(m.handle(Observed(v("ACTIVE", [0, 1]), 3.0)))
    assert m.handle(EndpointsLost(0, 3.1)) == []  # remembered while the step runs...
    out = m.handle(StepFailed(s.seq, "no memory", 3.2))
    assert writes(out) == [(S.FAILED, "scale failed: no memory", (0,))]
    assert [a for a in out if isinstance(a, StartStep)] == []  # ...and dropped: FAILED serves nothing
    # a quarantine
    m = _active([0])
    q = step_of(m.handle(Quarantine("blocked", 3.0)))
    assert m.handle(EndpointsLost(0, 3.1)) == []
    m.handle(StepSucceeded(q.seq, 3.2))
    assert m.state is S.FAILED and m.handle(EndpointsLost(0, 3.3)) == []


def test_endpoints_lost_during_a_step_are_republished_when_it_ends() -> None:
    m = _active([0])
    s = step_of(m.handle(Observed(v("ACTIVE", [0, 1]), 3.0)))
    assert m.handle(EndpointsLost(0, 3.1)) == []  # kept by the scale: republished after it
    out = m.handle(StepSucceeded(s.seq, 3.2))
    assert writes(out) == [(S.ACTIVE, None, (0, 1))]
    r = step_of(out)
    assert r.step is Step.REPUBLISH and r.instances == (0, 1)


def test_a_failed_republish_keeps_the_slice_active_and_commands_meanwhile_are_restated() -> None:
    m = _active([0])
    r = step_of(m.handle(EndpointsLost(0, 3.0)))
    out = m.handle(Observed(v("DEACTIVATE", [0]), 3.1))
    assert [type(a) for a in out] == [Reject] and "publishing endpoints again" in out[0].message  # type: ignore[attr-defined]
    out = m.handle(StepFailed(r.seq, "quorum lost", 3.2))
    assert writes(out) == [(S.ACTIVE, None, (0,))] and m.state is S.ACTIVE  # the truth: DEACTIVATE again
    assert any(isinstance(a, Note) and "keep running" in a.message for a in out)
    assert step_of(m.handle(Observed(v("DEACTIVATE", [0]), 3.3))).step is Step.DEACTIVATE
    # a timeout too
    m = _active([0])
    r = step_of(m.handle(EndpointsLost(0, 3.0)))
    out = m.handle(Tick(13.0))
    assert isinstance(out[0], AbortStep) and writes(out) == [(S.ACTIVE, None, (0,))]
