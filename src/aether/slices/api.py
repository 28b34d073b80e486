"""The slice programming model (SPEC §3.1): what business code imports.

Owns `Slice`, the `@entry` / `@route` decorators, class inspection (`describe_slice` ->
`SliceInfo`), the entry codec (`invoke_entry`: MessagePack payload -> typed arguments -> result
-> MessagePack), typed slice-to-slice calls (`Slice.call`, `Slice.proxy`) over an `Invoker`,
the runtime context (`SliceContext`) and the `current_request_id` context variable.

May import: `aether.core` and `aether.kv.keys` (lazily, for the KV records of routes and
endpoints), plus msgspec. Never imports deploy/invoke/node: the runtime hands a slice its
`Invoker` through `SliceContext`.

Entry kinds (decided from the signature, checked by `describe_slice`):

- ``none``: ``async def ping(self) -> str`` — the payload is empty, MessagePack nil or ``{}``;
- ``request``: one parameter, ``async def f(self, req: T) -> R`` — the payload is ``T`` encoded
  (on a ``@route`` entry the single parameter must be a struct: path parameters bind to its fields);
- ``params``: several parameters of simple types (``str``, ``int``, ``float``, ``bool``,
  ``Decimal``, ``UUID``, dates, enums, literals, optionals and lists of those), or one simple
  parameter on a ``@route`` entry — the payload is a map ``{name: value}``. Values are converted
  leniently (``"3"`` -> ``3``) since the HTTP router binds them from path and query strings. When
  there is exactly one parameter, a payload that is not a map is taken as that parameter's value,
  so ``greet("Ann")`` through a proxy works whatever kind the target entry is.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import inspect
import keyword
import logging
import re
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import msgspec

from aether.core.artifact import Artifact
from aether.core.context import current_request_id
from aether.core.errors import BadRequest
from aether.slices.errors import (
    EntryBadRequest,
    ResponseEncodeError,
    ResponseTypeError,
    SliceCallError,
    SliceDefinitionError,
    UnknownEntry,
)

if TYPE_CHECKING:
    from aether.kv.keys import EndpointKey, RouteKey, RouteValue
    from aether.slices.maps import MapBackend, SliceMap

__all__ = [
    "HTTP_METHODS",
    "EntryInfo",
    "EntryKind",
    "Invoker",
    "ParamInfo",
    "RouteInfo",
    "Slice",
    "SliceContext",
    "SliceInfo",
    "call_slice",
    "current_request_id",
    "decode_response",
    "describe_slice",
    "encode_request",
    "entry",
    "invoke_entry",
    "make_proxy",
    "normalize_target",
    "route",
]

T = TypeVar("T")
P = TypeVar("P")
F = TypeVar("F", bound=Callable[..., Any])

HTTP_METHODS: tuple[str, ...] = ("GET", "POST", "PUT", "DELETE", "PATCH")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
RESERVED_NAMES = frozenset({"start", "stop", "call", "proxy", "map", "context", "logger"})

# `current_request_id`: the request id of the call being served (set by the runtime/invoker),
# propagated on `Slice.call`. Defined in `aether.core.context`, where the invoker finds it too.

_ENCODER = msgspec.msgpack.Encoder()
_MARK = "__aether_entry__"
_INFO_ATTR = "__aether_slice_info__"


# --- runtime interfaces -------------------------------------------------------------------------------


@runtime_checkable
class Invoker(Protocol):
    """Calls an entry of a (possibly remote) slice; implemented by `aether.invoke`.

    `target` is `group:artifact` (any deployed version) or `group:artifact:version`; `payload` and
    the answer are MessagePack bytes. Raises on failure after its own retries.
    """

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> bytes: ...


@dataclass
class SliceContext:
    """What the runtime gives one slice instance; set as `slice.context` before `start()`."""

    artifact: Artifact
    node_id: str
    instance: int
    logger: logging.Logger
    config: dict[str, Any]
    invoker: Invoker
    maps: MapBackend | None = None
    """The cluster's distributed map (None in runtimes without one)."""

    @property
    def request_id(self) -> str | None:
        """Request id of the call being served (None outside a call)."""
        return current_request_id.get()


