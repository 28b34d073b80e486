"""Loader and library store: slices importing libraries from the wheelhouse, sharing, conflicts."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version as PepVersion

from aether.core.artifact import Artifact
from aether.slices import SliceLoadError
from aether.slices.libstore import Candidate
from aether.slices.loader import ImportSpace, LoadedSlice, SliceLoader
from aether.slices.repository import Repository
from aether.slices.testing import build_library_wheel, build_slice_wheel, isolated_imports
from aether.slices.wheel import sha256_file

pytestmark = pytest.mark.timeout(60)

USES_TINYLIB = """
import tinylib
from aether.slices import Slice, entry

class Uses(Slice):
    @entry
    async def version(self) -> str:
        return tinylib.__version__
"""


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo")
    wh = tmp_path / "built"
    for v in ("1.0", "2.0"):
        r.deploy_library(build_library_wheel(wh / v, "tinylib", v))
    # toplib 1.0 needs tinylib>=2 (a transitive requirement)
    r.deploy_library(
        build_library_wheel(
            wh / "top",
            "toplib",
            "1.0",
            {"toplib/__init__.py": "import tinylib\nTINY = tinylib.__version__\n"},
            requires=["tinylib>=2"],
        )
    )  # fmt: skip
    return r


def deploy(repo: Repository, tmp: Path, coords: str, src: str, requires: list[str], **kw: object) -> Artifact:
    return repo.deploy(
        build_slice_wheel(tmp / coords.replace(":", "_"), coords, src, "Uses", None, requires, **kw)
    )  # type: ignore[arg-type]


def lib_dir(repo: Repository, data: Path, name: str, version: str) -> Path:
    """Where the store installs the wheelhouse's `name` `version`: `libs/{name}=={version}@{sha256}`."""
    wheel = repo.libs_dir / f"{name}-{version}-py3-none-any.whl"
    return data / "libs" / f"{name}=={version}@{sha256_file(wheel)}"


def tinylib_paths() -> list[str]:
    return [p for p in sys.path if "tinylib==" in p]


def version_of(loaded_cls: type) -> str:
    import asyncio

    return asyncio.run(loaded_cls().version())  # type: ignore[no-any-return, attr-defined]


