"""Management API endpoints for metrics (thin: the node's `MetricsService` does the work).

- `GET /api/v1/metrics` -> `MetricsView`: the latest cluster snapshot this node received from the
  leader (or made, on the leader); before the first one, or when it is stale, this node's own figures
  with ``source: "local"`` and a ``note`` saying why;
- `GET /api/v1/metrics/history?seconds=N` -> `MetricsHistory`: the per-second cluster points of the
  last N seconds (default 300, at most 7200), served by any node from its own copy of the window
  (every snapshot carries the latest points, so no forwarding to the leader is needed);
- `GET /api/v1/metrics/stream?interval=S` -> server-sent events: ``event: metrics`` with the
  `MetricsView` as data every `interval` seconds (default 1, 0.2 to 60) until the client leaves;
- `GET /metrics`: the Prometheus text exposition of this node (a per-node registry).

Like every other endpoint they need the API key when the node has one (Prometheus: configure
``authorization: {credentials: KEY}`` in the scrape job).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Final

from aiohttp import web

from aether.api import sse
from aether.api.common import API_PREFIX, json_response, query
from aether.api.routing import Answer, Route, query_param
from aether.core.errors import BadRequest
from aether.metrics.prometheus import CONTENT_TYPE, PrometheusExporter
from aether.metrics.service import HISTORY_MAX_SECONDS, MetricsHistory, MetricsView

__all__ = ["DEFAULT_HISTORY_SECONDS", "ROUTES", "MetricsRoutes"]

DEFAULT_HISTORY_SECONDS = 300.0
STREAM_INTERVAL_RANGE = (0.2, 60.0)


class MetricsRoutes:
    def __init__(self, service: Any) -> None:
        self.svc = service
        self.exporter = PrometheusExporter(service)

    async def metrics(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.svc.view())

    async def history(self, request: web.Request) -> web.Response:
        text = query(request, ("seconds",)).get("seconds")
        seconds = DEFAULT_HISTORY_SECONDS
        if text is not None:
            try:
                seconds = float(text)
            except ValueError:
                raise BadRequest(f"seconds must be a number, not {text!r}") from None
            if not (math.isfinite(seconds) and 0 < seconds <= HISTORY_MAX_SECONDS):
                raise BadRequest(f"seconds must be more than 0 and at most {HISTORY_MAX_SECONDS} (2 hours)")
        return json_response(self.svc.history(seconds))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        text = query(request, ("interval",)).get("interval")
        interval = 1.0
        lo, hi = STREAM_INTERVAL_RANGE
        if text is not None:
            try:
                interval = float(text)
            except ValueError:
                raise BadRequest(f"interval must be a number of seconds, not {text!r}") from None
            if not (math.isfinite(interval) and lo <= interval <= hi):
                raise BadRequest(f"interval must be between {lo} and {hi} seconds, not {text}")
        resp = sse.stream_response()
        try:
            await resp.prepare(request)
            while True:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await resp.write(sse.frame("metrics", self.svc.view()))
                await asyncio.sleep(interval)
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    async def prometheus(self, request: web.Request) -> web.Response:
        query(request, ())
        return web.Response(body=self.exporter.render(), headers={"Content-Type": CONTENT_TYPE})


_TAGS = ("metrics",)
ROUTES: Final = (
    Route(
        "GET", f"{API_PREFIX}/metrics", MetricsRoutes.metrics, "getMetrics",
        "Cluster metrics: nodes (CPU, memory), entries (calls, rates, errors, latency quantiles, "
        "slow calls), totals; the leader's latest snapshot, else this node's own figures",
        {200: Answer(MetricsView, "The cluster snapshot as this node has it")}, (400,), tags=_TAGS,
    ),
    Route(
        "GET", f"{API_PREFIX}/metrics/history", MetricsRoutes.history, "getMetricsHistory",
        "Per-second cluster points of the last N seconds (the 2-hour window; any node serves "
        "it from its copy of the leader's window)",
        {200: Answer(MetricsHistory, "Points, oldest first")}, (400,),
        params=(
            query_param(
                "seconds", f"how far back (default {DEFAULT_HISTORY_SECONDS:g}), more than 0 and at most "
                f"{HISTORY_MAX_SECONDS:g}",
                type="number", exclusiveMinimum=0, maximum=HISTORY_MAX_SECONDS,
            ),
        ),
        tags=_TAGS,
    ),
    Route(
        "GET", f"{API_PREFIX}/metrics/stream", MetricsRoutes.stream, "streamMetrics",
        "Server-sent events: `event: metrics` with the same document as GET /api/v1/metrics, "
        "every `interval` seconds, until the client disconnects",
        {200: Answer(
            {"type": "string"}, "An endless event stream; each data line is a JSON metrics document",
            media=sse.MEDIA_TYPE,
        )},
        (400,),
        params=(
            query_param(
                "interval", f"seconds between events (default 1), from {STREAM_INTERVAL_RANGE[0]:g} to "
                f"{STREAM_INTERVAL_RANGE[1]:g}",
                type="number", minimum=STREAM_INTERVAL_RANGE[0], maximum=STREAM_INTERVAL_RANGE[1],
            ),
        ),
        tags=_TAGS,
    ),
    Route(
        "GET", "/metrics", MetricsRoutes.prometheus, "getPrometheusMetrics",
        "Prometheus text exposition of this node (needs the API key like every endpoint)",
        {200: Answer({"type": "string"}, "Prometheus text format", media="text/plain")}, (400,), tags=_TAGS,
    ),
)
"""The metrics endpoints (served when the node runs a metrics service)."""
