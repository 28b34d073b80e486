"""A slice's resolved configuration and the redaction of secret values (docs/slices.md, *Configuration*).

`ResolvedConfig` is what the node hands the slice runtime for one artifact: the config table with
every `{ secret = "NAME" }` reference replaced by the secret's value, plus those values, so that
whatever the runtime reports about the slice (a FAILED reason, a log line) can be passed through
`redact` first. Shared by `aether.deploy.config` (which resolves) and `aether.slices` (which
decodes, starts and reports), hence here in the lowest layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aether.core.errors import BadRequest

__all__ = ["REDACTED", "MissingSecret", "ResolvedConfig", "redact"]

REDACTED = "***"


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """A slice's config with its secrets filled in; `secrets` are the values used (to redact)."""

    values: dict[str, Any] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()


class MissingSecret(BadRequest):
    """A config names a secret that is not set. The message names the secret, never a value."""


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret value replaced by `***` (longest first, so a
    value containing another is replaced whole)."""
    for value in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text
