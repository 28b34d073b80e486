#!/usr/bin/env python3
"""Build every example's wheels and deploy them into the local artifact repository.

    python examples/build.py [--only EXAMPLE] [--project NAME] [--set-version VERSION]
                             [--repository DIR] [--out DIR] [--no-deploy] [--isolation auto|yes|no]

Every directory `examples/*/*/` holding a `pyproject.toml` is one project (`--only order_demo`:
just those under `examples/order_demo/`; repeatable). Each is built with
`python -m pip wheel --no-deps` from a temporary copy (so no `build/` or `*.egg-info` is left in
the source tree) into `build/examples/` (`--project hello-slice`: only that project;
`--set-version 0.2.0`: with that version instead of its pyproject's, e.g. to try a rolling
update), then deployed with `Repository.deploy_wheel` (slice
wheels to `{group}/{artifact}/{version}/`, library wheels to `_libs/`).

Builds work offline when this interpreter has setuptools>=61 and either `wheel` or
setuptools>=70.1 (then `--no-build-isolation` is used); otherwise pip builds in an isolated
environment and fetches setuptools from the package index. Wheels are build output: never commit
them. Exit codes: 0 ok, 1 a build or deploy failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent


def examples() -> list[str]:
    return sorted({p.parent.parent.name for p in EXAMPLES.glob("*/*/pyproject.toml")})


def projects(only: list[str] | None = None) -> list[Path]:
    found = sorted(p.parent for p in EXAMPLES.glob("*/*/pyproject.toml"))
    return [p for p in found if not only or p.parent.name in only]


def can_build_offline() -> bool:
    """True if this interpreter can build setuptools wheels without build isolation."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    try:
        from importlib.metadata import version

        from packaging.version import Version

        st = Version(version("setuptools"))
    except Exception:
        return False
    if st < Version("61"):
        return False
    return st >= Version("70.1") or importlib.util.find_spec("wheel") is not None


def build(project: Path, out: Path, isolation: bool, version: str | None = None) -> list[Path]:
    """Build one project's wheel into `out` (with `version` in place of its own); returns the new
    wheel paths."""
    before = set(out.glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="aether-example-") as tmp:
        src = Path(tmp) / project.name
        shutil.copytree(
            project, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist")
        )
        if version is not None:
            pyproject = src / "pyproject.toml"
            pattern = r'(?m)^version\s*=\s*"[^"]*"'
            text, n = re.subn(pattern, f'version = "{version}"', pyproject.read_text(), count=1)
            if not n:
                raise RuntimeError(f"{project.relative_to(ROOT)}/pyproject.toml has no version line")
            pyproject.write_text(text)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
        ]
        if not isolation:
            cmd.append("--no-build-isolation")
        cmd.append(str(src))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(f"building {project.relative_to(ROOT)} failed (exit {proc.returncode})")
    name = project.name.replace("-", "_")
    made = [w for w in out.glob("*.whl") if w.name.split("-")[0].lower() == name.lower()]
    return (
        sorted(made, key=lambda w: w.stat().st_mtime)[-1:]
        if made
        else sorted(set(out.glob("*.whl")) - before)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--repository",
        metavar="DIR",
        help="repository root [default: $AETHER_REPOSITORY or ~/.aether/repository]",
    )
    ap.add_argument(
        "--out",
        metavar="DIR",
        default=str(ROOT / "build" / "examples"),
        help="where wheels go [default: build/examples]",
    )
    ap.add_argument("--no-deploy", action="store_true", help="only build the wheels")
    ap.add_argument(
        "--only",
        action="append",
        metavar="EXAMPLE",
        help="build only examples/EXAMPLE/* (repeatable), e.g. --only order_demo",
    )
    ap.add_argument(
        "--project",
        action="append",
        metavar="NAME",
        help="build only the project examples/*/NAME (repeatable), e.g. --project hello-slice",
    )
    ap.add_argument(
        "--set-version",
        metavar="VERSION",
        help="build with this version instead of the one in pyproject.toml (e.g. 0.2.0)",
    )
    ap.add_argument(
        "--isolation",
        choices=["auto", "yes", "no"],
        default="auto",
        help="pip build isolation [default: auto]",
    )
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(examples()))
    if unknown:
        ap.error(f"no example {', '.join(unknown)}; examples: {', '.join(examples())}")
    chosen = projects(args.only)
    if args.project:
        missing = sorted(set(args.project) - {p.name for p in chosen})
        if missing:
            ap.error(f"no project {', '.join(missing)}; projects: {', '.join(p.name for p in chosen)}")
        chosen = [p for p in chosen if p.name in args.project]
    if args.set_version is not None:
        from packaging.version import InvalidVersion, Version

        try:
            Version(args.set_version)
        except InvalidVersion:
            ap.error(f"--set-version {args.set_version!r} is not a version (e.g. 0.2.0)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    isolation = {"yes": True, "no": False}.get(args.isolation, not can_build_offline())
    mode = "isolated (fetches setuptools)" if isolation else "offline, --no-build-isolation"
    print(f"Building {len(chosen)} example project(s) into {out} ({mode})")
    wheels: list[Path] = []
    try:
        for project in chosen:
            built = build(project, out, isolation, args.set_version)
            for w in built:
                print(f"  built {project.relative_to(ROOT)} -> {w.name}")
            wheels += built
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.no_deploy:
        return 0

    from aether.core.errors import BadRequest
    from aether.slices.repository import Repository

    repo = Repository(args.repository)
    print(f"Deploying into {repo.root}")
    for w in wheels:
        try:
            result = repo.deploy_wheel(w)
        except (BadRequest, OSError) as e:
            print(f"error: deploying {w.name}: {e}", file=sys.stderr)
            return 1
        print(f"  {w.name} -> {result}")
    print(
        "Done. Next: start a cluster and apply a blueprint, e.g. "
        "`aether blueprint apply examples/order_demo/demo-order.blueprint --wait`."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
