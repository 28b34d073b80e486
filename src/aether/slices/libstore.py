"""The node-local, content-addressed store of installed library and slice code (docs/slices.md).

Layout under a node's data directory::

    {data_dir}/libs/{name}=={version}@{sha256-of-wheel}/  # a library wheel (canonical name, PEP 440)
    {data_dir}/libs/{name}=={version}/                    # installed from the index (no wheel known)
    {data_dir}/slices/{sha256-of-wheel}/                   # the code of one slice wheel

A library directory names the sha256 of the wheel it was installed from, so a version whose
bytes changed (deleted from the cluster and uploaded again with other bytes, or a wheel of the
wheelhouse replaced) is installed again beside it: a directory is used only when its sha256 is
the one the repository holds for that version (`Repository.library_hashes`), else the wheelhouse
wheel's of that version; a directory without one (installed from the index, or by an earlier
release) only when neither knows the version. `stale_directories` names the directories no
resolution will use again (withdrawn versions, other bytes than the repository's), which the
loader removes once nothing uses them.

Each directory is a `pip install --no-deps --target` tree (module directories plus the
distribution's `*.dist-info`), created under a temporary name and renamed into place, so a
directory that exists is complete. Pure-Python wheels (`Root-Is-Purelib: true` and nothing but
purelib/platlib in `.data/`) are unpacked directly — the same tree pip produces, without a pip
process per library; every other wheel, and fetching from the package index when
`allow_index=True`, goes through `python -m pip install --no-deps --target DIR` (the index with no
`--find-links`: the wheelhouse's wheels are the store's own candidates, and pip could pick one the
store refused, e.g. of a withdrawn version; the withdrawn versions are excluded from pip's
requirement as `!=VERSION`; one without a local label only once pip's dry run chooses it, since
`!=1.0` excludes `1.0+local` too). `installer="pip"` forces pip for every wheel.

Blocking: every method does file I/O or runs pip; callers run them in a thread, possibly several
at once: one install of a directory (or of a requirement from the index) runs at a time, the others
wait for it and use its result.
May import: `aether.slices.wheel`, `aether.slices.errors`, `packaging`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath
from typing import Literal

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
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
    sha256_file,
    unsafe_member,
)

__all__ = ["Candidate", "LibraryStore", "install_wheel", "unpack_pure_wheel"]

Installer = Literal["auto", "pip"]
_Hashes = Mapping[PepVersion, str]  # version -> the sha256 of the wheel the repository holds


@dataclass(frozen=True)
class Candidate:
    """One available version of a library: installed in the store (`directory`) or a wheel file."""

    name: str  # canonical
    version: PepVersion
    wheel: Path | None = None
    directory: Path | None = None
    sha256: str = ""  # of the wheel (`wheel`, or the one `directory` was installed from); "" unknown

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


def _pip(args: list[str], what: str) -> str:
    """Run `pip install --no-deps ... ARGS`; its standard output."""
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
    return proc.stdout


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
    try:
        _install_wheel(wheel, target, installer, limits)
    except OSError as e:
        _raise_no_space(e, wheel, target.parent)  # (the bare OSError named neither)
        raise


def _raise_no_space(e: OSError, wheel: Path, directory: Path) -> None:
    """SliceLoadError naming `wheel` and `directory` if `e` says the disk is full."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise SliceLoadError(
            f"no space left on the node's disk to install {wheel.name} (in {directory}: "
            f"{e.strerror}); nothing of it was kept: free some space there"
        ) from None


