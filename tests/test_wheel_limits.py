"""Zip bombs: a wheel is refused before it is unpacked when its members add up to more than the
size limit (default 256 MiB) or more files than the file limit (default 10,000), and counting
while unpacking stops a wheel whose headers understate its size.

The wheels are built here: a valid slice or library wheel plus a few members of zeros, which
deflate about 1000:1 (a 300 MiB wheel is a file of a few hundred KB).
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aether.core.errors import ConfigError
from aether.slices import SliceLoadError
from aether.slices.errors import InvalidWheel, WheelTooLarge
from aether.slices.libstore import install_wheel
from aether.slices.loader import ImportSpace, SliceLoader
from aether.slices.repository import Repository
from aether.slices.testing import build_library_wheel, build_slice_wheel, isolated_imports
from aether.slices.wheel import (
    DEFAULT_MAX_WHEEL_FILES,
    WheelLimits,
    inspect_wheel,
)
from conftest import ProcessCluster, aether_cli, http_json

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
SRC = """
from aether.slices import Slice, entry

class Bomb(Slice):
    @entry
    async def hello(self) -> str:
        return "hi"
"""


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


def add_zeros(wheel: Path, members: int, size: int, prefix: str = "bomb_slice/zeros") -> Path:
    """Append `members` members of `size` zero bytes each (streamed: never all in memory)."""
    chunk = bytes(MiB)
    with zipfile.ZipFile(wheel, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(members):
            with zf.open(f"{prefix}{i}.bin", "w", force_zip64=True) as out:
                left = size
                while left > 0:
                    out.write(chunk[: min(left, MiB)])
                    left -= MiB
    return wheel


def bomb_slice(tmp: Path, coords: str = "org.bad:bomb:1.0.0", total: int = 300 * MiB) -> Path:
    w = build_slice_wheel(tmp, coords, SRC, "Bomb", module="bomb_slice")
    return add_zeros(w, 3, total // 3)


def many_files(tmp: Path, n: int) -> Path:
    w = build_slice_wheel(tmp, "org.bad:many:1.0.0", SRC, "Bomb", module="bomb_slice")
    with zipfile.ZipFile(w, "a") as zf:
        for i in range(n):
            zf.writestr(f"bomb_slice/f{i}.txt", b"")
    return w


def test_defaults_and_environment() -> None:
    assert WheelLimits() == WheelLimits(256 * MiB, 10_000)
    assert WheelLimits.from_env({}) == WheelLimits()
    env = {"AETHER_WHEEL_MAX_BYTES": "1000", "AETHER_WHEEL_MAX_FILES": "7"}
    assert WheelLimits.from_env(env) == WheelLimits(1000, 7)
    for bad in ("0", "-1", "lots"):
        with pytest.raises(ConfigError, match="AETHER_WHEEL_MAX_BYTES"):
            WheelLimits.from_env({"AETHER_WHEEL_MAX_BYTES": bad})


def test_a_zip_bomb_is_refused_by_the_repository(tmp_path: Path) -> None:
    w = bomb_slice(tmp_path / "w")
    assert w.stat().st_size < 2 * MiB  # small on disk, 300 MiB unpacked
    repo = Repository(tmp_path / "repo", wheel_limits=WheelLimits())
    with pytest.raises(WheelTooLarge) as e:
        repo.deploy_wheel(w)
    msg = str(e.value)
    assert str(w) in msg and f"limit of {256 * MiB} bytes" in msg and "AETHER_WHEEL_MAX_BYTES" in msg
    assert isinstance(e.value, InvalidWheel)  # a BadRequest: 400 through the API
    assert not repo.root.exists() or not list(repo.root.rglob("*.whl"))
    # the same wheel with a higher limit is an ordinary slice wheel
    assert inspect_wheel(w, limits=WheelLimits(max_bytes=400 * MiB)).coords is not None


def test_too_many_files_is_refused(tmp_path: Path) -> None:
    w = many_files(tmp_path / "w", DEFAULT_MAX_WHEEL_FILES)  # plus the wheel's own few files
    with pytest.raises(WheelTooLarge, match=rf"files, more than the limit of {DEFAULT_MAX_WHEEL_FILES} "
                                           r"\(AETHER_WHEEL_MAX_FILES\)"):
        inspect_wheel(w)
    assert inspect_wheel(w, limits=WheelLimits(max_files=20_000)).coords is not None


def test_limits_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = build_slice_wheel(tmp_path / "w", "org.ok:small:1.0.0", SRC, "Bomb", module="bomb_slice")
    add_zeros(w, 1, 2 * MiB)
    Repository(tmp_path / "repo").deploy(w)  # 2 MiB is fine by default
    monkeypatch.setenv("AETHER_WHEEL_MAX_BYTES", str(MiB))
    with pytest.raises(WheelTooLarge, match=rf"limit of {MiB} bytes"):
        Repository(tmp_path / "repo").deploy(w)


def test_cli_artifact_deploy_refuses_a_zip_bomb(tmp_path: Path) -> None:
    w = bomb_slice(tmp_path / "w")
    repo = tmp_path / "repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    r = aether_cli("artifact", "deploy", "--repository", str(repo), str(w), env=env, timeout=60)
    assert r.returncode != 0, r.stdout
    assert "the wheel unpacks to" in r.stderr and f"limit of {256 * MiB} bytes" in r.stderr, r.stderr
    assert w.name in r.stderr
    assert not repo.exists() or not list(repo.rglob("*.whl"))


def test_loader_refuses_a_bomb_placed_in_the_repository(tmp_path: Path) -> None:
    """A wheel copied into the repository by hand (not through deploy) is checked on load too."""
    repo = Repository(tmp_path / "repo", wheel_limits=WheelLimits())
    ok = build_slice_wheel(tmp_path / "ok", "org.bad:bomb:1.0.0", SRC, "Bomb", module="bomb_slice")
    a = repo.deploy(ok)
    placed = repo.resolve(a)
    shutil.copy(bomb_slice(tmp_path / "w"), placed)
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    limit = rf"unpacks to \d+ bytes, more than the limit of {256 * MiB}"
    with pytest.raises(SliceLoadError, match=limit) as ei:
        loader.load(a)
    assert str(ei.value).startswith(f"{placed}: ")  # the repository's file, not the loader's copy of it
    assert not (tmp_path / "data" / "slices").exists() or not any((tmp_path / "data" / "slices").iterdir())


def test_loader_refuses_a_library_bomb_from_the_wheelhouse(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", wheel_limits=WheelLimits(max_bytes=64 * MiB))
    lib = build_library_wheel(tmp_path / "lib", "biglib", "1.0")
    repo.deploy_library(lib)  # small when deployed ...
    shutil.copy(add_zeros(lib, 2, 40 * MiB, prefix="biglib/z"), repo.libs_dir / lib.name)  # ... swapped
    src = SRC.replace("from aether", "import biglib\nfrom aether")
    a = repo.deploy(build_slice_wheel(tmp_path / "s", "org.ok:uses:1.0.0", src, "Bomb", None, ["biglib"],
                                      module="uses_slice"))
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    with pytest.raises(SliceLoadError, match=rf"biglib-1.0-py3-none-any.whl: the wheel unpacks to \d+ bytes, "
                                             rf"more than the limit of {64 * MiB} bytes"):
        loader.load(a)
    libs = tmp_path / "data" / "libs"
    assert not libs.exists() or not any(libs.iterdir())  # no half-unpacked directory left


def _understate_sizes(wheel: Path, member: str, declared: int) -> None:
    """Rewrite `member`'s uncompressed size in its local and central headers (a lying header)."""
    data = bytearray(wheel.read_bytes())
    name = member.encode()
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = data.find(sig)
        while pos >= 0:
            name_at = pos + (30 if sig == b"PK\x03\x04" else 46)
            n = struct.unpack_from("<H", data, pos + (26 if sig == b"PK\x03\x04" else 28))[0]
            if bytes(data[name_at : name_at + n]) == name:
                struct.pack_into("<I", data, pos + size_at, declared)
            pos = data.find(sig, pos + 4)
    wheel.write_bytes(bytes(data))


