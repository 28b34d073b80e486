"""Names are validated up to their true end: a trailing newline is not part of a valid name.

`$` in a Python regex also matches just before a trailing "\\n", so `abc\\n` passed a pattern
ending in `$` and became a second, distinct name. Every family of names is checked here with a
trailing newline; `test_no_dollar_anchor_in_validation_patterns` keeps `$` out of the source.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from aether.core.artifact import Artifact, VersionPattern
from aether.core.errors import BadRequest, ConfigError
from aether.core.maps import check_map_name
from aether.core.types import NodeId, check_node_id
from aether.deploy.blueprint import Blueprint, BlueprintSliceSpec, expand, parse_blueprint
from aether.deploy.errors import BlueprintError
from aether.kv.keys import parse_key
from aether.slices.api import parse_route_path
from conftest import ProcessCluster, http_json

SRC = Path(__file__).resolve().parents[1] / "src" / "aether"


def test_node_ids() -> None:
    assert check_node_id("node-1") == "node-1"
    with pytest.raises(ConfigError, match="invalid node id"):
        check_node_id("node-1\n")
    assert msgspec.convert("node-1", NodeId) == "node-1"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert("node-1\n", NodeId)


@pytest.mark.parametrize(
    ("coords", "problem"),
    [
        ("org.demo:evil\n:1.0.0", "invalid artifact id"),
        ("org.demo\n:evil:1.0.0", "invalid group"),
    ],
)
def test_artifact_coordinates(coords: str, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        Artifact.parse(coords)


def test_artifact_surrounding_whitespace_is_normalised_not_a_new_name() -> None:
    # coordinates typed with a trailing newline name the same artifact (stripped), never another
    assert str(Artifact.parse("org.demo:hello:1.0.0\n")) == "org.demo:hello:1.0.0"


def test_map_names() -> None:
    assert check_map_name("abc") == "abc"
    with pytest.raises(BadRequest, match="invalid map name"):
        check_map_name("abc\n")


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("blueprints/demo\n", "invalid blueprint id"),
        ("slices/node-1\n/org.demo:hello:1.0.0", "invalid node id"),
        ("slices/node-1/org.demo:hello:1.0.0\n", "invalid artifact"),
        ("endpoints/org.demo:hello:1.0.0/greet\n:0", "invalid method"),
        ("routes/GET:/api/hello\n", "invalid route path"),
        ("maps/defs/abc\n", "invalid map name"),
    ],
)
def test_kv_keys(key: str, problem: str) -> None:
    parse_key(key.replace("\n", ""))  # the same key without the newline is fine
    with pytest.raises(BadRequest, match=problem):
        parse_key(key)


def test_route_paths() -> None:
    assert parse_route_path("/api/orders/{id}") == ("id",)
    with pytest.raises(ValueError, match="not allowed in a URL path"):
        parse_route_path("/api/orders\n")


def test_blueprint_ids() -> None:
    text = 'id = "demo\\n"\n[slices.hello]\nartifact = "org.demo:hello:1.0.0"\n'
    with pytest.raises(BlueprintError, match="invalid blueprint id"):
        parse_blueprint(text, "demo.blueprint")


def test_blueprint_dependency_names() -> None:
    hello = Artifact.parse("org.demo:hello:1.0.0")
    bp = Blueprint("demo", (BlueprintSliceSpec("hello", hello, 1, 2),))

    def deps(a: Artifact) -> dict[str, VersionPattern]:
        return {"org.demo:dep\n": VersionPattern.parse("1.0.0")} if a == hello else {}

    with pytest.raises(BlueprintError, match="expected GROUP:ARTIFACT"):
        expand(bp, deps, lambda name, pattern: hello)


def _pattern_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals used as regular expressions: arguments of re.compile/match/search/fullmatch
    and msgspec.Meta(pattern=...)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        args: list[ast.expr] = []
        if name in ("compile", "match", "search", "fullmatch") and isinstance(f, ast.Attribute) and (
            isinstance(f.value, ast.Name) and f.value.id == "re"
        ):
            args = node.args[:1]
        elif name == "Meta":
            args = [k.value for k in node.keywords if k.arg == "pattern"]
        for a in args:
            if isinstance(a, ast.Constant) and isinstance(a.value, str):
                out.append((node.lineno, a.value))
    return out


# Files whose patterns are not names of the cluster (none at the moment).
_ELSEWHERE: set[str] = set()


def test_no_dollar_anchor_in_validation_patterns() -> None:
    found: list[str] = []
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in _ELSEWHERE:
            continue
        for line, pattern in _pattern_literals(ast.parse(path.read_text(), str(path))):
            checked += 1
            body = pattern.replace("\\\\", "")
            # `$` outside a character class and not escaped: matches before a trailing newline
            stripped = ""
            in_class = escaped = False
            for ch in body:
                if escaped:
                    escaped = False
                    continue
                if ch == "\\":
                    escaped = True
                elif ch == "[" and not in_class:
                    in_class = True
                elif ch == "]" and in_class:
                    in_class = False
                elif not in_class:
                    stripped += ch
            if "$" in stripped:
                found.append(f"{rel}:{line}: {pattern!r}")
    assert checked > 10  # the scan does see the patterns
    assert not found, "use \\Z (or re.fullmatch), not $:\n" + "\n".join(found)


@pytest.mark.timeout(90)
def test_management_api_answers_400(make_process_cluster: Callable[..., ProcessCluster]) -> None:
    """Through a real node's management API: a name with a trailing newline is a 400 naming it,
    and nothing is stored under it."""
    c = make_process_cluster(1)
    port = c.management_ports[0]
    status, doc = http_json(port, "POST", "/api/v1/maps", {"name": "abc\n", "replicas": 1, "write_quorum": 1})
    assert status == 400 and "invalid map name 'abc\\n'" in doc["detail"], doc
    body = {"artifact": "org.demo:evil\n:1.0.0", "instances": 1}
    status, doc = http_json(port, "POST", "/api/v1/deploy", body)
    assert status == 400 and "invalid artifact id 'evil\\n'" in doc["detail"], doc
    toml = 'id = "demo\\n"\n[slices.hello]\nartifact = "org.demo:hello:1.0.0"\n'
    status, doc = http_json(port, "POST", "/api/v1/blueprints", {"toml": toml, "filename": "demo.blueprint"})
    assert status == 400 and "invalid blueprint id 'demo\\n'" in doc["detail"], doc
    assert http_json(port, "GET", "/api/v1/maps")[1]["maps"] == []
    assert http_json(port, "GET", "/api/v1/blueprints")[1] == []
