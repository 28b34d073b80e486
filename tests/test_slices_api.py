"""Slice API: decorators, describe_slice, invoke_entry, typed calls and proxies (no I/O)."""

from __future__ import annotations

import asyncio
import logging
import typing
from typing import Protocol

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.core.artifact import Artifact
from aether.core.errors import BadRequest
from aether.slices import (
    EntryBadRequest,
    ResponseTypeError,
    Slice,
    SliceCallError,
    SliceContext,
    SliceDefinitionError,
    UnknownEntry,
    current_request_id,
    describe_slice,
    entry,
    invoke_entry,
    route,
)
from aether.slices.testing import FakeInvoker

pytestmark = pytest.mark.timeout(30)

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode


class CheckStock(msgspec.Struct):
    product_id: str
    qty: int = 1


class Stock(msgspec.Struct):
    product_id: str
    available: int


class GetOrder(msgspec.Struct):
    id: str


class Inventory(Slice):
    """Inventory service."""

    def __init__(self) -> None:
        self.started = 0

    async def start(self) -> None:
        self.started += 1

    @entry
    async def check_stock(self, req: CheckStock) -> Stock:
        """Check the stock of a product."""
        return Stock(req.product_id, 10 - req.qty)

    @route("GET", "/api/inventory/{product_id}")
    async def get_stock(self, product_id: str, qty: int = 1) -> Stock:
        return Stock(product_id, 100 - qty)

    @route("get", "/api/orders/{id}")
    @route("DELETE", "/api/orders/{id}")
    async def order(self, req: GetOrder) -> str:
        return req.id

    @entry()
    async def ping(self) -> str:
        return "pong"

    @entry
    async def count(self, items: list[str]) -> int:
        return len(items)

    @entry
    async def add(self, a: int, b: int = 2) -> int:
        return a + b

    async def helper(self) -> int:  # not an entry
        return 1


# --- describe_slice ------------------------------------------------------------------------------------


def test_describe_entries_and_kinds() -> None:
    info = describe_slice(Inventory)
    assert set(info.entries) == {"check_stock", "get_stock", "order", "ping", "count", "add"}
    cs = info.entries["check_stock"]
    assert cs.kind == "request" and cs.request_type is CheckStock and cs.response_type is Stock
    assert cs.doc == "Check the stock of a product."
    gs = info.entries["get_stock"]
    assert gs.kind == "params"
    assert [(p.name, p.type, p.required) for p in gs.params] == [
        ("product_id", str, True),
        ("qty", int, False),
    ]
    assert gs.params[1].default == 1
    assert info.entries["ping"].kind == "none"
    assert info.entries["count"].kind == "request" and info.entries["count"].request_type == list[str]
    assert info.entries["add"].kind == "params"
    assert info.doc == "Inventory service."
    assert info.name.endswith(":Inventory")
    assert describe_slice(Inventory) is info  # cached


def test_describe_routes_and_bindings() -> None:
    info = describe_slice(Inventory)
    got = {(r.http_method, r.path, r.entry, r.path_params) for r in info.routes}
    assert got == {
        ("GET", "/api/inventory/{product_id}", "get_stock", ("product_id",)),
        ("GET", "/api/orders/{id}", "order", ("id",)),
        ("DELETE", "/api/orders/{id}", "order", ("id",)),
    }
    gs = next(r for r in info.routes if r.entry == "get_stock")
    assert dict(gs.bindings) == {"product_id": "path", "qty": "query"}
    # stacked routes keep source order
    assert [r.http_method for r in info.entries["order"].routes] == ["GET", "DELETE"]


def test_inherited_entries() -> None:
    class Base(Slice):
        @entry
        async def a(self) -> int:
            return 1

    class Child(Base):
        @entry
        async def b(self) -> int:
            return 2

    assert set(describe_slice(Child).entries) == {"a", "b"}
    assert set(describe_slice(Base).entries) == {"a"}


