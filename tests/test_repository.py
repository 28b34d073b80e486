"""The cluster's artifact repository (docs/repository.md): the sans-IO decisions, and the service,
its API, the simple index (with a real pip) and the cluster-backed `Repository` on an in-process
3-node cluster whose nodes have separate repository directories."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from aether.core.artifact import Artifact, VersionPattern
from aether.core.errors import BadRequest
from aether.kv.keys import ArtifactKey, ArtifactManifest
from aether.repository import core
from aether.repository.errors import ArtifactConflict, HashMismatch, UploadTooLarge
from aether.slices.testing import (
    LocalMaps,
    build_library_wheel,
    build_slice_wheel,
    damage_wheel_member,
    isolated_imports,
    write_wheel,
)
from aether.slices.wheel import inspect_wheel, sha256_file
from conftest import EXAMPLES, node_configs

pytestmark = pytest.mark.timeout(120)

HELLO = (EXAMPLES / "hello-slice" / "hello_slice" / "__init__.py").read_text()
P = "/api/v1/repository"


def _manifest(**kw: Any) -> ArtifactManifest:
    base: dict[str, Any] = dict(
        project="hello",
        version="0.1.0",
        filename="hello-0.1.0-py3-none-any.whl",
        size=10,
        sha256="a" * 64,
        chunks=1,
        chunk_size=core.CHUNK_SIZE,
        coords="org.example:hello:0.1.0",
    )
    base.update(kw)
    return ArtifactManifest(**base)


# --- sans-IO ----------------------------------------------------------------------------------------


def test_meter_refuses_a_declared_or_streamed_size_over_the_limit() -> None:
    with pytest.raises(UploadTooLarge, match="1001 bytes exceeds the repository's 1000-byte limit"):
        core.UploadMeter(1000, declared=1001)
    m = core.UploadMeter(1000)
    m.feed(b"x" * 600)
    with pytest.raises(UploadTooLarge):
        m.feed(b"x" * 401)


def test_meter_checks_the_declared_sha256_and_length() -> None:
    data = b"wheel bytes"
    good = hashlib.sha256(data).hexdigest()
    m = core.UploadMeter(100, expected_sha256=good.upper())
    m.feed(data)
    assert m.finish() == good
    m = core.UploadMeter(100, expected_sha256="0" * 64)
    m.feed(data)
    with pytest.raises(HashMismatch, match="sha256 mismatch"):
        m.finish()
    m = core.UploadMeter(100, declared=20)
    m.feed(data)
    with pytest.raises(BadRequest, match="ended after 11 of 20"):
        m.finish()
    with pytest.raises(BadRequest, match="empty"):
        core.UploadMeter(100).finish()
    with pytest.raises(BadRequest, match="64 hex digits"):
        core.UploadMeter(100, expected_sha256="xyz")


def test_manifest_refuses_a_file_name_that_is_not_the_metadata(tmp_path: Path) -> None:
    w = build_slice_wheel(tmp_path, "org.example:hello:0.1.0", HELLO, "Hello", module="hello_slice")
    info = inspect_wheel(w)
    m = core.manifest_for(info, w.name, 10, "a" * 64, now=1.0)
    assert (m.project, m.version, m.coords, m.chunks) == (
        info.canonical_name,
        "0.1.0",
        "org.example:hello:0.1.0",
        1,
    )
    other_version = w.name.replace("0.1.0", "0.2.0")
    says = r"file name says version 0\.2\.0, the wheel's METADATA says 0\.1\.0"
    with pytest.raises(BadRequest, match=says):
        core.manifest_for(info, other_version, 10, "a" * 64, now=1.0)
    with pytest.raises(BadRequest, match="file name says project 'other'"):
        core.manifest_for(info, "other-0.1.0-py3-none-any.whl", 10, "a" * 64, now=1.0)
    with pytest.raises(BadRequest, match=r"not org\.example:hello:0\.2\.0 as the path says"):
        core.manifest_for(
            info, w.name, 10, "a" * 64, now=1.0, expected=Artifact.parse("org.example:hello:0.2.0")
        )
    with pytest.raises(BadRequest, match="not a wheel"):
        core.wheel_filename("hello.tar.gz")
    with pytest.raises(BadRequest, match="invalid wheel file name"):
        core.wheel_filename("../x-1.0-py3-none-any.whl")


def test_decide_new_same_or_conflict() -> None:
    new = _manifest()
    assert core.decide(None, new) == "new"
    assert core.decide(_manifest(), new) == "same"
    with pytest.raises(ArtifactConflict, match="already in the repository with other content"):
        core.decide(_manifest(sha256="b" * 64), new)
    with pytest.raises(ArtifactConflict, match="declares the same coordinates"):
        core.decide(None, new, [_manifest(project="other", filename="other-0.1.0-py3-none-any.whl")])



def test_claims_tombstones_and_chunk_keys() -> None:
    from aether.kv.keys import ArtifactTombstone, CoordinatesClaim, parse_key

    new = _manifest()
    assert core.claim_check(new, None, None) == "free"
    assert core.claim_check(new, CoordinatesClaim("hello", "0.1.0", 1.0), None) == "ours"
    other = _manifest(project="other", filename="other-0.1.0-py3-none-any.whl")
    with pytest.raises(ArtifactConflict, match=r"already in the repository as other-0\.1\.0-py3"):
        core.claim_check(new, CoordinatesClaim("other", "0.1.0", 1.0), other)
    with pytest.raises(ArtifactConflict, match=r"claimed by other 0\.1\.0, whose upload has not") as ei:
        core.claim_check(new, CoordinatesClaim("other", "0.1.0", 1.0), None)
    assert ei.value.status == 409 and "aether artifact delete other 0.1.0" in str(ei.value)
    tomb = ArtifactTombstone("hello", "0.1.0", "hello-0.1.0-py3-none-any.whl", "a" * 64, 1.0)
    assert core.bootstrap_action(new, tomb, "a" * 64) == "skip"
    assert core.bootstrap_action(None, None) == "publish"
    assert core.bootstrap_action(None, tomb, "a" * 64) == "drop"
    assert core.bootstrap_action(None, tomb, "b" * 64) == "withhold"
    assert core.chunk_key("a" * 64, 3, "f00d") == f"{'a' * 64}/f00d/3"
    assert core.chunk_key("a" * 64, 3) == f"{'a' * 64}/3"  # a manifest written before upload ids
    assert str(parse_key("repository-deleted/hello/0.1.0")) == "repository-deleted/hello/0.1.0"
    claim_key = "repository-coords/org.example:hello:0.1.0"
    assert str(parse_key(claim_key)) == claim_key
    with pytest.raises(BadRequest, match="expected repository-deleted/PROJECT/VERSION"):
        parse_key("repository-deleted/hello")


def test_deployed_by_names_the_blueprints_and_active_rollouts_using_a_version() -> None:
    from aether.kv.keys import BlueprintSlice, BlueprintValue, RolloutValue

    bps = [
        ("blueprints/shop", BlueprintValue([BlueprintSlice("org.example:hello:0.1.0", 2)])),
        ("blueprints/other", BlueprintValue([BlueprintSlice("org.example:hello:0.3.0", 1)])),
    ]

    def rollout(state: str) -> RolloutValue:
        return RolloutValue("r1", "org.example:hello", "0.1.0", "0.2.0", "rolling", state, 2, 1, 1)

    assert core.deployed_by("org.example:hello:0.1.0", bps) == ["blueprint shop"]
    assert core.deployed_by("org.example:hello:0.2.0", bps, [rollout("progressing")]) == [
        "rollout r1 of org.example:hello"
    ]
    assert core.deployed_by("org.example:hello:0.2.0", bps, [rollout("succeeded")]) == []
    assert core.deployed_by("org.example:hello:0.9.0", bps, [rollout("paused")]) == []

def test_reading_helpers() -> None:
    ms = [
        _manifest(),
        _manifest(version="0.2.0", coords="org.example:hello:0.2.0", requires_dist=["tinylib>=1"]),
        _manifest(project="tinylib", version="1.0", coords=None, requires_dist=["deeplib"]),
        _manifest(project="deeplib", version="2.0", coords=None),
        _manifest(project="unused", version="1.0", coords=None),
    ]
    assert [str(v) for v in core.slice_versions(ms, "org.example:hello")] == ["0.1.0", "0.2.0"]
    assert (
        str(core.best_match(ms, "org.example:hello", VersionPattern.parse("^0.1.0")))
        == "org.example:hello:0.1.0"
    )
    assert core.find_slice(ms, Artifact.parse("org.example:hello:0.2.0")) is ms[1]
    assert [m.project for m in core.library_closure(ms, ms[1].requires_dist)] == ["deeplib", "tinylib"]


def test_maven_paths() -> None:
    mp = core.parse_maven_path("org/example/hello/0.1.0/hello-0.1.0-py3-none-any.whl")
    assert (mp.name, mp.version, mp.filename) == (
        "org.example:hello",
        "0.1.0",
        "hello-0.1.0-py3-none-any.whl",
    )
    assert core.parse_maven_path("org/example/hello/maven-metadata.xml").metadata
    assert core.parse_maven_path("org/example/hello/0.1.0/").filename is None
    for bad in ("org/../hello/0.1.0/x.whl", "hello", "org/example/hello/notaversion/x.whl"):
        with pytest.raises(BadRequest, match="invalid repository path"):
            core.parse_maven_path(bad)
    xml = core.maven_metadata("org.example", "hello", core.slice_versions([_manifest()], "org.example:hello"))
    assert "<version>0.1.0</version>" in xml and "<latest>0.1.0</latest>" in xml


def test_simple_index_documents() -> None:
    pip_accept = (
        "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
    )
    assert core.negotiate(pip_accept) == "json"
    assert core.negotiate("text/html") == "html"
    assert core.negotiate(None) == "html"
    assert core.negotiate("text/html", "json") == "json"
    m = _manifest()
    body, ctype = core.simple_project("hello", [m], lambda m: f"/files/{m.filename}", "html")
    assert ctype.startswith("text/html")
    assert f'href="/files/{m.filename}#sha256={m.sha256}"' in body.decode()
    body, ctype = core.simple_project("hello", [m], lambda m: f"/files/{m.filename}", "json")
    doc = json.loads(body)
    assert ctype == core.JSON_V1 and doc["files"][0]["hashes"] == {"sha256": m.sha256}
    assert json.loads(core.simple_root(["b", "a", "a"], "json")[0])["projects"] == [
        {"name": "a"},
        {"name": "b"},
    ]


def test_manifest_key_round_trips() -> None:
    from aether.kv.keys import parse_key, value_type_for

    k = ArtifactKey("hello-slice", "0.1.0")
    assert parse_key(str(k)) == k
    m = _manifest()
    assert msgspec.json.decode(msgspec.json.encode(m), type=ArtifactManifest) == m
    assert value_type_for(str(k)) is ArtifactManifest



# --- the service on an in-memory store and map (no cluster) -------------------------------------------


class MemoryStore:
    """The `ManifestStore` of one node whose replica is always current (a one-node cluster)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get_local(self, key: Any) -> Any:
        return self.data.get(str(key))

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    async def get(self, key: Any, timeout: float = 5.0) -> Any:
        return self.get_local(key)

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int:
        self.data[str(key)] = value
        return 0

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        if self.data.get(str(key)) != expected:
            return False
        if new is None:
            self.data.pop(str(key), None)
        else:
            self.data[str(key)] = new
        return True

    def watch(self, prefix: str, callback: Any) -> Any:
        return lambda: None  # the tests of this store call the service's steps themselves


