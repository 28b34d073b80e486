"""SliceRuntime: load, activate, call, scale, deactivate, unload; start failures, draining, nested calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.errors import BadRequest
from aether.slices import (
    InstanceStopping,
    NoLocalInstance,
    SliceLoadError,
    SliceStartError,
    SliceStateError,
    UnknownEntry,
)
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import StoreInvoker, build_slice_wheel, isolated_imports

pytestmark = pytest.mark.timeout(30)

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode

# Module-level lists in the slice module record lifecycle events so tests can read them.
COUNTER = """
import asyncio
from aether.slices import Slice, entry, route, current_request_id

EVENTS = []
GATES = {}

class Counter(Slice):
    async def start(self):
        EVENTS.append(("start", self.context.instance))
        if self.context.config.get("fail_instance") == self.context.instance:
            raise RuntimeError("no database")
        if self.context.config.get("slow_start"):
            await asyncio.sleep(10)

    async def stop(self):
        EVENTS.append(("stop", self.context.instance))
        if self.context.config.get("fail_stop"):
            raise RuntimeError("stop failed")

    @entry
    async def whoami(self) -> dict:
        return {"node": self.context.node_id, "instance": self.context.instance,
                "artifact": str(self.context.artifact), "config": self.context.config,
                "request_id": self.context.request_id}

    @route("GET", "/add/{a}")
    async def add(self, a: int, b: int = 1) -> int:
        return a + b

    @entry
    async def wait(self, key: str) -> str:
        EVENTS.append(("call-begin", key))
        gate = GATES.setdefault(key, asyncio.Event())
        await gate.wait()
        EVENTS.append(("call-end", key))
        return key
"""

HELLO = """
from aether.slices import Slice, route

class Hello(Slice):
    @route("GET", "/hello/{name}")
    async def greet(self, name: str) -> str:
        return f"Hello, {name}! (instance {self.context.instance})"
"""

GREETER = """
import asyncio
from typing import Protocol
from aether.slices import Slice, entry

class HelloApi(Protocol):
    async def greet(self, name: str) -> str: ...

class Greeter(Slice):
    @entry
    async def welcome(self, name: str) -> str:
        return "Welcome! " + await self.call("org.example:hello", "greet", name, str)

    @entry
    async def welcome_many(self, names: list[str]) -> list[str]:
        hello = self.proxy("org.example:hello", HelloApi)
        return list(await asyncio.gather(*(hello.greet(n) for n in names)))
