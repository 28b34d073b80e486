"""Tracing (docs/operations.md, *Tracing*; docs/invocation.md, *Trace context*).

- `parse_traceparent`: W3C ``traceparent``/``tracestate`` parsing; anything malformed is None.
- Three in-process nodes at the invocation layer (each a real `Transport`, `InvokeServer` and
  `Invoker`, an OpenTelemetry tracer per node writing to one `InMemorySpanExporter`) run the order
  demo's slices (examples/order_demo): place-order on node B, inventory-service and pricing-service
  on node C, the HTTP router on node A. A POST /api/orders with a ``traceparent`` gives ONE trace:
  router (A) -> call -> attempt (A) -> run place-order (B) -> call/attempt (B) -> run inventory and
  pricing (C), correctly parented, spanning the three slices; a malformed ``traceparent`` starts a
  new trace; without one, the router's span is a root.
- A map operation on a node is a span in the trace of the call being served (`MapService`).
- With tracing off, a node imports nothing from opentelemetry (in a subprocess, via sys.modules).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aether.core.artifact import Artifact
from aether.core.tracing import NOOP_TRACER, TraceContext, current_trace, parse_traceparent
from aether.core.types import Address
from aether.http.server import HttpRouter
from aether.invoke import Invoker
from aether.kv.keys import RouteValue
from aether.node.otel import OtelTracer
from aether.node.tracing import make_tracer
from aether.slices import Slice, SliceContext, invoke_entry
from aether.slices.testing import LocalMaps
from aether.testing.invokenodes import Endpoint as Ep
from aether.testing.invokenodes import InvokeNode, StaticRegistry, make_invoke_node, start_nodes, stop_nodes

pytestmark = pytest.mark.timeout(60)

DEMO = Path(__file__).resolve().parents[1] / "examples" / "order_demo"
for _p in ("order-domain", "inventory-service", "pricing-service", "place-order"):
    if str(DEMO / _p) not in sys.path:
        sys.path.insert(0, str(DEMO / _p))

from inventory_service import InventoryService  # noqa: E402
from place_order import PlaceOrderService  # noqa: E402
from pricing_service import PricingService  # noqa: E402

CLUSTER = "trace-test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


# --- parsing ------------------------------------------------------------------------------------------


def test_parse_traceparent_accepts_w3c_and_keeps_tracestate() -> None:
    ctx = parse_traceparent(TRACEPARENT, "congo=t61rcWkgMzE")
    assert ctx == TraceContext(TRACE_ID, PARENT_SPAN, 1, "congo=t61rcWkgMzE")
    assert ctx.traceparent == TRACEPARENT
    # a future version may append fields; version 00 may not
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_SPAN}-00-extra") == TraceContext(
        TRACE_ID, PARENT_SPAN, 0
    )
    assert parse_traceparent(TRACEPARENT, "x" * 600) == TraceContext(TRACE_ID, PARENT_SPAN, 1, "")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        f"00-{TRACE_ID}-{PARENT_SPAN}",  # no flags
        f"00-{TRACE_ID.upper()}-{PARENT_SPAN}-01",  # upper case
        f"00-{'0' * 32}-{PARENT_SPAN}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE_ID}-{PARENT_SPAN}-01",  # forbidden version
        f"00-{TRACE_ID}-{PARENT_SPAN}-01-extra",  # extra fields on version 00
        f"00-{TRACE_ID[:-1]}-{PARENT_SPAN}-01",  # short trace id
        f"00-{TRACE_ID}-{PARENT_SPAN}-0g",  # not hex
    ],
)
def test_malformed_traceparent_is_none(bad: str) -> None:
    assert parse_traceparent(bad) is None


def test_make_tracer_off_is_the_noop_tracer() -> None:
    assert make_tracer("off", CLUSTER, "node-1") is NOOP_TRACER
    assert not NOOP_TRACER.enabled


# --- three nodes ----------------------------------------------------------------------------------------


class DemoSlices:
    """A node's slice instances: demo slice objects, run where the invoker / invoke server call."""

    def __init__(self, objs: dict[str, Slice]) -> None:
        self.objs = objs  # full coordinates -> instance

    def _find(self, target: str) -> Slice | None:
        for coords, obj in self.objs.items():
            if coords == target or coords.startswith(target + ":"):
                return obj
        return None

    def has_room(self, target: str, method: str) -> bool:
        return self._find(target) is not None

    def local_instances(self, target: str) -> list[int]:
        return [1] if self._find(target) is not None else []

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        obj = self._find(artifact)
        assert obj is not None, artifact
        return await invoke_entry(obj, method, payload)


