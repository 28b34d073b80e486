"""Blueprint files (docs/deployment.md): parsing, validation and dependency expansion.

Owns: the TOML format, its error messages, and `expand`, which turns a parsed `Blueprint` into
the `BlueprintValue` stored under `blueprints/{id}` (dependencies resolved transitively, listed
in topological order, dependencies first). May import `aether.core`, `aether.kv` (value types)
and `aether.deploy.{errors,ports}`; the artifact repository is reached through the callables
described in `aether.deploy.ports`.

```toml
id = "demo-order:0.1.0"          # required; the key under blueprints/
requires = ["artifact-repo"]      # optional: infrastructure services (kept, not yet acted on)

[slices.place_order]              # one table per slice; NAME is a label
artifact = "org.demo:place-order:0.1.0"   # required, GROUP:ARTIFACT:VERSION
instances = 3                     # optional, default 1 (scaling.min when scaled), >= 1

max_concurrency = 8               # optional: calls one instance runs at once (default: no limit)
max_queue = 80                    # optional: calls one instance queues beyond that (default 10 x)
entry_concurrency = { reserve = 2 }  # optional: per-entry limits within an instance
isolation = "process"             # optional: "auto" (default), "process" (a worker), "shared" or "inline"

[slices.place_order.scaling]      # optional: the controller scales the slice within [min, max]
min = 1
max = 8
in_flight = 6                     # targets (at least one): in_flight, rate, p95_ms, cpu

[slices.place_order.rollout]      # optional: how a new version replaces the running one
strategy = "canary"               # rolling (default) | canary | blue-green
steps = [10, 50, 100]             # canary: percent of the calls for the new version per step
interval = 30                     # seconds each step is analysed
max_error_rate = 0.01             # gate: share of the new version's calls that may fail
max_p99_ratio = 1.5               # gate: p99 of the new version / p99 of the old
max_surge = 1                     # rolling: instances above `instances` during the update
max_unavailable = 0               # rolling: instances below `instances` during the update

[slices.place_order.entries.reserve]  # optional: one entry's policy, over what its code declares
idempotent = false                # may it run twice for one call? (true: retried after a lost answer)
timeout = 2.5                     # seconds one attempt may take (a number: no "2s" strings)
retries = 3                       # attempts after the first (default: until the call's deadline)
backoff = 0.05                    # seconds of the first pause between retry rounds (doubling)

[slices.place_order.config]       # optional: handed to the instances as `context.config`
currency = "EUR"
db_password = { secret = "db-password" }  # a secret, resolved when an instance starts

[maps.orders]                     # optional: a distributed map the slices use; NAME is the map name
replicas = 3                      # optional, default 3 (copies, primary included)
write_quorum = 2                  # optional, default min(2, replicas): acks before a write returns
engine = "sqlite"                 # optional: "memory" (default), "log" or "sqlite" (both persistent)
max_value_bytes = 1048576         # optional, default 1 MiB
```

Every error is a `BlueprintError` whose message starts with `FILE:LINE:` (or `FILE:` when no
line applies) and says what is wrong and what is allowed. The keys, required keys and value types
are checked by msgspec (Structs with ``forbid_unknown_fields``), one table at a time: the top level,
then each `[maps.NAME]`, then each `[slices.NAME]`; within a table the first problem in the order
of the file is reported. Before that, any number the cluster cannot keep is refused naming its key,
config tables included (`aether.core.numbers`): an integer the store cannot hold (outside
-2**63..2**64-1; TOML integers are unbounded) and TOML's inf, -inf and nan (no duration, count,
share or threshold is infinite; they have no JSON form either).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from aether.core.artifact import Artifact, VersionPattern
from aether.core.errors import BadRequest
from aether.core.maps import MapSpec
from aether.core.numbers import number_problem
from aether.deploy.config import check_config
from aether.deploy.errors import BlueprintError
from aether.deploy.ports import DependenciesOf, Resolve
from aether.deploy.rollout import STRATEGIES, check_policy
from aether.kv.keys import BlueprintSlice, BlueprintValue, EntryPolicy, RolloutPolicy, ScalingRule, parse_key

DIRECT_PREFIX = "direct:"
SOURCES = ("operator", "controller", "api")


@dataclass(frozen=True, slots=True)
class BlueprintSliceSpec:
    """One `[slices.NAME]` table."""

    name: str
    artifact: Artifact
    instances: int = 1
    line: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    scaling: ScalingRule | None = None
    max_concurrency: int | None = None
    max_queue: int | None = None
    entry_concurrency: Mapping[str, int] = field(default_factory=dict)
    rollout: RolloutPolicy | None = None
    isolation: str = "auto"
    entries: Mapping[str, EntryPolicy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Blueprint:
    """A parsed, validated blueprint file (before dependency expansion)."""

    id: str
    slices: tuple[BlueprintSliceSpec, ...]
    requires: tuple[str, ...] = ()
    filename: str = "<blueprint>"
    maps: tuple[tuple[str, MapSpec], ...] = ()

    def where(self, line: int | None) -> str:
        return f"{self.filename}:{line}" if line else self.filename


# --- the shape of the file -------------------------------------------------------------------------
# msgspec checks the keys (forbid_unknown_fields), the required ones and the value types; each table
# is converted on its own so an error can name it (msgspec's paths say `$.slices[...]` for dict keys),
# and `_convert` turns msgspec's error into this module's message naming key, table and line.


class _BlueprintFile(msgspec.Struct, forbid_unknown_fields=True):
    """The top level of a blueprint file; the tables are converted one by one afterwards."""

    id: str
    requires: list[str] = []
    slices: dict[str, object] = {}
    maps: dict[str, object] = {}


class _SliceTable(msgspec.Struct, forbid_unknown_fields=True):
    """One `[slices.NAME]` table."""

    artifact: str
    instances: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: 1, or scaling.min
    config: dict[str, Any] = {}
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_queue: Annotated[int, msgspec.Meta(ge=0)] | None = None
    entry_concurrency: dict[str, Annotated[int, msgspec.Meta(ge=1)]] = {}
    scaling: dict[str, object] | None = None  # converted into a ScalingRule on its own
    rollout: dict[str, object] | None = None  # converted into a RolloutPolicy on its own
    isolation: Literal["auto", "process", "shared", "inline"] = "auto"
    entries: dict[str, object] = {}  # converted into EntryPolicy values by `_parse_entries`


# `[maps.NAME]` tables are converted straight into `MapSpec` (also forbid_unknown_fields).
TOP_LEVEL_KEYS = _BlueprintFile.__struct_fields__
SLICE_KEYS = _SliceTable.__struct_fields__
MAP_KEYS = MapSpec.__struct_fields__

_T = TypeVar("_T", bound=msgspec.Struct)
_ERROR_RE = re.compile(r"(?P<problem>.*?)(?: - at `\$(?P<path>.*)`)?", re.S)
_FIELD_RE = re.compile(r"Object (?P<kind>contains unknown|missing required) field `(?P<key>.*)`", re.S)
_PATH_KEY_RE = re.compile(r"\.([^.\[]+)")


def _convert(
    table: Mapping[str, object],
    cls: type[_T],
    fail: Callable[..., BlueprintError],
    path: tuple[str, ...],
    *,
    missing: Callable[[str], str],
    bad: Callable[[str, object], str],
) -> _T:
    """`table` as a `cls`, or the `BlueprintError` for the first problem msgspec found: an unknown
    key (named with its table and the allowed keys), a missing key (`missing(key)`) or a value of
    the wrong type or range (`bad(key, value)`), located at the line of the key or its table."""
    try:
        return msgspec.convert(table, cls)
    except msgspec.ValidationError as e:
        m = _ERROR_RE.fullmatch(str(e))
        assert m is not None  # the pattern matches any text
        where = f" in [{'.'.join(path)}]" if path else ""
        field = _FIELD_RE.fullmatch(m["problem"])
        if field and not m["path"]:
            key = field["key"]
            if field["kind"] == "missing required":
                raise fail(missing(key), *path) from None
            allowed = ", ".join(cls.__struct_fields__)
            raise fail(f"unknown key {key!r}{where}; allowed keys: {allowed}", *path, key) from None
        k = _PATH_KEY_RE.match(m["path"] or "")
        if k is None:  # not expected: the tables are mappings and every field has a message
            raise fail(f"{'[' + '.'.join(path) + ']: ' if path else ''}{e}", *path) from None
        key = k.group(1)
        raise fail(bad(key, table.get(key)), *path, key) from None


# --- locating keys in the source text --------------------------------------------------------------

_HEADER_RE = re.compile(r"^\s*\[(?!\[)\s*(.+?)\s*\]\s*(?:#.*)?\Z")
_PART = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_KEY_RE = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")
_PART_RE = re.compile(r"\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*(?:\.|\Z)")


def _split_path(text: str) -> tuple[str, ...] | None:
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        m = _PART_RE.match(text, pos)
        if not m or m.end() == pos:
            return None
        p = m.group(1)
        parts.append(p[1:-1] if p[0] in "\"'" else p)
        pos = m.end()
    return tuple(parts)


class _Locator:
    """Maps dotted key paths to the line (1-based) where they are defined in the source."""

    def __init__(self, text: str) -> None:
        self.paths: list[tuple[tuple[str, ...], int]] = []
        table: tuple[str, ...] = ()
        for no, line in enumerate(text.splitlines(), start=1):
            h = _HEADER_RE.match(line)
            if h:
                path = _split_path(h.group(1))
                if path is not None:
                    table = path
                    self.paths.append((table, no))
                continue
            k = _KEY_RE.match(line)
            if k:
                path = _split_path(k.group(1))
                if path is not None:
                    self.paths.append((table + path, no))

    def line(self, *path: str) -> int | None:
        """Line defining exactly `path`, else the line of its closest defined ancestor."""
        for n in range(len(path), 0, -1):
            for p, no in self.paths:
                if p == path[:n]:
                    return no
        return None


# --- parsing ----------------------------------------------------------------------------------------

_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*\Z")


def _check_numbers(raw: object, fail: Callable[..., BlueprintError]) -> None:
    """Raise the `BlueprintError` naming the key of the first number the cluster cannot keep
    (`aether.core.numbers`: an integer the store cannot encode, or inf/-inf/nan): such a value
    would pass the type checks (inf is > 0) and fail only later, or never be reached."""
    found = number_problem(raw)
    if found is None:
        return
    path = tuple(p for p in found[0] if isinstance(p, str))  # array items: the key of the array
    key, table = (path[-1], path[:-1]) if path else ("?", ())
    where = f" in [{'.'.join(table)}]" if table else ""
    raise fail(f"{key} = {found[1]}{where} {found[2]}", *path)


def parse_blueprint(text: str, filename: str = "<blueprint>") -> Blueprint:
    """Parse and validate blueprint TOML; raise `BlueprintError` naming file, line and problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS_RE.search(msg)
        if m:
            raise BlueprintError(
                f"{filename}:{m.group(1)}: invalid TOML: {msg[: m.start()]} (column {m.group(2)})"
            ) from None
        raise BlueprintError(f"{filename}: invalid TOML: {msg}") from None
    loc = _Locator(text)

    def fail(problem: str, *path: str) -> BlueprintError:
        line = loc.line(*path) if path else None
        return BlueprintError(f"{filename}:{line}: {problem}" if line else f"{filename}: {problem}")

    _check_numbers(raw, fail)

    def bad_top(key: str, value: object) -> str:
        return {
            "id": f"id must be a non-empty string, got {value!r}",
            "requires": f"requires must be a list of service names (strings), got {value!r}",
            "slices": "slices must be tables: [slices.NAME] with artifact and instances",
            "maps": "maps must be tables: [maps.NAME] with replicas, write_quorum, engine",
        }[key]

    top = _convert(
        raw, _BlueprintFile, fail, (),
        missing=lambda key: 'missing required key "id" (e.g. id = "my-app:1.0.0")',
        bad=bad_top,
    )  # fmt: skip
    bp_id = top.id
    if not bp_id.strip():
        raise fail(bad_top("id", bp_id), "id")
    try:
        parse_key(f"blueprints/{bp_id}")
    except BadRequest as e:
        raise fail(f"{e}", "id") from None
    if bp_id.startswith(DIRECT_PREFIX):
        raise fail(f"blueprint ids starting with {DIRECT_PREFIX!r} are reserved for direct deployments "
                   "(`aether deploy`)", "id")
    if not all(r.strip() for r in top.requires):
        raise fail(bad_top("requires", top.requires), "requires")

    maps = _parse_maps(top.maps, fail)
    if not top.slices:
        raise fail('no slices: add at least one [slices.NAME] table with artifact = "GROUP:ARTIFACT:VERSION"')

    specs: list[BlueprintSliceSpec] = []
    by_name: dict[str, BlueprintSliceSpec] = {}
    for name, table in top.slices.items():
        line = loc.line("slices", name)
        if not isinstance(table, dict):
            raise fail(f"slices.{name} must be a table ([slices.{name}]) with artifact and instances, "
                       f"got {table!r}", "slices", name)

        def bad_slice(key: str, value: object, name: str = name) -> str:
            if key == "artifact":
                return f"artifact in [slices.{name}] must be a string GROUP:ARTIFACT:VERSION, got {value!r}"
            if key == "config":
                return (f"config in [slices.{name}] must be a table ([slices.{name}.config]) of "
                        f"settings, got {value!r}")
            if key == "max_concurrency":
                return f"max_concurrency in [slices.{name}] must be an integer >= 1, got {value!r}"
            if key == "max_queue":
                return f"max_queue in [slices.{name}] must be an integer >= 0, got {value!r}"
            if key == "entry_concurrency":
                return (f"entry_concurrency in [slices.{name}] must be a table of entry names to "
                        f"integers >= 1 (e.g. entry_concurrency = {{ reserve = 2 }}), got {value!r}")
            if key == "rollout":
                return (f"rollout in [slices.{name}] must be a table ([slices.{name}.rollout]) with "
                        f"strategy, steps, ..., got {value!r}")
            if key == "isolation":
                return (f'isolation in [slices.{name}] must be "auto", "process", "shared" or "inline", '
                        f"got {value!r}")
            if key == "entries":
                return (f"entries in [slices.{name}] must be tables ([slices.{name}.entries.ENTRY]) "
                        f"with timeout, retries, idempotent, backoff; got {value!r}")
            if key == "scaling":
                return (f"scaling in [slices.{name}] must be a table ([slices.{name}.scaling]) with min, "
                        f"max and targets, got {value!r}")
            if isinstance(value, int) and not isinstance(value, bool):  # an integer below 1
                return (f"instances = {value} in [slices.{name}]: must be at least 1 (0 would mean "
                        "undeploy, which must be an explicit command: `aether undeploy ARTIFACT`)")
            return f"instances in [slices.{name}] must be an integer >= 1, got {value!r}"

        def no_artifact(key: str, name: str = name) -> str:  # `artifact` is the one required key
            return f'[slices.{name}] has no artifact (e.g. artifact = "org.example:{name}:1.0.0")'

        st = _convert(table, _SliceTable, fail, ("slices", name), missing=no_artifact, bad=bad_slice)
        try:
            artifact = Artifact.parse(st.artifact)
        except BadRequest as e:
            raise fail(f"[slices.{name}]: {e}", "slices", name, "artifact") from None
        other = by_name.get(artifact.name)
        if other is not None:
            raise fail(
                f"artifact {artifact.name} is listed twice: [slices.{other.name}] ({other.artifact}, line "
                f"{other.line}) and [slices.{name}] ({artifact}); list each artifact once",
                "slices", name, "artifact",
            )
        try:
            check_config(st.config)
        except BadRequest as e:
            raise fail(f"[slices.{name}.config]: {e}", "slices", name, "config") from None
        scaling = _parse_scaling(st.scaling, name, fail) if st.scaling is not None else None
        instances = st.instances
        if scaling is not None:
            if instances is None:
                instances = scaling.min
            elif not scaling.min <= instances <= scaling.max:
                raise fail(f"instances = {instances} in [slices.{name}] is outside its scaling bounds "
                           f"[{scaling.min}, {scaling.max}] ([slices.{name}.scaling] min and max); "
                           "leave instances out to start at min", "slices", name, "instances")
        if st.max_queue is not None and st.max_concurrency is None and not st.entry_concurrency:
            raise fail(f"max_queue in [slices.{name}] needs a limit to queue behind: set max_concurrency "
                       "(or entry_concurrency)", "slices", name, "max_queue")
        rollout = _parse_rollout(st.rollout, name, fail) if st.rollout is not None else None
        spec = BlueprintSliceSpec(
            name, artifact, instances or 1, line, st.config, scaling, st.max_concurrency, st.max_queue,
            dict(st.entry_concurrency), rollout, st.isolation, _parse_entries(st.entries, name, fail),
        )
        by_name[artifact.name] = spec
        specs.append(spec)
    return Blueprint(bp_id, tuple(specs), tuple(top.requires), filename, maps)


