"""Loading slice classes from wheels into this interpreter (docs/slices.md).

Owns library resolution and importing: `SliceLoader.load(artifact)` resolves the artifact's wheel
in the repository, reads its declarations and installs its code into the node's `LibraryStore`
(both from one private copy of the wheel, `LibraryStore.slice_wheel`), resolves its library
requirements, puts the needed `{name}=={version}` directories on `sys.path`, imports the class,
checks that it subclasses `Slice` and describes it.

Resolution of each requirement (greedy, breadth-first over the slice's `Requires-Dist` and then
each chosen library's own requirements):

1. a version already loaded in this interpreter (by any slice) is shared if it satisfies the
   specifier, else the load fails with `SliceConflict` naming both requirements;
2. else a distribution installed in the node's own environment is used if it satisfies the
   specifier, else the load fails (naming the environment's version);
3. else the highest version in the library store / repository wheelhouse satisfying it is
   installed (from the package index only with `allow_index=True`), but no version the
   repository withdrew (`Repository.withdrawn_libraries`: one deleted from the cluster): when
   only such versions match, the load fails naming why they were withdrawn. Of a version whose
   bytes the repository names (`Repository.library_hashes`), only a directory installed from
   those bytes is used (else the wheel is installed beside it).

The resolution that reads the withdrawn versions also removes the node's installed directories no
resolution uses again (`LibraryStore.stale_directories`: withdrawn versions, other bytes than the
repository's) unless something may still import from them: a directory on `sys.path` or of a
library loaded in the import space (any node of the process), or handed to a worker process that
has not been released (`release_isolated`).

`sys.path` and `sys.modules` belong to the whole process, so what is loaded is tracked by an
`ImportSpace`, shared by every node in the process (`default_import_space()`: the one piece of
module-level state, mirroring `sys.path`). Library directories stay on `sys.path` once added
(modules imported from them cannot be unimported safely); a slice's code directory and its
modules are removed when the last node using that wheel unloads it, so a new version of the same
slice can then be loaded. Two different wheels whose code has the same top-level module (e.g.
two versions of one slice) cannot be loaded side by side in one interpreter: the second raises
`SliceConflict`, as does a library conflict, and the runtime runs it in a worker process
instead; `prepare_isolated` installs such a slice's code and the libraries resolved for the
worker's own import space (`ImportSpace.fresh`) without importing anything here.

The import space's lock is held while a load plans and puts libraries and code on `sys.path`, and
while an unload removes them, not while the slice's module is imported (its top-level code runs): a
module whose code blocks held every other load and unload of the process. Nor while a load installs
the libraries its plan chose (`_planned`: installed without the lock, then planned again with it;
`LibraryStore` installs one directory once when two loads need it): a slow pip held them all too.
What that import needs stays meanwhile (its code and libraries are recorded as used); `sys.path`
is replaced, never changed in place, when an entry leaves it, since an import may be walking it.

Blocking: `load`/`unload` do file I/O, may run pip and import code; run them in a thread.
May import: `aether.core`, `aether.slices.*`, `packaging`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion
from packaging.version import Version as PepVersion

from aether.core.artifact import Artifact
from aether.slices.api import CodecCache, Slice, SliceInfo, describe_slice
from aether.slices.errors import (
    ArtifactNotFound,
    InvalidWheel,
    SliceConflict,
    SliceDefinitionError,
    SliceLoadError,
)
from aether.slices.libstore import Candidate, Installer, LibraryStore
from aether.slices.repository import Repository
from aether.slices.wheel import WheelInfo, inspect_wheel

__all__ = [
    "ImportSpace",
    "IsolatedCode",
    "LoadedCode",
    "LoadedLibrary",
    "LoadedSlice",
    "SliceLoader",
    "default_import_space",
]

_log = logging.getLogger(__name__)


@dataclass
class LoadedLibrary:
    """A library version visible to imports in this interpreter."""

    name: str
    version: PepVersion
    path: Path | None  # None: the node's own environment
    first_user: str  # who caused it to be loaded, e.g. "org.example:a:1.0.0 on node-1"
    first_requirement: str  # and with which requirement, e.g. "tinylib==1.0"
    users: dict[str, str] = field(default_factory=dict)  # owner -> requirement

    def describe(self) -> str:
        where = "the node's environment" if self.path is None else f"{self.first_user}"
        return f"{self.name} {self.version} (loaded for {where}, which requires {self.first_requirement})"


@dataclass
class LoadedCode:
    """One slice wheel's code directory on sys.path."""

    sha256: str
    path: Path
    modules: tuple[str, ...]
    label: str
    users: set[str] = field(default_factory=set)


