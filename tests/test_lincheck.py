"""Tests for aether.testing.lincheck (linearizability checker for key-value register histories)."""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether.testing.lincheck import CheckResult, Op, check_history

F = TypeVar("F", bound=Callable[..., Any])


def _identity(fn: F) -> F:
    return fn


# pytest-timeout is a dev dependency, but it may be missing on a bare machine: only mark if present.
_timeout_60: Callable[[F], F] = (
    pytest.mark.timeout(60) if importlib.util.find_spec("pytest_timeout") is not None else _identity
)


# --------------------------------------------------------------------------------------------- helpers


def put(key: str, value: object, call: float, ret: float | None, client: int = 0) -> Op:
    return Op(client=client, kind="put", key=key, value=value, call=call, ret=ret)


def get(key: str, result: object, call: float, ret: float | None, client: int = 0) -> Op:
    return Op(client=client, kind="get", key=key, result=result, call=call, ret=ret)


def remove(key: str, call: float, ret: float | None, client: int = 0) -> Op:
    return Op(client=client, kind="remove", key=key, call=call, ret=ret)


def cas(
    key: str, expected: object, new: object, result: object, call: float, ret: float | None, client: int = 0
) -> Op:
    return Op(
        client=client, kind="cas", key=key, expected=expected, value=new, result=result, call=call, ret=ret
    )


def assert_ok(ops: Sequence[Op]) -> CheckResult:
    res = check_history(ops)
    assert res.ok, res.explanation
    assert res.key is None
    assert not res.timed_out
    return res


def assert_violation(ops: Sequence[Op], key: str = "k") -> CheckResult:
    res = check_history(ops)
    assert not res.ok, "expected a linearizability violation"
    assert not res.timed_out
    assert res.key == key
    return res


def brute_force_ok(ops: Sequence[Op]) -> bool:
    """Independent reference: exhaustive search over orders that respect real time, per key.

    Completed op ``a`` must precede ``b`` iff ``a.ret < b.call`` (touching intervals are concurrent).
    Indeterminate ops may be linearized anywhere after their call, or left out; their result is free.
    """
    keys: dict[str, list[Op]] = {}
    for op in ops:
        keys.setdefault(op.key, []).append(op)
    return all(_brute_force_key(tuple(k_ops)) for k_ops in keys.values())


def _brute_force_key(ops: tuple[Op, ...]) -> bool:
    n = len(ops)
    completed = frozenset(i for i, op in enumerate(ops) if op.ret is not None)

    @cache
    def search(done: frozenset[int], state: object) -> bool:
        if completed <= done:
            return True
        for i in range(n):
            if i in done:
                continue
            op = ops[i]
            if any(
                j not in done and ops[j].ret is not None and ops[j].ret < op.call  # type: ignore[operator]
                for j in range(n)
            ):
                continue
            indeterminate = op.ret is None
            if op.kind == "put":
                ok, new = True, op.value
            elif op.kind == "remove":
                ok, new = True, None
            elif op.kind == "get":
                ok, new = indeterminate or op.result == state, state
            else:
                success = state == op.expected
                ok = indeterminate or bool(op.result) == success
                new = op.value if success else state
            if ok and search(done | {i}, new):
                return True
        return False

    return search(frozenset(), None)


# ------------------------------------------------------------------------------------- accepted histories


def test_empty_history_is_linearizable() -> None:
    assert_ok([])


def test_sequential_history_accepted() -> None:
    assert_ok(
        [
            get("k", None, 0, 1),
            put("k", 1, 2, 3),
            get("k", 1, 4, 5),
            cas("k", 1, 2, True, 6, 7),
            cas("k", 1, 3, False, 8, 9),
            get("k", 2, 10, 11),
            remove("k", 12, 13),
            get("k", None, 14, 15),
            cas("k", None, 7, True, 16, 17),
            get("k", 7, 18, 19),
        ]
    )


