"""Management API endpoints for distributed maps: definitions, stats, and entries as JSON.

Thin handlers over the node's `MapService` (`node.maps`, aether.maps.service). Definitions are
writes through consensus, so any node serves them; entry operations go to the key's partition
primary from whichever node takes the request.

Entries are stored as MessagePack bytes (what `Slice.map` writes). The API converts at the edge:
a JSON body is encoded to MessagePack on write, and a stored value is decoded and answered as
JSON on read. A stored value that has no JSON form (binary data, a MessagePack extension, a
non-string map key, NaN or an infinity) answers 502 naming the key and where in the value.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time
from typing import Annotated, Any, Final
from urllib.parse import unquote_to_bytes

import msgspec
from aiohttp import web

from aether.api.common import API_PREFIX, MAX_BODY, json_response, problem_response, query
from aether.api.routing import ANY_JSON, Answer, Body, Route, path_param, query_param
from aether.core.errors import BadRequest, StatusError
from aether.core.jsonbody import decode_json_body, require_json_content_type
from aether.core.maps import (
    DEFAULT_MAX_VALUE_BYTES,
    MAX_TTL,
    MAX_VALUE_BYTES_LIMIT,
    MapKeyError,
    MapSpec,
    StorageEngine,
    UnknownMap,
    check_map_name,
)
from aether.maps.messages import MapNodeStats

__all__ = [
    "MAX_BODY",
    "ROUTES",
    "CreateMap",
    "MapCreated",
    "MapDefinition",
    "MapDeleted",
    "MapDetail",
    "MapEntryRemoved",
    "MapEntryWritten",
    "MapKeys",
    "MapListing",
    "MapRoutes",
]

_DEFAULT_WRITE_QUORUM: Final = MapSpec().write_quorum


class CreateMap(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/v1/maps`: `write_quorum` defaults to min(2, replicas)."""

    name: str
    replicas: Annotated[int, msgspec.Meta(ge=1, le=9)] = MapSpec().replicas
    write_quorum: Annotated[int, msgspec.Meta(ge=1, le=9)] | None = None
    engine: StorageEngine = "memory"
    max_value_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_VALUE_BYTES_LIMIT)] = DEFAULT_MAX_VALUE_BYTES

    def spec(self) -> MapSpec:
        quorum = self.write_quorum
        if quorum is None:
            quorum = min(_DEFAULT_WRITE_QUORUM, self.replicas)
        return MapSpec(self.replicas, quorum, self.engine, self.max_value_bytes).validate(self.name)


class MapDefinition(msgspec.Struct):
    name: str
    replicas: int
    write_quorum: int
    engine: StorageEngine
    max_value_bytes: int

    @classmethod
    def of(cls, name: str, spec: MapSpec) -> MapDefinition:
        return cls(name, spec.replicas, spec.write_quorum, spec.engine, spec.max_value_bytes)


class MapCreated(MapDefinition):
    """The answer to `POST /api/v1/maps`: `created` is false when an identical map already existed."""

    created: bool


class MapListing(msgspec.Struct):
    """Every defined map, with the partition table (`null`/empty before the leader wrote one)."""

    table_version: int | None
    members: list[str]
    maps: list[MapDefinition]


class MapDetail(MapDefinition):
    """One map: its definition, the partition table, and each live node's stats of it.
    `cluster_members`: the cluster's member set (the table's `members` leave out a member that is
    down or not serving maps; `aether map stats` lists those too)."""

    table_version: int | None
    members: list[str]
    nodes: list[MapNodeStats]
    cluster_members: list[str] = msgspec.field(default_factory=list)


class MapDeleted(msgspec.Struct):
    name: str
    deleted: bool


class MapEntryWritten(msgspec.Struct):
    map: str
    key: str
    bytes: int
    """Size of the stored (MessagePack) value."""
    ttl: float | None


