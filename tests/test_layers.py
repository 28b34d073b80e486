"""The import contract (`[tool.importlinter]` in pyproject.toml) holds, names every package, and
catches a breach. `make test` runs `lint-imports` too; this test makes a breach fail pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = ROOT / "pyproject.toml"


def lint_imports(src: Path = SRC) -> subprocess.CompletedProcess[str]:
    """Run `lint-imports` with the project's contracts over the `aether` package found in `src`."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [*command, "--no-cache", str(PYPROJECT)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )


def contracts() -> list[dict[str, Any]]:
    with PYPROJECT.open("rb") as f:
        return list(tomllib.load(f)["tool"]["importlinter"]["contracts"])


def test_the_import_contract_holds() -> None:
    out = lint_imports()
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in out.stdout, out.stdout


def test_every_package_has_a_layer() -> None:
    (layers,) = [c for c in contracts() if c["type"] == "layers"]
    named = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    packages = {f"aether.{p.parent.name}" for p in (SRC / "aether").glob("*/__init__.py")}
    assert named == packages


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("kv/store.py", "aether.consensus.runner"),  # independent siblings
        ("node/node.py", "aether.api.server"),  # upwards
        ("invoke/context.py", "aether.slices.api"),  # upwards, and named by a narrower contract
        ("core/errors.py", "aether.transport"),  # the lowest layer imports nothing of aether
        ("maps/service.py", "aether.kv.store"),  # a narrower contract only
        ("controller/service.py", "aether.kv.machine"),  # behind the store interface (kv.contract)
        ("etcd/store.py", "aether.kv.machine"),  # the etcd backend sees only kv.contract and kv.keys
        ("kv/contract.py", "aether.etcd.errors"),  # kv is below etcd
    ],
)
def test_a_breach_fails(tmp_path: Path, module: str, imported: str) -> None:
    shutil.copytree(SRC / "aether", tmp_path / "aether", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "aether" / module
    path.write_text(path.read_text() + f"\nimport {imported}  # a breach\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    source = "aether." + module.removesuffix(".py").replace("/", ".")
    assert f"{source} -> {imported}" in out.stdout, out.stdout