def test_slice_imports_library_from_wheelhouse(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    ls = loader.load(a)
    assert version_of(ls.cls) == "1.0"
    assert ls.libraries == {"tinylib": "1.0"}
    assert (lib_dir(repo, tmp_path / "data", "tinylib", "1.0") / "tinylib/__init__.py").is_file()
    assert (tmp_path / f"data/slices/{ls.sha256}/a_slice/__init__.py").is_file()
    assert ls.code_dir == tmp_path / f"data/slices/{ls.sha256}"
    assert set(ls.info.entries) == {"version"}
    assert loader.load(a) is ls  # idempotent


def test_highest_matching_version_is_chosen(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib>=1"], module="a_slice")
    ls = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(a)
    assert version_of(ls.cls) == "2.0"


def test_compatible_slices_share_one_version(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib==1.0"], module="a_slice")
    b = deploy(repo, tmp_path, "org.example:b:1.0.0", USES_TINYLIB, ["tinylib>=1.0"], module="b_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    la, lb = loader.load(a), loader.load(b)
    # b would get 2.0 on its own, but shares the 1.0 already loaded
    assert version_of(la.cls) == version_of(lb.cls) == "1.0"
    assert lb.libraries == {"tinylib": "1.0"}
    assert len(tinylib_paths()) == 1
    assert not list((tmp_path / "data/libs").glob("tinylib==2.0*"))


def test_conflicting_slice_fails_naming_both_requirements(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib==1.0"], module="a_slice")
    c = deploy(repo, tmp_path, "org.example:c:1.0.0", USES_TINYLIB, ["tinylib>=2"], module="c_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    loader.load(a)
    with pytest.raises(SliceLoadError) as ei:
        loader.load(c)
    msg = ei.value.reason
    assert "org.example:c:1.0.0" in msg and "tinylib>=2" in msg
    assert "org.example:a:1.0.0" in msg and "tinylib==1.0" in msg
    assert "tinylib 1.0" in msg
    assert "c_slice" not in sys.modules
    # libraries stay loaded after unloading the slice that brought them (documented)
    loader.unload(a)
    with pytest.raises(SliceLoadError, match=r"tinylib==1\.0"):
        loader.load(c)


def test_conflict_across_nodes_in_one_process(repo: Repository, tmp_path: Path) -> None:
    space = ImportSpace()
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib==1.0"], module="a_slice")
    c = deploy(repo, tmp_path, "org.example:c:1.0.0", USES_TINYLIB, ["tinylib>=2"], module="c_slice")
    SliceLoader("node-1", repo, tmp_path / "d1", space=space).load(a)
    with pytest.raises(SliceLoadError, match=r"org\.example:a:1\.0\.0 on node-1"):
        SliceLoader("node-2", repo, tmp_path / "d2", space=space).load(c)


def test_transitive_requirements(repo: Repository, tmp_path: Path) -> None:
    src = USES_TINYLIB.replace("return tinylib.__version__", "import toplib\n        return toplib.TINY")
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", src, ["toplib"], module="a_slice")
    ls = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(a)
    assert version_of(ls.cls) == "2.0"
    assert ls.libraries == {"toplib": "1.0", "tinylib": "2.0"}


def test_transitive_conflict_within_one_slice(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2", "toplib"], module="a_slice")
    with pytest.raises(SliceLoadError) as ei:
        SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(a)
    assert "toplib 1.0 requires tinylib>=2" in ei.value.reason and "tinylib<2" in ei.value.reason


def test_missing_library_lists_available(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib>=3"], module="a_slice")
    with pytest.raises(SliceLoadError) as ei:
        SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(a)
    assert "tinylib>=3" in ei.value.reason and "available: 2.0, 1.0" in ei.value.reason
    assert "aether artifact deploy" in ei.value.reason


def test_environment_distributions_are_used_or_conflict(repo: Repository, tmp_path: Path) -> None:
    ok = deploy(
        repo,
        tmp_path,
        "org.example:a:1.0.0",
        USES_TINYLIB,
        ["tinylib==1.0", "msgspec>=0.1"],
        module="a_slice",
    )
    ls = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(ok)
    assert "msgspec" in ls.libraries and not list((tmp_path / "data/libs").glob("msgspec*"))
    bad = deploy(repo, tmp_path, "org.example:b:1.0.0", USES_TINYLIB, ["msgspec<0.1"], module="b_slice")
    with pytest.raises(SliceLoadError, match=r"msgspec<0\.1.*node's environment"):
        SliceLoader("node-1", repo, tmp_path / "data2", space=ImportSpace()).load(bad)


def test_two_versions_of_one_slice_cannot_share_a_process(repo: Repository, tmp_path: Path) -> None:
    v1 = USES_TINYLIB.replace("return tinylib.__version__", "return 'v1'")
    v2 = USES_TINYLIB.replace("return tinylib.__version__", "return 'v2'")
    a1 = deploy(repo, tmp_path, "org.example:a:1.0.0", v1, ["tinylib"], module="a_slice")
    a2 = deploy(repo, tmp_path, "org.example:a:1.1.0", v2, ["tinylib"], module="a_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    assert version_of(loader.load(a1).cls) == "v1"
    with pytest.raises(SliceLoadError, match=r"module 'a_slice' is already loaded .*org\.example:a:1\.0\.0"):
        loader.load(a2)
    loader.unload(a1)
    assert "a_slice" not in sys.modules
    assert version_of(loader.load(a2).cls) == "v2"


def test_same_wheel_on_two_nodes_in_one_process(repo: Repository, tmp_path: Path) -> None:
    space = ImportSpace()
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib"], module="a_slice")
    l1 = SliceLoader("node-1", repo, tmp_path / "d1", space=space)
    l2 = SliceLoader("node-2", repo, tmp_path / "d2", space=space)
    c1, c2 = l1.load(a).cls, l2.load(a).cls
    assert c1 is c2
    l1.unload(a)
    assert "a_slice" in sys.modules  # node-2 still uses it
    l2.unload(a)
    assert "a_slice" not in sys.modules
    assert not [p for p in sys.path if "/slices/" in p and str(tmp_path) in p]


def test_an_unload_does_not_disturb_an_import_walking_sys_path(repo: Repository, tmp_path: Path) -> None:
    """A slice module's import runs without the import space's lock (so that one whose code
    blocks does not hold the other slices' loads and unloads), so an unload may happen while
    another thread's import walks `sys.path` (importlib's PathFinder: `for entry in sys.path`).
    The unload removed its code directory in place: the walk then skipped the entry after it."""
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib"], module="a_slice")
    b = deploy(repo, tmp_path, "org.example:b:1.0.0", USES_TINYLIB, ["tinylib"], module="b_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    a_dir, b_dir = str(loader.load(a).code_dir), str(loader.load(b).code_dir)
    assert sys.path[-2:] == [a_dir, b_dir]
    walk = iter(sys.path)  # an import in another thread, looking in a's directory
    for p in walk:
        if p == a_dir:
            break
    loader.unload(a)
    assert a_dir not in sys.path
    assert list(walk) == [b_dir]  # the walk goes on with the entry after a's


@pytest.mark.parametrize(
    ("src", "needle"),
    [
        ("raise RuntimeError('boom at import')", "importing a_slice failed: RuntimeError: boom at import"),
        ("import not_a_module_anywhere", "No module named 'not_a_module_anywhere'"),
        ("class Uses:\n    pass", "is not a subclass of aether.slices.Slice"),
        ("X = 1", "has no attribute 'Uses'"),
        (
            "from aether.slices import Slice, entry\nclass Uses(Slice):\n    @entry\n"
            "    async def f(self, x) -> int:\n        return 1",
            "parameter 'x' has no type annotation",
        ),
    ],
)
def test_bad_slice_code(repo: Repository, tmp_path: Path, src: str, needle: str) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", src, [], module="a_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    with pytest.raises(SliceLoadError) as ei:
        loader.load(a)
    assert needle in ei.value.reason
    assert "org.example:a:1.0.0" in ei.value.reason
    assert "a_slice" not in sys.modules
    assert loader.space.code == {} and loader.space.modules == {}


def test_module_shadowing_an_existing_module_is_refused(repo: Repository, tmp_path: Path) -> None:
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib"], module="json")
    with pytest.raises(SliceLoadError, match="clashes with the module of that name"):
        SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(a)


def test_missing_artifact(repo: Repository, tmp_path: Path) -> None:
    deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, [], module="a_slice")
    with pytest.raises(SliceLoadError, match=r"available versions of org\.example:a: 1\.0\.0"):
        SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace()).load(
            Artifact.parse("org.example:a:2.0.0")
        )


@pytest.mark.slow
def test_pip_installer(repo: Repository, tmp_path: Path) -> None:
    """The pip path (`pip install --no-deps --target ... --no-index`) gives the same layout."""
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    ls = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace(), installer="pip").load(a)
    assert version_of(ls.cls) == "1.0"
    assert list(lib_dir(repo, tmp_path / "data", "tinylib", "1.0").glob("tinylib-1.0.dist-info"))
    assert (tmp_path / f"data/slices/{ls.sha256}/a_slice/__init__.py").is_file()


class Withdrawing(Repository):
    """A directory repository whose withdrawn library versions the test sets (as the cluster's
    repository withdraws the versions it deleted)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.withdrawn: dict[tuple[str, str], str] = {}

    def withdrawn_libraries(self) -> dict[tuple[str, str], str]:
        return dict(self.withdrawn)


def test_installed_directories_of_a_withdrawn_version_go_once_nothing_uses_them(tmp_path: Path) -> None:
    """Seen: the directories a node installed library versions into stayed on disk for ever, also
    those of versions the repository withdrew (deleted from the cluster), which no resolution
    uses again. Now the resolution that reads the withdrawn versions removes them, but not one a
    slice in this interpreter imports from (on sys.path) nor one a worker process holds."""
    repo = Withdrawing(tmp_path / "repo")
    for v in ("1.0", "2.0"):
        repo.deploy_library(build_library_wheel(tmp_path / "built" / v, "tinylib", v))
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib==1.0"], module="a_slice")
    c = deploy(repo, tmp_path, "org.example:c:1.0.0", USES_TINYLIB, ["tinylib>=2"], module="c_slice")
    later = ImportSpace()  # before anything is on sys.path (its environment is sys.path as it is)
    worker = SliceLoader("node-2", repo, tmp_path / "d2", space=ImportSpace())
    SliceLoader("node-1", repo, tmp_path / "d1", space=ImportSpace()).load(a)
    held = worker.prepare_isolated(a).library_dirs[0]
    used = lib_dir(repo, tmp_path / "d1", "tinylib", "1.0")
    assert used.is_dir() and held == lib_dir(repo, tmp_path / "d2", "tinylib", "1.0")

    repo.withdrawn = {("tinylib", "1.0"): "tinylib 1.0 was deleted"}
    # on sys.path (a slice of this interpreter imports from it) / held for a running worker: kept
    SliceLoader("node-1", repo, tmp_path / "d1", space=later).prepare_isolated(c)
    assert worker.prepare_isolated(c).libraries == {"tinylib": "2.0"}
    assert used.is_dir() and held.is_dir()
    # the worker is gone: the next resolution removes the directory, and only it
    worker.release_isolated(a)
    assert worker.prepare_isolated(c).libraries == {"tinylib": "2.0"}
    assert not held.exists()
    assert [d.name for d in (tmp_path / "d2" / "libs").iterdir()] == [
        lib_dir(repo, tmp_path / "d2", "tinylib", "2.0").name
    ]
    assert used.is_dir()
    with pytest.raises(SliceLoadError, match=r"tinylib 1\.0 was deleted"):
        worker.prepare_isolated(a)


def test_releasing_a_worker_s_directories_does_not_wait_for_a_load_in_progress(tmp_path: Path) -> None:
    """The runtime releases a worker's library directories on its event loop, while a load in a
    thread may hold the import space's lock and wait for that loop (a read of the cluster's
    repository): the release must not wait for the lock (it would deadlock the node)."""
    import threading
    import time

    space = ImportSpace()
    loader = SliceLoader("node-1", Repository(tmp_path / "repo"), tmp_path / "data", space=space)
    holding, done = threading.Event(), threading.Event()

    def load_in_progress() -> None:
        with space.lock:
            holding.set()
            done.wait(3)

    t = threading.Thread(target=load_in_progress)
    t.start()
    try:
        assert holding.wait(3)
        t0 = time.monotonic()
        loader.release_isolated(Artifact.parse("org.example:a:1.0.0"))
        assert time.monotonic() - t0 < 1.0
    finally:
        done.set()
        t.join()


def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, versions: list[str]) -> None:
    """A package index of `name`'s `versions` in a directory, pip's index for the test (no network)."""
    index = tmp_path / "index"
    links = []
    index.mkdir()
    for v in versions:
        w = build_library_wheel(tmp_path / "idx" / v, name, v)
        shutil.copy(w, index / w.name)
        links.append(f'<a href="../../{w.name}">{w.name}</a>')
    (index / "simple" / name).mkdir(parents=True)
    (index / "simple" / name / "index.html").write_text(f"<html><body>{''.join(links)}</body></html>")
    monkeypatch.setenv("PIP_INDEX_URL", (index / "simple").as_uri() + "/")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


@pytest.mark.timeout(120)
def test_pip_never_installs_a_withdrawn_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen: with `allow_index=True` and only withdrawn versions matching, the store asked pip for
    the bare requirement with `--find-links _libs/`: pip installed the withdrawn version, from the
    wheel the node keeps in `_libs/` (or from the index). Now pip gets no `--find-links` and the
    requirement excludes the withdrawn versions (`!=1.0`): it installs another matching version
    from the index (here a local one: no network)."""
    repo = Withdrawing(tmp_path / "repo")
    for v in ("1.0", "2.0"):
        repo.deploy_library(build_library_wheel(tmp_path / "built" / v, "tinylib", v))
    repo.withdrawn = {("tinylib", "1.0"): "tinylib 1.0 was deleted"}
    local_index(tmp_path, monkeypatch, "tinylib", ["0.9", "1.0"])
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace(), allow_index=True)
    ls = loader.load(a)
    assert ls.libraries == {"tinylib": "0.9"} and version_of(ls.cls) == "0.9"
    assert loader.store.index_requirement(Requirement("tinylib<2"), [PepVersion("1.0")]) == "tinylib!=1.0,<2"


def test_a_library_directory_holds_the_bytes_its_name_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen (review): `LibraryStore.ensure` hashed the wheelhouse's wheel and then installed from
    its path: a fetch replacing the file in between gave `libs/tinylib==1.0@{old sha256}` the new
    bytes. Now it installs a private copy, hashed while copied; a wheel chosen for the repository's
    sha256 whose bytes changed since is refused."""
    from aether.slices import libstore

    old = build_library_wheel(tmp_path / "old", "tinylib", "1.0")
    new = build_library_wheel(
        tmp_path / "new", "tinylib", "1.0", {"tinylib/__init__.py": '__version__ = "new"\n'}
    )
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel = wheelhouse / old.name
    shutil.copy(old, wheel)

    def fetch() -> None:  # a fetch replaces the wheel (written beside it, renamed over it)
        shutil.copy(new, wheelhouse / ".incoming")
        os.replace(wheelhouse / ".incoming", wheel)

    real_install = libstore.install_wheel

    def install_after_a_fetch(w: Path, target: Path, **kw: object) -> None:
        fetch()
        real_install(w, target, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(libstore, "install_wheel", install_after_a_fetch)
    store = libstore.LibraryStore(tmp_path / "data", wheelhouse)
    (cand,) = store.candidates("tinylib")
    d = store.ensure(cand)
    assert d == store.directory_for("tinylib", PepVersion("1.0"), sha256_file(old))
    assert (d / "tinylib/__init__.py").read_text() == '__version__ = "1.0"\n'
    monkeypatch.undo()

    other = libstore.LibraryStore(tmp_path / "data2", wheelhouse)  # the wheel holds `new` now
    chosen = libstore.Candidate("tinylib", PepVersion("1.0"), wheel=wheel, sha256=sha256_file(old))
    with pytest.raises(SliceLoadError, match=r"tinylib 1\.0: .* changed meanwhile"):
        other.ensure(chosen)
    assert [p.name for p in (tmp_path / "data2" / "libs").iterdir()] == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("withdrawn", "installed"), [("1.0", "1.0+local"), ("1.0+local", "1.0")])
def test_pip_excludes_exactly_the_withdrawn_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, withdrawn: str, installed: str
) -> None:
    """Seen (review): a withdrawn 1.0 was excluded from pip's requirement as `!=1.0`, which (PEP 440:
    a candidate's local label is ignored against a public version) excludes 1.0+local too, another
    version the repository did not withdraw: pip installed 0.9. Now a public version is excluded only
    once a dry run shows pip would choose it, which it does not while 1.0+local is there."""
    repo = Withdrawing(tmp_path / "repo")
    repo.deploy_library(build_library_wheel(tmp_path / "built", "tinylib", "2.0"))
    repo.withdrawn = {("tinylib", withdrawn): f"tinylib {withdrawn} was deleted"}
    local_index(tmp_path, monkeypatch, "tinylib", ["0.9", "1.0", "1.0+local"])
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    ls = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace(), allow_index=True).load(a)
    assert ls.libraries == {"tinylib": installed} and version_of(ls.cls) == installed


NO_LIBRARY = """
from aether.slices import Slice, entry

class Uses(Slice):
    @entry
    async def version(self) -> str:
        return "none"
"""


class SlowInstalls:
    """`install_wheel` of the library store counted per target, blocked for `name`'s directories
    until `release` is set (a slow install, e.g. pip)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        from aether.slices import libstore

        self.name = name
        self.started, self.release = threading.Event(), threading.Event()
        self.targets: list[str] = []
        real = libstore.install_wheel

        def install(wheel: Path, target: Path, **kw: object) -> None:
            self.targets.append(target.name)
            if target.name.startswith(f"{name}=="):
                self.started.set()
                assert self.release.wait(30)
            real(wheel, target, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(libstore, "install_wheel", install)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # the test looks at it
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_slow_library_install_does_not_hold_other_loads(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen (review): a load installed its libraries (pip can take minutes) with the import space's
    lock held, so every other load and unload of the process waited for it. Now the installs run
    without the lock; the plan is made again once they are done."""
    repo.deploy_library(build_library_wheel(tmp_path / "other", "otherlib", "1.0"))
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    b = deploy(repo, tmp_path, "org.example:b:1.0.0", NO_LIBRARY, ["otherlib"], module="b_slice")
    slow = SlowInstalls(monkeypatch, "tinylib")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    ta, got_a = in_thread(lambda: loader.load(a))
    try:
        assert slow.started.wait(10)
        tb, got_b = in_thread(lambda: (loader.load(b).libraries, loader.unload(b)))
        tb.join(10)
        assert not tb.is_alive(), "a load waited for another load's library install"
        assert got_b == [({"otherlib": "1.0"}, None)]
    finally:
        slow.release.set()
        ta.join(10)
    (ls,) = got_a
    assert isinstance(ls, LoadedSlice) and version_of(ls.cls) == "1.0"


def test_two_loads_that_need_one_library_install_it_once(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installs run without the import space's lock: a second load that needs a library while the
    first installs it waits for that install (not for the lock) and uses its directory."""
    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    a2 = deploy(repo, tmp_path, "org.example:a2:1.0.0", USES_TINYLIB, ["tinylib==1.0"], module="a2_slice")
    slow = SlowInstalls(monkeypatch, "tinylib")
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    second = threading.Event()
    real_ensure = loader.store.ensure

    def ensure(cand: Candidate) -> Path:
        if threading.current_thread() is not ta:
            second.set()
        return real_ensure(cand)

    monkeypatch.setattr(loader.store, "ensure", ensure)
    ta, got_a = in_thread(lambda: loader.load(a))
    try:
        assert slow.started.wait(10)
        tb, got_b = in_thread(lambda: loader.load(a2))
        assert second.wait(10), "the second load did not get to install (it waited for the lock)"
    finally:
        slow.release.set()
        ta.join(10)
    tb.join(10)
    assert [type(x) for x in got_a + got_b] == [LoadedSlice, LoadedSlice]
    installed = [t for t in slow.targets if t.startswith("tinylib==")]
    assert installed == [lib_dir(repo, tmp_path / "data", "tinylib", "1.0").name]


def test_a_slice_code_directory_holds_the_bytes_its_name_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for libraries: the loader hashed the slice's wheel, then the store installed it from its
    path: a wheel replaced in between (the artifact deployed again with other bytes and fetched)
    gave `slices/{old sha256}` the new code. Now the store installs a private copy it hashed."""
    from aether.slices import libstore

    def build(src: str, where: str) -> Path:
        coords = "org.example:a:1.0.0"
        return build_slice_wheel(tmp_path / where, coords, src, "Uses", None, [], module="a_slice")

    old, new = build(USES_TINYLIB, "old"), build(NO_LIBRARY, "new")
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / old.name
    shutil.copy(old, wheel)
    real_install = libstore.install_wheel

    def install_after_a_fetch(w: Path, target: Path, **kw: object) -> None:
        shutil.copy(new, cache / ".incoming")
        os.replace(cache / ".incoming", wheel)
        real_install(w, target, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(libstore, "install_wheel", install_after_a_fetch)
    store = libstore.LibraryStore(tmp_path / "data", None)
    d = store.install_slice_code(wheel, sha256_file(old))
    assert d == tmp_path / "data" / "slices" / sha256_file(old)
    assert "tinylib" in (d / "a_slice" / "__init__.py").read_text()
    monkeypatch.undo()
    with pytest.raises(SliceLoadError, match=r"changed meanwhile"):  # the wheel holds `new` now
        libstore.LibraryStore(tmp_path / "data2", None).install_slice_code(wheel, sha256_file(old))


@pytest.mark.parametrize("isolated", [False, True], ids=["load", "prepare_isolated"])
def test_a_slice_is_described_and_installed_from_the_same_bytes(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: bool
) -> None:
    """Seen (review): the loader read the slice's wheel three times: its declarations
    (`inspect_wheel`), its sha256, then its code (unless `slices/{sha256}` was there already). A
    wheel replaced after the first read (the same version deployed again and fetched) gave a
    slice the class and requirements of the old bytes and the code of the new ones. Now all
    three come from one private copy of the wheel, hashed while copied."""
    from aether.slices import loader as loader_mod

    a = deploy(repo, tmp_path, "org.example:a:1.0.0", USES_TINYLIB, ["tinylib<2"], module="a_slice")
    wheel = repo.resolve(a)
    old = tmp_path / "old.whl"
    shutil.copy(wheel, old)
    new = build_slice_wheel(
        tmp_path / "new", "org.example:a:1.0.0", NO_LIBRARY, "Uses", None, [], module="a_slice"
    )  # fmt: skip
    assert new.name == wheel.name and sha256_file(new) != sha256_file(old)
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    loader.store.install_slice_code(new, sha256_file(new))  # the new bytes' code is there already
    real_inspect = loader_mod.inspect_wheel

    def inspect_then_a_fetch(path: Path, *args: object, **kw: object) -> object:
        info = real_inspect(path, *args, **kw)  # type: ignore[arg-type]
        shutil.copy(new, wheel.parent / ".incoming")  # written beside it, renamed over it
        os.replace(wheel.parent / ".incoming", wheel)
        return info

    monkeypatch.setattr(loader_mod, "inspect_wheel", inspect_then_a_fetch)
    if isolated:
        code = loader.prepare_isolated(a)
        sha, code_dir, info, libraries = code.sha256, code.code_dir, code.wheel, code.libraries
    else:
        ls = loader.load(a)
        sha, code_dir, info, libraries = ls.sha256, ls.code_dir, ls.wheel, ls.libraries
        assert version_of(ls.cls) == "1.0"
    assert sha256_file(wheel) == sha256_file(new)  # the file was replaced meanwhile
    assert sha == sha256_file(old)
    assert code_dir == tmp_path / "data" / "slices" / sha
    assert "tinylib" in (code_dir / "a_slice" / "__init__.py").read_text()
    assert [str(r) for r in info.requirements] == ["tinylib<2"]
    assert libraries == {"tinylib": "1.0"}
    assert not list((tmp_path / "data" / "slices").glob(".tmp-*"))  # the copy is gone


def test_two_loads_that_fetch_one_requirement_from_the_index_run_pip_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index fetches run without the import space's lock too: a second fetch of the same
    requirement while the first runs waits for it and uses its directory (pip runs once)."""
    from aether.slices import libstore

    store = libstore.LibraryStore(tmp_path / "data", None, allow_index=True)
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def pip_fetch(req: Requirement, withdrawn: object) -> Candidate:
        runs.append(str(req))
        started.set()
        assert release.wait(30)
        d = store.directory_for("tinylib", PepVersion("1.0"))
        d.mkdir(parents=True, exist_ok=True)
        return Candidate("tinylib", PepVersion("1.0"), directory=d)

    waiting = threading.Event()
    real_lock = store._install_lock
    asked: list[str] = []

    def install_lock(key: str) -> threading.Lock:
        asked.append(key)
        if len(asked) == 2:
            waiting.set()
        return real_lock(key)

    monkeypatch.setattr(store, "_fetch_from_index", pip_fetch)
    monkeypatch.setattr(store, "_install_lock", install_lock)
    first, got_first = in_thread(lambda: store.fetch_from_index(Requirement("tinylib<2")))
    try:
        assert started.wait(10)
        second, got_second = in_thread(lambda: store.fetch_from_index(Requirement("tinylib<2")))
        assert waiting.wait(10)  # the second fetch waits for the first
    finally:
        release.set()
        first.join(10)
    second.join(10)
    d = store.directory_for("tinylib", PepVersion("1.0"))
    assert got_first == got_second == [Candidate("tinylib", PepVersion("1.0"), directory=d)]
    assert runs == ["tinylib<2"]
