"""The slice programming model: what business code imports (through `aether.slices`).

A slice is a subclass of `Slice` whose `async def` methods marked `@entry` (or `@route`, which
implies it) are its entry points; the runtime gives each instance a `SliceContext` (its artifact,
node, instance id, logger, configuration, the `SliceCaller` for calls to other slices and the
distributed maps). `Slice.call` / `Slice.proxy` call other slices with typed requests and answers;
`Slice.map` opens a distributed map (`aether.slices.maps.SliceMap`). docs/slices.md is the guide.

Behind this module (private, not for slice code): `aether.slices._inspect` (class inspection:
`describe_slice` -> `SliceInfo`, the entry kinds, `invoke_entry`), `aether.slices._codec` (the
MessagePack codec and `CodecCache`, the caches of one loaded slice) and `aether.slices._proxy`
(typed calls and proxies). Their names the runtime uses are re-exported here.

May import: `aether.core`, `aether.slices.*` (not loader/store: they import this), msgspec. Never
imports deploy/invoke/node: the runtime hands a slice its `SliceCaller` through `SliceContext`.
"""

from __future__ import annotations

import inspect
import keyword
import logging
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

from aether.core.artifact import Artifact
from aether.core.context import current_idempotency_key, current_request_id, idempotency_key_given
from aether.core.policy import EntryPolicy
from aether.slices._codec import CodecCache, decode_response, encode_request, encode_response, type_name
from aether.slices._inspect import (
    _MARK,
    NO_DEFAULT,
    RESERVED_NAMES,
    EntryInfo,
    EntryKind,
    ParamInfo,
    RouteInfo,
    SliceInfo,
    _EntryMark,
    describe_slice,
    invoke_entry,
    is_simple_type,
    is_struct_type,
)
from aether.slices._proxy import SliceProxy, call_slice, make_proxy, normalize_target
from aether.slices.errors import SliceCallError, SliceDefinitionError

if TYPE_CHECKING:
    from aether.slices.maps import MapBackend, SliceMap

__all__ = [
    "HTTP_METHODS",
    "NO_DEFAULT",
    "RESERVED_NAMES",
    "CodecCache",
    "EntryInfo",
    "EntryKind",
    "ParamInfo",
    "RouteInfo",
    "Slice",
    "SliceCaller",
    "SliceContext",
    "SliceInfo",
    "SliceProxy",
    "call_slice",
    "current_idempotency_key",
    "current_request_id",
    "decode_response",
    "describe_slice",
    "encode_request",
    "encode_response",
    "entry",
    "invoke_entry",
    "is_simple_type",
    "is_struct_type",
    "make_proxy",
    "normalize_target",
    "parse_route_path",
    "route",
    "type_name",
]

T = TypeVar("T")
P = TypeVar("P")
F = TypeVar("F", bound=Callable[..., Any])

HTTP_METHODS: tuple[str, ...] = ("GET", "POST", "PUT", "DELETE", "PATCH")

# `current_request_id`: the request id of the call being served (set by the runtime/invoker),
# propagated on `Slice.call`. Defined in `aether.core.context`, where the invoker finds it too.


# --- runtime interfaces -------------------------------------------------------------------------------


@runtime_checkable
class SliceCaller(Protocol):
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
        idempotency_key: str | None = None,
    ) -> bytes: ...