def test_concurrent_overlapping_ops_accepted_when_some_order_exists() -> None:
    # The put overlaps both reads: linearize get->None, then put, then get->1.
    assert_ok([put("k", 1, 0, 10, client=1), get("k", None, 1, 2, client=2), get("k", 1, 3, 4, client=2)])
    # Two concurrent puts, reads agree on a single order (2 then 1).
    assert_ok(
        [
            put("k", 1, 0, 5, client=1),
            put("k", 2, 0, 5, client=2),
            get("k", 2, 1, 2, client=3),
            get("k", 1, 6, 7, client=3),
        ]
    )
    # Reads out of invocation order but consistent with the reverse order of overlapping writes.
    assert_ok(
        [
            put("k", "a", 0, 10, client=1),
            put("k", "b", 1, 10, client=2),
            get("k", "b", 2, 3, client=3),
            get("k", "a", 4, 12, client=4),
        ]
    )


def test_touching_intervals_are_concurrent() -> None:
    # put returns at 1 and get is called at 1: treated as concurrent, so both results are fine.
    assert_ok([put("k", 1, 0, 1), get("k", 1, 1, 2)])
    assert_ok([put("k", 1, 0, 1), get("k", None, 1, 2)])
    # ...but strictly after the return, the old value is gone.
    assert_violation([put("k", 1, 0, 1), get("k", None, 1.5, 2)])


def test_unhashable_values_are_compared_with_eq() -> None:
    assert_ok([put("k", [1, 2], 0, 1), get("k", [1, 2], 2, 3), cas("k", [1, 2], {"a": 1}, True, 4, 5)])
    assert_violation([put("k", [1, 2], 0, 1), get("k", [1, 3], 2, 3)])


def test_put_none_is_remove() -> None:
    assert_ok([put("k", 1, 0, 1), put("k", None, 2, 3), get("k", None, 4, 5), cas("k", None, 2, True, 6, 7)])


# ------------------------------------------------------------------------- classic violations rejected


def test_stale_read_after_completed_write_rejected() -> None:
    res = assert_violation([put("k", 1, 0, 1, client=1), get("k", None, 2, 3, client=2)])
    # The explanation names the op that could not be linearized, with its times.
    assert "get('k') -> None" in res.explanation
    assert "call=2" in res.explanation and "ret=3" in res.explanation


def test_read_of_value_never_written_rejected() -> None:
    assert_violation([put("k", 1, 0, 1), get("k", 42, 0.5, 3)])
    assert_violation([get("k", "ghost", 0, 1)])


def test_two_sequential_gets_new_then_old_rejected() -> None:
    assert_violation(
        [
            put("k", 1, 0, 1, client=1),
            put("k", 2, 2, 10, client=1),
            get("k", 2, 3, 4, client=2),
            get("k", 1, 5, 6, client=3),
        ]
    )


def test_concurrent_write_read_order_reversal_rejected() -> None:
    # get->1 returned before get->None was called, while the put is still running: impossible.
    assert_violation(
        [put("k", 1, 0, 10, client=1), get("k", 1, 1, 2, client=2), get("k", None, 3, 4, client=3)]
    )


def test_cas_success_with_impossible_expected_value_rejected() -> None:
    assert_violation([put("k", 1, 0, 1), cas("k", 2, 3, True, 2, 3)])
    # expected "absent" after a completed put
    assert_violation([put("k", 1, 0, 1), cas("k", None, 3, True, 2, 3)])


def test_cas_failure_when_value_was_expected_rejected() -> None:
    assert_violation([put("k", 1, 0, 1), cas("k", 1, 3, False, 2, 3)])


def test_two_cas_with_same_expected_both_succeeding_rejected() -> None:
    # sequential
    assert_violation(
        [put("k", 1, 0, 1), cas("k", 1, 2, True, 2, 3, client=1), cas("k", 1, 3, True, 4, 5, client=2)]
    )
    # concurrent: still only one of them can have seen 1
    assert_violation(
        [put("k", 1, 0, 1), cas("k", 1, 2, True, 2, 5, client=1), cas("k", 1, 3, True, 2, 5, client=2)]
    )
    # ...but one winner and one loser is fine
    assert_ok(
        [put("k", 1, 0, 1), cas("k", 1, 2, True, 2, 5, client=1), cas("k", 1, 3, False, 2, 5, client=2)]
    )