class MemoryMaps(LocalMaps):
    def __init__(self) -> None:
        super().__init__(create_on_use=True, max_value_bytes=4 * core.CHUNK_SIZE)

    async def define(self, name: str, spec: Any) -> bool:
        self.require_map(name)
        return True


def _service(tmp_path: Path, store: Any = None, maps: Any = None, **kw: Any) -> Any:
    from aether.repository.service import ArtifactService
    from aether.slices.repository import Repository

    service = ArtifactService(
        store if store is not None else MemoryStore(),
        maps if maps is not None else MemoryMaps(),
        members=1,
        cache=Repository(tmp_path / "cache"),
        work_dir=tmp_path / "work",
        **kw,
    )
    service.bind()
    return service


async def test_a_starting_node_removes_the_wheels_killed_fetches_left(tmp_path: Path) -> None:
    """A process killed during a fetch (or a copy) into the cache leaves its ``.tmp-*.whl``: nothing
    removed it, and a wheel may weigh megabytes. The next start removes those older than
    `LEFTOVER_AGE` (the cache may be shared: a fetch running in another node keeps its own);
    nothing else."""
    import os
    import time

    old = time.time() - 3600
    version_dir = tmp_path / "cache" / "org" / "example" / "echo" / "1.0.0"
    version_dir.mkdir(parents=True)
    fetch = version_dir / ".tmp-k2j3h4.whl"
    lib = tmp_path / "cache" / "_libs" / ".tmp-a1b2c3.whl"
    lib.parent.mkdir()
    running = version_dir / ".tmp-zzzz.whl"  # a fetch running now
    wheel = version_dir / "echo-1.0.0-py3-none-any.whl"
    for f in (fetch, lib, running, wheel):
        f.write_bytes(b"x" * 1000)
    for f in (fetch, lib, wheel):
        os.utime(f, (old, old))
    service = _service(tmp_path)
    assert not fetch.exists() and not lib.exists()
    assert running.exists() and wheel.exists()
    assert service.removed_leftovers == 2


async def _bytes(data: bytes) -> AsyncIterator[bytes]:
    yield data




@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("encrypted", "tinylib/data.py cannot be read"),
        ("method", "tinylib/data.py cannot be read"),
        ("dotdot", "unsafe path '../evil.py'"),
        ("absolute", "unsafe path '/tmp/evil.py'"),
    ],
)
async def test_an_unreadable_or_unsafe_wheel_is_a_400_and_leaves_nothing(
    tmp_path: Path, damage: str, says: str
) -> None:
    """Seen: a member flagged encrypted or compressed with a method zipfile lacks made the upload
    a 500 (RuntimeError / NotImplementedError out of the RECORD check); a member named `../x` or
    `/x` (hashes right in RECORD) was stored, and every node failed to install it later."""
    from aether.core.problem import problem_for

    files = {"tinylib/__init__.py": "", "tinylib/data.py": "X = 1\n" * 50}
    if damage == "dotdot":
        files["../evil.py"] = "x = 1\n"
    elif damage == "absolute":
        files["/tmp/evil.py"] = "x = 1\n"
    w = write_wheel(tmp_path / "w", "tinylib", "1.0", files)
    if damage == "encrypted":
        damage_wheel_member(w, "tinylib/data.py", flags=0x1)
    elif damage == "method":
        damage_wheel_member(w, "tinylib/data.py", method=6)
    service = _service(tmp_path)
    try:
        data = w.read_bytes()
        with pytest.raises(Exception) as ei:
            await service.upload(_bytes(data), w.name, declared=len(data))
        problem = problem_for(ei.value)
        assert problem.status == 400 and says in problem.detail, (type(ei.value), problem)
        assert service.manifests() == [] and service.maps.data.get(core.MAP_NAME, {}) == {}
        assert list((tmp_path / "work").iterdir()) == []
    finally:
        await service.stop()



async def test_an_upload_that_loses_its_compare_and_set_to_a_version_deleted_since_is_not_created(
    tmp_path: Path,
) -> None:
    """Seen: when the manifest's compare-and-set lost (another upload of the version won) and the
    winner was deleted before this node looked, `_store` found nothing there, decided "new" and
    the upload answered 201 created, though no manifest was written (the wheel was not there).
    Now it tries the compare-and-set again: the version is stored."""
    w = build_library_wheel(tmp_path / "w", "tinylib", "1.0")

    class RacedStore(MemoryStore):
        lost = 0

        async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
            if self.lost == 0 and new is not None:
                self.lost += 1  # another upload won, and a delete removed its manifest since
                return False
            return await super().compare_and_set(key, expected, new, timeout)

    store = RacedStore()
    service = _service(tmp_path, store)
    try:
        data = w.read_bytes()
        manifest, created = await service.upload(_bytes(data), w.name, declared=len(data))
        assert store.lost == 1
        assert created and store.get_local(ArtifactKey("tinylib", "1.0")) == manifest
    finally:
        await service.stop()



async def test_a_delete_racing_a_reupload_of_the_same_bytes_leaves_the_upload_whole(tmp_path: Path) -> None:
    """Seen: chunks were keyed by sha256 alone, and a delete removed them after its manifest went
    (when no manifest of the same bytes was left in its replica). An upload of the same bytes that
    ran meanwhile, here while the delete's first chunk removal was on its way, wrote those very
    keys and its manifest; the removal then took its chunk: a listed version no node could serve
    (503 chunk missing). Now each upload writes chunks of its own: the delete removes only the
    deleted upload's, and the new upload stays whole."""
    w = build_library_wheel(tmp_path / "w", "tinylib", "1.0")
    data = w.read_bytes()

    class SlowRemoves(MemoryMaps):
        def __init__(self) -> None:
            super().__init__()
            self.removing = asyncio.Event()
            self.release = asyncio.Event()

        async def map_remove(self, name: str, key: str) -> bool:
            self.removing.set()
            await self.release.wait()  # the removal is on its way (a network round trip)
            return await super().map_remove(name, key)

    maps = SlowRemoves()
    service = _service(tmp_path, maps=maps)
    try:
        first, created = await service.upload(_bytes(data), w.name, declared=len(data))
        assert created
        deleting = asyncio.ensure_future(service.delete("tinylib", "1.0"))
        await asyncio.wait_for(maps.removing.wait(), 10)  # the manifest is gone, its chunks go now
        assert service.manifest("tinylib", "1.0") is None
        second, created = await service.upload(_bytes(data), w.name, declared=len(data))
        assert created and second.sha256 == first.sha256
        maps.release.set()
        assert await asyncio.wait_for(deleting, 10) == first
        assert service.manifest("tinylib", "1.0") == second
        path = await service.fetch(second, tmp_path / "fetched" / w.name)  # every chunk is there
        assert path.read_bytes() == data
        # the deleted upload's chunks went, the new one's stayed
        assert sorted(maps.data[core.MAP_NAME]) == [
            core.chunk_key(second.sha256, i, second.upload) for i in range(second.chunks)
        ]
    finally:
        maps.release.set()
        await service.stop()


async def test_start_up_publishing_skips_and_drops_the_copies_of_deleted_versions(tmp_path: Path) -> None:
    """A node's start-up publishing (`publish_local`) against tombstones: a copy of a deleted
    version (its bytes) is removed, not published; a file of a deleted version with other bytes
    is kept but not published; a wheel the cluster never had is published; an explicit upload of
    a deleted version is still stored."""
    old = build_library_wheel(tmp_path / "old", "tinylib", "1.0")
    gone = write_wheel(tmp_path / "gone", "gonelib", "2.0", {"gonelib/__init__.py": "X = 1\n"})
    rebuilt = write_wheel(tmp_path / "rebuilt", "gonelib", "2.0", {"gonelib/__init__.py": "X = 2\n"})
    fresh = build_library_wheel(tmp_path / "fresh", "freshlib", "3.0")
    service = _service(tmp_path)
    libs = service.cache.libs_dir
    try:
        for w in (old, gone):
            data = w.read_bytes()
            await service.upload(_bytes(data), w.name, declared=len(data))
            await service.delete(*core.wheel_filename(w.name))
        assert service.manifests() == [] and service.maps.data[core.MAP_NAME] == {}
        shutil.copy(old, libs / old.name)  # another node's copy of the deleted version
        shutil.copy(rebuilt, libs / gone.name)  # other bytes under a deleted version
        shutil.copy(fresh, libs / fresh.name)  # prepared for the bootstrap
        assert await service.publish_local() == 1
        assert [(m.project, m.version) for m in service.manifests()] == [("freshlib", "3.0")]
        assert not (libs / old.name).exists()
        assert (libs / gone.name).read_bytes() == rebuilt.read_bytes()
        data = old.read_bytes()
        m, created = await service.upload(_bytes(data), old.name, declared=len(data))
        assert created and service.manifest("tinylib", "1.0") == m
    finally:
        await service.stop()


async def test_a_claim_an_interrupted_upload_left_is_released_by_deleting_its_version(tmp_path: Path) -> None:
    """An upload that stopped between claiming a slice's coordinates and writing its manifest (its
    node crashed) leaves the claim: another project's wheel of those coordinates gets a 409 naming
    the claimant and the way out; deleting the claimant's version (404: it has no manifest)
    releases the claim, and the upload then passes."""
    from aether.kv.keys import CoordinatesClaim, CoordinatesClaimKey
    from aether.repository.errors import ArtifactMissing

    w = _hello(tmp_path / "w")
    store = MemoryStore()
    claim = CoordinatesClaim("hello-old", "0.1.0", 1.0)
    await store.put(CoordinatesClaimKey("org.example:hello:0.1.0"), claim)
    service = _service(tmp_path, store)
    try:
        data = w.read_bytes()
        with pytest.raises(ArtifactConflict, match=r"claimed by hello-old 0\.1\.0, whose upload has not"):
            await service.upload(_bytes(data), w.name, declared=len(data))
        assert service.manifests() == [] and service.maps.data[core.MAP_NAME] == {}  # its chunks went
        with pytest.raises(ArtifactMissing, match=r"the claim its interrupted upload left on org\.example"):
            await service.delete("hello-old", "0.1.0")
        _, created = await service.upload(_bytes(data), w.name, declared=len(data))
        claim = store.get_local(CoordinatesClaimKey("org.example:hello:0.1.0"))
        assert created and (claim.project, claim.version) == ("hello", "0.1.0")
        await service.delete("hello", "0.1.0")  # the delete releases the claim
        assert store.get_local(CoordinatesClaimKey("org.example:hello:0.1.0")) is None
    finally:
        await service.stop()


