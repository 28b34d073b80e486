"""The sans-IO controller driven with synthetic load sequences (tests/controller_model.py): a step,
a ramp, a spike, a diurnal curve, noisy flat load, a crashing instance, a lost node, missing
metrics; bounds, cooldowns, dry-run, a change of leader, stuck keys, saturated nodes, alerts."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from aether.controller.alerts import series_key
from aether.controller.config import ControllerConfig, parse_config
from aether.controller.core import Controller, wanted_by_target
from aether.controller.types import ControllerMemory, KeyObs, NodeObs, Observation, SliceObs
from aether.core.errors import BadRequest
from aether.kv.keys import ScalingRule
from aether.metrics.messages import (
    ClusterMetricsSnapshot,
    ClusterTotals,
    EntryStats,
    InstanceStats,
    NodeStats,
    SliceLoad,
)
from controller_model import ART, SliceModel, direction_changes, run, scalings, step_rate

T0 = 1_000_000.0


def test_step_up_reacts_at_once_and_scales_down_once_after_the_drop() -> None:
    m = SliceModel(rate=step_rate(T0, 40, 400, up_at=30, down_at=120), max_queue=1000)
    _, ds = run(m, 240)
    ups = [d for d in scalings(ds) if d.kind == "scale_up"]
    downs = [d for d in scalings(ds) if d.kind == "scale_down"]
    assert len(ups) == 1 and len(downs) == 1, [(d.kind, d.to_count, d.reason) for d in scalings(ds)]
    up = ups[0]
    assert up.rule == "panic"
    assert up.time - (T0 + 30) <= 2.0  # the first sample of the surge and its confirmation
    assert up.to_count == math.ceil(400 * 0.05 / 6)  # Little's law: 20 calls in flight / 6 per instance
    assert downs[0].to_count == 1 and downs[0].time > T0 + 120
    # capacity was enough after the instances started: the backlog drained, nothing was refused
    assert m.rejected_total == 0
    assert all(q == 0 for t, *_, q in m.history if T0 + 40 <= t < T0 + 120)
    assert direction_changes(ds) == 2


def test_ramp_only_scales_up_while_it_rises() -> None:
    m = SliceModel(rate=lambda t: 40 + max(0.0, min(1.0, (t - T0 - 10) / 120)) * 560)
    _, ds = run(m, 200)
    assert scalings(ds) and all(d.kind == "scale_up" for d in scalings(ds))
    assert m.desired >= math.ceil(600 * 0.05 / 6)
    assert direction_changes(ds) == 1


def test_a_short_spike_scales_up_once_and_back_down_once() -> None:
    m = SliceModel(rate=lambda t: 1200 if T0 + 20 <= t < T0 + 22 else 40)
    _, ds = run(m, 150)
    assert direction_changes(ds) <= 2
    assert m.desired == 1


def test_a_single_noisy_sample_is_not_a_surge() -> None:
    # one sample at 3x, with capacity to spare (no queue): the panic path wants confirmation
    m = SliceModel(rate=lambda t: 600 if t == T0 + 20 else 40, max_concurrency=64)
    _, ds = run(m, 60)
    assert not [d for d in scalings(ds) if d.rule == "panic"]


def test_noisy_flat_load_does_not_flap() -> None:
    rnd = random.Random(7)
    m = SliceModel(rate=lambda t: 200 * (1 + rnd.uniform(-0.15, 0.15)))
    _, ds = run(m, 600)
    # settles once (1 -> 2: 200 rps x 50 ms = 10 in flight, 6 per instance), then holds
    assert len(scalings(ds)) == 1 and m.desired == 2, [(d.kind, d.to_count) for d in scalings(ds)]


def test_diurnal_curve_follows_the_load_without_flapping() -> None:
    period = 600.0
    m = SliceModel(rate=lambda t: 220 + 180 * math.sin(2 * math.pi * (t - T0) / period))
    _, ds = run(m, int(period * 2))
    # it tracks: the count rises and falls with the load, turning about twice per period
    assert 2 <= direction_changes(ds) <= 5, [(d.time - T0, d.kind, d.to_count) for d in scalings(ds)]
    # and serves it: little or nothing refused
    assert m.rejected_total <= 0.01 * m.served_total


def test_missing_metrics_hold_the_count_and_say_so_once() -> None:
    m = SliceModel(rate=lambda t: 400)
    c = Controller(ControllerConfig())
    ds = []
    for _ in range(5):
        ds += c.step(m.tick(metrics_age=None))
    for _ in range(5):
        ds += c.step(m.tick(metrics_age=30.0))
    assert not scalings(ds)
    skips = [d for d in ds if d.kind == "skip"]
    assert len(skips) == 1 and skips[0].rule == "missing_metrics" and not skips[0].applied
    ds = []
    for _ in range(3):
        d = c.step(m.tick())
        m.apply(d)
        ds += d
    assert [d.kind for d in scalings(ds)] == ["scale_up"]


def test_a_lost_node_does_not_make_it_scale() -> None:
    # half the instances vanish (their node died): the reconciler re-places them; the load per
    # instance is computed from arrivals and execution time, so the controller wants no more
    m = SliceModel(rate=lambda t: 300, desired=3, active=3)
    c, ds = run(m, 40)
    assert not scalings(ds)
    m.active = 1
    m.starting = [m.t + 3, m.t + 3]
    _, ds = run(m, 20, controller=c)
    assert not scalings(ds)


def test_bounds_cooldowns_and_the_maximum() -> None:
    rule = ScalingRule(min=2, max=3, in_flight=6.0)
    m = SliceModel(rate=lambda t: 2000, rule=rule, desired=1)
    _, ds = run(m, 30)
    first = scalings(ds)[0]
    assert first.rule == "bounds" and first.to_count == 2  # below min: moved at once
    assert m.desired == 3
    held = [d for d in ds if d.kind == "skip" and d.rule == "bounds"]
    assert len(held) == 1 and "maximum 3" in held[0].reason


def test_operator_bounds_win() -> None:
    m = SliceModel(rate=lambda t: 40, desired=5, active=5)
    c = Controller(ControllerConfig())
    obs = m.tick()
    s = obs.slices[0]
    pinned = msgspec.structs.replace(s, min=4, max=4, bounds_source="operator")
    ds = c.step(msgspec.structs.replace(obs, slices=[pinned]))
    assert [(d.kind, d.to_count, d.rule) for d in ds] == [("scale_down", 4, "bounds")]
    assert "(operator)" in ds[0].reason


def test_scale_down_waits_for_the_stabilization_window() -> None:
    cfg = parse_config("[scaling]\nscale_down_stabilization = 40\nscale_down_cooldown = 0")
    m = SliceModel(rate=lambda t: 400 if t < T0 + 60 else 40, desired=4, active=4)
    _, ds = run(m, 150, cfg)
    down = [d for d in scalings(ds) if d.kind == "scale_down"]
    # the last second of high load was T0 + 59: no recommendation of the window still wants 4
    assert len(down) == 1 and down[0].time - (T0 + 59) >= 40


def test_dry_run_records_without_applying() -> None:
    cfg = parse_config("dry_run = true")
    m = SliceModel(rate=step_rate(T0, 40, 400, 5, 1000))
    _, ds = run(m, 30, cfg)
    ups = [d for d in ds if d.kind == "scale_up"]
    assert len(ups) == 1 and not ups[0].applied and "dry run" in ups[0].reason
    assert m.desired == 1


def test_a_new_leader_continues_the_cooldowns_it_inherits() -> None:
    cfg = parse_config("[scaling]\nscale_down_cooldown = 60\nscale_down_stabilization = 5")
    m = SliceModel(rate=step_rate(T0, 40, 400, 5, 20))
    c, ds = run(m, 30, cfg)
    assert [d.kind for d in scalings(ds)] == ["scale_up"]
    inherited = msgspec.msgpack.decode(msgspec.msgpack.encode(c.memory), type=ControllerMemory)
    heir = Controller(cfg, inherited)
    _, ds2 = run(m, 20, controller=heir)
    assert not scalings(ds2)  # still within the inherited cooldown (the scale-up was < 60 s ago)
    fresh = SliceModel(rate=lambda t: 40, desired=m.desired, active=m.active, t=m.t)
    _, ds3 = run(fresh, 10, cfg)
    assert [d.kind for d in scalings(ds3)] == ["scale_down"]  # a forgetful controller would not wait
    assert heir.memory.seq > c.memory.seq - 1  # decision numbers continue


def _inst(node: str, i: int, calls: int, failures: int, **kw: object) -> InstanceStats:
    return InstanceStats(node, ART, i, 0, 0, 0.0, 0.0, 0.0, 0.0, None, calls, failures, **kw)  # type: ignore[arg-type]


def _health_obs(t: float, insts: list[InstanceStats], placement: dict[str, list[int]]) -> Observation:
    s = SliceObs(ART, 3, None, 3, 3, "blueprint", placement, 3, None, insts)
    return Observation(t, 1.0, [NodeObs(n, True, 1.0) for n in placement], [s])


def test_a_crashing_instance_is_replaced_once_per_cooldown() -> None:
    c = Controller(ControllerConfig())
    placement = {"a": [0], "b": [1], "c": [2]}
    replaced = []
    for k in range(60):
        insts = [_inst("a", 0, 10 * k, 0), _inst("b", 1, 10 * k, 8 * k), _inst("c", 2, 10 * k, 0)]
        replaced += [d for d in c.step(_health_obs(T0 + k, insts, placement)) if d.kind == "replace"]
    assert len(replaced) == 2  # at once, and again after the 30 s replace cooldown
    d = replaced[0]
    assert (d.node, d.instance, d.rule) == ("b", 1, "error_rate") and d.time - T0 <= 3
    assert "80%" in d.reason and d.inputs["peers_median"] == 0.0


def test_uniform_errors_are_not_blamed_on_one_instance() -> None:
    c = Controller(ControllerConfig())
    placement = {"a": [0], "b": [1], "c": [2]}
    for k in range(40):
        insts = [_inst(n, i, 10 * k, 5 * k) for n, i in (("a", 0), ("b", 1), ("c", 2))]
        assert not [d for d in c.step(_health_obs(T0 + k, insts, placement)) if d.kind == "replace"]


def test_failing_health_checks_replace_the_instance() -> None:
    c = Controller(ControllerConfig())
    placement = {"a": [0], "b": [1], "c": [2]}
    ok = [_inst("a", 0, 0, 0, healthy=True), _inst("c", 2, 0, 0, healthy=True)]
    for n in (1, 2):
        bad = _inst("b", 1, 0, 0, healthy=False, health_failures=n, health_reason="db unreachable")
        assert not [d for d in c.step(_health_obs(T0 + n, [*ok, bad], placement)) if d.kind == "replace"]
    bad = _inst("b", 1, 0, 0, healthy=False, health_failures=3, health_reason="db unreachable")
    ds = [d for d in c.step(_health_obs(T0 + 3, [*ok, bad], placement)) if d.kind == "replace"]
    assert len(ds) == 1 and ds[0].rule == "health" and "db unreachable" in ds[0].reason


def test_a_stuck_key_is_recovered_once() -> None:
    c = Controller(parse_config("[health]\ntransition_timeout = 60"))
    key = KeyObs("b", ART, "ACTIVATING", T0, [1])
    kinds = []
    for k in (10, 59, 61, 62, 63):
        kinds += [d.kind for d in c.step(Observation(T0 + k, 1.0, keys=[key]))]
    assert kinds == ["recover"]
    assert not c.step(Observation(T0 + 64, 1.0, keys=[KeyObs("b", ART, "ACTIVE", T0, [1])]))


def test_a_node_with_a_saturated_loop_gets_no_new_instances_until_it_recovers() -> None:
    c = Controller(parse_config("[health]\nloop_lag_ms = 200\nloop_lag_for = 5"))
    ds = []
    for k in range(10):
        ds += c.step(Observation(T0 + k, 1.0, [NodeObs("a", True, 900.0), NodeObs("b", True, 3.0)]))
    assert [(d.kind, d.node, d.time - T0) for d in ds] == [("avoid_node", "a", 5.0)]
    assert c.avoided == {"a"}
    ds = c.step(Observation(T0 + 11, 1.0, [NodeObs("a", True, 20.0), NodeObs("b", True, 3.0)]))
    assert [(d.kind, d.node) for d in ds] == [("allow_node", "a")] and not c.avoided


def _snap(p99: float | None) -> ClusterMetricsSnapshot:
    entries = [] if p99 is None else [EntryStats(
        ART, "work", 100, 100, 0, 10.0, 0.0, 5.0, 5.0, 5.0, p99, 0, 0, ["a"])]  # fmt: skip
    totals = ClusterTotals(100, 100, 0, 10.0, 0.0, 0, 1, 1.0, 1)
    nodes = [NodeStats("a", 1.0, 1, 1.0, 0.0, 100, 10.0)]
    return ClusterMetricsSnapshot("a", 1, T0, nodes, entries, totals, [])


def test_alerts_fire_after_their_for_duration_and_resolve() -> None:
    cfg = parse_config(
        '[[alerts]]\nname = "slow"\nmetric = "entry.p99_ms"\nthreshold = 250\nfor = 10\n'
        'match = { artifact = "org.example:work" }\nsummary = "work is slow"'
    )
    c = Controller(cfg)
    seen = []
    p99s: list[float | None] = [100, *[300] * 11, 100, 300, 300, None]
    for k, p99 in enumerate(p99s):
        ds = c.step(Observation(T0 + k, 1.0, snapshot=_snap(p99)))
        seen += [(d.kind, k) for d in ds]
        if k == 5:
            key = series_key("slow", {"artifact": ART, "entry": "work"})
            assert c.memory.alerts[key].state == "pending"
    assert seen == [("alert_firing", 11), ("alert_resolved", 12)]  # pending again at 13-14, then no data
    assert not c.memory.alerts


def test_wanted_by_target_combines_the_targets() -> None:
    load = SliceLoad(ART, 2, 16, 30, 300.0, 300.0, 0.0, 0.0, 50.0, 400.0, 90.0)
    rule = ScalingRule(min=1, max=10, in_flight=5.0, rate=100.0, p95_ms=200.0, cpu=60.0)
    w = wanted_by_target(SliceObs(ART, 2, rule, 1, 10, "blueprint", {}, 2, load))
    # in_flight: demand by Little's law (300/s x 50 ms = 15 calls), not the 16 running now
    assert w == pytest.approx({"in_flight": 15 / 5, "rate": 3.0, "p95_ms": 4.0, "cpu": 3.0})
    # no call finished in the interval (long calls): what runs and waits now is the demand
    long_calls = msgspec.structs.replace(load, exec_ms=None)
    w = wanted_by_target(SliceObs(ART, 2, rule, 1, 10, "blueprint", {}, 2, long_calls))
    assert w["in_flight"] == pytest.approx((16 + 30) / 5)


def test_a_step_inside_an_interval_is_followed_up_at_once_and_the_backlog_drain_asks_for_no_more() -> None:
    # the step lands in the middle of a metrics interval: its first sample shows half the surge
    def rate(t: float) -> float:
        return 40.0 if t < T0 + 30 else 300.0 if t < T0 + 31 else 400.0

    m = SliceModel(rate=rate, max_queue=1000)
    _, ds = run(m, 80)
    ups = [d for d in scalings(ds) if d.kind == "scale_up"]
    assert [(d.to_count, d.rule) for d in ups] == [(3, "panic"), (4, "panic")], [d.reason for d in ups]
    assert ups[1].time - ups[0].time == 1.0 and "during a surge" in ups[1].reason
    assert m.desired == 4  # while the new instances drain the backlog, every slot is busy: no more


def test_the_memory_a_leader_syncs_each_second_stays_small() -> None:
    c = Controller(ControllerConfig())
    m = SliceModel(rate=lambda t: 300, desired=4, active=4)
    nodes = [f"n{k}" for k in range(50)]
    for k in range(300):
        obs = m.tick()
        insts = [_inst(n, j, 10 * k, k // 10) for j, n in enumerate(nodes)]
        placement = {n: [j] for j, n in enumerate(nodes)}
        s = msgspec.structs.replace(obs.slices[0], instances=insts, placement=placement)
        c.step(msgspec.structs.replace(obs, slices=[s]))
    mem = c.memory.slices[ART]
    assert max(len(w) for w in mem.errors.values()) <= 7  # one sample per 5 s of the 30 s window
    assert len(mem.samples) <= 20 and len(mem.recommendations) <= 30
    assert len(msgspec.msgpack.encode(c.memory)) < 16_000


def test_a_drop_inside_an_interval_scales_down_in_one_step() -> None:
    # the second the load dropped in shows half the old load: it asks for 2 of the 4 instances
    def rate(t: float) -> float:
        return 400.0 if t < T0 + 60 else 200.0 if t < T0 + 61 else 40.0

    m = SliceModel(rate=rate, desired=4, active=4, max_queue=1000)
    _, ds = run(m, 150)
    downs = [(d.to_count, d.time - T0) for d in scalings(ds) if d.kind == "scale_down"]
    assert len(downs) == 1 and downs[0][0] == 1, downs
    assert 90 <= downs[0][1] <= 92  # the stabilization window (30 s) after the last high second


def test_a_short_stabilization_window_does_not_scale_up_again_on_the_memory_of_a_drop() -> None:
    # stabilization (10 s) shorter than the averaging window (20 s): after the scale-down the
    # mean still holds high seconds; the latest second wants nothing more, so nothing happens
    cfg = parse_config("[scaling]\nscale_down_stabilization = 10\nscale_down_cooldown = 5")
    m = SliceModel(rate=step_rate(T0, 40, 400, 10, 30), max_queue=1000)
    _, ds = run(m, 120, cfg)
    assert [d.kind for d in scalings(ds)] == ["scale_up", "scale_down"], [
        (d.time - T0, d.kind, d.to_count, d.rule) for d in scalings(ds)
    ]


def _float_keys_of_controller_config() -> list[tuple[str, str]]:
    """(TOML text with a VALUE placeholder, dotted key) for every float of the controller config,
    found from its Structs: a float added later is covered."""
    from aether.controller.config import AlertRule, HealthConfig, ScalingConfig, Webhook

    def floats(cls: type) -> list[str]:
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        return [f.encode_name for f in info.fields if isinstance(f.type, msgspec.inspect.FloatType)]

    out = [(f"[scaling]\n{k} = {{value}}", f"scaling.{k}") for k in floats(ScalingConfig)]
    out += [(f"[health]\n{k} = {{value}}", f"health.{k}") for k in floats(HealthConfig)]
    alert = '[[alerts]]\nname = "a"\nmetric = "cluster.nodes"\n'
    for k in floats(AlertRule):
        rest = "" if k == "threshold" else "threshold = 1.0\n"
        out.append((f"{alert}{rest}{k} = {{value}}", f"alerts[0].{k}"))
    out += [(f'[[webhooks]]\nurl = "http://127.0.0.1:9/h"\n{k} = {{value}}', f"webhooks[0].{k}")
            for k in floats(Webhook)]
    return out


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize(("text", "key"), _float_keys_of_controller_config())
def test_controller_config_refuses_inf_and_nan_naming_the_key(text: str, key: str, value: str) -> None:
    """inf passed every `gt=0` constraint (a `stable_window`, `transition_timeout` or webhook
    `timeout` that never ends) and an alert `threshold = nan` passed as any float, an alert that
    could never fire (every comparison with nan is false)."""
    with pytest.raises(BadRequest) as e:
        parse_config(text.format(value=value))
    assert str(e.value) == (
        f"controller config: {key} = {value} is not a finite number: inf, -inf and nan are not accepted"
    )


def test_controller_config_float_keys_cover_the_known_ones() -> None:
    keys = {k for _, k in _float_keys_of_controller_config()}
    assert {"scaling.panic_window", "health.transition_timeout", "alerts[0].threshold", "alerts[0].for",
            "webhooks[0].timeout"} <= keys
