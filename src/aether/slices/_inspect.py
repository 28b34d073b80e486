"""Slice class inspection, behind `aether.slices.api` (private).

`describe_slice(cls) -> SliceInfo` checks a `Slice` subclass (entry kinds, parameters, routes)
and builds the decoders of its entries once; `EntryInfo` decodes a payload into keyword arguments
and encodes a result checked against the return annotation; `invoke_entry` does both around a
call. The `SliceInfo` is cached on the class itself, so it lives exactly as long as the class.

Entry kinds (decided from the signature):

- ``none``: ``async def ping(self) -> str`` — the payload is empty, MessagePack nil or ``{}``;
- ``request``: one parameter, ``async def f(self, req: T) -> R`` — the payload is ``T`` encoded
  (on a ``@route`` entry the single parameter must be a struct: path parameters bind to its fields);
- ``params``: several parameters of simple types (``str``, ``int``, ``float``, ``bool``,
  ``Decimal``, ``UUID``, dates, enums, literals, optionals and lists of those), or one simple
  parameter on a ``@route`` entry — the payload is a map ``{name: value}``. Values are converted
  leniently (``"3"`` -> ``3``) since the HTTP router binds them from path and query strings. When
  there is exactly one parameter, a payload that is not a map is taken as that parameter's value,
  so ``greet("Ann")`` through a proxy works whatever kind the target entry is.

May import: `aether.core`, `aether.kv.keys` (lazily), `aether.slices._codec`, `aether.slices.errors`,
msgspec. `aether.slices.api` (for the `Slice` base) only inside functions: it imports this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import inspect
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import msgspec

from aether.core.artifact import Artifact
from aether.core.policy import DEFAULT_POLICY, EntryPolicy
from aether.slices._codec import _bad_param, _bad_request, _is_map, encode_response, type_name
from aether.slices.errors import (
    EntryBadRequest,
    ResponseTypeError,
    SliceDefinitionError,
    UnknownEntry,
)

if TYPE_CHECKING:
    from aether.kv.keys import EndpointKey, RouteKey, RouteValue
    from aether.slices.api import Slice

__all__ = [
    "NO_DEFAULT",
    "EntryInfo",
    "EntryKind",
    "ParamInfo",
    "RouteInfo",
    "SliceInfo",
    "describe_slice",
    "invoke_entry",
    "is_simple_type",
    "is_struct_type",
]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
RESERVED_NAMES = frozenset({
    "start", "stop", "call", "proxy", "map", "context", "logger", "config_type", "reconfigure", "health",
})
_MARK = "__aether_entry__"
_INFO_ATTR = "__aether_slice_info__"


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
    policy: EntryPolicy = DEFAULT_POLICY
    """The resilience policy declared in code (`@entry(timeout=..., retries=..., idempotent=...,
    backoff=...)`); a blueprint's ``[slices.NAME.entries.ENTRY]`` may override it (the node
    publishes the result with the endpoints: `aether.deploy.node_manager`)."""
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



@dataclass(frozen=True, eq=False)
class SliceInfo:
    """What `describe_slice` finds on a slice class (cached on the class; treat as read-only)."""

    cls: type[Slice]
    name: str  # module:QualName
    entries: dict[str, EntryInfo]
    routes: list[RouteInfo]
    doc: str | None = None

    def route_records(self, artifact: Artifact) -> list[tuple[RouteKey, RouteValue]]:
        """The `routes/{METHOD}:{path}` keys and values to publish for this slice (docs/deployment.md)."""
        from aether.kv.keys import RouteKey, RouteValue

        return [
            (RouteKey(r.http_method, r.path), RouteValue(str(artifact), r.entry, dict(r.bindings)))
            for r in self.routes
        ]

    def endpoint_keys(self, artifact: Artifact, instance: int) -> list[EndpointKey]:
        """The `endpoints/{artifact}/{method}:{instance}` keys of one instance, one per entry."""
        from aether.kv.keys import EndpointKey

        return [EndpointKey(str(artifact), name, instance) for name in self.entries]



@dataclass
class _EntryMark:
    """What `@entry` / `@route` leave on a function (as `__aether_entry__`)."""

    routes: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    policy: EntryPolicy | None = None  # the keywords of @entry / @route


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
        policy=mark.policy or DEFAULT_POLICY,
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
    from aether.slices.api import Slice  # the public module imports this one

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