# --- descriptions -------------------------------------------------------------------------------------

EntryKind = Literal["none", "request", "params"]


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a `params` entry."""

    name: str
    type: Any
    default: Any = NO_DEFAULT

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT


@dataclass(frozen=True)
class RouteInfo:
    """A declared HTTP route: `http_method path` -> `entry`.

    `bindings` says where the router takes each parameter (or request-struct field) from:
    `path`, `query` or `body` (for a struct request on POST/PUT/PATCH, every field that is not a
    path parameter comes from the JSON body; on GET/DELETE from the query string).
    """

    http_method: str
    path: str
    entry: str
    path_params: tuple[str, ...]
    bindings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class EntryInfo:
    """One entry point of a slice class."""

    name: str
    qualname: str
    kind: EntryKind
    request_type: Any  # the single parameter's type (kind "request"), else None
    params: tuple[ParamInfo, ...]  # every parameter (kind "request": the one parameter)
    response_type: Any
    routes: tuple[RouteInfo, ...]
    doc: str | None
    function: Callable[..., Awaitable[Any]] = field(repr=False)
    _decoder: msgspec.msgpack.Decoder[Any] | None = field(repr=False, default=None)
    _single_decoder: msgspec.msgpack.Decoder[Any] | None = field(repr=False, default=None)
    _map_decoder: msgspec.msgpack.Decoder[Any] | None = field(repr=False, default=None)
    _response_decoder: msgspec.msgpack.Decoder[Any] | None = field(repr=False, default=None)

    def encode_result(self, value: Any) -> bytes:
        """Encode what the entry returned, checked against its return annotation.

        Raises `ResponseEncodeError` (no MessagePack form) or `ResponseTypeError` (the value does
        not fit the annotation: a server-side error of the slice, HTTP 500).
        """
        out = encode_response(self.qualname, value)
        dec = self._response_decoder
        if dec is not None:
            try:
                dec.decode(out)
            except msgspec.ValidationError as e:
                raise ResponseTypeError(
                    f"entry {self.qualname} returned {type(value).__name__}, but its return annotation "
                    f"is {type_name(self.response_type)}: {e}",
                    entry=self.qualname,
                    expected=type_name(self.response_type),
                    actual=type(value).__name__,
                ) from None
        return out

    def decode(self, payload: bytes) -> dict[str, Any]:
        """Decode a payload into keyword arguments; raises `EntryBadRequest`, never anything else."""
        try:
            return self._decode(payload)
        except EntryBadRequest:
            raise
        except msgspec.ValidationError as e:
            raise _bad_request(self.qualname, str(e)) from None
        except msgspec.DecodeError as e:
            raise EntryBadRequest(
                f"invalid request for entry {self.qualname}: malformed MessagePack payload ({e})",
                entry=self.qualname,
            ) from None
        except Exception as e:  # never let a hostile payload crash the caller
            raise EntryBadRequest(
                f"invalid request for entry {self.qualname}: {type(e).__name__}: {e}", entry=self.qualname
            ) from None

    def _decode(self, payload: bytes) -> dict[str, Any]:
        if self.kind == "none":
            if payload in (b"", b"\xc0", b"\x80"):
                return {}
            raise EntryBadRequest(
                f"invalid request for entry {self.qualname}: it takes no request, got a non-empty payload",
                entry=self.qualname,
            )
        assert self._decoder is not None
        if self.kind == "request":
            p = self.params[0]
            if payload == b"":
                if not p.required:
                    return {p.name: p.default}
                raise EntryBadRequest(
                    f"invalid request for entry {self.qualname}: empty payload, expected "
                    f"{type_name(self.request_type)}",
                    entry=self.qualname,
                )
            if self._map_decoder is not None:  # a simple type: the bare value or {"name": value}
                if _is_map(payload):
                    return {p.name: getattr(self._map_decoder.decode(payload), p.name)}
                try:
                    return {p.name: self._decoder.decode(payload)}
                except msgspec.ValidationError as e:
                    raise _bad_param(self.qualname, p.name, e) from None
            return {p.name: self._decoder.decode(payload)}
        # params
        if payload == b"" or payload == b"\xc0":
            payload = b"\x80"  # no arguments: defaults only
        is_map = _is_map(payload)
        if not is_map and len(self.params) == 1 and self._single_decoder is not None:
            p = self.params[0]
            try:
                return {p.name: self._single_decoder.decode(payload)}
            except msgspec.ValidationError as e:
                raise _bad_param(self.qualname, p.name, e) from None
        if not is_map:
            raise EntryBadRequest(
                f"invalid request for entry {self.qualname}: expected a map of parameters "
                f"({', '.join(p.name for p in self.params)})",
                entry=self.qualname,
            )
        args = self._decoder.decode(payload)
        return {p.name: getattr(args, p.name) for p in self.params}


def _is_map(payload: bytes) -> bool:
    first = payload[0]
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


@dataclass(frozen=True, eq=False)
class SliceInfo:
    """What `describe_slice` finds on a slice class (cached on the class; treat as read-only)."""

    cls: type[Slice]
    name: str  # module:QualName
    entries: dict[str, EntryInfo]
    routes: list[RouteInfo]
    doc: str | None = None

    def route_records(self, artifact: Artifact) -> list[tuple[RouteKey, RouteValue]]:
        """The `routes/{METHOD}:{path}` keys and values to publish for this slice (SPEC §2.3)."""
        from aether.kv.keys import RouteKey, RouteValue

        return [
            (RouteKey(r.http_method, r.path), RouteValue(str(artifact), r.entry, dict(r.bindings)))
            for r in self.routes
        ]

    def endpoint_keys(self, artifact: Artifact, instance: int) -> list[EndpointKey]:
        """The `endpoints/{artifact}/{method}:{instance}` keys of one instance, one per entry."""
        from aether.kv.keys import EndpointKey

        return [EndpointKey(str(artifact), name, instance) for name in self.entries]


_FIELD_RE = re.compile(r"at `(\$[^`]*)`")
_MISSING_RE = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def _bad_request(qualname: str, message: str) -> EntryBadRequest:
    m = _FIELD_RE.search(message)
    fld = m.group(1) if m else None
    if fld is None:
        m2 = _MISSING_RE.search(message)
        fld = f"$.{m2.group(1)}" if m2 else None
    return EntryBadRequest(f"invalid request for entry {qualname}: {message}", entry=qualname, field=fld)


def _bad_param(qualname: str, name: str, e: Exception) -> EntryBadRequest:
    """A bare value for parameter `name` did not decode: report paths relative to `$.name`."""
    msg = str(e)
    msg = msg.replace("at `$", f"at `$.{name}", 1) if "at `$" in msg else f"{msg} - at `$.{name}`"
    return _bad_request(qualname, msg)


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


# --- decorators ---------------------------------------------------------------------------------------


@dataclass
class _EntryMark:
    routes: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)


def _mark(fn: Callable[..., Any], decorator: str) -> _EntryMark:
    if isinstance(fn, (staticmethod, classmethod)) or not inspect.isfunction(fn):
        raise SliceDefinitionError(
            f"{decorator} must decorate an `async def` method defined in a slice class, got {fn!r}"
        )
    if not inspect.iscoroutinefunction(fn):
        raise SliceDefinitionError(
            f"{decorator} on {fn.__qualname__}: entry points must be `async def` methods"
        )
    mark = fn.__dict__.get(_MARK)
    if mark is None:
        mark = _EntryMark()
        setattr(fn, _MARK, mark)
    return cast(_EntryMark, mark)


@typing.overload
def entry(fn: F, /) -> F: ...
@typing.overload
def entry() -> Callable[[F], F]: ...


def entry(fn: Any = None, /) -> Any:
    """Mark an `async def` method of a `Slice` as an entry point (`@entry` or `@entry()`)."""
    if fn is None:
        return entry
    _mark(fn, "@entry")
    return fn


_LITERAL_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%-]+\Z")


def parse_route_path(path: str) -> tuple[str, ...]:
    """Validate a route path pattern like `/api/orders/{id}`; return its parameter names.

    Raises ValueError naming the problem. Rules: starts with '/', no empty segments (no '//' and
    no trailing '/', except the root path '/'), a parameter is a whole segment `{identifier}`,
    parameter names are unique, literal segments use URL path characters.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path {path!r} must start with '/'")
    if path == "/":
        return ()
    params: list[str] = []
    for seg in path[1:].split("/"):
        if seg == "":
            raise ValueError(f"path {path!r} has an empty segment ('//' or a trailing '/')")
        if seg.startswith("{") and seg.endswith("}"):
            name = seg[1:-1]
            if not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(f"path parameter {seg!r} in {path!r} must be a Python identifier")
            if name in params:
                raise ValueError(f"path parameter {{{name}}} appears twice in {path!r}")
            params.append(name)
        elif "{" in seg or "}" in seg:
            raise ValueError(f"segment {seg!r} of {path!r}: a parameter must be a whole segment like {{id}}")
        elif not _LITERAL_SEGMENT.match(seg):
            raise ValueError(f"segment {seg!r} of {path!r} has characters not allowed in a URL path")
    return tuple(params)


