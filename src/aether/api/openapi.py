"""The OpenAPI 3.1 document of the management API, served at `GET /api/v1/openapi.json`.

Built from the routes the server registered (`aether.api.routing.Route`, declared once in each
routes module), so a node documents exactly what it serves (one without a deployment service does
not list the deployment endpoints). The schemas of bodies and answers come from their msgspec types
(`msgspec.json.schema_components`), so they cannot drift from the wire types; the few answers that
are plain dicts carry a hand-written `Named` schema next to their route. `tests/test_openapi.py`
checks the document against the aiohttp router and validates it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from aether.api.deploy_routes import COORDINATES_PATTERN, NAME_OR_COORDINATES_PATTERN
from aether.api.routing import Answer, Body, ListOf, Named, Route, Schema, canonical
from aether.core.problem import Problem

__all__ = [
    "COORDINATES_PATTERN",
    "NAME_OR_COORDINATES_PATTERN",
    "OPENAPI_VERSION",
    "TAGS",
    "build_openapi",
    "operations",
]

OPENAPI_VERSION = "3.1.0"
TAGS = (
    "probes", "cluster", "events", "deployment", "rollouts", "invoke", "maps", "metrics", "controller",
    "repository", "logs", "faults", "security", "meta",
)
_REF = "#/components/schemas/{name}"

ERRORS = {
    400: "Invalid input: unknown or repeated query parameter, malformed body, invalid value",
    401: "Missing, malformed, wrong or revoked API key (only when the node has an API key)",
    403: "The key's role does not allow the operation (`detail` names the role needed)",
    404: "Not found",
    408: "The request body did not arrive in time",
    409: "Conflict",
    413: "The request body is larger than the 1 MiB limit",
    500: (
        "Unexpected failure; the node logs the traceback, the answer never contains it. Also a "
        "store refusal of the node's own command (session conflict): not applied"
    ),
    502: "The slice raised an error",
    503: "The node is not ready or has no quorum for the operation",
    504: "The operation timed out",
}
"""The generic description of each error status (a route may say more, `Route.descriptions`)."""

_DESCRIPTION = """\
Management API of an Aether node. Every node serves it; any node can take every request
(writes go through consensus, nothing needs forwarding).

Authentication: when the node has an API key, every request (this document included) must carry
it as `X-API-Key: KEY` or `Authorization: Bearer KEY`, else 401. Keys have roles (read, operate,
admin); a key whose role is too low gets 403 naming the role needed. A node bound beyond loopback
always has one; a loopback-only node may have none, and then no header is needed.

Errors are RFC 9457 problem documents (`application/problem+json`). Unknown paths answer 404,
known paths with another method 405 with an `Allow` header (both problem documents).
`GET` operations also answer `HEAD`. Metrics: `GET /api/v1/metrics` (JSON cluster snapshot),
`GET /api/v1/metrics/history` (the per-second window) and `GET /metrics` (Prometheus text).
"""


def _any_json(t: Any) -> dict[str, Any]:
    if t is object:  # a field that holds any JSON value (`KVEntry.value`, ...)
        return {"description": "any JSON value"}
    raise NotImplementedError(f"no JSON schema for {t!r}")


class _Schemas:
    """The JSON schemas of a set of routes: msgspec types through one `schema_components` call
    (shared `$ref`s under `components/schemas`), `Named` schemas by reference, raw ones inline."""

    def __init__(self, routes: Iterable[Route]) -> None:
        wanted: list[Schema] = [Problem]
        for r in routes:
            wanted += [a.schema for a in r.ok.values()]
            if r.body is not None:
                wanted.append(r.body.schema)
        types = []
        self.components: dict[str, Any] = {}
        while wanted:
            s = wanted.pop(0)
            if isinstance(s, ListOf):
                s = s.item
            if isinstance(s, Named):
                self.components[s.name] = copy.deepcopy(dict(s.schema))
                wanted += s.uses
            elif not isinstance(s, Mapping) and s not in types:
                types.append(s)
        found, components = msgspec.json.schema_components(types, ref_template=_REF, schema_hook=_any_json)
        self.components.update(components)
        self._found = list(zip(types, found, strict=True))

    def __call__(self, s: Schema) -> dict[str, Any]:
        if isinstance(s, ListOf):
            return {"type": "array", "items": self(s.item)}
        if isinstance(s, Named):
            return {"$ref": _REF.format(name=s.name)}
        if isinstance(s, Mapping):
            return copy.deepcopy(dict(s))
        return copy.deepcopy(next(found for t, found in self._found if t == s))


def _answer(a: Answer, schemas: _Schemas) -> dict[str, Any]:
    return {"description": a.description, "content": {a.media: {"schema": schemas(a.schema)}}}


def _body(b: Body, schemas: _Schemas) -> dict[str, Any]:
    content = {"application/json": {"schema": schemas(b.schema)}}
    content.update({media: {"schema": dict(s)} for media, s in b.alternatives.items()})
    out: dict[str, Any] = {"required": b.required}
    if b.description is not None:
        out["description"] = b.description
    out["content"] = content
    return out


def _operation(r: Route, schemas: _Schemas) -> dict[str, Any]:
    responses = {str(code): _answer(a, schemas) for code, a in r.ok.items()}
    problem = {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}}
    for code in sorted({*r.errors, 401, 403, 500}):
        description = r.descriptions.get(code, ERRORS[code])
        responses.setdefault(str(code), {"description": description, "content": problem})
    op: dict[str, Any] = {
        "operationId": r.op_id,
        "summary": r.summary,
        "tags": list(r.tags),
        "responses": responses,
    }
    if r.public:  # the probes: no key, so no 401/403 either
        op["security"] = []
        responses.pop("401", None)
        responses.pop("403", None)
    else:
        op["x-required-role"] = r.needs  # the role a key needs (read < operate < admin)
    params = [
        {"name": p.name, "in": p.where, "required": p.required, "description": p.description,
         "schema": dict(p.schema)}
        for p in r.params
    ]
    if params:
        op["parameters"] = params
    if r.body is not None:
        op["requestBody"] = _body(r.body, schemas)
    return op


def build_openapi(routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI document describing `routes` (those a server registered)."""
    routes = list(routes)
    schemas = _Schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        ops = paths.setdefault(canonical(r.path), {})
        if r.method.lower() in ops:
            raise ValueError(f"{r.method} {r.path} is declared twice")
        ops[r.method.lower()] = _operation(r, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Aether management API", "version": "1", "description": _DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "tags": [{"name": t} for t in TAGS],
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """The (METHOD, path) pairs a document describes."""
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