@dataclass
class SliceContext:
    """What the runtime gives one slice instance; set as `slice.context` before `start()`."""

    artifact: Artifact
    node_id: str
    instance: int
    logger: logging.Logger
    config: Any
    """The slice's `[slices.NAME.config]` table (secrets filled in): a dict, or an instance of the
    class's `config_type` when it declares one."""
    invoker: SliceCaller
    maps: MapBackend | None = None
    """The cluster's distributed map (None in runtimes without one)."""

    codecs: CodecCache = field(default_factory=CodecCache, repr=False, compare=False)
    """The decoders and proxy specs built for this slice's types; the runtime hands every instance
    of a loaded slice the same one (`LoadedSlice.codecs`), which goes when the slice is unloaded."""

    @property
    def request_id(self) -> str | None:
        """Request id of the call being served (None outside a call)."""
        return current_request_id.get()

    @property
    def idempotency_key(self) -> str | None:
        """Idempotency key of the logical call being served (None outside a call): the same on every
        retry of that call, e.g. the HTTP client's ``Idempotency-Key`` header; a call made while
        serving one derives its key from it (docs/invocation.md, *Idempotency keys*)."""
        return current_idempotency_key.get()

    @property
    def idempotency_key_given(self) -> bool:
        """Whether the key of the call being served was given from outside the runtime (a client's
        ``Idempotency-Key`` header, a key slice code passed to ``call``) or derived from one: a
        later call may bring the same key again (a client retrying an hour later), so an entry
        that deduplicates must look for what an earlier call with it did. False when the runtime
        made the key up for this logical call: only its own attempts share it (retries, which may
        overlap one another, within the call's deadline). True outside a call."""
        return idempotency_key_given(current_idempotency_key.get())


# --- decorators ---------------------------------------------------------------------------------------


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


def _policy(
    where: str, timeout: float | None, retries: int | None, idempotent: bool | None, backoff: float | None
) -> EntryPolicy | None:
    policy = EntryPolicy(timeout, retries, idempotent, backoff)
    problems = policy.problems()
    if problems:
        raise SliceDefinitionError(f"{where}: {'; '.join(problems)}")
    return None if policy == EntryPolicy() else policy


def _set_policy(mark: _EntryMark, policy: EntryPolicy | None, where: str) -> None:
    """Stack a decorator's policy on the mark; two decorators giving one field two values is an error."""
    if policy is None:
        return
    old = mark.policy
    if old is not None:
        for name in policy.__struct_fields__:
            a, b = getattr(old, name), getattr(policy, name)
            if a is not None and b is not None and a != b:
                raise SliceDefinitionError(f"{where}: {name} is declared twice ({a!r} and {b!r})")
        policy = policy.over(old)
    mark.policy = policy


@typing.overload
def entry(fn: F, /) -> F: ...
@typing.overload
def entry(
    *,
    timeout: float | None = None,
    retries: int | None = None,
    idempotent: bool | None = None,
    backoff: float | None = None,
) -> Callable[[F], F]: ...


def entry(
    fn: Any = None,
    /,
    *,
    timeout: float | None = None,
    retries: int | None = None,
    idempotent: bool | None = None,
    backoff: float | None = None,
) -> Any:
    """Mark an `async def` method of a `Slice` as an entry point (`@entry`, `@entry()`, or with its
    resilience policy: `@entry(idempotent=False)`, `@entry(timeout=2.0, retries=3, backoff=0.05)`).

    - `timeout`: seconds one attempt may take before the caller counts it as lost;
    - `retries`: how many times a failed attempt may be repeated (default: until the deadline);
    - `idempotent`: False when running the entry twice for one call would do harm (the default,
      True, lets the runtime retry an attempt whose answer was lost: at least once);
    - `backoff`: seconds of the first pause between retry rounds (doubling).

    Each may be overridden in the blueprint (``[slices.NAME.entries.ENTRY]``); see
    docs/invocation.md, *Entry policies*.
    """
    policy = _policy("@entry", timeout, retries, idempotent, backoff)
    if fn is None:

        def deco(f: F) -> F:
            where = f"@entry on {getattr(f, '__qualname__', f)!r}"
            _set_policy(_mark(f, "@entry"), policy, where)
            return f

        return deco
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


def route(
    method: str,
    path: str,
    *,
    timeout: float | None = None,
    retries: int | None = None,
    idempotent: bool | None = None,
    backoff: float | None = None,
) -> Callable[[F], F]:
    """Declare an HTTP route for an entry (implies `@entry`); may be stacked for several routes.

    `method` is one of GET, POST, PUT, DELETE, PATCH (any case); `path` a pattern like
    `/api/orders/{id}`. Both are validated here; parameters are checked against the method's
    signature by `describe_slice`. The keywords are the entry's policy, as on `entry`.
    """
    policy = _policy(f"@route({method!r}, {path!r})", timeout, retries, idempotent, backoff)

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
        _set_policy(mark, policy, where)
        return fn

    return deco