def route(method: str, path: str) -> Callable[[F], F]:
    """Declare an HTTP route for an entry (implies `@entry`); may be stacked for several routes.

    `method` is one of GET, POST, PUT, DELETE, PATCH (any case); `path` a pattern like
    `/api/orders/{id}`. Both are validated here; parameters are checked against the method's
    signature by `describe_slice`.
    """

    def deco(fn: F) -> F:
        where = f"@route({method!r}, {path!r}) on {getattr(fn, '__qualname__', fn)!r}"
        m = method.upper() if isinstance(method, str) else method
        if m not in HTTP_METHODS:
            raise SliceDefinitionError(f"{where}: invalid HTTP method; use one of {', '.join(HTTP_METHODS)}")
        try:
            params = parse_route_path(path)
        except ValueError as e:
            raise SliceDefinitionError(f"{where}: {e}") from None
        mark = _mark(fn, "@route")
        if any(r[0] == m and r[1] == path for r in mark.routes):
            raise SliceDefinitionError(f"{where}: the same route is declared twice")
        mark.routes.insert(0, (m, path, params))  # decorators apply bottom-up: keep source order
        return fn

    return deco


# --- class inspection ---------------------------------------------------------------------------------

_SCALARS: tuple[type, ...] = (
    str,
    int,
    float,
    bool,
    decimal.Decimal,
    uuid.UUID,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
)


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def is_simple_type(tp: Any) -> bool:
    """Types the router can bind from a path segment or query string."""
    tp = _strip_annotated(tp)
    if tp is type(None):
        return True
    if isinstance(tp, type) and (issubclass(tp, enum.Enum) or tp in _SCALARS):
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return all(is_simple_type(a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return (
            len(args) == 1
            and is_simple_type(args[0])
            and typing.get_origin(_strip_annotated(args[0])) is not list
        )
    return False


def is_struct_type(tp: Any) -> bool:
    """Record types whose fields the router can bind: msgspec.Struct, dataclasses, TypedDicts."""
    tp = _strip_annotated(tp)
    return isinstance(tp, type) and (
        issubclass(tp, msgspec.Struct) or dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)
    )


def _struct_field_names(tp: Any) -> set[str] | None:
    tp = _strip_annotated(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return {f.encode_name for f in msgspec.structs.fields(tp)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {f.name for f in dataclasses.fields(tp)}
    if typing.is_typeddict(tp):
        return set(typing.get_type_hints(tp))
    return None


def _fail(cls: type, name: str, problem: str) -> SliceDefinitionError:
    return SliceDefinitionError(f"slice {cls.__module__}.{cls.__qualname__}, entry {name!r}: {problem}")


def _decoder(
    cls: type, name: str, tp: Any, what: str, *, strict: bool = True
) -> msgspec.msgpack.Decoder[Any]:
    try:
        msgspec.json.schema(tp)  # rejects types msgspec cannot decode without hooks (plain classes)
        return msgspec.msgpack.Decoder(tp, strict=strict)
    except TypeError as e:
        raise _fail(cls, name, f"{what} type {type_name(tp)} is not supported by msgspec ({e})") from None


def _params_decoder(cls: type, name: str, params: list[ParamInfo]) -> msgspec.msgpack.Decoder[Any]:
    """A lenient decoder of `{name: value}` maps for the given parameters."""
    fields: list[Any] = [(p.name, p.type) if p.required else (p.name, p.type, p.default) for p in params]
    try:
        struct = msgspec.defstruct(
            f"{cls.__name__}_{name}_params", fields, kw_only=True, forbid_unknown_fields=True
        )
    except (TypeError, ValueError) as e:
        raise _fail(cls, name, f"cannot build the parameter decoder ({e})") from None
    return _decoder(cls, name, struct, "parameters", strict=False)


def _describe_entry(cls: type, name: str, fn: Callable[..., Any], mark: _EntryMark) -> EntryInfo:
    qualname = f"{cls.__qualname__}.{name}"
    if name.startswith("_"):
        raise _fail(cls, name, "entry names must not start with '_'")
    if name in RESERVED_NAMES:
        raise _fail(cls, name, f"{name!r} is reserved by Slice; choose another method name")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise _fail(cls, name, f"cannot read the signature: {e}") from None
    all_params = list(sig.parameters.values())
    if not all_params or all_params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise _fail(cls, name, "an entry is a method: its first parameter must be `self`")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:
        raise _fail(cls, name, f"cannot resolve the type annotations ({type(e).__name__}: {e})") from None
    params: list[ParamInfo] = []
    for p in all_params[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise _fail(cls, name, f"*{p.name}/**{p.name} parameters are not allowed: declare each parameter")
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise _fail(cls, name, f"parameter {p.name!r} is positional-only; remove the '/'")
        if p.name not in hints:
            raise _fail(cls, name, f"parameter {p.name!r} has no type annotation")
        default = NO_DEFAULT if p.default is inspect.Parameter.empty else p.default
        params.append(ParamInfo(p.name, hints[p.name], default))
    if "return" not in hints:
        raise _fail(cls, name, "the return type is not annotated (use `-> None` if it returns nothing)")
    response_type = hints["return"]
    response_decoder: msgspec.msgpack.Decoder[Any] | None = _decoder(cls, name, response_type, "response")
    if _strip_annotated(response_type) in (Any, object):
        response_decoder = None  # anything encodable fits: no check
    route_decls = mark.routes

    kind: EntryKind
    request_type: Any = None
    decoder: msgspec.msgpack.Decoder[Any] | None = None
    single: msgspec.msgpack.Decoder[Any] | None = None
    map_decoder: msgspec.msgpack.Decoder[Any] | None = None
    if not params:
        kind = "none"
    elif len(params) == 1 and (not route_decls or is_struct_type(params[0].type)):
        kind = "request"
        request_type = params[0].type
        decoder = _decoder(cls, name, request_type, f"parameter {params[0].name!r}")
        if is_simple_type(request_type):
            map_decoder = _params_decoder(cls, name, params)
    else:
        bad = [p for p in params if not is_simple_type(p.type)]
        if bad:
            p0 = bad[0]
            if route_decls:
                hint = (
                    "a @route entry takes either one struct parameter (path parameters bind to its "
                    "fields) or only simple parameters (str, int, float, bool, ...)"
                )
            else:
                hint = "several parameters must all be simple types; take one msgspec.Struct instead"
            raise _fail(cls, name, f"parameter {p0.name!r}: {type_name(p0.type)} is not simple: {hint}")
        kind = "params"
        decoder = _params_decoder(cls, name, params)
        if len(params) == 1:
            single = _decoder(cls, name, params[0].type, f"parameter {params[0].name!r}", strict=False)

    routes: list[RouteInfo] = []
    for http_method, path, path_params in route_decls:
        where = f"route {http_method} {path}"
        bindings: dict[str, str] = {}
        if kind == "none":
            if path_params:
                raise _fail(cls, name, f"{where} has path parameters but the method takes none")
        elif kind == "params":
            names = [p.name for p in params]
            for pp in path_params:
                if pp not in names:
                    raise _fail(
                        cls, name,
                        f"{where}: path parameter {{{pp}}} is not a parameter of the method "
                        f"(parameters: {', '.join(names)})",
                    )  # fmt: skip
            bindings = {n: ("path" if n in path_params else "query") for n in names}
        else:
            fnames = _struct_field_names(request_type)
            assert fnames is not None  # route + request kind => struct type
            for pp in path_params:
                if pp not in fnames:
                    raise _fail(
                        cls, name,
                        f"{where}: path parameter {{{pp}}} is not a field of {type_name(request_type)} "
                        f"(fields: {', '.join(sorted(fnames))})",
                    )  # fmt: skip
            rest = "body" if http_method in _BODY_METHODS else "query"
            bindings = {n: ("path" if n in path_params else rest) for n in sorted(fnames)}
        routes.append(RouteInfo(http_method, path, name, path_params, bindings))

    return EntryInfo(
        name=name,
        qualname=qualname,
        kind=kind,
        request_type=request_type,
        params=tuple(params),
        response_type=response_type,
        routes=tuple(routes),
        doc=inspect.getdoc(fn),
        function=fn,
        _decoder=decoder,
        _single_decoder=single,
        _map_decoder=map_decoder,
        _response_decoder=response_decoder,
    )


def _route_shape(r: RouteInfo) -> tuple[str, tuple[str, ...]]:
    segs = tuple("{}" if s.startswith("{") else s for s in r.path.split("/"))
    return r.http_method, segs


def describe_slice(cls: type[Slice]) -> SliceInfo:
    """Inspect and validate a slice class; cached on the class.

    Raises `SliceDefinitionError` naming the class, method and problem.
    """
    cached = cls.__dict__.get(_INFO_ATTR) if isinstance(cls, type) else None
    if cached is not None:
        return cast(SliceInfo, cached)
    if not (isinstance(cls, type) and issubclass(cls, Slice)):
        raise SliceDefinitionError(f"{cls!r} is not a subclass of aether.slices.Slice")
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        members.update(vars(klass))
    entries: dict[str, EntryInfo] = {}
    for name, value in members.items():
        if isinstance(value, (staticmethod, classmethod)):
            if hasattr(value.__func__, _MARK):
                raise _fail(cls, name, "entries must be plain `async def` methods, not static/class methods")
            continue
        mark = getattr(value, _MARK, None) if inspect.isfunction(value) else None
        if isinstance(mark, _EntryMark):
            entries[name] = _describe_entry(cls, name, value, mark)
    qual = f"{cls.__module__}.{cls.__qualname__}"
    if not entries:
        raise SliceDefinitionError(
            f"slice {qual} has no entry points: mark at least one `async def` method with @entry or @route"
        )
    routes: list[RouteInfo] = []
    seen: dict[tuple[str, tuple[str, ...]], RouteInfo] = {}
    for e in entries.values():
        for r in e.routes:
            other = seen.get(_route_shape(r))
            if other is not None:
                raise SliceDefinitionError(
                    f"slice {qual}: route {r.http_method} {r.path} of entry {r.entry!r} clashes with "
                    f"{other.http_method} {other.path} of entry {other.entry!r}"
                )
            seen[_route_shape(r)] = r
            routes.append(r)
    info = SliceInfo(
        cls=cls,
        name=f"{cls.__module__}:{cls.__qualname__}",
        entries=entries,
        routes=routes,
        doc=inspect.getdoc(cls),
    )
    setattr(cls, _INFO_ATTR, info)
    return info


# --- invoking entries ---------------------------------------------------------------------------------


def encode_response(qualname: str, value: Any) -> bytes:
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ResponseEncodeError(f"entry {qualname} returned a value that cannot be encoded: {e}") from None


async def invoke_entry(instance: Slice, entry: str, payload: bytes) -> bytes:
    """Decode `payload` for `entry`, await the method on `instance`, encode its result.

    Raises `UnknownEntry`, `EntryBadRequest` (a `BadRequest`: the payload does not fit; the message
    names the entry and field), `ResponseEncodeError`, `ResponseTypeError` (the result does not fit
    the return annotation); exceptions of the method itself propagate.
    """
    info = describe_slice(type(instance))
    e = info.entries.get(entry)
    if e is None:
        raise UnknownEntry(
            f"slice {info.name} has no entry {entry!r}; entries: {', '.join(sorted(info.entries))}"
        )
    kwargs = e.decode(payload)
    result = await e.function(instance, **kwargs)
    return e.encode_result(result)


# --- calling other slices -----------------------------------------------------------------------------


def normalize_target(target: str) -> str:
    """Validate a call target: `group:artifact` or `group:artifact:version` (normalised)."""
    if not isinstance(target, str):
        raise BadRequest(f"call target must be a string 'group:artifact[:version]', got {target!r}")
    return _normalize_target(target)


@functools.lru_cache(maxsize=1024)
def _normalize_target(target: str) -> str:
    t = target.strip()
    parts = t.split(":")
    if len(parts) == 2:
        a = Artifact.parse(f"{t}:0.0.0")
        return a.name
    if len(parts) == 3:
        return str(Artifact.parse(t))
    raise BadRequest(
        f"invalid call target {target!r}: expected GROUP:ARTIFACT (any version) or GROUP:ARTIFACT:VERSION"
    )


@functools.lru_cache(maxsize=512)
def _cached_decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(tp)


def _decoder_for(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    try:
        return _cached_decoder(tp)
    except TypeError:  # unhashable type expression
        return msgspec.msgpack.Decoder(tp)


def encode_request(target: str, method: str, request: Any) -> bytes:
    try:
        return _ENCODER.encode(request)
    except (TypeError, ValueError, OverflowError) as e:
        raise SliceCallError(f"cannot encode the request for {target} {method}: {e}") from None


def decode_response(target: str, method: str, answer: bytes, response_type: Any) -> Any:
    try:
        dec = _decoder_for(response_type)
    except TypeError as e:
        raise SliceCallError(f"response type {type_name(response_type)} is not supported: {e}") from None
    try:
        return dec.decode(answer)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise SliceCallError(
            f"the answer of {target} {method} does not decode as {type_name(response_type)}: {e}"
        ) from None


async def call_slice(
    invoker: Invoker,
    target: str,
    method: str,
    request: Any,
    response_type: type[T],
    *,
    timeout: float | None = None,
) -> T:
    """Typed call through an invoker (what `Slice.call` does; usable outside slices too)."""
    t = normalize_target(target)
    payload = encode_request(t, method, request)
    answer = await invoker.invoke(t, method, payload, request_id=current_request_id.get(), timeout=timeout)
    return cast(T, decode_response(t, method, answer, response_type))


CallFn = Callable[[str, str, Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class _ProxyMethod:
    name: str
    signature: inspect.Signature
    params: tuple[str, ...]
    response_type: Any


@functools.lru_cache(maxsize=256)
def _proxy_spec(api: type) -> tuple[_ProxyMethod, ...]:
    methods: list[_ProxyMethod] = []
    if isinstance(api, type) and issubclass(api, Slice):
        info = describe_slice(api)
        for e in info.entries.values():
            sig = inspect.signature(e.function)
            methods.append(_ProxyMethod(e.name, sig, tuple(p.name for p in e.params), e.response_type))
        return tuple(methods)
    members: dict[str, Any] = {}
    for klass in reversed(api.__mro__):
        if klass in (object, typing.Generic) or klass is Protocol:
            continue
        members.update(vars(klass))
    for name, fn in members.items():
        if name.startswith("_") or not inspect.isfunction(fn):
            continue
        where = f"proxy interface {api.__qualname__}.{name}"
        if not inspect.iscoroutinefunction(fn):
            raise SliceDefinitionError(f"{where}: declare it `async def` (calls are asynchronous)")
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as e:
            raise SliceDefinitionError(f"{where}: cannot resolve the annotations ({e})") from None
        if "return" not in hints:
            raise SliceDefinitionError(f"{where}: annotate the return type (the target entry's response)")
        sig = inspect.signature(fn)
        names = tuple(p.name for p in list(sig.parameters.values())[1:])
        methods.append(_ProxyMethod(name, sig, names, hints["return"]))
    if not methods:
        raise SliceDefinitionError(f"proxy interface {api.__qualname__} declares no public async methods")
    return tuple(methods)


class SliceProxy:
    """A typed client of another slice: one async method per entry of the interface."""

    def __init__(self, target: str, api: type, caller: CallFn) -> None:
        self._target = target
        self._api = api
        for m in _proxy_spec(api):
            setattr(self, m.name, self._bind(m, caller))

    def _bind(self, m: _ProxyMethod, caller: CallFn) -> Callable[..., Awaitable[Any]]:
        target = self._target

        async def method(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = m.signature.bind(None, *args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{target} {m.name}: {e}") from None
            bound.apply_defaults()
            values = list(bound.arguments.values())[1:]
            if not values:
                request: Any = None
            elif len(values) == 1:
                request = values[0]
            else:
                request = dict(zip(m.params, values, strict=True))
            return await caller(target, m.name, request, m.response_type)

        method.__name__ = m.name
        method.__qualname__ = f"SliceProxy[{target}].{m.name}"
        return method

    def __repr__(self) -> str:
        return f"<SliceProxy {self._target} {self._api.__qualname__}>"


def make_proxy(target: str, api: type[P], caller: CallFn) -> P:
    """A proxy for `target` whose methods (named like `api`'s) call `caller(target, m, req, type)`."""
    return cast(P, SliceProxy(normalize_target(target), api, caller))


# --- the base class -----------------------------------------------------------------------------------


class Slice:
    """Base class of every slice. Subclass it, add `@entry`/`@route` async methods.

    The runtime creates one object per instance (with no arguments), sets `context`, awaits
    `start()` once before any call, and `stop()` once after in-flight calls finished. Calls may
    run concurrently on one instance.
    """

    context: SliceContext

    async def start(self) -> None:
        """Acquire resources (runs once, before any call; default: nothing)."""

    async def stop(self) -> None:
        """Release resources (best effort, once; default: nothing)."""

    @property
    def logger(self) -> logging.Logger:
        """The instance's logger (`context.logger` unless assigned)."""
        own = self.__dict__.get("_aether_logger")
        return own if own is not None else self._context().logger

    @logger.setter
    def logger(self, value: logging.Logger) -> None:
        self.__dict__["_aether_logger"] = value

    def _context(self) -> SliceContext:
        ctx = self.__dict__.get("context")
        if ctx is None:
            raise SliceCallError(
                f"{type(self).__qualname__} has no runtime context: the runtime sets `context` before start()"
            )
        return cast(SliceContext, ctx)

    async def call(
        self,
        target: str,
        method: str,
        request: Any,
        response_type: type[T],
        *,
        timeout: float | None = None,
    ) -> T:
        """Call `method` of the slice `target` (`group:artifact` or full coordinates) through the runtime.

        The request is MessagePack-encoded; the answer is decoded as `response_type` (a mismatch
        raises `SliceCallError`). Retries, failover and request-id propagation are the invoker's.
        """
        return await call_slice(
            self._context().invoker, target, method, request, response_type, timeout=timeout
        )

    def proxy(self, target: str, api: type[P]) -> P:
        """A typed proxy of `target`: `api` is a Protocol (or the target's Slice class) whose async
        methods are named and typed like the target's entries."""
        return make_proxy(target, api, self._proxy_call)

    def map(self, name: str, value_type: type[T] | Any = Any) -> SliceMap[T]:
        """The cluster's distributed map `name` with values of `value_type` (see `SliceMap`).

        Maps are defined in the blueprint (``[maps.NAME]``) or with ``aether map create``; on a
        backend that can tell (the node's, `LocalMaps`) an undefined name raises `UnknownMap` here,
        so a slice that takes its maps in `start()` fails to start instead of failing every call.
        """
        from aether.slices.maps import SliceMap

        backend = self._context().maps
        if backend is None:
            raise SliceCallError(
                f"{type(self).__qualname__}: this runtime has no distributed map (context.maps is None)"
            )
        require = getattr(backend, "require_map", None)
        if require is not None:
            require(name)
        return SliceMap(backend, name, value_type)

    async def _proxy_call(self, target: str, method: str, request: Any, response_type: Any) -> Any:
        return await self.call(target, method, request, response_type)
