"""The node-local, content-addressed store of installed library and slice code (docs/slices.md).

Layout under a node's data directory::

    {data_dir}/libs/{name}=={version}/      # one library distribution (canonical name, PEP 440 version)
    {data_dir}/slices/{sha256-of-wheel}/     # the code of one slice wheel

Each directory is a `pip install --no-deps --target` tree (module directories plus the
distribution's `*.dist-info`), created under a temporary name and renamed into place, so a
directory that exists is complete. Pure-Python wheels (`Root-Is-Purelib: true` and nothing but
purelib/platlib in `.data/`) are unpacked directly — the same tree pip produces, without a pip
process per library; every other wheel, and fetching from the package index when
`allow_index=True`, goes through `python -m pip install --no-deps --target DIR` (with
`--no-index --find-links {repository}/_libs` unless the index is allowed). `installer="pip"` forces
pip for every wheel.

Blocking: every method does file I/O or runs pip; callers run them in a thread.
May import: `aether.slices.wheel`, `aether.slices.errors`, `packaging`.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Container, Iterable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath
from typing import Literal

from packaging.requirements import Requirement
from packaging.tags import Tag, sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion
from packaging.version import Version as PepVersion

from aether.core.files import make_private_dirs, open_private, privatize_tree
from aether.slices.errors import InvalidWheel, SliceLoadError
from aether.slices.wheel import (
    DEFAULT_WHEEL_LIMITS,
    ZIP_READ_ERRORS,
    DistInfo,
    WheelLimits,
    WheelRecord,
    evaluate_requirements,
    unsafe_member,
)

__all__ = ["Candidate", "LibraryStore", "install_wheel", "unpack_pure_wheel"]

Installer = Literal["auto", "pip"]


@dataclass(frozen=True)
class Candidate:
    """One available version of a library: installed in the store (`directory`) or a wheel file."""

    name: str  # canonical
    version: PepVersion
    wheel: Path | None = None
    directory: Path | None = None

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def _is_pure(zf: zipfile.ZipFile) -> bool:
    names = zf.namelist()
    wheel_files = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/WHEEL")]
    if len(wheel_files) != 1:
        return False
    meta = HeaderParser().parsestr(zf.read(wheel_files[0]).decode("utf-8", "replace"))
    if meta.get("Root-Is-Purelib", "").strip().lower() != "true":
        return False
    for n in names:
        head, _, rest = n.partition("/")
        if head.endswith(".data") and rest.split("/")[0] not in ("purelib", "platlib"):
            return False
    return True


_CHUNK = 1024 * 1024


def unpack_pure_wheel(wheel: Path, target: Path, limits: WheelLimits = DEFAULT_WHEEL_LIMITS) -> None:
    """Unpack a pure wheel into `target` the way `pip install --target` lays it out.

    `WheelTooLarge` beyond `limits`: checked on the declared sizes first, then on the bytes and
    files actually written (a member's header may understate its size). `WheelRecordMismatch`
    for a member missing from RECORD or not matching its hash there (checked while it is written;
    the caller discards `target` on any error, as `install_wheel` does).
    """
    budget = limits.budget(wheel)
    with zipfile.ZipFile(wheel) as zf:
        limits.check(zf, wheel)
        record = WheelRecord.read(zf, wheel)
        for info in zf.infolist():
            p = PurePosixPath(info.filename)
            if unsafe_member(info.filename):
                raise SliceLoadError(f"{wheel}: unsafe path {info.filename!r} in the wheel")
            parts = p.parts
            if parts and parts[0].endswith(".data") and len(parts) > 2:
                parts = parts[2:]  # {dist}.data/purelib/x -> x
            if not parts or info.is_dir():
                continue
            dest = target.joinpath(*parts)
            budget.add_file()
            check = record.hasher(info.filename)
            make_private_dirs(dest.parent)
            with zf.open(info) as src, os.fdopen(open_private(dest, os.O_WRONLY | os.O_TRUNC), "wb") as out:
                while chunk := src.read(_CHUNK):
                    budget.add_bytes(len(chunk))
                    if check is not None:
                        check.update(chunk)
                    out.write(chunk)
            if check is not None:
                check.verify()


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--no-input",
           "--quiet", *args]  # fmt: skip
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SliceLoadError(f"installing {what} with pip failed: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise SliceLoadError(f"installing {what} with pip failed (exit {proc.returncode}):\n{tail}")


def install_wheel(
    wheel: Path, target: Path, *, installer: Installer = "auto", limits: WheelLimits = DEFAULT_WHEEL_LIMITS
) -> None:
    """Install one wheel file (no dependencies) into the new directory `target`, atomically.

    A wheel beyond `limits` (declared or while unpacking) raises SliceLoadError naming the wheel
    and the limit; so does a wheel whose members do not match its RECORD (naming the member);
    nothing is left behind. Wheels handed to pip are checked against RECORD first.
    """
    if target.exists():
        return
    make_private_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:40]}-", dir=target.parent))  # 0700
    try:
        use_pip = installer == "pip"
        try:
            zf = zipfile.ZipFile(wheel)
        except (zipfile.BadZipFile, OSError) as e:
            raise SliceLoadError(f"{wheel}: not a wheel ({e})") from None
        try:
            with zf:
                limits.check(zf, wheel)  # pip unpacks by the declared sizes too
                use_pip = use_pip or not _is_pure(zf)
                if use_pip:  # pip does not compare the wheel's RECORD hashes: check them here
                    WheelRecord.read(zf, wheel).verify_all(zf, limits.budget(wheel))
        except InvalidWheel as e:
            raise SliceLoadError(str(e)) from None
        except ZIP_READ_ERRORS as e:  # e.g. a CRC mismatch: a damaged or lying member
            raise SliceLoadError(f"{wheel}: damaged wheel ({e})") from None
        if use_pip:
            _pip(["--target", str(tmp), str(wheel)], wheel.name)
            privatize_tree(tmp)  # pip wrote with the process umask
        else:
            try:
                unpack_pure_wheel(wheel, tmp, limits)
            except InvalidWheel as e:
                raise SliceLoadError(str(e)) from None
            except ZIP_READ_ERRORS as e:  # e.g. a CRC mismatch: a damaged or lying member
                raise SliceLoadError(f"{wheel}: damaged wheel ({e})") from None
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # lost a race against another installer: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dist_info_requirements(directory: Path, extras: Iterable[str]) -> list[Requirement]:
    metas = list(directory.glob("*.dist-info/METADATA"))
    if len(metas) != 1:
        return []
    dist = importlib.metadata.PathDistribution(metas[0].parent)
    return evaluate_requirements(dist.requires or (), extras=extras, source=str(metas[0]))


class LibraryStore:
    """Installed libraries and slice code of one node, plus the wheelhouse it installs from."""

    def __init__(
        self,
        data_dir: Path,
        wheelhouse: Path | None,
        *,
        allow_index: bool = False,
        installer: Installer = "auto",
        limits: WheelLimits = DEFAULT_WHEEL_LIMITS,
    ) -> None:
        self.limits = limits
        self.libs_root = Path(data_dir) / "libs"
        self.slices_root = Path(data_dir) / "slices"
        self.wheelhouse = wheelhouse
        self.allow_index = allow_index
        self.installer: Installer = installer
        self._tags: dict[Tag, int] | None = None
        self.removed_leftovers = self._remove_leftovers()

    LEFTOVER_AGE = 600.0  # s: an install directory this old belongs to no install still running

    def _remove_leftovers(self) -> int:
        """Remove the temporary directories of installs a killed process left (``.tmp-*`` beside
        the libraries and the slice code: `install_wheel` renames its directory into place, or
        removes it, unless the process dies first); only those older than `LEFTOVER_AGE`, so an
        install another runtime on this directory is running now keeps its own. Returns how many."""
        cutoff = time.time() - self.LEFTOVER_AGE
        removed = 0
        for root in (self.libs_root, self.slices_root):
            try:
                found = [d for d in root.glob(".tmp-*") if d.is_dir() and d.stat().st_mtime < cutoff]
            except OSError:
                continue
            for d in found:
                shutil.rmtree(d, ignore_errors=True)
                removed += not d.exists()
        return removed

    def _tag_rank(self) -> dict[Tag, int]:
        if self._tags is None:
            self._tags = {t: i for i, t in enumerate(sys_tags())}
        return self._tags

    # --- candidates ---------------------------------------------------------------------------------

    def directory_for(self, name: str, version: PepVersion) -> Path:
        return self.libs_root / f"{canonicalize_name(name)}=={version}"

    def candidates(self, name: str, withdrawn: Container[PepVersion] = ()) -> list[Candidate]:
        """Installable versions of `name` (installed here or in the wheelhouse), highest first;
        none of the `withdrawn` versions (the repository's, e.g. deleted from the cluster: a copy
        kept here of one is no candidate)."""
        cname = canonicalize_name(name)
        found: dict[PepVersion, Candidate] = {}
        if self.libs_root.is_dir():
            for d in self.libs_root.glob(f"{cname}==*"):
                try:
                    v = PepVersion(d.name.split("==", 1)[1])
                except InvalidVersion:
                    continue
                if v not in withdrawn:
                    found[v] = Candidate(cname, v, directory=d)
        if self.wheelhouse is not None and self.wheelhouse.is_dir():
            rank = self._tag_rank()
            best: dict[PepVersion, tuple[int, Path]] = {}
            for w in self.wheelhouse.glob("*.whl"):
                try:
                    wname, wver, _, wtags = parse_wheel_filename(w.name)
                except InvalidWheelFilename:
                    continue
                if wname != cname:
                    continue
                ranks = [rank[t] for t in wtags if t in rank]
                if not ranks:
                    continue  # not installable on this interpreter/platform
                r = min(ranks)
                if wver not in best or r < best[wver][0]:
                    best[wver] = (r, w)
            for v, (_, w) in best.items():
                if v not in found and v not in withdrawn:
                    found[v] = Candidate(cname, v, wheel=w)
        return [found[v] for v in sorted(found, reverse=True)]

    def best(self, req: Requirement, withdrawn: Container[PepVersion] = ()) -> Candidate | None:
        """The highest available version satisfying `req` (pre-releases only if nothing else fits),
        but the `withdrawn` ones."""
        cands = self.candidates(req.name, withdrawn)
        by_version = {c.version: c for c in cands}
        chosen = list(req.specifier.filter(by_version))
        if not chosen:
            return None
        return by_version[max(chosen)]

    def available(self, name: str, withdrawn: Container[PepVersion] = ()) -> list[str]:
        return [str(c.version) for c in self.candidates(name, withdrawn)]

    # --- installing ---------------------------------------------------------------------------------

    def ensure(self, cand: Candidate) -> Path:
        """Install `cand` into `libs/{name}=={version}` if it is not there yet; returns the directory."""
        target = self.directory_for(cand.name, cand.version)
        if target.is_dir():
            return target
        if cand.wheel is not None:
            install_wheel(cand.wheel, target, installer=self.installer, limits=self.limits)
            return target
        if cand.directory is not None:
            return cand.directory
        raise SliceLoadError(f"{cand}: nothing to install from")

    def fetch_from_index(self, req: Requirement) -> Candidate:
        """Install the best match for `req` from the package index (only with `allow_index`)."""
        if not self.allow_index:
            raise SliceLoadError(f"{req}: installing from the package index is not allowed on this node")
        make_private_dirs(self.libs_root)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-index-", dir=self.libs_root))
        try:
            args = ["--target", str(tmp)]
            if self.wheelhouse is not None and self.wheelhouse.is_dir():
                args += ["--find-links", str(self.wheelhouse)]
            req_text = f"{req.name}{req.specifier}"
            _pip([*args, req_text], req_text)
            privatize_tree(tmp)
            metas = list(tmp.glob("*.dist-info/METADATA"))
            if len(metas) != 1:
                raise SliceLoadError(f"{req_text}: pip installed {len(metas)} distributions, expected one")
            version = PepVersion(importlib.metadata.PathDistribution(metas[0].parent).version or "0")
            target = self.directory_for(req.name, version)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
            return Candidate(canonicalize_name(req.name), version, directory=target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def requirements_of(self, cand: Candidate, extras: Iterable[str] = ()) -> list[Requirement]:
        """The library's own requirements (markers evaluated, for the requested extras)."""
        if cand.directory is not None and cand.directory.is_dir():
            return _dist_info_requirements(cand.directory, extras)
        installed = self.directory_for(cand.name, cand.version)
        if installed.is_dir():
            return _dist_info_requirements(installed, extras)
        if cand.wheel is not None:
            with zipfile.ZipFile(cand.wheel) as zf:
                metas = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
                if len(metas) != 1:
                    return []
                dist = DistInfo({"METADATA": zf.read(metas[0]).decode("utf-8", "replace")})
            return evaluate_requirements(dist.requires or (), extras=extras, source=str(cand.wheel))
        return []

    def install_slice_code(self, wheel: Path, sha256: str) -> Path:
        """Install a slice wheel's code into `slices/{sha256}/` (reused when already there)."""
        target = self.slices_root / sha256
        if not target.is_dir():
            install_wheel(wheel, target, installer=self.installer, limits=self.limits)
        return target
