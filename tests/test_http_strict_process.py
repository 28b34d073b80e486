"""Issue 11, items 5, 6 and 8 on a real 3-node cluster (`aether cluster start`, real processes).

- fail fast: invoking an artifact that is not deployed answers 404 at once, an unknown entry 404,
  an artifact whose only instance is still starting 503 with ``Retry-After`` at once; the route
  of a slice whose start() raises 503 with the reason on every router (not 404 "no route");
- strict HTTP input through a node's router: deep nesting, huge integers, unknown query
  parameters and body fields -> 400, a body without a JSON content type -> 415, an entry whose
  answer does not fit its annotation -> 500 naming the entry (and logged) -- and the node lives;
- metrics: those 4xx answers are client errors, not failures.

One cluster for the module (starting one costs seconds on a 2-core machine); every node is stopped
by its recorded PID when the module ends.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import HOST, LocalCluster, deploy_hello_examples

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

STRICT = """
import msgspec
from aether.slices import NotFound, Slice, route


class Order(msgspec.Struct):
    item: str
    qty: int


class Strict(Slice):
    @route("POST", "/strict/orders")
    async def place(self, req: Order) -> Order:
        if req.item == "none":
            raise NotFound("no such item")
        return req

    @route("GET", "/strict/echo/{word}")
    async def echo(self, word: str, times: int = 1) -> str:
        return word * times

    @route("GET", "/strict/count")
    async def count(self) -> int:
        return "three"
"""

SLOW_START = """
import asyncio
from aether.slices import Slice, entry


class SlowStart(Slice):
    async def start(self) -> None:
        await asyncio.sleep(5)

    @entry
    async def ping(self) -> str:
        return "pong"
"""

BROKEN_START = """
from aether.slices import Slice, route


class BrokenStart(Slice):
    async def start(self) -> None:
        raise RuntimeError("database unreachable")

    @route("GET", "/broken/{name}")
    async def get(self, name: str) -> str:
        return name
"""

BROKEN_IMPORT = """
import aether_no_such_module  # the wheel does not ship it: importing the slice fails
from aether.slices import Slice, route


class BrokenImport(Slice):
    @route("GET", "/brokenimport/{name}")
    async def get(self, name: str) -> str:
        return name