def test_read_of_value_whose_put_started_after_the_get_returned_rejected() -> None:
    assert_violation([get("k", 1, 0, 1, client=2), put("k", 1, 2, 3, client=1)])


def test_remove_then_stale_read_rejected() -> None:
    assert_violation([put("k", 1, 0, 1), remove("k", 2, 3), get("k", 1, 4, 5)])


# ------------------------------------------------------------------------------------ indeterminate ops


def test_get_may_observe_an_indeterminate_put() -> None:
    assert_ok([put("k", 1, 0, None, client=1), get("k", 1, 5, 6, client=2)])


def test_get_may_not_observe_an_indeterminate_put() -> None:
    assert_ok([put("k", 1, 0, None, client=1), get("k", None, 5, 6, client=2)])
    # Not yet, then yes: the put took effect between the two reads.
    assert_ok([put("k", 1, 0, None, client=1), get("k", None, 2, 3, client=2), get("k", 1, 5, 6, client=2)])


def test_indeterminate_put_once_visible_stays_visible() -> None:
    assert_violation(
        [put("k", 1, 0, None, client=1), get("k", 1, 2, 3, client=2), get("k", None, 5, 6, client=2)]
    )


def test_indeterminate_put_cannot_be_visible_before_its_call() -> None:
    assert_violation([get("k", 1, 0, 1, client=2), put("k", 1, 2, None, client=1)])


def test_indeterminate_put_observed_must_precede_later_overwrite() -> None:
    # The only writer of 1 is indeterminate, and 1 was read at [1, 2]: it took effect before 2,
    # so the completed put(2) at [3, 4] overwrote it and the read at [5, 6] is stale.
    assert_violation(
        [
            put("k", 1, 0, None, client=1),
            get("k", 1, 1, 2, client=2),
            put("k", 2, 3, 4, client=3),
            get("k", 1, 5, 6, client=2),
        ]
    )
    # With a second (later) writer of 1 the last read is fine.
    assert_ok(
        [
            put("k", 1, 0, None, client=1),
            get("k", 1, 1, 2, client=2),
            put("k", 2, 3, 4, client=3),
            put("k", 1, 4.5, None, client=3),
            get("k", 1, 5, 6, client=2),
        ]
    )


def test_indeterminate_write_of_a_value_with_another_writer_may_never_happen() -> None:
    # 1 was observed, but the completed put(1) explains that read: the lost put(1) (invoked after the
    # remove returned) need not have happened, so the final read of None is fine.
    assert_ok(
        [
            put("k", 1, 0, 1, client=1),
            get("k", 1, 0, 3, client=2),
            remove("k", 1.5, 2.0, client=3),
            put("k", 1, 2.5, None, client=4),
            get("k", None, 3.5, 4, client=2),
        ]
    )


def test_indeterminate_result_is_ignored() -> None:
    assert_ok(
        [put("k", 1, 0, 1), get("k", "garbage", 2, None), cas("k", 7, 8, True, 2, None), get("k", 1, 3, 4)]
    )


def test_indeterminate_cas_may_or_may_not_apply() -> None:
    base = [put("k", 1, 0, 1), cas("k", 1, 2, None, 2, None, client=1)]
    assert_ok([*base, get("k", 2, 3, 4, client=2)])
    assert_ok([*base, get("k", 1, 3, 4, client=2)])
    # It can only apply if the expected value was current.
    assert_violation(
        [put("k", 1, 0, 1), cas("k", 5, 2, None, 2, None, client=1), get("k", 2, 3, 4, client=2)]
    )


