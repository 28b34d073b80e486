"""Tests of aether.http.routes: pattern compilation, matching, precedence and request binding."""

from __future__ import annotations

from urllib.parse import quote

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from aether.core.errors import BadRequest
from aether.core.jsonbody import UnsupportedMediaType
from aether.http.routes import (
    BodyTooLarge,
    Match,
    NoRoute,
    RouteTable,
    build_payload,
    compile_pattern,
    parse_route_key,
    split_path,
)
from aether.kv.keys import RouteValue

pytestmark = pytest.mark.timeout(60)


def rv(method: str = "m", bindings: dict[str, str] | None = None, artifact: str = "g:a:1") -> RouteValue:
    return RouteValue(artifact, method, bindings or {})


def table(*routes: tuple[str, str, RouteValue]) -> RouteTable:
    t = RouteTable()
    for http_method, path, value in routes:
        t.update(f"routes/{http_method}:{path}", value)
    return t


def decode(payload: bytes) -> object:
    return msgspec.msgpack.decode(payload)


# --- keys and patterns ------------------------------------------------------------------------------


def test_parse_route_key() -> None:
    assert parse_route_key("routes/GET:/hello/{name}") == ("GET", "/hello/{name}")
    assert parse_route_key("routes/POST:/") == ("POST", "/")
    for bad in ("routes/GET", "blueprints/x", "routes/:/x", "routes/GET:x"):
        with pytest.raises(ValueError):
            parse_route_key(bad)


def test_compile_pattern_segments_and_params() -> None:
    assert compile_pattern("/") == ((), ())
    assert compile_pattern("/api/orders/{id}") == (("api", "orders", None), ((2, "id"),))
    assert compile_pattern("/a%20b/{x}") == (("a b", None), ((1, "x"),))


@pytest.mark.parametrize("bad", ["x", "/a//b", "/a/", "/a/{x}/{x}", "/a/b{x}", "/{1x}"])
def test_compile_pattern_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        compile_pattern(bad)


def test_split_path_decodes_segments_after_splitting() -> None:
    assert split_path("/") == []
    assert split_path("/a/b%2Fc/") == ["a", "b/c"]
    assert split_path("/caf%C3%A9") == ["café"]
    with pytest.raises(BadRequest, match="UTF-8"):
        split_path("/bad%FF")


def test_update_rejects_invalid_bindings_and_leaves_table_unchanged() -> None:
    t = RouteTable()
    with pytest.raises(ValueError, match="not one of"):
        t.update("routes/GET:/a/{x}", rv(bindings={"x": "path", "y": "cookie"}))
    with pytest.raises(ValueError, match="not a parameter of the path"):
        t.update("routes/GET:/a/{x}", rv(bindings={"x": "path", "y": "path"}))
    with pytest.raises(ValueError, match="bound to"):
        t.update("routes/GET:/a/{x}", rv(bindings={"x": "query"}))
    assert len(t) == 0
    assert t.match("GET", "/a/1") == NoRoute(())


# --- matching ---------------------------------------------------------------------------------------


def test_match_literal_and_parameter_routes() -> None:
    t = table(
        ("GET", "/hello/{name}", rv("greet")), ("GET", "/health", rv("health")), ("GET", "/", rv("root"))
    )
    m = t.match("GET", "/hello/Ann")
    assert isinstance(m, Match) and m.route.method == "greet" and m.params == {"name": "Ann"}
    m = t.match("GET", "/health")
    assert isinstance(m, Match) and m.route.method == "health" and m.params == {}
    m = t.match("GET", "/")
    assert isinstance(m, Match) and m.route.method == "root"
    assert t.match("GET", "/hello") == NoRoute(())
    assert t.match("GET", "/hello/Ann/x") == NoRoute(())
    assert t.match("GET", "/Hello/Ann") == NoRoute(())


def test_trailing_slash_is_ignored_but_empty_segments_never_match() -> None:
    t = table(("GET", "/hello/{name}", rv()), ("GET", "/a/b", rv("ab")))
    m = t.match("GET", "/hello/Ann/")
    assert isinstance(m, Match) and m.params == {"name": "Ann"}
    assert isinstance(t.match("GET", "/a/b/"), Match)
    assert t.match("GET", "/hello/") == NoRoute(())
    assert t.match("GET", "/hello//") == NoRoute(())
    assert t.match("GET", "/a//b") == NoRoute(())


def test_percent_decoded_parameter_values() -> None:
    t = table(("GET", "/hello/{name}", rv()))
    m = t.match("GET", "/hello/J%C3%BCrgen%20K%2FL")
    assert isinstance(m, Match) and m.params == {"name": "Jürgen K/L"}