def _bad(cls_body: str) -> str:
    ns: dict[str, object] = {"Slice": Slice, "entry": entry, "route": route, "CheckStock": CheckStock}
    src = "class Bad(Slice):\n" + "\n".join("    " + line for line in cls_body.strip().splitlines())
    exec(src, ns)
    with pytest.raises(SliceDefinitionError) as ei:
        describe_slice(ns["Bad"])  # type: ignore[arg-type]
    return str(ei.value)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("@entry\nasync def f(self, x) -> int:\n    return 1", "parameter 'x' has no type annotation"),
        ("@entry\nasync def f(self, x: int):\n    return 1", "return type is not annotated"),
        ("@entry\nasync def f(self, *args: int) -> int:\n    return 1", "*args"),
        ("@entry\nasync def f(self, **kw: int) -> int:\n    return 1", "**kw"),
        ("@entry\nasync def f(self, a: int, /) -> int:\n    return 1", "positional-only"),
        ("@entry\nasync def f(self, a: CheckStock, b: int) -> int:\n    return 1", "parameter 'a'"),
        ("@entry\nasync def f(self, a: 'Nope') -> int:\n    return 1", "cannot resolve the type annotations"),
        ("@entry\nasync def f(self, a: Slice) -> int:\n    return 1", "not supported by msgspec"),
        ("@entry\nasync def start(self) -> None:\n    return None", "reserved"),
        ("@entry\nasync def _hidden(self) -> None:\n    return None", "must not start with '_'"),
        ("async def f(self) -> None:\n    return None", "has no entry points"),
        (
            "@route('GET', '/x/{id}')\nasync def f(self, name: str) -> str:\n    return name",
            "path parameter {id} is not a parameter",
        ),
        (
            "@route('GET', '/x/{id}')\nasync def f(self, req: CheckStock) -> str:\n    return ''",
            "is not a field of CheckStock",
        ),
        ("@route('GET', '/x/{id}')\nasync def f(self) -> str:\n    return ''", "takes none"),
        (
            "@route('POST', '/x/{id}')\nasync def f(self, id: str, body: CheckStock) -> str:\n    return ''",
            "is not simple",
        ),
        (
            "@route('GET', '/x/{a}')\nasync def f(self, a: str) -> str:\n    return a\n"
            "@route('GET', '/x/{b}')\nasync def g(self, b: str) -> str:\n    return b",
            "clashes with",
        ),
    ],
)
def test_bad_signatures_are_named(body: str, needle: str) -> None:
    msg = _bad(body)
    assert needle in msg
    assert "Bad" in msg


def test_error_names_class_and_method() -> None:
    msg = _bad("@entry\nasync def place(self, x) -> int:\n    return 1")
    assert "Bad" in msg and "'place'" in msg


def test_sync_method_rejected_at_decoration() -> None:
    with pytest.raises(SliceDefinitionError, match="async def"):

        class S(Slice):
            @entry
            def f(self) -> int:  # type: ignore[type-var]
                return 1


@pytest.mark.parametrize(
    ("method", "path", "needle"),
    [
        ("FETCH", "/x", "invalid HTTP method"),
        ("GET", "x", "must start with '/'"),
        ("GET", "/a//b", "empty segment"),
        ("GET", "/a/", "empty segment"),
        ("GET", "/a/{1x}", "identifier"),
        ("GET", "/a/{class}", "identifier"),
        ("GET", "/a/{id}/{id}", "appears twice"),
        ("GET", "/a/x{id}", "whole segment"),
        ("GET", "/a/b c", "not allowed"),
    ],
)
def test_route_validation_at_decoration(method: str, path: str, needle: str) -> None:
    with pytest.raises(SliceDefinitionError) as ei:

        class S(Slice):
            @route(method, path)
            async def f(self) -> int:
                return 1

    assert needle in str(ei.value)
    assert "f" in str(ei.value)


def test_same_route_twice_rejected() -> None:
    with pytest.raises(SliceDefinitionError, match="twice"):

        class S(Slice):
            @route("GET", "/a")
            @route("GET", "/a")
            async def f(self) -> int:
                return 1


def test_describe_non_slice() -> None:
    with pytest.raises(SliceDefinitionError, match="not a subclass"):
        describe_slice(int)  # type: ignore[arg-type]


# --- invoke_entry --------------------------------------------------------------------------------------


async def test_invoke_request_entry() -> None:
    out = await invoke_entry(Inventory(), "check_stock", enc(CheckStock("p1", 3)))
    assert dec(out, type=Stock) == Stock("p1", 7)
    out = await invoke_entry(Inventory(), "check_stock", enc({"product_id": "p2"}))
    assert dec(out, type=Stock) == Stock("p2", 9)


async def test_invoke_params_entry_map_and_lenient_strings() -> None:
    out = await invoke_entry(Inventory(), "get_stock", enc({"product_id": "p", "qty": 5}))
    assert dec(out, type=Stock) == Stock("p", 95)
    out = await invoke_entry(Inventory(), "get_stock", enc({"product_id": "p", "qty": "7"}))
    assert dec(out, type=Stock) == Stock("p", 93)
    out = await invoke_entry(Inventory(), "get_stock", enc({"product_id": "p"}))
    assert dec(out, type=Stock) == Stock("p", 99)
    out = await invoke_entry(Inventory(), "add", enc({"a": 1}))
    assert dec(out) == 3


