"""Request ids for tracing: the optional slices contextvar and id generation.

Owns how the invoker finds ``aether.slices.api.current_request_id`` without importing the slices
package at import time (it may not exist, and it sits beside invoke in the layering): the lookup is
lazy, per caller, and tolerant of its absence. May import only the standard library.
"""

from __future__ import annotations

import contextvars
import importlib
import uuid
from typing import Any

__all__ = ["RequestIdVar", "find_request_id_var", "new_request_id", "read_request_id"]

RequestIdVar = contextvars.ContextVar[Any]

_MODULE = "aether.slices.api"
_NAME = "current_request_id"


def find_request_id_var() -> RequestIdVar | None:
    """``aether.slices.api.current_request_id`` if that module can be imported, else None."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    var = getattr(module, _NAME, None)
    return var if isinstance(var, contextvars.ContextVar) else None


def read_request_id(var: RequestIdVar | None) -> str | None:
    """The request id currently set in `var` (None when unset, empty or not a string)."""
    if var is None:
        return None
    value = var.get(None)
    return value if isinstance(value, str) and value else None


def new_request_id() -> str:
    """A fresh request id: 16 hex digits."""
    return uuid.uuid4().hex[:16]
