"""Typed structured keys and their value types (docs/architecture.md, flow 1).

Every key renders to a string path and parses back; parsing validates each segment, so a
malformed key is rejected with a message naming the problem instead of being stored.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Union

import msgspec

from aether.core.errors import BadRequest
from aether.core.maps import MapSpec, PartitionTable, check_map_name
from aether.core.policy import EntryPolicy as EntryPolicy  # re-exported: blueprint entries, endpoints

_SEGMENT = re.compile(r"^[A-Za-z0-9._:@+-]{1,200}\Z")
_HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def _seg(name: str, value: str) -> str:
    if not _SEGMENT.match(value):
        raise BadRequest(f"invalid {name} {value!r} in key: use letters, digits and . _ : @ + -")
    return value


# --- values -----------------------------------------------------------------------------------------


class ScalingRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[slices.NAME.scaling]`: the bounds the controller keeps an autoscaled slice within and
    the targets it tracks (docs/controller.md). Each target gives a wanted instance count; the
    largest wins. Validated by `aether.deploy.blueprint` (1 <= min <= max, at least one target,
    every target > 0)."""

    min: int = 1
    max: int = 1
    in_flight: float | None = None
    """Calls running or queued per instance (Little's law: arrival rate x service time)."""
    rate: float | None = None
    """Calls arriving per second per instance."""
    p95_ms: float | None = None
    """95th percentile latency of the slice's calls, milliseconds."""
    cpu: float | None = None
    """CPU percent (of one core) of the processes of the nodes that host the slice."""

    def targets(self) -> dict[str, float]:
        """The targets that are set, by name."""
        return {
            name: v
            for name, v in (("in_flight", self.in_flight), ("rate", self.rate), ("p95_ms", self.p95_ms),
                            ("cpu", self.cpu))
            if v is not None
        }


class RolloutPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[slices.NAME.rollout]`: how a new version of the slice replaces the running one
    (docs/deployment.md, *Rolling and canary updates*). Validated by `aether.deploy.blueprint`."""

    strategy: str = "rolling"  # rolling | canary | blue-green
    steps: list[int] = []  # canary: percent of the calls for the new version per step
    interval: float = 30.0  # seconds each canary step is analysed
    max_error_rate: float | None = 0.05  # gate: share of the new version's calls that may fail (1: no gate)
    max_p99_ratio: float | None = None  # gate: p99 of the new version / p99 of the old
    max_surge: int = 1  # instances above `instances` while rolling
    max_unavailable: int = 0  # instances below `instances` while rolling
    progress_deadline: float = 120.0  # seconds new instances may take to become ready
    min_calls: int = 20  # calls of the new version a gate needs before it judges


class BlueprintSlice(msgspec.Struct, frozen=True):
    """One slice of an expanded blueprint: coordinates, instance count, and the artifacts (full
    coordinates) it calls, which must have an ACTIVE instance before it is activated."""

    artifact: str
    instances: int
    depends_on: list[str] = []
    name: str = ""  # the [slices.NAME] table it came from ("" for dependencies added by expansion)
    # the [slices.NAME.config] table, typed TOML values; `{ secret = "NAME" }` tables name secrets
    # (`aether.deploy.config`), resolved only when an instance starts, never stored here
    config: dict[str, Any] = {}
    scaling: ScalingRule | None = None  # [slices.NAME.scaling]: autoscaled by the controller
    max_concurrency: int | None = None  # calls one instance runs at once (None: no limit)
    max_queue: int | None = None  # calls one instance queues beyond max_concurrency (None: default)
    entry_concurrency: dict[str, int] = {}  # per-entry limits within an instance
    rollout: RolloutPolicy | None = None  # [slices.NAME.rollout]: how a new version replaces this one
    isolation: str = "auto"  # "process": always in a worker process of its own; "auto": when needed;
    # "shared": on the node's shared slice loop (calls between shared slices run directly there);
    # "inline": on the node's own loop (no thread hop; trusted code that never blocks)
    # [slices.NAME.entries.ENTRY]: per-entry policy overrides of what the code declares (fields set
    # only; `EntryPolicy` is defined in aether.core.policy because aether.invoke may not import kv)
    entries: dict[str, EntryPolicy] = {}


class BlueprintValue(msgspec.Struct, frozen=True):
    slices: list[BlueprintSlice]
    source: str = "operator"  # operator | controller | api


class SliceStateValue(msgspec.Struct, frozen=True):
    """Lifecycle state of one artifact on one node (docs/deployment.md).

    The leader writes commands (LOAD, ACTIVATE, DEACTIVATE, UNLOAD) and the instance ids the
    node should host (unique per artifact across the cluster); the node writes back the states
    it reaches (LOADING, LOADED, ACTIVATING, ACTIVE, DEACTIVATING, UNLOADING, FAILED + reason).
    """

    state: str
    timestamp: float
    reason: str | None = None
    instances: list[int] = []


class EndpointValue(msgspec.Struct, frozen=True):
    """One ACTIVE endpoint: the node that runs the instance, and the effective policy of the entry
    (code + blueprint override) every caller's invoker follows (None from nodes that predate it:
    the defaults)."""

    node_id: str
    state: str
    policy: EntryPolicy | None = None


class RouteValue(msgspec.Struct, frozen=True):
    artifact: str
    method: str
    bindings: dict[str, str] = {}


class ApiKeyValue(msgspec.Struct, frozen=True):
    """A management API key: its role and a salted scrypt hash of its secret (never the secret).
    `n`, `r`, `p` are the scrypt parameters it was hashed with (`aether.api.auth`)."""

    role: str
    salt: bytes
    hash: bytes
    n: int
    r: int
    p: int
    created: float


class SecretValue(msgspec.Struct, frozen=True):
    """A secret a slice config names (`secrets/{name}`): its value and when it was set. `version`
    counts the times it was set (a change restarts or reconfigures the instances using it).
    Never shown: the management API lists names and times only, and `GET /api/v1/kv` redacts it."""

    value: str
    created: float
    updated: float
    version: int = 1


class ArtifactManifest(msgspec.Struct, frozen=True):
    """One wheel in the cluster's artifact repository (docs/repository.md): what resolving needs,
    and where its bytes are (`chunks` values of at most `chunk_size` bytes in the repository map,
    keyed by `sha256`). Written last, after every chunk, so a visible manifest is complete."""

    project: str  # the PEP 503 normalised distribution name
    version: str  # the wheel's version (PEP 440, normalised)
    filename: str
    size: int
    sha256: str
    chunks: int
    chunk_size: int
    coords: str | None = None  # group:artifact:version of a slice wheel; None for a library
    slice_class: str | None = None
    dependencies: dict[str, str] = {}  # slices it calls: group:artifact -> version pattern
    maps: list[str] = []
    requires_dist: list[str] = []
    requires_python: str | None = None
    uploaded: float = 0.0
    upload: str = ""
    """The upload's own id (random hex): its chunks are `{sha256}/{upload}/{index}`, written by this
    upload alone, so deleting another upload of the same bytes never removes them. "" (a manifest
    written before uploads had ids): `{sha256}/{index}`."""


class ArtifactTombstone(msgspec.Struct, frozen=True):
    """A deleted version of the artifact repository (docs/repository.md): a node does not publish
    its local copy of it at start-up, and drops that copy. Written by the delete, before the
    manifest goes; an explicit upload of the version is still accepted (the tombstone only stops
    the implicit publishing of local directories)."""

    project: str
    version: str
    filename: str
    sha256: str
    deleted: float  # wall-clock time of the delete
    coords: str | None = None  # group:artifact:version of a slice wheel; None for a library


class CoordinatesClaim(msgspec.Struct, frozen=True):
    """Which wheel holds a slice's coordinates (docs/repository.md): taken with compare-and-set
    before the wheel's manifest is written, so two projects can never both declare them."""

    project: str
    version: str
    claimed: float  # wall-clock time of the claim


class ScaleValue(msgspec.Struct, frozen=True):
    """The instance count of an autoscaled artifact and the bounds operators set on it
    (`scale/{artifact}`). The controller writes `instances` (``source = "controller"``) within the
    bounds; an operator command (`aether scale`) writes bounds and wins (``source = "operator"``):
    `min`/`max` override the blueprint's `[slices.NAME.scaling]` bounds while set."""

    instances: int
    source: str  # controller | operator
    updated: float  # wall-clock time of the write
    reason: str = ""
    min: int | None = None
    max: int | None = None


class ControllerConfigValue(msgspec.Struct, frozen=True):
    """The cluster-wide controller configuration (`controller/config`): the TOML text an operator
    set (parsed by `aether.controller.config.parse_config`), when, and by whom."""

    text: str
    updated: float
    by: str = ""


class NodeInfoValue(msgspec.Struct, frozen=True):
    """Where a node serves its own ports (`nodes/{id}`), published by the node itself once it
    started: its management API and HTTP router as ``HOST:PORT`` (with ``https://`` when they use
    TLS), None when it runs without one. The cluster address is the member set's; these are what
    clients need to talk to one node in particular (`aether logs NODE`)."""

    management: str | None = None
    http: str | None = None
    version: str = ""  # the aether-slices version the node runs
    started: float = 0.0  # wall-clock time the node started


class RolloutValue(msgspec.Struct, frozen=True):
    """A rollout of a new version of one slice (`rollouts/{group:artifact}`, docs/deployment.md,
    *Rolling and canary updates*). The leader's rollout manager (`aether.deploy.rollout`) writes
    it; the reconciliation reads `old_instances`/`new_instances` as the desired counts of the two
    versions while the rollout is active, and every node's invoker and HTTP router read `weights`.

    `weights` maps versions to traffic weights (any non-negative integers, e.g. percents) for calls
    addressed to ``group:artifact``: a version gets a share of the calls proportional to its weight
    among the versions that have a reachable instance; a version that is not listed gets weight 0;
    when every weighted version has no reachable instance, the calls go to the others (a weight
    never makes a call fail). Empty `weights`: no split (every ACTIVE instance of any version is a
    candidate, as without a rollout). A call addressed to full coordinates ignores weights.
    """

    id: str
    artifact: str  # group:artifact
    old_version: str
    new_version: str
    strategy: str  # rolling | canary | blue-green
    state: str  # progressing | paused | succeeded | rolled-back | aborted
    instances: int  # the count the blueprint wants (of the new version once done)
    old_instances: int  # desired instances of old_version now
    new_instances: int  # desired instances of new_version now
    weights: dict[str, int] = {}
    step: int = 0  # index into `steps` (canary / blue-green), or rolling steps taken
    steps: list[int] = []  # canary: traffic percent of the new version per step, e.g. [10, 50, 100]
    max_surge: int = 1
    max_unavailable: int = 0
    interval: float = 30.0  # seconds a canary step is analysed before the next one
    max_error_rate: float | None = None  # gate: error share of the new version (0..1)
    max_p99_ratio: float | None = None  # gate: p99 of the new version / p99 of the old
    progress_deadline: float = 120.0  # seconds new instances may take to become ready
    min_calls: int = 20  # calls of the new version a gate needs before it judges
    started: float = 0.0
    updated: float = 0.0
    step_started: float = 0.0
    reason: str = ""
    blueprint: str = ""  # the blueprint whose change started it
    history: list[str] = []  # one line per step taken ("step 1: 10% to 0.2.0"), bounded
    calls: int = 0  # calls the new version finished during the rollout (analysed windows)
    failures: int = 0  # of which failed (5xx)
    # the old version's slice as its blueprint gave it when the rollout started (config, limits,
    # isolation, entry policies, count): what the old instances keep running with, and what a
    # rollback writes back (None: recorded by an older node, or nothing to keep)
    old_slice: BlueprintSlice | None = None


# --- keys -------------------------------------------------------------------------------------------


class BlueprintKey(msgspec.Struct, frozen=True):
    prefix: ClassVar[str] = "blueprints/"
    value_type: ClassVar[type] = BlueprintValue
    blueprint_id: str

    def __str__(self) -> str:
        return f"blueprints/{self.blueprint_id}"


class SliceKey(msgspec.Struct, frozen=True):
    prefix: ClassVar[str] = "slices/"
    value_type: ClassVar[type] = SliceStateValue
    node_id: str
    artifact: str

    def __str__(self) -> str:
        return f"slices/{self.node_id}/{self.artifact}"


class EndpointKey(msgspec.Struct, frozen=True):
    prefix: ClassVar[str] = "endpoints/"
    value_type: ClassVar[type] = EndpointValue
    artifact: str
    method: str
    instance: int

    def __str__(self) -> str:
        return f"endpoints/{self.artifact}/{self.method}:{self.instance}"


class RouteKey(msgspec.Struct, frozen=True):
    prefix: ClassVar[str] = "routes/"
    value_type: ClassVar[type] = RouteValue
    http_method: str
    path: str

    def __str__(self) -> str:
        return f"routes/{self.http_method}:{self.path}"


class UserKey(msgspec.Struct, frozen=True):
    """Free-form application/diagnostic key with an opaque bytes value."""

    prefix: ClassVar[str] = "user/"
    value_type: ClassVar[type] = bytes
    name: str

    def __str__(self) -> str:
        return f"user/{self.name}"


class MapDefKey(msgspec.Struct, frozen=True):
    """A distributed map's definition (`MapSpec`): `maps/defs/{name}`."""

    prefix: ClassVar[str] = "maps/defs/"
    value_type: ClassVar[type] = MapSpec
    name: str

    def __str__(self) -> str:
        return f"maps/defs/{self.name}"


class MapHealthKey(msgspec.Struct, frozen=True):
    """Why a node's map storage failed (a string), while it does: `maps/health/{node}`. The leader
    leaves such nodes out of the partition table; the node removes the key once it works again."""

    prefix: ClassVar[str] = "maps/health/"
    value_type: ClassVar[type] = str
    node: str

    def __str__(self) -> str:
        return f"maps/health/{self.node}"


class MapTableKey(msgspec.Struct, frozen=True):
    """The partition table of the distributed maps (`PartitionTable`): `maps/table`."""

    prefix: ClassVar[str] = "maps/table"
    value_type: ClassVar[type] = PartitionTable

    def __str__(self) -> str:
        return "maps/table"


class ApiKeyKey(msgspec.Struct, frozen=True):
    """A management API key (`ApiKeyValue`): `auth/keys/{name}`. Written only by a node's
    management API (admin role); cluster-internal, like every family but `user/`."""

    prefix: ClassVar[str] = "auth/keys/"
    value_type: ClassVar[type] = ApiKeyValue
    name: str

    def __str__(self) -> str:
        return f"auth/keys/{self.name}"


class SecretKey(msgspec.Struct, frozen=True):
    """A secret (`SecretValue`): `secrets/{name}`. Written only by a node's management API (admin
    role); cluster-internal, like every family but `user/`."""

    prefix: ClassVar[str] = "secrets/"
    value_type: ClassVar[type] = SecretValue
    name: str

    def __str__(self) -> str:
        return f"secrets/{self.name}"


class ArtifactKey(msgspec.Struct, frozen=True):
    """A wheel of the cluster's artifact repository (`ArtifactManifest`):
    `repository/{project}/{version}`; written only by the node's repository service."""

    prefix: ClassVar[str] = "repository/"
    value_type: ClassVar[type] = ArtifactManifest
    project: str
    version: str

    def __str__(self) -> str:
        return f"repository/{self.project}/{self.version}"


class ArtifactTombstoneKey(msgspec.Struct, frozen=True):
    """A deleted version of the artifact repository (`ArtifactTombstone`):
    `repository-deleted/{project}/{version}`; written only by the node's repository service."""

    prefix: ClassVar[str] = "repository-deleted/"
    value_type: ClassVar[type] = ArtifactTombstone
    project: str
    version: str

    def __str__(self) -> str:
        return f"repository-deleted/{self.project}/{self.version}"


class CoordinatesClaimKey(msgspec.Struct, frozen=True):
    """The wheel holding a slice's coordinates (`CoordinatesClaim`):
    `repository-coords/{group:artifact:version}`; written only by the node's repository service."""

    prefix: ClassVar[str] = "repository-coords/"
    value_type: ClassVar[type] = CoordinatesClaim
    coords: str

    def __str__(self) -> str:
        return f"repository-coords/{self.coords}"


class ScaleKey(msgspec.Struct, frozen=True):
    """The controller's count and the operator's bounds of an autoscaled artifact (`ScaleValue`):
    `scale/{artifact coordinates}`."""

    prefix: ClassVar[str] = "scale/"
    value_type: ClassVar[type] = ScaleValue
    artifact: str

    def __str__(self) -> str:
        return f"scale/{self.artifact}"


class ControllerConfigKey(msgspec.Struct, frozen=True):
    """The controller configuration (`ControllerConfigValue`): `controller/config`."""

    prefix: ClassVar[str] = "controller/config"
    value_type: ClassVar[type] = ControllerConfigValue

    def __str__(self) -> str:
        return "controller/config"


class RolloutKey(msgspec.Struct, frozen=True):
    """The rollout of a new version of one slice (`RolloutValue`): `rollouts/{group:artifact}`."""

    prefix: ClassVar[str] = "rollouts/"
    value_type: ClassVar[type] = RolloutValue
    artifact: str

    def __str__(self) -> str:
        return f"rollouts/{self.artifact}"


class NodeInfoKey(msgspec.Struct, frozen=True):
    """The addresses a node serves on (`NodeInfoValue`): `nodes/{node id}`."""

    prefix: ClassVar[str] = "nodes/"
    value_type: ClassVar[type] = NodeInfoValue
    node: str

    def __str__(self) -> str:
        return f"nodes/{self.node}"


Key = Union[  # noqa: UP007
    BlueprintKey, SliceKey, EndpointKey, RouteKey, UserKey, MapDefKey, MapTableKey, MapHealthKey, ApiKeyKey,
    SecretKey, ArtifactKey, ArtifactTombstoneKey, CoordinatesClaimKey, ScaleKey, ControllerConfigKey,
    RolloutKey, NodeInfoKey,
]
KEY_FAMILIES: tuple[type, ...] = (
    BlueprintKey, SliceKey, EndpointKey, RouteKey, UserKey, MapDefKey, MapTableKey, MapHealthKey,
    ApiKeyKey, SecretKey, ArtifactKey, ArtifactTombstoneKey, CoordinatesClaimKey, ScaleKey,
    ControllerConfigKey, RolloutKey, NodeInfoKey,
)
SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_secret_name(name: str) -> str:
    """`name` if it is a valid secret name (1-128 letters, digits, `.`, `_`, `-`; starting with a
    letter or digit), else BadRequest naming the rule."""
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise BadRequest(
            f"invalid secret name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
API_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_api_key_name(name: str) -> str:
    """`name` if it is a valid API key name (1-64 letters, digits, `_`, `-`; starting with a
    letter or digit), else BadRequest naming the rule."""
    if not API_KEY_NAME.fullmatch(name):
        raise BadRequest(
            f"invalid key name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name

_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%{}/-]*\Z")


def parse_key(text: str) -> Key:
    """Parse a rendered key; raise BadRequest naming what is wrong."""
    family, sep, rest = text.partition("/")
    if not sep or not rest:
        raise BadRequest(f"invalid key {text!r}: expected FAMILY/..., families: blueprints, slices, "
                         "endpoints, routes, maps, auth, secrets, repository, user")
    if family == "blueprints":
        return BlueprintKey(_seg("blueprint id", rest))
    if family == "slices":
        node, sep2, artifact = rest.partition("/")
        if not sep2:
            raise BadRequest(f"invalid key {text!r}: expected slices/NODE/ARTIFACT")
        return SliceKey(_seg("node id", node), _seg("artifact", artifact))
    if family == "endpoints":
        artifact, sep2, tail = rest.partition("/")
        method, sep3, inst = tail.rpartition(":")
        if not sep2 or not sep3 or not inst.isdigit():
            raise BadRequest(f"invalid key {text!r}: expected endpoints/ARTIFACT/METHOD:INSTANCE")
        return EndpointKey(_seg("artifact", artifact), _seg("method", method), int(inst))
    if family == "routes":
        method, sep2, path = rest.partition(":")
        if not sep2 or method not in _HTTP_METHODS:
            raise BadRequest(f"invalid key {text!r}: expected routes/METHOD:/path with METHOD one of "
                             f"{sorted(_HTTP_METHODS)}")
        if not _PATH_RE.match(path):
            raise BadRequest(f"invalid route path {path!r} in key {text!r}")
        return RouteKey(method, path)
    if family == "maps":
        if rest == "table":
            return MapTableKey()
        kind, sep2, name = rest.partition("/")
        if kind == "health" and sep2:
            return MapHealthKey(_seg("node id", name))
        if kind != "defs" or not sep2:
            raise BadRequest(f"invalid key {text!r}: expected maps/table, maps/defs/NAME or maps/health/NODE")
        return MapDefKey(check_map_name(name))
    if family == "auth":
        kind, sep2, name = rest.partition("/")
        if kind != "keys" or not sep2:
            raise BadRequest(f"invalid key {text!r}: expected auth/keys/NAME")
        return ApiKeyKey(check_api_key_name(name))
    if family == "secrets":
        return SecretKey(check_secret_name(rest))
    if family == "repository":
        project, sep2, version = rest.partition("/")
        if not sep2:
            raise BadRequest(f"invalid key {text!r}: expected repository/PROJECT/VERSION")
        return ArtifactKey(_seg("project", project), _seg("version", version))
    if family == "repository-deleted":
        project, sep2, version = rest.partition("/")
        if not sep2:
            raise BadRequest(f"invalid key {text!r}: expected repository-deleted/PROJECT/VERSION")
        return ArtifactTombstoneKey(_seg("project", project), _seg("version", version))
    if family == "repository-coords":
        return CoordinatesClaimKey(_seg("coordinates", rest))
    if family == "scale":
        return ScaleKey(_seg("artifact", rest))
    if family == "controller":
        if rest != "config":
            raise BadRequest(f"invalid key {text!r}: expected controller/config")
        return ControllerConfigKey()
    if family == "rollouts":
        return RolloutKey(_seg("artifact", rest))
    if family == "nodes":
        return NodeInfoKey(_seg("node id", rest))
    if family == "user":
        if len(rest) > 1024 or "\x00" in rest:
            raise BadRequest("invalid user key: at most 1024 characters, no NUL")
        return UserKey(rest)
    raise BadRequest(f"unknown key family {family!r} in {text!r}: use blueprints, slices, endpoints, "
                     "routes, maps, auth, secrets, repository, repository-deleted, repository-coords, scale, "
                     "controller, rollouts, nodes or user")


def value_type_for(key: str) -> type:
    """The value type of the family `key` belongs to (bytes for user keys)."""
    for fam in KEY_FAMILIES:
        if key.startswith(fam.prefix):  # type: ignore[attr-defined]
            return fam.value_type  # type: ignore[attr-defined]
    raise BadRequest(f"unknown key family in {key!r}")