def test_405_lists_allowed_methods_and_404_lists_none() -> None:
    t = table(
        ("GET", "/orders/{id}", rv("get")), ("DELETE", "/orders/{id}", rv("del")), ("POST", "/orders", rv())
    )
    assert t.match("PUT", "/orders/7") == NoRoute(("DELETE", "GET", "HEAD"))
    assert t.match("GET", "/orders") == NoRoute(("POST",))
    assert t.match("GET", "/nothing") == NoRoute(())


def test_head_falls_back_to_get() -> None:
    t = table(("GET", "/x", rv("get")))
    m = t.match("HEAD", "/x")
    assert isinstance(m, Match) and m.route.method == "get"


def test_precedence_more_literals_win_regardless_of_insertion_order() -> None:
    routes = [
        ("GET", "/orders/{id}", rv("by_id")),
        ("GET", "/orders/latest", rv("latest")),
        ("GET", "/{a}/{b}", rv("any")),
        ("GET", "/{a}/b/c", rv("two_literals")),
        ("GET", "/a/{x}/{y}", rv("one_literal")),
        ("GET", "/a/{x}/c", rv("left_tie")),
        ("GET", "/{x}/b/c2", rv("other")),
    ]
    for order in (routes, list(reversed(routes))):
        t = table(*order)

        def pick(path: str, t: RouteTable = t) -> str:
            m = t.match("GET", path)
            assert isinstance(m, Match), path
            return m.route.method

        assert pick("/orders/latest") == "latest"
        assert pick("/orders/7") == "by_id"
        assert pick("/x/y") == "any"
        assert pick("/a/b/c") == "left_tie"  # 2 literals each: the leftmost literal wins
        assert pick("/a/b/c2") == "other"  # 2 literals beat 1 (/a/{x}/{y}) though its literal is left
        assert pick("/z/b/c") == "two_literals"
        assert pick("/a/q/c") == "left_tie"
        assert pick("/a/q/z") == "one_literal"


def test_precedence_tie_goes_to_leftmost_literal() -> None:
    t = table(("GET", "/{x}/b", rv("right")), ("GET", "/a/{y}", rv("left")))
    m = t.match("GET", "/a/b")
    assert isinstance(m, Match) and m.route.method == "left"


def test_method_aware_fallthrough_to_less_specific_pattern() -> None:
    t = table(("GET", "/a/b", rv("get_ab")), ("POST", "/a/{x}", rv("post_ax")))
    m = t.match("POST", "/a/b")
    assert isinstance(m, Match) and m.route.method == "post_ax" and m.params == {"x": "b"}
    assert t.match("PUT", "/a/b") == NoRoute(("GET", "HEAD", "POST"))


def test_update_replace_remove_and_replace_all() -> None:
    t = RouteTable()
    t.update("routes/GET:/x/{id}", rv("one"))
    t.update("routes/GET:/x/{id}", rv("two"))
    assert len(t) == 1
    m = t.match("GET", "/x/1")
    assert isinstance(m, Match) and m.route.method == "two"
    t.update("routes/POST:/x/{id}", rv("post"))
    assert t.remove("routes/GET:/x/{id}") is True
    assert t.remove("routes/GET:/x/{id}") is False
    assert t.match("GET", "/x/1") == NoRoute(("POST",))
    t.update("routes/GET:/lit", rv("lit"))
    assert t.remove("routes/GET:/lit")
    assert t.match("GET", "/lit") == NoRoute(())
    skipped = t.replace_all(
        [("routes/GET:/n/{v}", rv("n")), ("routes/GET:/bad//x", rv()), ("routes/GET:/z", b"x")]
    )
    assert [k for k, _ in skipped] == ["routes/GET:/bad//x", "routes/GET:/z"]
    assert len(t) == 1
    assert t.match("POST", "/x/1") == NoRoute(())
    assert isinstance(t.match("GET", "/n/5"), Match)


# --- property tests ---------------------------------------------------------------------------------

_literal = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=8)
_value = st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s)


@st.composite
def pattern_and_path(draw: st.DrawFn) -> tuple[str, list[str | None], dict[str, str], str]:
    n = draw(st.integers(min_value=0, max_value=6))
    kinds = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    segs: list[str | None] = []
    pattern_parts: list[str] = []
    path_parts: list[str] = []
    values: dict[str, str] = {}
    for i, is_param in enumerate(kinds):
        if is_param:
            name = f"p{i}"
            v = draw(_value)
            values[name] = v
            segs.append(None)
            pattern_parts.append("{" + name + "}")
            path_parts.append(quote(v, safe=draw(st.sampled_from(["", "@:", "!$&'()*+,;="]))))
        else:
            lit = draw(_literal)
            segs.append(lit)
            pattern_parts.append(lit)
            path_parts.append(lit)
    pattern = "/" + "/".join(pattern_parts)
    path = "/" + "/".join(path_parts)
    trailing: bool = draw(st.booleans())
    if path_parts and trailing:
        path += "/"
    return pattern, segs, values, path