@pytest.mark.parametrize("full", ["work", "cache"])
async def test_a_full_disk_is_a_503_naming_it_and_leaves_no_partial_wheel(tmp_path: Path, full: str) -> None:
    """A full disk (a 1 MiB tmpfs; needs root) under the upload's work directory or the node's
    cache: nothing half-written stays to be served later (checked), and the answer names the
    problem. Seen: the OSError (ENOSPC) escaped the upload and the fetch as an internal error
    (500, 'see the node log')."""
    import os

    from aether.core.problem import problem_for
    from test_disk_faults import tiny_filesystem

    w = write_wheel(
        tmp_path / "w", "biglib", "1.0", {"biglib/__init__.py": "", "biglib/blob.bin": os.urandom(3 << 20)}
    )
    data = w.read_bytes()
    (tmp_path / "cache").mkdir()
    with tiny_filesystem(tmp_path / full, "1m"):
        service = _service(tmp_path)
        try:
            if full == "work":
                with pytest.raises(Exception) as ei:
                    await service.upload(_bytes(data), w.name, declared=len(data))
                assert service.manifests() == [] and service.maps.data.get(core.MAP_NAME, {}) == {}
            else:
                m, created = await service.upload(_bytes(data), w.name, declared=len(data))
                assert created  # stored in the cluster; only the node's own copy did not fit
                with pytest.raises(Exception) as ei:
                    await service.fetch(m)
            problem = problem_for(ei.value)
            assert problem.status == 503 and "no space left" in problem.detail.lower(), problem
            assert str(tmp_path / full) in problem.detail
            leftovers = [p for p in (tmp_path / full).rglob("*") if p.is_file()]
            assert leftovers == [], leftovers
        finally:
            await service.stop()
    if full == "cache":  # room again: fetched whole
        service = _service(tmp_path, service.store, service.maps)
        try:
            path = await service.fetch(m)
            assert path.read_bytes() == data
        finally:
            await service.stop()


# --- a cluster whose nodes have their own directories ------------------------------------------------


class Cluster:
    def __init__(self, nodes: list[Any], repos: list[Path], session: aiohttp.ClientSession) -> None:
        self.nodes = nodes
        self.repos = repos
        self.session = session

    def url(self, i: int, path: str) -> str:
        return f"http://127.0.0.1:{self.nodes[i].management.port}{path}"

    async def put(self, i: int, path: str, data: bytes, **params: str) -> tuple[int, Any]:
        async with self.session.put(self.url(i, path), data=data, params=params) as r:
            return r.status, await r.json(content_type=None)

    async def upload(self, i: int, wheel: Path, name: str | None = None, **params: str) -> tuple[int, Any]:
        return await self.put(i, f"{P}/files/{name or wheel.name}", wheel.read_bytes(), **params)

    async def get(self, i: int, path: str, **kw: Any) -> tuple[int, bytes, str]:
        async with self.session.get(self.url(i, path), **kw) as r:
            return r.status, await r.read(), r.headers.get("Content-Type", "")

    async def manifests(self, i: int = 0) -> list[dict[str, Any]]:
        status, body, _ = await self.get(i, f"{P}/artifacts")
        assert status == 200
        return list(json.loads(body))


async def _start(tmp_path: Path, repos: list[Path], api_key: str | None = None) -> list[Any]:
    from aether.api.server import ManagementServer
    from aether.node.node import Node

    configs = node_configs(tmp_path, len(repos), api_key=api_key)
    nodes = [
        Node(msgspec.structs.replace(c, repository=str(repo)), management_api=ManagementServer)
        for c, repo in zip(configs, repos, strict=True)
    ]
    for n in nodes:
        await n.start()
    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while not all(n.leader.leader == "node-1" and n.transport.has_quorum() for n in nodes):
        assert loop.time() < end, "no leader in 15 s"
        await asyncio.sleep(0.02)
    return nodes


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    repos = [tmp_path / f"repo{i}" for i in range(3)]
    with isolated_imports():
        nodes = await _start(tmp_path, repos)
        try:
            async with aiohttp.ClientSession() as s:
                yield Cluster(nodes, repos, s)
        finally:
            for n in nodes:
                await n.stop()


def _hello(tmp: Path, version: str = "0.1.0", body: str = "") -> Path:
    return build_slice_wheel(tmp, f"org.example:hello:{version}", HELLO + body, "Hello", module="hello_slice")


async def test_upload_is_stored_everywhere_idempotent_and_immutable(cluster: Cluster, tmp_path: Path) -> None:
    w = _hello(tmp_path / "w")
    sha = hashlib.sha256(w.read_bytes()).hexdigest()
    status, doc = await cluster.upload(1, w, sha256=sha)
    assert status == 201 and doc["created"] is True, doc
    m = doc["manifest"]
    assert (m["coords"], m["sha256"], m["size"]) == ("org.example:hello:0.1.0", sha, w.stat().st_size)
    # visible through every node once committed; the same bytes again are a no-op (200)
    for i in range(3):
        for _ in range(100):
            if await cluster.manifests(i):
                break
            await asyncio.sleep(0.05)
        assert [x["filename"] for x in await cluster.manifests(i)] == [w.name]
    status, doc = await cluster.upload(2, w)
    assert status == 200 and doc["created"] is False
    # other bytes under the same version: 409, and the stored wheel is unchanged
    other = _hello(tmp_path / "w2", body="\n# changed\n")
    assert other.name == w.name
    status, doc = await cluster.upload(0, other)
    assert status == 409 and "already in the repository with other content" in doc["detail"], doc
    status, body, ctype = await cluster.get(2, f"{P}/files/{w.name}")
    assert status == 200 and body == w.read_bytes() and ctype == "application/octet-stream"


async def _holders(cluster: Cluster, i: int) -> list[str]:
    return [m["project"] for m in await cluster.manifests(i) if m["coords"] == "org.example:hello:0.1.0"]