"""

CTR = Artifact.parse("org.example:counter:1.0.0")


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo")
    r.deploy(build_slice_wheel(tmp_path / "w1", str(CTR), COUNTER, "Counter", module="counter_slice"))
    r.deploy(build_slice_wheel(tmp_path / "w2", "org.example:hello:0.1.0", HELLO, "Hello"))
    r.deploy(
        build_slice_wheel(
            tmp_path / "w3", "org.example:greeter:0.1.0", GREETER, "Greeter", {"org.example:hello": "^0.1.0"}
        )
    )
    return r


def make_store(
    repo: Repository, tmp_path: Path, config: dict[str, object] | None = None, **kw: object
) -> SliceRuntime:
    inv = StoreInvoker()
    store = SliceRuntime(
        "node-1",
        repo,
        tmp_path / "data",
        inv,
        config_for=lambda a: dict(config or {}),
        space=ImportSpace(),
        **kw,  # type: ignore[arg-type]
    )
    inv.add(store)
    return store


def events() -> list[tuple[str, object]]:
    import sys

    return sys.modules["counter_slice"].EVENTS  # type: ignore[no-any-return]


def gate(key: str) -> asyncio.Event:
    import sys

    return sys.modules["counter_slice"].GATES.setdefault(key, asyncio.Event())  # type: ignore[no-any-return]


async def test_load_activate_call_round_robin(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path, {"color": "blue"})
    info = await store.load(CTR)
    assert set(info.entries) == {"whoami", "add", "wait"}
    assert [r.path for r in info.routes] == ["/add/{a}"]
    assert store.info(CTR) is info and store.state(CTR) == "loaded"
    assert store.local_instances("org.example:counter") == []
    await store.activate(CTR, [3, 1, 2])
    assert store.state(CTR) == "active"
    assert sorted(events()) == [("start", 1), ("start", 2), ("start", 3)]
    assert store.local_instances("org.example:counter") == [1, 2, 3]
    assert store.local_instances("org.example:counter:1.0.0") == [1, 2, 3]
    assert store.local_instances(CTR) == [1, 2, 3]
    seen = set()
    for _ in range(6):
        who = dec(await store.call(CTR, "whoami", b""))
        seen.add(who["instance"])
        assert who["node"] == "node-1" and who["artifact"] == str(CTR) and who["config"] == {"color": "blue"}
    assert seen == {1, 2, 3}
    who = dec(await store.call("org.example:counter", "whoami", b"", instance=2, request_id="r-1"))
    assert who["instance"] == 2 and who["request_id"] == "r-1"
    assert dec(await store.call(CTR, "add", enc({"a": "40", "b": 2}))) == 42


async def test_calls_by_name_follow_activation_and_deactivation(repo: Repository, tmp_path: Path) -> None:
    """What a `group:artifact` target names is remembered between calls (every call asks up to three
    times): deactivating, activating and unloading must be seen at once."""
    store = make_store(repo, tmp_path)
    name = "org.example:counter"
    await store.load(CTR)
    with pytest.raises(NoLocalInstance):
        await store.call(name, "whoami", b"")
    await store.activate(CTR, [0])
    assert dec(await store.call(name, "whoami", b""))["instance"] == 0
    assert store.has_room(name, "whoami")
    await store.deactivate(CTR)
    assert store.local_instances(name) == [] and not store.has_room(name, "whoami")
    with pytest.raises(NoLocalInstance):
        await store.call(name, "whoami", b"")
    await store.activate(CTR, [4])
    assert dec(await store.call(name, "whoami", b""))["instance"] == 4
    await store.unload(CTR)
    assert store.local_instances(name) == [] and store.local_instances(str(CTR)) == []


async def test_call_errors(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path)
    with pytest.raises(NoLocalInstance):
        await store.call(CTR, "whoami", b"")
    await store.load(CTR)
    with pytest.raises(NoLocalInstance):
        await store.call(CTR, "whoami", b"")
    await store.activate(CTR, [0])
    with pytest.raises(UnknownEntry, match="entries: add, wait, whoami"):
        await store.call(CTR, "nope", b"")
    with pytest.raises(BadRequest, match=r"Counter\.add.*\$\.a"):
        await store.call(CTR, "add", enc({"a": "x"}))
    with pytest.raises(NoLocalInstance, match="instance 7"):
        await store.call(CTR, "whoami", b"", instance=7)
    with pytest.raises(BadRequest, match="invalid call target"):
        await store.call("counter", "whoami", b"")
    with pytest.raises(NoLocalInstance):
        await store.call("org.example:other", "whoami", b"")


async def test_state_errors(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path)
    with pytest.raises(SliceStateError, match="not loaded"):
        await store.activate(CTR, [0])
    await store.load(CTR)
    with pytest.raises(SliceStateError, match="not active"):
        await store.set_instances(CTR, [0])
    await store.deactivate(CTR)  # idempotent on a loaded artifact
    await store.unload(Artifact.parse("org.example:never:1.0.0"))  # idempotent
    with pytest.raises(SliceLoadError, match="not in the repository"):
        await store.load(Artifact.parse("org.example:never:1.0.0"))


async def test_start_raises_no_stop_for_it(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path, {"fail_instance": 2})
    await store.load(CTR)
    with pytest.raises(SliceStartError) as ei:
        await store.activate(CTR, [1, 2, 3])
    assert ei.value.instance == 2
    assert "instance 2" in ei.value.reason and "RuntimeError: no database" in ei.value.reason
    ev = events()
    assert sorted(e for e in ev if e[0] == "start") == [("start", 1), ("start", 2), ("start", 3)]
    assert sorted(e for e in ev if e[0] == "stop") == [("stop", 1), ("stop", 3)]  # never ("stop", 2)
    assert store.state(CTR) == "loaded"
    assert store.local_instances(CTR) == []
    with pytest.raises(NoLocalInstance):
        await store.call(CTR, "whoami", b"")


async def test_start_timeout(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path, {"slow_start": True}, start_timeout=0.2)
    await store.load(CTR)
    t0 = time.monotonic()
    with pytest.raises(SliceStartError, match=r"did not finish within 0\.2 s"):
        await store.activate(CTR, [0])
    assert time.monotonic() - t0 < 2
    assert not [e for e in events() if e[0] == "stop"]


async def test_cancelled_activate_stops_started_instances(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path, {"slow_start": True})
    await store.load(CTR)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.activate(CTR, [0, 1]), 0.2)
    assert store.state(CTR) == "loaded"
    assert not [e for e in events() if e[0] == "stop"]  # their start never finished


async def test_deactivate_drains_in_flight_calls_and_stops_once(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path)
    await store.load(CTR)
    await store.activate(CTR, [0, 1])
    calls = [asyncio.create_task(store.call(CTR, "wait", enc({"key": k}))) for k in ("a", "b")]
    while len([e for e in events() if e[0] == "call-begin"]) < 2:
        await asyncio.sleep(0.01)
    deact = asyncio.create_task(store.deactivate(CTR, drain_timeout=5.0))
    await asyncio.sleep(0.1)
    assert not deact.done()
    assert not [e for e in events() if e[0] == "stop"]  # stop waits for in-flight calls
    with pytest.raises(InstanceStopping) as stopping:  # no new calls while draining
        await store.call(CTR, "whoami", b"")
    assert stopping.value.wire_kind == "shutting_down"  # retryable: the caller fails over at once
    gate("a").set()
    gate("b").set()
    assert sorted([dec(await c) for c in calls]) == ["a", "b"]
    await deact
    ev = events()
    stops = [e for e in ev if e[0] == "stop"]
    assert sorted(stops) == [("stop", 0), ("stop", 1)]
    assert max(ev.index(e) for e in ev if e[0] == "call-end") < min(ev.index(s) for s in stops)
    assert store.state(CTR) == "loaded"
    await store.deactivate(CTR)  # again: nothing, no second stop
    assert len([e for e in events() if e[0] == "stop"]) == 2


async def test_drain_is_bounded_and_stop_errors_are_logged(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(repo, tmp_path, {"fail_stop": True})
    await store.load(CTR)
    await store.activate(CTR, [0])
    stuck = asyncio.create_task(store.call(CTR, "wait", enc({"key": "never"})))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await store.deactivate(CTR, drain_timeout=0.2)
    assert time.monotonic() - t0 < 2
    assert ("stop", 0) in events()
    assert (
        "still in flight" in caplog.text
        and "stop() of org.example:counter:1.0.0 instance 0 raised" in caplog.text
    )
    stuck.cancel()


STUCK = """
import asyncio
import threading
from aether.slices import Slice, entry