class ImportSpace:
    """What slices have put on `sys.path` / into `sys.modules` of this interpreter (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.libraries: dict[str, LoadedLibrary] = {}
        self.code: dict[str, LoadedCode] = {}  # sha256 -> code
        self.modules: dict[str, str] = {}  # top-level module -> sha256
        self._base_path = [p for p in sys.path]
        # library directories handed to worker processes, by owner ("{artifact} on {node}"): kept
        # on disk until the owner's worker is gone (`SliceLoader.release_isolated`). A lock of its
        # own, never held while waiting: the runtime releases on its event loop, which a thread
        # holding `lock` may be waiting for (a read of the cluster's repository)
        self.held: dict[str, tuple[Path, ...]] = {}
        self.held_lock = threading.Lock()

    def env_version(self, name: str) -> PepVersion | None:
        """Version of `name` installed in the node's environment (not in slice library dirs)."""
        ours = {str(lib.path) for lib in self.libraries.values() if lib.path is not None}
        ours |= {str(c.path) for c in self.code.values()}
        path = [p for p in self._base_path if p not in ours]
        for dist in importlib.metadata.distributions(name=name, path=path):
            try:
                return PepVersion(dist.version)
            except InvalidVersion:
                return None
        return None

    def fresh(self, exclude: tuple[Path, ...] = ()) -> ImportSpace:
        """An empty space over the same environment: what a worker process starts from (nothing
        loaded by slices yet; the environment is this interpreter's own `sys.path` before them,
        without the directories under `exclude`: a library store's, never the environment)."""
        other = ImportSpace()
        roots = tuple(str(p) for p in exclude)
        other._base_path = [p for p in self._base_path if not (roots and p.startswith(roots))]
        return other

    def snapshot(self) -> dict[str, str]:
        """`{library: version}` of every library loaded here (diagnostics)."""
        with self.lock:
            return {n: str(lib.version) for n, lib in sorted(self.libraries.items())}


_DEFAULT_SPACE = ImportSpace()


def default_import_space() -> ImportSpace:
    """The process-wide import space (sys.path is process-wide too)."""
    return _DEFAULT_SPACE


@dataclass
class LoadedSlice:
    artifact: Artifact
    cls: type[Slice]
    info: SliceInfo
    wheel: WheelInfo
    sha256: str
    code_dir: Path
    libraries: dict[str, str]  # name -> version used (from the store or the environment)
    codecs: CodecCache = field(default_factory=CodecCache, repr=False)
    """The decoders and proxy specs built for this slice's types (every instance's
    `context.codecs`): they live and go with the loaded slice, not with the process."""


@dataclass(frozen=True)
class IsolatedCode:
    """A slice prepared for a worker process (`SliceLoader.prepare_isolated`): its code and library
    directories are installed in the node's `LibraryStore`, its libraries resolved as if nothing
    else were loaded (the worker's own import space); nothing was imported here."""

    artifact: Artifact
    wheel: WheelInfo
    sha256: str
    code_dir: Path
    slice_class: str
    library_dirs: list[Path]
    libraries: dict[str, str]  # name -> version


@dataclass
class _Planned:
    name: str
    version: PepVersion
    requirement: str
    requested_by: str
    candidate: Candidate | None  # None: already loaded or from the environment
    from_env: bool = False
    directory: Path | None = None  # where `candidate` is installed (`LibraryStore.ensure`)


def _contains(req: Requirement, version: PepVersion) -> bool:
    return req.specifier.contains(version, prereleases=True)


def _by_name(withdrawn: dict[tuple[str, str], str]) -> dict[str, dict[PepVersion, str]]:
    """`Repository.withdrawn_libraries` by canonical name and version (unparsable ones left out)."""
    out: dict[str, dict[PepVersion, str]] = {}
    for (name, version), why in withdrawn.items():
        try:
            out.setdefault(canonicalize_name(name), {})[PepVersion(version)] = why
        except InvalidVersion:
            continue
    return out