# --- the base class -----------------------------------------------------------------------------------


class Slice:
    """Base class of every slice. Subclass it, add `@entry`/`@route` async methods.

    The runtime creates one object per instance (with no arguments), sets `context`, awaits
    `start()` once before any call, and `stop()` once after in-flight calls finished. Calls may
    run concurrently on one instance.

    Configuration: `context.config` is the blueprint's `[slices.NAME.config]` table. Set
    `config_type` to a msgspec-decodable type (a `msgspec.Struct`) to get an instance of it instead
    of a dict; a table that does not decode fails the instance's start (FAILED, the reason names
    the field). A changed config restarts the instances one at a time, unless the class defines
    `async def reconfigure(self, config) -> None`: then each instance gets the new config (decoded
    like the first) through that hook and keeps running (`context.config` is updated after it
    returns; if it raises, the change is not applied and `aether slices` shows why).

    Health: a class may define `async def health(self) -> bool | None`. The runtime calls it on every
    ACTIVE instance every 5 s on the slice's loop, with a 2 s timeout; None or True is healthy,
    False, raising or timing out unhealthy (the reason is reported with the instance's metrics and
    the controller replaces instances that keep failing). Not defined here: a class without it has
    no health check (docs/slices.md, *Health checks*).
    """

    context: SliceContext
    config_type: ClassVar[Any] = None

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
        ctx = self._context()
        return await call_slice(
            ctx.invoker, target, method, request, response_type, timeout=timeout, codecs=ctx.codecs
        )

    PROXIES_KEPT: ClassVar[int] = 64  # proxies an instance keeps for its next `proxy()` calls

    def proxy(self, target: str, api: type[P]) -> P:
        """A typed proxy of `target`: `api` is a Protocol (or the target's Slice class) whose async
        methods are named and typed like the target's entries.

        The same proxy object for the same `target` and `api` (it holds no state of its own): a
        proxy made per call costs nothing more than one kept in `start()`."""
        kept: dict[tuple[str, type], Any] | None = self.__dict__.get("_aether_proxies")
        try:
            found = kept.get((target, api)) if kept is not None else None
        except TypeError:  # an unhashable target: make_proxy says what is wrong with it
            found = None
        if found is not None:
            return cast(P, found)
        ctx = self.__dict__.get("context")  # a proxy may be made before the context is set
        made = make_proxy(target, api, self._proxy_call, ctx.codecs if ctx is not None else None)
        if kept is None:
            kept = self.__dict__["_aether_proxies"] = {}
        if len(kept) >= self.PROXIES_KEPT:
            kept.pop(next(iter(kept)))  # the oldest
        kept[(target, api)] = made
        return made

    def map(self, name: str, value_type: type[T] | Any = Any) -> SliceMap[T]:
        """The cluster's distributed map `name` with values of `value_type` (see `SliceMap`).

        Maps are defined in the blueprint (``[maps.NAME]``) or with ``aether map create``; on a
        backend that can tell (the node's, `LocalMaps`) an undefined name raises `UnknownMap` here,
        so a slice that takes its maps in `start()` fails to start instead of failing every call.
        """
        from aether.slices.maps import SliceMap

        ctx = self._context()
        backend = ctx.maps
        if backend is None:
            raise SliceCallError(
                f"{type(self).__qualname__}: this runtime has no distributed map (context.maps is None)"
            )
        require = getattr(backend, "require_map", None)
        if require is not None:
            require(name)
        return SliceMap(backend, name, value_type, codecs=ctx.codecs)

    def _proxy_call(self, target: str, method: str, request: Any, response_type: Any) -> Awaitable[Any]:
        return self.call(target, method, request, response_type)  # (awaited by the proxy's method)
