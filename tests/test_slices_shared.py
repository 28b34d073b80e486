"""The node's shared slice loop (``isolation = "shared"``) and the direct calls between its slices,
and between inline slices (``isolation = "inline"``, on the node's loop).

A real `SliceRuntime` with a real `Invoker` (no cluster): two slices on the shared loop (or both
inline), a caller and a callee, and a third on a thread of its own. A call from the caller to the
callee runs in the caller's task; these tests check it is direct (the invoker counts no attempt)
and that it gives what the usual way gives: the result, the request id and the derived
idempotency key, the errors and their kinds, the deadline, the containment of ``SystemExit``, the
slice metrics and instance counters, draining, the watchdog naming the callee (shared loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.context import current_slice, derive_idempotency_key
from aether.core.errors import KIND_INTERRUPTED, wire_kind_of
from aether.core.policy import EntryPolicy
from aether.core.secrets import ResolvedConfig
from aether.invoke import Invoker
from aether.slices.capacity import SliceLimits
from aether.slices.faults import SliceFault
from aether.slices.isolation import BlockReport, SliceStopped
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import build_slice_wheel, isolated_imports

pytestmark = pytest.mark.timeout(30)

CALLER = "org.example:caller:1.0.0"
CALLEE = "org.example:callee:1.0.0"
LONER = "org.example:loner:1.0.0"

CALLER_SOURCE = """
import asyncio, threading
from typing import Any
from aether.core.context import current_slice
from aether.slices import Slice, entry

class Caller(Slice):
    @entry
    async def ask(self, what: list) -> dict:
        method, arg = what
        got = await self.call("org.example:callee", method, arg, Any, timeout=2.0)
        return {"got": got, "thread": threading.get_ident(), "slice_after": current_slice.get(),
                "rid": self.context.request_id, "key": self.context.idempotency_key}

    @entry
    async def ask_soon(self, what: list) -> Any:
        method, arg = what
        return await self.call("org.example:callee", method, arg, Any, timeout=0.3)

    @entry
    async def ask_many(self, n: int) -> list:
        calls = [self.call("org.example:callee", "who", None, dict) for _ in range(n)]
        return await asyncio.gather(*calls)

    @entry
    async def ask_in_a_loop(self, n: int) -> int:
        for _ in range(n):
            await self.call("org.example:callee", "who", None, dict)
        return n

    @entry
    async def ask_long(self, what: list) -> Any:
        method, arg = what
        return await self.call("org.example:callee", method, arg, Any, timeout=30.0)

    @entry
    async def ask_loner(self, arg: str) -> dict:
        return await self.call("org.example:loner", "who", arg, dict)
"""

CALLEE_SOURCE = """
import asyncio, os, threading, time
from aether.core.context import current_slice
from aether.slices import Slice, entry, BadRequest

class Callee(Slice):
    @entry
    async def who(self) -> dict:
        return {"thread": threading.get_ident(), "slice": current_slice.get(),
                "rid": self.context.request_id, "key": self.context.idempotency_key}

    @entry
    async def fail(self) -> str:
        raise ValueError("no such thing")

    @entry
    async def bad(self) -> str:
        raise BadRequest("the name is missing")

    @entry
    async def spill(self) -> str:
        raise ValueError("cannot log in with " + self.context.config["token"])

    @entry
    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    @entry
    async def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "napped"

    @entry
    async def stubborn(self, release: str) -> str:
        while not os.path.exists(release):
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass  # swallowed: the task goes on
        return "released"

    @entry
    async def leave(self) -> str:
        raise SystemExit(3)

    @entry
    async def spill_out(self) -> str:
        raise SystemExit("cannot log in with " + self.context.config["token"])

    @entry
    async def liar(self) -> int:
        return "not a number"  # type: ignore[return-value]
"""

SECRET = "hunter2-direct-secret"

LONER_SOURCE = """
import threading
from aether.slices import Slice, entry