@settings(max_examples=300, deadline=None)
@given(pattern_and_path())
def test_property_generated_pattern_matches_its_path_and_extracts_values(
    case: tuple[str, list[str | None], dict[str, str], str],
) -> None:
    pattern, _, values, path = case
    t = table(("GET", pattern, rv()))
    m = t.match("GET", path)
    assert isinstance(m, Match)
    assert m.params == values
    assert t.match("POST", path) == NoRoute(("GET", "HEAD"))


@settings(max_examples=300, deadline=None)
@given(pattern_and_path(), st.data())
def test_property_literal_mismatch_never_matches(
    case: tuple[str, list[str | None], dict[str, str], str], data: st.DataObject
) -> None:
    pattern, segs, _, path = case
    literal_positions = [i for i, s in enumerate(segs) if s is not None]
    if not literal_positions:
        return
    i = data.draw(st.sampled_from(literal_positions))
    original = segs[i]
    other = data.draw(_literal.filter(lambda s: s != original))
    parts = path.rstrip("/").split("/")[1:] if path != "/" else []
    parts[i] = other
    t = table(("GET", pattern, rv()))
    assert t.match("GET", "/" + "/".join(parts)) == NoRoute(())


# --- binding ----------------------------------------------------------------------------------------


def m_for(pattern: str, path: str, bindings: dict[str, str], http_method: str = "GET") -> Match:
    t = table((http_method, pattern, rv("e", bindings)))
    m = t.match(http_method, path)
    assert isinstance(m, Match)
    return m


def test_bind_path_query_header() -> None:
    m = m_for("/hello/{name}", "/hello/Ann", {"name": "path", "greeting": "query", "x_trace": "header"})
    payload = build_payload(m, query_string="greeting=Hi%20there", headers=CIMultiDict({"X-Trace": "t1"}))
    assert decode(payload) == {"name": "Ann", "greeting": "Hi there", "x_trace": "t1"}


def test_unknown_query_parameter_is_rejected_naming_it_and_the_accepted_ones() -> None:
    m = m_for("/hello/{name}", "/hello/Ann", {"name": "path", "greeting": "query"})
    with pytest.raises(
        BadRequest, match=r"unknown query parameter 'other'; GET /hello/\{name\} accepts: greeting"
    ):
        build_payload(m, query_string="greeting=Hi&other=1")
    m = m_for("/ping", "/ping", {})
    with pytest.raises(BadRequest, match="accepts no query parameters"):
        build_payload(m, query_string="x=1")


def test_bind_missing_query_is_left_out_and_repeated_query_is_a_list() -> None:
    m = m_for("/s", "/s", {"q": "query", "tag": "query"})
    assert decode(build_payload(m, query_string="tag=a&tag=b")) == {"tag": ["a", "b"]}
    assert decode(build_payload(m)) == {}


def test_bind_body_fields_and_path_param() -> None:
    m = m_for("/orders/{id}", "/orders/7", {"id": "path", "item": "body", "qty": "body"}, "PUT")
    payload = build_payload(m, content_type="application/json", body=b'{"item": "pen", "qty": 3}')
    assert decode(payload) == {"id": "7", "item": "pen", "qty": 3}


def test_unknown_body_field_is_rejected_naming_it() -> None:
    m = m_for("/orders/{id}", "/orders/7", {"id": "path", "item": "body", "qty": "body"}, "PUT")
    with pytest.raises(
        BadRequest, match=r"unknown field 'extra' in the JSON body; PUT /orders/\{id\} accepts: item, qty"
    ):
        build_payload(m, content_type="application/json", body=b'{"item": "pen", "qty": 3, "extra": true}')


