"""Sans-IO route table, path matching and request binding of the HTTP router (docs/invocation.md).

No sockets, no event loop: `HttpRouter` (``aether.http.server``) feeds it KV records and request
parts. May import `aether.core` and `aether.kv.keys` only (plus msgspec and the standard library).

Path patterns
-------------
A pattern is what `routes/{METHOD}:{pattern}` keys carry, e.g. ``/api/orders/{id}``: segments
separated by ``/``; a parameter ``{name}`` is a whole segment; every other segment is a literal
that matches exactly (after percent-decoding both sides). ``/`` is the root pattern.

Request paths are split on ``/`` in their *raw* (still percent-encoded) form and each segment is
then percent-decoded as UTF-8, so ``%2F`` inside a parameter value is a slash in the value, not a
separator. A path whose segments are not valid UTF-8 after decoding is a `BadRequest`.

Trailing slash: a single trailing ``/`` on a request path (other than ``/`` itself) is ignored,
so ``/hello/ann/`` matches ``/hello/{name}``. Empty segments elsewhere (``/a//b``) never match a
parameter (parameter values are never empty) nor a literal.

Precedence (deterministic, independent of insertion order): only patterns with the same number of
segments can match the same path. Among those, the pattern with **more literal segments wins**;
ties go to the pattern whose first literal segment comes earliest (left to right), then to the
lexicographically smaller pattern text. A fully literal pattern is looked up in a dict first.
Matching is method-aware: the first pattern in precedence order that matches the path *and* has a
route for the method wins; when patterns match the path but none has the method, the result is
`NoRoute` with the union of their methods (405 with ``Allow``), when none matches the path,
`NoRoute` with no methods (404). ``HEAD`` falls back to the ``GET`` route.

Binding (`build_payload`)
-------------------------
`RouteValue.bindings` maps each entry parameter (or request-struct field) name to where it comes
from: ``path``, ``query``, ``header`` or ``body``. The router builds a map ``{name: value}`` and
encodes it as MessagePack — what `aether.slices.api.invoke_entry` decodes for both ``params``
entries and struct ``request`` entries (it converts strings leniently, ``"3"`` -> ``3``):

- ``path``: the percent-decoded segment (a string);
- ``query``: the query parameter (a string; a list of strings when repeated); when absent from
  the query and the body is a JSON object holding the name, that JSON value is used;
- ``header``: the request header of that name (case-insensitive; ``_`` also tried as ``-``);
- ``body``: the field of that name of the JSON body, which must then be an object.

A name that is absent is left out (the entry applies its default or reports the missing field).
A route with no bindings at all passes the whole JSON body (re-encoded as MessagePack) as the
request when there is a body, else an empty payload.

Strict input, checked before any slice is called (`BadRequest` naming the problem unless noted):

- a non-empty body needs a JSON content type (``application/json`` or ``application/*+json``),
  else `UnsupportedMediaType` (415);
- malformed JSON, nesting deeper than `MAX_JSON_DEPTH` (64) levels, an integer outside
  ``-2**63 .. 2**64-1`` (`aether.core.jsonbody`);
- a query parameter that is not bound from the query (the detail lists the accepted ones);
- a field of a JSON object body that is bound neither from the body nor from the query;
- a body that is not a JSON object on a route with bindings (fields bound from the body, or from
  the query with the body as fallback; a route that takes no fields names that); a body over the
  limit (`BodyTooLarge`, 413).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from aether.core.errors import BadRequest
from aether.core.jsonbody import decode_json_body, require_json_content_type
from aether.kv.keys import RouteValue

__all__ = [
    "BINDING_SOURCES",
    "BodyTooLarge",
    "CompiledRoute",
    "Match",
    "NoRoute",
    "RouteTable",
    "build_payload",
    "compile_pattern",
    "parse_route_key",
    "split_path",
]

BINDING_SOURCES = frozenset({"path", "query", "header", "body"})
ROUTE_PREFIX = "routes/"

_ENC = msgspec.msgpack.Encoder()


class BodyTooLarge(BadRequest):
    """The request body exceeds the router's limit (answered 413)."""

    status = 413

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request body of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route: HTTP method + pattern -> artifact entry, with its compiled segments.

    `segments[i]` is ``None`` for a parameter at position i and the decoded literal otherwise;
    `params` are ``(position, name)`` pairs.
    """

    http_method: str
    pattern: str
    artifact: str
    method: str
    bindings: Mapping[str, str]
    segments: tuple[str | None, ...]
    params: tuple[tuple[int, str], ...]
    # derived once (`__post_init__`), read per request
    target: str = field(init=False, compare=False)
    """What the router calls: ``group:artifact`` of the route's artifact, so that any live
    version serves the request and a rollout's traffic weights apply (docs/deployment.md)."""
    query_names: tuple[str, ...] = field(init=False, compare=False)  # bound from the query, sorted
    field_names: tuple[str, ...] = field(init=False, compare=False)  # body or query, sorted

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen
        set_(self, "target", ":".join(self.artifact.split(":", 2)[:2]))
        set_(self, "query_names", tuple(sorted(n for n, s in self.bindings.items() if s == "query")))
        set_(
            self, "field_names", tuple(sorted(n for n, s in self.bindings.items() if s in ("body", "query")))
        )