def test_indeterminate_write_can_explain_failed_cas() -> None:
    # A failed CAS while the value "should" be the expected one is explained by the lost put(5).
    assert_ok([put("k", 1, 0, 1), put("k", 5, 2, None, client=1), cas("k", 1, 2, False, 3, 4, client=2)])
    assert_violation([put("k", 1, 0, 1), cas("k", 1, 2, False, 3, 4, client=2)])
    # ...but not if the lost put was invoked only after the CAS returned.
    assert_violation(
        [put("k", 1, 0, 1), cas("k", 1, 2, False, 3, 4, client=2), put("k", 5, 5, None, client=1)]
    )


def test_indeterminate_remove_may_explain_absent_read() -> None:
    assert_ok([put("k", 1, 0, 1), remove("k", 2, None, client=1), get("k", None, 3, 4, client=2)])
    assert_violation([put("k", 1, 0, 1), remove("k", 5, None, client=1), get("k", None, 3, 4, client=2)])


# --------------------------------------------------------------------------------- multi-key, API edges


def test_multi_key_history_names_the_bad_key() -> None:
    ops: list[Op] = []
    for i, key in enumerate(["a", "b", "c", "d"]):
        ops.append(put(key, i, 0, 1, client=i))
        ops.append(get(key, i, 2, 3, client=i))
    ops.append(get("c", None, 4, 5, client=9))  # stale read on "c" only
    res = assert_violation(ops, key="c")
    assert "'c'" in res.explanation


def test_first_bad_key_in_order_of_appearance() -> None:
    ops = [get("x", 1, 0, 1), get("y", 2, 0, 1), put("z", 1, 0, 1)]
    assert assert_violation(ops, key="x").key == "x"


def test_timeout_is_reported_distinctly() -> None:
    rng = random.Random(7)
    ops = [put("k", i, 0, 100, client=i) for i in range(12)]
    ops += [get("k", rng.randrange(12), 1 + i, 2 + i, client=20 + i) for i in range(12)]
    res = check_history(ops, max_steps_per_key=50)
    assert not res.ok
    assert res.timed_out
    assert res.key == "k"
    assert res.explanation.startswith("timeout")


def test_violation_on_another_key_wins_over_timeout() -> None:
    ops = [put("k", i, 0, 100, client=i) for i in range(12)]
    ops += [get("k", 11 - i, 1 + i, 2 + i, client=20 + i) for i in range(12)]
    ops += [put("z", 1, 0, 1), get("z", None, 2, 3)]
    res = check_history(ops, max_steps_per_key=30)
    assert not res.ok and not res.timed_out and res.key == "z"


def test_invalid_input_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        check_history([Op(client=0, kind="increment", key="k", call=0, ret=1)])
    with pytest.raises(ValueError, match="before"):
        check_history([put("k", 1, 5, 4)])


def test_explanation_shows_prefix_and_stuck_op() -> None:
    res = assert_violation(
        [put("k", 1, 0, 1, client=1), put("k", 2, 2, 3, client=1), get("k", 1, 4, 5, client=2)]
    )
    text = res.explanation
    assert "Longest linearizable prefix found: 2 ops" in text
    assert "put('k', 2)" in text
    assert "[call=4 ret=5] client 2: get('k') -> 1" in text


# ------------------------------------------------------------------------------------ property tests

KEYS = ("k0", "k1", "k2")
_NEVER_WRITTEN = "never-written-value"

_op_spec = st.tuples(
    st.integers(0, 4),  # client
    st.sampled_from(["put", "get", "remove", "cas"]),
    st.sampled_from(KEYS),
    st.integers(1, 3),  # value to write
    st.one_of(st.none(), st.integers(1, 3), st.just("current")),  # cas expected
    st.integers(0, 2),  # gap before call
    st.integers(0, 3),  # call -> linearization point
    st.integers(0, 3),  # linearization point -> return
    st.sampled_from(["done"] * 6 + ["lost", "applied"]),  # indeterminate? did it take effect?
)


