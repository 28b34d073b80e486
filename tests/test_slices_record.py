"""Wheel integrity: a wheel whose members do not match its `*.dist-info/RECORD` is refused.

Every member but RECORD (and its signatures) must be listed there with a SHA-256 (or stronger)
hash and its size; the check runs while the wheel is unpacked (pure wheels) or before it is
handed to pip (other wheels), and the error names the wheel and the member.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aether.slices import SliceLoadError
from aether.slices.errors import InvalidWheel, WheelRecordMismatch
from aether.slices.libstore import install_wheel, unpack_pure_wheel
from aether.slices.loader import ImportSpace, SliceLoader
from aether.slices.repository import Repository
from aether.slices.testing import build_library_wheel, build_slice_wheel, isolated_imports

pytestmark = pytest.mark.timeout(60)

SRC = """
from aether.slices import Slice, entry

class Signed(Slice):
    @entry
    async def hello(self) -> str:
        return "hi"
"""


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


def _b64(data: bytes, algo: str = "sha256") -> str:
    return base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()


def rewrite(wheel: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """Rewrite the wheel with `change` applied to its members (name -> bytes), RECORD included."""
    with zipfile.ZipFile(wheel) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    change(members)
    wheel.unlink()
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    return wheel


def record_of(members: dict[str, bytes]) -> str:
    (name,) = [n for n in members if n.endswith(".dist-info/RECORD")]
    return name


def tamper(path: str, data: bytes) -> Callable[[dict[str, bytes]], None]:
    def change(members: dict[str, bytes]) -> None:
        assert path in members
        members[path] = data

    return change


def test_a_tampered_slice_wheel_is_not_loaded(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    a = repo.deploy(build_slice_wheel(tmp_path / "w", "org.ok:signed:1.0.0", SRC, "Signed", module="signed"))
    placed = repo.resolve(a)
    evil = SRC.replace('return "hi"', 'return "pwned"')
    rewrite(placed, tamper("signed/__init__.py", evil.encode()))  # the repository's copy, changed by hand
    loader = SliceLoader("node-1", repo, tmp_path / "data", space=ImportSpace())
    with pytest.raises(SliceLoadError) as e:
        loader.load(a)
    msg = str(e.value)
    assert placed.name in msg and "signed/__init__.py does not match its hash in" in msg, msg
    assert "RECORD" in msg and "refusing to install it" in msg
    slices = tmp_path / "data" / "slices"
    assert not slices.exists() or not any(slices.iterdir())  # nothing unpacked is left
    assert "signed" not in __import__("sys").modules


def test_an_intact_wheel_installs(tmp_path: Path) -> None:
    w = build_library_wheel(tmp_path / "lib", "intact", "1.0")
    target = tmp_path / "libs" / "intact==1.0"
    install_wheel(w, target)
    assert (target / "intact" / "__init__.py").is_file()


def test_a_full_disk_refuses_the_install_naming_the_directory_and_keeps_nothing(tmp_path: Path) -> None:
    """A library or slice installed on a full disk (a 1 MiB tmpfs; needs root). Seen: a bare
    `OSError: [Errno 28] No space left on device`, naming neither the wheel nor the directory (the
    slice's status said `... cannot be loaded: OSError: [Errno 28] ...`)."""
    import os

    from aether.slices.testing import write_wheel
    from test_disk_faults import tiny_filesystem

    files = {"biglib/__init__.py": "", "biglib/blob.bin": os.urandom(3 << 20)}
    w = write_wheel(tmp_path / "w", "biglib", "1.0", files)
    libs = tmp_path / "libs"
    with tiny_filesystem(libs, "1m"):
        with pytest.raises(SliceLoadError) as e:
            install_wheel(w, libs / "biglib==1.0")
        msg = str(e.value)
        assert "no space left on the node's disk" in msg and w.name in msg and str(libs) in msg, msg
        assert list(libs.iterdir()) == []  # nothing half-installed stays
    # the node's store copies a wheel (hashing it) before it installs it: that copy fills the disk
    from aether.slices.libstore import LibraryStore

    data = tmp_path / "data"
    with tiny_filesystem(data, "1m"):
        store = LibraryStore(data, None)
        with pytest.raises(SliceLoadError) as e:
            store.install_slice_code(w, "0" * 64)
        msg = str(e.value)
        assert "no space left on the node's disk" in msg and w.name in msg, msg
        assert list((data / "slices").iterdir()) == []


@pytest.mark.parametrize("installer", ["auto", "pip"])
def test_a_tampered_library_wheel_is_refused(tmp_path: Path, installer: str) -> None:
    """Both ways of installing check RECORD: the unpacker while writing, and before pip (which
    rewrites RECORD for what it installed without comparing the wheel's hashes)."""
    w = build_library_wheel(tmp_path / "lib", "tampered", "1.0")
    rewrite(w, tamper("tampered/__init__.py", b"import os  # not what was built\n"))
    target = tmp_path / "libs" / "tampered==1.0"
    with pytest.raises(SliceLoadError, match=rf"{w.name}: tampered/__init__.py does not match its hash"):
        install_wheel(w, target, installer=installer)  # type: ignore[arg-type]
    assert not target.exists() and not list((tmp_path / "libs").iterdir())


def test_a_member_not_in_record_is_refused(tmp_path: Path) -> None:
    w = build_library_wheel(tmp_path / "lib", "extra", "1.0")

    def add(members: dict[str, bytes]) -> None:
        members["extra/sneaky.py"] = b"print('hello')\n"

    rewrite(w, add)
    with pytest.raises(WheelRecordMismatch, match=r"extra/sneaky.py is not listed in extra-1.0.dist-info/"):
        unpack_pure_wheel(w, tmp_path / "out")


def test_a_size_mismatch_is_refused(tmp_path: Path) -> None:
    w = build_library_wheel(tmp_path / "lib", "sized", "1.0")

    def lie(members: dict[str, bytes]) -> None:
        rec = record_of(members)
        lines = members[rec].decode().splitlines()
        lines = [ln.rsplit(",", 1)[0] + ",99999" if ln.startswith("sized/__init__.py,") else ln
                 for ln in lines]  # fmt: skip
        members[rec] = ("\n".join(lines) + "\n").encode()

    rewrite(w, lie)
    with pytest.raises(WheelRecordMismatch, match=r"sized/__init__.py is \d+ bytes, but .* records 99999"):
        unpack_pure_wheel(w, tmp_path / "out")


@pytest.mark.parametrize(("algo", "expected"), [("md5", "a md5 hash"), ("", "no hash")])
def test_a_weak_or_missing_hash_is_refused(tmp_path: Path, algo: str, expected: str) -> None:
    w = build_library_wheel(tmp_path / "lib", "weak", "1.0")

    def weaken(members: dict[str, bytes]) -> None:
        rec = record_of(members)
        data = members["weak/__init__.py"]
        digest = f"{algo}={_b64(data, algo)}" if algo else ""
        lines = [
            f"weak/__init__.py,{digest},{len(data)}" if ln.startswith("weak/__init__.py,") else ln
            for ln in members[rec].decode().splitlines()
        ]
        members[rec] = ("\n".join(lines) + "\n").encode()

    rewrite(w, weaken)
    with pytest.raises(WheelRecordMismatch, match=rf"weak/__init__.py has {expected} in .*RECORD"):
        unpack_pure_wheel(w, tmp_path / "out")


def test_a_stronger_hash_is_accepted(tmp_path: Path) -> None:
    w = build_library_wheel(tmp_path / "lib", "strong", "1.0")

    def strengthen(members: dict[str, bytes]) -> None:
        rec = record_of(members)
        lines = []
        for ln in members[rec].decode().splitlines():
            name = ln.split(",", 1)[0]
            if name != rec:
                ln = f"{name},sha512={_b64(members[name], 'sha512')},{len(members[name])}"
            lines.append(ln)
        members[rec] = ("\n".join(lines) + "\n").encode()

    rewrite(w, strengthen)
    unpack_pure_wheel(w, tmp_path / "out")
    assert (tmp_path / "out" / "strong" / "__init__.py").is_file()


def test_a_wheel_without_record_is_refused(tmp_path: Path) -> None:
    w = build_library_wheel(tmp_path / "lib", "norecord", "1.0")
    rewrite(w, lambda members: members.pop(record_of(members)) and None)
    target = tmp_path / "libs" / "norecord==1.0"
    with pytest.raises(SliceLoadError, match=r"no \*.dist-info/RECORD"):
        install_wheel(w, target)
    assert not target.exists()
    assert issubclass(WheelRecordMismatch, InvalidWheel)  # a BadRequest: 400 through the API


def test_an_install_error_names_the_wheel_not_its_temporary_copy(tmp_path: Path) -> None:
    """The store installs a wheel from a private copy (hashed while copied); an install error named
    that copy (`.../slices/.tmp-wheel-xyz/bad-1.0-py3-none-any.whl: not a wheel`), a path that is
    gone by the time anyone reads it."""
    import hashlib

    from aether.slices.libstore import LibraryStore

    wheel = tmp_path / "repo" / "bad-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"not a zip file at all")
    store = LibraryStore(tmp_path / "data", None)
    with pytest.raises(SliceLoadError) as e:
        store.install_slice_code(wheel, hashlib.sha256(wheel.read_bytes()).hexdigest())
    msg = str(e.value)
    assert str(wheel) in msg and ".tmp-wheel-" not in msg, msg