@dataclass(slots=True)
class Match:
    """A request's route and its path parameters (not frozen: one is made per request, and a
    frozen dataclass's ``__init__`` costs several times more)."""

    route: CompiledRoute
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No route for this request; `allowed_methods` non-empty means 405 (the path exists)."""

    allowed_methods: tuple[str, ...] = ()


def parse_route_key(key: str) -> tuple[str, str]:
    """``routes/GET:/hello/{name}`` -> ``("GET", "/hello/{name}")``; ValueError if malformed."""
    if not key.startswith(ROUTE_PREFIX):
        raise ValueError(f"not a route key: {key!r}")
    method, sep, path = key[len(ROUTE_PREFIX) :].partition(":")
    if not sep or not method or not path.startswith("/"):
        raise ValueError(f"malformed route key {key!r}: expected routes/METHOD:/path")
    return method.upper(), path


def _decode_segment(seg: str) -> str:
    if "%" not in seg:
        return seg
    try:
        return unquote(seg, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(f"path segment {seg!r} is not valid UTF-8 after percent-decoding") from None


def split_path(raw_path: str) -> list[str]:
    """Split a raw (percent-encoded) request path into decoded segments; see the module docstring."""
    if not raw_path.startswith("/"):
        raise BadRequest(f"request path {raw_path!r} must start with '/'")
    if raw_path == "/":
        return []
    body = raw_path[1:-1] if raw_path.endswith("/") else raw_path[1:]
    if "%" not in body:  # nothing percent-encoded: the segments are the raw ones
        return body.split("/")
    return [_decode_segment(s) for s in body.split("/")]


def compile_pattern(pattern: str) -> tuple[tuple[str | None, ...], tuple[tuple[int, str], ...]]:
    """Compile a path pattern into (segments, params); ValueError naming the problem."""
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern {pattern!r} must start with '/'")
    if pattern == "/":
        return (), ()
    segs: list[str | None] = []
    params: list[tuple[int, str]] = []
    for i, seg in enumerate(pattern[1:].split("/")):
        if seg == "":
            raise ValueError(f"path pattern {pattern!r} has an empty segment ('//' or a trailing '/')")
        if seg.startswith("{") and seg.endswith("}"):
            name = seg[1:-1]
            if not name.isidentifier():
                raise ValueError(f"parameter {seg!r} in {pattern!r} must be an identifier")
            if any(n == name for _, n in params):
                raise ValueError(f"parameter {{{name}}} appears twice in {pattern!r}")
            segs.append(None)
            params.append((i, name))
        elif "{" in seg or "}" in seg:
            raise ValueError(f"segment {seg!r} of {pattern!r}: a parameter must be a whole segment")
        else:
            try:
                segs.append(unquote(seg, errors="strict"))
            except UnicodeDecodeError:
                raise ValueError(f"segment {seg!r} of {pattern!r} is not valid UTF-8") from None
    return tuple(segs), tuple(params)


def compile_route(http_method: str, pattern: str, value: RouteValue) -> CompiledRoute:
    """Compile and validate one route record; ValueError naming the problem."""
    segments, params = compile_pattern(pattern)
    names = {n for _, n in params}
    bindings = dict(value.bindings)
    for name, source in bindings.items():
        if source not in BINDING_SOURCES:
            raise ValueError(
                f"route {http_method} {pattern}: binding {name!r} -> {source!r} is not one of "
                f"{', '.join(sorted(BINDING_SOURCES))}"
            )
        if source == "path" and name not in names:
            raise ValueError(
                f"route {http_method} {pattern}: path binding {name!r} is not a parameter of the path"
            )
    for name in names:
        if bindings.get(name, "path") != "path":
            raise ValueError(
                f"route {http_method} {pattern}: path parameter {{{name}}} is bound to {bindings[name]!r}"
            )
        bindings[name] = "path"
    if not value.artifact or not value.method:
        raise ValueError(f"route {http_method} {pattern}: artifact and method must be non-empty")
    return CompiledRoute(
        http_method.upper(), pattern, value.artifact, value.method, bindings, segments, params
    )


def _precedence(segments: tuple[str | None, ...], pattern: str) -> tuple[int, tuple[int, ...], str]:
    literals = sum(1 for s in segments if s is not None)
    # earlier literal positions sort first: a literal is 0, a parameter 1
    mask = tuple(0 if s is not None else 1 for s in segments)
    return (-literals, mask, pattern)


@dataclass(slots=True)
class _PatternEntry:
    key: tuple[int, tuple[int, ...], str]
    segments: tuple[str | None, ...]
    params: tuple[tuple[int, str], ...]
    methods: dict[str, CompiledRoute] = field(default_factory=dict)


class RouteTable:
    """The route table: patterns grouped by segment count in precedence order, plus a dict of fully
    literal paths. Not thread-safe; mutate from the event loop only."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], CompiledRoute] = {}
        self._literal: dict[tuple[str, ...], _PatternEntry] = {}
        self._by_len: dict[int, list[_PatternEntry]] = {}
        self._patterns: dict[str, _PatternEntry] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def routes(self) -> list[CompiledRoute]:
        return sorted(self._routes.values(), key=lambda r: (r.pattern, r.http_method))

    def update(self, key: str, value: RouteValue) -> CompiledRoute:
        """Add or replace the route of a `routes/METHOD:/path` key; ValueError if invalid (the
        table is then unchanged)."""
        http_method, pattern = parse_route_key(key)
        route = compile_route(http_method, pattern, value)
        old = self._routes.get((http_method, pattern))
        if old is not None:
            self._drop(old)
        self._routes[(http_method, pattern)] = route
        entry = self._patterns.get(pattern)
        if entry is None:
            entry = _PatternEntry(_precedence(route.segments, pattern), route.segments, route.params)
            self._patterns[pattern] = entry
            if not route.params:
                self._literal[tuple(s for s in route.segments if s is not None)] = entry
            else:
                bucket = self._by_len.setdefault(len(route.segments), [])
                bisect.insort(bucket, entry, key=lambda e: e.key)
        entry.methods[http_method] = route
        return route

    def remove(self, key: str) -> bool:
        """Remove the route of a key; True if it was present."""
        http_method, pattern = parse_route_key(key)
        route = self._routes.pop((http_method, pattern), None)
        if route is None:
            return False
        self._drop(route)
        return True

    def _drop(self, route: CompiledRoute) -> None:
        entry = self._patterns.get(route.pattern)
        if entry is None:
            return
        entry.methods.pop(route.http_method, None)
        if entry.methods:
            return
        del self._patterns[route.pattern]
        if not entry.params:
            self._literal.pop(tuple(s for s in entry.segments if s is not None), None)
        else:
            bucket = self._by_len.get(len(entry.segments), [])
            bucket[:] = [e for e in bucket if e is not entry]
            if not bucket:
                self._by_len.pop(len(entry.segments), None)

    def replace_all(self, items: Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
        """Replace the whole table; returns ``(key, problem)`` for records that were skipped."""
        self._routes.clear()
        self._literal.clear()
        self._by_len.clear()
        self._patterns.clear()
        skipped: list[tuple[str, str]] = []
        for key, value in items:
            try:
                if not isinstance(value, RouteValue):
                    raise ValueError(f"value is not a RouteValue ({type(value).__name__})")
                self.update(key, value)
            except ValueError as e:
                skipped.append((key, str(e)))
        return skipped

    def match(self, method: str, raw_path: str) -> Match | NoRoute:
        """Match a request; `raw_path` is still percent-encoded (no query). Raises BadRequest for a
        path that does not decode."""
        segs = split_path(raw_path)
        allowed: set[str] = set()
        if self._literal:
            entry = self._literal.get(tuple(segs))
            if entry is not None:
                r = _pick(entry.methods, method)
                if r is not None:
                    return Match(r, {})
                allowed.update(entry.methods)
        for entry in self._by_len.get(len(segs), ()):
            if not _matches(entry.segments, segs):
                continue
            r = _pick(entry.methods, method)
            if r is not None:
                return Match(r, {name: segs[i] for i, name in entry.params})
            allowed.update(entry.methods)
        if allowed and "GET" in allowed:
            allowed.add("HEAD")
        return NoRoute(tuple(sorted(allowed)))


def _pick(methods: dict[str, CompiledRoute], method: str) -> CompiledRoute | None:
    r = methods.get(method)
    if r is None and method == "HEAD":
        r = methods.get("GET")
    return r


def _matches(pattern: tuple[str | None, ...], segs: list[str]) -> bool:
    for p, s in zip(pattern, segs, strict=True):
        if p is None:
            if not s:
                return False
        elif p != s:
            return False
    return True


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None and "_" in name:
        v = headers.get(name.replace("_", "-"))
    if v is not None:
        # aiohttp decodes header bytes as UTF-8 with surrogate escapes: bytes that are not UTF-8
        # arrive as lone surrogates, which cannot be encoded into the entry's argument
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"header {name!r} is not valid UTF-8") from None
    return v