class _EntryTable(msgspec.Struct, forbid_unknown_fields=True):
    """One `[slices.NAME.entries.ENTRY]` table: the entry's policy (`EntryPolicy`), fields optional."""

    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    retries: Annotated[int, msgspec.Meta(ge=0)] | None = None
    idempotent: bool | None = None
    backoff: Annotated[float, msgspec.Meta(gt=0)] | None = None


ENTRY_KEYS = _EntryTable.__struct_fields__


def _parse_entries(
    tables: Mapping[str, object], name: str, fail: Callable[..., BlueprintError]
) -> dict[str, EntryPolicy]:
    """The `[slices.NAME.entries.ENTRY]` tables: policy overrides by entry name. The names are
    checked here for their form only; whether the artifact has such an entry is known when a node
    loads it (an unknown one fails the activation, naming it and the entries there are)."""
    out: dict[str, EntryPolicy] = {}
    for entry, table in tables.items():
        path = ("slices", name, "entries", entry)
        where = f"[slices.{name}.entries.{entry}]"
        if not entry.isidentifier() or entry.startswith("_"):
            raise fail(f"{where}: {entry!r} is not an entry name (a Python method name, not starting "
                       "with '_')", *path)
        if not isinstance(table, dict):
            raise fail(f"entries.{entry} in [slices.{name}] must be a table ({where}) with "
                       f"{', '.join(ENTRY_KEYS)}, got {table!r}", *path)

        def bad(key: str, value: object, where: str = where) -> str:
            return {
                "timeout": f"timeout in {where} must be a number of seconds > 0 (e.g. timeout = 2.5), "
                           f"got {value!r}",
                "retries": f"retries in {where} must be an integer >= 0, got {value!r}",
                "idempotent": f"idempotent in {where} must be true or false, got {value!r}",
                "backoff": f"backoff in {where} must be a number of seconds > 0, got {value!r}",
            }[key]

        t = _convert(
            table, _EntryTable, fail, path,
            missing=lambda key: f"missing key {key!r}",  # every field has a default
            bad=bad,
        )  # fmt: skip
        out[entry] = EntryPolicy(t.timeout, t.retries, t.idempotent, t.backoff)
    return out


