"""Slice faults: what `SliceRuntime.inject_fault` does to the instances of one artifact (pure part).

For Aether Forge and tests, a node started with ``--fault-injection`` can make the instances of an
artifact running on it misbehave (management API ``PUT /api/v1/faults/slices/{artifact}``):

- ``delay_ms``: every call to them waits that long first (holding its concurrency slot, like a
  slow instance);
- ``error_rate``: then fails with that probability (0..1) with `InjectedFault` (500, kind
  ``injected_fault``, counted as a failure of the instance in its metrics, which the controller's
  error-rate rule sees);
- ``unhealthy``: their health checks fail (even for a class without a ``health()`` hook), so the
  controller replaces them after its ``health.failures`` checks in a row.

The fault sticks to the instance objects running when it was injected: an instance started later
(a replacement, a scale-up, a restart) is healthy, so a controller replacement heals it.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Final

import msgspec

__all__ = ["MAX_DELAY_MS", "SliceFault", "should_fail"]

MAX_DELAY_MS: Final = 600_000.0
"""The largest ``delay_ms`` of a slice fault (ten minutes)."""


def _check(name: str, value: object, high: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= high
    ):
        raise ValueError(f"{name} must be a number from 0 to {high:g}, got {value!r}")


class SliceFault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A fault of the instances of one artifact on one node (see the module docstring)."""

    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    """Each call fails with this probability (after the delay)."""
    delay_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_DELAY_MS)] = 0.0
    """Each call waits this many milliseconds first."""
    unhealthy: bool = False
    """Their health checks fail."""

    def __post_init__(self) -> None:
        # msgspec checks the bounds when it decodes a body; this covers objects built in code too
        _check("error_rate", self.error_rate, 1.0)
        _check("delay_ms", self.delay_ms, MAX_DELAY_MS)
        if not isinstance(self.unhealthy, bool):
            raise ValueError(f"unhealthy must be true or false, got {self.unhealthy!r}")

    def describe(self) -> str:
        """A short text for logs: ``errors 100%, delay 200 ms, unhealthy``."""
        parts = []
        if self.error_rate:
            parts.append(f"errors {self.error_rate * 100:g}%")
        if self.delay_ms:
            parts.append(f"delay {self.delay_ms:g} ms")
        if self.unhealthy:
            parts.append("unhealthy")
        return ", ".join(parts) or "none"


def should_fail(fault: SliceFault, rng: random.Random) -> bool:
    """Whether one call fails under `fault` (one draw from `rng` when 0 < error_rate < 1)."""
    rate = fault.error_rate
    if rate >= 1.0:
        return True
    return rate > 0.0 and rng.random() < rate