class Loner(Slice):
    @entry
    async def who(self, arg: str) -> dict:
        return {"thread": threading.get_ident(), "arg": arg}
"""


class NoPeers:
    up_peers: frozenset[str] = frozenset()

    def send(self, peer: str, msg: object) -> bool:
        return False


class Endpoints:
    """A registry without endpoints whose answers are always cached (`cached_instances`), with a
    policy per (target, method) when a test sets one."""

    def __init__(self) -> None:
        self.policies: dict[tuple[str, str], EntryPolicy] = {}

    def instances(self, target: str, method: str) -> list[Any]:
        return list(self.cached_instances(target, method))

    def cached_instances(self, target: str, method: str) -> tuple[Any, ...]:
        policy = self.policies.get((target, method))
        if policy is None:
            return ()
        return (_Endpoint(target, method, 0, "node-1", policy),)


class _Endpoint:
    def __init__(
        self, artifact: str, method: str, instance: int, node_id: str, policy: EntryPolicy
    ) -> None:
        self.artifact, self.method, self.instance, self.node_id, self.policy = (
            artifact, method, instance, node_id, policy
        )


class Forward:
    """The runtime's `SliceCaller` (the node's `_NodeInvoker`): the invoker, built after the runtime."""

    invoker: Invoker

    async def invoke(self, target: str, method: str, payload: bytes, **kw: Any) -> bytes:
        return await self.invoker.invoke(target, method, payload, **kw)

    def direct_ready(self, target: str, method: str, timeout: float | None) -> float | None:
        return self.invoker.direct_ready(target, method, timeout)

    def direct_error(
        self, exc: BaseException | None, target: str, method: str, rid: str, *, expired: bool = False
    ) -> Exception | None:
        return self.invoker.direct_error(exc, target, method, rid, expired=expired)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool, bool]] = []

    def record(self, artifact: str, method: str, seconds: float, ok: bool, client_error: bool) -> None:
        self.calls.append((artifact, method, ok, client_error))


class Setup:
    def __init__(
        self, runtime: SliceRuntime, invoker: Invoker, endpoints: Endpoints, recorder: Recorder
    ) -> None:
        self.runtime = runtime
        self.invoker = invoker
        self.endpoints = endpoints
        self.recorder = recorder
        self.limits: dict[Artifact, SliceLimits] = {}
        self.mode = "shared"

    async def ask(self, entry: str, payload: Any, request_id: str = "rid-1", key: str = "order-7") -> Any:
        raw = await self.invoker.invoke(
            CALLER, entry, msgspec.msgpack.encode(payload), request_id=request_id, idempotency_key=key
        )
        return msgspec.msgpack.decode(raw)

    def local_attempts(self) -> int:
        return self.invoker.stats.local_attempts


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with _started(tmp_path, "shared") as s:
        yield s


@pytest.fixture(params=["shared", "inline"])
async def either(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    """The caller and the callee on the shared loop, or both inline (on the node's loop)."""
    async with _started(tmp_path, request.param) as s:
        s.mode = request.param
        yield s


@contextlib.asynccontextmanager
async def _started(tmp_path: Path, mode: str) -> AsyncIterator[Setup]:
    """The caller and the callee with isolation `mode`, the loner on a thread of its own."""
    repo = Repository(tmp_path / "repo")
    for coords, source, cls in ((CALLER, CALLER_SOURCE, "Caller"), (CALLEE, CALLEE_SOURCE, "Callee"),
                                (LONER, LONER_SOURCE, "Loner")):  # fmt: skip
        repo.deploy(build_slice_wheel(tmp_path / "w", coords, source, cls))
    fwd = Forward()
    recorder = Recorder()
    limits: dict[Artifact, SliceLimits] = {}
    runtime = SliceRuntime(
        "node-1", repo, tmp_path / "data", fwd, space=ImportSpace(), recorder=recorder,
        isolation_for=lambda a: "auto" if str(a) == LONER else mode,
        limits_for=lambda a: limits.get(a, SliceLimits()), block_limit=0.2,
        config_for=lambda a: ResolvedConfig({"token": SECRET}, (SECRET,)) if str(a) == CALLEE else {},
    )  # fmt: skip
    endpoints = Endpoints()
    fwd.invoker = Invoker("node-1", runtime, endpoints, NoPeers())
    s = Setup(runtime, fwd.invoker, endpoints, recorder)
    s.limits = limits
    for coords in (CALLER, CALLEE, LONER):
        a = Artifact.parse(coords)
        await runtime.load(a)
        await runtime.activate(a, [0])
    try:
        yield s
    finally:
        await runtime.close(drain_timeout=1.0)


async def _warm(s: Setup) -> None:
    """The first call to a target goes the usual way (the node's loop resolves it); later ones are
    direct."""
    await s.ask("ask", ["who", None])


async def test_slices_on_one_loop_call_each_other_directly_with_what_the_usual_way_gives(
    either: Setup,
) -> None:
    s = either
    assert s.runtime.isolation(Artifact.parse(CALLER)) == s.mode
    assert s.runtime.isolation(Artifact.parse(LONER)) == "thread"
    first = await s.ask("ask", ["who", None], key="order-7")  # the usual way: one local attempt
    assert s.local_attempts() == 2  # the outer call and the nested one
    again = await s.ask("ask", ["who", None], key="order-8")  # direct: the outer attempt only
    assert s.local_attempts() == 3
    for out, key in ((first, "order-7"), (again, "order-8")):
        got = out["got"]
        assert got["thread"] == out["thread"]  # the same loop: the shared one, or the node's
        assert (out["thread"] == threading.get_ident()) == (s.mode == "inline")
        assert got["slice"] == CALLEE and out["slice_after"] == CALLER  # log context restored
        assert got["rid"] == out["rid"] == "rid-1"
        assert out["key"] == key
        assert got["key"] == derive_idempotency_key(key, "org.example:callee", "who", 0)
    # several direct calls at once from one entry (gather: each in a task of its own)
    many = await s.ask("ask_many", 3, key="order-9")
    assert s.local_attempts() == 4
    assert [m["key"] for m in many] == [
        derive_idempotency_key("order-9", "org.example:callee", "who", n) for n in range(3)
    ]
    # the bookkeeping reaches the node's loop: instance counters and slice metrics count them all
    await asyncio.sleep(0.05)
    callee = [load for load in s.runtime.instance_loads() if load.artifact == CALLEE]
    assert callee[0].calls == 5 and callee[0].failures == 0
    assert [c for c in s.recorder.calls if c[0] == CALLEE] == [(CALLEE, "who", True, False)] * 5


async def test_a_call_to_a_slice_on_its_own_thread_goes_the_usual_way(either: Setup) -> None:
    s = either
    for n in range(2):
        out = await s.ask("ask_loner", f"x{n}")
        assert out["arg"] == f"x{n}"
    assert s.local_attempts() == 4  # every nested call is an attempt of the invoker


async def test_direct_calls_fail_as_the_usual_way_fails(either: Setup) -> None:
    """Each failure of a nested call, made directly and then the usual way (a fault that delays
    nothing and fails nothing sends it through `call`): the same error, word for word."""
    s = either
    await _warm(s)
    callee = Artifact.parse(CALLEE)
    cases = [
        ("ask", "fail", None), ("ask", "bad", None), ("ask_soon", "slow", 2.0), ("ask", "leave", None),
        ("ask", "slow", "not seconds"), ("ask", "liar", None),
    ]  # fmt: skip

    async def outcome(entry: str, method: str, arg: Any) -> tuple[type[BaseException], str, int | None]:
        with pytest.raises(Exception) as info:
            await s.ask(entry, [method, arg])
        return type(info.value), str(info.value), getattr(info.value, "status", None)

    base = s.local_attempts()
    direct = [await outcome(*case) for case in cases]
    assert s.local_attempts() == base + len(cases)  # the outer calls only: every nested one was direct
    s.runtime.inject_fault(callee, SliceFault(error_rate=0.0))
    usual = [await outcome(*case) for case in cases]
    assert s.local_attempts() == base + 3 * len(cases)
    s.runtime.clear_fault(callee)
    assert direct == usual
    assert "callee.fail on node-1 (request rid-1) raised ValueError: no such thing" in direct[0][1]
    assert "bad request to org.example:callee.bad" in direct[1][1]
    assert "org.example:callee.slow (request rid-1) timed out running on this node (node-1)" in direct[2][1]
    assert "leave of org.example:callee:1.0.0 raised SystemExit(3)" in direct[3][1]
    assert "invalid request for entry" in direct[4][1] and "Expected `float`, got `str`" in direct[4][1]
    assert "returned str, but its return annotation is int" in direct[5][1]
    # contained: the slices go on
    assert (await s.ask("ask", ["who", None]))["got"]["slice"] == CALLEE
    await asyncio.sleep(0.05)
    failed = [c for c in s.recorder.calls if c[0] == CALLEE and c[1] != "who"]
    assert failed == [
        (CALLEE, "fail", False, False), (CALLEE, "bad", False, True), (CALLEE, "slow", False, False),
        (CALLEE, "leave", False, False), (CALLEE, "slow", False, True), (CALLEE, "liar", False, False),
    ] * 2  # fmt: skip


async def test_limits_faults_and_policies_of_the_callee_send_the_call_the_usual_way(either: Setup) -> None:
    s = either
    await _warm(s)
    callee = Artifact.parse(CALLEE)
    base = s.local_attempts()
    s.runtime.inject_fault(callee, SliceFault(error_rate=0.0, delay_ms=1))
    await s.ask("ask", ["who", None])
    assert s.local_attempts() == base + 2  # a fault is injected by `call`: the usual way
    s.runtime.clear_fault(callee)
    s.endpoints.policies[("org.example:callee", "who")] = EntryPolicy(timeout=1.0)
    await s.ask("ask", ["who", None])
    assert s.local_attempts() == base + 4  # an attempt timeout of its own: the invoker's rounds
    del s.endpoints.policies[("org.example:callee", "who")]
    s.limits[callee] = SliceLimits(max_concurrency=4)
    s.runtime.refresh_limits()
    await s.ask("ask", ["who", None])
    assert s.local_attempts() == base + 6  # under limits: admission by the gate
    s.limits.pop(callee)
    s.runtime.refresh_limits()
    await s.ask("ask", ["who", None])
    assert s.local_attempts() == base + 7  # direct again


async def test_draining_the_callee_waits_for_its_direct_calls(either: Setup) -> None:
    s = either
    await _warm(s)
    base = s.local_attempts()
    running = asyncio.ensure_future(s.ask("ask", ["slow", 0.5]))
    await asyncio.sleep(0.15)
    assert s.local_attempts() == base + 1  # the nested call runs directly
    t0 = asyncio.get_running_loop().time()
    await s.runtime.deactivate(Artifact.parse(CALLEE), drain_timeout=3.0)
    assert asyncio.get_running_loop().time() - t0 >= 0.25  # it waited for the direct call
    assert (await running)["got"] == "slept"
    # the loop stays for the caller; a call to the stopped callee is not direct and fails
    assert s.runtime.isolation(Artifact.parse(CALLER)) == s.mode
    with pytest.raises(Exception, match=r"no ACTIVE instance|timed out|did not succeed"):
        await s.ask("ask_soon", ["who", None])


async def test_the_watchdog_names_the_callee_that_blocks_the_shared_loop(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    s = setup
    await _warm(s)
    reports: list[tuple[Artifact, BlockReport]] = []
    s.runtime.on_block.append(lambda a, r: reports.append((a, r)))
    blocked = r"nap of org\.example:callee:1\.0\.0 blocked its slice's event loop"
    with caplog.at_level(logging.WARNING), pytest.raises(Exception, match=blocked):
        await s.ask("ask", ["nap", 0.6])
    assert reports and reports[0][0] == Artifact.parse(CALLEE)
    assert reports[0][1].owner == CALLEE and reports[0][1].entry == "nap"


async def test_the_shared_loop_closes_with_the_last_slice_on_it(setup: Setup) -> None:
    s = setup
    rt = s.runtime
    shared = rt._shared
    assert shared is not None and shared.thread.is_alive()
    await rt.deactivate(Artifact.parse(CALLER))
    assert rt._shared is shared and shared.thread.is_alive()
    await rt.deactivate(Artifact.parse(CALLEE))
    assert rt._shared is None
    await asyncio.sleep(0)
    shared.thread.join(2.0)
    assert not shared.thread.is_alive()
    await rt.activate(Artifact.parse(CALLEE), [0])  # a new shared loop
    assert rt._shared is not None and rt._shared is not shared


@pytest.mark.parametrize("callee", ["slow", "stubborn"])
async def test_a_call_running_a_direct_call_when_the_shared_loop_closes_is_answered_at_once(
    setup: Setup, tmp_path: Path, callee: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The runtime closes (the node stops; or the last slice on the shared loop goes and the loop
    with it) while the caller's entry waits for a direct call to the callee. The call being served
    (here straight from the runtime, as the invoke server serves another node's) is answered at
    once with `SliceStopped` (503, kind interrupted: the caller's invoker retries it elsewhere if
    the entry is idempotent, as for a call whose node or worker process stopped mid-run). It was
    answered with a bare cancellation (`slow`: the caller's task saw CancelledError without being
    cancelled), or, when the callee ignores its cancellation (`stubborn`), never: `_abandon`
    answered the calls a task served but not one inside a direct call (its caller's deadline
    would, 10 s by default)."""
    s = setup
    await _warm(s)
    release = tmp_path / "release"
    arg: Any = 30.0 if callee == "slow" else str(release)
    loop = asyncio.get_running_loop()
    call = asyncio.ensure_future(s.runtime.call(
        CALLER, "ask_long", msgspec.msgpack.encode([callee, arg]), request_id="rid-3", idempotency_key="o-3"
    ))  # fmt: skip
    target = s.runtime._entries[Artifact.parse(CALLEE)].instances[0]
    while target.direct_inflight == 0:  # (it runs directly, in the caller's task)
        await asyncio.sleep(0.01)
    t0 = loop.time()
    closing = asyncio.ensure_future(s.runtime.close(drain_timeout=0.2))
    try:
        done, _ = await asyncio.wait({call}, timeout=5.0)
        took = loop.time() - t0
    finally:
        release.touch()  # (the abandoned callee ends)
        await closing
    assert done, "the call was not answered within 5 s of the close"
    assert not call.cancelled(), "answered with a bare cancellation"
    with pytest.raises(SliceStopped) as got:
        call.result()
    assert (got.value.status, wire_kind_of(got.value)) == (503, KIND_INTERRUPTED)
    text = str(got.value)
    assert text.startswith(f"ask_long of {CALLER} ") and "when its slice was stopped" in text, text
    if callee == "stubborn":
        assert f"ask_long of {CALLER} (running stubborn of {CALLEE} directly) did not end" in text
        assert f"stubborn of {CALLEE} still running 1.0 s after it was cancelled" in caplog.text
    assert took < 2.5  # drain 0.2 s, then (stubborn) 1 s for the cancelled tasks to end


async def test_a_nested_call_in_the_callers_task_leaves_the_callers_log_context_as_it_was(
    tmp_path: Path,
) -> None:
    """Inline slices run a nested call in the caller's task too: the callee's log context (node,
    slice, instance), request id and key are undone when it returns (they stayed: the caller's
    later log records named the callee; and a task that activated inline slices named the last)."""
    async with _started(tmp_path, "inline") as s:
        assert current_slice.get(None) is None  # the start() hooks ran in this task: undone too
        out = await s.ask("ask", ["who", None], key="order-5")
        assert out["got"]["slice"] == CALLEE and out["slice_after"] == CALLER
        assert out["key"] == "order-5"
        assert out["got"]["thread"] == out["thread"] == threading.get_ident()  # the node's loop


async def test_direct_calls_leave_no_reference_cycles_behind(either: Setup) -> None:
    s = either
    await _warm(s)
    await s.ask("ask", ["who", None])
    gc.collect()
    gc.disable()
    try:
        for n in range(30):
            await s.ask("ask", ["who", None], key=f"order-{n}")
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 30, f"{found} objects in reference cycles after 30 calls"


async def test_a_caller_making_direct_calls_in_a_loop_lets_the_loop_turn(either: Setup) -> None:
    """A direct call does not suspend its caller: 20,000 of them in a loop (longer than the 0.2 s
    block limit here) would hold the loop: on the shared loop the watchdog would fail the call as
    blocking, on the node's loop (inline) nothing else would run meanwhile. One in `DIRECT_STREAK`
    yields."""
    s = either
    await _warm(s)
    reports: list[Any] = []
    s.runtime.on_block.append(lambda a, r: reports.append(r))
    base = s.local_attempts()
    turns = 0

    async def tick() -> None:  # another task on the loop the calls run on
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    # (the shared loop's, not the node's: how often the node's thread gets the GIL meanwhile is the
    # interpreter's affair, and a slow machine gave it 6 turns in 20,000 calls)
    home = s.runtime._shared.loop if s.mode == "shared" else asyncio.get_running_loop()
    assert home is not None
    ticker = asyncio.run_coroutine_threadsafe(tick(), home)
    while not turns:
        await asyncio.sleep(0.001)
    before = turns
    try:
        assert await s.ask("ask_in_a_loop", 20_000) == 20_000
    finally:
        home.call_soon_threadsafe(ticker.cancel)
    assert s.local_attempts() == base + 1  # every nested call direct
    assert reports == []
    assert turns - before >= 20_000 // 32 // 2  # the calls' loop turned while they ran


async def test_a_direct_call_redacts_the_callees_secrets_from_its_error(either: Setup) -> None:
    """What the callee raises with a secret of its config in the text reaches the caller, and its
    HTTP client, with the value replaced, on the direct path as through `call`."""
    s = either
    await _warm(s)
    base = s.local_attempts()
    with pytest.raises(Exception) as info:
        await s.ask("ask", ["spill", None])
    assert s.local_attempts() == base + 1  # the nested call was direct
    assert SECRET not in str(info.value) and "cannot log in with ***" in str(info.value)


async def test_a_contained_exit_is_redacted_of_the_callees_secrets(
    either: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A `SystemExit` holding a secret of the callee's config, contained (`SliceCrashed`): its
    value is replaced in the error and in the node's log line, made directly and the usual way
    (the callee's loop: `SliceThread._guard`, `InlineLoop.run`). Both had the value."""
    s = either
    await _warm(s)
    callee = Artifact.parse(CALLEE)
    with caplog.at_level(logging.ERROR):
        base = s.local_attempts()
        with pytest.raises(Exception) as direct:
            await s.ask("ask", ["spill_out", None])
        assert s.local_attempts() == base + 1  # the nested call was direct
        s.runtime.inject_fault(callee, SliceFault(error_rate=0.0))  # the usual way
        with pytest.raises(Exception) as usual:
            await s.ask("ask", ["spill_out", None])
        s.runtime.clear_fault(callee)
        assert s.local_attempts() == base + 3
    for info in (direct, usual):
        assert "raised SystemExit(cannot log in with ***)" in str(info.value), info.value
        assert SECRET not in str(info.value)
    assert caplog.text.count("raised SystemExit(cannot log in with ***): contained") == 2, caplog.text
    assert SECRET not in caplog.text