_TARGETS = ("in_flight", "rate", "p95_ms", "cpu")


def _parse_scaling(
    table: Mapping[str, object], name: str, fail: Callable[..., BlueprintError]
) -> ScalingRule:
    """One `[slices.NAME.scaling]` table: max is required, min defaults to 1; 1 <= min <= max, at
    least one target, every target > 0."""
    path = ("slices", name, "scaling")
    where = f"[slices.{name}.scaling]"

    def bad(key: str, value: object) -> str:
        if key in ("min", "max"):
            return f"{key} in {where} must be an integer >= 1, got {value!r}"
        return f"{key} in {where} must be a number > 0, got {value!r}"

    rule = _convert(
        table, ScalingRule, fail, path,
        missing=lambda key: f"missing key {key!r} in {where}",  # every field has a default
        bad=bad,
    )  # fmt: skip
    if "max" not in table:
        raise fail(f"{where} has no max: the most instances the controller may run (e.g. max = 8)", *path)
    if rule.min < 1:
        raise fail(f"min = {rule.min} in {where}: must be at least 1 (undeploying is an explicit "
                   "command: `aether undeploy ARTIFACT`)", *path, "min")
    if rule.max < rule.min:
        raise fail(f"max = {rule.max} in {where} is below min = {rule.min}", *path, "max")
    if not rule.targets():
        raise fail(f"{where} has no target: set at least one of {', '.join(_TARGETS)} "
                   "(e.g. in_flight = 8: calls running or queued per instance)", *path)
    for key, value in rule.targets().items():
        if not value > 0:
            raise fail(f"{key} = {value:g} in {where}: a target must be more than 0", *path, key)
    return rule