EVENTS = []
RELEASE = threading.Event()

class Stuck(Slice):
    async def stop(self):
        EVENTS.append("stop")
        if self.context.config.get("stop_blocks"):
            RELEASE.wait()  # blocks its slice's loop (its own thread) until the test ends

    @entry
    async def hang(self, seconds: float) -> str:
        EVENTS.append("call-begin")
        await asyncio.sleep(seconds)
        EVENTS.append("call-end")
        return "done"
"""


def stuck_store(tmp_path: Path, n: int, config: dict[str, object] | None = None, **kw: object) -> tuple[
    SliceRuntime, list[Artifact]
]:
    r = Repository(tmp_path / "stuck-repo")
    arts = [Artifact.parse(f"org.example:stuck{i}:1.0.0") for i in range(n)]
    for i, a in enumerate(arts):
        r.deploy(build_slice_wheel(tmp_path / f"sw{i}", str(a), STUCK, "Stuck", module=f"stuck{i}"))
    return make_store(r, tmp_path, config, **kw), arts


def stuck_module(i: int) -> Any:
    import sys

    return sys.modules[f"stuck{i}"]


async def test_close_drains_every_slice_at_once(repo: Repository, tmp_path: Path) -> None:
    """A node stopping with calls stuck in several slices used to drain them one after the other:
    4 slices, 4 drains (20 s with the node's 5 s), past what a supervisor waits before it kills the
    node. They drain together now: one `drain_timeout` in all, and what a drain promises still
    holds (a call that ends within it is answered before its instance stops)."""
    store, arts = stuck_store(tmp_path, 4)
    for a in arts:
        await store.load(a)
        await store.activate(a, [0])
    mods = [stuck_module(i) for i in range(4)]
    calls = [asyncio.create_task(store.call(a, "hang", enc({"seconds": 3600}))) for a in arts[:3]]
    quick = asyncio.create_task(store.call(arts[3], "hang", enc({"seconds": 0.5})))
    while sum(m.EVENTS.count("call-begin") for m in mods) < 4:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await store.close(drain_timeout=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= took < 2.0, f"closing took {took:.2f} s for 4 slices draining 1 s each"
    assert dec(await quick) == "done"
    assert mods[3].EVENTS == ["call-begin", "call-end", "stop"]  # drained, then stopped
    for m in mods[:3]:
        assert m.EVENTS == ["call-begin", "stop"]
    done, _ = await asyncio.wait(calls, timeout=1.0)
    assert len(done) == 3, "a call stuck past the drain was never answered"
    assert store.artifacts() == {}


async def test_close_is_bounded_when_stop_hooks_block_forever(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `stop()` that never returns (blocking its own loop) costs `stop_timeout`, then its loop is
    left to itself after 2 s; with several such slices those bounds overlap instead of adding up."""
    store, arts = stuck_store(tmp_path, 3, {"stop_blocks": True}, stop_timeout=0.3)
    for a in arts:
        await store.load(a)
        await store.activate(a, [0])
    mods = [stuck_module(i) for i in range(3)]
    try:
        t0 = time.monotonic()
        await store.close(drain_timeout=1.0)
        took = time.monotonic() - t0
    finally:
        for m in mods:
            m.RELEASE.set()
    assert took < 4.0, f"closing took {took:.2f} s (3 x (0.3 s stop + 2 s loop) one after the other: 6.9 s)"
    assert all(m.EVENTS == ["stop"] for m in mods)
    assert caplog.text.count("did not finish within 0.3 s") == 3
    assert caplog.text.count("still busy") == 3
    assert store.artifacts() == {}


async def test_set_instances_scales(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path)
    await store.load(CTR)
    await store.activate(CTR, [0])
    await store.set_instances(CTR, [0, 1, 2])
    assert store.local_instances(CTR) == [0, 1, 2]
    await store.set_instances(CTR, [2])
    assert store.local_instances(CTR) == [2]
    assert sorted(e for e in events() if e[0] == "stop") == [("stop", 0), ("stop", 1)]
    await store.activate(CTR, [2, 5])  # activate on an active artifact = set_instances
    assert store.local_instances(CTR) == [2, 5]
    starts = [e for e in events() if e[0] == "start"]
    assert sorted(starts) == [("start", 0), ("start", 1), ("start", 2), ("start", 5)]


async def test_unload_deactivates_and_forgets(repo: Repository, tmp_path: Path) -> None:
    import sys

    store = make_store(repo, tmp_path)
    await store.load(CTR)
    await store.activate(CTR, [0])
    ev = events()
    await store.unload(CTR)
    assert ("stop", 0) in ev
    assert store.info(CTR) is None and store.artifacts() == {}
    assert "counter_slice" not in sys.modules
    await store.load(CTR)  # can load again
    assert store.state(CTR) == "loaded"


async def test_slice_calls_another_slice(repo: Repository, tmp_path: Path) -> None:
    store = make_store(repo, tmp_path)
    hello = Artifact.parse("org.example:hello:0.1.0")
    greeter = Artifact.parse("org.example:greeter:0.1.0")
    for a, n in ((hello, [0, 1]), (greeter, [0])):
        await store.load(a)
        await store.activate(a, n)
    assert store.artifacts() == {greeter: "active", hello: "active"}
    got = dec(await store.call(greeter, "welcome", enc("Ann")))
    assert got.startswith("Welcome! Hello, Ann!")
    many = dec(await store.call(greeter, "welcome_many", enc(["a", "b", "c", "d"])))
    assert [m.split(" (")[0] for m in many] == ["Hello, a!", "Hello, b!", "Hello, c!", "Hello, d!"]
    assert {m.split("instance ")[1] for m in many} == {"0)", "1)"}  # round-robin over hello's instances
    await store.close()
    assert store.artifacts() == {}


async def test_load_runs_in_a_thread(repo: Repository, tmp_path: Path) -> None:
    """The event loop keeps running while a load unpacks and imports (pip installer: seconds)."""
    store = make_store(repo, tmp_path, installer="pip")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    t0 = time.monotonic()
    await store.load(CTR)
    elapsed = time.monotonic() - t0
    t.cancel()
    assert ticks >= max(1, int(elapsed / 0.01) // 4), (ticks, elapsed)


async def test_fits_the_ports_of_deploy_and_invoke(repo: Repository, tmp_path: Path) -> None:
    """The store is what the deployment managers and the invoker are written against."""
    deploy_ports = pytest.importorskip("aether.deploy.ports")
    invoke_ports = pytest.importorskip("aether.invoke.ports")
    store = make_store(repo, tmp_path)
    assert isinstance(store, deploy_ports.SliceRuntimePort)
    assert isinstance(store, invoke_ports.LocalSlices)
    info = await store.load(CTR)
    r = info.routes[0]
    assert (r.http_method, r.path, r.entry, tuple(r.path_params)) == ("GET", "/add/{a}", "add", ("a",))


OUTCOMES = """
from aether.core.errors import BadRequest
from aether.slices import Conflict, NotFound, Slice, entry

class Outcomes(Slice):
    @entry
    async def run(self, what: str) -> int:
        if what == "bad":
            raise BadRequest("bad input")
        if what == "missing":
            raise NotFound("no such thing")
        if what == "conflict":
            raise Conflict("taken")
        if what == "boom":
            raise RuntimeError("boom")
        if what == "wrong":
            return "not an int"
        return 1
"""


async def test_metrics_separate_client_errors_from_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11, item 8: 400/404/409 answers are client errors; raising or a wrong answer is a failure."""
    from aether.metrics import EntryMetrics
    from aether.slices import ResponseTypeError

    art = Artifact.parse("org.example:outcomes:1.0.0")
    r = Repository(tmp_path / "repo")
    r.deploy(build_slice_wheel(tmp_path / "w", str(art), OUTCOMES, "Outcomes"))
    metrics = EntryMetrics()
    store = make_store(r, tmp_path, recorder=metrics)
    await store.load(art)
    await store.activate(art, [0])
    assert dec(await store.call(art, "run", enc("ok"))) == 1
    for what in ("bad", "missing", "conflict", "boom", "wrong"):
        with pytest.raises(Exception):  # noqa: B017 - each kind is counted below
            await store.call(art, "run", enc(what))
    with pytest.raises(BadRequest):  # does not decode: the caller's mistake too
        await store.call(art, "run", enc({"what": 1, "extra": 2}))
    with pytest.raises(ResponseTypeError):
        await store.call(art, "run", enc("wrong"))
    assert "Outcomes.run returned str, but its return annotation is int" in caplog.text
    (c,) = metrics.counters()
    assert (c.calls, c.successes, c.client_errors, c.failures) == (8, 1, 4, 3)