async def test_two_projects_racing_for_one_slice_coordinates_on_two_nodes_one_wins(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen: "another project declares the same coordinates" was checked against the uploading
    node's replica only: two uploads of different projects declaring one slice's coordinates,
    through two nodes at once (both past the check before either manifest committed; here held
    there until both are), both answered 201, and the cluster held two wheels for one slice.
    Now the coordinates are claimed with compare-and-set before the manifest: one 201, one 409."""
    from aether.repository.service import ArtifactService

    a = _hello(tmp_path / "a")
    b = build_slice_wheel(
        tmp_path / "b", "org.example:hello:0.1.0", HELLO, "Hello", module="hello_slice",
        dist_name="hello-fork",
    )
    arrived: list[str] = []
    both = asyncio.Event()
    real = ArtifactService._ensure_map

    async def together(self: ArtifactService, *args: Any) -> None:  # both uploads passed the early check
        arrived.append(self.log.name)
        if len(arrived) == 2:
            both.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(both.wait(), 10)
        await real(self, *args)

    monkeypatch.setattr(ArtifactService, "_ensure_map", together)
    (s1, d1), (s2, d2) = await asyncio.gather(cluster.upload(0, a), cluster.upload(1, b))
    assert len(arrived) == 2, arrived
    assert sorted([s1, s2]) == [201, 409], (d1, d2)
    loser = d1 if s1 == 409 else d2
    assert "org.example:hello:0.1.0" in loser["detail"] and "same coordinates" in loser["detail"], loser
    for i in range(3):
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not await _holders(cluster, i):
            assert loop.time() < end
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert len(found := await _holders(cluster, i)) == 1, (i, found)


async def test_bad_uploads_are_refused_and_leave_nothing(cluster: Cluster, tmp_path: Path) -> None:
    w = _hello(tmp_path / "w")
    data = w.read_bytes()
    name = w.name
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("hello.txt", data, {}, 400, "not a wheel"),
        (name, b"this is not a zip file", {}, 400, "not a zip archive"),
        (name, data, {"sha256": "0" * 64}, 400, "sha256 mismatch"),
        (name.replace("0.1.0", "0.9.0"), data, {}, 400, "file name says version 0.9.0"),
    ]
    # a corrupt zip: one member's bytes changed (same length) after the wheel was built
    corrupt = bytearray(data)
    with zipfile.ZipFile(w) as zf:
        info = zf.getinfo("hello_slice/__init__.py")
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    corrupt[offset + 5] ^= 0xFF
    cases.append((name, bytes(corrupt), {}, 400, "hello_slice/__init__.py"))
    for filename, body, params, want, says in cases:
        status, doc = await cluster.put(0, f"{P}/files/{filename}", body, **params)
        assert status == want and says in doc["detail"], (filename, doc)
        assert doc["type"] and doc["title"]
    cluster.nodes[0].artifacts.max_upload = 1000
    status, doc = await cluster.upload(0, w)
    assert status == 413 and "1000-byte limit" in doc["detail"], doc
    assert await cluster.manifests(0) == []
    assert list((cluster.nodes[0].config.data_path / "repository").iterdir()) == []  # no upload left over


async def test_a_malformed_upload_is_named_by_its_file_name_not_the_nodes_temporary(
    cluster: Cluster, tmp_path: Path
) -> None:
    # found walking docs/repository.md: a truncated wheel or a non-zip answered
    # "/DATA/repository/upload-3z89/NAME: not a wheel (...)", the node's private temporary path
    w = _hello(tmp_path / "w")
    data = w.read_bytes()
    data_dir = str(cluster.nodes[0].config.data_path)
    for body in (data[:800], b"hello\n"):
        status, doc = await cluster.put(0, f"{P}/files/{w.name}", body)
        assert status == 400, doc
        assert doc["detail"].startswith(f"{w.name}: not a wheel"), doc
        assert data_dir not in doc["detail"] and "upload-" not in doc["detail"], doc


async def test_an_upload_without_quorum_is_a_503_saying_so_at_once(cluster: Cluster, tmp_path: Path) -> None:
    # found walking docs/repository.md with two of three nodes killed: the upload's chunk writes
    # retried for their budget (~28 s), the CLI gave up first ("took the request but gave no
    # answer within 15 s"), and the 503 that came later named a map partition, not the quorum
    w = _hello(tmp_path / "w")
    for n in cluster.nodes[1:]:
        await n.stop()
    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while cluster.nodes[0].has_quorum():
        assert loop.time() < end, "node-1 still reports a quorum"
        await asyncio.sleep(0.05)
    # the answer comes before a byte of the body is read: the request head alone gets it
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.nodes[0].management.port)
    try:
        size = w.stat().st_size
        writer.write(f"PUT {P}/files/{w.name} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        field = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
        length = int(field.split(b":")[1])
        doc = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 503"), (head, doc)
    assert doc["detail"].startswith("no quorum: this node cannot reach a majority"), doc
    assert w.name in doc["detail"] and "nothing was stored" in doc["detail"], doc
    status, doc = await cluster.upload(0, w)  # and a client sending the body whole gets the same
    assert status == 503 and doc["detail"].startswith("no quorum"), doc
    assert list((cluster.nodes[0].config.data_path / "repository").iterdir()) == []


async def test_an_upload_the_map_does_not_take_in_time_is_a_503_the_cli_tries_again(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # found by an audit, then seen with real processes (a node SIGSTOPped, heartbeat timeout 20 s):
    # the chunk writes of an upload retried for up to 30 s while a partition was being taken over,
    # and the CLI, which waits 15 s + 1 s per MiB, gave up first ("took the request but gave no
    # answer"; the node stored the wheel at 21 s). Now the node answers 503 with Retry-After within
    # its bound (`core.upload_wait`, below the CLI's wait) and the CLI sends the wheel again.
    # Here both waits are scaled down: the node's 1 s, the CLI's 4 s (--timeout 4)
    from click.testing import CliRunner

    from aether.cli.main import main

    monkeypatch.setattr(core, "UPLOAD_WAIT", 1.0, raising=False)
    service = cluster.nodes[0].artifacts
    real = service.maps
    stuck: list[str] = []  # the upload ids whose chunk writes never get an answer: the first one's

    class FirstUploadStuck:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def map_put(self, name: str, key: str, value: bytes, **kw: Any) -> None:
            upload = key.split("/")[1]
            if not stuck or stuck == [upload]:
                stuck[:] = [upload]
                await asyncio.Event().wait()  # a partition that does not answer
            await real.map_put(name, key, value, **kw)

    monkeypatch.setattr(service, "maps", FirstUploadStuck())
    w = _hello(tmp_path / "w")
    connect = f"127.0.0.1:{cluster.nodes[0].management.port}"
    r = await asyncio.to_thread(
        lambda: CliRunner().invoke(
            main, ["--connect", connect, "--timeout", "4", "artifact", "deploy", str(w)],
            env={"COLUMNS": "200"}, catch_exceptions=False,
        )
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"did not store the chunks of {w.name} within 1 s of the upload's start" in r.stderr, r.stderr
    assert "nothing was stored" in r.stderr and "trying again in 2 s (attempt 2 of 3)" in r.stderr, r.stderr
    assert "Stored org.example:hello:0.1.0" in r.stdout, r.stdout
    assert len(stuck) == 1 and [m["version"] for m in await cluster.manifests(0)] == ["0.1.0"]


def test_the_node_answers_an_upload_before_the_cli_gives_up() -> None:
    """The node's bound on an upload (`core.upload_wait`, from the request's start) is below the
    CLI's wait for its answer (`ManagementClient.upload`: the client's timeout, 15 s by default,
    plus 1 s per MiB) with room for the claim and the manifest, at every size the node takes."""
    import inspect

    from aether.client.management import DEFAULT_TIMEOUT, ManagementClient

    rate = inspect.signature(ManagementClient.upload).parameters["rate"].default
    for size in (0, 1, core.CHUNK_SIZE, 10 << 20, 64 << 20):
        assert core.upload_wait(size) + 4 <= DEFAULT_TIMEOUT + size / rate, size


async def test_maven_paths_and_delete(cluster: Cluster, tmp_path: Path) -> None:
    w1, w2 = _hello(tmp_path / "a"), _hello(tmp_path / "b", "0.2.0")
    base = f"{P}/maven/org/example/hello"
    status, doc = await cluster.put(0, f"{base}/0.2.0/{w1.name}", w1.read_bytes())
    assert status == 400 and "as the path says" in doc["detail"], doc
    for w, v in ((w1, "0.1.0"), (w2, "0.2.0")):
        status, doc = await cluster.put(0, f"{base}/{v}/{w.name}", w.read_bytes())
        assert status == 201, doc
    status, body, _ = await cluster.get(1, f"{base}/maven-metadata.xml")
    assert status == 200 and b"<version>0.1.0</version>" in body and b"<latest>0.2.0</latest>" in body
    status, body, _ = await cluster.get(1, f"{base}/0.2.0/{w2.name}")
    assert status == 200 and body == w2.read_bytes()
    async with cluster.session.delete(cluster.url(2, f"{base}/0.1.0/")) as r:
        assert r.status == 200, await r.text()
    assert [m["version"] for m in await cluster.manifests(2)] == ["0.2.0"]
    status, body, _ = await cluster.get(2, f"{base}/0.1.0/{w1.name}")
    assert status == 404
    async with cluster.session.delete(cluster.url(0, f"{P}/artifacts/hello/0.1.0")) as r:
        assert r.status == 404


def _hello_needing_tinylib(out: Path) -> Path:
    """The hello slice's wheel (org.example:hello:0.1.0), importing tinylib and requiring tinylib>=1.0."""
    src = HELLO.replace("class Hello", "import tinylib\n\nclass Hello")
    return build_slice_wheel(
        out, "org.example:hello:0.1.0", src, "Hello", module="hello_slice", requires=["tinylib>=1.0"]
    )


async def test_a_node_without_the_wheel_fetches_it_and_runs_it(cluster: Cluster, tmp_path: Path) -> None:
    """Node 1's directory is the bootstrap (published to the cluster at start); nodes 2 and 3 have
    empty directories and get the slice and its library from the cluster when they run it."""
    lib = build_library_wheel(tmp_path / "w", "tinylib", "1.0", {"tinylib/__init__.py": "VALUE = 7\n"})
    w = _hello_needing_tinylib(tmp_path / "w")
    for f in (w, lib):
        status, doc = await cluster.upload(0, f)
        assert status == 201, doc
    n1 = cluster.nodes[0]
    await n1.deployments.deploy(Artifact.parse("org.example:hello:0.1.0"), 3)
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while True:
        local = [
            n.slice_runtime.local_instances(Artifact.parse("org.example:hello:0.1.0")) for n in cluster.nodes
        ]
        if all(local):
            break
        assert loop.time() < end, [n.kv.list_local("slices/") for n in cluster.nodes]
        await asyncio.sleep(0.1)
    for repo in cluster.repos[1:]:
        assert (repo / "org" / "example" / "hello" / "0.1.0" / w.name).read_bytes() == w.read_bytes()
        assert (repo / "_libs" / lib.name).read_bytes() == lib.read_bytes()


async def _uploaded_and_listed_on_node_2(cluster: Cluster, tmp_path: Path) -> tuple[Path, Any]:
    """The hello wheel uploaded through node-1, once node-2's repository lists its version."""
    w = _hello(tmp_path / "w")
    assert (await cluster.upload(0, w))[0] == 201
    repo = cluster.nodes[1].repository
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not repo.versions("org.example:hello"):
        assert loop.time() < end
        await asyncio.sleep(0.05)
    return w, repo


async def test_a_corrupted_cache_is_fetched_again(cluster: Cluster, tmp_path: Path) -> None:
    w, repo = await _uploaded_and_listed_on_node_2(cluster, tmp_path)
    path = await asyncio.to_thread(repo.resolve, "org.example:hello:0.1.0")
    assert path.read_bytes() == w.read_bytes()
    path.write_bytes(b"garbage")
    again = await asyncio.to_thread(repo.resolve, "org.example:hello:0.1.0")
    assert again == path and path.read_bytes() == w.read_bytes()
    assert repo.dependencies("org.example:hello:0.1.0") == {}