def _parse_rollout(
    table: Mapping[str, object], name: str, fail: Callable[..., BlueprintError]
) -> RolloutPolicy:
    """One `[slices.NAME.rollout]` table (docs/deployment.md, *Rolling and canary updates*)."""
    path = ("slices", name, "rollout")
    where = f"[slices.{name}.rollout]"

    def bad(key: str, value: object) -> str:
        if key == "strategy":
            return f"strategy in {where} must be one of {', '.join(STRATEGIES)}, got {value!r}"
        if key == "steps":
            return f"steps in {where} must be a list of percents, e.g. [10, 50, 100], got {value!r}"
        if key in ("max_surge", "max_unavailable", "min_calls"):
            return f"{key} in {where} must be an integer, got {value!r}"
        return f"{key} in {where} must be a number, got {value!r}"

    policy = _convert(
        table, RolloutPolicy, fail, path,
        missing=lambda key: f"missing key {key!r} in {where}",  # every field has a default
        bad=bad,
    )  # fmt: skip
    problem = check_policy(policy)
    if problem is not None:
        raise fail(f"{where}: {problem}", *path)
    return policy


def _parse_maps(
    maps_raw: Mapping[str, object], fail: Callable[..., BlueprintError]
) -> tuple[tuple[str, MapSpec], ...]:
    out: list[tuple[str, MapSpec]] = []
    for name, table in maps_raw.items():
        if not isinstance(table, dict):
            raise fail(f"maps.{name} must be a table ([maps.{name}])", "maps", name)

        def bad_map(key: str, value: object, name: str = name) -> str:
            if key == "engine":
                return f'engine in [maps.{name}] must be "memory", "log" or "sqlite", got {value!r}'
            return f"{key} in [maps.{name}] must be an integer, got {value!r}"

        spec = _convert(
            table, MapSpec, fail, ("maps", name),
            missing=lambda key: f"missing key {key!r}",  # every MapSpec field has a default
            bad=bad_map,
        )  # fmt: skip
        if "write_quorum" not in table and spec.write_quorum > spec.replicas:
            # the default is min(2, replicas), as for `aether map create` and POST /api/v1/maps: a
            # `replicas = 1` alone was refused for a write_quorum of 2 the blueprint never gave
            spec = msgspec.structs.replace(spec, write_quorum=spec.replicas)
        try:
            spec.validate(name)
        except BadRequest as e:
            raise fail(f"[maps.{name}]: {e}", "maps", name) from None
        out.append((name, spec))
    return tuple(out)


