"""One error model (issue 13 §2): every error declares its HTTP status and its invoke wire kind where
it is defined, one function turns any error into a problem document, and the HTTP router and the
management API answer the same error with the same status."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest

from aether.api.server import ManagementServer
from aether.core.errors import AetherError, wire_kind_of
from aether.core.problem import (
    INTERNAL_DETAIL,
    Problem,
    decode_problem,
    is_internal,
    problem_for,
    problem_headers,
)
from aether.http.server import HttpRouter
from aether.invoke.errors import (
    EndpointUnavailable,
    IndeterminateOutcome,
    InvokeBadRequest,
    InvokeError,
    InvokerClosed,
    InvokeTimeout,
    NotDeployed,
    PoisonRequest,
    SliceAppError,
    UnknownEntryError,
)
from aether.kv.keys import RouteValue
from test_api_ops import FakeNode
from test_http_server import ART, FakeInvoker, FakeKV

pytestmark = pytest.mark.timeout(30)

MODULES = (
    "aether.core.errors",
    "aether.core.maps",
    "aether.core.jsonbody",
    "aether.invoke.errors",
    "aether.slices.errors",
    "aether.slices.isolation",
    "aether.deploy.errors",
    "aether.deploy.node_manager",
    "aether.http.routes",
    "aether.api.auth",
    "aether.api.map_routes",
    "aether.consensus.storage",
    "aether.transport.framing",
)

# class -> (HTTP status of an instance, invoke wire kind of an instance escaping an entry);
# None: no status of its own (an internal failure: 500 with a generic detail, logged)
TABLE: dict[str, tuple[int | None, str]] = {
    "aether.core.errors.AetherError": (None, "app_error"),
    "aether.core.errors.QuorumLost": (503, "app_error"),
    "aether.core.errors.CommitTimeout": (504, "app_error"),
    "aether.core.errors.NotReady": (503, "app_error"),
    "aether.core.errors.BadRequest": (400, "bad_request"),
    "aether.core.errors.TooLarge": (413, "bad_request"),
    "aether.core.errors.SessionConflict": (500, "app_error"),
    "aether.core.errors.ConfigError": (None, "app_error"),
    "aether.core.errors.StatusError": (500, "status:500"),
    "aether.core.errors.Unauthorized": (401, "status:401"),
    "aether.core.errors.Forbidden": (403, "status:403"),
    "aether.core.errors.RequestTimeout": (408, "status:408"),
    # every slot and the queue of an instance are full: retried on another instance by the invoker
    "aether.core.errors.Overloaded": (503, "overloaded"),
    "aether.core.maps.MapError": (None, "app_error"),
    "aether.core.maps.UnknownMap": (404, "app_error"),
    "aether.core.maps.MapDefinitionConflict": (409, "status:409"),
    "aether.core.maps.MapKeyError": (400, "bad_request"),
    "aether.core.maps.MapValueTooLarge": (400, "bad_request"),
    "aether.core.maps.MapTtlError": (400, "bad_request"),
    "aether.core.maps.MapValueDecodeError": (None, "app_error"),
    "aether.core.maps.MapValueTypeError": (None, "app_error"),
    "aether.core.maps.MapUnavailable": (503, "status:503"),
    "aether.core.maps.MapContention": (503, "status:503"),
    "aether.core.jsonbody.UnsupportedMediaType": (415, "status:415"),
    "aether.invoke.errors.InvokeError": (502, "app_error"),
    "aether.invoke.errors.InvokeTimeout": (504, "app_error"),
    "aether.invoke.errors.InvokeBadRequest": (400, "app_error"),
    "aether.invoke.errors.UnknownEntryError": (404, "app_error"),
    "aether.invoke.errors.SliceAppError": (502, "app_error"),
    "aether.invoke.errors.NotDeployed": (404, "app_error"),
    "aether.invoke.errors.EndpointUnavailable": (503, "app_error"),
    "aether.invoke.errors.PoisonRequest": (502, "app_error"),
    # a non-idempotent call that may have run: the caller's caller must not repeat it blindly either
    "aether.invoke.errors.IndeterminateOutcome": (502, "indeterminate"),
    # a blueprint's policy for an entry the artifact lacks: the activation's FAILED reason, no answer
    "aether.deploy.node_manager.UnknownEntryPolicy": (None, "app_error"),
    # escaping an entry: the entry ran, and its node stopped it (retried only if idempotent)
    "aether.invoke.errors.InvokerClosed": (503, "interrupted"),
    # every instance was overloaded: 503 + Retry-After to the caller, not retried by the caller's caller
    "aether.invoke.errors.InvokeOverloaded": (503, "status:503"),
    "aether.slices.errors.SliceError": (None, "app_error"),
    "aether.slices.errors.SliceDefinitionError": (None, "app_error"),
    "aether.slices.errors.EntryBadRequest": (400, "bad_request"),
    "aether.slices.errors.UnknownEntry": (404, "unknown_entry"),
    "aether.slices.errors.NoLocalInstance": (503, "no_instance"),
    "aether.slices.errors.InstanceStopping": (503, "shutting_down"),
    "aether.slices.errors.InstanceOverloaded": (503, "overloaded"),
    # a fault injected on the instance on purpose (Forge, tests): its own kind, not retried
    "aether.slices.errors.InjectedFault": (500, "injected_fault"),
    "aether.slices.errors.SliceHttpError": (500, "status:500"),
    "aether.slices.errors.NotFound": (404, "status:404"),
    "aether.slices.errors.Conflict": (409, "status:409"),
    "aether.slices.errors.SliceCallError": (None, "app_error"),
    "aether.slices.errors.ResponseEncodeError": (None, "app_error"),
    "aether.slices.errors.ResponseTypeError": (500, "status:500"),
    "aether.slices.errors.InvalidWheel": (400, "bad_request"),
    "aether.slices.errors.WheelTooLarge": (400, "bad_request"),
    "aether.slices.errors.WheelRecordMismatch": (400, "bad_request"),
    "aether.slices.errors.NotASliceWheel": (400, "bad_request"),
    "aether.slices.errors.ArtifactNotFound": (None, "app_error"),
    "aether.slices.errors.SliceLoadError": (None, "app_error"),
    "aether.slices.errors.SliceConflict": (None, "app_error"),
    "aether.slices.errors.SliceStartError": (None, "app_error"),
    "aether.slices.errors.SliceStateError": (None, "app_error"),
    "aether.slices.isolation.SliceCrashed": (None, "app_error"),
    "aether.slices.isolation.SliceBlocked": (None, "app_error"),
    # still running when its slice's loop closed: it may have partly run (retried if idempotent)
    "aether.slices.isolation.SliceStopped": (503, "interrupted"),
    "aether.deploy.errors.BlueprintError": (400, "bad_request"),
    "aether.deploy.errors.AdmissionRejected": (400, "bad_request"),
    "aether.deploy.errors.DeploymentFailed": (409, "app_error"),
    "aether.deploy.errors.ConvergenceTimeout": (504, "app_error"),
    "aether.deploy.errors.RolloutConflict": (409, "app_error"),
    "aether.deploy.errors.RolloutNotFound": (404, "app_error"),
    "aether.deploy.errors.BlueprintNotFound": (404, "app_error"),
    "aether.deploy.node_manager.RouteConflict": (None, "app_error"),
    "aether.http.routes.BodyTooLarge": (413, "bad_request"),
    "aether.api.auth.Conflict": (409, "status:409"),
    "aether.api.auth.NotFound": (404, "status:404"),
    "aether.api.map_routes._TooLarge": (413, "status:413"),
    # this node's journal failed (a full disk): it stops, the others may still commit (unknown outcome)
    "aether.consensus.storage.JournalError": (503, "app_error"),
    "aether.consensus.storage.JournalCorrupt": (None, "app_error"),
    "aether.transport.framing.FrameTooLarge": (None, "app_error"),
}

# constructors that need more than a message
_ARGS: dict[str, dict[str, Any]] = {
    "Forbidden": {"required_role": "admin"},
    "EntryBadRequest": {"entry": "Orders.place"},
    "ResponseTypeError": {"entry": "E.f", "expected": "int", "actual": "str"},
}


def _classes() -> Iterator[type[AetherError]]:
    for name in MODULES:
        importlib.import_module(name)
    todo, seen = [AetherError], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if cls.__module__ in MODULES:
            yield cls


def _make(cls: type[AetherError]) -> AetherError:
    if cls.__name__ in ("BodyTooLarge", "FrameTooLarge"):
        return cls(2048, 1024)  # type: ignore[call-arg]
    if cls.__name__ == "_TooLarge":
        return cls(2048)  # type: ignore[call-arg]
    return cls("the message", **_ARGS.get(cls.__name__, {}))


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_every_error_class_is_pinned() -> None:
    """A new error class must declare its status and kind here (and so decide them)."""
    assert {_name(c) for c in _classes()} == set(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_error_declares_its_status_and_kind(name: str) -> None:
    cls = next(c for c in _classes() if _name(c) == name)
    exc = _make(cls)
    status, kind = TABLE[name]
    assert exc.status == status
    assert wire_kind_of(exc) == kind
    problem = problem_for(exc)
    assert is_internal(exc) is (status is None)
    if status is None:
        assert problem == Problem("about:blank", "Internal Server Error", 500, INTERNAL_DETAIL)
    else:
        assert problem.status == status and problem.type == "about:blank"
        assert problem.detail == str(exc) and problem.title  # the reason phrase
        assert "message" in problem.detail or "2048" in problem.detail


def test_instance_dependent_statuses_and_kinds() -> None:
    assert InvokeTimeout("x", kind="no_instance").status == 503
    assert InvokeTimeout("x", kind="deadline").status == 504
    assert InvokeTimeout("no ACTIVE instance in the text decides nothing").status == 504
    carried = SliceAppError("x.f answered 409: no stock", kind="status:409")
    carried.detail = "no stock"
    assert carried.status == 409 and wire_kind_of(carried) == "status:409"
    assert problem_for(carried) == Problem("about:blank", "Conflict", 409, "no stock")
    bad = InvokeBadRequest("bad request to x.f on n (request r): $.qty must be >= 1", kind="bad_request")
    bad.detail = "$.qty must be >= 1"
    assert problem_for(bad).detail == "$.qty must be >= 1"
    # starting, or every instance FAILED (started again after a backoff): Retry-After 1 both
    assert problem_headers(EndpointUnavailable("starting", kind="no_instance")) == {"Retry-After": "1"}
    none = EndpointUnavailable("x")
    none.retry_after = None
    assert problem_headers(none) == {}
    assert problem_for(ValueError("secret")) == Problem.of(500, INTERNAL_DETAIL)
    assert wire_kind_of(ValueError("x")) == "app_error"


def test_decode_problem_reads_what_the_servers_write_and_tolerates_the_rest() -> None:
    p = Problem.of(404, "no map 'm'")
    assert decode_problem(p.encode(), 404, "Not Found") == p
    assert decode_problem(b'{"detail": "only a detail"}', 409, "Conflict") == Problem(
        "about:blank", "Conflict", 409, "only a detail"
    )
    html = b"<html>bad gateway</html>"
    assert decode_problem(html, 502, "Bad Gateway").detail == html.decode()
    assert decode_problem(b"[1, 2]", 500, "").title == "Internal Server Error"


# -- the router and the API answer the same error alike -----------------------------------------------

ERRORS: list[tuple[BaseException, int]] = [
    (NotDeployed("org.example:hello is not deployed", kind=None), 404),
    (UnknownEntryError("unknown entry point greet", kind="unknown_entry"), 404),
    (EndpointUnavailable("no ACTIVE instance yet", kind="no_instance"), 503),
    (InvokeTimeout("did not succeed within 2s; last error: no ACTIVE instance", kind="no_instance"), 503),
    (InvokeTimeout("did not finish before its deadline", kind="deadline"), 504),
    (InvokeTimeout("did not succeed within 2s; last error: node-2: not reachable"), 504),
    (SliceAppError("x.greet raised ValueError: boom", kind="app_error"), 502),
    (SliceAppError("x.greet answered 409: no stock", kind="status:409"), 409),
    (InvokeBadRequest("bad request: $.name is required", kind="bad_request"), 400),
    (PoisonRequest("nodes went down running it", kind="app_error"), 502),
    (IndeterminateOutcome("x.charge on node-2: node went down", target="x", method="charge"), 502),
    (InvokerClosed("invoker of node node-1 closed"), 503),
    (InvokeError("call failed (weird): ?", kind="weird"), 502),
    (RuntimeError("secret internals"), 500),
]


class _Deployments:
    def slices_status(self) -> list[Any]:
        return []


class _InvokeNode(FakeNode):
    def __init__(self, invoker: FakeInvoker) -> None:
        super().__init__(events=False)
        self.deployments = _Deployments()
        self.invoker = invoker


@pytest.fixture
async def both() -> AsyncIterator[tuple[FakeInvoker, str, str, aiohttp.ClientSession]]:
    inv = FakeInvoker()
    kv = FakeKV({"routes/GET:/hello/{name}": RouteValue(ART, "greet", {"name": "path"})})
    router = HttpRouter("node-1", kv, inv, host="127.0.0.1", port=0)
    await router.start()
    api = ManagementServer(_InvokeNode(inv), host="127.0.0.1", port=0)
    await api.start()
    try:
        async with aiohttp.ClientSession() as s:
            yield inv, router.url, api.url, s
    finally:
        await api.stop()
        await router.stop()


def _id(v: object) -> str:
    return type(v).__name__ if isinstance(v, BaseException) else str(v)


@pytest.mark.parametrize(("exc", "status"), ERRORS, ids=_id)
async def test_router_and_api_give_the_same_status(
    both: tuple[FakeInvoker, str, str, aiohttp.ClientSession], exc: BaseException, status: int
) -> None:
    inv, router_url, api_url, s = both
    if isinstance(exc, SliceAppError) and exc.status == 409:
        exc.detail = "no stock"
    inv.behaviour = lambda t, m, p: exc
    answers = []
    for method, url in (("GET", f"{router_url}/hello/ann"), ("POST", f"{api_url}/api/v1/invoke/{ART}/greet")):
        async with s.request(method, url) as r:
            assert r.headers["Content-Type"].startswith("application/problem+json")
            body = msgspec.json.decode(await r.read(), type=Problem)
            answers.append((r.status, body.status, body.title, r.headers.get("Retry-After")))
            assert "secret internals" not in body.detail
    assert answers[0] == answers[1]
    assert answers[0][0] == status