def _hashes_by_name(hashes: dict[tuple[str, str], str]) -> dict[str, dict[PepVersion, str]]:
    """`Repository.library_hashes` by canonical name and version (unparsable ones left out)."""
    out: dict[str, dict[PepVersion, str]] = {}
    for (name, version), sha in hashes.items():
        try:
            out.setdefault(canonicalize_name(name), {})[PepVersion(version)] = sha
        except InvalidVersion:
            continue
    return out


def _purge_modules(names: tuple[str, ...]) -> None:
    for mod in list(sys.modules):
        top = mod.split(".", 1)[0]
        if top in names:
            sys.modules.pop(mod, None)


class SliceLoader:
    """Loads slice classes of one node from a repository (synchronous; call from a thread)."""

    def __init__(
        self,
        node_id: str,
        repository: Repository,
        data_dir: Path,
        *,
        space: ImportSpace | None = None,
        allow_index: bool = False,
        installer: Installer = "auto",
    ) -> None:
        self.node_id = node_id
        self.repository = repository
        self.space = space if space is not None else default_import_space()
        self.store = LibraryStore(
            Path(data_dir), repository.libs_dir, allow_index=allow_index, installer=installer,
            limits=repository.wheel_limits,
        )
        self._loaded: dict[Artifact, LoadedSlice] = {}

    def _owner(self, artifact: Artifact) -> str:
        return f"{artifact} on {self.node_id}"

    def loaded(self, artifact: Artifact) -> LoadedSlice | None:
        return self._loaded.get(artifact)

    def load(self, artifact: Artifact) -> LoadedSlice:
        """Resolve, install and import `artifact`; idempotent. Raises SliceLoadError(reason)."""
        done = self._loaded.get(artifact)
        if done is not None:
            return done
        try:
            return self._load(artifact)
        except SliceLoadError:
            raise
        except Exception as e:
            raise SliceLoadError(f"{artifact} cannot be loaded: {type(e).__name__}: {e}") from e

    def _slice_code(self, artifact: Artifact) -> tuple[WheelInfo, str, Path]:
        """The slice's declarations, the sha256 of its wheel and its installed code directory, all
        read from one private copy of the wheel (`LibraryStore.slice_wheel`): a fetch replacing the
        repository's file meanwhile (the same version deployed again) gave a slice the class and
        requirements of some bytes and, `slices/{sha256}` being there already, the code of others."""
        try:
            wheel_path = self.repository.resolve(artifact)
        except ArtifactNotFound as e:
            raise SliceLoadError(str(e)) from None
        with self.store.slice_wheel(wheel_path) as (copy, sha):
            try:
                info = inspect_wheel(copy, artifact, limits=self.repository.wheel_limits)
            except InvalidWheel as e:  # named by the repository's file, not the copy
                raise SliceLoadError(str(e).replace(str(copy), str(wheel_path))) from None
            if not info.is_slice or info.slice_class is None:
                raise SliceLoadError(f"{artifact}: {wheel_path.name} declares no slice class")
            return info, sha, self.store.install_slice_code(copy, sha)

    def _load(self, artifact: Artifact) -> LoadedSlice:
        info, sha, code_dir = self._slice_code(artifact)
        owner = self._owner(artifact)
        space = self.space
        with self._planned(artifact, list(info.requirements)) as plan:
            libraries = self._commit_libraries(owner, plan)
            try:
                code = self._add_code(artifact, owner, sha, code_dir, info)
            except BaseException:
                self._release_libraries(owner)
                raise
        # the module's own code runs now, without the space's lock: code that blocks there (a
        # connection opened at import) held every other load and unload of the interpreter. What
        # the import needs is in place (its libraries and code on sys.path, its modules claimed,
        # its users recorded: nothing of it is removed meanwhile); Python's own module locks keep
        # two imports of one module apart.
        try:
            cls = self._import(artifact, code, info)
        except BaseException:
            with space.lock:
                self._release_code(owner, sha)
                self._release_libraries(owner)
            raise
        try:
            slice_info = describe_slice(cls)
        except SliceDefinitionError as e:
            self.unload(artifact, _force=(owner, sha))
            raise SliceLoadError(f"{artifact}: {e}") from None
        loaded = LoadedSlice(artifact, cls, slice_info, info, sha, code_dir, libraries)
        self._loaded[artifact] = loaded
        return loaded

    def prepare_isolated(self, artifact: Artifact) -> IsolatedCode:
        """Resolve, install (code and libraries) but do not import `artifact`: for a worker process,
        whose import space is its own. Raises SliceLoadError(reason)."""
        try:
            info, sha, code_dir = self._slice_code(artifact)
            worker_space = self.space.fresh(exclude=(self.store.libs_root, self.store.slices_root))
            # the space's lock held: no removal of stale directories between planning and holding
            with self._planned(artifact, list(info.requirements), worker_space) as plan:
                dirs = [p.directory for p in plan if p.directory is not None]
                with self.space.held_lock:
                    self.space.held[self._owner(artifact)] = tuple(dirs)
        except SliceLoadError:
            raise
        except Exception as e:
            raise SliceLoadError(f"{artifact} cannot be loaded: {type(e).__name__}: {e}") from e
        libraries = {p.name: str(p.version) for p in plan}
        assert info.slice_class is not None  # `_slice_code` refuses a wheel without one
        return IsolatedCode(artifact, info, sha, code_dir, info.slice_class, dirs, libraries)

    def release_isolated(self, artifact: Artifact) -> None:
        """The worker process `prepare_isolated(artifact)` prepared for is gone (or never started):
        its library directories may be removed once stale. Never blocks on a load in progress
        (the runtime calls it on its event loop)."""
        with self.space.held_lock:
            self.space.held.pop(self._owner(artifact), None)

    # --- libraries ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _planned(
        self, artifact: Artifact, requirements: list[Requirement], space: ImportSpace | None = None
    ) -> Iterator[list[_Planned]]:
        """The plan for `requirements`, every chosen library installed (`_Planned.directory`), with
        the import space's lock held until the block ends. What must be installed first (a wheel,
        pip from the index) is installed without the lock, then the plan is made again (what is
        loaded may have changed meanwhile); after `_INSTALL_ROUNDS` rounds, under the lock."""
        fetched: dict[str, Candidate] = {}
        round_ = 0
        while True:
            pending: list[Candidate | tuple[Requirement, dict[PepVersion, str]]] | None = (
                [] if round_ < self._INSTALL_ROUNDS else None
            )
            round_ += 1
            with self.space.lock:
                plan = self._plan(artifact, requirements, space, pending, fetched)
                if not pending:
                    for p in plan:
                        if p.candidate is not None:
                            p.directory = self.store.ensure(p.candidate)
                    yield plan
                    return
            for work in pending:  # without the lock: other loads and unloads go on meanwhile
                if isinstance(work, Candidate):
                    self.store.ensure(work)
                else:
                    req, gone = work
                    fetched[canonicalize_name(req.name)] = self.store.fetch_from_index(req, gone)

    _INSTALL_ROUNDS = 3  # plans whose installs run without the import space's lock, then one with it

    def _plan(
        self,
        artifact: Artifact,
        requirements: list[Requirement],
        space: ImportSpace | None = None,
        pending: list[Candidate | tuple[Requirement, dict[PepVersion, str]]] | None = None,
        fetched: dict[str, Candidate] | None = None,
    ) -> list[_Planned]:
        """Resolve `requirements` (with the space's lock held). With `pending`, install nothing:
        add to it each chosen wheel not installed yet, and each requirement pip must fetch from the
        index (with its withdrawn versions; its own requirements are planned once it is there).
        `fetched`: what earlier rounds fetched from the index, by name."""
        space = self.space if space is None else space
        fetched = fetched or {}
        to_fetch: set[str] = set()
        label = f"{artifact}"
        withdrawn: dict[str, dict[PepVersion, str]] | None = None  # read once, when first needed
        hashes: dict[str, dict[PepVersion, str]] = {}
        chosen: dict[str, _Planned] = {}
        queue: deque[tuple[Requirement, str]] = deque((r, label) for r in requirements)
        while queue:
            req, who = queue.popleft()
            name = canonicalize_name(req.name)
            prev = chosen.get(name)
            if prev is not None:
                if not _contains(req, prev.version):
                    raise SliceLoadError(
                        f"{artifact} cannot be loaded: {who} requires {req}, but {prev.requested_by} "
                        f"requires {prev.requirement} (resolved to {name} {prev.version})"
                    )
                continue
            loaded = space.libraries.get(name)
            if loaded is not None:
                if not _contains(req, loaded.version):
                    raise SliceConflict(
                        f"{artifact} cannot be loaded into the interpreter of {self.node_id}: {who} requires "
                        f"{req}, which conflicts with {loaded.describe()}"
                    )
                chosen[name] = _Planned(name, loaded.version, str(req), who, None, loaded.path is None)
                if req.extras and loaded.path is not None:
                    held = Candidate(name, loaded.version, directory=loaded.path)
                    queue.extend(
                        (r, f"{name} {loaded.version}") for r in self.store.requirements_of(held, req.extras)
                    )
                continue
            env = space.env_version(name)
            if env is not None:
                if not _contains(req, env):
                    raise SliceLoadError(
                        f"{artifact} cannot be loaded on {self.node_id}: {who} requires {req}, which "
                        f"conflicts with {name} {env} installed in the node's environment"
                    )
                chosen[name] = _Planned(name, env, str(req), who, None, from_env=True)
                continue
            if withdrawn is None:
                withdrawn = _by_name(self.repository.withdrawn_libraries())
                hashes = _hashes_by_name(self.repository.library_hashes())  # after: up to date
                self._sweep(withdrawn, hashes)
            gone = withdrawn.get(name, {})
            cand = self.store.best(req, gone, hashes.get(name))
            got = fetched.get(name)
            if cand is None and got is not None and got.version not in gone and _contains(req, got.version):
                cand = got if got.directory is not None and got.directory.is_dir() else None
            if cand is None and self.store.allow_index:
                if pending is not None:
                    if name not in to_fetch:
                        to_fetch.add(name)
                        pending.append((req, gone))
                    continue
                cand = self.store.fetch_from_index(req, gone)
            if cand is None:
                deleted = [gone[v] for v in sorted(req.specifier.filter(gone, prereleases=True))]
                if deleted:
                    raise SliceLoadError(
                        f"{artifact} cannot be loaded: {who} requires {req}, and "
                        f"{'; '.join(deleted)}; a copy of a withdrawn version this node keeps is not "
                        "installed: upload a matching wheel (aether artifact deploy WHEEL) to publish "
                        "it, or require another version"
                    )
                avail = self.store.available(name, gone, hashes.get(name))
                have = f"available: {', '.join(avail)}" if avail else "no version of it is there"
                raise SliceLoadError(
                    f"{artifact} cannot be loaded: {who} requires {req}, and no matching version is in the "
                    f"library store or the wheelhouse {self.store.wheelhouse} ({have}); deploy a matching "
                    "wheel with `aether artifact deploy WHEEL`"
                )
            chosen[name] = _Planned(name, cand.version, str(req), who, cand)
            if pending is not None and cand.directory is None:
                pending.append(cand)
            queue.extend((r, f"{name} {cand.version}") for r in self.store.requirements_of(cand, req.extras))
        return list(chosen.values())

    def _commit_libraries(self, owner: str, plan: list[_Planned]) -> dict[str, str]:
        used: dict[str, str] = {}
        added = False
        for p in plan:
            lib = self.space.libraries.get(p.name)
            if lib is None:
                path: Path | None = None
                if p.candidate is not None:
                    path = p.directory if p.directory is not None else self.store.ensure(p.candidate)
                    if str(path) not in sys.path:
                        sys.path.append(str(path))
                        added = True
                lib = LoadedLibrary(p.name, p.version, path, owner, p.requirement)
                self.space.libraries[p.name] = lib
            lib.users[owner] = p.requirement
            used[p.name] = str(lib.version)
        if added:
            importlib.invalidate_caches()
        return used

    def _sweep(
        self, withdrawn: dict[str, dict[PepVersion, str]], hashes: dict[str, dict[PepVersion, str]]
    ) -> None:
        """Remove this node's installed library directories no resolution uses again (withdrawn
        versions, other bytes than the repository's) that nothing may import from: on `sys.path`,
        a library loaded in the import space, or held for a worker process. Call with the import
        space's lock held."""
        stale = self.store.stale_directories(withdrawn, hashes)
        if not stale:
            return
        space = self.space
        in_use = set(sys.path)
        in_use.update(str(lib.path) for lib in space.libraries.values() if lib.path is not None)
        with space.held_lock:
            in_use.update(str(d) for dirs in space.held.values() for d in dirs)
        for d in stale:
            if str(d) in in_use:
                continue
            if self.store.remove_directory(d):
                _log.info("%s: removed %s: its library version was withdrawn or replaced", self.node_id, d)

    def _release_libraries(self, owner: str) -> None:
        for lib in self.space.libraries.values():
            lib.users.pop(owner, None)

    # --- code ---------------------------------------------------------------------------------------

    def _add_code(
        self, artifact: Artifact, owner: str, sha: str, code_dir: Path, info: WheelInfo
    ) -> LoadedCode:
        """Put the slice's code on sys.path (once per wheel) and claim its modules for `owner`
        (SliceConflict/SliceLoadError if another wheel or the process has them). With the space's
        lock held."""
        assert info.slice_class is not None
        module_name = info.slice_class.partition(":")[0]
        modules = tuple(sorted(set(info.top_level) | {module_name.split(".")[0]}))
        space = self.space
        for m in modules:
            other_sha = space.modules.get(m)
            if other_sha is not None and other_sha != sha:
                other = space.code[other_sha]
                raise SliceConflict(
                    f"{artifact} cannot be loaded into the interpreter of {self.node_id}: its module {m!r} "
                    f"is already loaded from another wheel ({other.label})"
                )
            if other_sha is None and m in sys.modules:
                where = getattr(sys.modules[m], "__file__", None) or "a built-in module"
                raise SliceLoadError(
                    f"{artifact} cannot be loaded: its module {m!r} clashes with the module of that name "
                    f"already imported in this process ({where}); rename the slice's package"
                )
        code = space.code.get(sha)
        if code is None:
            code = LoadedCode(sha, code_dir, modules, str(artifact))
            space.code[sha] = code
            for m in modules:
                space.modules[m] = sha
            sys.path.append(str(code_dir))
            importlib.invalidate_caches()
        code.users.add(owner)
        return code

    def _import(self, artifact: Artifact, code: LoadedCode, info: WheelInfo) -> type[Slice]:
        """Import the slice's module (its top-level code runs) and get its class. Without the
        space's lock; the caller releases the code and libraries if this raises."""
        assert info.slice_class is not None
        module_name, _, attr = info.slice_class.partition(":")
        try:
            module = importlib.import_module(module_name)
            mod_file = Path(getattr(module, "__file__", "") or "").resolve()
            if code.path.resolve() not in mod_file.parents:
                raise SliceLoadError(
                    f"{artifact}: module {module_name!r} was imported from {mod_file}, not from the slice's "
                    f"code ({code.path}); another module of that name shadows it"
                )
            obj: object = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except SliceLoadError:
            raise
        except AttributeError:
            raise SliceLoadError(f"{artifact}: module {module_name!r} has no attribute {attr!r}") from None
        except (Exception, SystemExit) as e:
            frames = traceback.extract_tb(e.__traceback__)
            where = ""
            if frames and not isinstance(e, SyntaxError):
                last = frames[-1]
                where = f" (at {last.filename}:{last.lineno})"
            raise SliceLoadError(
                f"{artifact}: importing {module_name} failed: {type(e).__name__}: {e}{where}"
            ) from None
        if not (isinstance(obj, type) and issubclass(obj, Slice)):
            raise SliceLoadError(
                f"{artifact}: {info.slice_class} is not a subclass of aether.slices.Slice (got {obj!r})"
            )
        return obj

    def _release_code(self, owner: str, sha: str) -> None:
        code = self.space.code.get(sha)
        if code is None:
            return
        code.users.discard(owner)
        if code.users:
            return
        del self.space.code[sha]
        for m in code.modules:
            if self.space.modules.get(m) == sha:
                del self.space.modules[m]
        # a new list, not removed in place: another thread may be importing (iterating sys.path)
        # meanwhile, a slice module's import runs without the lock, and an in-place removal made
        # that iteration skip the entry after the removed one
        sys.path = [p for p in sys.path if p != str(code.path)]
        _purge_modules(code.modules)
        importlib.invalidate_caches()

    def unload(self, artifact: Artifact, *, _force: tuple[str, str] | None = None) -> None:
        """Forget the slice: its code leaves sys.path/sys.modules when no other node uses it;
        its libraries stay on sys.path."""
        loaded = self._loaded.pop(artifact, None)
        if loaded is None and _force is None:
            return
        if loaded is not None:
            loaded.codecs.clear()  # whoever still holds the LoadedSlice does not hold its types
        owner, sha = _force if _force is not None else (self._owner(artifact), loaded.sha256)  # type: ignore[union-attr]
        with self.space.lock:
            self._release_code(owner, sha)
            self._release_libraries(owner)