async def test_invoke_none_entry() -> None:
    for payload in (b"", enc(None), enc({})):
        assert dec(await invoke_entry(Inventory(), "ping", payload)) == "pong"
    with pytest.raises(EntryBadRequest, match="takes no request"):
        await invoke_entry(Inventory(), "ping", enc(1))


async def test_invoke_builtin_request() -> None:
    assert dec(await invoke_entry(Inventory(), "count", enc(["a", "b"]))) == 2


async def test_single_param_route_entry_accepts_bare_value() -> None:
    class Hello(Slice):
        @route("GET", "/hello/{name}")
        async def greet(self, name: str) -> str:
            return f"hi {name}"

    assert dec(await invoke_entry(Hello(), "greet", enc("Ann"))) == "hi Ann"
    assert dec(await invoke_entry(Hello(), "greet", enc({"name": "Bo"}))) == "hi Bo"
    with pytest.raises(EntryBadRequest) as ei:
        await invoke_entry(Hello(), "greet", enc(5))
    assert ei.value.field == "$.name"


@pytest.mark.parametrize(
    ("entry_name", "payload", "field"),
    [
        ("check_stock", enc({"product_id": "p", "qty": "x"}), "$.qty"),
        ("check_stock", enc({"qty": 1}), "$.product_id"),
        ("get_stock", enc({"product_id": "p", "qty": "many"}), "$.qty"),
        ("get_stock", enc({"qty": 1}), "$.product_id"),
        ("get_stock", enc({"product_id": "p", "bogus": 1}), "$.bogus"),
        ("count", enc([1, 2]), "$.items[0]"),
        ("count", enc("x"), "$.items"),
    ],
)
async def test_bad_payload_names_entry_and_field(entry_name: str, payload: bytes, field: str) -> None:
    with pytest.raises(EntryBadRequest) as ei:
        await invoke_entry(Inventory(), entry_name, payload)
    assert isinstance(ei.value, BadRequest)
    assert f"Inventory.{entry_name}" in str(ei.value)
    assert ei.value.field == field, str(ei.value)
    assert field.split(".")[-1].split("[")[0] in str(ei.value)


