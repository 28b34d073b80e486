"""The retry policy and the pending-request tracker shared by the invoker and the map service."""

from __future__ import annotations

import random

import pytest

from aether.core.calls import Answer, NoAnswer, PendingCalls, RetryPolicy


def test_backoff_doubles_from_the_minimum_up_to_the_maximum_with_jitter() -> None:
    policy = RetryPolicy(backoff_min=0.02, backoff_max=0.5)
    rng = random.Random(7)
    for round_, base in [(0, 0.02), (1, 0.04), (2, 0.08), (4, 0.32), (5, 0.5), (60, 0.5)]:
        delays = [policy.backoff(round_, rng) for _ in range(200)]
        assert all(base / 2 <= d <= base + 1e-12 for d in delays)
        assert max(delays) - min(delays) > base / 4  # jittered, not one fixed value


def test_backoff_is_deterministic_for_a_seeded_generator() -> None:
    policy = RetryPolicy()
    a = [policy.backoff(r, random.Random(1)) for r in range(8)]
    b = [policy.backoff(r, random.Random(1)) for r in range(8)]
    assert a == b


def test_attempt_wait_is_bounded_by_the_remaining_deadline() -> None:
    assert RetryPolicy(attempt_timeout=1.0).attempt_wait(5.0) == 1.0
    assert RetryPolicy(attempt_timeout=1.0).attempt_wait(0.3) == 0.3
    assert RetryPolicy(attempt_timeout=None).attempt_wait(5.0) == 5.0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"timeout": 0}, "timeout must be positive"),
        ({"attempt_timeout": 0}, "attempt_timeout must be positive"),
        ({"backoff_min": 0}, "backoff_min"),
        ({"backoff_min": 0.5, "backoff_max": 0.1}, "backoff_min <= backoff_max"),
    ],
)
def test_bad_policies_are_refused_naming_the_setting(kwargs: dict[str, float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RetryPolicy(**kwargs)


async def test_an_answer_reaches_its_caller_only_from_the_peer_the_request_went_to() -> None:
    calls: PendingCalls[str] = PendingCalls()
    rid, _ = calls.open("B")
    assert calls.resolve(rid, "C", "forged") is Answer.WRONG_PEER
    assert calls.resolve(rid + 1, "B", "other") is Answer.UNKNOWN
    assert calls.resolve(rid, "B", "real") is Answer.TAKEN
    assert calls.resolve(rid, "B", "again") is Answer.DONE
    assert await calls.wait(rid, 1.0) == "real"
    assert len(calls) == 0
    assert calls.resolve(rid, "B", "late") is Answer.UNKNOWN


async def test_a_local_request_takes_its_answer_before_it_is_awaited() -> None:
    calls: PendingCalls[int] = PendingCalls()
    rid, _ = calls.open(None)
    assert calls.resolve(rid, None, 42) is Answer.TAKEN  # answered synchronously, e.g. by a core
    assert await calls.wait(rid) == 42
    assert len(calls) == 0


async def test_no_answer_within_the_timeout_raises_and_forgets_the_request() -> None:
    calls: PendingCalls[str] = PendingCalls()
    rid, _ = calls.open("B")
    with pytest.raises(NoAnswer, match=r"no response within 0\.02s"):
        await calls.wait(rid, 0.02)
    assert len(calls) == 0
    assert calls.resolve(rid, "B", "late") is Answer.UNKNOWN


async def test_a_peer_going_down_fails_only_its_requests() -> None:
    calls: PendingCalls[str] = PendingCalls()
    on_b = [calls.open("B")[0] for _ in range(3)]
    on_c = calls.open("C")[0]
    assert sorted(p or "" for p in calls.peers()) == ["B", "B", "B", "C"]
    assert calls.fail_peer("B", lambda: ConnectionError("B went down")) == 3
    for rid in on_b:
        with pytest.raises(ConnectionError, match="B went down"):
            await calls.wait(rid)
    assert calls.peers() == ["C"]
    assert calls.fail_all(lambda: RuntimeError("closing")) == 1
    with pytest.raises(RuntimeError, match="closing"):
        await calls.wait(on_c)
    assert len(calls) == 0


async def test_fail_and_discard_end_one_request() -> None:
    calls: PendingCalls[str] = PendingCalls()
    a, _ = calls.open("B")
    b, fut_b = calls.open("B")
    assert calls.fail(a, ValueError("refused"))
    assert not calls.fail(a, ValueError("twice"))  # already ended
    with pytest.raises(ValueError, match="refused"):
        await calls.wait(a)
    calls.discard(b)  # e.g. the send failed: nobody will wait for it
    assert fut_b.cancelled() and len(calls) == 0
    assert not calls.fail(b, ValueError("gone"))


async def test_ids_are_unique_while_requests_wait() -> None:
    calls: PendingCalls[None] = PendingCalls()
    ids = [calls.open("B")[0] for _ in range(100)]
    assert len(set(ids)) == 100
    for rid in ids:
        calls.discard(rid)
    assert len(calls) == 0
