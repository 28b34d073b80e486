"""The distribution: `python -m build` makes an sdist and a wheel named `aether-slices` (the name
`aether` on PyPI is another project) with the version of pyproject.toml, the package data, and
the `aether` command; the version is said in pyproject.toml only."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import aether
from aether.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_said_once_and_read_at_runtime() -> None:
    assert PYPROJECT["project"]["name"] == aether.DISTRIBUTION == "aether-slices"
    assert aether.__version__ == PYPROJECT["project"]["version"]
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"aether, version {PYPROJECT['project']['version']}"
    init = (ROOT / "src" / "aether" / "__init__.py").read_text()
    assert PYPROJECT["project"]["version"] not in init  # no second copy to forget


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_build_makes_a_clean_sdist_and_wheel(tmp_path: Path) -> None:
    pytest.importorskip("build")
    tree = tmp_path / "tree"  # a copy: building in the work tree would leave build/ and egg-info there
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    )
    out = tmp_path / "dist"
    # --no-isolation: the dev environment has setuptools and wheel; no download. The wheel is built
    # from the sdist, so a file missing from the sdist is missing from the wheel too.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Deprecat" not in proc.stdout + proc.stderr  # setuptools' warnings of a stale configuration
    version = PYPROJECT["project"]["version"]
    wheel = out / f"aether_slices-{version}-py3-none-any.whl"
    sdist = out / f"aether_slices-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in out.iterdir())

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.parser.Parser().parsestr(z.read(f"aether_slices-{version}.dist-info/METADATA").decode())
        entry_points = z.read(f"aether_slices-{version}.dist-info/entry_points.txt").decode()
    assert meta["Name"] == "aether-slices" and meta["Version"] == version
    assert any(r.startswith("pyyaml") for r in meta.get_all("Requires-Dist") or [])
    assert "aether = aether.cli.main:main" in entry_points
    assert "aether/__init__.py" in names and "aether/client/management.py" in names
    static = ROOT / "src" / "aether" / "forge" / "static"
    data = [p.relative_to(ROOT / "src").as_posix() for p in static.rglob("*") if p.is_file()]
    assert data and set(data) <= names, set(data) - names  # the dashboard's files, vendor/ included
    assert not any("tests/" in n or n.endswith(".pyc") for n in names)

    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "src/aether/forge/static/index.html"} <= members