async def test_a_fetch_leaves_the_temporary_of_a_fetch_running_in_another_node(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A fetch keeps one wheel per version directory by removing the others there: it removed as
    well the ``.tmp-*.whl`` another node sharing the directory was writing (whose rename then
    failed). Only the temporaries older than ten minutes are anyone's to remove (at a start)."""
    w, repo = await _uploaded_and_listed_on_node_2(cluster, tmp_path)
    path = await asyncio.to_thread(repo.resolve, "org.example:hello:0.1.0")
    running = path.parent / ".tmp-abc123.whl"  # another node's fetch, being written
    running.write_bytes(b"being written")
    path.write_bytes(b"garbage")  # fetched again
    again = await asyncio.to_thread(repo.resolve, "org.example:hello:0.1.0")
    assert again == path and path.read_bytes() == w.read_bytes()
    assert running.exists()


async def test_the_wheel_of_a_deployed_slice_is_not_deleted(cluster: Cluster, tmp_path: Path) -> None:
    """Seen: deleting the version a blueprint runs answered 200 and removed the wheel from the
    cluster and from the deleting node's directory: its running instances stayed, but a node
    that restarts (or lost its directory, or joins) could never load the slice again. Now the
    delete is a 409 naming the blueprint while one wants the version; after undeploy it goes."""
    w = _hello(tmp_path / "w")
    assert (await cluster.upload(0, w))[0] == 201
    coords = Artifact.parse("org.example:hello:0.1.0")
    n0 = cluster.nodes[0]
    await n0.deployments.deploy(coords, 3)
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while not all(n.slice_runtime.local_instances(coords) for n in cluster.nodes):
        assert loop.time() < end, [n.kv.list_local("slices/") for n in cluster.nodes]
        await asyncio.sleep(0.1)
    cached = cluster.repos[0] / "org" / "example" / "hello" / "0.1.0" / w.name
    assert cached.is_file()
    for url in (f"{P}/artifacts/hello/0.1.0", f"{P}/maven/org/example/hello/0.1.0/"):
        async with cluster.session.delete(cluster.url(0, url)) as r:
            doc = await r.json(content_type=None)
            assert r.status == 409, doc
        assert "org.example:hello:0.1.0 is deployed" in doc["detail"] and "undeploy" in doc["detail"], doc
    assert [m["version"] for m in await cluster.manifests(0)] == ["0.1.0"] and cached.is_file()
    await n0.deployments.undeploy(str(coords))
    end = loop.time() + 10
    while any(k.startswith("blueprints/") for k, _ in n0.kv.list_local("blueprints/")):
        assert loop.time() < end
        await asyncio.sleep(0.05)
    async with cluster.session.delete(cluster.url(0, f"{P}/artifacts/hello/0.1.0")) as r:
        assert r.status == 200, await r.text()
    assert await cluster.manifests(0) == []


async def test_bootstrap_publishes_the_local_directory(tmp_path: Path) -> None:
    from conftest import deploy_hello_examples

    repos = [tmp_path / "repo0", tmp_path / "repo1"]
    deploy_hello_examples(repos[0], tmp_path / "w")
    with isolated_imports():
        nodes = await _start(tmp_path, repos)
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while len(nodes[1].artifacts.manifests()) < 2:
                assert loop.time() < end, "the local directory was not published"
                await asyncio.sleep(0.1)
            assert nodes[1].repository.resolve_pattern("org.example:greeter", "^0.1.0") is not None
            assert nodes[1].repository.dependencies("org.example:greeter:0.1.0") == {
                "org.example:hello": VersionPattern.parse("^0.1.0")
            }
        finally:
            for n in nodes:
                await n.stop()


async def test_pip_installs_from_the_simple_index_with_a_key(tmp_path: Path) -> None:
    """A real pip, against a node with an API key: the key is the password of the index URL."""
    from aether.slices.wheel import inspect_wheel as _inspect

    key = "k" * 32
    w = _hello(tmp_path / "w")
    project = _inspect(w).canonical_name
    with isolated_imports():
        nodes = await _start(tmp_path, [tmp_path / "repo0"], api_key=key)
        try:
            base = f"http://127.0.0.1:{nodes[0].management.port}"
            async with aiohttp.ClientSession() as s:
                async with s.put(
                    f"{base}{P}/files/{w.name}", data=w.read_bytes(), headers={"X-API-Key": key}
                ) as r:
                    assert r.status == 201, await r.text()
                async with s.get(f"{base}{P}/simple/") as r:
                    assert r.status == 401
                basic = base64.b64encode(f"pip:{key}".encode()).decode()
                async with s.get(
                    f"{base}{P}/simple/{project}/", headers={"Authorization": f"Basic {basic}"}
                ) as r:
                    assert r.status == 200
                    assert f"#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}" in await r.text()
            target = tmp_path / "target"
            env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pip",
                "install",
                "--isolated",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--index-url",
                f"http://pip:{key}@127.0.0.1:{nodes[0].management.port}{P}/simple/",
                "--target",
                str(target),
                project,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 90)
            assert proc.returncode == 0, out.decode()
            assert (target / "hello_slice" / "__init__.py").is_file()
        finally:
            for n in nodes:
                await n.stop()
    shutil.rmtree(tmp_path / "target", ignore_errors=True)