async def test_malformed_payloads_never_crash() -> None:
    for payload in (b"\xc1", b"\x92\x01", b"\xdf\xff\xff\xff\xff", b"\x81\xa1", bytes(range(256))):
        for name in ("check_stock", "get_stock", "count", "ping", "add"):
            with pytest.raises(EntryBadRequest):
                await invoke_entry(Inventory(), name, payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_payloads_only_bad_request(payload: bytes) -> None:
    async def run() -> None:
        for name in ("check_stock", "get_stock", "count", "ping", "add"):
            try:
                await invoke_entry(Inventory(), name, payload)
            except EntryBadRequest:
                pass

    asyncio.run(run())


async def test_unknown_entry_and_unencodable_response() -> None:
    with pytest.raises(UnknownEntry, match="entries: add, check_stock"):
        await invoke_entry(Inventory(), "nope", b"")

    class Weird(Slice):
        @entry
        async def f(self) -> int:
            return object()  # type: ignore[return-value]

    from aether.slices import ResponseEncodeError

    with pytest.raises(ResponseEncodeError, match=r"Weird\.f"):
        await invoke_entry(Weird(), "f", b"")


# --- typed calls and proxies ----------------------------------------------------------------------------


class Greeting(msgspec.Struct):
    message: str


class HelloApi(Protocol):
    async def greet(self, name: str) -> Greeting: ...

    async def greet_many(self, names: list[str], punct: str = "!") -> list[Greeting]: ...

    async def ping(self) -> str: ...


def _context(invoker: FakeInvoker) -> SliceContext:
    return SliceContext(
        artifact=Artifact.parse("org.example:caller:1.0.0"),
        node_id="node-1",
        instance=0,
        logger=logging.getLogger("test"),
        config={},
        invoker=invoker,
    )


class Caller(Slice):
    @entry
    async def run(self) -> str:
        return "ok"


async def test_call_encodes_invokes_decodes_and_propagates_request_id() -> None:
    def handler(target: str, method: str, payload: bytes) -> bytes:
        return enc(Greeting(f"hello {dec(payload)}"))

    inv = FakeInvoker(handler)
    c = Caller()
    c.context = _context(inv)
    token = current_request_id.set("req-42")
    try:
        got = await c.call("org.example:hello", "greet", "Ann", Greeting, timeout=2.0)
    finally:
        current_request_id.reset(token)
    assert got == Greeting("hello Ann")
    assert inv.calls == [("org.example:hello", "greet", enc("Ann"), "req-42", 2.0)]
    assert c.context.request_id is None


async def test_call_decode_error_is_slice_call_error() -> None:
    inv = FakeInvoker(lambda t, m, p: enc({"nope": 1}))
    c = Caller()
    c.context = _context(inv)
    with pytest.raises(SliceCallError, match=r"org.example:hello:1.0.0 greet does not decode as Greeting"):
        await c.call("org.example:hello:1.0.0", "greet", "x", Greeting)
    with pytest.raises(SliceCallError, match="cannot encode"):
        await c.call("org.example:hello", "greet", object(), Greeting)


async def test_call_bad_target_and_missing_context() -> None:
    c = Caller()
    with pytest.raises(SliceCallError, match="no runtime context"):
        await c.call("org.example:hello", "greet", "x", str)
    c.context = _context(FakeInvoker(lambda t, m, p: enc("x")))
    with pytest.raises(BadRequest, match="invalid call target"):
        await c.call("hello", "greet", "x", str)


async def test_proxy_against_fake_invoker() -> None:
    hello_instance = None

    class Hello(Slice):
        @route("GET", "/hello/{name}")
        async def greet(self, name: str) -> Greeting:
            return Greeting(f"hello {name}")

        @entry
        async def greet_many(self, names: list[str], punct: str = "!") -> list[Greeting]:
            return [Greeting(f"hi {n}{punct}") for n in names]

        @entry
        async def ping(self) -> str:
            return "pong"

    hello_instance = Hello()

    async def handler(target: str, method: str, payload: bytes) -> bytes:
        assert target == "org.example:hello"
        return await invoke_entry(hello_instance, method, payload)

    inv = FakeInvoker(handler)
    c = Caller()
    c.context = _context(inv)
    api = c.proxy("org.example:hello", HelloApi)
    assert await api.greet("Ann") == Greeting("hello Ann")
    assert await api.greet(name="Bo") == Greeting("hello Bo")
    assert await api.greet_many(["a", "b"]) == [Greeting("hi a!"), Greeting("hi b!")]
    assert await api.greet_many(["a"], punct="?") == [Greeting("hi a?")]
    assert await api.ping() == "pong"
    assert [m for _, m, *_ in inv.calls] == ["greet", "greet", "greet_many", "greet_many", "ping"]
    # every argument given positionally skips Signature.bind: the same request as with keywords
    assert await api.greet_many(["a"], "?") == [Greeting("hi a?")]
    assert inv.calls[-1][2] == inv.calls[3][2] == enc({"names": ["a"], "punct": "?"})
    assert (inv.calls[0][2], inv.calls[1][2]) == (enc("Ann"), enc("Bo"))
    with pytest.raises(TypeError, match="greet"):
        await api.greet("a", "b")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="greet"):
        await api.greet()  # type: ignore[call-arg]
    # a Slice class works as the interface too
    api2 = c.proxy("org.example:hello", Hello)
    assert await api2.greet("Cy") == Greeting("hello Cy")


async def test_proxy_is_kept_per_target_and_interface() -> None:
    """`proxy()` in every call (the usual way to write it) makes the proxy once: the same object
    for the same target and interface, a bounded number kept, made before the context is set and
    still calling through the context set later."""
    inv = FakeInvoker(lambda t, m, p: enc(Greeting(f"{t} {dec(p)}")))
    c = Caller()
    early = c.proxy("org.example:hello", HelloApi)  # before the context: kept, and it works after
    c.context = _context(inv)
    api = c.proxy("org.example:hello", HelloApi)
    assert api is early
    assert await api.greet("Ann") == Greeting("org.example:hello Ann")
    other = c.proxy("org.example:other", HelloApi)
    assert other is not api and c.proxy("org.example:other", HelloApi) is other
    assert await other.greet("Bo") == Greeting("org.example:other Bo")
    assert Caller().proxy("org.example:hello", HelloApi) is not api  # kept per slice instance
    for n in range(Slice.PROXIES_KEPT + 5):
        c.proxy(f"org.example:s{n}", HelloApi)
    assert len(c.__dict__["_aether_proxies"]) == Slice.PROXIES_KEPT  # the oldest made way
    assert c.proxy("org.example:hello", HelloApi) is not api
    with pytest.raises(BadRequest, match="call target must be a string"):
        c.proxy(["org.example:hello"], HelloApi)  # type: ignore[arg-type]  # unhashable: not kept