def _execute(specs: list[tuple[Any, ...]], *, overlap: bool) -> list[Op]:
    """Build a history by executing ops on a dict register in an order consistent with their times.

    With ``overlap`` each client's ops get real intervals around a linearization point (clients run
    concurrently); without it, all ops are laid out one after another. Indeterminate ops either take
    effect at some point after their call ("applied", possibly after the client moved on) or never.
    """
    clock = {c: 0.0 for c in range(5)}
    global_clock = 0.0
    planned: list[tuple[float, int, dict[str, Any]]] = []
    for idx, (client, kind, key, value_, expected_, gap, d_lin, d_ret, fate) in enumerate(specs):
        call = clock[client] + gap if overlap else global_clock + gap
        lin = call + d_lin * (3 if fate == "applied" else 1)
        ret: float | None = lin + d_ret if fate == "done" else None
        end = lin + d_ret if fate == "done" else call + d_lin + d_ret
        if overlap:
            clock[client] = end
        else:
            global_clock = max(end, lin) + 1
        op = {"client": client, "kind": kind, "key": key, "value": value_, "expected": expected_}
        op.update(call=float(call), ret=None if ret is None else float(ret))
        planned.append((lin, idx, op))
        if fate == "lost":
            planned[-1][2]["lost"] = True
    planned.sort(key=lambda p: (p[0], p[1]))

    store: dict[str, object] = {}
    built: dict[int, Op] = {}
    for _, idx, spec in planned:
        kind, key = spec["kind"], spec["key"]
        applies = not spec.get("lost")
        value: object = spec["value"]
        expected: object = spec["expected"]
        result: object = None
        if kind == "put":
            if applies:
                store[key] = value
        elif kind == "remove":
            value = None
            if applies:
                store.pop(key, None)
        elif kind == "get":
            value = None
            result = store.get(key)
        else:
            if expected == "current":
                expected = store.get(key)
            result = store.get(key) == expected
            if applies and result:
                store[key] = value
        if spec["ret"] is None:
            result = "junk"  # ignored for indeterminate ops
        built[idx] = Op(
            client=spec["client"],
            kind=kind,
            key=key,
            value=value,
            expected=expected if kind == "cas" else None,
            call=spec["call"],
            ret=spec["ret"],
            result=result,
        )
    return [built[i] for i in range(len(specs))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(_op_spec, max_size=40), overlap=st.booleans())
def test_property_executed_histories_are_accepted(specs: list[tuple[Any, ...]], overlap: bool) -> None:
    history = _execute(specs, overlap=overlap)
    res = check_history(history)
    assert res.ok, res.explanation


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(_op_spec, min_size=1, max_size=40), overlap=st.booleans(), data=st.data())
def test_property_read_of_never_written_value_rejected(
    specs: list[tuple[Any, ...]], overlap: bool, data: st.DataObject
) -> None:
    history = _execute(specs, overlap=overlap)
    reads = [i for i, op in enumerate(history) if op.kind == "get" and op.ret is not None]
    if not reads:
        history.append(get("k0", None, 1000.0, 1001.0))
        reads = [len(history) - 1]
    i = data.draw(st.sampled_from(reads))
    bad = history[i]
    history[i] = Op(bad.client, "get", bad.key, call=bad.call, ret=bad.ret, result=_NEVER_WRITTEN)
    res = check_history(history)
    assert not res.ok
    assert not res.timed_out
    assert res.key == bad.key
    assert _NEVER_WRITTEN in res.explanation


_small_value = st.one_of(st.none(), st.integers(1, 2))


@st.composite
def _arbitrary_op(draw: st.DrawFn) -> Op:
    call = draw(st.integers(0, 6))
    ret = draw(st.one_of(st.none(), st.integers(call, call + 4)))
    return Op(
        client=draw(st.integers(0, 3)),
        kind=draw(st.sampled_from(["put", "get", "remove", "cas"])),
        key=draw(st.sampled_from(KEYS[:2])),
        value=draw(_small_value),
        expected=draw(_small_value),
        call=float(call),
        ret=None if ret is None else float(ret),
        result=draw(st.one_of(_small_value, st.booleans())),
    )


