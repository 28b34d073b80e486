"""An unloaded slice leaves nothing behind that keeps its classes alive.

The codec caches (decoders of response and map value types, proxy interfaces) belong to the loaded
slice (`LoadedSlice.codecs`, handed to each instance through `SliceContext.codecs`); when the slice
is unloaded they go with it, and so do the classes of its code (checked with gc + weakref).
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import LocalMaps, StoreInvoker, build_slice_wheel, isolated_imports

pytestmark = pytest.mark.timeout(30)

ART = Artifact.parse("org.example:gcslice:1.0.0")

SRC = """
from typing import Protocol

import msgspec

from aether.slices import Slice, entry


class Point(msgspec.Struct):
    x: int
    y: int


class PeerApi(Protocol):
    async def echo(self, p: Point) -> Point: ...


class GcSlice(Slice):
    @entry
    async def echo(self, p: Point) -> Point:
        return p

    @entry
    async def via_call(self) -> list[Point]:
        one = await self.call("org.example:gcslice", "echo", Point(1, 2), Point)
        two = await self.call("org.example:gcslice", "echo", Point(3, 4), Point | None)
        return [one, two]

    @entry
    async def via_proxy(self) -> Point:
        return await self.proxy("org.example:gcslice", PeerApi).echo(Point(5, 6))

    @entry
    async def via_self_proxy(self) -> Point:
        return await self.proxy("org.example:gcslice", GcSlice).echo(Point(7, 8))

    @entry
    async def via_map(self) -> Point | None:
        points = self.map("points", Point)
        await points.put("k", Point(9, 10))
        return await points.get("k")
"""


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


async def _exercise(tmp_path: Path) -> tuple[weakref.ref[type], weakref.ref[type], weakref.ref[type]]:
    repo = Repository(tmp_path / "repo")
    repo.deploy(build_slice_wheel(tmp_path / "w", str(ART), SRC, "GcSlice", module="gc_slice"))
    invoker = StoreInvoker()
    store = SliceRuntime(
        "node-1", repo, tmp_path / "data", invoker, space=ImportSpace(), maps=LocalMaps(["points"])
    )
    invoker.add(store)
    try:
        await store.load(ART)
        await store.activate(ART, [0])
        dec = msgspec.msgpack.decode
        assert dec(await store.call(ART, "via_call", b"")) == [{"x": 1, "y": 2}, {"x": 3, "y": 4}]
        assert dec(await store.call(ART, "via_proxy", b"")) == {"x": 5, "y": 6}
        assert dec(await store.call(ART, "via_self_proxy", b"")) == {"x": 7, "y": 8}
        assert dec(await store.call(ART, "via_map", b"")) == {"x": 9, "y": 10}
        loaded = store.loader.loaded(ART)
        assert loaded is not None
        assert len(loaded.codecs) >= 4  # the caches were used, and they are the loaded slice's
        module = sys.modules["gc_slice"]
        refs = (weakref.ref(module.GcSlice), weakref.ref(module.Point), weakref.ref(module.PeerApi))
        del module, loaded
        await store.unload(ART)
    finally:
        await store.close()
    return refs


async def test_an_unloaded_slice_class_is_collectable(tmp_path: Path) -> None:
    refs = await _exercise(tmp_path)
    assert "gc_slice" not in sys.modules
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    for obj in alive:  # say what still holds it
        holders = [type(h).__name__ for h in gc.get_referrers(obj)]
        print(obj, holders)
    assert not alive, [repr(a) for a in alive]