def test_proxy_interface_validation() -> None:
    class NotAsync(Protocol):
        def greet(self, name: str) -> str: ...

    class NoReturn(Protocol):
        async def greet(self, name: str): ...  # type: ignore[no-untyped-def]

    c = Caller()
    with pytest.raises(SliceDefinitionError, match="async def"):
        c.proxy("org.example:hello", NotAsync)
    with pytest.raises(SliceDefinitionError, match="return type"):
        c.proxy("org.example:hello", NoReturn)


async def test_single_simple_parameter_accepts_map_too() -> None:
    # non-route entry with one simple parameter: the bare value or {"name": value}
    assert dec(await invoke_entry(Inventory(), "count", enc({"items": ["a"]}))) == 1
    with pytest.raises(EntryBadRequest) as ei:
        await invoke_entry(Inventory(), "count", enc({"things": ["a"]}))
    assert ei.value.field == "$.things"
    # a struct parameter never takes the wrapped form
    with pytest.raises(EntryBadRequest):
        await invoke_entry(Inventory(), "check_stock", enc({"req": {"product_id": "p"}}))


def test_logger_defaults_to_context_and_can_be_assigned() -> None:
    c = Caller()
    c.context = _context(FakeInvoker(lambda t, m, p: b""))
    assert c.logger is c.context.logger
    other = logging.getLogger("other")
    c.logger = other
    assert c.logger is other


def test_kv_records_for_routes_and_endpoints() -> None:
    from aether.kv.keys import parse_key

    info = describe_slice(Inventory)
    art = Artifact.parse("org.example:inventory:1.0.0")
    records = {str(k): v for k, v in info.route_records(art)}
    assert set(records) == {
        "routes/GET:/api/inventory/{product_id}",
        "routes/GET:/api/orders/{id}",
        "routes/DELETE:/api/orders/{id}",
    }
    v = records["routes/GET:/api/inventory/{product_id}"]
    assert (v.artifact, v.method, v.bindings) == (
        str(art),
        "get_stock",
        {"product_id": "path", "qty": "query"},
    )
    for key in records:
        assert str(parse_key(key)) == key
    eps = [str(k) for k in info.endpoint_keys(art, 3)]
    assert "endpoints/org.example:inventory:1.0.0/check_stock:3" in eps and len(eps) == len(info.entries)
    for key in eps:
        assert str(parse_key(key)) == key


# --- return values checked against the annotation (issue 11, item 6) -----------------------------------


class Answers(Slice):
    @entry
    async def count(self, what: str) -> int:
        return {"int": 3, "str": "three", "bool": True}[what]  # type: ignore[return-value]

    @entry
    async def stocks(self, bad: bool) -> list[Stock]:
        return [Stock("p1", 1), Stock("p2", "many" if bad else 2)]  # type: ignore[arg-type]

    @entry
    async def ratio(self) -> float:
        return 1  # an int is a fine float

    @entry
    async def anything(self, what: str) -> typing.Any:
        return {"a": [1, what]}


async def test_return_value_must_fit_the_annotation() -> None:
    assert dec(await invoke_entry(Answers(), "count", enc("int"))) == 3
    with pytest.raises(ResponseTypeError) as ei:
        await invoke_entry(Answers(), "count", enc("str"))
    err = ei.value
    assert err.status == 500 and err.entry == "Answers.count"
    assert (err.expected, err.actual) == ("int", "str")
    assert "entry Answers.count returned str, but its return annotation is int" in str(err)
    with pytest.raises(ResponseTypeError, match="Expected `int`, got `bool`"):
        await invoke_entry(Answers(), "count", enc("bool"))
    assert dec(await invoke_entry(Answers(), "stocks", enc(False)), type=list[Stock])[1] == Stock("p2", 2)
    with pytest.raises(ResponseTypeError, match=r"returned list.*list\[.*Stock\].*at `\$\[1\]\.available`"):
        await invoke_entry(Answers(), "stocks", enc(True))
    assert dec(await invoke_entry(Answers(), "ratio", b"")) == 1
    assert dec(await invoke_entry(Answers(), "anything", enc("x"))) == {"a": [1, "x"]}
