"""`CircuitBreaker`: which target instances the invoker should stop sending calls to for a while.

Sans-IO: the caller passes the time (`now`, seconds on any monotonic clock) with every event, so
the state machine is deterministic and tested without sleeping. One circuit per key (the invoker
uses ``(node, artifact)``: the instances of one artifact version on one node):

- CLOSED (the start): calls go through. `failure` counts consecutive failures; `threshold` of
  them in a row open the circuit. A `success` resets the count.
- OPEN: `allows` is False until `cool_down` seconds after it opened; then the circuit lets ONE
  call through as a probe (`started` marks it: HALF_OPEN).
- HALF_OPEN: no further call is allowed while the probe runs (for at most `cool_down` seconds: a
  probe whose result never came is given up and another one allowed). The probe's `success`
  closes the circuit; its `failure` opens it again for another `cool_down`.

The invoker consults `allows` when it chooses an instance: an instance whose circuit is open is
skipped while another candidate exists, never made the reason a call fails (docs/invocation.md,
*Circuit breaker*). Only failures that say something about the instance's health count (no
answer, its node lost, refused because it is stopping or has no instance); answers of the entry,
including errors and "overloaded", count as successes: the instance is up.

Bounded: at most `max_keys` circuits are kept; beyond that, closed ones are forgotten first.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


@dataclass(slots=True)
class _Circuit:
    state: str = CLOSED
    failures: int = 0  # consecutive, while CLOSED
    since: float = 0.0  # when it opened (OPEN) or the probe started (HALF_OPEN)


class CircuitBreaker:
    """Circuits per key; see the module docstring."""

    def __init__(self, threshold: int = 5, cool_down: float = 5.0, *, max_keys: int = 4096) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if cool_down <= 0:
            raise ValueError(f"cool_down must be positive, got {cool_down}")
        self.threshold = threshold
        self.cool_down = cool_down
        self.max_keys = max_keys
        self._circuits: dict[Hashable, _Circuit] = {}
        self.opened = 0  # times a circuit opened (monotonic counter, for metrics and tests)

    @property
    def idle(self) -> bool:
        """No circuit is tracked (no recent failure anywhere): `allows` is True for every key and
        `started` and `success` change nothing, so a caller may skip them (and reading its clock)."""
        return not self._circuits

    def state(self, key: Hashable, now: float) -> str:
        """CLOSED, OPEN or HALF_OPEN (an OPEN circuit past its cool-down still reads OPEN until a
        probe `started`)."""
        c = self._circuits.get(key)
        return CLOSED if c is None else c.state

    def allows(self, key: Hashable, now: float) -> bool:
        """Whether a call to `key` may go now (pure: call `started` when it does)."""
        c = self._circuits.get(key)
        if c is None or c.state == CLOSED:
            return True
        return now - c.since >= self.cool_down  # OPEN: cooled down; HALF_OPEN: the probe is stale

    def started(self, key: Hashable, now: float) -> None:
        """A call to `key` is being sent: past an open circuit's cool-down it is the probe."""
        c = self._circuits.get(key)
        if c is not None and c.state != CLOSED and now - c.since >= self.cool_down:
            c.state, c.since = HALF_OPEN, now

    def success(self, key: Hashable, now: float) -> None:
        """The instance answered: close the circuit (forget it)."""
        self._circuits.pop(key, None)

    def failure(self, key: Hashable, now: float) -> None:
        """The instance failed a call in a way that says it is unhealthy."""
        c = self._circuits.get(key)
        if c is None:
            if len(self._circuits) >= self.max_keys:
                self._evict()
            c = self._circuits[key] = _Circuit()
        if c.state == HALF_OPEN:
            c.state, c.since = OPEN, now
            self.opened += 1
            return
        if c.state == OPEN:
            return  # a call started before it opened: already open
        c.failures += 1
        if c.failures >= self.threshold:
            c.state, c.since, c.failures = OPEN, now, 0
            self.opened += 1

    def open_keys(self) -> list[Hashable]:
        """Keys whose circuit is OPEN or HALF_OPEN."""
        return [k for k, c in self._circuits.items() if c.state != CLOSED]

    def _evict(self) -> None:
        closed = [k for k, c in self._circuits.items() if c.state == CLOSED]
        for k in closed or list(self._circuits):
            del self._circuits[k]
            if len(self._circuits) < self.max_keys:
                return