@settings(max_examples=600, deadline=None)
@given(ops=st.lists(_arbitrary_op(), max_size=12))
def test_property_agrees_with_brute_force_on_arbitrary_histories(ops: list[Op]) -> None:
    res = check_history(ops)
    assert not res.timed_out
    assert res.ok == brute_force_ok(ops), res.explanation


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(_op_spec, max_size=14), overlap=st.booleans(), data=st.data())
def test_property_agrees_with_brute_force_on_perturbed_executions(
    specs: list[tuple[Any, ...]], overlap: bool, data: st.DataObject
) -> None:
    # Near-valid histories (one result changed to another plausible value) are where soundness bugs hide.
    history = _execute(specs, overlap=overlap)
    if history:
        i = data.draw(st.integers(0, len(history) - 1))
        op = history[i]
        if op.kind == "get":
            history[i] = Op(
                op.client, "get", op.key, call=op.call, ret=op.ret, result=data.draw(_small_value)
            )
        elif op.kind == "cas":
            history[i] = Op(
                op.client, "cas", op.key, op.value, op.expected, op.call, op.ret, result=not op.result
            )
    res = check_history(history)
    assert not res.timed_out
    assert res.ok == brute_force_ok(history), res.explanation


# ------------------------------------------------------------------------------------------ performance


def _big_history(n_ops: int, n_keys: int, n_clients: int, seed: int, lost_rate: float) -> list[Op]:
    rng = random.Random(seed)
    keys = [f"key-{i}" for i in range(n_keys)]
    clock = [rng.random() for _ in range(n_clients)]
    planned: list[tuple[float, int, int, str, str, int, float, float | None, bool]] = []
    for idx in range(n_ops):
        client = rng.randrange(n_clients)
        call = clock[client] + rng.random() * 0.5
        duration = 0.5 + rng.random() * 4.0
        lin = call + rng.random() * duration
        lost = rng.random() < lost_rate
        ret: float | None = call + duration
        if lost:
            ret = None
            applies = rng.random() < 0.5
            lin = call + rng.random() * 3 * duration
        else:
            applies = True
        clock[client] = call + duration
        kind = rng.choices(["put", "get", "remove", "cas"], weights=[4, 5, 1, 2])[0]
        value = rng.randrange(1_000_000)
        planned.append((lin, idx, client, kind, rng.choice(keys), value, call, ret, applies))
    planned.sort(key=lambda p: (p[0], p[1]))
    store: dict[str, object] = {}
    ops: dict[int, Op] = {}
    for _lin, idx, client, kind, key, value, call, ret, applies in planned:
        result: object = None
        expected: object = None
        if kind == "put" and applies:
            store[key] = value
        elif kind == "remove" and applies:
            store.pop(key, None)
        elif kind == "get":
            result = store.get(key)
        elif kind == "cas":
            expected = store.get(key) if rng.random() < 0.7 else rng.randrange(1_000_000)
            result = store.get(key) == expected
            if result and applies:
                store[key] = value
        ops[idx] = Op(client, kind, key, value, expected, call, ret, result if ret is not None else None)
    return [ops[i] for i in range(n_ops)]


@_timeout_60
def test_performance_2000_ops_20_keys_8_clients() -> None:
    history = _big_history(2000, 20, 8, seed=1234, lost_rate=0.03)
    assert sum(op.ret is None for op in history) > 0
    start = time.perf_counter()
    res = check_history(history)
    elapsed = time.perf_counter() - start
    assert res.ok, res.explanation
    print(f"2000-op history checked in {elapsed:.3f}s")
    # And a single corrupted read in the same big history is caught.
    i = next(i for i, op in enumerate(history) if op.kind == "get" and op.ret is not None)
    bad = history[i]
    history[i] = Op(bad.client, "get", bad.key, call=bad.call, ret=bad.ret, result=_NEVER_WRITTEN)
    res = check_history(history)
    assert not res.ok and not res.timed_out and res.key == bad.key
