"""Wheel inspection and the local repository (wheels built directly in tmp, no pip)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from aether.core.artifact import Artifact, Version, VersionPattern
from aether.core.errors import BadRequest
from aether.slices import ArtifactNotFound, InvalidWheel, NotASliceWheel
from aether.slices.repository import Repository, default_root
from aether.slices.testing import build_library_wheel, build_slice_wheel, damage_wheel_member, write_wheel
from aether.slices.wheel import aether_version, inspect_wheel, parse_entry_points

pytestmark = pytest.mark.timeout(30)

SRC = """
from aether.slices import Slice, entry

class Echo(Slice):
    @entry
    async def echo(self, text: str) -> str:
        return text
"""


# --- inspection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["package", "dist-info", "entry-points"])
def test_inspect_slice_wheel(tmp_path: Path, where: str) -> None:
    w = build_slice_wheel(
        tmp_path,
        "org.example:echo:1.2.0",
        SRC,
        "Echo",
        dependencies={"org.example:hello": "^0.1.0", "org.other:x": "[1.0,2.0)"},
        requires=["tinylib>=1", "onlywin; sys_platform == 'win32'", "extra-only; extra == 'fast'"],
        dependencies_in=where,  # type: ignore[arg-type]
    )
    info = inspect_wheel(w)
    assert info.is_slice
    assert info.coords == Artifact.parse("org.example:echo:1.2.0")
    assert info.slice_class == "echo_slice:Echo"
    assert {k: str(v) for k, v in info.dependencies.items()} == {
        "org.example:hello": "^0.1.0",
        "org.other:x": "[1.0,2.0)",
    }
    assert [str(r) for r in info.requirements] == ["tinylib>=1"]  # markers evaluated
    assert len(info.requires_dist) == 3
    assert info.pure and info.top_level == ("echo_slice",)


def test_inspect_coords_override_and_library(tmp_path: Path) -> None:
    w = build_slice_wheel(tmp_path, "org.example:echo:1.0.0", SRC, "Echo")
    info = inspect_wheel(w, "org.acme:echo2:3.0.0")
    assert str(info.coords) == "org.acme:echo2:3.0.0"
    lib = build_library_wheel(tmp_path, "tinylib", "1.0")
    li = inspect_wheel(lib)
    assert not li.is_slice and li.coords is None and li.dist_name == "tinylib"
    with pytest.raises(NotASliceWheel, match="library wheel"):
        inspect_wheel(lib, "org.acme:x:1.0.0")


def test_pep440_versions() -> None:
    assert aether_version("1.0") == Version(1, 0, 0)
    assert str(aether_version("1.0.0rc1")) == "1.0.0-rc1"
    assert str(aether_version("2.1.dev3")) == "2.1.0-dev3"
    assert str(aether_version("1.0.0b2.dev1")) == "1.0.0-b2.dev1"
    with pytest.raises(BadRequest, match="--coords"):
        aether_version("1.0.post1")


def test_entry_points_parser_keeps_colons() -> None:
    eps = parse_entry_points("[aether.slices]\norg.example:hello = hello_slice:Hello\n\n[x]\na=b\n")
    assert eps == {"aether.slices": {"org.example:hello": "hello_slice:Hello"}, "x": {"a": "b"}}
    # importlib.metadata's parser: comments and blank lines are skipped, a line without '=' is not
    assert parse_entry_points("# made by hand\n[x]\n\n# a comment\na = b\n") == {"x": {"a": "b"}}
    with pytest.raises(ValueError):
        parse_entry_points("[x]\njust a name\n")


def test_a_malformed_entry_points_file_is_an_invalid_wheel(tmp_path: Path) -> None:
    w = _raw_wheel(tmp_path, {}, dist_info_files={"entry_points.txt": "[aether.slices]\norg.example:x\n"})
    with pytest.raises(InvalidWheel, match=r"dist-info/entry_points.txt: a line is not NAME = VALUE"):
        inspect_wheel(w)


def test_metadata_is_read_with_importlib_metadata(tmp_path: Path) -> None:
    """Folded and repeated headers, as email-style METADATA allows (what HeaderParser read before)."""
    meta = (
        "Metadata-Version: 2.1\nName: folded-thing\nVersion: 2.0.0\nRequires-Dist: tinylib>=1.0\n"
        "Requires-Dist: otherlib ; python_version < '3'\nSummary: a summary\n  folded on two lines\n\n"
        "Long description: Name: not-this\n"
    )
    w = write_wheel(tmp_path, "folded-thing", "2.0.0", {"folded_thing/__init__.py": ""})
    with zipfile.ZipFile(w) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["folded_thing-2.0.0.dist-info/METADATA"] = meta.encode()
    with zipfile.ZipFile(w, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    info = inspect_wheel(w)
    assert (info.dist_name, info.dist_version) == ("folded-thing", "2.0.0")
    assert info.requires_dist == ("tinylib>=1.0", "otherlib ; python_version < '3'")
    assert [str(r) for r in info.requirements] == ["tinylib>=1.0"]


def _raw_wheel(tmp_path: Path, eps: dict[str, dict[str, str]], **kw: object) -> Path:
    return write_wheel(tmp_path, "thing", "1.0.0", {"thing/__init__.py": ""}, entry_points=eps, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("eps", "dist_info", "needle"),
    [
        ({"aether.slices": {"a.b:one": "m:A", "a.b:two": "m:B"}}, {}, "several [aether.slices]"),
        ({"aether.slices": {"nocolon": "m:A"}}, {}, "must be GROUP:ARTIFACT"),
        ({"aether.slices": {"Bad Group:x": "m:A"}}, {}, "bad coordinates"),
        ({"aether.slices": {"a.b:x": "not a ref"}}, {}, "module:Class"),
        ({"aether.slices": {"a.b:x": "m:A"}, "aether.slice-dependencies": {"a.b:y": "^^1"}}, {}, "a.b:y"),
        (
            {"aether.slices": {"a.b:x": "m:A"}, "aether.slice-dependencies": {"y": "^1.0.0"}},
            {},
            "GROUP:ARTIFACT",
        ),
        ({"aether.slices": {"a.b:x": "m:A"}, "aether.slice-dependencies": {"a.b:x": "^1.0.0"}}, {}, "itself"),
        ({"aether.slices": {"a.b:x": "m:A"}}, {"aether-slice.toml": "[deps]\n"}, "unknown key"),
        ({"aether.slices": {"a.b:x": "m:A"}}, {"aether-slice.toml": "[dependencies\n"}, "invalid TOML"),
        (
            {"aether.slices": {"a.b:x": "m:A"}},
            {"aether-slice.toml": "[dependencies]\n'a.b:y' = 1\n"},
            "pattern",
        ),
    ],
)
def test_inspect_errors(
    tmp_path: Path, eps: dict[str, dict[str, str]], dist_info: dict[str, str], needle: str
) -> None:
    w = _raw_wheel(tmp_path, eps, dist_info_files=dist_info)
    with pytest.raises(InvalidWheel) as ei:
        inspect_wheel(w)
    assert needle in str(ei.value)
    assert "thing-1.0.0" in str(ei.value)


def test_not_a_wheel(tmp_path: Path) -> None:
    with pytest.raises(InvalidWheel, match="no such file"):
        inspect_wheel(tmp_path / "missing-1.0-py3-none-any.whl")
    bad_name = tmp_path / "foo.zip"
    bad_name.write_bytes(b"x")
    with pytest.raises(InvalidWheel, match="not a wheel file name"):
        inspect_wheel(bad_name)
    not_zip = tmp_path / "foo-1.0-py3-none-any.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(InvalidWheel, match="not a zip"):
        inspect_wheel(not_zip)
    empty = tmp_path / "bar-1.0-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("bar/__init__.py", "")
    with pytest.raises(InvalidWheel, match="METADATA"):
        inspect_wheel(empty)


def test_descriptor_declared_twice(tmp_path: Path) -> None:
    w = write_wheel(
        tmp_path,
        "thing",
        "1.0.0",
        {"m/__init__.py": "", "m/aether-slice.toml": "[dependencies]\n"},
        entry_points={"aether.slices": {"a.b:x": "m:A"}},
        dist_info_files={"aether-slice.toml": "[dependencies]\n"},
    )
    with pytest.raises(InvalidWheel, match="declare slice dependencies once"):
        inspect_wheel(w)





@pytest.mark.parametrize("damage", ["crc", "encrypted", "method"])
def test_a_damaged_metadata_member_is_an_invalid_wheel(tmp_path: Path, damage: str) -> None:
    """Seen: a METADATA member whose bytes were damaged (CRC), flagged encrypted, or compressed
    with a method zipfile lacks escaped inspect_wheel as BadZipFile / RuntimeError /
    NotImplementedError: an upload answered 500 and `aether artifact deploy --repository` crashed."""
    w = build_library_wheel(tmp_path, "tinylib", "1.0")
    meta = "tinylib-1.0.dist-info/METADATA"
    if damage == "crc":
        raw = bytearray(w.read_bytes())
        with zipfile.ZipFile(w) as zf:
            info = zf.getinfo(meta)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        raw[start + info.compress_size // 2] ^= 0x55
        w.write_bytes(bytes(raw))
    elif damage == "encrypted":
        damage_wheel_member(w, meta, flags=0x1)
    else:
        damage_wheel_member(w, meta, method=6)  # "implode": not supported by zipfile
    with pytest.raises(InvalidWheel, match=r"tinylib-1\.0-py3-none-any\.whl: .*METADATA"):
        inspect_wheel(w)



@pytest.mark.parametrize("damage", ["encrypted", "method"])
def test_installing_an_unreadable_member_is_a_load_error(tmp_path: Path, damage: str) -> None:
    """A wheel put into a repository directory by hand is checked only when a node installs it:
    a member flagged encrypted or compressed with a method zipfile lacks escaped `install_wheel`
    as RuntimeError / NotImplementedError instead of the SliceLoadError naming the wheel."""
    from aether.slices import SliceLoadError
    from aether.slices.libstore import install_wheel

    w = build_library_wheel(tmp_path, "tinylib", "1.0", {"tinylib/__init__.py": "X = 1\n" * 50})
    if damage == "encrypted":
        damage_wheel_member(w, "tinylib/__init__.py", flags=0x1)
    else:
        damage_wheel_member(w, "tinylib/__init__.py", method=6)
    target = tmp_path / "libs" / "tinylib==1.0"
    with pytest.raises(SliceLoadError, match=r"tinylib-1\.0-py3-none-any\.whl: damaged wheel"):
        install_wheel(w, target)
    assert not target.exists() and list((tmp_path / "libs").iterdir()) == []

@pytest.mark.parametrize("name", ["../evil.py", "/abs/evil.py", "tinylib/../../evil.py", "..\\evil.py"])
def test_a_member_outside_the_install_directory_is_refused(tmp_path: Path, name: str) -> None:
    """Seen: a wheel whose RECORD lists (with correct hashes) a member named `../evil.py` or an
    absolute path was accepted by the repository (upload, `deploy`) and failed only when a node
    installed it; refused when inspected, naming the member."""
    w = write_wheel(tmp_path, "tinylib", "1.0", {"tinylib/__init__.py": "", name: "x = 1\n"})
    with pytest.raises(InvalidWheel, match="unsafe path") as ei:
        inspect_wheel(w)
    assert repr(name) in str(ei.value)
    with pytest.raises(InvalidWheel, match="unsafe path"):
        Repository(tmp_path / "repo").deploy_library(w)
    assert not (tmp_path / "repo" / "_libs").exists()


# --- repository ----------------------------------------------------------------------------------------


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AETHER_REPOSITORY", raising=False)
    assert default_root() == Path.home() / ".aether" / "repository"
    monkeypatch.setenv("AETHER_REPOSITORY", str(tmp_path / "r"))
    assert Repository().root == tmp_path / "r"


def test_repository_deploy_list_versions_resolve(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    assert repo.list() == []
    wheels = tmp_path / "w"
    arts = []
    for v in ("0.1.0", "0.2.0", "0.10.0", "1.0.0-rc1"):
        arts.append(repo.deploy(build_slice_wheel(wheels / v, f"org.example:echo:{v}", SRC, "Echo")))
    repo.deploy(build_slice_wheel(wheels / "h", "org.example:hello:0.1.0", SRC, "Echo"))
    assert (tmp_path / "repo/org/example/echo/0.10.0/echo-0.10.0-py3-none-any.whl").is_file()
    assert [str(a) for a in repo.list()] == [
        "org.example:echo:0.1.0",
        "org.example:echo:0.2.0",
        "org.example:echo:0.10.0",
        "org.example:echo:1.0.0-rc1",
        "org.example:hello:0.1.0",
    ]
    assert [str(v) for v in repo.versions("org.example:echo")] == ["0.1.0", "0.2.0", "0.10.0", "1.0.0-rc1"]
    assert repo.versions("org.example:none") == []
    assert repo.names() == ["org.example:echo", "org.example:hello"]
    assert repo.resolve(arts[2]).name == "echo-0.10.0-py3-none-any.whl"
    with pytest.raises(ArtifactNotFound) as ei:
        repo.resolve(Artifact.parse("org.example:echo:9.9.9"))
    assert "0.1.0, 0.2.0, 0.10.0, 1.0.0-rc1" in str(ei.value)
    with pytest.raises(ArtifactNotFound, match=r"no version of org\.example:nope"):
        repo.resolve("org.example:nope:1.0.0")
    with pytest.raises(BadRequest, match="GROUP:ARTIFACT"):
        repo.versions("echo")


def test_repository_patterns(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    for v in ("0.1.0", "0.1.5", "0.2.0", "1.0.0", "1.4.0", "2.0.0"):
        repo.deploy(build_slice_wheel(tmp_path / v, f"org.example:echo:{v}", SRC, "Echo"))
    r = repo.resolve_pattern
    assert str(r("org.example:echo", "^0.1.0")) == "org.example:echo:0.1.5"
    assert str(r("org.example:echo", VersionPattern.parse("^1.0.0"))) == "org.example:echo:1.4.0"
    assert str(r("org.example:echo", "[1.0,2.0)")) == "org.example:echo:1.4.0"
    assert str(r("org.example:echo", ">=1.5")) == "org.example:echo:2.0.0"
    assert str(r("org.example:echo", "~0.1.0")) == "org.example:echo:0.1.5"
    assert str(r("org.example:echo", "*")) == "org.example:echo:2.0.0"
    assert r("org.example:echo", "^3.0.0") is None
    assert r("org.example:other", "*") is None


def test_repository_redeploy_replaces_and_coords_override(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    a1 = repo.deploy(build_slice_wheel(tmp_path / "a", "org.example:echo:1.0.0", SRC, "Echo"))
    first = repo.resolve(a1)
    src2 = SRC + "\nVERSION = 2\n"
    a2 = repo.deploy(
        build_slice_wheel(tmp_path / "b", "org.example:echo:1.0.0", src2, "Echo", requires=["x>=1"])
    )
    assert a1 == a2
    assert [p.name for p in repo.artifact_dir(a1).iterdir()] == [first.name]
    assert [str(r) for r in repo.requirements(a1)] == ["x>=1"]
    # deploy under other coordinates
    a3 = repo.deploy(
        build_slice_wheel(tmp_path / "c", "org.example:echo:1.0.0", SRC, "Echo"), "org.acme:echo:5.0.0"
    )
    assert str(a3) == "org.acme:echo:5.0.0"
    assert repo.info(a3).slice_class == "echo_slice:Echo"
    # no temporary files left behind
    assert not [p for p in (tmp_path / "repo").rglob(".tmp-*")]


def test_a_deploy_leaves_the_temporary_of_a_copy_running_in_another_process(tmp_path: Path) -> None:
    # One wheel per version directory: a deploy removes the others there, and removed as well the
    # .tmp-*.whl of a fetch or copy another node sharing the directory was writing (its rename then
    # failed with FileNotFoundError).
    repo = Repository(tmp_path / "repo")
    a = repo.deploy(build_slice_wheel(tmp_path / "a", "org.example:echo:1.0.0", SRC, "Echo"))
    running = repo.artifact_dir(a) / ".tmp-abc123.whl"
    running.write_bytes(b"being written")
    repo.deploy(build_slice_wheel(tmp_path / "b", "org.example:echo:1.0.0", SRC + "\nV = 2\n", "Echo"))
    assert running.exists()
    assert len([p for p in repo.artifact_dir(a).iterdir() if not p.name.startswith(".")]) == 1


def test_repository_dependencies(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    a = repo.deploy(
        build_slice_wheel(tmp_path, "org.example:greeter:0.1.0", SRC, "Echo", {"org.example:hello": "^0.1.0"})
    )
    deps = repo.dependencies(a)
    assert list(deps) == ["org.example:hello"]
    assert deps["org.example:hello"].matches(Version.parse("0.1.9"))
    assert not deps["org.example:hello"].matches(Version.parse("0.2.0"))


def test_repository_libraries(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    lib = build_library_wheel(tmp_path, "tinylib", "1.0")
    with pytest.raises(NotASliceWheel, match="library wheel"):
        repo.deploy(lib)
    assert repo.deploy_library(lib) == tmp_path / "repo/_libs/tinylib-1.0-py3-none-any.whl"
    assert repo.deploy_wheel(build_library_wheel(tmp_path, "tinylib", "2.0")) == repo.libs_dir / (
        "tinylib-2.0-py3-none-any.whl"
    )
    slice_wheel = build_slice_wheel(tmp_path, "org.example:echo:1.0.0", SRC, "Echo")
    assert repo.deploy_wheel(slice_wheel) == Artifact.parse("org.example:echo:1.0.0")
    with pytest.raises(InvalidWheel, match="slice wheel"):
        repo.deploy_library(slice_wheel)
    assert [p.name for p in repo.library_wheels()] == [
        "tinylib-1.0-py3-none-any.whl",
        "tinylib-2.0-py3-none-any.whl",
    ]
    assert [str(a) for a in repo.list()] == ["org.example:echo:1.0.0"]  # _libs is not an artifact


def test_repository_ignores_junk(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    (tmp_path / "repo/org/example/x/notaversion").mkdir(parents=True)
    (tmp_path / "repo/org/example/x/notaversion/x-1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "repo/org/example/y/1.0.0").mkdir(parents=True)  # empty version dir
    (tmp_path / "repo/org/example/y/1.0.0/.tmp-123.whl").write_bytes(b"")
    assert repo.list() == []
    assert repo.versions("org.example:y") == []
    os.chmod(tmp_path / "repo", 0o755)
