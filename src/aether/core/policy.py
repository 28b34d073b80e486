"""Resilience policy of one slice entry: how calls to it are timed, retried and failed over.

`EntryPolicy` is declared in code (``@entry(timeout=..., retries=..., idempotent=..., backoff=...)``),
may be overridden per entry by a blueprint (``[slices.NAME.entries.ENTRY]``), and is published with
each endpoint (`aether.kv.keys.EndpointValue.policy`) so that every caller's invoker knows the
policy of the entry it calls (docs/invocation.md, *Entry policies*). It lives in the lowest layer
because the slices, deploy, kv and invoke packages all use it and `aether.invoke` may not import
`aether.kv`.

A field left None is "not set": it takes the value of the layer below (blueprint over code over
the invoker's defaults). `EntryPolicy.over` stacks two layers.
"""

from __future__ import annotations

import msgspec

__all__ = ["DEFAULT_POLICY", "EntryPolicy"]


class EntryPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the runtime may do with a call to one entry (every field optional: None = not set).

    - `timeout`: seconds one attempt may take before it counts as lost (None: the invoker's
      default; for a non-idempotent entry, the whole remaining deadline of the call);
    - `retries`: how many times a failed attempt may be repeated (None: until the call's
      deadline; 0: never);
    - `idempotent`: whether running the entry twice for one logical call is harmless (None and
      True: yes, at least once as before; False: an attempt that may have reached the target is
      never repeated, the caller gets `IndeterminateOutcome` instead);
    - `backoff`: seconds of the first pause between retry rounds (doubling, jittered; None: the
      invoker's default, 5 ms).
    """

    timeout: float | None = None
    retries: int | None = None
    idempotent: bool | None = None
    backoff: float | None = None

    def over(self, base: EntryPolicy) -> EntryPolicy:
        """This policy on top of `base`: each field set here wins, the others come from `base`."""
        return EntryPolicy(
            self.timeout if self.timeout is not None else base.timeout,
            self.retries if self.retries is not None else base.retries,
            self.idempotent if self.idempotent is not None else base.idempotent,
            self.backoff if self.backoff is not None else base.backoff,
        )

    @property
    def is_idempotent(self) -> bool:
        """False only when declared ``idempotent=False`` (the default is at-least-once)."""
        return self.idempotent is not False

    def problems(self) -> list[str]:
        """What is wrong with the values (empty: valid), each naming the field."""
        out: list[str] = []
        if self.timeout is not None and not _positive(self.timeout):
            out.append(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        if self.retries is not None and (
            isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0
        ):
            out.append(f"retries must be an integer >= 0, got {self.retries!r}")
        if self.idempotent is not None and not isinstance(self.idempotent, bool):
            out.append(f"idempotent must be true or false, got {self.idempotent!r}")
        if self.backoff is not None and not _positive(self.backoff):
            out.append(f"backoff must be a number of seconds > 0, got {self.backoff!r}")
        return out

    def describe(self) -> str:
        """``idempotent, timeout 2s, retries 3`` (the fields that are set), or ``defaults``."""
        parts = []
        if self.idempotent is not None:
            parts.append("idempotent" if self.idempotent else "not idempotent")
        if self.timeout is not None:
            parts.append(f"timeout {self.timeout:g}s")
        if self.retries is not None:
            parts.append(f"retries {self.retries}")
        if self.backoff is not None:
            parts.append(f"backoff {self.backoff:g}s")
        return ", ".join(parts) or "defaults"


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


DEFAULT_POLICY = EntryPolicy()
"""Nothing set: the invoker's defaults (at-least-once, retried until the call's deadline)."""