async def test_cli_talks_to_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    """`aether --connect HOST:PORT artifact deploy|list|versions|delete` (a real click run)."""
    from click.testing import CliRunner

    from aether.cli.main import main

    lib = build_library_wheel(tmp_path / "w", "tinylib", "1.0")
    w = _hello(tmp_path / "w")
    connect = f"127.0.0.1:{cluster.nodes[1].management.port}"

    def aether(*args: str) -> Any:
        return CliRunner().invoke(
            main, ["--connect", connect, "artifact", *args], env={"COLUMNS": "200"}, catch_exceptions=False
        )

    r = await asyncio.to_thread(aether, "deploy", str(w), str(lib), "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [(x["kind"], x["created"]) for x in rows] == [("slice", True), ("library", True)]
    assert rows[0]["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    r = await asyncio.to_thread(aether, "deploy", str(w))
    assert r.exit_code == 0 and "Already stored (same sha256): org.example:hello:0.1.0" in r.output, r.output
    other = _hello(tmp_path / "w2", body="\n# changed\n")
    r = await asyncio.to_thread(aether, "deploy", str(other))
    assert r.exit_code == 1 and "already in the repository with other content" in r.output, r.output
    r = await asyncio.to_thread(aether, "list")
    assert r.exit_code == 0 and "org.example:hello" in r.output and "tinylib" not in r.output, r.output
    r = await asyncio.to_thread(aether, "list", "--libs", "--json")
    assert [x["wheel"] for x in json.loads(r.output)] == [lib.name]
    r = await asyncio.to_thread(aether, "versions", "org.example:hello")
    assert r.exit_code == 0 and r.output.split() == ["0.1.0"]
    r = await asyncio.to_thread(aether, "versions", "tinylib", "--json")
    assert json.loads(r.output) == ["1.0"]
    r = await asyncio.to_thread(aether, "delete", "org.example:hello:0.1.0")
    assert r.exit_code == 0 and "Deleted org.example:hello:0.1.0" in r.output, r.output
    r = await asyncio.to_thread(aether, "delete", "tinylib", "1.0")
    assert r.exit_code == 0, r.output
    r = await asyncio.to_thread(aether, "versions", "org.example:hello")
    assert r.exit_code == 1 and "no versions of org.example:hello in the cluster's repository" in r.output
    assert cluster.repos[1].exists() is False or not list(cluster.repos[1].rglob("*.whl"))


async def test_a_chunked_upload_over_the_api_body_limit_streams(cluster: Cluster, tmp_path: Path) -> None:
    """The middleware buffers at most 1 MiB of a body; an upload (here chunked, with no
    Content-Length) bypasses it and is streamed to disk under the repository's own limit."""
    from aether.api.common import MAX_BODY

    w = build_slice_wheel(
        tmp_path / "w",
        "org.example:big:1.0.0",
        HELLO,
        "Hello",
        module="big_slice",
        extra_files={"big_slice/payload.bin": os.urandom(2 * MAX_BODY)},
    )
    data = w.read_bytes()
    assert len(data) > MAX_BODY

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    async with cluster.session.put(cluster.url(0, f"{P}/files/{w.name}"), data=body()) as r:
        assert r.status == 201, await r.text()
        assert (await r.json())["manifest"]["chunks"] == core.chunk_count(len(data))
    status, got, _ = await cluster.get(2, f"{P}/files/{w.name}")
    assert status == 200 and got == data


async def test_malformed_basic_credentials_are_a_401(tmp_path: Path) -> None:
    with isolated_imports():
        nodes = await _start(tmp_path, [tmp_path / "repo0"], api_key="k" * 32)
        try:
            url = f"http://127.0.0.1:{nodes[0].management.port}{P}/simple/"
            async with aiohttp.ClientSession() as s:
                for header, status in (
                    ("Basic !!!", 401),
                    ("Basic " + base64.b64encode(b"u:wrong").decode(), 401),
                ):
                    async with s.get(url, headers={"Authorization": header}) as r:
                        assert r.status == status, await r.text()
                        assert r.content_type == "application/problem+json"
        finally:
            for n in nodes:
                await n.stop()


async def test_a_connect_on_the_command_line_wins_over_aether_repository(
    cluster: Cluster, tmp_path: Path
) -> None:
    # found walking docs/cli.md on a local cluster with AETHER_REPOSITORY exported (as for
    # `aether cluster start`): `aether --connect H:P artifact deploy W` copied W into that
    # directory ("Deployed ... to DIR"), where the cluster never saw it, and `artifact list`
    # listed the directory
    from click.testing import CliRunner

    from aether.cli.main import main

    w = _hello(tmp_path / "w")
    env_dir = tmp_path / "env-repository"
    env = {"AETHER_REPOSITORY": str(env_dir), "COLUMNS": "200"}
    connect = f"127.0.0.1:{cluster.nodes[0].management.port}"

    def aether(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    r = await asyncio.to_thread(aether, "--connect", connect, "artifact", "deploy", str(w))
    assert r.exit_code == 0 and "Stored org.example:hello:0.1.0" in r.stdout, r.output
    assert not list(env_dir.rglob("*.whl"))
    assert [m["version"] for m in await cluster.manifests(0)] == ["0.1.0"]
    r = await asyncio.to_thread(aether, "--connect", connect, "artifact", "list")
    assert r.exit_code == 0 and "org.example:hello" in r.stdout, r.output
    # without --connect the variable still names the directory, and the CLI says so
    r = await asyncio.to_thread(aether, "artifact", "deploy", str(w))
    assert r.exit_code == 0 and f"to {env_dir}" in r.stdout, r.output
    note = f"note: working on the directory {env_dir} (AETHER_REPOSITORY), not on a node"
    assert note in r.stderr, r.stderr
    # and --repository given with the command is a directory, --connect or not
    r = await asyncio.to_thread(
        aether, "--connect", connect, "artifact", "list", "--repository", str(env_dir)
    )
    assert r.exit_code == 0 and "note:" not in r.stderr and "org.example:hello" in r.stdout, r.output


def test_cli_without_a_node_or_directory_falls_back_to_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --connect, no --repository, no node at the default address: ~/.aether/repository, with a
    note; an explicit --connect to nothing is an error (exit 3), never a silent fallback."""
    from click.testing import CliRunner

    from aether.cli.client import ApiUnreachable, ManagementClient
    from aether.cli.main import main

    def unreachable(self: ManagementClient, *a: Any, **kw: Any) -> Any:
        raise ApiUnreachable(self.target, "connection refused")

    monkeypatch.setattr(ManagementClient, "request", unreachable)
    monkeypatch.setattr(ManagementClient, "request_raw", unreachable)
    monkeypatch.delenv("AETHER_REPOSITORY", raising=False)
    monkeypatch.delenv("AETHER_CONNECT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _hello(tmp_path / "w")
    r = CliRunner().invoke(main, ["artifact", "deploy", str(next((tmp_path / "w").glob("*.whl")))])
    assert r.exit_code == 0, r.output
    assert "note: no node answers at 127.0.0.1:9000" in r.output
    assert list((tmp_path / ".aether" / "repository").rglob("*.whl"))
    r = CliRunner().invoke(main, ["--connect", "127.0.0.1:1", "artifact", "list"])
    assert r.exit_code == 3 and "cannot reach" in r.output, r.output


def test_cli_delete_refuses_an_extra_or_misplaced_version_and_deletes_nothing(tmp_path: Path) -> None:
    """Found walking docs/cli.md: `aether artifact delete G:A:V X` deleted G:A:V and ignored X."""
    from click.testing import CliRunner

    from aether.cli.main import main

    w = _hello(tmp_path / "w")
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["artifact", "deploy", "--repository", str(repo), str(w)])
    assert r.exit_code == 0, r.output
    for args, says in (
        (["org.example:hello:0.1.0", "0.2.0"], "names its version already; the extra argument '0.2.0'"),
        (["org.example:hello", "0.1.0"], "give the slice as org.example:hello:0.1.0"),
    ):
        r = CliRunner().invoke(main, ["artifact", "delete", *args, "--repository", str(repo)])
        assert r.exit_code == 2 and says in r.output, (args, r.output)
        assert list(repo.rglob("*.whl")), args  # nothing deleted
    r = CliRunner().invoke(main, ["artifact", "delete", "org.example:hello:0.1.0", "--repository", str(repo)])
    assert r.exit_code == 0 and not list(repo.rglob("*.whl")), r.output


async def test_an_upload_that_stops_sending_is_a_408(cluster: Cluster, tmp_path: Path) -> None:
    from aether.api.server import ManagementServer

    node = cluster.nodes[0]
    server = ManagementServer(node, host="127.0.0.1", port=0, body_timeout=0.3)  # type: ignore[arg-type]
    await server.start()
    try:
        data = _hello(tmp_path / "w").read_bytes()

        async def body() -> AsyncIterator[bytes]:
            yield data[:100]
            await asyncio.sleep(3)
            yield data[100:]

        url = f"http://127.0.0.1:{server.port}{P}/files/hello-0.1.0-py3-none-any.whl"
        async with cluster.session.put(url, data=body()) as r:
            assert r.status == 408, await r.text()
            assert "no upload data received for 0.3 s" in (await r.json())["detail"]
    finally:
        await server.stop()
    assert await cluster.manifests(0) == []



@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upload_cut_off_mid_body_stores_nothing_and_is_no_internal_error(
    cluster: Cluster, tmp_path: Path, framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes the connection halfway through the body: nothing is stored and no
    upload file stays (checked). Seen: the ConnectionResetError of the body escaped the handler,
    logged as an internal error with its traceback ('management API: PUT ... failed', a 500)."""
    data = _hello(tmp_path / "w").read_bytes()
    node = cluster.nodes[0]
    path = f"{P}/files/hello-0.1.0-py3-none-any.whl"
    half = data[: len(data) // 2]
    if framing == "content-length":
        request = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + half
    else:
        request = (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{len(half):x}\r\n".encode()
            + half
            + b"\r\n"
        )
    caplog.set_level("INFO")
    _, writer = await asyncio.open_connection("127.0.0.1", node.management.port)
    writer.write(request)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not any("cut off" in r.getMessage() for r in caplog.records):
        assert loop.time() < end, [r.getMessage() for r in caplog.records if r.name.startswith("aether.api")]
        await asyncio.sleep(0.05)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("aether.api")]
    assert errors == [], [r.getMessage() for r in errors]
    assert await cluster.manifests(0) == []
    assert list((node.config.data_path / "repository").iterdir()) == []

async def test_nodes_sharing_a_directory_publish_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bootstrap publishing is staggered by rank (1 + 2k s): node-1 uploads the shared directory's
    wheels; node-2 and node-3 find them in the cluster and upload nothing while it starts."""
    from aether.repository.service import ArtifactService
    from conftest import deploy_hello_examples

    uploads: list[str] = []
    real = ArtifactService.upload

    async def counting(self: ArtifactService, *a: Any, **kw: Any) -> Any:
        uploads.append(self.log.name)
        return await real(self, *a, **kw)

    monkeypatch.setattr(ArtifactService, "upload", counting)
    repo = tmp_path / "shared"
    deploy_hello_examples(repo, tmp_path / "w")
    with isolated_imports():
        nodes = await _start(tmp_path, [repo, repo, repo])
        try:
            await asyncio.sleep(6.5)  # past node-3's turn (5 s)
            assert uploads == ["aether.repository.node-1"] * 2, uploads
            assert len(nodes[2].artifacts.manifests()) == 2
        finally:
            for n in nodes:
                await n.stop()


async def test_a_loader_thread_waiting_on_a_fetch_is_released_when_the_service_stops(tmp_path: Path) -> None:
    from aether.repository.errors import RepositoryUnavailable
    from aether.repository.service import ArtifactService
    from aether.slices.repository import Repository

    never = asyncio.Event()

    class StuckMap:
        async def map_get(self, name: str, key: str) -> bytes | None:
            await never.wait()
            return None

    service = ArtifactService(
        None,  # type: ignore[arg-type]
        StuckMap(),  # type: ignore[arg-type]
        members=1,
        cache=Repository(tmp_path / "repo"),
        work_dir=tmp_path / "work",
    )
    service.bind()
    m = _manifest()
    waiting = asyncio.ensure_future(asyncio.to_thread(service.call, service.fetch(m, tmp_path / "x.whl")))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await service.stop()
    with pytest.raises(RepositoryUnavailable, match="stopped"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(RepositoryUnavailable):
        await asyncio.to_thread(service.call, service.manifests_async())


async def test_chunk_reads_and_writes_wait_out_a_map_that_is_not_serving_yet(tmp_path: Path) -> None:
    """A map defined a moment ago answers MapUnavailable until its partitions are taken over: the
    service retries (idempotent: content-addressed chunks) within its budget, then gives up."""
    from aether.core.maps import MapUnavailable
    from aether.repository.service import ArtifactService
    from aether.slices.repository import Repository

    class FlakyMap:
        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.data: dict[str, bytes] = {}

        async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
            if self.failures > 0:
                self.failures -= 1
                raise MapUnavailable("not serving yet")
            self.data[key] = value

        async def map_get(self, name: str, key: str) -> bytes | None:
            if self.failures > 0:
                self.failures -= 1
                raise MapUnavailable("not serving yet")
            return self.data.get(key)

    flaky = FlakyMap(2)
    service = ArtifactService(
        None,  # type: ignore[arg-type]
        flaky,  # type: ignore[arg-type]
        members=1,
        cache=Repository(tmp_path / "repo"),
        work_dir=tmp_path / "work",
        map_budget=5.0,
    )
    await service._retrying(lambda: flaky.map_put("m", "k", b"v"))
    assert flaky.data == {"k": b"v"}
    flaky.failures = 1
    assert await service._retrying(lambda: flaky.map_get("m", "k")) == b"v"
    flaky.failures = 100
    service.map_budget = 0.5
    with pytest.raises(MapUnavailable):
        await service._retrying(lambda: flaky.map_get("m", "k"))


async def test_the_chunk_map_is_defined_after_the_first_takeover(tmp_path: Path) -> None:
    """Defining the chunk map while the cluster's first partition takeover runs was seen to stall
    it (about 1 run in 8 of a fresh in-process cluster): the service waits for every partition
    to have an active configuration first (within its budget)."""
    from aether.core.maps import PartitionTable
    from aether.repository.service import ArtifactService
    from aether.slices.repository import Repository

    table: list[PartitionTable | None] = [None]
    defined: list[float] = []

    class Maps:
        async def define(self, name: str, spec: Any) -> bool:
            defined.append(asyncio.get_running_loop().time())
            return True

    service = ArtifactService(
        None,  # type: ignore[arg-type]
        Maps(),  # type: ignore[arg-type]
        members=3,
        cache=Repository(tmp_path / "r"),
        work_dir=tmp_path / "w",
        partition_table=lambda: table[0],
    )
    assert not core.maps_serving(None)
    owners = [[0]] * 4
    assert not core.maps_serving(PartitionTable(1, 4, ["a"], owners, [0, 1, 1, 1]))
    assert core.maps_serving(PartitionTable(2, 4, ["a"], owners, [1, 2, 1, 2]))
    # an upload's wait is bounded (`core.upload_wait`): past it the map is still not defined
    # during the takeover, the upload answers 503 to be tried again
    import time

    from aether.core.maps import MapUnavailable

    with pytest.raises(MapUnavailable, match="first takeover"):
        await service._ensure_map(time.monotonic() + 0.2)
    assert defined == []
    task = asyncio.ensure_future(service._ensure_map())
    await asyncio.sleep(0.3)
    assert defined == [] and not task.done()
    table[0] = PartitionTable(1, 4, ["a"], owners, [1, 1, 1, 1])
    await asyncio.wait_for(task, 5)
    assert len(defined) == 1


# --- garbage, deleted versions' files, linearizable "already there" ------------------------------------


def test_orphan_uploads_are_found_and_counted_from_their_first_sighting() -> None:
    a, b = "a" * 64, "b" * 64
    listed = _manifest(sha256=a, upload="u1", chunks=2)
    legacy = _manifest(project="old", sha256=b, upload="", chunks=1)
    keys = [
        core.chunk_key(a, 0, "u1"), core.chunk_key(a, 1, "u1"),  # the listed version's
        core.chunk_key(a, 0, "u2"), core.chunk_key(a, 1, "u2"),  # an interrupted upload of the same bytes
        core.chunk_key(b, 0),  # a manifest's written before uploads had ids
        core.chunk_key("c" * 64, 0),  # such chunks no manifest refers to
        "not-a-chunk", f"{a}/u3/x", f"{'g' * 64}/u4/0",  # left alone
    ]  # fmt: skip
    assert core.chunk_upload(core.chunk_key(a, 7, "u1")) == (a, "u1")
    assert core.chunk_upload(core.chunk_key(b, 7)) == (b, "")
    orphans = core.orphan_uploads(keys, [listed, legacy])
    assert orphans == {
        (a, "u2"): [core.chunk_key(a, 0, "u2"), core.chunk_key(a, 1, "u2")],
        ("c" * 64, ""): [core.chunk_key("c" * 64, 0)],
    }
    t = core.OrphanTracker(60.0)
    assert t.observe(orphans, 100.0) == []
    assert t.observe(orphans, 159.0) == []
    assert t.observe([(a, "u2")], 160.0) == [(a, "u2")]  # ("c"*64, "") was not an orphan this pass
    assert t.observe(orphans, 170.0) == [(a, "u2")]  # ...so it counts again from 170
    assert t.observe(orphans, 230.0) == [(a, "u2"), ("c" * 64, "")]
    t.reset()
    assert t.observe(orphans, 1000.0) == []
    with pytest.raises(ValueError, match="positive"):
        core.OrphanTracker(0)
    assert not core.upload_overdue(1799.0, 3600.0) and core.upload_overdue(1801.0, 3600.0)


def test_orphan_claims_are_the_claims_of_versions_without_a_manifest() -> None:
    """The claims the collector may release: of a version with no manifest, never of a listed one;
    a claim taken again (another upload, another time) is another claim, counted from its own
    first sighting."""
    from aether.kv.keys import CoordinatesClaim, CoordinatesClaimKey

    listed = _manifest(version="0.2.0", coords="org.example:hello:0.2.0")
    held = CoordinatesClaim(listed.project, listed.version, 5.0)
    lost = CoordinatesClaim("hello", "0.1.0", 7.0)
    claims = [
        (str(CoordinatesClaimKey("org.example:hello:0.2.0")), held),
        (str(CoordinatesClaimKey("org.example:hello:0.1.0")), lost),
        ("repository-coords/org.example:x:1.0.0", "not a claim"),
    ]
    orphans = core.orphan_claims(claims, [listed])
    ref = ("org.example:hello:0.1.0", "hello", "0.1.0", 7.0)
    assert orphans == {ref: lost}
    assert core.orphan_claims(claims, [listed, _manifest(project="hello", version="0.1.0")]) == {}
    t: core.OrphanTracker[core.ClaimRef] = core.OrphanTracker(60.0)
    assert t.observe(orphans, 100.0) == [] and t.observe(orphans, 160.0) == [ref]
    again = ("org.example:hello:0.1.0", "hello", "0.1.0", 8.0)  # released, taken by a new upload
    assert t.observe([again], 170.0) == [] and t.observe([again], 230.0) == [again]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_leader_removes_the_chunks_of_an_interrupted_upload_after_the_orphan_age(
    tmp_path: Path,
) -> None:
    """Seen: an upload interrupted after writing its chunks (its node crashed; here the manifest's
    compare-and-set timed out, outcome unknown) left them in the map for good: no collector.
    Now the leader removes the chunks no manifest refers to once they were orphans for the
    orphan age, never a listed version's, and nothing while it is not the leader."""
    from aether.core.errors import CommitTimeout

    listed = build_library_wheel(tmp_path / "w", "tinylib", "1.0")
    lost = build_library_wheel(tmp_path / "w", "lostlib", "2.0")

    class CrashingStore(MemoryStore):
        async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
            if str(key) == "repository/lostlib/2.0":
                raise CommitTimeout("not committed within 5.0s (outcome unknown)")
            return await super().compare_and_set(key, expected, new, timeout)

    clock, leader = Clock(), [True]
    service = _service(
        tmp_path, CrashingStore(), orphan_age=60.0, monotonic=clock, is_leader=lambda: leader[0]
    )
    maps = service.maps
    try:
        m, created = await service.upload(_bytes(listed.read_bytes()), listed.name)
        assert created
        with pytest.raises(CommitTimeout):
            await service.upload(_bytes(lost.read_bytes()), lost.name)
        mine = {core.chunk_key(m.sha256, i, m.upload) for i in range(m.chunks)}
        left = set(maps.data[core.MAP_NAME]) - mine
        assert left, "the interrupted upload left chunks"
        assert await service.collect_orphans() == 0  # first seen now
        clock.now += 59
        assert await service.collect_orphans() == 0
        leader[0] = False  # another node leads meanwhile: nothing removed, and the count starts over
        clock.now += 10
        assert await service.collect_orphans() == 0
        leader[0] = True
        assert await service.collect_orphans() == 0
        assert set(maps.data[core.MAP_NAME]) == mine | left
        clock.now += 60
        assert await service.collect_orphans() == len(left)
        assert set(maps.data[core.MAP_NAME]) == mine
        path = await service.fetch(m, tmp_path / "fetched" / listed.name)
        assert path.read_bytes() == listed.read_bytes()
        clock.now += 1000
        assert await service.collect_orphans() == 0 and set(maps.data[core.MAP_NAME]) == mine
    finally:
        await service.stop()


async def test_the_leader_releases_the_claim_of_an_interrupted_upload_after_the_orphan_age(
    tmp_path: Path,
) -> None:
    """Seen: a slice upload interrupted between claiming its coordinates and writing its manifest
    (its node crashed; here the manifest's compare-and-set timed out, outcome unknown) left the
    claim `repository-coords/...` for good: the collector took its chunks, and only deleting the
    version by hand freed the coordinates. Now the leader releases a claim whose version has no
    manifest once it has seen it so for the orphan age (as the chunks), never a listed version's
    claim nor anything while it is not the leader; another project may then take the coordinates."""
    from aether.core.errors import CommitTimeout
    from aether.kv.keys import CoordinatesClaim, CoordinatesClaimKey

    listed = _hello(tmp_path / "listed", "0.2.0")
    lost = _hello(tmp_path / "lost", "0.1.0")
    other = build_slice_wheel(
        tmp_path / "other", "org.example:hello:0.1.0", HELLO, "Hello", module="hello_slice",
        dist_name="hello-fork",
    )  # fmt: skip

    class CrashingStore(MemoryStore):
        async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
            if str(key) == "repository/hello/0.1.0" and new is not None:
                raise CommitTimeout("not committed within 5.0s (outcome unknown)")
            return await super().compare_and_set(key, expected, new, timeout)

    clock, leader = Clock(), [True]
    store = CrashingStore()
    service = _service(tmp_path, store, orphan_age=60.0, monotonic=clock, is_leader=lambda: leader[0])
    lost_key = CoordinatesClaimKey("org.example:hello:0.1.0")
    listed_key = CoordinatesClaimKey("org.example:hello:0.2.0")
    try:
        _, created = await service.upload(_bytes(listed.read_bytes()), listed.name)
        assert created
        with pytest.raises(CommitTimeout):
            await service.upload(_bytes(lost.read_bytes()), lost.name)
        claim = store.get_local(lost_key)
        assert isinstance(claim, CoordinatesClaim)
        assert (claim.project, claim.version) == ("hello", "0.1.0")
        await service.collect_orphans()  # first seen now
        clock.now += 59
        await service.collect_orphans()
        leader[0] = False  # another node leads meanwhile: nothing released, and the count starts over
        clock.now += 10
        await service.collect_orphans()
        leader[0] = True
        await service.collect_orphans()
        assert store.get_local(lost_key) == claim
        with pytest.raises(ArtifactConflict, match=r"claimed by hello 0\.1\.0, whose upload has not"):
            await service.upload(_bytes(other.read_bytes()), other.name)
        clock.now += 60
        await service.collect_orphans()
        assert store.get_local(lost_key) is None
        assert isinstance(store.get_local(listed_key), CoordinatesClaim)  # the listed version's stays
        clock.now += 1000
        await service.collect_orphans()
        assert isinstance(store.get_local(listed_key), CoordinatesClaim)
        _, created = await service.upload(_bytes(other.read_bytes()), other.name)
        got = store.get_local(lost_key)
        assert created and (got.project, got.version) == ("hello-fork", "0.1.0")
    finally:
        await service.stop()


async def test_a_claim_whose_manifest_appears_while_it_is_released_is_taken_back(tmp_path: Path) -> None:
    """The collector's release of an orphan claim races the upload's manifest (written between
    the collector's consensus read of it and the release): the claim is put back, so a listed
    version keeps its claim."""
    from aether.kv.keys import CoordinatesClaim, CoordinatesClaimKey

    w = _hello(tmp_path / "w")
    key = CoordinatesClaimKey("org.example:hello:0.1.0")
    claim = CoordinatesClaim("hello", "0.1.0", 1.0)
    late: list[ArtifactManifest] = []

    class RacingStore(MemoryStore):
        async def compare_and_set(self, k: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
            done = await super().compare_and_set(k, expected, new, timeout)
            if str(k) == str(key) and new is None and late:  # the upload's manifest lands now
                await self.put(ArtifactKey("hello", "0.1.0"), late.pop())
            return done

    clock, store = Clock(), RacingStore()
    service = _service(tmp_path, store, orphan_age=60.0, monotonic=clock)
    try:
        m, _ = await service.upload(_bytes(w.read_bytes()), w.name)
        await service.delete("hello", "0.1.0")
        await store.put(key, claim)  # as the upload of the same bytes took it before its manifest
        late.append(m)
        assert await service.collect_claims() == 0
        clock.now += 60
        assert await service.collect_claims() == 0
        assert isinstance(store.get_local(ArtifactKey("hello", "0.1.0")), ArtifactManifest)
        assert store.get_local(key) == claim
    finally:
        await service.stop()


async def test_an_upload_slower_than_half_the_orphan_age_is_refused_and_leaves_no_chunks(
    tmp_path: Path,
) -> None:
    """An upload in progress must never lose its chunks to the collector: one whose chunks took
    longer than half the orphan age to write does not write its manifest (503 naming the
    setting) and removes its chunks; the collector only removes chunks orphaned for the age."""
    from aether.core.problem import problem_for

    w = build_library_wheel(tmp_path / "w", "tinylib", "1.0")
    clock = Clock()

    class SlowMaps(MemoryMaps):
        async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
            clock.now += 31  # each chunk write takes 31 s
            await super().map_put(name, key, value, ttl=ttl)

    service = _service(tmp_path, maps=SlowMaps(), orphan_age=60.0, monotonic=clock)
    try:
        with pytest.raises(Exception) as ei:
            await service.upload(_bytes(w.read_bytes()), w.name)
        problem = problem_for(ei.value)
        assert problem.status == 503 and "half the repository's orphan age (60 s)" in problem.detail
        assert service.manifests() == [] and service.maps.data[core.MAP_NAME] == {}
        service.orphan_age = 3600.0
        _, created = await service.upload(_bytes(w.read_bytes()), w.name)
        assert created
    finally:
        await service.stop()


class Replicated:
    """A store's committed state and one replica per node; a replica applies what was committed
    only when its node goes through consensus (Rabia: the store answers once the local replica
    applied the slot), so a node that does not lags behind the others' writes."""

    def __init__(self) -> None:
        self.committed: dict[str, Any] = {}

    def node(self) -> ReplicaStore:
        return ReplicaStore(self)


class ReplicaStore(MemoryStore):
    def __init__(self, cluster: Replicated) -> None:
        super().__init__()
        self.cluster = cluster

    def catch_up(self) -> None:
        self.data = dict(self.cluster.committed)

    async def get(self, key: Any, timeout: float = 5.0) -> Any:
        self.catch_up()
        return self.get_local(key)

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int:
        self.cluster.committed[str(key)] = value
        self.catch_up()
        return 0

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool:
        self.catch_up()
        ok = await super().compare_and_set(key, expected, new, timeout)
        self.cluster.committed = dict(self.data)
        return ok


@pytest.mark.parametrize("again", ["same bytes", "other bytes"])
async def test_already_there_is_not_answered_from_a_replica_that_missed_a_delete(
    tmp_path: Path, again: str
) -> None:
    """Seen: the early check of an upload read the node's own replica only. Just after a delete
    committed through another node, a replica that had not applied it yet answered an upload of
    the same bytes "200 already there" (nothing was stored: the version stayed deleted) and one
    of other bytes "409 other content". Now what the replica knows of the version is read again
    through consensus before it is the answer: both are stored."""
    w = _hello(tmp_path / "w")
    other = _hello(tmp_path / "other", body="\n# rebuilt\n")
    cluster, maps = Replicated(), MemoryMaps()
    a = _service(tmp_path / "a", cluster.node(), maps)
    b = _service(tmp_path / "b", cluster.node(), maps)
    try:
        first, created = await a.upload(_bytes(w.read_bytes()), w.name)
        assert created
        b.store.catch_up()  # node b applied the upload
        assert b.manifest(first.project, "0.1.0") == first
        await a.delete(first.project, "0.1.0")  # through node a; b's replica has not applied it
        assert b.manifest(first.project, "0.1.0") == first
        data = (w if again == "same bytes" else other).read_bytes()
        m, created = await b.upload(_bytes(data), w.name)
        assert created and m.sha256 == hashlib.sha256(data).hexdigest()
        assert cluster.committed[f"repository/{first.project}/0.1.0"] == m
        path = await a.fetch(m, tmp_path / "fetched" / w.name)
        assert path.read_bytes() == data
    finally:
        await a.stop()
        await b.stop()


async def test_a_file_kept_under_a_deleted_version_is_neither_listed_nor_loaded(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Seen: a node keeps a file under a deleted version when it holds other bytes than the
    deleted ones (not published at start-up, a warning), and the node's `Repository` still
    offered it through its local-directory fallback: listed among the versions, resolved, loaded.
    A deleted version ran on that one node. Now the fallback refuses it, naming the tombstone
    and the way to publish it; an upload of the version makes it loadable again."""
    from aether.slices.errors import ArtifactNotFound

    w = _hello(tmp_path / "w")
    rebuilt = _hello(tmp_path / "rebuilt", body="\n# rebuilt\n")
    status, doc = await cluster.upload(0, w)
    assert status == 201, doc
    project = doc["manifest"]["project"]
    async with cluster.session.delete(cluster.url(0, f"{P}/artifacts/{project}/0.1.0")) as r:
        assert r.status == 200, await r.text()
    node = cluster.nodes[1]
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while node.kv.get_local(f"repository-deleted/{project}/0.1.0") is None:
        assert loop.time() < end, "node-2 did not apply the delete"
        await asyncio.sleep(0.05)
    kept = cluster.repos[1] / "org" / "example" / "hello" / "0.1.0" / w.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(rebuilt, kept)  # what its start-up publishing keeps ("withhold")
    repo = node.repository
    with pytest.raises(ArtifactNotFound) as ei:
        await asyncio.to_thread(repo.resolve, "org.example:hello:0.1.0")
    says = str(ei.value)
    assert "org.example:hello:0.1.0 was deleted from the cluster's repository" in says, says
    assert f"repository-deleted/{project}/0.1.0" in says and str(kept) in says, says
    with pytest.raises(ArtifactNotFound, match="was deleted"):
        repo.resolve("org.example:hello:0.1.0")  # on the loop: the replica's tombstone
    assert repo.versions("org.example:hello") == [] and repo.list() == []
    assert repo.resolve_pattern("org.example:hello", "^0.1.0") is None
    # published on purpose: loadable again, the cluster's bytes
    status, doc = await cluster.upload(1, kept)
    assert status == 201, doc
    path = await asyncio.to_thread(repo.resolve, "org.example:hello:0.1.0")
    assert path.read_bytes() == rebuilt.read_bytes()
    assert [str(v) for v in repo.versions("org.example:hello")] == ["0.1.0"]


def test_the_orphan_age_is_a_node_setting_with_a_checked_range(tmp_path: Path) -> None:
    from aether.cli.main import build_node_config
    from aether.core.errors import ConfigError

    assert build_node_config(None, {}).repository_orphan_age == core.DEFAULT_ORPHAN_AGE == 3600.0
    cfg = tmp_path / "aether.toml"
    cfg.write_text("repository_orphan_age = 600\n")
    assert build_node_config(str(cfg), {}).repository_orphan_age == 600.0
    for bad in ("59", "3000000"):
        cfg.write_text(f"repository_orphan_age = {bad}\n")
        with pytest.raises(ConfigError, match=r"repository_orphan_age must be >= 60 and <= 2592000 seconds"):
            build_node_config(str(cfg), {})


async def test_a_deleted_library_version_is_not_installed_from_a_copy_a_node_keeps(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Seen: the library store picks any matching version among the libraries it installed
    (`{data}/libs/{name}=={version}`) and the wheels of `_libs/`, and a deleted library version
    stayed in both: the directory a node installed it into is never removed, and a wheel with other
    bytes under the deleted version is kept in `_libs/` (withheld at start-up). A slice needing
    that version still loaded on such a node, from a library the cluster had deleted. Now a
    deleted version (its tombstone, no manifest) is no candidate: the load fails naming the
    tombstone and the way out; an upload of the version makes it loadable again."""
    from aether.slices.errors import SliceLoadError
    from aether.slices.loader import ImportSpace, SliceLoader

    lib = build_library_wheel(tmp_path / "w", "tinylib", "1.0", {"tinylib/__init__.py": "VALUE = 7\n"})
    rebuilt = build_library_wheel(tmp_path / "r", "tinylib", "1.0", {"tinylib/__init__.py": "VALUE = 8\n"})
    w = _hello_needing_tinylib(tmp_path / "w")
    for f in (lib, w):
        status, doc = await cluster.upload(0, f)
        assert status == 201, doc
    node = cluster.nodes[1]
    repo, cached = node.repository, cluster.repos[1] / "_libs" / lib.name
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while len(node.repository.service.manifests()) < 2:
        assert loop.time() < end, "node-2 did not apply the uploads"
        await asyncio.sleep(0.05)
    hello = Artifact.parse("org.example:hello:0.1.0")
    installed = SliceLoader("node-2", repo, tmp_path / "data-a", space=ImportSpace())
    code = await asyncio.to_thread(installed.prepare_isolated, hello)
    assert code.libraries == {"tinylib": "1.0"} and cached.read_bytes() == lib.read_bytes()
    assert code.library_dirs == [tmp_path / "data-a" / "libs" / f"tinylib==1.0@{sha256_file(lib)}"]
    assert code.library_dirs[0].is_dir()

    async with cluster.session.delete(cluster.url(0, f"{P}/artifacts/tinylib/1.0")) as r:
        assert r.status == 200, await r.text()
    end = loop.time() + 10
    while node.kv.get_local("repository-deleted/tinylib/1.0") is None or cached.exists():
        assert loop.time() < end, "node-2 did not apply the delete or drop its copy in _libs/"
        await asyncio.sleep(0.05)

    def refused(loader: SliceLoader) -> str:
        with pytest.raises(SliceLoadError) as ei:
            loader.prepare_isolated(hello)
        return str(ei.value)

    # the directory node-2 installed the deleted version into
    says = await asyncio.to_thread(refused, installed)
    assert "tinylib 1.0 was deleted from the cluster's repository" in says, says
    assert "repository-deleted/tinylib/1.0" in says and "aether artifact deploy" in says, says
    # a wheel with other bytes kept under the deleted version in _libs/, installed by no one yet
    shutil.copy(rebuilt, cached)
    fresh = SliceLoader("node-2", repo, tmp_path / "data-b", space=ImportSpace())
    says = await asyncio.to_thread(refused, fresh)
    assert "repository-deleted/tinylib/1.0" in says, says
    assert not list((tmp_path / "data-b" / "libs").glob("tinylib==1.0*"))
    # published on purpose: installed again, the cluster's bytes
    status, doc = await cluster.upload(1, rebuilt)
    assert status == 201, doc
    code = await asyncio.to_thread(fresh.prepare_isolated, hello)
    assert code.libraries == {"tinylib": "1.0"}
    module = tmp_path / "data-b" / "libs" / f"tinylib==1.0@{sha256_file(rebuilt)}" / "tinylib" / "__init__.py"
    assert module.read_text() == "VALUE = 8\n"


async def _until(what: str, ok: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not ok():
        assert loop.time() < end, what
        await asyncio.sleep(0.05)


async def test_a_library_version_uploaded_again_with_other_bytes_is_installed_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Seen: the library store's installed directories (`{data}/libs/{name}=={version}`) recorded
    no sha256, so a library version deleted and uploaded again with other bytes kept running, on a
    node that had installed the old bytes, from the old bytes' directory (the cluster held only
    the new ones). Now a directory names the sha256 of the wheel it came from and is used only
    for the bytes the cluster holds under its version: the new bytes are installed beside it, and
    the old directory, stale and used by no worker any more, is removed."""
    from aether.slices.loader import ImportSpace, SliceLoader

    old = build_library_wheel(tmp_path / "w", "tinylib", "1.0", {"tinylib/__init__.py": "VALUE = 7\n"})
    new = build_library_wheel(tmp_path / "r", "tinylib", "1.0", {"tinylib/__init__.py": "VALUE = 8\n"})
    for f in (old, _hello_needing_tinylib(tmp_path / "w")):
        status, doc = await cluster.upload(0, f)
        assert status == 201, doc
    node = cluster.nodes[1]
    service = node.repository.service
    await _until("node-2 did not apply the uploads", lambda: len(service.manifests()) == 2)
    hello = Artifact.parse("org.example:hello:0.1.0")
    loader = SliceLoader("node-2", node.repository, tmp_path / "data", space=ImportSpace())
    code = await asyncio.to_thread(loader.prepare_isolated, hello)
    (old_dir,) = code.library_dirs
    assert (old_dir / "tinylib" / "__init__.py").read_text() == "VALUE = 7\n"

    async with cluster.session.delete(cluster.url(0, f"{P}/artifacts/tinylib/1.0")) as r:
        assert r.status == 200, await r.text()
    status, doc = await cluster.upload(0, new)
    assert status == 201, doc
    await _until(
        "node-2 did not apply the new upload",
        lambda: getattr(service.manifest("tinylib", "1.0"), "sha256", "") == sha256_file(new),
    )
    # the worker of the first preparation still runs: the old bytes' directory stays for it
    code = await asyncio.to_thread(loader.prepare_isolated, hello)
    (new_dir,) = code.library_dirs
    assert new_dir != old_dir and new_dir.name == f"tinylib==1.0@{sha256_file(new)}"
    assert (new_dir / "tinylib" / "__init__.py").read_text() == "VALUE = 8\n"
    assert old_dir.is_dir()
    # that worker is gone: the next resolution removes the directory no one uses again
    loader.release_isolated(hello)
    code = await asyncio.to_thread(loader.prepare_isolated, hello)
    assert code.library_dirs == [new_dir]
    assert not old_dir.exists() and new_dir.is_dir()
