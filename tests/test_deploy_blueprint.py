"""Blueprint TOML parsing, validation errors (file + line + problem) and dependency expansion."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from aether.core.artifact import Artifact, VersionPattern
from aether.core.errors import BadRequest
from aether.deploy.blueprint import any_artifact, expand, load_blueprint, no_dependencies, parse_blueprint
from aether.deploy.errors import BlueprintError
from aether.kv.keys import BlueprintSlice

pytestmark = pytest.mark.timeout(10)

GOOD = """\
id = "demo-order:0.1.0"
requires = ["artifact-repo"]

[slices.place_order]
artifact = "org.demo:place-order:0.1.0"
instances = 3

[slices.inventory]
artifact = "org.demo:inventory-service:0.1.0"
"""


def test_parse_good_blueprint() -> None:
    bp = parse_blueprint(GOOD, "order.toml")
    assert bp.id == "demo-order:0.1.0"
    assert bp.requires == ("artifact-repo",)
    assert [(s.name, str(s.artifact), s.instances, s.line) for s in bp.slices] == [
        ("place_order", "org.demo:place-order:0.1.0", 3, 4),
        ("inventory", "org.demo:inventory-service:0.1.0", 1, 8),
    ]


def test_load_blueprint_from_file(tmp_path: Path) -> None:
    p = tmp_path / "bp.toml"
    p.write_text(GOOD)
    assert load_blueprint(p).filename == str(p)
    with pytest.raises(BlueprintError, match="file not found"):
        load_blueprint(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # bad TOML: the line is named
        ('id = "x"\n\n[slices.a]\nartifact = "org.a:b:1.0.0\n', r"^bp\.toml:4: invalid TOML: "),
        ('id = "x"\ninstances = = 3\n', r"^bp\.toml:2: invalid TOML"),
        # unknown keys, top level and in a slice table, with the allowed ones listed
        ('id = "x"\nreplicas = 3\n[slices.a]\nartifact = "org.a:b:1.0.0"\n',
         r"^bp\.toml:2: unknown key 'replicas'; allowed keys: id, requires, slices, maps$"),
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\nreplicas = 2\n',
         r"^bp\.toml:4: unknown key 'replicas' in \[slices\.a\]; allowed keys: artifact, instances, config, "
         r"max_concurrency, max_queue, entry_concurrency, scaling, rollout, isolation, entries$"),
        # bad coordinates
        ('id = "x"\n[slices.a]\nartifact = "org.a:b"\n',
         r"^bp\.toml:3: \[slices\.a\]: invalid artifact coordinates 'org\.a:b': "
         r"expected GROUP:ARTIFACT:VERSION"),
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:one"\n', r"^bp\.toml:3: .*invalid version 'one'"),
        ('id = "x"\n[slices.a]\nartifact = 3\n', r"^bp\.toml:3: artifact in \[slices\.a\] must be a string"),
        # instance counts
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\ninstances = 0\n',
         r"^bp\.toml:4: instances = 0 in \[slices\.a\]: must be at least 1 \(0 would mean undeploy, which "
         r"must be an explicit command"),
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\ninstances = -2\n',
         r"^bp\.toml:4: instances = -2"),
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\ninstances = "3"\n',
         r"^bp\.toml:4: instances in \[slices\.a\] must be an integer >= 1, got '3'"),
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\ninstances = true\n', r"^bp\.toml:4: instances"),
        # id
        ('[slices.a]\nartifact = "org.a:b:1.0.0"\n', r'^bp\.toml: missing required key "id"'),
        ('id = "has space"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n', r"^bp\.toml:1: invalid blueprint id"),
        ('id = 7\n[slices.a]\nartifact = "org.a:b:1.0.0"\n', r"^bp\.toml:1: id must be a non-empty string"),
        ('id = "direct:org.a:b"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n', r"^bp\.toml:1: .*reserved"),
        # structure
        ('id = "x"\n', r"^bp\.toml: no slices"),
        ('id = "x"\nslices = 3\n', r"^bp\.toml:2: slices must be tables"),
        ('id = "x"\n[slices]\na = 3\n', r"^bp\.toml:3: slices\.a must be a table"),
        ('id = "x"\n[slices.a]\ninstances = 2\n', r"^bp\.toml:2: \[slices\.a\] has no artifact"),
        ('id = "x"\nrequires = "repo"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n',
         r"^bp\.toml:2: requires must be a list"),
        # duplicate artifact (any version), both tables named
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n\n[slices.b]\nartifact = "org.a:b:2.0.0"\n',
         r"^bp\.toml:6: artifact org\.a:b is listed twice: \[slices\.a\] \(org\.a:b:1\.0\.0, line 2\) and "
         r"\[slices\.b\]"),
    ],
)
def test_parse_errors_name_file_line_and_problem(text: str, expected: str) -> None:
    with pytest.raises(BlueprintError, match=expected):
        parse_blueprint(text, "bp.toml")


_SLICE_A = '[slices.a]\nartifact = "org.a:b:1.0.0"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys (msgspec's forbid_unknown_fields) named as written, with their table and line
        ('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n"a`b c" = 1\n',
         "bp.toml:4: unknown key 'a`b c' in [slices.a]; allowed keys: artifact, instances, config, "
         "max_concurrency, max_queue, entry_concurrency, scaling, rollout, isolation, entries"),
        ('id = "x"\nslices.a.artifact = "org.a:b:1.0.0"\nslices.a.replica = 1\n',
         "bp.toml:3: unknown key 'replica' in [slices.a]; allowed keys: artifact, instances, config, "
         "max_concurrency, max_queue, entry_concurrency, scaling, rollout, isolation, entries"),
        ('id = "x"\n' + _SLICE_A + "[maps.m]\nreplica = 1\n",
         "bp.toml:5: unknown key 'replica' in [maps.m]; allowed keys: replicas, write_quorum, engine, "
         "max_value_bytes"),
        ('id = "x"\nslice = 3\n' + _SLICE_A,
         "bp.toml:2: unknown key 'slice'; allowed keys: id, requires, slices, maps"),
        # values of the wrong type, the value shown
        ('id = "x"\nrequires = ["a", 3]\n' + _SLICE_A,
         "bp.toml:2: requires must be a list of service names (strings), got ['a', 3]"),
        ('id = "x"\nrequires = [" "]\n' + _SLICE_A,
         "bp.toml:2: requires must be a list of service names (strings), got [' ']"),
        ('id = ""\n' + _SLICE_A, "bp.toml:1: id must be a non-empty string, got ''"),
        ("id = 1979-05-27\n" + _SLICE_A,
         "bp.toml:1: id must be a non-empty string, got datetime.date(1979, 5, 27)"),
        ('id = "x"\n' + _SLICE_A + "[maps.m]\nengine = 3\n",
         'bp.toml:5: engine in [maps.m] must be "memory", "log" or "sqlite", got 3'),
        ('id = "x"\n' + _SLICE_A + "[maps.m]\nmax_value_bytes = 1.5\n",
         "bp.toml:5: max_value_bytes in [maps.m] must be an integer, got 1.5"),
        ('id = "x"\n' + _SLICE_A + "[maps]\nm = 3\n", "bp.toml:5: maps.m must be a table ([maps.m])"),
        ('id = "x"\nslices = {a = {artifact = "org.a:b:1.0.0", instances = [1]}}\n',
         "bp.toml:2: instances in [slices.a] must be an integer >= 1, got [1]"),
        ('id = "x"\nslices = []\n',
         "bp.toml:2: slices must be tables: [slices.NAME] with artifact and instances"),
        ('id = "x"\nmaps = []\n' + _SLICE_A,
         "bp.toml:2: maps must be tables: [maps.NAME] with replicas, write_quorum, engine"),
    ],
)
def test_parse_errors_are_exact(text: str, expected: str) -> None:
    with pytest.raises(BlueprintError) as info:
        parse_blueprint(text, "bp.toml")
    assert str(info.value) == expected


def test_within_a_table_the_first_problem_in_the_file_is_reported() -> None:
    head = 'id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n'
    with pytest.raises(BlueprintError, match=r"^bp\.toml:4: unknown key 'replica' in \[slices\.a\]"):
        parse_blueprint(head + "replica = 1\ninstances = 0\n", "bp.toml")
    with pytest.raises(BlueprintError, match=r"^bp\.toml:4: instances = 0 in \[slices\.a\]"):
        parse_blueprint(head + "instances = 0\nreplica = 1\n", "bp.toml")
    # the tables are checked in turn: the top level, the maps, then the slices
    with pytest.raises(BlueprintError, match=r"^bp\.toml:2: unknown key 'foo'; allowed keys"):
        parse_blueprint('id = "x"\nfoo = 1\n[slices.a]\nreplica = 1\n', "bp.toml")
    with pytest.raises(BlueprintError, match=r"^bp\.toml:5: unknown key 'copies' in \[maps\.m\]"):
        parse_blueprint('id = "x"\n[slices.a]\nreplica = 1\n[maps.m]\ncopies = 1\n', "bp.toml")


def test_blueprint_error_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        parse_blueprint("nope", "x.toml")


def test_lines_found_for_dotted_and_quoted_tables() -> None:
    text = 'id = "x"\n\n[slices."my slice"]\nartifact = "org.a:b:1.0.0"\ninstances = 0\n'
    with pytest.raises(BlueprintError, match=r"^bp\.toml:5: "):
        parse_blueprint(text, "bp.toml")
    text = 'id = "x"\nslices.a.artifact = "org.a:b:1.0.0"\nslices.a.instances = 0\n'
    with pytest.raises(BlueprintError, match=r"^bp\.toml:3: "):
        parse_blueprint(text, "bp.toml")


# --- expansion --------------------------------------------------------------------------------------


class Repo:
    """A tiny artifact repository: versions per name and declared dependencies."""

    def __init__(self, deps: Mapping[str, Mapping[str, str]], extra: list[str] | None = None) -> None:
        self.deps = {k: {n: VersionPattern.parse(p) for n, p in d.items()} for k, d in deps.items()}
        self.artifacts = [Artifact.parse(a) for a in [*deps, *(extra or [])]]

    def dependencies_of(self, a: Artifact) -> Mapping[str, VersionPattern]:
        return self.deps.get(str(a), {})

    def resolve(self, name: str, pattern: VersionPattern) -> Artifact | None:
        found = [a for a in self.artifacts if a.name == name and pattern.matches(a.version)]
        return max(found) if found else None


def bp(*slices: tuple[str, str, int]) -> str:
    body = "".join(f'\n[slices.{n}]\nartifact = "{a}"\ninstances = {i}\n' for n, a, i in slices)
    return f'id = "app"\n{body}'


ORDER = Repo({
    "org.demo:place-order:0.1.0": {"org.demo:inventory": "^0.1.0", "org.demo:pricing": "~0.1"},
    "org.demo:inventory:0.1.0": {},
    "org.demo:inventory:0.2.0": {},
    "org.demo:pricing:0.1.3": {"org.demo:money": "[1.0,2.0)"},
    "org.demo:money:1.4.0": {},
    "org.demo:money:2.0.0": {},
})


def test_expand_topological_order_dependencies_first() -> None:
    value = expand(parse_blueprint(bp(("po", "org.demo:place-order:0.1.0", 3))), ORDER.dependencies_of,
                   ORDER.resolve)
    assert value.source == "operator"
    assert value.slices == [
        BlueprintSlice("org.demo:inventory:0.1.0", 1, [], ""),
        BlueprintSlice("org.demo:money:1.4.0", 1, [], ""),
        BlueprintSlice("org.demo:pricing:0.1.3", 1, ["org.demo:money:1.4.0"], ""),
        BlueprintSlice("org.demo:place-order:0.1.0", 3,
                       ["org.demo:inventory:0.1.0", "org.demo:pricing:0.1.3"], "po"),
    ]
    order = [s.artifact for s in value.slices]
    for s in value.slices:
        for d in s.depends_on:
            assert order.index(d) < order.index(s.artifact)


def test_expand_uses_listed_dependency_and_its_count() -> None:
    text = bp(("po", "org.demo:place-order:0.1.0", 2), ("inv", "org.demo:inventory:0.1.0", 4))
    value = expand(parse_blueprint(text), ORDER.dependencies_of, ORDER.resolve, source="api")
    by = {s.artifact: s for s in value.slices}
    assert by["org.demo:inventory:0.1.0"] == BlueprintSlice("org.demo:inventory:0.1.0", 4, [], "inv")
    assert value.source == "api"
    assert [s.artifact for s in value.slices].index("org.demo:inventory:0.1.0") < \
        [s.artifact for s in value.slices].index("org.demo:place-order:0.1.0")


def test_expand_version_pattern_mismatch_names_both() -> None:
    text = bp(("po", "org.demo:place-order:0.1.0", 2), ("inv", "org.demo:inventory:0.2.0", 1))
    with pytest.raises(BlueprintError) as e:
        expand(parse_blueprint(text, "app.toml"), ORDER.dependencies_of, ORDER.resolve)
    msg = str(e.value)
    assert msg.startswith("app.toml:7: ")
    assert "org.demo:place-order:0.1.0 needs org.demo:inventory ^0.1.0" in msg
    assert "lists org.demo:inventory:0.2.0 in [slices.inv]" in msg


def test_expand_conflicting_transitive_requirements() -> None:
    repo = Repo({
        "g:a:1.0.0": {"g:c": "^1.0.0"},
        "g:b:1.0.0": {"g:c": "^2.0.0"},
        "g:c:1.5.0": {},
        "g:c:2.1.0": {},
    })
    expected = r"g:b:1\.0\.0 needs g:c \^2\.0\.0, but g:a:1\.0\.0 needs g:c \^1\.0\.0"
    with pytest.raises(BlueprintError, match=expected):
        expand(parse_blueprint(bp(("a", "g:a:1.0.0", 1), ("b", "g:b:1.0.0", 1))), repo.dependencies_of,
               repo.resolve)


def test_expand_missing_artifact_named_with_who_needed_it() -> None:
    repo = Repo({"g:a:1.0.0": {"g:gone": ">=1.0"}})
    with pytest.raises(BlueprintError, match=r"artifact g:gone matching >=1\.0 not found in the repository "
                                             r"\(needed by g:a:1\.0\.0\)"):
        expand(parse_blueprint(bp(("a", "g:a:1.0.0", 1))), repo.dependencies_of, repo.resolve)
    with pytest.raises(BlueprintError, match=r"^app.toml:3: artifact g:zzz matching 9\.9\.9 not found .*"
                                             r"\[slices\.z\]"):
        expand(parse_blueprint(bp(("z", "g:zzz:9.9.9", 1)), "app.toml"), repo.dependencies_of, repo.resolve)


def test_expand_cycle_is_named() -> None:
    repo = Repo({
        "g:a:1.0.0": {"g:b": "^1.0.0"},
        "g:b:1.0.0": {"g:c": "^1.0.0"},
        "g:c:1.0.0": {"g:a": "^1.0.0"},
    })
    cycle = r"dependency cycle: g:a:1\.0\.0 -> g:b:1\.0\.0 -> g:c:1\.0\.0 -> g:a:1\.0\.0"
    with pytest.raises(BlueprintError, match=cycle):
        expand(parse_blueprint(bp(("a", "g:a:1.0.0", 1))), repo.dependencies_of, repo.resolve)
    self_loop = Repo({"g:a:1.0.0": {"g:a": "*"}})
    with pytest.raises(BlueprintError, match=r"dependency cycle: g:a:1\.0\.0 -> g:a:1\.0\.0"):
        expand(parse_blueprint(bp(("a", "g:a:1.0.0", 1))), self_loop.dependencies_of, self_loop.resolve)


def test_expand_diamond_visits_shared_dependency_once() -> None:
    repo = Repo({
        "g:top:1.0.0": {"g:l": "*", "g:r": "*"},
        "g:l:1.0.0": {"g:base": "^1.0.0"},
        "g:r:1.0.0": {"g:base": "~1.2.0"},
        "g:base:1.2.5": {},
    })
    value = expand(parse_blueprint(bp(("t", "g:top:1.0.0", 2))), repo.dependencies_of, repo.resolve)
    assert [s.artifact for s in value.slices] == ["g:base:1.2.5", "g:l:1.0.0", "g:r:1.0.0", "g:top:1.0.0"]


def test_expand_repository_errors_are_blueprint_errors() -> None:
    def broken(a: Artifact) -> Mapping[str, VersionPattern]:
        raise OSError("repository unreachable")

    with pytest.raises(BlueprintError, match=r"dependencies of g:a:1\.0\.0: repository unreachable"):
        expand(parse_blueprint(bp(("a", "g:a:1.0.0", 1))), broken, Repo({"g:a:1.0.0": {}}).resolve)


MAPS_BP = """id = "shop:1"
[slices.a]
artifact = "org.x:a:1.0.0"