def _install_wheel(wheel: Path, target: Path, installer: Installer, limits: WheelLimits) -> None:
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


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy `src` to the new private file `dest`; the sha256 of the bytes copied."""
    h = hashlib.sha256()
    with open(src, "rb") as f, os.fdopen(open_private(dest, os.O_WRONLY | os.O_EXCL), "wb") as out:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


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
        self._hashes: dict[Path, tuple[int, int, str]] = {}  # wheel -> (size, mtime_ns, sha256)
        self._install_locks: dict[str, threading.Lock] = {}  # see `_install_lock`
        self._install_locks_lock = threading.Lock()
        self._fetched: dict[str, Candidate] = {}  # requirement asked of pip -> what it installed last
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

    def directory_for(self, name: str, version: PepVersion, sha256: str = "") -> Path:
        """`libs/{name}=={version}@{sha256}` (the wheel it is installed from), or
        `libs/{name}=={version}` without a sha256 (installed from the package index)."""
        base = f"{canonicalize_name(name)}=={version}"
        return self.libs_root / (f"{base}@{sha256}" if sha256 else base)

    @staticmethod
    def _parse_dir(d: Path) -> tuple[str, PepVersion, str] | None:
        """(canonical name, version, wheel sha256 or "") of an installed directory's name."""
        if d.name.startswith(".") or "==" not in d.name:
            return None
        name, _, rest = d.name.partition("==")
        text, _, sha = rest.partition("@")
        try:
            return name, PepVersion(text), sha
        except InvalidVersion:
            return None

    def wheel_sha256(self, wheel: Path) -> str:
        """The sha256 of a wheel file (memoised by size and mtime)."""
        st = wheel.stat()
        memo = self._hashes.get(wheel)
        if memo is not None and memo[:2] == (st.st_size, st.st_mtime_ns):
            return memo[2]
        digest = sha256_file(wheel)
        self._hashes[wheel] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def installed(self) -> list[tuple[str, PepVersion, str, Path]]:
        """Every installed library directory: (canonical name, version, wheel sha256 or "", path)."""
        out = []
        if self.libs_root.is_dir():
            for d in sorted(self.libs_root.iterdir()):
                parsed = self._parse_dir(d)
                if parsed is not None and d.is_dir():
                    out.append((*parsed, d))
        return out

    def candidates(
        self, name: str, withdrawn: Container[PepVersion] = (), hashes: _Hashes | None = None
    ) -> list[Candidate]:
        """Installable versions of `name` (installed here or in the wheelhouse), highest first;
        none of the `withdrawn` versions (the repository's, e.g. deleted from the cluster: a copy
        kept here of one is no candidate). `hashes` are the sha256 the repository holds for
        versions of `name`: of such a version only the wheel and the directory of those bytes are
        candidates; of another, a directory whose sha256 is not the wheelhouse wheel's is none."""
        cname = canonicalize_name(name)
        hashes = hashes or {}
        wheels: dict[PepVersion, Candidate] = {}
        if self.wheelhouse is not None and self.wheelhouse.is_dir():
            rank = self._tag_rank()
            ranked: dict[PepVersion, list[tuple[int, Path]]] = {}
            for w in self.wheelhouse.glob("*.whl"):
                try:
                    wname, wver, _, wtags = parse_wheel_filename(w.name)
                except InvalidWheelFilename:
                    continue
                if wname != cname or wver in withdrawn or w.name.startswith("."):
                    continue
                ranks = [rank[t] for t in wtags if t in rank]
                if not ranks:
                    continue  # not installable on this interpreter/platform
                ranked.setdefault(wver, []).append((min(ranks), w))
            for v, ws in ranked.items():
                ws.sort()
                want = hashes.get(v)
                if want is None:
                    wheels[v] = Candidate(cname, v, wheel=ws[0][1])
                    continue
                for _, w in ws:  # only the repository's bytes of this version
                    try:
                        if self.wheel_sha256(w) == want:
                            wheels[v] = Candidate(cname, v, wheel=w, sha256=want)
                            break
                    except OSError:
                        continue
        found: dict[PepVersion, Candidate] = {}
        for dname, v, sha, d in self.installed():
            if dname != cname or v in withdrawn or v in found:
                continue
            expected = hashes.get(v)
            kept = wheels.get(v)
            if expected is None and kept is not None and kept.wheel is not None:
                try:
                    expected = kept.sha256 or self.wheel_sha256(kept.wheel)
                    wheels[v] = Candidate(cname, v, wheel=kept.wheel, sha256=expected)
                except OSError:
                    expected = None
            if expected is None or sha == expected:
                found[v] = Candidate(cname, v, directory=d, sha256=sha)
        for v, c in wheels.items():
            found.setdefault(v, c)
        return [found[v] for v in sorted(found, reverse=True)]

    def best(
        self, req: Requirement, withdrawn: Container[PepVersion] = (), hashes: _Hashes | None = None
    ) -> Candidate | None:
        """The highest available version satisfying `req` (pre-releases only if nothing else fits),
        but the `withdrawn` ones (and only the bytes `hashes` names, see `candidates`)."""
        cands = self.candidates(req.name, withdrawn, hashes)
        by_version = {c.version: c for c in cands}
        chosen = list(req.specifier.filter(by_version))
        if not chosen:
            return None
        return by_version[max(chosen)]

    def available(
        self, name: str, withdrawn: Container[PepVersion] = (), hashes: _Hashes | None = None
    ) -> list[str]:
        return [str(c.version) for c in self.candidates(name, withdrawn, hashes)]

    def stale_directories(
        self,
        withdrawn: Mapping[str, Container[PepVersion]],
        hashes: Mapping[str, Mapping[PepVersion, str]],
    ) -> list[Path]:
        """The installed directories no resolution uses again (by canonical name): those of a
        `withdrawn` version, and those of a version the repository holds (`hashes`) installed
        from other bytes (or from unknown ones)."""
        out = []
        for name, v, sha, d in self.installed():
            if v in withdrawn.get(name, ()):
                out.append(d)
                continue
            want = hashes.get(name, {}).get(v)
            if want is not None and sha != want:
                out.append(d)
        return out

    def remove_directory(self, d: Path) -> bool:
        """Remove an installed directory (renamed away first, so it is gone at once or not at
        all; a leftover of a crash is removed as any `.tmp-*`). Whether it is gone."""
        if d.parent != self.libs_root or self._parse_dir(d) is None:
            raise ValueError(f"{d} is no installed library directory of {self.libs_root}")
        gone = self.libs_root / f".tmp-gone-{d.name[:40]}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(d, gone)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        shutil.rmtree(gone, ignore_errors=True)
        return True

    # --- installing ---------------------------------------------------------------------------------

    def ensure(self, cand: Candidate) -> Path:
        """Install `cand` into `libs/{name}=={version}@{sha256}` if it is not there yet; returns the
        directory (`cand.directory` for one installed already)."""
        if cand.directory is not None:
            if not cand.directory.is_dir():
                raise SliceLoadError(f"{cand}: its directory {cand.directory} is gone")
            return cand.directory
        if cand.wheel is None:
            raise SliceLoadError(f"{cand}: nothing to install from")
        try:
            known = cand.sha256 or self.wheel_sha256(cand.wheel)
        except OSError as e:
            raise SliceLoadError(f"{cand}: cannot read {cand.wheel} ({e})") from None
        installed = self.directory_for(cand.name, cand.version, known)
        if installed.is_dir():
            return installed
        with self._install_lock(str(installed)):  # two loads that need it install it once
            if installed.is_dir():
                return installed
            return self._install_copy(
                cand.wheel,
                self.libs_root,
                cand.sha256,
                lambda sha: self.directory_for(cand.name, cand.version, sha),
                str(cand),
            )

    def _install_copy(
        self, wheel: Path, root: Path, expected: str, target: Callable[[str], Path], what: str
    ) -> Path:
        """Install `wheel` into `target(its sha256)` (a directory in `root`) from a private copy
        hashed while it is copied: a fetch may replace the wheel meanwhile, and a directory holds
        the bytes its name hashes. `expected`: the sha256 it was chosen for ("" none): other bytes
        are refused."""
        with self._private_copy(wheel, root, what) as (copy, sha):
            if expected and sha != expected:
                raise SliceLoadError(
                    f"{what}: {wheel} changed meanwhile (sha256 {sha}, chosen as {expected}); load again"
                )
            dest = target(sha)
            if not dest.is_dir():
                try:
                    install_wheel(copy, dest, installer=self.installer, limits=self.limits)
                except SliceLoadError as e:  # named by the wheel, not by its temporary copy
                    raise SliceLoadError(str(e).replace(str(copy), str(wheel))) from None
        return dest

    @contextlib.contextmanager
    def _private_copy(self, wheel: Path, root: Path, what: str) -> Iterator[tuple[Path, str]]:
        """A private copy of `wheel` (in a `.tmp-wheel-*` directory of `root`, removed after the
        block) and the sha256 of its bytes, hashed while copied."""
        try:
            make_private_dirs(root)
            tmp = tempfile.TemporaryDirectory(prefix=".tmp-wheel-", dir=root)
        except OSError as e:
            _raise_no_space(e, wheel, root)
            raise
        with tmp:
            copy = Path(tmp.name) / wheel.name
            try:
                sha = _copy_hashing(wheel, copy)
            except OSError as e:
                _raise_no_space(e, wheel, root)
                raise SliceLoadError(f"{what}: cannot read {wheel} ({e})") from None
            yield copy, sha

    def slice_wheel(self, wheel: Path) -> contextlib.AbstractContextManager[tuple[Path, str]]:
        """A private copy of the slice wheel `wheel` and the sha256 of its bytes, for the block:
        the loader reads the slice's declarations from it, names its code by that sha256 and
        installs it from it (`install_slice_code(copy, sha256)`), so all three come from the same
        bytes even if a fetch replaces `wheel` meanwhile."""
        return self._private_copy(wheel, self.slices_root, wheel.name)

    def _install_lock(self, key: str) -> threading.Lock:
        """The lock of one install (a directory, or a requirement fetched from the index)."""
        with self._install_locks_lock:
            return self._install_locks.setdefault(key, threading.Lock())

    @staticmethod
    def index_requirement(req: Requirement, withdrawn: Collection[PepVersion] = ()) -> str:
        """What pip is asked for: `req`'s name and specifier, and `!=VERSION` for each withdrawn
        version (no route installs one: neither the index nor a file pip finds)."""
        spec = req.specifier & SpecifierSet(",".join(f"!={v}" for v in sorted(withdrawn)))
        return f"{canonicalize_name(req.name)}{spec}"

    def _index_requirement_excluding(self, req: Requirement, withdrawn: Collection[PepVersion]) -> str:
        """`index_requirement` excluding exactly the `withdrawn` versions. `!=1.0` excludes `1.0+local`
        too (PEP 440 ignores a candidate's local label against a public version), which is another
        version, so a withdrawn public version is excluded only once pip is seen choosing it (a dry
        run): while pip may install a `1.0+local`, it prefers it to `1.0`, which sorts below it."""
        exclude = [v for v in withdrawn if v.local is not None]  # `!=1.0+local` is exact
        public = [v for v in withdrawn if v.local is None]
        while True:
            text = self.index_requirement(req, exclude)
            spec = Requirement(text).specifier
            if not any(spec.contains(v, prereleases=True) for v in public if v not in exclude):
                return text
            report = _pip(["--dry-run", "--ignore-installed", "--report", "-", text], text)
            try:
                (chosen,) = json.loads(report)["install"]
                version = PepVersion(chosen["metadata"]["version"])
            except (ValueError, KeyError, TypeError, InvalidVersion) as e:
                raise SliceLoadError(
                    f"{text}: pip's report of what it would install is unreadable ({e})"
                ) from None
            if version not in withdrawn:
                return text
            exclude.append(version)

    def fetch_from_index(self, req: Requirement, withdrawn: Collection[PepVersion] = ()) -> Candidate:
        """Install the best match for `req` from the package index (only with `allow_index`), none
        of the `withdrawn` versions. pip gets no `--find-links`: the wheelhouse's wheels are the
        store's candidates (`best`), and only the ones it refused would be left for pip."""
        if not self.allow_index:
            raise SliceLoadError(f"{req}: installing from the package index is not allowed on this node")
        key = self.index_requirement(req, withdrawn)
        before = self._fetched.get(key)
        with self._install_lock(f"index {key}"):
            done = self._fetched.get(key)
            if done is not before and done is not None and done.directory and done.directory.is_dir():
                return done  # another load fetched it while this one waited
            done = self._fetch_from_index(req, withdrawn)
            self._fetched[key] = done
            return done

    def _fetch_from_index(self, req: Requirement, withdrawn: Collection[PepVersion]) -> Candidate:
        make_private_dirs(self.libs_root)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-index-", dir=self.libs_root))
        try:
            req_text = self._index_requirement_excluding(req, withdrawn)
            _pip(["--target", str(tmp), req_text], req_text)
            privatize_tree(tmp)
            metas = list(tmp.glob("*.dist-info/METADATA"))
            if len(metas) != 1:
                raise SliceLoadError(f"{req_text}: pip installed {len(metas)} distributions, expected one")
            version = PepVersion(importlib.metadata.PathDistribution(metas[0].parent).version or "0")
            if version in withdrawn:  # the index changed since the dry run (pip honours `!=`)
                raise SliceLoadError(f"{req_text}: pip installed {req.name} {version}, a withdrawn version")
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
        if cand.wheel is not None:
            with zipfile.ZipFile(cand.wheel) as zf:
                metas = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
                if len(metas) != 1:
                    return []
                dist = DistInfo({"METADATA": zf.read(metas[0]).decode("utf-8", "replace")})
            return evaluate_requirements(dist.requires or (), extras=extras, source=str(cand.wheel))
        return []

    def install_slice_code(self, wheel: Path, sha256: str) -> Path:
        """Install a slice wheel's code into `slices/{sha256}/` (reused when already there);
        SliceLoadError if the wheel's bytes are no longer the ones `sha256` hashes (replaced)."""
        target = self.slices_root / sha256
        if target.is_dir():
            return target
        with self._install_lock(str(target)):
            if target.is_dir():
                return target
            return self._install_copy(
                wheel, self.slices_root, sha256, lambda sha: self.slices_root / sha, wheel.name
            )
