"""The hello examples: real setuptools builds (examples/build.py), deploy, load, run, call."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.slices.libstore import unpack_pure_wheel
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import StoreInvoker, isolated_imports

ROOT = Path(__file__).resolve().parent.parent
HELLO = Artifact.parse("org.example:hello:0.1.0")
GREETER = Artifact.parse("org.example:greeter:0.1.0")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, Path]:
    tmp = tmp_path_factory.mktemp("examples")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/build.py"),
            "--only",
            "hello",
            "--repository",
            str(tmp / "repo"),
            "--out",
            str(tmp / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Repository(tmp / "repo"), tmp / "out"


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


def test_examples_are_built_and_deployed(built: tuple[Repository, Path]) -> None:
    repo, out = built
    assert sorted(p.name for p in out.glob("*.whl")) == [
        "greeter_service-0.1.0-py3-none-any.whl",
        "hello_slice-0.1.0-py3-none-any.whl",
    ]
    assert repo.list() == [GREETER, HELLO]
    deps = repo.dependencies(GREETER)
    assert {k: str(v) for k, v in deps.items()} == {"org.example:hello": "^0.1.0"}
    assert repo.dependencies(HELLO) == {}
    assert [str(r) for r in repo.requirements(HELLO)] == ["msgspec>=0.18"]
    assert repo.info(HELLO).slice_class == "hello_slice:Hello"


def test_entry_point_names_with_colons_round_trip(built: tuple[Repository, Path], tmp_path: Path) -> None:
    """setuptools writes `org.example:hello = hello_slice:Hello`; importlib.metadata reads it back."""
    repo, _ = built
    unpack_pure_wheel(repo.resolve(HELLO), tmp_path)
    (dist,) = list(importlib.metadata.distributions(path=[str(tmp_path)]))
    eps = {(ep.group, ep.name, ep.value) for ep in dist.entry_points}
    assert ("aether.slices", "org.example:hello", "hello_slice:Hello") in eps


def test_blueprint_file() -> None:
    doc = tomllib.loads((ROOT / "examples/hello/hello.blueprint").read_text())
    assert doc["id"] == "hello:0.1.0"
    assert {k: (v["artifact"], v["instances"]) for k, v in doc["slices"].items()} == {
        "hello": (str(HELLO), 2),
        "greeter": (str(GREETER), 1),
    }


async def test_examples_run_and_call_each_other(built: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, _ = built
    inv = StoreInvoker()
    store = SliceRuntime(
        "node-1",
        repo,
        tmp_path / "data",
        inv,
        space=ImportSpace(),
        config_for=lambda a: {"greeting": "Howdy"} if a == HELLO else {},
    )
    inv.add(store)
    hello_info = await store.load(HELLO)
    assert [(r.http_method, r.path, r.entry) for r in hello_info.routes] == [
        ("GET", "/hello/{name}", "greet")
    ]
    greeter_info = await store.load(GREETER)
    assert set(greeter_info.entries) == {"welcome", "welcome_many"}
    await store.activate(HELLO, [0, 1])
    await store.activate(GREETER, [0])
    one = msgspec.msgpack.decode(
        await store.call(GREETER, "welcome", msgspec.msgpack.encode({"name": "Ann"}))
    )
    assert one["text"] == "Welcome! Howdy, Ann!" and one["greeted_by"] in ("node-1/0", "node-1/1")
    many = msgspec.msgpack.decode(
        await store.call(GREETER, "welcome_many", msgspec.msgpack.encode({"names": ["a", "b", "c", "d"]}))
    )
    assert [m["text"] for m in many] == [f"Welcome! Howdy, {n}!" for n in "abcd"]
    assert {m["greeted_by"] for m in many} == {"node-1/0", "node-1/1"}
    direct = msgspec.msgpack.decode(
        await store.call("org.example:hello", "greet", msgspec.msgpack.encode("Bo"))
    )
    assert direct["message"] == "Howdy, Bo!"
    await store.close()