[maps.orders]
replicas = 3
write_quorum = 2
engine = "sqlite"

[maps.sessions]
"""


def test_maps_sections_parse_into_specs() -> None:
    from aether.core.maps import MapSpec

    bp = parse_blueprint(MAPS_BP, "shop.blueprint")
    assert bp.maps == (("orders", MapSpec(3, 2, "sqlite")), ("sessions", MapSpec()))


def test_a_maps_section_defaults_write_quorum_to_at_most_its_replicas() -> None:
    """`[maps.single] replicas = 1` was refused ('write_quorum must be between 1 and replicas (1),
    not 2') for a write_quorum the blueprint never gave: the default was 2, where `aether map
    create --replicas 1` and POST /api/v1/maps default to min(2, replicas). A write_quorum that is
    given is still checked."""
    from aether.core.maps import MapSpec

    slices = '[slices.a]\nartifact = "org.x:a:1.0.0"\n'
    bp = parse_blueprint('id = "s:1"\n' + slices + "[maps.one]\nreplicas = 1\n[maps.two]\nreplicas = 2\n")
    assert bp.maps == (("one", MapSpec(replicas=1, write_quorum=1)), ("two", MapSpec(replicas=2)))
    given = r"write_quorum must be between 1 and replicas \(1\), not 2"
    with pytest.raises(BlueprintError, match=given):
        parse_blueprint('id = "s:1"\n' + slices + "[maps.single]\nreplicas = 1\nwrite_quorum = 2\n")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("[maps.orders]\nreplica = 3\n", "shop.blueprint:6: unknown key 'replica' in [maps.orders]; "
         "allowed keys: replicas, write_quorum, engine, max_value_bytes"),
        ('[maps.orders]\nengine = "redis"\n', 'shop.blueprint:6: engine in [maps.orders] must be "memory"'),
        ('[maps.orders]\nreplicas = "3"\n', "replicas in [maps.orders] must be an integer, got '3'"),
        ("[maps.orders]\nreplicas = 2\nwrite_quorum = 3\n", "write_quorum must be between 1 and replicas"),
        ("[maps.Orders]\n", "invalid map name 'Orders'"),
        ('maps = "orders"\n', "maps must be tables"),
    ],
)
def test_maps_section_errors_name_line_and_problem(table: str, expected: str) -> None:
    slices = '[slices.a]\nartifact = "org.x:a:1.0.0"\n'
    top = 'id = "shop:1"\n'
    # a top-level `maps = ...` must come before the first table
    text = top + table + slices if table.startswith("maps") else top + slices + "\n" + table
    with pytest.raises(BlueprintError) as info:
        parse_blueprint(text, "shop.blueprint")
    assert expected in str(info.value)


# -- [slices.NAME.config] ----------------------------------------------------------------------------


def test_config_tables_are_kept_typed_and_expanded() -> None:
    import datetime

    from aether.deploy.blueprint import any_artifact, expand, no_dependencies

    bp = parse_blueprint(
        'id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n[slices.a.config]\n'
        'name = "n"\nport = 80\nratio = 0.5\non = true\nwhen = 2024-01-02T03:04:05Z\n'
        'tags = ["a", "b"]\ndb = { host = "h", password = { secret = "db-pw" } }\n'
        '[[slices.a.config.routes]]\npath = "/x"\n',
        "bp.toml",
    )
    cfg = bp.slices[0].config
    assert cfg["port"] == 80 and cfg["ratio"] == 0.5 and cfg["on"] is True and cfg["tags"] == ["a", "b"]
    assert cfg["when"] == datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert cfg["db"]["password"] == {"secret": "db-pw"} and cfg["routes"] == [{"path": "/x"}]
    value = expand(bp, no_dependencies, any_artifact)
    assert value.slices[0].config == cfg
    # it survives the store's encoding with its types
    from aether.kv.keys import BlueprintValue
    from aether.kv.store import decode_value, encode_value

    back = decode_value("blueprints/x", encode_value("blueprints/x", value))
    assert isinstance(back, BlueprintValue) and back.slices[0].config["port"] == 80
    assert back.slices[0].config["when"] == cfg["when"]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('config = 3',
         "bp.toml:4: config in [slices.a] must be a table ([slices.a.config]) of settings, got 3"),
        ('config = { pw = { secret = "x", extra = 1 } }',
         "bp.toml:4: [slices.a.config]: pw: a secret reference is a table with the one key secret, e.g. "
         '{ secret = "db-password" }; got keys extra, secret'),
        ('config = { pw = { secret = 7 } }',
         "bp.toml:4: [slices.a.config]: pw: a secret reference is a table"),
        ('config = { l = [{ secret = "bad name" }] }',
         "bp.toml:4: [slices.a.config]: l[0]: invalid secret name 'bad name'"),
    ],
)
def test_bad_config_tables_are_refused_naming_the_problem(table: str, expected: str) -> None:
    text = f'id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n{table}\n'
    with pytest.raises(BlueprintError) as e:
        parse_blueprint(text, "bp.toml")
    assert str(e.value).startswith(expected), str(e.value)


def test_config_fingerprints_follow_the_config_and_secret_versions_not_values() -> None:
    from aether.deploy.config import fingerprint, resolve, secret_names

    cfg = {"a": 1, "pw": {"secret": "p"}, "more": [{"secret": "q"}]}
    assert secret_names(cfg) == ["p", "q"]
    base = fingerprint(cfg, {"p": 1, "q": 1})
    assert fingerprint(dict(reversed(list(cfg.items()))), {"p": 1, "q": 1}) == base  # key order
    assert fingerprint(cfg, {"p": 2, "q": 1}) != base  # a secret was set again
    assert fingerprint(cfg, {"p": None, "q": 1}) != base  # a secret was deleted
    assert fingerprint({**cfg, "a": 2}, {"p": 1, "q": 1}) != base
    assert fingerprint({"a": 1}, {"p": 5}) == fingerprint({"a": 1}, {})  # unreferenced secrets: no effect
    r = resolve(cfg, {"p": "P1", "q": "Q1"})
    assert r.values == {"a": 1, "pw": "P1", "more": ["Q1"]} and sorted(r.secrets) == ["P1", "Q1"]


# --- capacity limits and scaling rules (issue 15) -------------------------------------------------

SCALED = """\
id = "x"
[slices.a]
artifact = "org.a:b:1.0.0"
max_concurrency = 2
max_queue = 3
entry_concurrency = { slow = 1 }

[slices.a.scaling]
min = 2
max = 5
in_flight = 4
p95_ms = 250.5
"""


def test_limits_and_scaling_are_parsed_and_expanded() -> None:
    from aether.deploy.blueprint import any_artifact, no_dependencies
    from aether.kv.keys import BlueprintValue, ScalingRule
    from aether.kv.store import decode_value, encode_value

    bp = parse_blueprint(SCALED, "bp.toml")
    (s,) = bp.slices
    assert s.instances == 2  # no instances given: the scaling minimum
    assert (s.max_concurrency, s.max_queue, dict(s.entry_concurrency)) == (2, 3, {"slow": 1})
    assert s.scaling == ScalingRule(min=2, max=5, in_flight=4.0, p95_ms=250.5)
    assert s.scaling.targets() == {"in_flight": 4.0, "p95_ms": 250.5}
    value = expand(bp, no_dependencies, any_artifact)
    assert value.slices[0] == BlueprintSlice(
        "org.a:b:1.0.0", 2, [], name="a", scaling=s.scaling, max_concurrency=2, max_queue=3,
        entry_concurrency={"slow": 1},
    )
    back = decode_value("blueprints/x", encode_value("blueprints/x", value))
    assert isinstance(back, BlueprintValue) and back.slices[0] == value.slices[0]
    # instances within the bounds is kept; min defaults to 1; no limits: None and {}
    bp = parse_blueprint('id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\ninstances = 3\n'
                         "[slices.a.scaling]\nmax = 4\ncpu = 70\n", "bp.toml")
    (s,) = bp.slices
    assert s.instances == 3 and s.scaling == ScalingRule(min=1, max=4, cpu=70.0)
    assert (s.max_concurrency, s.max_queue, dict(s.entry_concurrency)) == (None, None, {})
    plain = expand(parse_blueprint(GOOD, "bp.toml"), no_dependencies, any_artifact).slices[0]
    assert plain.scaling is None and plain.max_concurrency is None and plain.entry_concurrency == {}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("max_concurrency = 0", "bp.toml:4: max_concurrency in [slices.a] must be an integer >= 1, got 0"),
        ("max_concurrency = true",
         "bp.toml:4: max_concurrency in [slices.a] must be an integer >= 1, got True"),
        ("max_concurrency = 1\nmax_queue = -1",
         "bp.toml:5: max_queue in [slices.a] must be an integer >= 0, got -1"),
        ("max_queue = 3",
         "bp.toml:4: max_queue in [slices.a] needs a limit to queue behind: set max_concurrency "
         "(or entry_concurrency)"),
        ("entry_concurrency = { a = 0 }",
         "bp.toml:4: entry_concurrency in [slices.a] must be a table of entry names to integers >= 1 "
         "(e.g. entry_concurrency = { reserve = 2 }), got {'a': 0}"),
        ("scaling = 3",
         "bp.toml:4: scaling in [slices.a] must be a table ([slices.a.scaling]) with min, max and "
         "targets, got 3"),
        ("[slices.a.scaling]\nmin = 0\nmax = 2\nrate = 1",
         "bp.toml:5: min = 0 in [slices.a.scaling]: must be at least 1 (undeploying is an explicit command: "
         "`aether undeploy ARTIFACT`)"),
        ("[slices.a.scaling]\nmin = 3\nmax = 2\nrate = 1",
         "bp.toml:6: max = 2 in [slices.a.scaling] is below min = 3"),
        ("[slices.a.scaling]\nmin = 1\nrate = 1",
         "bp.toml:4: [slices.a.scaling] has no max: the most instances the controller may run (e.g. "
         "max = 8)"),
        ("[slices.a.scaling]\nmin = 1\nmax = 2",
         "bp.toml:4: [slices.a.scaling] has no target: set at least one of in_flight, rate, p95_ms, cpu "
         "(e.g. in_flight = 8: calls running or queued per instance)"),
        ("[slices.a.scaling]\nmax = 2\nrate = 0",
         "bp.toml:6: rate = 0 in [slices.a.scaling]: a target must be more than 0"),
        ("[slices.a.scaling]\nmax = 2\np95_ms = -1.5",
         "bp.toml:6: p95_ms = -1.5 in [slices.a.scaling]: a target must be more than 0"),
        ("[slices.a.scaling]\nmax = 2\nrate = 'x'",
         "bp.toml:6: rate in [slices.a.scaling] must be a number > 0, got 'x'"),
        ("[slices.a.scaling]\nmax = 2.5\nrate = 1",
         "bp.toml:5: max in [slices.a.scaling] must be an integer >= 1, got 2.5"),
        ("[slices.a.scaling]\nmax = 2\nqps = 1",
         "bp.toml:6: unknown key 'qps' in [slices.a.scaling]; allowed keys: min, max, in_flight, "
         "rate, p95_ms, cpu"),
        ("instances = 9\n[slices.a.scaling]\nmin = 1\nmax = 2\nrate = 1",
         "bp.toml:4: instances = 9 in [slices.a] is outside its scaling bounds [1, 2] "
         "([slices.a.scaling] min "
         "and max); leave instances out to start at min"),
    ],
)
def test_bad_limits_and_scaling_are_refused_naming_line_and_problem(table: str, expected: str) -> None:
    text = f'id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\n{table}\n'
    with pytest.raises(BlueprintError) as e:
        parse_blueprint(text, "bp.toml")
    assert str(e.value) == expected



def test_rollout_table_is_parsed_validated_and_carried_into_the_expanded_blueprint() -> None:
    text = (
        'id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\ninstances = 3\n'
        '[slices.a.rollout]\nstrategy = "canary"\nsteps = [5, 50, 100]\nmax_error_rate = 0.01\n'
    )
    bp = parse_blueprint(text, "bp.toml")
    policy = bp.slices[0].rollout
    assert policy is not None
    assert (policy.strategy, policy.steps, policy.max_error_rate) == ("canary", [5, 50, 100], 0.01)
    value = expand(bp, no_dependencies, any_artifact)
    assert value.slices[0].rollout == policy
    for bad, problem in [
        ('strategy = "big-bang"', r"bp\.toml:5: \[slices\.a\.rollout\]: strategy must be one of rolling"),
        ("steps = [10, 50]", r"bp\.toml:5: \[slices\.a\.rollout\]: steps apply to the canary strategy only"),
        ("max_surge = 0\nmax_unavailable = 0", "never make progress"),
        ("surge = 1", r"bp\.toml:6: unknown key 'surge' in \[slices\.a\.rollout\]"),
        ('interval = "30s"', r"interval in \[slices\.a\.rollout\] must be a number"),
    ]:
        with pytest.raises(BlueprintError, match=problem):
            head = text.split("[slices.a.rollout]")[0]
            parse_blueprint(head + "[slices.a.rollout]\n" + bad + "\n", "bp.toml")


def test_isolation_is_parsed_validated_and_expanded() -> None:
    text = 'id = "x"\n[slices.a]\nartifact = "org.a:b:1.0.0"\nisolation = "process"\n'
    bp = parse_blueprint(text, "bp.toml")
    assert bp.slices[0].isolation == "process"
    assert expand(bp, no_dependencies, any_artifact).slices[0].isolation == "process"
    shared = parse_blueprint(text.replace('"process"', '"shared"'), "bp.toml")
    assert expand(shared, no_dependencies, any_artifact).slices[0].isolation == "shared"
    plain = expand(parse_blueprint(GOOD, "bp.toml"), no_dependencies, any_artifact).slices[0]
    assert plain.isolation == "auto"
    with pytest.raises(BlueprintError) as e:
        parse_blueprint(text.replace('"process"', '"thread"'), "bp.toml")
    allowed = '"auto", "process", "shared" or "inline"'
    assert str(e.value) == f"bp.toml:4: isolation in [slices.a] must be {allowed}, got 'thread'"


HUGE = 2**64  # one more than the store (msgpack) can encode


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (f"max_concurrency = {HUGE}", f"b.toml:4: max_concurrency = {HUGE} in [slices.a] is out"),
        (f"[slices.a.config]\nlimits = {{ n = {HUGE} }}", f"b.toml:5: n = {HUGE} in [slices.a.config.limi"),
        (f"[slices.a.config]\nsizes = [1, -{HUGE}]", f"b.toml:5: sizes = -{HUGE} in [slices.a.config] is"),
        (f"[slices.a.rollout]\nmax_surge = {HUGE}", f"b.toml:5: max_surge = {HUGE} in [slices.a.rollout]"),
        (f"[slices.a.entries.greet]\nretries = {HUGE}", f"b.toml:5: retries = {HUGE} in [slices.a.entries."),
        (f"[slices.a.scaling]\nmax = {HUGE}\nin_flight = 1", f"b.toml:5: max = {HUGE} in [slices.a.scaling]"),
    ],
)
def test_integers_the_store_cannot_hold_are_refused_naming_key_and_line(table: str, expected: str) -> None:
    """TOML integers are unbounded, the store's encoding (msgpack) is not: such a blueprint used to
    pass parsing and expansion and fail only in `kv.put` with an OverflowError (a 500 from
    `POST /api/v1/blueprints`, seen with max_concurrency = 2**64)."""
    text = f'id = "x"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\n{table}\n'
    with pytest.raises(BlueprintError) as e:
        parse_blueprint(text, "b.toml")
    assert str(e.value).startswith(expected), str(e.value)
    assert "integers must be between -2**63 and 2**64-1" in str(e.value)


def test_the_largest_integers_the_store_holds_are_accepted_and_stored() -> None:
    from aether.kv.contract import decode_value, encode_value

    text = (f'id = "x"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\nmax_concurrency = {HUGE - 1}\n'
            f"[slices.a.config]\nlo = {-(2**63)}\nhi = {HUGE - 1}\n")
    value = expand(parse_blueprint(text), no_dependencies, any_artifact)
    assert decode_value("blueprints/x", encode_value("blueprints/x", value)) == value


def _float_fields(cls: type) -> list[str]:
    """The fields of the msgspec Struct `cls` that hold a float (optional or constrained ones too)."""
    import msgspec

    def is_float(t: object) -> bool:
        if isinstance(t, msgspec.inspect.FloatType):
            return True
        return isinstance(t, msgspec.inspect.UnionType) and any(is_float(u) for u in t.types)

    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return [f.encode_name for f in info.fields if is_float(f.type)]


def _every_float_key() -> list[tuple[str, str]]:
    """(table text with KEY = VALUE placeholders, key) for every float of every blueprint table,
    found from the Structs the tables are converted into: a float field added later is covered."""
    from aether.deploy.blueprint import _EntryTable, _SliceTable
    from aether.kv.keys import RolloutPolicy, ScalingRule

    out: list[tuple[str, str]] = []
    out += [("{key} = {value}", k) for k in _float_fields(_SliceTable)]
    out += [("[slices.a.rollout]\n{key} = {value}", k) for k in _float_fields(RolloutPolicy)]
    out += [("[slices.a.entries.greet]\n{key} = {value}", k) for k in _float_fields(_EntryTable)]
    for k in _float_fields(ScalingRule):
        other = "rate" if k == "in_flight" else "in_flight"  # a valid target beside the one tested
        out.append((f"[slices.a.scaling]\nmax = 3\n{other} = 1.0\n{{key}} = {{value}}", k))
    out.append(("[slices.a.config]\n{key} = {value}", "limit"))  # free-form config too
    out.append(("[slices.a.config]\n{key} = [1.5, {value}]", "weights"))
    return out


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize(("table", "key"), _every_float_key())
def test_inf_and_nan_are_refused_for_every_float_naming_key_and_line(
    table: str, key: str, value: str
) -> None:
    """TOML has inf, -inf and nan. inf passed every `> 0` check: `interval = inf` kept a canary
    step analysing for ever, `progress_deadline = inf` never rolled a hung version back, an
    entry's `timeout = inf` was published and shown by the API as null ("not set"), and the
    blueprint read back through the API (`GET /api/v1/blueprints/ID`, interval: null) no longer
    decoded into a `BlueprintValue`. Every float of a blueprint is now checked in one place."""
    body = table.format(key=key, value=value)
    text = f'id = "x"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\n{body}\n'
    line = text.splitlines().index(next(ln for ln in text.splitlines() if ln.startswith(f"{key} ="))) + 1
    with pytest.raises(BlueprintError) as e:
        parse_blueprint(text, "b.toml")
    assert str(e.value).startswith(f"b.toml:{line}: {key} = {value} in [slices.a"), str(e.value)
    assert "is not a finite number: inf, -inf and nan are not accepted" in str(e.value)


def test_the_float_keys_checked_are_those_of_the_structs() -> None:
    """The parametrisation above is not empty by accident: it covers the known floats."""
    keys = {k for _, k in _every_float_key()}
    assert {"interval", "progress_deadline", "max_error_rate", "max_p99_ratio", "timeout", "backoff",
            "in_flight", "rate", "p95_ms", "cpu"} <= keys
