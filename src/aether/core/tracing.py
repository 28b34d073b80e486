"""Tracing: the W3C trace context of the call being served and a small tracer facade.

Owns `TraceContext` (a W3C ``traceparent`` and its ``tracestate``: parsing and formatting), the
`current_trace` context variable (the context of the span being served: the parent of any span
started now, and what a call made now carries to the node that runs it), and the `Tracer` /
`Span` protocols that the HTTP router, the invoker, the invoke server and the map service start
spans through. The default tracer, `NOOP_TRACER`, records nothing: components check
``tracer.enabled`` and skip every span on their hot paths, so tracing off costs one attribute read
(the trace context itself still travels, one context variable read per call).

The OpenTelemetry adapter (`aether.node.otel`, the optional extra ``aether-slices[otel]``) is imported
only when a node enables tracing (`aether.node.tracing.make_tracer`): nothing here imports
opentelemetry, and nothing here does I/O. docs/operations.md, *Tracing*;
docs/invocation.md, *Trace context*.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any, Final, Literal, Protocol

import msgspec

__all__ = [
    "NOOP_SPAN",
    "NOOP_TRACER",
    "NoopTracer",
    "Span",
    "SpanKind",
    "TraceContext",
    "Tracer",
    "current_trace",
    "parse_traceparent",
    "trace_fields",
]

SpanKind = Literal["server", "client", "internal"]

_TRACEPARENT_RE: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_TRACESTATE_MAX: Final = 512  # W3C: at most 32 members; a longer header is dropped, not cut


class TraceContext(msgspec.Struct, frozen=True, gc=False):
    """One span's W3C trace context: 32 hex digits of trace id, 16 of span id, the trace flags
    (bit 0: sampled) and the vendor ``tracestate`` passed on unchanged ("" when none)."""

    trace_id: str
    span_id: str
    flags: int = 1
    state: str = ""

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` header value (version 00)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse_traceparent(value: str | None, state: str | None = None) -> TraceContext | None:
    """The context a ``traceparent`` header (and its ``tracestate``) gives; None when it is absent
    or malformed (a bad version, length, non-hex or upper-case digits, an all-zero trace or span
    id, version ff, or extra fields on version 00): the caller then starts a new trace, never
    fails. A ``tracestate`` longer than 512 characters is dropped."""
    if not value:
        return None
    m = _TRACEPARENT_RE.match(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    st = state.strip() if state else ""
    if len(st) > _TRACESTATE_MAX or not st.isprintable():
        st = ""
    return TraceContext(trace_id, span_id, int(flags, 16), st)


def trace_fields(ctx: TraceContext | None) -> tuple[str, str]:
    """(traceparent, tracestate) to put in a message; ("", "") for no context."""
    if ctx is None:
        return "", ""
    return ctx.traceparent, ctx.state


current_trace: ContextVar[TraceContext | None] = ContextVar("aether_trace", default=None)
"""The trace context of the span being served (None outside a traced call): the parent of spans
started now; calls made now carry it (or their own span's context) to the node that runs them."""


class Span(Protocol):
    """A started span; `end` it exactly once."""

    @property
    def context(self) -> TraceContext | None:
        """This span's context (what children name as parent); None for the no-op span."""
        ...

    def set_attribute(self, key: str, value: str | int | float | bool) -> None: ...

    def update_name(self, name: str) -> None: ...

    def record_error(self, exc: BaseException) -> None:
        """Mark the span failed with `exc` (its type and text)."""
        ...

    def set_error(self, error_type: str, description: str) -> None:
        """Mark the span failed without an exception (e.g. an HTTP 5xx answer)."""
        ...

    def end(self) -> None: ...


class Tracer(Protocol):
    """Starts spans. `enabled` False means every span is the no-op one: callers skip the work."""

    @property
    def enabled(self) -> bool: ...

    def start_span(
        self,
        name: str,
        parent: TraceContext | None,
        kind: SpanKind = "internal",
        attributes: dict[str, Any] | None = None,
    ) -> Span:
        """Start a span named `name`, a child of `parent` (None: the root of a new trace)."""
        ...

    def shutdown(self) -> None:
        """Flush and stop exporting (node stop)."""
        ...


class _NoopSpan:
    __slots__ = ()

    @property
    def context(self) -> TraceContext | None:
        return None

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def record_error(self, exc: BaseException) -> None:
        pass

    def set_error(self, error_type: str, description: str) -> None:
        pass

    def end(self) -> None:
        pass


NOOP_SPAN: Final[Span] = _NoopSpan()


class NoopTracer:
    """The tracer of a node without tracing: records nothing (`enabled` is False)."""

    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def start_span(
        self,
        name: str,
        parent: TraceContext | None,
        kind: SpanKind = "internal",
        attributes: dict[str, Any] | None = None,
    ) -> Span:
        return NOOP_SPAN

    def shutdown(self) -> None:
        pass


NOOP_TRACER: Final[Tracer] = NoopTracer()
