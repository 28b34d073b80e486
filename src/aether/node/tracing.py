"""The tracer a node's configuration asks for (docs/operations.md, *Tracing*).

Kept apart from `aether.node.otel` so that a node with tracing off imports nothing from
opentelemetry: `make_tracer` imports the adapter only for ``otlp``.
"""

from __future__ import annotations

from aether.core.errors import ConfigError
from aether.core.tracing import NOOP_TRACER, Tracer

__all__ = ["make_tracer"]


def make_tracer(kind: str, service_name: str, node_id: str, endpoint: str | None = None) -> Tracer:
    """The tracer a node's configuration asks for: `NOOP_TRACER` for ``off``; for ``otlp`` an
    OpenTelemetry tracer exporting to `endpoint` (`aether.node.otel`, imported only now), with
    service name `service_name` (the cluster name) and the node id as resource attributes.
    Raises `ConfigError` when the OpenTelemetry packages are not installed."""
    if kind == "off":
        return NOOP_TRACER
    if kind != "otlp":
        raise ConfigError(f"tracing must be off or otlp (got {kind!r})")
    try:
        from aether.node.otel import OtelTracer
    except ImportError as e:
        raise ConfigError(
            f"tracing = otlp needs the OpenTelemetry SDK and OTLP exporter ({e}): "
            "pip install 'aether-slices[otel]'"
        ) from None
    return OtelTracer.otlp(service_name, node_id, endpoint)