def test_a_lying_header_does_not_unpack_past_its_declared_size(tmp_path: Path) -> None:
    w = build_library_wheel(tmp_path / "lib", "liar", "1.0")
    with zipfile.ZipFile(w, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar/zeros.bin", bytes(64 * MiB))  # no zip64 extra: sizes live in the headers
    _understate_sizes(w, "liar/zeros.bin", 1000)
    with zipfile.ZipFile(w) as zf:
        assert zf.getinfo("liar/zeros.bin").file_size == 1000  # the declared sizes pass the check
        WheelLimits(max_bytes=MiB).check(zf, w)
    target = tmp_path / "libs" / "liar==1.0"
    with pytest.raises(SliceLoadError, match="damaged wheel"):
        install_wheel(w, target, limits=WheelLimits(max_bytes=MiB))
    assert not target.exists() and not list((tmp_path / "libs").iterdir())


def test_counting_while_unpacking_stops_at_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the declared sizes be fooled, the bytes actually written are counted too."""
    w = add_zeros(build_library_wheel(tmp_path / "lib", "biglib", "1.0"), 1, 8 * MiB, prefix="biglib/z")
    monkeypatch.setattr(WheelLimits, "check", lambda self, zf, path: None)
    target = tmp_path / "libs" / "biglib==1.0"
    with pytest.raises(SliceLoadError, match=rf"unpacks to more than {2 * MiB} bytes, the limit"):
        install_wheel(w, target, limits=WheelLimits(max_bytes=2 * MiB))
    with pytest.raises(SliceLoadError, match=r"more than 2 files, the limit \(AETHER_WHEEL_MAX_FILES\)"):
        install_wheel(w, target, limits=WheelLimits(max_files=2))
    assert not target.exists() and not list((tmp_path / "libs").iterdir())


def test_management_api_deploy_of_a_zip_bomb_is_a_400(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    """A bomb put into the repository past the CLI (here: deployed with a higher limit) is read by
    the node when a deploy names it: 400 naming the wheel and the limit, nothing deployed."""
    c = make_process_cluster(1, start=False)
    c.env = {k: v for k, v in c.env.items() if not k.startswith("AETHER_WHEEL_")}  # the defaults
    lenient = Repository(c.repository, wheel_limits=WheelLimits(max_bytes=1024 * MiB))
    lenient.deploy(bomb_slice(tmp_path / "w"))
    c.start_all()
    c.wait_quorum(20)
    port = c.management_ports[0]
    body = {"artifact": "org.bad:bomb:1.0.0", "instances": 1}
    status, doc = http_json(port, "POST", "/api/v1/deploy", body)
    assert status == 400, doc
    assert f"more than the limit of {256 * MiB} bytes (AETHER_WHEEL_MAX_BYTES)" in doc["detail"], doc
    assert "bomb" in doc["detail"] and ".whl" in doc["detail"]
    assert http_json(port, "GET", "/api/v1/blueprints")[1] == []


def test_install_directories_a_killed_process_left_are_removed_at_the_next_start(tmp_path: Path) -> None:
    """`install_wheel` unpacks into a ``.tmp-*`` directory beside the target and renames it into
    place; a process killed meanwhile left it there for good (a slice's libraries: up to the wheel
    limit, per kill). The node's next start removes those older than `LEFTOVER_AGE`, and leaves a
    young one (an install another runtime on the directory may be running) and everything else."""
    from aether.slices.libstore import LibraryStore

    data = tmp_path / "runtime"
    old_lib = data / "libs" / ".tmp-numpy==2.0-abc"
    old_slice = data / "slices" / ".tmp-0123abcd-xyz"
    young = data / "libs" / ".tmp-attrs==23.1-def"
    kept = [data / "libs" / "attrs==23.1", data / "slices" / "0123abcd"]
    for d in (old_lib, old_slice, young, *kept):
        (d / "pkg").mkdir(parents=True)
        (d / "pkg" / "__init__.py").write_text("x = 1\n")
    hour_ago = os.stat(young).st_mtime - 3600
    for d in (old_lib, old_slice):
        os.utime(d, (hour_ago, hour_ago))
    store = LibraryStore(data, None)
    assert store.removed_leftovers == 2
    assert not old_lib.exists() and not old_slice.exists()
    assert young.exists() and all(d.exists() for d in kept)
    assert LibraryStore(tmp_path / "fresh", None).removed_leftovers == 0  # no directories yet
