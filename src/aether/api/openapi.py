"""The OpenAPI 3.1 document of the management API, served at `GET /api/v1/openapi.json`.

Schemas of answers and bodies that are msgspec Structs are generated from the Structs
(`msgspec.json.schema_components`), so they cannot drift from the wire types; the few answers that
are plain dicts are described by hand here. `build_openapi()` describes every endpoint a node can
serve; `build_openapi(routes)` keeps only the `(METHOD, path)` pairs given, which is what the server
does with the routes it actually registered (a node without a deployment service, for example,
does not list the deployment endpoints). `tests/test_openapi.py` checks both directions against the
aiohttp router, so an endpoint added without a description here fails the tests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import msgspec

from aether.api.deploy_routes import ApplyBlueprint, DeployRequest, UndeployRequest
from aether.api.map_routes import (
    MAX_TTL,
    CreateMap,
    MapCreated,
    MapDeleted,
    MapDetail,
    MapEntryRemoved,
    MapEntryWritten,
    MapKeys,
    MapListing,
)
from aether.api.types import KVListing, Problem
from aether.core.status import NodeStatus
from aether.deploy.operations import SliceStatus
from aether.kv.keys import BlueprintValue
from aether.metrics.service import MetricsHistory, MetricsView

__all__ = [
    "COORDINATES_PATTERN",
    "NAME_OR_COORDINATES_PATTERN",
    "OPENAPI_VERSION",
    "build_openapi",
    "operations",
]

OPENAPI_VERSION = "3.1.0"
P = "/api/v1"
_REF = "#/components/schemas/{name}"

_GROUP = r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*"
_ARTIFACT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_VERSION = r"[0-9]+(\.[0-9]+)?(\.[0-9]+)?(-[0-9A-Za-z.-]+)?"
COORDINATES_PATTERN = f"^{_GROUP}:{_ARTIFACT}:{_VERSION}$"
"""``group:artifact:version`` (the server parses and answers 400 with the reason when it does not fit)."""
NAME_OR_COORDINATES_PATTERN = f"^{_GROUP}:{_ARTIFACT}(:{_VERSION})?$"
"""``group:artifact`` (every version) or ``group:artifact:version``."""

_ERRORS = {
    400: "Invalid input: unknown or repeated query parameter, malformed body, invalid value",
    401: "Missing, malformed, wrong or revoked API key (only when the node has an API key)",
    403: "The key's role does not allow the operation (`detail` names the role needed)",
    408: "The request body did not arrive in time",
    404: "Not found",
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


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _any_json(t: Any) -> dict[str, Any]:
    if t is object:
        return {"description": "any JSON value"}
    raise NotImplementedError(f"no JSON schema for {t!r}")


def _schemas() -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        [
            NodeStatus,
            KVListing,
            Problem,
            SliceStatus,
            BlueprintValue,
            ApplyBlueprint,
            DeployRequest,
            UndeployRequest,
            CreateMap,
            MapListing,
            MapCreated,
            MapDetail,
            MapDeleted,
            MapEntryWritten,
            MapEntryRemoved,
            MapKeys,
            MetricsView,
            MetricsHistory,
        ],
        ref_template=_REF,
        schema_hook=_any_json,
    )
    either = "GROUP:ARTIFACT (every version) or GROUP:ARTIFACT:VERSION"
    components["ScaleRequest"] = copy.deepcopy(components["DeployRequest"])
    components["ScaleRequest"]["title"] = "ScaleRequest"
    _coordinates(components["DeployRequest"], COORDINATES_PATTERN, "GROUP:ARTIFACT:VERSION")
    _coordinates(components["ScaleRequest"], NAME_OR_COORDINATES_PATTERN, either)
    _coordinates(components["UndeployRequest"], NAME_OR_COORDINATES_PATTERN, either)
    obj = "object"
    components.update(
        {
            "Health": {
                "type": obj,
                "required": ["status", "live", "ready", "node_id", "quorum", "leader", "time"],
                "properties": {
                    "status": {"const": "ok"},
                    "live": {"type": "boolean"},
                    "ready": {"type": "boolean"},
                    "node_id": {"type": "string"},
                    "quorum": {"type": "boolean"},
                    "leader": {"type": ["string", "null"]},
                    "time": {"type": "number"},
                },
            },
            "Unready": {
                "description": "A problem document extended with the health fields",
                "type": obj,
                "required": [
                    "type",
                    "title",
                    "status",
                    "detail",
                    "live",
                    "ready",
                    "reason",
                    "node_id",
                    "quorum",
                    "leader",
                    "time",
                ],
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"const": 503},
                    "detail": {"type": "string"},
                    "live": {"type": "boolean"},
                    "ready": {"const": False},
                    "reason": {"type": "string"},
                    "node_id": {"type": "string"},
                    "quorum": {"type": "boolean"},
                    "leader": {"type": ["string", "null"]},
                    "time": {"type": "number"},
                },
            },
            "NodeEntry": {
                "type": obj,
                "required": ["id", "address", "state", "leader"],
                "properties": {
                    "id": {"type": "string"},
                    "address": {"type": "string", "description": "cluster HOST:PORT"},
                    "state": {"enum": ["up", "down"]},
                    "leader": {"type": "boolean"},
                },
            },
            "BlueprintRecord": {
                "description": "A stored, expanded blueprint with its id",
                "allOf": [
                    _ref("BlueprintValue"),
                    {"type": obj, "required": ["id"], "properties": {"id": {"type": "string"}}},
                ],
            },
            "Deleted": {
                "type": obj,
                "required": ["id", "deleted"],
                "properties": {"id": {"type": "string"}, "deleted": {"const": True}},
            },
            "Scaled": {
                "type": obj,
                "required": ["artifact", "instances", "blueprints"],
                "properties": {
                    "artifact": {"type": "string"},
                    "instances": {"type": "integer", "minimum": 1},
                    "blueprints": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "ids of the blueprints changed",
                    },
                },
            },
            "Undeployed": {
                "type": obj,
                "required": ["artifact", "blueprints"],
                "properties": {
                    "artifact": {"type": "string"},
                    "blueprints": {"type": "array", "items": {"type": "string"}},
                },
            },
        }
    )
    return components


def _coordinates(schema: dict[str, Any], pattern: str, description: str) -> None:
    schema["properties"]["artifact"] = {"type": "string", "pattern": pattern, "description": description}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(code: int, description: str | None = None) -> dict[str, Any]:
    return {
        "description": description or _ERRORS[code],
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _op(
    op_id: str,
    summary: str,
    ok: dict[int, dict[str, Any]],
    errors: Iterable[int],
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    tags: tuple[str, ...] = ("cluster",),
    descriptions: dict[int, str] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(k): v for k, v in ok.items()}
    for code in sorted({*errors, 401, 403, 500}):
        responses.setdefault(str(code), _problem(code, (descriptions or {}).get(code)))
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "tags": list(tags),
        "responses": responses,
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    return op


def _timeout(default: float) -> dict[str, Any]:
    return {
        "name": "timeout",
        "in": "query",
        "required": False,
        "description": f"seconds to wait (default {default:g}), more than 0 and at most 3600",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    }


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _paths() -> dict[str, dict[str, Any]]:
    dep = ("deployment",)
    consensus = (400, 503, 504)
    return {
        f"{P}/status": {
            "get": _op(
                "getStatus",
                "The cluster as this node sees it",
                {200: _json(_ref("NodeStatus"), "Node status")},
                (400, 503),
            )
        },
        f"{P}/kv": {
            "get": _op(
                "listKV",
                "Diagnostic listing of this node's copy of the replicated store",
                {200: _json(_ref("KVListing"), "Entries under the prefix, sorted by key")},
                (400, 503),
                params=[
                    {
                        "name": "prefix",
                        "in": "query",
                        "required": False,
                        "description": "key prefix; all keys when absent or empty",
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        f"{P}/health": {
            "get": _op(
                "getHealth",
                "Liveness and readiness (ready = has quorum)",
                {
                    200: _json(_ref("Health"), "Ready"),
                    503: {
                        "description": "Not ready (no quorum, or starting)",
                        "content": {"application/problem+json": {"schema": _ref("Unready")}},
                    },
                },
                (400,),
            )
        },
        f"{P}/nodes": {
            "get": _op(
                "listNodes",
                "Configured members as this node sees them",
                {200: _json({"type": "array", "items": _ref("NodeEntry")}, "Members")},
                (400, 503),
            )
        },
        f"{P}/keys": {
            "get": _op(
                "listKeys",
                "API keys stored in the cluster: name, role, created (role admin)",
                {200: _json({"type": "array", "items": {"type": "object"}}, "Keys, by name")},
                (400, 503),
                tags=("security",),
            ),
            "post": _op(
                "createKey",
                "Create a key with a role (read, operate, admin); the answer holds the key, shown once "
                "(role admin)",
                {201: _json({"type": "object"}, "The key: name, role, created, key")},
                (400, 409, 413, 503, 504),
                body=_json(
                    {
                        "type": "object",
                        "required": ["name", "role"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
                            "role": {"type": "string", "enum": ["read", "operate", "admin"]},
                        },
                    },
                    "The key's name and role",
                ),
                tags=("security",),
            ),
        },
        f"{P}/keys/{{name}}": {
            "delete": _op(
                "revokeKey",
                "Revoke a key: every node refuses it once the removal is applied (role admin)",
                {200: _json({"type": "object"}, "Revoked")},
                (400, 404, 503, 504),
                params=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                tags=("security",),
            )
        },
        f"{P}/audit": {
            "get": _op(
                "getAudit",
                "The newest write operations this node served (who, what, when, result), newest "
                "last (role admin)",
                {200: _json({"type": "array", "items": {"type": "object"}}, "Audit entries")},
                (400,),
                params=[
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "at most this many entries (1-1000, default 100)",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    }
                ],
                tags=("security",),
            )
        },
        f"{P}/events": {
            "get": _op(
                "streamEvents",
                "Server-sent events of what this node sees (hello, node-joined, node-left, "
                "leader-changed, slice-state, slice-removed, blueprint-applied, blueprint-deleted, resync, "
                "dropped); a `: keepalive` comment every 15 s",
                {
                    200: {
                        "description": "An endless event stream; each data line is a JSON object",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                (400,),
                tags=("events",),
            )
        },
        f"{P}/openapi.json": {
            "get": _op(
                "getOpenAPI",
                "This document (the routes this node serves)",
                {200: _json({"type": "object"}, "OpenAPI 3.1 document")},
                (),
                tags=("meta",),
            )
        },
        f"{P}/slices": {
            "get": _op(
                "listSlices",
                "Desired and active instances per artifact, with per-node states",
                {200: _json({"type": "array", "items": _ref("SliceStatus")}, "Slice statuses")},
                (),
                tags=dep,
            )
        },
        f"{P}/blueprints": {
            "get": _op(
                "listBlueprints",
                "Stored blueprints",
                {200: _json({"type": "array", "items": _ref("BlueprintRecord")}, "Blueprints")},
                (),
                tags=dep,
            ),
            "post": _op(
                "applyBlueprint",
                "Parse, expand and store a blueprint (replaces one with the same id)",
                {201: _json(_ref("BlueprintRecord"), "The expanded blueprint")},
                consensus,
                body={
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("ApplyBlueprint")},
                        "application/toml": {"schema": {"type": "string"}},
                        "text/plain": {"schema": {"type": "string"}},
                    },
                },
                tags=dep,
                descriptions={400: "Invalid body or blueprint; the detail names the file, line and problem"},
            ),
        },
        f"{P}/blueprints/{{id}}": {
            "get": _op(
                "getBlueprint",
                "One stored blueprint",
                {200: _json(_ref("BlueprintRecord"), "The blueprint")},
                (404,),
                params=[_path("id", "blueprint id")],
                tags=dep,
            ),
            "delete": _op(
                "deleteBlueprint",
                "Delete a blueprint (its instances are stopped)",
                {200: _json(_ref("Deleted"), "Deleted")},
                (404, 503, 504),
                params=[_path("id", "blueprint id")],
                tags=dep,
            ),
        },
        f"{P}/blueprints/{{id}}/wait": {
            "post": _op(
                "waitBlueprint",
                "Wait until every instance of the blueprint is ACTIVE",
                {200: _json({"type": "array", "items": _ref("SliceStatus")}, "Converged statuses")},
                (400, 404, 409, 504),
                params=[_path("id", "blueprint id"), _timeout(60.0)],
                tags=dep,
                descriptions={
                    404: "No such blueprint",
                    409: "An instance FAILED; detail gives the reason",
                    504: "Not converged in time",
                },
            )
        },
        f"{P}/deploy": {
            "post": _op(
                "deploy",
                "Deploy an artifact (stored as the blueprint direct:GROUP:ARTIFACT)",
                {201: _json(_ref("BlueprintValue"), "The artifact's direct blueprint")},
                consensus,
                body=_json_body("DeployRequest"),
                tags=dep,
            )
        },
        f"{P}/scale": {
            "post": _op(
                "scale",
                "Set the instance count of an artifact in every blueprint that has it",
                {200: _json(_ref("Scaled"), "Blueprints changed")},
                consensus,
                body=_json_body("ScaleRequest"),
                tags=dep,
            )
        },
        f"{P}/undeploy": {
            "post": _op(
                "undeploy",
                "Remove an artifact (G:A:V or G:A) from every blueprint",
                {200: _json(_ref("Undeployed"), "Blueprints changed")},
                consensus,
                body=_json_body("UndeployRequest"),
                tags=dep,
            )
        },
        f"{P}/invoke/{{artifact}}/{{method}}": {
            "post": _op(
                "invoke",
                "Call a slice entry point; JSON argument in, JSON answer out",
                {200: _json({}, "The entry's answer")},
                (400, 404, 502, 503, 504),
                params=[
                    {
                        **_path("artifact", "GROUP:ARTIFACT[:VERSION]"),
                        "schema": {"type": "string", "pattern": NAME_OR_COORDINATES_PATTERN},
                    },
                    _path("method", "entry point name"),
                    _timeout(10.0),
                ],
                body={
                    "required": False,
                    "description": "the entry's argument (empty body: null)",
                    "content": {"application/json": {"schema": {}}},
                },
                tags=("invoke",),
                descriptions={404: "Unknown entry", 503: "No ACTIVE instance of the artifact"},
            )
        },
        **_map_paths(),
        **_metrics_paths(),
    }


def _map_paths() -> dict[str, dict[str, Any]]:
    tags = ("maps",)
    name = _path("name", "map name: 1-63 lowercase letters, digits, '_', '.' or '-'")
    key = _path("key", "the key (percent-encoded; may contain '/'), at most 1024 bytes of UTF-8")
    m = f"{P}/maps"
    unknown = {404: "No map of that name"}
    unavailable = "The key's partition primary or a write quorum was not reached in time"
    return {
        m: {
            "get": _op(
                "listMaps",
                "Defined maps and the partition table (version and members)",
                {200: _json(_ref("MapListing"), "Map definitions, sorted by name")},
                (400,),
                tags=tags,
            ),
            "post": _op(
                "createMap",
                "Define a map (write_quorum defaults to min(2, replicas))",
                {
                    201: _json(_ref("MapCreated"), "Created"),
                    200: _json(_ref("MapCreated"), "An identical map already exists (created: false)"),
                },
                (400, 409, 413, 503, 504),
                body=_json_body("CreateMap"),
                tags=tags,
                descriptions={
                    400: "Invalid body, name or setting; the detail names the field",
                    409: "A map of that name exists with other settings",
                },
            ),
        },
        f"{m}/{{name}}": {
            "get": _op(
                "getMap",
                "A map's definition, the partition table and every live node's stats of the map",
                {200: _json(_ref("MapDetail"), "The map")},
                (400, 404),
                params=[name],
                tags=tags,
                descriptions=unknown,
            ),
            "delete": _op(
                "deleteMap",
                "Delete a map and its entries on every node",
                {200: _json(_ref("MapDeleted"), "Deleted")},
                (400, 404, 503, 504),
                params=[name],
                tags=tags,
                descriptions=unknown,
            ),
        },
        f"{m}/{{name}}/keys": {
            "get": _op(
                "listMapKeys",
                "Live keys of a map (gathered from every partition primary), sorted",
                {200: _json(_ref("MapKeys"), "Keys")},
                (400, 404, 503),
                params=[
                    name,
                    {
                        "name": "prefix",
                        "in": "query",
                        "required": False,
                        "description": "only keys starting with this; all keys when absent or empty",
                        "schema": {"type": "string"},
                    },
                ],
                tags=tags,
                descriptions={**unknown, 503: "A node holding partitions did not answer"},
            )
        },
        f"{m}/{{name}}/entries/{{key}}": {
            "get": _op(
                "getMapEntry",
                "A key's value, decoded from MessagePack and answered as JSON",
                {200: _json({}, "The value")},
                (400, 404, 502, 503),
                params=[name, key],
                tags=tags,
                descriptions={
                    404: "No map of that name, or no such key",
                    502: "The stored value has no JSON form (binary data, an extension, ...); "
                    "the detail names the key",
                    503: unavailable,
                },
            ),
            "put": _op(
                "putMapEntry",
                "Store a JSON value (encoded as MessagePack) under a key",
                {200: _json(_ref("MapEntryWritten"), "Stored (on a write quorum of nodes)")},
                (400, 404, 413, 503),
                params=[
                    name,
                    key,
                    {
                        "name": "ttl",
                        "in": "query",
                        "required": False,
                        "description": "seconds until the entry expires (more than 0); none when absent",
                        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TTL},
                    },
                ],
                body={
                    "required": True,
                    "description": "the value, any JSON",
                    "content": {"application/json": {"schema": {}}},
                },
                tags=tags,
                descriptions={
                    **unknown,
                    400: "Invalid key, ttl or JSON, or the encoded value exceeds the map's max_value_bytes",
                    503: unavailable + "; the outcome of the write is unknown",
                },
            ),
            "delete": _op(
                "removeMapEntry",
                "Remove a key",
                {200: _json(_ref("MapEntryRemoved"), "Removed")},
                (400, 404, 503),
                params=[name, key],
                tags=tags,
                descriptions={404: "No map of that name, or no such key", 503: unavailable},
            ),
        },
    }


def _metrics_paths() -> dict[str, dict[str, Any]]:
    return {
        f"{P}/metrics": {
            "get": _op(
                "getMetrics",
                "Cluster metrics: nodes (CPU, memory), entries (calls, rates, errors, latency quantiles, "
                "slow calls), totals; the leader's latest snapshot, else this node's own figures",
                {200: _json(_ref("MetricsView"), "The cluster snapshot as this node has it")},
                (400,),
                tags=("metrics",),
            )
        },
        f"{P}/metrics/history": {
            "get": _op(
                "getMetricsHistory",
                "Per-second cluster points of the last N seconds (the 2-hour window; any node serves "
                "it from its copy of the leader's window)",
                {200: _json(_ref("MetricsHistory"), "Points, oldest first")},
                (400,),
                params=[
                    {
                        "name": "seconds",
                        "in": "query",
                        "required": False,
                        "description": "how far back (default 300), more than 0 and at most 7200",
                        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 7200},
                    }
                ],
                tags=("metrics",),
            )
        },
        f"{P}/metrics/stream": {
            "get": _op(
                "streamMetrics",
                "Server-sent events: `event: metrics` with the same document as GET /api/v1/metrics, "
                "every `interval` seconds, until the client disconnects",
                {
                    200: {
                        "description": "An endless event stream; each data line is a JSON metrics document",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                (400,),
                params=[
                    {
                        "name": "interval",
                        "in": "query",
                        "required": False,
                        "description": "seconds between events (default 1), from 0.2 to 60",
                        "schema": {"type": "number", "minimum": 0.2, "maximum": 60},
                    }
                ],
                tags=("metrics",),
            )
        },
        "/metrics": {
            "get": _op(
                "getPrometheusMetrics",
                "Prometheus text exposition of this node (needs the API key like every endpoint)",
                {
                    200: {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                (400,),
                tags=("metrics",),
            )
        },
    }


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


def build_openapi(routes: Iterable[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The OpenAPI document; with `routes` ((METHOD, path) pairs), only those operations."""
    paths = _paths()
    if routes is not None:
        keep = {(m.lower(), p) for m, p in routes}
        paths = {
            p: kept for p, ops in paths.items() if (kept := {m: o for m, o in ops.items() if (m, p) in keep})
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Aether management API", "version": "1", "description": _DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "tags": [
            {"name": t}
            for t in ("cluster", "events", "deployment", "invoke", "maps", "metrics", "security", "meta")
        ],
        "paths": copy.deepcopy(paths),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """The (METHOD, path) pairs a document describes."""
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
