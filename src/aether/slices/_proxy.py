"""Typed calls to other slices, behind `aether.slices.api` (private).

`call_slice` (what `Slice.call` does) encodes the request, calls through an `SliceCaller` with the
current request id and an idempotency key derived from the current one, and decodes the answer as
the caller's response type; `make_proxy` (what
`Slice.proxy` does) builds a `SliceProxy` with one async method per method of an interface (a
Protocol or the target's `Slice` class). The decoders and interface specs are cached in the
calling slice's `CodecCache` (none: built per call), never in this module.

May import: `aether.core`, `aether.slices._codec`, `aether.slices._inspect`, `aether.slices.errors`.
`aether.slices.api` (for `Slice` and `SliceCaller`) only inside functions or for type checking.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from aether.core.artifact import Artifact
from aether.core.context import child_idempotency_key, current_request_id
from aether.core.errors import BadRequest
from aether.slices._codec import CodecCache, decode_response, encode_request
from aether.slices._inspect import describe_slice
from aether.slices.errors import SliceDefinitionError

if TYPE_CHECKING:
    from aether.slices.api import SliceCaller

__all__ = ["CallFn", "SliceProxy", "call_slice", "make_proxy", "normalize_target", "proxy_spec"]

T = TypeVar("T")
P = TypeVar("P")


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



async def call_slice(
    invoker: SliceCaller,
    target: str,
    method: str,
    request: Any,
    response_type: type[T],
    *,
    timeout: float | None = None,
    codecs: CodecCache | None = None,
) -> T:
    """Typed call through an invoker (what `Slice.call` does; usable outside slices too).

    `codecs`: where to keep the decoder of `response_type` (the calling slice's cache).
    """
    t = normalize_target(target)
    payload = encode_request(t, method, request)
    # the key is derived here, in the calling slice's context (the invoker may run on another loop)
    key = child_idempotency_key(t, method)
    rid = current_request_id.get()
    if key is None:  # not serving a call with a key (tests, scripts): the invoker makes one
        answer = await invoker.invoke(t, method, payload, request_id=rid, timeout=timeout)
    else:
        answer = await invoker.invoke(
            t, method, payload, request_id=rid, timeout=timeout, idempotency_key=key
        )
    return cast(T, decode_response(t, method, answer, response_type, codecs))


CallFn = Callable[[str, str, Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class _ProxyMethod:
    name: str
    signature: inspect.Signature
    params: tuple[str, ...]
    response_type: Any
    # every parameter after `self` may be given positionally: a call giving all of them so binds as
    # given, without `Signature.bind` (a few microseconds per call; the usual `proxy.greet(name)`)
    positional: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        kinds = [p.kind for p in list(self.signature.parameters.values())[1:]]
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        object.__setattr__(
            self, "positional", len(kinds) == len(self.params) and all(k in plain for k in kinds)
        )


def proxy_spec(api: type) -> tuple[_ProxyMethod, ...]:
    """The methods a proxy of interface `api` has (SliceDefinitionError if it declares none)."""
    from aether.slices.api import Slice  # the public module imports this one

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

    def __init__(self, target: str, api: type, caller: CallFn, codecs: CodecCache | None = None) -> None:
        self._target = target
        self._api = api
        spec = codecs.get("proxy", api, proxy_spec) if codecs is not None else proxy_spec(api)
        for m in spec:
            setattr(self, m.name, self._bind(m, caller))

    def _bind(self, m: _ProxyMethod, caller: CallFn) -> Callable[..., Awaitable[Any]]:
        target = self._target
        positional, n = m.positional, len(m.params)

        async def method(*args: Any, **kwargs: Any) -> Any:
            if positional and not kwargs and len(args) == n:
                values: Any = args
            else:
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


def make_proxy(target: str, api: type[P], caller: CallFn, codecs: CodecCache | None = None) -> P:
    """A proxy for `target` whose methods (named like `api`'s) call `caller(target, m, req, type)`.

    `codecs`: where to keep the spec of `api` (the calling slice's cache; None: built here)."""
    return cast(P, SliceProxy(normalize_target(target), api, caller, codecs))

