"""The management API's routes, each declared once (Starlette-style) with what the rest needs.

A routes module ends with a list of `Route`s: method, path, handler, the role a caller needs, the
request body and answer types, the query and path parameters, a summary and the error statuses.
From that single list the server registers the aiohttp routes (`register`), `aether.api.auth`
derives the role every request needs (`RoleTable`), and `aether.api.openapi` builds the OpenAPI
document (schemas from the msgspec types, `msgspec.json.schema_components`). A route added without
an entry here is neither served nor documented.

Handlers are methods of the routes module's class (`MapRoutes.get_entry`, ...), declared unbound and
bound to the class's instance at registration; `when` leaves a route out for an instance that
cannot serve it (no invoker, no replicated store, ...).

Imports nothing else from `aether.api`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

__all__ = [
    "ANY_JSON",
    "PRINCIPAL",
    "ROLES",
    "Answer",
    "Body",
    "ListOf",
    "Named",
    "Param",
    "Principal",
    "Role",
    "RoleTable",
    "Route",
    "canonical",
    "path_param",
    "query_param",
    "register",
]

Role = Literal["read", "operate", "admin"]
ROLES: Final[tuple[Role, ...]] = ("read", "operate", "admin")
"""Each role includes the ones before it."""

ANY_JSON: Final[Mapping[str, Any]] = {}
"""The JSON schema of any JSON value."""

MethodHandler = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the key's name and its role."""

    name: str
    role: str

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


PRINCIPAL: Final = web.RequestKey("aether.principal", Principal)
"""Who sent a request (set by the server's middleware once the key is checked)."""


@dataclass(frozen=True)
class Named:
    """A JSON schema written by hand, listed under `components/schemas/NAME` (for the few answers
    that are not msgspec types)."""

    name: str
    schema: Mapping[str, Any]
    uses: tuple[Any, ...] = ()
    """The msgspec types its `$ref`s name (listed in the components with it)."""


@dataclass(frozen=True)
class ListOf:
    """An array of a `Named` schema."""

    item: Named


Schema = type | object | Named | ListOf | Mapping[str, Any]
"""A msgspec-describable type (a Struct, `list[Struct]`, ...), a `Named` schema (or `ListOf` one), or
a raw JSON schema."""


@dataclass(frozen=True)
class Answer:
    """One successful answer: its schema, description and media type."""

    schema: Schema
    description: str
    media: str = "application/json"


@dataclass(frozen=True)
class Body:
    """A request body: its schema (JSON), and other media types it may come as."""

    schema: Schema
    description: str | None = None
    required: bool = True
    alternatives: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """A query or path parameter."""

    name: str
    where: Literal["query", "path"]
    description: str
    schema: Mapping[str, Any]
    required: bool = False


def query_param(name: str, description: str, **schema: Any) -> Param:
    return Param(name, "query", description, schema or {"type": "string"})


def path_param(name: str, description: str, **schema: Any) -> Param:
    return Param(name, "path", description, {"type": "string", "minLength": 1, **schema}, required=True)


@dataclass(frozen=True)
class Route:
    """One operation of the management API, declared once."""

    method: str
    path: str
    """aiohttp's template, the full path (`/api/v1/maps/{name}/entries/{key:.+}`)."""
    handler: MethodHandler
    """A method of the routes class (unbound: `register` binds it to the instance)."""
    op_id: str
    summary: str
    ok: Mapping[int, Answer]
    errors: Iterable[int] = ()
    """Error statuses besides 401, 403 and 500 (which every operation may answer)."""
    role: Role | None = None
    """The role a caller needs; default `read` for GET, `admin` for any write (fail closed)."""
    body: Body | None = None
    params: Sequence[Param] = ()
    tags: tuple[str, ...] = ("cluster",)
    descriptions: Mapping[int, str] = field(default_factory=dict)
    """Error descriptions specific to this operation (else the generic one of the status)."""
    when: Callable[[Any], bool] | None = None
    """Served only when true of the routes instance (default: always)."""
    public: bool = False
    """Served without authentication even when the node has API keys (the probes `/livez` and
    `/readyz`; `/metrics` is made public by the node setting `metrics_public` instead)."""

    @property
    def needs(self) -> Role:
        if self.role is not None:
            return self.role
        return "read" if self.method in ("GET", "HEAD") else "admin"


_VAR = re.compile(r"\{(\w+)(?::([^{}]*))?\}")


def canonical(path: str) -> str:
    """The path without the variables' patterns (`{key:.+}` -> `{key}`), as aiohttp and OpenAPI
    name it."""
    return _VAR.sub(lambda m: "{" + m[1] + "}", path)


def _pattern(path: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _VAR.finditer(path):
        out.append(re.escape(path[pos : m.start()]))
        out.append(f"(?:{m[2]})" if m[2] else "[^{}/]+")
        pos = m.end()
    out.append(re.escape(path[pos:]))
    return re.compile("".join(out))


def register(app: web.Application, owner: object, routes: Iterable[Route]) -> list[Route]:
    """Add the `routes` that `owner` serves to `app` (handlers bound to `owner`; `GET` also answers
    `HEAD`); returns them."""
    served = []
    for route in routes:
        if route.when is not None and not route.when(owner):
            continue
        handler = types.MethodType(route.handler, owner)
        if route.method == "GET":
            app.router.add_get(route.path, handler)
        else:
            app.router.add_route(route.method, route.path, handler)
        served.append(route)
    return served


class RoleTable:
    """The role a request needs, from the routes' declarations (served on this node or not):

    - the role of the route with that method whose path matches (`HEAD` is `GET`);
    - a path some routes have, with a method none of them has: for a write, the highest role among
      the path's write routes, else `admin`; for a read, `admin` if every route of the path needs
      it (`/api/v1/keys/{name}`), else `read`;
    - any other path: `read` for a read, `admin` for a write (fail closed);
    - a path with a trailing `/` needs at least what the path without it needs.

    Requests of the last two kinds reach no handler (the router answers 404 or 405); their role
    only decides whether a key too weak for the path learns that (403) or not.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = [(r.method, _pattern(r.path), r.needs) for r in routes]

    def role(self, method: str, path: str) -> Role:
        method = method.upper()
        method = "GET" if method == "HEAD" else method
        need = self._role(method, path)
        if len(path) > 1 and path.endswith("/"):  # `/api/v1/keys/`: as closed as `/api/v1/keys`, at least
            need = max(need, self._role(method, path.rstrip("/") or "/"), key=ROLES.index)
        return need

    def _role(self, method: str, path: str) -> Role:
        read = method == "GET"
        same_path = [(m, need) for m, pattern, need in self._routes if pattern.fullmatch(path)]
        for m, need in same_path:
            if m == method:
                return need
        if read:
            return "admin" if same_path and all(need == "admin" for _, need in same_path) else "read"
        writes = [need for m, need in same_path if m != "GET"]
        return max(writes, key=ROLES.index) if writes else "admin"