class MapEntryRemoved(msgspec.Struct):
    map: str
    key: str
    removed: bool


class MapKeys(msgspec.Struct):
    map: str
    prefix: str
    keys: list[str]


def _problem(status: int, detail: str) -> web.Response:
    return problem_response(status, detail)


async def _read(request: web.Request) -> bytes:
    size = request.content_length
    if size is not None and size > MAX_BODY:
        raise _TooLarge(size)
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise _TooLarge(len(raw))
    if not raw.strip():
        raise BadRequest(f"{request.method} {request.path} needs a JSON body")
    return raw


class _TooLarge(StatusError):
    status = 413

    def __init__(self, size: int) -> None:
        super().__init__(f"request body of {size} bytes exceeds the {MAX_BODY}-byte limit")


def _ttl(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"ttl must be a number of seconds, not {text!r}") from None
    if not (0 < value <= MAX_TTL):  # also false for NaN
        raise BadRequest(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, not {text!r}")
    return value


def _entry_key(request: web.Request) -> str:
    """The key of `/api/v1/maps/{name}/entries/{key}`: the rest of the raw path, percent-decoded
    to bytes and read as UTF-8. aiohttp's own decoding (`match_info`) keeps an escape that does
    not decode as UTF-8 as it is: `entries/%FF` and `entries/%25FF` were the same key, '%FF'."""
    name = request.match_info["name"]
    raw = request.rel_url.raw_path.split("/", 6)[6]  # '', api, v1, maps, NAME, entries, KEY...
    data = unquote_to_bytes(raw.encode("utf-8", "surrogateescape"))  # raw bytes in the request line
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MapKeyError(
            f"map {name!r}: the key is not UTF-8 once percent-decoded (byte {e.start} of {data!r}); "
            "percent-encode the key's UTF-8 bytes (e.g. 'é' as %C3%A9, '%' as %25)"
        ) from None


def _json_problem(value: object, path: str = "$") -> str | None:
    """Where and why `value` (decoded MessagePack) has no JSON form, or None if it has one."""
    if value is None or isinstance(value, (bool, int, str, datetime, date, time)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value} (not a JSON number)"
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if (problem := _json_problem(item, f"{path}[{i}]")) is not None:
                return problem
        return None
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                return f"{path} has a {type(k).__name__} key {k!r} (JSON object keys are strings)"
            if (problem := _json_problem(item, f"{path}.{k}")) is not None:
                return problem
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{path} is binary data"
    if isinstance(value, msgspec.msgpack.Ext):
        return f"{path} is a MessagePack extension (code {value.code})"
    return f"{path} is a {type(value).__name__}"


class MapRoutes:
    def __init__(self, maps: Any) -> None:
        self.maps = maps

    def _table(self) -> tuple[int | None, list[str]]:
        table = self.maps.table
        return (table.version, list(table.members)) if table is not None else (None, [])

    def _spec(self, name: str) -> MapSpec:
        check_map_name(name)
        spec: MapSpec | None = self.maps.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.maps.specs)) or "none"
            raise UnknownMap(
                f"no map {name!r} (defined maps: {known}); create it with `aether map create {name}`"
            )
        return spec

    # -- definitions --------------------------------------------------------------------------------

    async def list_maps(self, request: web.Request) -> web.Response:
        query(request, ())
        version, members = self._table()
        specs: dict[str, MapSpec] = dict(self.maps.specs)
        defs = [MapDefinition.of(n, specs[n]) for n in sorted(specs)]
        return json_response(MapListing(table_version=version, members=members, maps=defs))

    async def create_map(self, request: web.Request) -> web.Response:
        query(request, ())
        raw = await _read(request)
        require_json_content_type(request.headers.get("Content-Type"))
        try:
            body = msgspec.convert(decode_json_body(raw), type=CreateMap)
        except msgspec.ValidationError as e:
            raise BadRequest(f"invalid map definition: {e}") from None
        spec = body.spec()
        created = await self.maps.define(body.name, spec)
        d = MapDefinition.of(body.name, spec)
        out = MapCreated(d.name, d.replicas, d.write_quorum, d.engine, d.max_value_bytes, created=created)
        return json_response(out, status=201 if created else 200)

    async def get_map(self, request: web.Request) -> web.Response:
        query(request, ())
        name = request.match_info["name"]
        spec = self._spec(name)
        nodes: list[MapNodeStats] = sorted(await self.maps.stats(name), key=lambda s: s.node)
        version, members = self._table()
        d = MapDefinition.of(name, spec)
        return json_response(
            MapDetail(
                d.name, d.replicas, d.write_quorum, d.engine, d.max_value_bytes,
                table_version=version, members=members, nodes=nodes,
                cluster_members=self.maps.member_set(),
            )
        )

    async def delete_map(self, request: web.Request) -> web.Response:
        query(request, ())
        name = request.match_info["name"]
        self._spec(name)
        if not await self.maps.undefine(name):
            raise UnknownMap(f"no map {name!r}")
        return json_response(MapDeleted(name=name, deleted=True))

    # -- entries ------------------------------------------------------------------------------------

    async def keys(self, request: web.Request) -> web.Response:
        prefix = query(request, ("prefix",)).get("prefix", "")
        name = request.match_info["name"]
        self._spec(name)
        keys: list[str] = await self.maps.map_keys(name, prefix)
        return json_response(MapKeys(map=name, prefix=prefix, keys=keys))

    async def get_entry(self, request: web.Request) -> web.Response:
        query(request, ())
        name, key = request.match_info["name"], _entry_key(request)
        self._spec(name)
        raw: bytes | None = await self.maps.map_get(name, key)
        if raw is None:
            return _problem(404, f"map {name!r} has no key {key!r}")
        try:
            value = msgspec.msgpack.decode(raw)
        except msgspec.DecodeError as e:
            return _problem(502, f"map {name!r} key {key!r}: the stored value is not MessagePack: {e}")
        problem = _json_problem(value)
        if problem is not None:
            return _problem(502, f"map {name!r} key {key!r}: the stored value has no JSON form: {problem}")
        return json_response(value)

    async def put_entry(self, request: web.Request) -> web.Response:
        ttl = _ttl(query(request, ("ttl",)).get("ttl"))
        name, key = request.match_info["name"], _entry_key(request)
        self._spec(name)
        raw = await _read(request)
        what = f"the value for map {name!r} key {key!r}"
        require_json_content_type(request.headers.get("Content-Type"), what)
        try:
            value = decode_json_body(raw)  # malformed, too deep, integers beyond 64 bits
        except BadRequest as e:
            raise BadRequest(f"the value for map {name!r} key {key!r}: {e}") from None
        encoded = msgspec.msgpack.encode(value)
        await self.maps.map_put(name, key, encoded, ttl=ttl)
        return json_response(MapEntryWritten(map=name, key=key, bytes=len(encoded), ttl=ttl))

    async def remove_entry(self, request: web.Request) -> web.Response:
        query(request, ())
        name, key = request.match_info["name"], _entry_key(request)
        self._spec(name)
        if not await self.maps.map_remove(name, key):
            return _problem(404, f"map {name!r} has no key {key!r}")
        return json_response(MapEntryRemoved(map=name, key=key, removed=True))


