"""Link faults: latency, jitter, loss and partitions injected in the transport itself (sans-IO part).

The kernels Aether is tested and demonstrated on have no ``netem``, so Aether Forge and the tests
break the network inside the nodes: a node applies the `LinkFault` set for peer P (through
`Transport.set_link_fault`, driven by the management API's ``/api/v1/faults`` when the node runs
with ``fault_injection``) to every frame it sends to P, heartbeats and handshake frames included.

- ``blocked``: every frame to P is dropped. P hears nothing from this node, so after its
  ``heartbeat_timeout`` it sees this node down and its redials never complete their handshake;
  this node then hears nothing from P either and sees it down: a partition, as a real one. Block
  both directions (on both nodes) to cut the link cleanly.
- ``loss``: each frame to P is dropped with that probability (0..1). Heartbeats too: a high loss
  makes P see this node down now and then, like a bad link does.
- ``delay_ms`` (+ ``jitter_ms``): each frame leaves that much later; the jitter adds a uniform
  sample in [-jitter_ms, +jitter_ms] (never below zero), like netem's. Frames to one peer keep
  their order whatever the jitter: a frame never leaves before the one sent before it (`decide`).
  A delay beyond the peer's ``heartbeat_timeout`` makes the link look down, as it would.

Faults are not persisted and belong to this node only: a restart clears them. The transport is
at-most-once already, so a frame delayed on a link that closes meanwhile is just lost.

This module is pure: `decide` takes the fault, a `random.Random`, the current time and the time the
previous frame to that peer was due, and returns `DROP` (None) or the time the frame may leave.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Final

import msgspec

__all__ = ["DROP", "MAX_DELAY_MS", "LinkFault", "decide"]

MAX_DELAY_MS: Final = 60_000.0
"""The largest ``delay_ms`` and ``jitter_ms`` a link fault may set (one minute)."""

DROP: Final = None
"""What `decide` returns for a frame that is lost."""


def check_range(name: str, value: object, low: float, high: float) -> None:
    """`ValueError` naming `name` unless `value` is a finite number within [low, high]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")


class LinkFault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The fault this node applies to every frame it sends to one peer (see the module docstring)."""

    delay_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_DELAY_MS)] = 0.0
    """Each frame leaves this many milliseconds later."""
    jitter_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_DELAY_MS)] = 0.0
    """Plus a uniform sample in [-jitter_ms, +jitter_ms] per frame (the total never below 0)."""
    loss: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Each frame is dropped with this probability."""
    blocked: bool = False
    """Every frame is dropped (a partition)."""

    def __post_init__(self) -> None:
        # msgspec checks the bounds when it decodes a body; this covers objects built in code too
        check_range("delay_ms", self.delay_ms, 0, MAX_DELAY_MS)
        check_range("jitter_ms", self.jitter_ms, 0, MAX_DELAY_MS)
        check_range("loss", self.loss, 0, 1)
        if not isinstance(self.blocked, bool):
            raise ValueError(f"blocked must be true or false, got {self.blocked!r}")

    def describe(self) -> str:
        """A short text for logs: ``blocked``, ``delay 300 ms ± 50 ms, loss 20%``, ``none``."""
        if self.blocked:
            return "blocked"
        parts = []
        if self.delay_ms or self.jitter_ms:
            jitter = f" ± {self.jitter_ms:g} ms" if self.jitter_ms else ""
            parts.append(f"delay {self.delay_ms:g} ms{jitter}")
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        return ", ".join(parts) or "none"


def decide(fault: LinkFault, rng: random.Random, now: float, previous_due: float) -> float | None:
    """The fate of one frame sent at `now` on a link with `fault`: `DROP` (None), or the time
    (same clock as `now`) it may leave: ``max(previous_due, now + delay + jitter sample)``, so a frame
    never leaves before the one sent before it on the same link (FIFO even with jitter).

    `previous_due` is the value this returned for the previous frame that was not dropped (any
    value <= `now`, e.g. 0, when there is none or it has left). Draws from `rng`: one number for
    the loss (when ``0 < loss``), one for the jitter (when ``jitter_ms > 0``).
    """
    if fault.blocked:
        return DROP
    loss = fault.loss
    if loss and rng.random() < loss:
        return DROP
    delay = fault.delay_ms
    jitter = fault.jitter_ms
    if jitter:
        delay += rng.uniform(-jitter, jitter)
        if delay < 0.0:
            delay = 0.0
    due = now + delay / 1000.0
    return due if due > previous_due else previous_due
