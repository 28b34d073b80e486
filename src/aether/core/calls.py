"""Calls that wait for an answer: one retry policy and one tracker of pending requests.

`RetryPolicy` says how long a call may take in all (`timeout`), how long one attempt waits for its
answer (`attempt_timeout`) and how long to pause before trying again (exponential backoff with
jitter). It is pure: the invoker uses it with asyncio's clock, the sans-IO map core with the clock
and random generator it is given.

`PendingCalls` matches answers to the callers waiting for them by request id. Each request
remembers the peer it went to: an answer from another peer is not taken, a peer that goes down
fails its requests at once (so callers can retry elsewhere), closing fails them all, and `wait`
bounds each wait with a timer. The invoker (`InvokeRequest`/`InvokeResponse`) and the map service
(operations of local callers, `keys()`/`stats()` scatter calls) both use it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

__all__ = ["Answer", "NoAnswer", "PendingCalls", "RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Deadline, per-attempt wait and backoff of a call that is retried until it gets an answer."""

    timeout: float = 10.0
    """The whole call, retries included (seconds)."""
    attempt_timeout: float | None = 1.0
    """How long one attempt waits for its answer before it counts as lost (None: the rest of `timeout`)."""
    backoff_min: float = 0.005
    """The pause before the first retry round; it doubles each round ..."""
    backoff_max: float = 0.2
    """... up to this."""

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"retry timeout must be positive (got {self.timeout!r})")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise ValueError("attempt_timeout must be positive (or None: the whole remaining deadline)")
        if self.backoff_min <= 0 or self.backoff_max < self.backoff_min:
            raise ValueError(
                f"need 0 < backoff_min <= backoff_max (got {self.backoff_min!r}, {self.backoff_max!r})"
            )

    def backoff(self, round_: int, rng: random.Random) -> float:
        """The pause before retry round `round_` (0-based): ``min(backoff_max, backoff_min * 2**round_)``,
        jittered down to between half and all of it (callers retrying together spread out)."""
        base = min(self.backoff_max, self.backoff_min * (2 ** min(max(round_, 0), 30)))
        return base / 2 + rng.uniform(0.0, base / 2)

    def attempt_wait(self, remaining: float) -> float:
        """How long the next attempt waits, `remaining` seconds before the call's deadline."""
        return remaining if self.attempt_timeout is None else min(remaining, self.attempt_timeout)


class NoAnswer(Exception):
    """`PendingCalls.wait` got no answer in time (the request may still be answered later: dropped)."""


class Answer(Enum):
    """What `PendingCalls.resolve` did with an answer."""

    TAKEN = "taken"
    UNKNOWN = "unknown"  # no request waits under that id (late, or never sent)
    WRONG_PEER = "wrong_peer"  # a request waits under that id, but it went to another peer
    DONE = "done"  # the request already ended (failed, timed out) and is being cleaned up


class PendingCalls(Generic[T]):
    """Request id -> the future of the caller waiting for its answer, and the peer it was sent to.

    `open` registers a request (and gives its id); `wait` awaits its answer with an optional
    timeout and always forgets it afterwards (`discard` forgets one never waited for, e.g. when the
    send failed). `resolve` / `fail` end one request, `fail_peer` those sent to a peer, `fail_all`
    every one. Requests opened with ``peer=None`` (answered locally) take answers from anyone.
    """

    def __init__(self, first_id: int = 1) -> None:
        self._ids = itertools.count(first_id)
        self._pending: dict[int, tuple[asyncio.Future[T], str | None]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, peer: str | None) -> tuple[int, asyncio.Future[T]]:
        """Register a request going to `peer`; returns its new id and the future its answer ends."""
        rid = next(self._ids)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, peer)
        return rid, fut

    def discard(self, rid: int) -> None:
        """Forget request `rid` (its answer, if one still comes, is `Answer.UNKNOWN`)."""
        entry = self._pending.pop(rid, None)
        if entry is not None and not entry[0].done():
            entry[0].cancel()

    async def wait(self, rid: int, timeout: float | None = None) -> T:
        """The answer to request `rid`; raises what `fail` was given, or `NoAnswer` after `timeout`."""
        fut = self._pending[rid][0]
        timer: asyncio.TimerHandle | None = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, _expire, fut, timeout)
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)
            if timer is not None:
                timer.cancel()

    def resolve(self, rid: int, sender: str | None, value: T) -> Answer:
        """End request `rid` with `value`, answered by `sender` (checked against the peer it went to)."""
        entry = self._pending.get(rid)
        if entry is None:
            return Answer.UNKNOWN
        fut, peer = entry
        if peer is not None and sender != peer:
            return Answer.WRONG_PEER
        if fut.done():
            return Answer.DONE
        fut.set_result(value)
        return Answer.TAKEN

    def peers(self) -> list[str | None]:
        """The peer of each waiting request (one entry per request)."""
        return [peer for _fut, peer in self._pending.values()]

    def peer_of(self, rid: int) -> str | None:
        """The peer request `rid` went to (None: unknown id, or a local request)."""
        entry = self._pending.get(rid)
        return None if entry is None else entry[1]

    def fail(self, rid: int, error: BaseException) -> bool:
        """End request `rid` with `error`; False when no such request waits."""
        entry = self._pending.get(rid)
        if entry is None or entry[0].done():
            return False
        entry[0].set_exception(error)
        return True

    def fail_peer(self, peer: str, error: Callable[[], BaseException]) -> int:
        """End every request waiting on `peer` with a fresh `error()`; returns how many."""
        failed = 0
        for fut, node in list(self._pending.values()):
            if node == peer and not fut.done():
                fut.set_exception(error())
                failed += 1
        return failed

    def fail_all(self, error: Callable[[], BaseException]) -> int:
        """End every waiting request with a fresh `error()` (shutting down); returns how many."""
        failed = 0
        for fut, _node in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(error())
                failed += 1
        return failed


def _expire(fut: asyncio.Future[T], wait: float) -> None:
    if not fut.done():
        fut.set_exception(NoAnswer(f"no response within {wait:.3g}s"))