_TAGS = ("maps",)
_M = f"{API_PREFIX}/maps"
# keys may contain '/' (the rest of the path, percent-decoded) and a line break ('.' matches none)
_ENTRY = f"{_M}/{{name}}/entries/{{key:[\\s\\S]+}}"
_NAME = path_param("name", "map name: 1-63 lowercase letters, digits, '_', '.' or '-'")
_KEY = path_param("key", "the key (percent-encoded; may contain '/'), at most 1024 bytes of UTF-8")
_UNKNOWN = {404: "No map of that name"}
_UNAVAILABLE = "The key's partition primary or a write quorum was not reached in time"

ROUTES: Final = (
    Route(
        "GET", _M, MapRoutes.list_maps, "listMaps",
        "Defined maps and the partition table (version and members)",
        {200: Answer(MapListing, "Map definitions, sorted by name")}, (400,), tags=_TAGS,
    ),
    Route(
        "POST", _M, MapRoutes.create_map, "createMap",
        "Define a map (write_quorum defaults to min(2, replicas))",
        {
            201: Answer(MapCreated, "Created"),
            200: Answer(MapCreated, "An identical map already exists (created: false)"),
        },
        (400, 409, 413, 503, 504), role="operate", body=Body(CreateMap), tags=_TAGS,
        descriptions={
            400: "Invalid body, name or setting; the detail names the field",
            409: "A map of that name exists with other settings",
        },
    ),
    Route(
        "GET", f"{_M}/{{name}}", MapRoutes.get_map, "getMap",
        "A map's definition, the partition table and every live node's stats of the map",
        {200: Answer(MapDetail, "The map")}, (400, 404), params=(_NAME,), tags=_TAGS, descriptions=_UNKNOWN,
    ),
    Route(
        "DELETE", f"{_M}/{{name}}", MapRoutes.delete_map, "deleteMap",
        "Delete a map and its entries on every node",
        {200: Answer(MapDeleted, "Deleted")}, (400, 404, 503, 504), role="operate", params=(_NAME,),
        tags=_TAGS, descriptions=_UNKNOWN,
    ),
    Route(
        "GET", f"{_M}/{{name}}/keys", MapRoutes.keys, "listMapKeys",
        "Live keys of a map (gathered from every partition primary), sorted",
        {200: Answer(MapKeys, "Keys")}, (400, 404, 503),
        params=(_NAME, query_param("prefix", "only keys starting with this; all keys when absent or empty")),
        tags=_TAGS, descriptions={**_UNKNOWN, 503: "A node holding partitions did not answer"},
    ),
    Route(
        "GET", _ENTRY, MapRoutes.get_entry, "getMapEntry",
        "A key's value, decoded from MessagePack and answered as JSON",
        {200: Answer(ANY_JSON, "The value")}, (400, 404, 502, 503), params=(_NAME, _KEY), tags=_TAGS,
        descriptions={
            404: "No map of that name, or no such key",
            502: "The stored value has no JSON form (binary data, an extension, ...); "
            "the detail names the key",
            503: _UNAVAILABLE,
        },
    ),
    Route(
        "PUT", _ENTRY, MapRoutes.put_entry, "putMapEntry",
        "Store a JSON value (encoded as MessagePack) under a key",
        {200: Answer(MapEntryWritten, "Stored (on a write quorum of nodes)")}, (400, 404, 413, 503),
        role="operate",
        params=(
            _NAME,
            _KEY,
            query_param(
                "ttl", "seconds until the entry expires (more than 0); none when absent",
                type="number", exclusiveMinimum=0, maximum=MAX_TTL,
            ),
        ),
        body=Body(ANY_JSON, "the value, any JSON"), tags=_TAGS,
        descriptions={
            **_UNKNOWN,
            400: "Invalid key, ttl or JSON, or the encoded value exceeds the map's max_value_bytes",
            503: _UNAVAILABLE + "; the outcome of the write is unknown",
        },
    ),
    Route(
        "DELETE", _ENTRY, MapRoutes.remove_entry, "removeMapEntry", "Remove a key",
        {200: Answer(MapEntryRemoved, "Removed")}, (400, 404, 503), role="operate", params=(_NAME, _KEY),
        tags=_TAGS, descriptions={404: "No map of that name, or no such key", 503: _UNAVAILABLE},
    ),
)
"""The distributed-map endpoints (served when the node runs a map service)."""
