"""Context variables shared across layers.

`current_request_id` is the id of the request being served. The invoker reads it to pass the id
on through nested calls and sets it where a call runs; slices read it (re-exported as
`aether.slices.current_request_id`). It lives here, in the lowest layer, so that both can use the
same variable without importing each other.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["current_request_id"]

current_request_id: ContextVar[str | None] = ContextVar("aether_request_id", default=None)
"""The request id of the call being served (set by the runtime/invoker); propagated on `Slice.call`."""