class RoutesKV:
    def __init__(self, routes: dict[str, RouteValue]) -> None:
        self.routes = routes

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.routes.items() if k.startswith(prefix)]

    def watch(self, prefix: str, callback: Any) -> Any:
        return lambda: None


PLACE = "org.demo:place-order:0.1.0"
INVENTORY = "org.demo:inventory-service:0.1.0"
PRICING = "org.demo:pricing-service:0.1.0"
PLACEMENT = {"node-a": [], "node-b": [PLACE], "node-c": [INVENTORY, PRICING]}
CLASSES: dict[str, type[Slice]] = {
    PLACE: PlaceOrderService,
    INVENTORY: InventoryService,
    PRICING: PricingService,
}


@dataclass
class Member:
    node: InvokeNode
    tracer: OtelTracer
    slices: list[Slice]


def make_member(
    node_id: str, registry: StaticRegistry, exporter: InMemorySpanExporter, maps: LocalMaps
) -> Member:
    tracer = OtelTracer(CLUSTER, node_id, exporter, batch=False)
    objs: dict[str, Slice] = {}
    node = make_invoke_node(
        node_id,
        DemoSlices(objs),
        registry,
        cluster_name=CLUSTER,
        logger=logging.getLogger(f"test.tracing.{uuid.uuid4().hex[:6]}.{node_id}"),
        tracer=tracer,
    )
    for coords in PLACEMENT[node_id]:
        obj = CLASSES[coords]()
        obj.context = SliceContext(
            artifact=Artifact.parse(coords), node_id=node_id, instance=1,
            logger=logging.getLogger("test.tracing"), config={}, invoker=node.invoker, maps=maps,
        )  # fmt: skip
        objs[coords] = obj
    return Member(node, tracer, list(objs.values()))


@pytest.fixture
async def cluster() -> Any:
    exporter = InMemorySpanExporter()
    eps = [
        Ep(coords, method, 1, nid)
        for nid, placed in PLACEMENT.items()
        for coords in placed
        for method in ("place_order", "hold_stock", "settle", "release", "calculate_total")
    ]
    maps = LocalMaps(["orders", "stock"])  # the demo's maps (map spans: test_map_operations_...)
    members = {nid: make_member(nid, StaticRegistry(eps), exporter, maps) for nid in PLACEMENT}
    await start_nodes([m.node for m in members.values()])
    for m in members.values():
        for obj in m.slices:
            await obj.start()
    a = members["node-a"]
    router = HttpRouter(
        "node-a",
        RoutesKV({"routes/POST:/api/orders": RouteValue(
            "org.demo:place-order", "place_order", {"customerId": "body", "items": "body"}
        )}),
        a.node.invoker,
        tracer=a.tracer,
    )  # fmt: skip
    await router.start()
    try:
        yield router, exporter
    finally:
        await router.stop()
        await stop_nodes(m.node for m in members.values())
        for m in members.values():
            m.tracer.shutdown()