@pytest.mark.parametrize(
    "ctype", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_body_without_json_content_type_is_415(ctype: str | None) -> None:
    m = m_for("/orders", "/orders", {"item": "body"}, "POST")
    with pytest.raises(UnsupportedMediaType, match="Content-Type: application/json") as ei:
        build_payload(m, content_type=ctype, body=b'{"item": "pen"}')
    assert ei.value.status == 415
    # no body, no content type needed; JSON types with parameters and +json suffixes are accepted
    assert decode(build_payload(m)) == {}
    for ok in ("application/json; charset=utf-8", "Application/JSON", "application/problem+json"):
        assert decode(build_payload(m, content_type=ok, body=b'{"item": "pen"}')) == {"item": "pen"}


def test_deep_nesting_is_a_bad_request_not_a_recursion_error() -> None:
    m = m_for("/raw", "/raw", {}, "POST")
    for body in (b"[" * 100_000 + b"]" * 100_000, b"[" * 100_000, b'{"a":' * 65 + b"1" + b"}" * 65):
        with pytest.raises(BadRequest, match="nested more than 64 levels"):
            build_payload(m, content_type="application/json", body=body)
    ok = b"[" * 64 + b"]" * 64
    assert build_payload(m, content_type="application/json", body=ok)


def test_integer_beyond_64_bits_is_a_bad_request_naming_where() -> None:
    m = m_for("/orders", "/orders", {"qty": "body"}, "POST")
    with pytest.raises(BadRequest, match=r"number at `\$.qty` is out of range"):
        build_payload(m, content_type="application/json", body=b'{"qty": 1' + b"0" * 30 + b"}")
    with pytest.raises(BadRequest, match="out of range"):  # more digits than int() may print
        build_payload(m, content_type="application/json", body=b'{"qty": ' + b"9" * 5000 + b"}")
    big = str(2**64 - 1).encode()
    assert decode(build_payload(m, content_type="application/json", body=b'{"qty": ' + big + b"}")) == {
        "qty": 2**64 - 1
    }


def test_bind_query_falls_back_to_json_object_body() -> None:
    m = m_for("/orders", "/orders", {"item": "query", "qty": "query"}, "POST")
    payload = build_payload(
        m, query_string="qty=5", content_type="application/json", body=b'{"item": "pen", "qty": 9}'
    )
    assert decode(payload) == {"item": "pen", "qty": "5"}


def test_no_bindings_passes_whole_body_or_empty_payload() -> None:
    m = m_for("/raw", "/raw", {}, "POST")
    assert decode(build_payload(m, content_type="application/json", body=b'{"a": [1, 2]}')) == {"a": [1, 2]}
    assert (
        decode(build_payload(m, content_type="application/json", body=b'"just a string"')) == "just a string"
    )
    assert build_payload(m) == b""
    assert build_payload(m, body=b"  \n") == b""


def test_malformed_json_is_bad_request() -> None:
    m = m_for("/raw", "/raw", {"a": "body"}, "POST")
    with pytest.raises(BadRequest, match="not valid JSON"):
        build_payload(m, content_type="application/json", body=b'{"a": ')


def test_non_object_body_where_fields_expected_is_bad_request_naming_fields() -> None:
    m = m_for("/raw", "/raw", {"a": "body", "b": "body"}, "POST")
    with pytest.raises(BadRequest, match="object with fields a, b; got list"):
        build_payload(m, content_type="application/json", body=b"[1]")


def test_body_too_large() -> None:
    m = m_for("/raw", "/raw", {}, "POST")
    with pytest.raises(BodyTooLarge) as ei:
        build_payload(m, body=b"1" * 11, max_body=10)
    assert ei.value.size == 11 and ei.value.limit == 10
    assert (
        decode(build_payload(m, content_type="application/json", body=b"1" * 10, max_body=10)) == 1111111111
    )


def test_bad_query_encoding_is_bad_request() -> None:
    m = m_for("/s", "/s", {"q": "query"})
    with pytest.raises(BadRequest, match="UTF-8"):
        build_payload(m, query_string="q=%FF")


@pytest.mark.parametrize("body", [b"[0.5]", b"0.5", b'"soon"', b"null", b"true"])
def test_non_object_body_on_a_params_route_is_bad_request_not_ignored(body: bytes) -> None:
    # found walking the docs: POST a bare value to a params route (`charge(self, seconds: float)`);
    # the body was ignored and the entry answered "missing required field `seconds`"
    m = m_for("/charge", "/charge", {"seconds": "query"}, "POST")
    with pytest.raises(BadRequest, match="JSON body must be an object with fields seconds; got "):
        build_payload(m, content_type="application/json", body=body)
    m = m_for("/counter/{name}", "/counter/a", {"name": "path"}, "POST")
    with pytest.raises(BadRequest, match=r"POST /counter/\{name\} takes no body fields; got a JSON "):
        build_payload(m, content_type="application/json", body=body)
    assert decode(build_payload(m, content_type="application/json", body=b"{}")) == {"name": "a"}


def test_a_float_beyond_64_bits_is_a_bad_request_naming_where() -> None:
    # found walking docs/slices.md: {"a": 1e400} answered "Number out of range - at `$[...]`"
    m = m_for("/orders", "/orders", {"qty": "body", "items": "body"}, "POST")
    with pytest.raises(BadRequest, match=r"number at `\$.qty` is out of range: 1e400"):
        build_payload(m, content_type="application/json", body=b'{"qty": 1e400}')
    with pytest.raises(BadRequest, match=r"number at `\$.items\[1\].n` is out of range: -2e308"):
        build_payload(m, content_type="application/json", body=b'{"items": [1.5, {"n": -2e308}]}')
    assert decode(build_payload(m, content_type="application/json", body=b'{"qty": 1e308}')) == {"qty": 1e308}
