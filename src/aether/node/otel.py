"""The OpenTelemetry adapter of `aether.core.tracing` (a node's tracer when it traces): spans
recorded by the OpenTelemetry SDK and exported over OTLP (HTTP/protobuf).

Imported only when a node enables tracing (``--tracing otlp`` or ``[tracing]`` in aether.toml):
it needs the optional extra ``pip install aether-slices[otel]`` (``opentelemetry-sdk`` and
``opentelemetry-exporter-otlp-proto-http``). Each node gets its own `TracerProvider` (never the
process-global one), with the resource attributes ``service.name`` = the cluster name and
``service.instance.id`` / ``aether.node.id`` = the node id, so that nodes sharing one process
(tests, Aether Forge) keep theirs apart. docs/operations.md, *Tracing*.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags, TraceState

from aether.core.tracing import SpanKind, TraceContext

__all__ = ["OtelSpan", "OtelTracer"]

_KINDS = {
    "server": trace.SpanKind.SERVER,
    "client": trace.SpanKind.CLIENT,
    "internal": trace.SpanKind.INTERNAL,
}


def _state(header: str) -> TraceState:
    if not header:
        return TraceState()
    try:
        return TraceState.from_header([header])
    except Exception:  # a malformed tracestate is dropped, never an error
        return TraceState()


def _parent_context(parent: TraceContext | None) -> Context:
    if parent is None:
        return Context()  # a new trace: never the SDK's process-global current span
    sc = SpanContext(
        trace_id=int(parent.trace_id, 16),
        span_id=int(parent.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(parent.flags & 0xFF),
        trace_state=_state(parent.state),
    )
    return trace.set_span_in_context(NonRecordingSpan(sc), Context())


class OtelSpan:
    """An SDK span behind the `aether.core.tracing.Span` protocol."""

    __slots__ = ("_context", "_span")

    def __init__(self, span: trace.Span, state: str) -> None:
        self._span = span
        sc = span.get_span_context()
        self._context = TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", int(sc.trace_flags), state)

    @property
    def context(self) -> TraceContext | None:
        return self._context

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)

    def update_name(self, name: str) -> None:
        self._span.update_name(name)

    def record_error(self, exc: BaseException) -> None:
        self.set_error(type(exc).__name__, f"{type(exc).__name__}: {exc}")

    def set_error(self, error_type: str, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, description))
        self._span.set_attribute("error.type", error_type)

    def end(self) -> None:
        self._span.end()


class OtelTracer:
    """A `Tracer` recording through its own SDK `TracerProvider`.

    `exporter` (an SDK `SpanExporter`) gets each span as it ends when `batch` is False (tests:
    ``InMemorySpanExporter``), else through a `BatchSpanProcessor` (a background thread exports in
    batches: the node's loop never waits for the collector)."""

    def __init__(
        self, service_name: str, node_id: str, exporter: SpanExporter, *, batch: bool = True
    ) -> None:
        resource = Resource.create(
            {"service.name": service_name, "service.instance.id": node_id, "aether.node.id": node_id}
        )
        self.provider = TracerProvider(resource=resource)
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("aether")

    @classmethod
    def otlp(cls, service_name: str, node_id: str, endpoint: str | None) -> OtelTracer:
        """Export over OTLP/HTTP to `endpoint` (``http://HOST:4318/v1/traces``; None: the SDK's
        default or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        return cls(service_name, node_id, exporter)

    @property
    def enabled(self) -> bool:
        return True

    def start_span(
        self,
        name: str,
        parent: TraceContext | None,
        kind: SpanKind = "internal",
        attributes: dict[str, Any] | None = None,
    ) -> OtelSpan:
        span = self._tracer.start_span(
            name, context=_parent_context(parent), kind=_KINDS[kind], attributes=attributes
        )
        return OtelSpan(span, parent.state if parent is not None else "")

    def shutdown(self) -> None:
        self.provider.shutdown()