async def post_order(router: HttpRouter, headers: dict[str, str]) -> None:
    body = {"customerId": "CUST-123", "items": [{"productId": "PROD-ABC123", "quantity": 1}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{router.url}/api/orders", json=body, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()


def by_id(spans: Iterator[ReadableSpan] | tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def node_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["aether.node.id"])


def chain(span: ReadableSpan, spans: dict[int, ReadableSpan]) -> list[str]:
    """Names from the root down to `span`, each with its node."""
    out = []
    cur: ReadableSpan | None = span
    while cur is not None:
        out.append(f"{cur.name}@{node_of(cur)}")
        cur = spans.get(cur.parent.span_id) if cur.parent is not None else None
    return out[::-1]


async def test_a_traced_request_through_three_nodes_is_one_trace_with_parented_spans(cluster: Any) -> None:
    router, exporter = cluster
    await post_order(router, {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    spans = exporter.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}  # ONE trace: the caller's
    ids = by_id(spans)
    http = [s for s in spans if s.name == "POST /api/orders"]
    assert len(http) == 1 and node_of(http[0]) == "node-a"
    assert http[0].parent is not None and f"{http[0].parent.span_id:016x}" == PARENT_SPAN
    assert http[0].attributes["http.response.status_code"] == 200
    # every other span descends from the router's
    for s in spans:
        assert chain(s, ids)[0] == "POST /api/orders@node-a", chain(s, ids)
    runs = {s.name: s for s in spans if s.name.startswith("run ")}
    assert chain(runs[f"run {PLACE}.place_order"], ids) == [
        "POST /api/orders@node-a",
        "call org.demo:place-order.place_order@node-a",
        "attempt org.demo:place-order.place_order@node-a",
        f"run {PLACE}.place_order@node-b",
    ]
    for entry in (  # (the hold is settled by the next order's hold_stock: no settle call here)
        f"{PRICING}.calculate_total",
        f"{INVENTORY}.hold_stock",
    ):
        target = entry.split(":0.1.0")[0] + "." + entry.rsplit(".", 1)[1]
        assert chain(runs[f"run {entry}"], ids)[3:] == [
            f"run {PLACE}.place_order@node-b",
            f"call {target}@node-b",
            f"attempt {target}@node-b",
            f"run {entry}@node-c",
        ]
    # the three slices, on the three nodes' spans, kinds as documented
    assert {node_of(s) for s in spans} == {"node-a", "node-b", "node-c"}
    assert {str(s.attributes.get("aether.artifact")) for s in runs.values()} >= {PLACE, INVENTORY, PRICING}
    kinds = {s.name.split(" ")[0]: s.kind.name for s in spans}
    assert kinds == {"POST": "SERVER", "call": "INTERNAL", "attempt": "CLIENT", "run": "SERVER"}
    assert {s.resource.attributes["service.name"] for s in spans} == {CLUSTER}
    # the tracestate travels with the context
    assert all(s.context.trace_state.get("vendor") == "abc" for s in spans)


async def test_a_malformed_traceparent_starts_a_new_trace(cluster: Any) -> None:
    router, exporter = cluster
    await post_order(router, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-zz"})
    spans = exporter.get_finished_spans()
    trace_ids = {s.context.trace_id for s in spans}
    assert len(trace_ids) == 1 and f"{trace_ids.pop():032x}" != TRACE_ID
    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == ["POST /api/orders"]
    assert len(spans) > 4  # the whole call tree joined the new trace


async def test_an_untraced_node_still_passes_the_context_on() -> None:
    """With tracing off the invoker records nothing but still sends the caller's context."""
    sent: list[Any] = []

    class Link:
        up_peers = frozenset({"node-b"})

        def send(self, node: str, msg: Any) -> bool:
            sent.append(msg)
            return False  # refused: the call retries until its deadline

    invoker = Invoker("node-a", DemoSlices({}), StaticRegistry([Ep(PLACE, "m", 1, "node-b")]), Link())
    token = current_trace.set(parse_traceparent(TRACEPARENT, "v=1"))
    try:
        with pytest.raises(Exception):  # noqa: B017 - the call cannot succeed; what it sent matters
            await invoker.invoke("org.demo:place-order", "m", b"", timeout=0.05)
    finally:
        current_trace.reset(token)
    assert sent and all((m.traceparent, m.tracestate) == (TRACEPARENT, "v=1") for m in sent)


# --- map operations ------------------------------------------------------------------------------------


async def test_map_operations_are_spans_of_the_call_being_served(tmp_path: Path) -> None:
    """A map operation is a client span in the caller's trace; the partition's primary on another
    node records a server span under it (the context travels in `MapRequest`)."""
    from aether.api.server import ManagementServer
    from aether.core.config import NodeConfig
    from aether.maps.partitioning import partition_of
    from aether.node.node import Node
    from maps_cluster import MapCluster

    exporter = InMemorySpanExporter()

    class Traced(MapCluster):
        def _make(self, i: int) -> Node:
            return Node(
                NodeConfig(
                    node_id=f"node-{i + 1}", peers=self.peers, cluster_port=self.peers[i].address.port,
                    management_port=0, http_port=0, data_dir=str(self.tmp / f"n{i + 1}"),
                    repository=str(self.tmp / "repo"), cluster_name=CLUSTER,
                ),
                management_api=ManagementServer,
                tracer=OtelTracer(CLUSTER, f"node-{i + 1}", exporter, batch=False),
            )  # fmt: skip

    c = Traced(tmp_path, 2)
    await c.start("node-1", "node-2")
    try:
        await c.wait_table(["node-1", "node-2"])
        await c.define("orders")
        maps = c.node("node-1").maps
        table = maps.table
        assert table is not None
        key = next(
            k
            for k in (f"k{i}" for i in range(1000))
            if table.primary(partition_of(k, table.partitions)) == "node-2"
        )
        token = current_trace.set(parse_traceparent(TRACEPARENT))
        try:
            await maps.map_put("orders", key, msgspec.msgpack.encode(1))
            assert await maps.map_get("orders", key) is not None
            assert await maps.map_keys("orders") == [key]
        finally:
            current_trace.reset(token)
    finally:
        await c.stop_all()
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("map.")]
    client = [s for s in spans if s.kind.name == "CLIENT"]
    assert [s.name for s in client] == ["map.put orders", "map.get orders", "map.keys orders"]
    for s in client:
        assert f"{s.context.trace_id:032x}" == TRACE_ID and node_of(s) == "node-1"
        assert s.parent is not None and f"{s.parent.span_id:016x}" == PARENT_SPAN
        assert s.attributes["aether.map"] == "orders"
    served = {s.name: s for s in spans if s.kind.name == "SERVER"}
    assert set(served) == {"map.serve put orders", "map.serve get orders"}
    for verb in ("put", "get"):
        s, parent = (
            served[f"map.serve {verb} orders"],
            next(x for x in client if x.name == f"map.{verb} orders"),
        )
        assert node_of(s) == "node-2" and s.parent is not None
        assert s.parent.span_id == parent.context.span_id and s.context.trace_id == parent.context.trace_id


# --- tracing off imports nothing -------------------------------------------------------------------------


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    code = f"""
import asyncio, sys
from aether.core.config import NodeConfig
from aether.core.types import Address, PeerSpec
from aether.node.node import Node

async def main():
    node = Node(NodeConfig(node_id="node-1", peers=[PeerSpec("node-1", Address("127.0.0.1", 0))],
                           cluster_port=0, management_port=0, http_port=0, data_dir={str(tmp_path)!r},
                           repository={str(tmp_path / "repo")!r}))
    assert not node.tracer.enabled
    import aether.http.server, aether.invoke, aether.maps, aether.slices  # noqa
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- OTLP export from a node ------------------------------------------------------------------------------


async def test_a_node_with_tracing_otlp_exports_its_spans_to_the_endpoint(tmp_path: Path) -> None:
    """`tracing = "otlp"`: the node's router span reaches an OTLP/HTTP endpoint (a stand-in
    collector here) with the cluster as service name and the node id as resource attributes."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from aether.core.config import NodeConfig
    from aether.core.types import PeerSpec
    from aether.node.node import Node
    from conftest import free_ports

    got: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        got.append(msg)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    (cport,) = free_ports(1)
    node = Node(
        NodeConfig(
            node_id="node-1", peers=[PeerSpec("node-1", Address("127.0.0.1", cport))], cluster_port=cport,
            management_port=0, http_port=0, data_dir=str(tmp_path / "n1"), repository=str(tmp_path / "repo"),
            cluster_name=CLUSTER, tracing="otlp", otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
        )
    )  # fmt: skip
    try:
        assert node.tracer.enabled
        await node.start(management=False)
        assert node.http is not None
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{node.http.url}/nowhere", headers={"traceparent": TRACEPARENT}) as r,
        ):
            assert r.status in (404, 503)
    finally:
        await node.stop()  # flushes the batch
        await runner.cleanup()
    spans = [
        (rs.resource, span)
        for req in got
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    http = [(res, sp) for res, sp in spans if sp.name == "HTTP GET"]
    assert len(http) == 1, [sp.name for _, sp in spans]
    res, sp = http[0]
    assert sp.trace_id.hex() == TRACE_ID and sp.parent_span_id.hex() == PARENT_SPAN
    attrs = {kv.key: kv.value.string_value for kv in res.attributes}
    assert attrs["service.name"] == CLUSTER
    assert attrs["service.instance.id"] == attrs["aether.node.id"] == "node-1"


async def test_a_5xx_answer_marks_the_router_span_failed_and_a_4xx_does_not() -> None:
    from aether.invoke.errors import InvokeTimeout

    exporter = InMemorySpanExporter()
    tracer = OtelTracer(CLUSTER, "node-a", exporter, batch=False)

    class Timing:
        async def invoke(self, target: str, method: str, payload: bytes, **kw: Any) -> bytes:
            if method == "slow":
                raise InvokeTimeout("deadline passed", target=target, method=method)
            return msgspec.msgpack.encode("ok")

    routes = {
        "routes/GET:/slow": RouteValue("g:a", "slow", {}),
        "routes/GET:/fast": RouteValue("g:a", "fast", {}),
    }
    router = HttpRouter("node-a", RoutesKV(routes), Timing(), tracer=tracer)
    await router.start()
    try:
        async with aiohttp.ClientSession() as s:
            for path, status in (("/slow", 504), ("/fast", 200), ("/missing", 404)):
                async with s.get(f"{router.url}{path}") as r:
                    assert r.status == status
    finally:
        await router.stop()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["GET /slow"].status.status_code.name == "ERROR"
    assert spans["GET /slow"].attributes["error.type"] == "504"
    assert spans["GET /fast"].status.status_code.name == "UNSET"
    assert spans["HTTP GET"].status.status_code.name == "UNSET"  # the 404: no route matched
    assert spans["HTTP GET"].attributes["http.response.status_code"] == 404
