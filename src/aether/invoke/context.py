"""Request ids for tracing: the request-id context variable and id generation.

The variable is `aether.core.context.current_request_id` (also `aether.slices.current_request_id`):
the invoker reads it to pass an id on through nested calls and sets it where a call runs.
"""

from __future__ import annotations

import contextvars
import uuid
from typing import Any

from aether.core.context import current_request_id

__all__ = ["RequestIdVar", "current_request_id", "new_request_id", "read_request_id"]

RequestIdVar = contextvars.ContextVar[Any]


def read_request_id(var: RequestIdVar | None) -> str | None:
    """The request id currently set in `var` (None when unset, empty or not a string)."""
    if var is None:
        return None
    value = var.get(None)
    return value if isinstance(value, str) and value else None


def new_request_id() -> str:
    """A fresh request id: 16 hex digits."""
    return uuid.uuid4().hex[:16]