def build_payload(
    match: Match,
    *,
    query_string: str = "",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    content_type: str | None = None,
    max_body: int | None = None,
) -> bytes:
    """The MessagePack payload for the matched route's entry; see the module docstring.

    `headers` should be case-insensitive (aiohttp's are); `content_type` is the request's
    Content-Type header (None when absent). Raises `BodyTooLarge`, `UnsupportedMediaType` or
    `BadRequest` naming the problem (see the module docstring).
    """
    if max_body is not None and len(body) > max_body:
        raise BodyTooLarge(len(body), max_body)
    route = match.route
    bindings = route.bindings
    parsed: Any = None
    has_body = bool(body.strip())
    if has_body:
        require_json_content_type(content_type)
        parsed = decode_json_body(body)
    query = _parse_query(query_string)
    accepted = route.query_names
    for name in query:
        if name not in accepted:
            takes = f"accepts: {', '.join(accepted)}" if accepted else "accepts no query parameters"
            raise BadRequest(f"unknown query parameter {name!r}; {route.http_method} {route.pattern} {takes}")
    body_obj: dict[str, Any] | None = parsed if isinstance(parsed, dict) else None
    if not bindings:
        return _ENC.encode(parsed) if has_body else b""
    if has_body and body_obj is None:
        # a body that is not an object cannot give fields, whether they are bound from the body or
        # from the query with the body as fallback; ignoring it answered "missing required field"
        got = type(parsed).__name__ if parsed is not None else "null"
        if route.field_names:
            takes = ", ".join(route.field_names)
            raise BadRequest(f"JSON body must be an object with fields {takes}; got {got}")
        raise BadRequest(f"{route.http_method} {route.pattern} takes no body fields; got a JSON {got}")
    if body_obj is not None:
        fields = route.field_names
        for name in body_obj:
            if name not in fields:
                takes = f"accepts: {', '.join(fields)}" if fields else "takes no body fields"
                raise BadRequest(
                    f"unknown field {name!r} in the JSON body; {route.http_method} {route.pattern} {takes}"
                )
    args: dict[str, Any] = {}
    for name, source in bindings.items():
        if source == "path":
            if name in match.params:
                args[name] = match.params[name]
            else:  # compile_route guarantees this cannot happen; keep the guard for safety
                raise BadRequest(f"path parameter {name!r} missing from {route.pattern}")
        elif source == "query":
            vals = query.get(name)
            if vals is not None:
                args[name] = vals[0] if len(vals) == 1 else vals
            elif body_obj is not None and name in body_obj:
                args[name] = body_obj[name]
        elif source == "header":
            hv = _header(headers or {}, name)
            if hv is not None:
                args[name] = hv
        else:  # body
            if body_obj is not None and name in body_obj:
                args[name] = body_obj[name]
    return _ENC.encode(args)


def _parse_query(qs: str) -> dict[str, list[str]]:
    if not qs:
        return {}
    try:
        return parse_qs(qs, keep_blank_values=True, errors="strict", max_num_fields=1000)
    except UnicodeDecodeError:
        raise BadRequest("query string is not valid UTF-8 after percent-decoding") from None
    except ValueError as e:
        raise BadRequest(f"invalid query string: {e}") from None
