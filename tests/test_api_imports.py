"""Inside `aether.api` imports point one way (issue 13 §3): the routes modules take their helpers
from `aether.api.common` and declare their routes with `aether.api.routing`, `aether.api.auth` reads
their roles, and nothing imports the server back. Checked on the source (every import
statement, lazy ones in functions included) and by the import contract (pyproject)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from test_layers import SRC, lint_imports

API = SRC / "aether" / "api"


def _api_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in API.glob("*.py"):
        name = f"aether.api.{path.stem}"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t.startswith("aether.api.") and t != name}
    return graph


def test_no_import_cycle_inside_api() -> None:
    graph = _api_imports()
    seen: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, " -> ".join((*stack, node))
        if node in seen:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*stack, node))
        seen.add(node)

    for module in graph:
        visit(module, ())
    assert not any("aether.api.server" in targets for targets in graph.values())
    assert graph["aether.api.common"] == set()
    assert graph["aether.api.routing"] == set()


@pytest.mark.parametrize(
    ("module", "imported"),
    [("api/map_routes.py", "aether.api.server"), ("api/common.py", "aether.api.types"),
     ("api/deploy_routes.py", "aether.api.metrics_routes"), ("api/routing.py", "aether.api.types"),
     ("api/map_routes.py", "aether.api.auth"), ("api/node_routes.py", "aether.api.deploy_routes")],
)
def test_an_api_breach_fails(tmp_path: Path, module: str, imported: str) -> None:
    shutil.copytree(SRC / "aether", tmp_path / "aether", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "aether" / module
    path.write_text(path.read_text() + f"\nimport {imported}  # a breach\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout, out.stdout
