"""The local artifact repository: a directory of slice wheels and library wheels (docs/slices.md).

Layout under the root (default `~/.aether/repository`, env `AETHER_REPOSITORY` overrides)::

    org/example/hello/0.1.0/hello-0.1.0-py3-none-any.whl     # {group as path}/{artifact}/{version}/
    _libs/tinylib-1.0-py3-none-any.whl                       # flat wheelhouse of library wheels

One wheel per version directory: deploying the same version again replaces it. Wheels are copied
atomically (temporary file + rename), so a reader never sees a half-written wheel. Library wheels
(no `aether.slices` entry point) live in `_libs/`, from where nodes install them offline.

May import: `aether.core`, `aether.slices.wheel`, `aether.slices.errors`, `packaging`.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from aether.core.artifact import Artifact, Version, VersionPattern
from aether.core.errors import BadRequest
from aether.core.files import make_private_dirs
from aether.slices.errors import ArtifactNotFound, InvalidWheel, NotASliceWheel
from aether.slices.wheel import WheelInfo, WheelLimits, inspect_wheel

__all__ = ["LIBS_DIR", "REPOSITORY_ENV", "Repository", "default_root"]

REPOSITORY_ENV = "AETHER_REPOSITORY"
LIBS_DIR = "_libs"


def default_root() -> Path:
    """`$AETHER_REPOSITORY`, else `~/.aether/repository`."""
    env = os.environ.get(REPOSITORY_ENV)
    return Path(env).expanduser() if env else Path.home() / ".aether" / "repository"


def _parse_name(name: str) -> str:
    """Validate `group:artifact` and return it normalised."""
    t = name.strip()
    if t.count(":") != 1:
        raise BadRequest(f"invalid artifact name {name!r}: expected GROUP:ARTIFACT, e.g. org.example:hello")
    return Artifact.parse(f"{t}:0.0.0").name


def _copy_atomic(src: Path, dest_dir: Path, name: str) -> Path:
    make_private_dirs(dest_dir)  # the wheel itself is 0600 (mkstemp)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".whl", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        dest = dest_dir / name
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


class Repository:
    """A local repository directory; all methods are synchronous file operations."""

    def __init__(self, root: Path | str | None = None, *, wheel_limits: WheelLimits | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        # how much one wheel may unpack to (checked on deploy, inspection and installation)
        self.wheel_limits = wheel_limits if wheel_limits is not None else WheelLimits.from_env()

    def __repr__(self) -> str:
        return f"Repository({str(self.root)!r})"

    @property
    def libs_dir(self) -> Path:
        """The flat wheelhouse of library wheels (`{root}/_libs`)."""
        return self.root / LIBS_DIR

    def artifact_dir(self, artifact: Artifact) -> Path:
        return self.root.joinpath(*artifact.group.split("."), artifact.artifact, str(artifact.version))

    # --- writing ----------------------------------------------------------------------------------

    def deploy(self, wheel: Path | str, coords: Artifact | str | None = None) -> Artifact:
        """Copy a slice wheel to `{group as path}/{artifact}/{version}/`; returns its coordinates.

        `coords` overrides the coordinates declared by the wheel. A wheel without an
        `aether.slices` entry point raises `NotASliceWheel` (use `deploy_library`, or
        `deploy_wheel` which routes by content).
        """
        info = inspect_wheel(wheel, coords, limits=self.wheel_limits)
        if info.coords is None:
            raise NotASliceWheel(
                f"{wheel}: no [aether.slices] entry point: it is a library wheel "
                "(store it in the wheelhouse with deploy_library / `aether artifact deploy`)"
            )
        target_dir = self.artifact_dir(info.coords)
        dest = _copy_atomic(info.path, target_dir, info.path.name)
        for other in target_dir.glob("*.whl"):
            # (not the .tmp-* of a copy or fetch running in another process sharing the directory)
            if other != dest and not other.name.startswith("."):
                other.unlink(missing_ok=True)
        return info.coords

    def deploy_library(self, wheel: Path | str) -> Path:
        """Copy a library wheel into the wheelhouse `{root}/_libs/` (replacing a same-named file)."""
        info = inspect_wheel(wheel, limits=self.wheel_limits)
        if info.is_slice:
            raise InvalidWheel(f"{wheel}: it is a slice wheel ({info.coords}); deploy it with deploy()")
        return _copy_atomic(info.path, self.libs_dir, info.path.name)

    def deploy_wheel(self, wheel: Path | str, coords: Artifact | str | None = None) -> Artifact | Path:
        """Deploy by content: a slice wheel -> its Artifact; a library wheel -> its path in `_libs/`."""
        info = inspect_wheel(wheel, coords, limits=self.wheel_limits)
        if info.is_slice:
            return self.deploy(wheel, coords)
        return self.deploy_library(wheel)

    # --- reading ----------------------------------------------------------------------------------

    def list(self) -> builtins.list[Artifact]:
        """Every deployed slice artifact (all versions), sorted."""
        out: builtins.list[Artifact] = []
        if not self.root.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            if rel.parts[:1] == (LIBS_DIR,):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if not any(f.endswith(".whl") and not f.startswith(".") for f in filenames):
                continue
            parts = rel.parts
            if len(parts) < 3:
                continue
            try:
                out.append(Artifact.parse(f"{'.'.join(parts[:-2])}:{parts[-2]}:{parts[-1]}"))
            except BadRequest:
                continue
        return sorted(out)

    def names(self) -> builtins.list[str]:
        """Every deployed `group:artifact`, sorted."""
        return sorted({a.name for a in self.list()})

    def versions(self, name: str) -> builtins.list[Version]:
        """Deployed versions of `group:artifact`, ascending."""
        n = _parse_name(name)
        group, art = n.split(":")
        base = self.root.joinpath(*group.split("."), art)
        if not base.is_dir():
            return []
        out: builtins.list[Version] = []
        for d in base.iterdir():
            if not d.is_dir() or not any(
                p.suffix == ".whl" and not p.name.startswith(".") for p in d.iterdir()
            ):
                continue
            try:
                v = Version.parse(d.name)
            except BadRequest:
                continue
            if str(v) == d.name:
                out.append(v)
        return sorted(out)

    def resolve(self, artifact: Artifact | str) -> Path:
        """Path of the artifact's wheel; `ArtifactNotFound` lists the versions there are."""
        a = artifact if isinstance(artifact, Artifact) else Artifact.parse(artifact)
        d = self.artifact_dir(a)
        wheels = (
            sorted(
                (p for p in d.glob("*.whl") if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime
            )
            if d.is_dir()
            else []
        )
        if wheels:
            return wheels[-1]
        versions = self.versions(a.name)
        if versions:
            have = f"available versions of {a.name}: {', '.join(str(v) for v in versions)}"
        else:
            have = f"no version of {a.name} is deployed"
        raise ArtifactNotFound(
            f"{a} is not in the repository {self.root} ({have}); "
            "deploy it with `aether artifact deploy WHEEL`"
        )

    def info(self, artifact: Artifact | str) -> WheelInfo:
        """The declarations of the artifact's wheel (coordinates as deployed)."""
        a = artifact if isinstance(artifact, Artifact) else Artifact.parse(artifact)
        return inspect_wheel(self.resolve(a), a, limits=self.wheel_limits)

    def dependencies(self, artifact: Artifact | str) -> dict[str, VersionPattern]:
        """Slices the artifact calls: `group:artifact` -> version pattern."""
        return dict(self.info(artifact).dependencies)

    def maps(self, artifact: Artifact | str) -> builtins.list[str]:
        """The distributed maps the artifact declares it uses (`maps` in aether-slice.toml)."""
        return list(self.info(artifact).maps)

    def requirements(self, artifact: Artifact | str) -> builtins.list[Requirement]:
        """The artifact's library requirements (markers evaluated for this interpreter)."""
        return list(self.info(artifact).requirements)

    def resolve_pattern(self, name: str, pattern: VersionPattern | str) -> Artifact | None:
        """The highest deployed version of `group:artifact` matching `pattern`, or None."""
        n = _parse_name(name)
        p = pattern if isinstance(pattern, VersionPattern) else VersionPattern.parse(pattern)
        matching = [v for v in self.versions(n) if p.matches(v)]
        return Artifact.parse(f"{n}:{max(matching)}") if matching else None

    def withdrawn_libraries(self) -> dict[tuple[str, str], str]:
        """The library versions this repository withdrew, `(canonical name, version)` -> why: the
        library store installs none of them, not even from a copy it keeps (a directory alone
        withdraws nothing; the cluster's repository withdraws the versions it deleted)."""
        return {}

    def library_hashes(self) -> dict[tuple[str, str], str]:
        """The sha256 of the wheel this repository holds for a library version, `(canonical name,
        version)` -> sha256, where it is the authority on a version's bytes: the library store
        installs and uses only those bytes of such a version (a plain directory holds none: its
        wheelhouse's files are what they are; the cluster's repository, its manifests')."""
        return {}

    def library_wheels(self) -> builtins.list[Path]:
        """Wheel files in the wheelhouse `_libs/`, sorted by name."""
        if not self.libs_dir.is_dir():
            return []
        out = []
        for p in self.libs_dir.glob("*.whl"):
            if p.name.startswith("."):
                continue
            try:
                parse_wheel_filename(p.name)
            except InvalidWheelFilename:
                continue
            out.append(p)
        return sorted(out)