"""


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any, float]:
    """(status, headers, decoded JSON body, seconds taken)."""
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", data=body, method=method, headers=headers or {}
    )
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, h, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, h, raw = e.code, dict(e.headers), e.read()
    took = time.monotonic() - t0
    return status, h, json.loads(raw) if raw else None, took


JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = tmp_path_factory.mktemp("strict")
    lc = LocalCluster(base / "cluster", 3)
    try:
        deploy_hello_examples(
            lc.repository,
            base / "wheels",
            extra={
                "org.example:strict:0.1.0": (STRICT, "Strict"),
                "org.example:slowstart:0.1.0": (SLOW_START, "SlowStart"),
                "org.example:brokenstart:0.1.0": (BROKEN_START, "BrokenStart"),
                "org.example:brokenimport:0.1.0": (BROKEN_IMPORT, "BrokenImport"),
            },
        )
        out = lc.start()
        assert out.returncode == 0, out.stdout + out.stderr
        status, doc = lc.api(
            0, "POST", "/api/v1/deploy", {"artifact": "org.example:strict:0.1.0", "instances": 1}
        )
        assert status == 201, doc
        status, doc = lc.api(
            0, "POST", "/api/v1/blueprints/direct:org.example:strict/wait?timeout=60", timeout=70
        )
        assert status == 200, doc
        yield lc
    finally:
        lc.close()


def test_fail_fast_invoke(cluster: LocalCluster) -> None:
    port = cluster.management_port(0)
    # not deployed anywhere: 404 at once (it used to wait the whole 10 s, then 503 "after 0 attempt(s)")
    status, _, doc, took = request(port, "POST", "/api/v1/invoke/org.example:nothing/greet", b"{}", JSON)
    assert status == 404, doc
    assert "org.example:nothing is not deployed" in doc["detail"] and "attempt" not in doc["detail"]
    assert took < 2.0, took
    # deployed, but no such entry: 404 at once, naming the entries it has
    status, _, doc, took = request(port, "POST", "/api/v1/invoke/org.example:strict/nope", b"{}", JSON)
    assert status == 404 and "no entry 'nope'" in doc["detail"] and "place" in doc["detail"], doc
    assert took < 2.0, took
    # deployed, only instance still in start() (5 s): 503 with Retry-After at once
    status, doc = cluster.api(
        1, "POST", "/api/v1/deploy", {"artifact": "org.example:slowstart:0.1.0", "instances": 1}
    )
    assert status == 201, doc
    for i in range(3):  # every node answers alike (each reads its own replica)
        deadline = time.monotonic() + 5
        while True:  # the deploy may not be applied on node i yet: then it is still "not deployed"
            status, headers, doc, took = request(
                cluster.management_port(i), "POST", "/api/v1/invoke/org.example:slowstart/ping", None
            )
            if status != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503, doc
        assert headers.get("Retry-After") == "1" and "no ACTIVE instance" in doc["detail"], (headers, doc)
        assert took < 2.0, took
    # ... and once it is ACTIVE the call succeeds
    status, doc = cluster.api(
        0, "POST", "/api/v1/blueprints/direct:org.example:slowstart/wait?timeout=60", timeout=70
    )
    assert status == 200, doc
    status, _, doc, _ = request(port, "POST", "/api/v1/invoke/org.example:slowstart/ping", None)
    assert (status, doc) == (200, "pong")


def test_route_of_a_slice_whose_start_fails_is_503_with_the_reason(cluster: LocalCluster) -> None:
    """Found walking docs/slices.md: the route of a deployed slice whose start() raises answered 404
    "no route" on every router (routes were published only once the slice was ACTIVE), while the
    invoke API answered 503 with the reason. It is that 503 on the router too; an unknown path is
    still 404."""
    status, doc = cluster.api(
        0, "POST", "/api/v1/deploy", {"artifact": "org.example:brokenstart:0.1.0", "instances": 1}
    )
    assert status == 201, doc
    deadline = time.monotonic() + 30
    first = {}  # node -> its first answer that is not a 404 (the route is not claimed at once)
    reasons: set[int] = set()
    while len(reasons) < 3 and time.monotonic() < deadline:
        for i in range(3):
            status, headers, doc, _ = request(cluster.http_port(i), "GET", "/broken/ann")
            if status == 404 and i not in first:
                continue  # this node's replica does not have the blueprint yet
            first.setdefault(i, status)
            assert status == 503 and doc["status"] == 503, (i, status, doc)  # never 404 again
            assert headers.get("Retry-After") == "1", doc  # loading, starting, or FAILED: retried
            if "no route for GET /broken/ann yet" in doc["detail"]:  # loading: routes not known yet
                assert "org.example:brokenstart" in doc["detail"], doc
            elif "every instance FAILED" not in doc["detail"]:  # placed again meanwhile: starting
                assert "no ACTIVE instance" in doc["detail"], doc
            if "database unreachable" in doc["detail"]:
                reasons.add(i)
        time.sleep(0.1)
    assert len(first) == 3, f"routers {sorted(set(range(3)) - set(first))} answered only 404 'no route'"
    assert reasons == {0, 1, 2}, (first, reasons)
    status, _, doc, _ = request(cluster.http_port(0), "GET", "/broken")
    assert status == 404 and "no route for GET /broken" in doc["detail"], doc
    status, doc = cluster.api(0, "DELETE", "/api/v1/blueprints/direct:org.example:brokenstart")
    assert status in (200, 204), doc


def test_path_of_a_slice_whose_wheel_fails_to_import_is_503_with_the_reason(cluster: LocalCluster) -> None:
    """Found by an audit: a slice's routes come from its class, so a wheel that fails to import
    never declares them and its paths answered 404 "no route" on every router. The routers cannot
    know its paths, so a path that matches no route answers 503 with Retry-After: 1 and the import
    error while it is deployed; 404 again once it is not."""
    status, doc = cluster.api(
        0, "POST", "/api/v1/deploy", {"artifact": "org.example:brokenimport:0.1.0", "instances": 1}
    )
    assert status == 201, doc
    deadline = time.monotonic() + 60
    reasons: set[int] = set()
    while len(reasons) < 3 and time.monotonic() < deadline:
        for i in range(3):
            status, headers, doc, _ = request(cluster.http_port(i), "GET", "/brokenimport/ann")
            if status == 404:
                continue  # this node's replica does not have the blueprint yet
            assert status == 503 and headers.get("Retry-After") == "1", (i, status, doc)
            assert "no route for GET /brokenimport/ann yet" in doc["detail"], doc
            assert "org.example:brokenimport" in doc["detail"], doc
            if "No module named 'aether_no_such_module'" in doc["detail"]:
                assert "failed to load" in doc["detail"] or "load failed" in doc["detail"], doc
                reasons.add(i)
        time.sleep(0.1)
    assert reasons == {0, 1, 2}, f"routers {sorted({0, 1, 2} - reasons)} did not give the import error"
    status, doc = cluster.api(0, "DELETE", "/api/v1/blueprints/direct:org.example:brokenimport")
    assert status in (200, 204), doc
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, _, doc, _ = request(cluster.http_port(1), "GET", "/brokenimport/ann")
        if status == 404:
            break
        time.sleep(0.1)
    assert status == 404 and doc["detail"] == "no route for GET /brokenimport/ann", doc


def test_http_edge_cases(cluster: LocalCluster) -> None:
    port = cluster.http_port(1)
    ok = b'{"item": "pen", "qty": 2}'
    status, _, doc, _ = request(port, "POST", "/strict/orders", ok, JSON)
    assert (status, doc) == (200, {"item": "pen", "qty": 2})
    cases: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
        ("POST", "/strict/orders", b"[" * 100_000, JSON, 400, "nested more than 64 levels"),
        ("POST", "/strict/orders", b"[" * 100_000 + b"]" * 100_000, JSON, 400, "nested more than 64 levels"),
        (
            "POST",
            "/strict/orders",
            b'{"item": "pen", "qty": 1' + b"0" * 40 + b"}",
            JSON,
            400,
            "`$.qty` is out of range",
        ),
        (
            "POST",
            "/strict/orders",
            b'{"item": "pen", "qty": 2, "colour": "red"}',
            JSON,
            400,
            "unknown field 'colour'",
        ),
        ("GET", "/strict/echo/hi?times=2&loud=1", None, {}, 400, "unknown query parameter 'loud'"),
        ("POST", "/strict/orders", ok, {"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
        ("POST", "/strict/orders", ok, {}, 415, "Content-Type: application/json"),
        (
            "GET",
            "/strict/count",
            None,
            {},
            500,
            "Strict.count returned str, but its return annotation is int",
        ),
        ("POST", "/strict/orders", b'{"item": "none", "qty": 1}', JSON, 404, "no such item"),
    ]
    for method, path, body, headers, want, text in cases:
        status, _, doc, _ = request(port, method, path, body, headers)
        assert status == want and text in doc["detail"], (method, path, (body or b"")[:60], status, doc)
    # the node lives and still serves
    status, _, doc, _ = request(port, "GET", "/strict/echo/hi?times=2")
    assert (status, doc) == (200, "hihi")
    # the bad answer is logged on the node that ran it, naming the entry
    logs = "".join(cluster.log_text(i) for i in range(3))
    assert "Strict.count returned str, but its return annotation is int" in logs


def test_metrics_count_client_errors_apart_from_failures(cluster: LocalCluster) -> None:
    port = cluster.http_port(2)
    for body in (b'{"item": "none", "qty": 1}', b'{"item": "pen", "qty": "x"}', b'{"item": "pen", "qty": 1}'):
        request(port, "POST", "/strict/orders", body, JSON)
    request(port, "GET", "/strict/count")

    def place() -> dict[str, Any] | None:
        status, doc = cluster.api(0, "GET", "/api/v1/metrics")
        assert status == 200, doc
        return next((e for e in doc["entries"] if e["entry"] == "place"), None)

    deadline = time.monotonic() + 15
    while (e := place()) is None or e["calls"] < 3:
        assert time.monotonic() < deadline, e
        time.sleep(0.2)
    # earlier tests called `place` too; every 4xx is a client error, none is a failure
    assert e["client_errors"] >= 2 and e["failures"] == 0, e
    assert e["successes"] + e["client_errors"] == e["calls"], e
    deadline = time.monotonic() + 15
    while True:
        _, doc = cluster.api(0, "GET", "/api/v1/metrics")
        count = next((x for x in doc["entries"] if x["entry"] == "count"), None)
        if count is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert count is not None and count["failures"] >= 1 and count["client_errors"] == 0, count