def load_blueprint(path: str | Path) -> Blueprint:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BlueprintError(f"{p}: file not found") from None
    except UnicodeDecodeError:
        raise BlueprintError(f"{p}: not a UTF-8 text file") from None
    return parse_blueprint(text, str(p))


# --- expansion --------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[^:\s]+:[^:\s]+\Z")


def expand(
    blueprint: Blueprint,
    dependencies_of: DependenciesOf,
    resolve: Resolve,
    *,
    source: str = "operator",
    repository: str | None = None,
) -> BlueprintValue:
    """Resolve slice dependencies transitively; return the stored value, dependencies first.

    - A dependency already listed in the blueprint must match the pattern the dependent asks
      for; otherwise the error names both.
    - Dependencies not listed are resolved with `resolve(name, pattern)`, get one instance and
      an empty `name`; two dependents asking for incompatible versions is an error naming both.
    - Every artifact must exist (`resolve` with its exact version); a missing one is named with
      the slice that needed it (and the `repository` looked in, when given). A cycle is an
      error naming it: `a -> b -> a`.
    """
    if source not in SOURCES:
        raise BlueprintError(f"unknown blueprint source {source!r}; use one of {', '.join(SOURCES)}")
    listed: dict[str, BlueprintSliceSpec] = {s.artifact.name: s for s in blueprint.slices}

    def err(problem: str, line: int | None = None) -> BlueprintError:
        return BlueprintError(f"{blueprint.where(line)}: {problem}")

    in_repo = f"the repository {repository}" if repository else "the repository"
    deploy_hint = (  # a node looks in the cluster's artifact repository, then in its directory
        "; upload it to the cluster with `aether artifact deploy WHEEL`" if repository else ""
    )

    def find(name: str, pattern: VersionPattern, needed_by: str, line: int | None) -> Artifact:
        try:
            found = resolve(name, pattern)
        except BlueprintError:
            raise
        except Exception as e:
            raise err(f"cannot resolve {name} {pattern} (needed by {needed_by}): {e}", line) from None
        if found is None:
            raise err(f"artifact {name} matching {pattern} not found in {in_repo} "
                      f"(needed by {needed_by}){deploy_hint}", line)
        return found

    for spec in blueprint.slices:
        exact = VersionPattern.parse(str(spec.artifact.version))
        found = find(spec.artifact.name, exact, f"[slices.{spec.name}]", spec.line)
        if found != spec.artifact:
            raise err(f"artifact {spec.artifact} not found in {in_repo} (needed by "
                      f"[slices.{spec.name}]; it offers {found})", spec.line)

    chosen: dict[str, Artifact] = {s.artifact.name: s.artifact for s in blueprint.slices}
    chosen_for: dict[str, tuple[Artifact, VersionPattern]] = {}
    done: set[str] = set()
    order: list[Artifact] = []
    deps_of: dict[str, list[str]] = {}

    def visit(a: Artifact, path: list[Artifact], line: int | None) -> None:
        if a.name in done:
            return
        names = [p.name for p in path]
        if a.name in names:
            cycle = [*path[names.index(a.name):], a]
            raise err("dependency cycle: " + " -> ".join(str(c) for c in cycle), line)
        path.append(a)
        try:
            deps = dict(dependencies_of(a))
        except BlueprintError:
            raise
        except Exception as e:
            raise err(f"cannot read the dependencies of {a}: {e}", line) from None
        coords: list[str] = []
        for dep_name in sorted(deps):
            pattern = deps[dep_name]
            if not _NAME_RE.match(dep_name):
                raise err(f"{a} declares a dependency {dep_name!r}: expected GROUP:ARTIFACT", line)
            if dep_name in listed:
                target = listed[dep_name].artifact
                if not pattern.matches(target.version):
                    spec = listed[dep_name]
                    raise err(
                        f"{a} needs {dep_name} {pattern}, but the blueprint lists {target} in "
                        f"[slices.{spec.name}]; change one of them", spec.line or line,
                    )
            elif dep_name in chosen:
                target = chosen[dep_name]
                if not pattern.matches(target.version):
                    first, first_pattern = chosen_for[dep_name]
                    raise err(
                        f"{a} needs {dep_name} {pattern}, but {first} needs {dep_name} {first_pattern} "
                        f"and {target} was chosen for it; no single version satisfies both", line,
                    )
            else:
                target = find(dep_name, pattern, str(a), line)
                chosen[dep_name] = target
                chosen_for[dep_name] = (a, pattern)
            visit(target, path, line)
            coords.append(str(target))
        path.pop()
        done.add(a.name)
        order.append(a)
        deps_of[str(a)] = coords

    for spec in blueprint.slices:
        visit(spec.artifact, [], spec.line)

    out: list[BlueprintSlice] = []
    for a in order:
        listed_spec = listed.get(a.name)
        out.append(BlueprintSlice(
            artifact=str(a),
            instances=listed_spec.instances if listed_spec else 1,
            depends_on=deps_of[str(a)],
            name=listed_spec.name if listed_spec else "",
            config=dict(listed_spec.config) if listed_spec else {},
            scaling=listed_spec.scaling if listed_spec else None,
            max_concurrency=listed_spec.max_concurrency if listed_spec else None,
            max_queue=listed_spec.max_queue if listed_spec else None,
            entry_concurrency=dict(listed_spec.entry_concurrency) if listed_spec else {},
            rollout=listed_spec.rollout if listed_spec else None,
            isolation=listed_spec.isolation if listed_spec else "auto",
            entries=dict(listed_spec.entries) if listed_spec else {},
        ))
    return BlueprintValue(out, source=source)


def no_dependencies(artifact: Artifact) -> Mapping[str, VersionPattern]:
    """A `dependencies_of` for setups without a repository: nothing depends on anything."""
    return {}


def any_artifact(name: str, pattern: VersionPattern) -> Artifact | None:
    """A `resolve` that trusts the caller: exact patterns resolve to themselves, others to None."""
    lo, hi = pattern.lower, pattern.upper
    if lo is not None and hi is not None and lo.version == hi.version and lo.inclusive and hi.inclusive:
        group, _, art = name.partition(":")
        return Artifact(group, art, lo.version)
    return None


def try_lines(text: str, http_addresses: list[str]) -> list[str]:
    """The `# try:` lines of a blueprint (commands a demo prints once it runs), with `{http}` and
    `{httpK}` replaced by the HTTP address of the first and the K-th node."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*#\s*try:\s?(.*)\Z", line)
        if m is None:
            continue
        cmd = m.group(1)
        for k, addr in enumerate(http_addresses, start=1):
            cmd = cmd.replace(f"{{http{k}}}", addr)
        out.append(cmd.replace("{http}", http_addresses[0]))
    return out
