"""Stopping slices whose code does not stop: every isolation mode bounds the stop of a slice.

A lifecycle hook (`start()`, `stop()`, `health()`, `reconfigure()`) or an entry that swallows its cancellation
(catches `asyncio.CancelledError` and goes on awaiting), or blocks its thread (`time.sleep`), or
never returns: the deactivation of the slice, the node's stop (`SliceRuntime.close`) and the
activation's deadline end in bounded time anyway, the slice is abandoned with a log line naming
it, and the runtime goes on. A real `SliceRuntime` per isolation mode ("inline" on this loop,
"shared", "thread", "process" in a worker process); the node-level tests are in
tests/test_node_stop.py.

The misbehaving code ends once the test touches its release file (so nothing outlives the test).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.errors import KIND_SHUTTING_DOWN, wire_kind_of
from aether.slices import SliceLoadError, SliceStartError
from aether.slices.errors import InstanceStopping
from aether.slices.isolation import SliceStopped
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import StoreInvoker, build_slice_wheel, isolated_imports
from aether.slices.workerproto import HEALTH_STILL_RUNNING
from aether.slices.workers import EXIT_GRACE

pytestmark = pytest.mark.timeout(60)

# `how` in the config picks the misbehaviour of each hook: "swallow" (catches CancelledError and
# goes on awaiting) or "sleep" (blocks its thread with time.sleep); both end with the release file
STUBBORN = """
import asyncio, os, time
from aether.slices import Slice, entry

def released(cfg):
    return os.path.exists(cfg["release"])

async def misbehave(cfg, how):
    if how == "swallow":
        while not released(cfg):
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass  # swallowed: the task goes on
    elif how == "sleep":
        while not released(cfg):
            time.sleep(0.02)

class Stubborn(Slice):
    async def start(self):
        await misbehave(self.context.config, self.context.config.get("start"))

    async def stop(self):
        log = self.context.config.get("stop_log")  # the instance's id when its stop() starts
        if log:
            with open(log, "a") as f:
                f.write(str(self.context.instance))
        await misbehave(self.context.config, self.context.config.get("stop"))

    async def reconfigure(self, config):
        await misbehave(config, config.get("reconfigure"))
        self.v = config.get("v")

    async def health(self):
        log = self.context.config.get("health_log")  # "+" when a health() starts, "-" when it ends
        if log:
            with open(log, "a") as f:
                f.write("+")
        try:
            await misbehave(self.context.config, self.context.config.get("health"))
        finally:
            if log:
                with open(log, "a") as f:
                    f.write("-")
        return True

    @entry
    async def hang(self) -> str:
        await misbehave(self.context.config, "swallow")
        return "done"

    @entry
    async def block(self) -> str:  # blocks its loop's thread; says so in its block_log first
        with open(self.context.config["block_log"], "a") as f:
            f.write("+")
        await misbehave(self.context.config, "sleep")
        return "done"

    @entry
    async def ping(self) -> str:
        return "pong"

    @entry
    async def version(self) -> str:  # the config this instance's context holds, and its own state
        return f"{self.context.config.get('v')}/{getattr(self, 'v', None)}"
"""

A = Artifact.parse("org.t:stubborn:1.0.0")
MODES = ["inline", "shared", "thread", "process"]
STOP_TIMEOUT = 0.3
RECONFIGURE_TIMEOUT = 0.3
# a hook left running is waited for 2 s when its slice's loop closes (`SliceThread.close`,
# `InlineLoop.close`); a worker that does not exit gets SIGTERM after `EXIT_GRACE` (1 s)
BOUND = STOP_TIMEOUT + 2.0 + 1.5


class Env:
    def __init__(self, rt: SliceRuntime, release: Path, cfg: dict[str, Any]) -> None:
        self.rt = rt
        self.release = release
        self.cfg = cfg  # what `config_for` gives (change it to change the slice's config)


@pytest.fixture
async def make_env(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await make_env(mode, **config)`: a runtime with the stubborn slice loaded with isolation
    `mode`; the release file is touched and the runtime closed when the test ends."""
    made: list[Env] = []
    with isolated_imports():
        repo = Repository(tmp_path / "repo")
        repo.deploy(build_slice_wheel(tmp_path / "w", str(A), STUBBORN, "Stubborn", module="stubborn_slice"))

        async def make(
            mode: str, start_timeout: float | None = None, load: bool = True, **config: Any
        ) -> Env:
            release = tmp_path / f"release{len(made)}"
            cfg = {**config, "release": str(release)}
            inv = StoreInvoker()
            rt = SliceRuntime(
                "node-1", repo, tmp_path / f"data{len(made)}", inv, space=ImportSpace(),
                config_for=lambda a: cfg, isolation_for=lambda a: mode, stop_timeout=STOP_TIMEOUT,
                start_timeout=start_timeout, health_interval=3600, health_timeout=0.3,
                reconfigure_timeout=RECONFIGURE_TIMEOUT,
            )  # fmt: skip
            inv.add(rt)
            env = Env(rt, release, cfg)
            made.append(env)
            if load:
                await rt.load(A)
            return env

        try:
            yield make
        finally:
            for env in made:
                env.release.touch()
                await env.rt.close(drain_timeout=0.1)
            await asyncio.sleep(0.1)  # (the released hooks end)


async def bounded(aw: Any, what: str, limit: float = BOUND) -> float:
    """Await `aw`; its duration. Fails (instead of hanging the test) when it takes past 3 x `limit`."""
    t0 = time.monotonic()
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=3 * limit)
    took = time.monotonic() - t0
    if not done:
        task.cancel()  # (it may not end: it is left to the release file)
        raise AssertionError(f"{what} did not end within {3 * limit:.1f} s")
    task.result()
    assert took < limit, f"{what} took {took:.2f} s"
    return took


@pytest.mark.parametrize("mode", MODES)
async def test_a_stop_that_swallows_its_cancellation_is_abandoned(
    make_env: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Inline, `stop()` ran in the deactivating task: `wait_for` cancelled it at `stop_timeout`,
    then waited for it to end, for ever (the node's stop and the slice's undeploy with it)."""
    caplog.set_level(logging.INFO)
    env = await make_env(mode, stop="swallow")
    await env.rt.activate(A, [0])
    assert env.rt.isolation(A) == mode
    await bounded(env.rt.deactivate(A, drain_timeout=0.2), "deactivating")
    assert env.rt.state(A) == "loaded"
    assert f"stop() of {A} instance 0 did not finish within {STOP_TIMEOUT} s" in caplog.text
    if mode == "inline":  # the hook still runs on the node's loop: said, naming the slice
        assert f"slice {A}: stop() still running 2.0 s after it was cancelled" in caplog.text
        assert "abandoned" in caplog.text
    await env.rt.activate(A, [1])  # the runtime goes on with the slice
    assert env.rt.local_instances(A) == [1]
    await bounded(env.rt.close(drain_timeout=0.2), "closing")
    assert env.rt.artifacts() == {}
    # the abandoned stop() runs on until it ends: its loop used to be closed under it, leaving it to
    # the garbage collector, whose GeneratorExit was logged as the slice exiting the process
    assert "GeneratorExit" not in caplog.text and "slice code must not exit" not in caplog.text


@pytest.mark.parametrize("mode", ["shared", "thread", "process"])
async def test_a_stop_that_blocks_its_thread_is_abandoned(
    make_env: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`stop()` in `time.sleep`: off the node's loop, the close is bounded (inline, nothing can
    interrupt it: docs/slices.md, *Inline slices*)."""
    env = await make_env(mode, stop="sleep")
    await env.rt.activate(A, [0])
    await bounded(env.rt.close(drain_timeout=0.2), "closing")
    assert env.rt.artifacts() == {}
    assert f"stop() of {A} instance 0 did not finish within {STOP_TIMEOUT} s" in caplog.text


async def test_a_worker_asked_to_exit_stops_its_instances_side_by_side_and_exits_on_time(
    make_env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`Shutdown` to a worker whose instances are still started (the runtime could not stop them
    first): it awaited each `stop()` in turn with `wait_for`, which waits for a cancelled hook to
    end, so a `stop()` that swallows its cancellation held it for ever (the next instance's
    `stop()` never ran) until its node sent SIGTERM, 2 x stop_timeout later. Now the `stop()`s run
    side by side, get stop_timeout, and the worker exits by itself, naming those it abandoned."""
    caplog.set_level(logging.INFO)
    log = tmp_path / "stops.log"
    env = await make_env("process", stop="swallow", stop_log=str(log))
    await env.rt.activate(A, [0, 1])
    host = env.rt._entries[A].worker
    assert host is not None and host._proc is not None
    process = host._proc.process
    await bounded(host.close(), "closing the worker", STOP_TIMEOUT + 1.0)
    assert process.returncode == 0, f"the worker did not exit by itself ({process.returncode})"
    assert sorted(log.read_text()) == ["0", "1"], "each instance's stop() ran"
    assert f"stop() of instance(s) 0, 1 did not finish within {STOP_TIMEOUT} s; abandoned" in caplog.text


async def test_undeploying_a_worker_whose_stop_blocks_it_takes_one_stop_timeout(make_env: Any) -> None:
    """The runtime asks each instance's `stop()` (stop_timeout), then the worker to exit: one whose
    loop a `stop()` blocks (`time.sleep`) cannot, and it was given 2 x stop_timeout more before
    SIGTERM although it had nothing left to stop (3 x stop_timeout in all: 15 s by default). Now
    the node waits `EXIT_GRACE` (1 s) for a worker with nothing left to stop."""
    env = await make_env("process", stop="sleep")
    env.rt.stop_timeout = 1.5
    host = env.rt._entries[A].worker
    assert host is not None
    host.stop_timeout = 1.5
    await env.rt.activate(A, [0])
    process = host._proc.process if host._proc is not None else None

    async def undeploy() -> None:
        await env.rt.deactivate(A, drain_timeout=0.1)
        await env.rt.unload(A)

    took = await bounded(undeploy(), "undeploying", 1.5 + EXIT_GRACE + 1.0)
    assert took >= 1.5 + EXIT_GRACE - 0.1  # (its stop() got its time)
    assert process is not None and process.returncode == -signal.SIGTERM


@pytest.mark.parametrize("mode", MODES)
async def test_a_start_that_never_returns_ends_at_the_deadline(make_env: Any, mode: str) -> None:
    """The node's managers time the activation (no `start_timeout`: the step's deadline cancels
    it). Inline, the cancelled `start()` was awaited until it ended: never."""
    env = await make_env(mode, start="swallow")
    with pytest.raises(TimeoutError):
        await bounded(asyncio.wait_for(env.rt.activate(A, [0]), 0.3), "the activation's deadline")
    assert env.rt.local_instances(A) == []
    await bounded(env.rt.close(drain_timeout=0.2), "closing")


@pytest.mark.parametrize("mode", MODES)
async def test_a_start_timeout_fails_the_activation(make_env: Any, mode: str) -> None:
    env = await make_env(mode, start_timeout=0.3, start="swallow")
    with pytest.raises(SliceStartError, match=r"start\(\) of org.t:stubborn:1.0.0 instance 0 did not finish"):
        await bounded(env.rt.activate(A, [0]), "activating")
    assert env.rt.local_instances(A) == []


@pytest.mark.parametrize("mode", MODES)
async def test_an_entry_that_swallows_its_cancellation_does_not_hold_the_stop(
    make_env: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(mode)
    await env.rt.activate(A, [0])
    call = asyncio.ensure_future(env.rt.call(A, "hang", b""))
    while not any(i.in_flight for i in env.rt.instance_loads()):
        await asyncio.sleep(0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await bounded(env.rt.close(drain_timeout=0.3), "closing")
        gc.collect()
    # (shared: the wait for direct calls, its deadline passed, made a coroutine it never awaited)
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert env.rt.artifacts() == {}
    assert "1 call(s) to org.t:stubborn:1.0.0 still in flight after 0.3 s of draining" in caplog.text
    if mode == "inline":  # it runs in its caller's task: nothing but its own end ends it
        assert not call.done()
        env.release.touch()
        assert await asyncio.wait_for(call, 5) == b"\xa4done"
        return
    # its caller is answered when the slice is gone: the call did not end (with a thread of its
    # own, its task was left unfinished when the slice's loop closed, and its caller waited for ever)
    assert call.done()
    with pytest.raises(Exception) as got:
        call.result()
    if mode == "process":
        assert "exited before it answered" in str(got.value)
    else:  # (503, kind interrupted: it may have partly run; it was SliceCrashed, an app error)
        assert isinstance(got.value, SliceStopped)
        assert str(got.value) == (
            "hang of org.t:stubborn:1.0.0 did not end when its slice was stopped (its code ignores "
            "cancellation); abandoned"
        )
        assert "hang of org.t:stubborn:1.0.0 still running 1.0 s after it was cancelled" in caplog.text


@pytest.mark.parametrize("mode", MODES)
async def test_a_health_check_that_swallows_its_cancellation_is_unhealthy(make_env: Any, mode: str) -> None:
    """Inline, the check waited for the cancelled hook for ever: the instance stayed 'not checked
    yet' (healthy None) whatever its hook did, and was never replaced."""
    env = await make_env(mode, health="swallow")
    await env.rt.activate(A, [0])
    assert env.rt.check_health() == 1

    def load() -> Any:
        (got,) = env.rt.instance_loads()
        return got

    deadline = time.monotonic() + 5
    while load().healthy is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert (load().healthy, load().health_reason) == (False, "health() did not answer within 0.3 s")
    await bounded(env.rt.close(drain_timeout=0.2), "closing")


@pytest.mark.parametrize("mode", MODES)
async def test_a_health_check_still_running_is_not_started_again(
    make_env: Any, mode: str, tmp_path: Path
) -> None:
    """The hook that swallowed its cancellation at the timeout runs on: each interval started
    another health() next to it (one more stuck task per interval, on the slice's loop, the node's
    loop or in the worker). Now the instance fails each check with a reason saying so, its failure
    count grows (the controller replaces it), and only one health() runs; once it has ended, the
    next check runs again."""
    log = tmp_path / "health.log"
    env = await make_env(mode, health="swallow", health_log=str(log))
    await env.rt.activate(A, [0])

    def load() -> Any:
        (got,) = env.rt.instance_loads()
        return got

    async def checked(failures: int) -> None:
        deadline = time.monotonic() + 5
        while load().health_failures < failures and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert load().health_failures == failures

    assert env.rt.check_health() == 1
    await checked(1)
    assert load().health_reason == "health() did not answer within 0.3 s"
    for n in range(2, 6):  # the next intervals
        assert env.rt.check_health() == 1
        await checked(n)
        await asyncio.sleep(0.05)  # (a health() started by mistake writes its "+" meanwhile)
        assert log.read_text() == "+", "only the first health() ran, and it runs still"
        assert (load().healthy, load().health_reason) == (False, HEALTH_STILL_RUNNING)

    env.release.touch()  # the stuck health() ends; the next check runs a new one, which passes
    deadline = time.monotonic() + 5
    while log.read_text() != "+-" and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert log.read_text() == "+-"
    assert env.rt.check_health() == 1
    deadline = time.monotonic() + 5
    while load().healthy is not True and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert (load().healthy, load().health_failures, load().health_reason) == (True, 0, None)
    assert log.read_text() == "+-+-"


@pytest.mark.parametrize("mode", MODES)
async def test_a_reconfigure_that_never_returns_ends_at_its_timeout(
    make_env: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`reconfigure()` had no bound of its own: only the node's reconfigure step deadline
    (activate + deactivate, 20 s per instance) ended it, and meanwhile it held the slice's lock (an
    undeploy of the slice waited for it). Now it gets `reconfigure_timeout`: cancelled then (left
    running if it swallows that), the change is not applied, the instance serves on and the
    slice's deactivation is not held."""
    env = await make_env(mode, reconfigure="swallow")
    await env.rt.activate(A, [0])
    with pytest.raises(SliceStartError) as got:
        await bounded(env.rt.reconfigure(A, 0), "reconfiguring", RECONFIGURE_TIMEOUT + 1.5)
    assert str(got.value) == (
        f"reconfigure() of {A} instance 0 did not finish within {RECONFIGURE_TIMEOUT:g} s; cancelled"
    )
    assert got.value.instance == 0
    assert (
        f"reconfigure() of {A} instance 0 did not finish within {RECONFIGURE_TIMEOUT:g} s; cancelled "
        "(left running if it ignores that), the change is not applied"
    ) in caplog.text
    assert env.rt.local_instances(A) == [0]
    assert await asyncio.wait_for(env.rt.call(A, "ping", b""), 5) == b"\xa4pong"  # it serves on
    await bounded(env.rt.deactivate(A, drain_timeout=0.2), "deactivating")
    assert env.rt.state(A) == "loaded"


@pytest.mark.parametrize("mode", ["shared", "thread"])
async def test_a_call_queued_on_a_slice_loop_that_closes_before_it_starts_is_retried_elsewhere(
    make_env: Any, mode: str, tmp_path: Path
) -> None:
    """A call queued for a slice's loop that an entry blocks, when the slice is stopped (its drain
    gave up): the loop closes before the call starts. It was answered `SliceCrashed` (an app error:
    never retried) although it never ran; now `InstanceStopping` (503, kind shutting_down), which
    the invoker retries on another instance, whatever the entry (it did not run)."""
    block_log = tmp_path / "block.log"
    env = await make_env(mode, block_log=str(block_log))
    await env.rt.activate(A, [0])
    thread = env.rt._entries[A].thread
    assert thread is not None
    blocker = asyncio.ensure_future(env.rt.call(A, "block", b""))
    deadline = time.monotonic() + 5
    while not block_log.exists() and time.monotonic() < deadline:  # the entry blocks the loop now
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(env.rt.call(A, "ping", b""))
    await asyncio.sleep(0.05)  # (queued for the blocked loop)
    assert not queued.done()
    stopping = asyncio.ensure_future(env.rt.deactivate(A, drain_timeout=0.2))
    while not thread._closed and time.monotonic() < deadline:  # (drain, then stop(), gave up)
        await asyncio.sleep(0.01)
    assert thread._closed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env.release.touch()  # the blocking entry returns: the loop takes the queued call, closing
        with pytest.raises(InstanceStopping) as got:
            await asyncio.wait_for(queued, 5)
        assert "before the call started" in str(got.value)
        assert (got.value.status, wire_kind_of(got.value)) == (503, KIND_SHUTTING_DOWN)
        await bounded(stopping, "deactivating")
        await asyncio.wait({blocker}, timeout=5)
        assert blocker.done()
        blocker.exception()  # (retrieved: the watchdog answered it, SliceBlocked)
        gc.collect()
    # (the stop() queued behind the blocking entry, given up at stop_timeout, then failed as the
    # queued call: its cancellation made a new coroutine for it that nothing ever awaited)
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def _worker_processes() -> set[int]:
    """The pids of this process's live children that are slice worker processes."""
    me, found = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z" and b"aether.slices.worker" in cmd:
            found.add(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")
async def test_a_load_still_running_when_the_runtime_closes_is_unloaded_when_it_ends(make_env: Any) -> None:
    """`close` unloaded the artifacts loaded by then: one whose load was still under way (its
    worker process starting) was not among them, and once loaded it stayed, its worker running,
    in a closed runtime. Now a load that ends after `close` began is unloaded at once (its worker
    stopped) and fails, saying why."""
    env = await make_env("process", load=False)
    before = _worker_processes()
    loading = asyncio.ensure_future(env.rt.load(A))
    deadline = time.monotonic() + 10
    while not (_worker_processes() - before) and time.monotonic() < deadline:  # (the worker spawns)
        await asyncio.sleep(0.01)
    spawned = _worker_processes() - before
    assert spawned and not loading.done()
    await bounded(env.rt.close(drain_timeout=0.1), "closing")
    with pytest.raises(SliceLoadError, match=f"{A}: the slice runtime of node-1 was closed while it loaded"):
        await asyncio.wait_for(loading, 10)
    assert env.rt.artifacts() == {} and env.rt.workers() == {}
    deadline = time.monotonic() + 5
    while spawned & _worker_processes() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not spawned & _worker_processes(), "its worker process was stopped"


@pytest.mark.parametrize("mode", MODES)
async def test_a_reconfigure_that_ends_after_its_timeout_does_not_change_the_context_config(
    make_env: Any, mode: str
) -> None:
    """A `reconfigure()` that swallows its cancellation at `reconfigure_timeout` and returns later:
    the node reported the change as not applied, but in a worker process the worker set the new
    config as the instance's `context.config` anyway once the hook returned. Now the context
    keeps the config the node believes applied, in every isolation; what the late hook did to the
    object's own state is the slice's (documented: the hook is abandoned, as any)."""
    env = await make_env(mode, v=1)
    await env.rt.activate(A, [0])
    env.cfg.update(v=2, reconfigure="swallow")
    with pytest.raises(SliceStartError, match="did not finish within"):
        await bounded(env.rt.reconfigure(A, 0), "reconfiguring", RECONFIGURE_TIMEOUT + 1.5)
    env.release.touch()  # the abandoned hook returns now
    await asyncio.sleep(0.2)
    got = msgspec.msgpack.decode(await asyncio.wait_for(env.rt.call(A, "version", b""), 5))
    assert got == "1/2"  # context: the config the node believes applied; the object: what its hook set
    # a change applied in time still reaches the context
    env.cfg.update(v=3, reconfigure=None)
    assert await asyncio.wait_for(env.rt.reconfigure(A, 0), 5) == "reloaded"
    assert msgspec.msgpack.decode(await asyncio.wait_for(env.rt.call(A, "version", b""), 5)) == "3/3"


# a slice whose module's own code (run by its import) blocks its thread until the release file
BLOCKS_ON_IMPORT = """
import os, time
while not os.path.exists({release!r}):
    time.sleep(0.02)
from aether.slices import Slice, entry

class Blocks(Slice):
    @entry
    async def ping(self) -> str:
        return "pong"
"""


def _runtime_with_a_blocking_import(
    tmp_path: Path, release: Path, blocks: Artifact, *others: Artifact, mode: str = "thread"
) -> SliceRuntime:
    """A runtime (isolation `mode`) whose repository holds `blocks`, whose module's import blocks until
    the file `release` exists, and `others`, each a `STUBBORN` slice (module ``{name}_slice``)."""
    repo = Repository(tmp_path / "repo")
    for a in others:
        module = f"{a.artifact}_slice"
        repo.deploy(build_slice_wheel(tmp_path / "w", str(a), STUBBORN, "Stubborn", module=module))
    source = BLOCKS_ON_IMPORT.format(release=str(release))
    repo.deploy(build_slice_wheel(tmp_path / "w", str(blocks), source, "Blocks", module="blocks_slice"))
    inv = StoreInvoker()
    rt = SliceRuntime(
        "node-1", repo, tmp_path / "data", inv, space=ImportSpace(), stop_timeout=STOP_TIMEOUT,
        config_for=lambda a: {"release": str(release)}, isolation_for=lambda a: mode,
    )  # fmt: skip
    inv.add(rt)
    return rt


async def test_a_slice_whose_import_blocks_holds_neither_the_stop_nor_the_process_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slice module whose top-level code blocks (a connection made at import, with no timeout):
    its load's deadline gives up on it, but its import ran in a thread of the default executor
    holding the import space's lock. The node's stop then unloaded its other slices, each waiting
    for that lock: `close` never ended. And a thread of the default executor it blocks kept the
    node's process from exiting after its stop (`loop.shutdown_default_executor`, node/runner.py).
    Now the import runs on a daemon thread of its own, without the import space's lock (so the
    other slices' unloads do not wait for it), and `close` gives each slice's code at most 2 s
    (`CLOSE_UNLOAD_WAIT`) to leave the import space anyway."""
    release = tmp_path / "release"
    ok, blocks = Artifact.parse("org.t:ok:1.0.0"), Artifact.parse("org.t:blocks:1.0.0")
    with isolated_imports():
        rt = _runtime_with_a_blocking_import(tmp_path, release, blocks, ok)
        try:
            await rt.load(ok)
            await rt.activate(ok, [0])
            with pytest.raises(TimeoutError):  # (the load step's deadline)
                await asyncio.wait_for(rt.load(blocks), 0.3)
            caplog.set_level(logging.INFO, logger="aether.slices.runtime")
            await bounded(rt.close(drain_timeout=0.1), "closing", STOP_TIMEOUT + 1.0)
            assert rt.artifacts() == {}
            assert f"node-1: unloaded {ok}" in caplog.text  # not left to the blocked import
            assert "did not leave the import space" not in caplog.text
            loop = asyncio.get_running_loop()
            # what the node's process does once the node stopped, before it exits
            await bounded(loop.shutdown_default_executor(), "shutting the default executor down", 1.0)
        finally:
            release.touch()
            for t in threading.enumerate():  # (the import ends; the unload it held goes on)
                if t.name.startswith("aether-slice-"):
                    t.join(5.0)


async def test_a_slice_whose_import_blocks_holds_no_other_slice_load_or_unload(tmp_path: Path) -> None:
    """A slice module whose top-level code blocks its import held the import space's lock all that
    time: every other in-process load and unload (an undeploy) on the node waited for it, until
    their step deadlines. Now the lock is not held while the module's own code runs: the other
    slices load and unload at once; only the blocked slice waits for its import."""
    release = tmp_path / "release"
    ok, other = Artifact.parse("org.t:ok:1.0.0"), Artifact.parse("org.t:other:1.0.0")
    blocks = Artifact.parse("org.t:blocks:1.0.0")
    with isolated_imports():
        rt = _runtime_with_a_blocking_import(tmp_path, release, blocks, ok, other)
        try:
            await rt.load(ok)
            await rt.activate(ok, [0])
            blocked = asyncio.ensure_future(rt.load(blocks))
            await asyncio.sleep(0.3)  # (its module's code runs, and blocks)
            assert not blocked.done()
            await bounded(rt.load(other), "loading another slice", 1.5)
            await rt.activate(other, [0])
            assert await asyncio.wait_for(rt.call(other, "ping", b""), 5) == b"\xa4pong"
            await bounded(rt.unload(ok), "unloading another slice", 1.5)
            assert rt.state(ok) is None and rt.state(other) == "active"
            assert not blocked.done()  # the blocked slice alone waits for its import
            release.touch()
            await asyncio.wait_for(blocked, 5)
            assert rt.state(blocks) == "loaded"
        finally:
            release.touch()
            await rt.close(drain_timeout=0.1)
            for t in threading.enumerate():  # (the import ends)
                if t.name.startswith("aether-slice-"):
                    t.join(5.0)


async def _import_threads_end() -> None:
    """Wait for the loader's threads (a blocked import that was released) to end."""
    for t in threading.enumerate():
        if t.name.startswith("aether-slice-"):
            await asyncio.to_thread(t.join, 5.0)


async def test_a_load_given_up_at_its_deadline_is_undone_when_its_import_ends(tmp_path: Path) -> None:
    """The load step's deadline cancelled `load` while the slice's module was still being imported:
    the import ended later and the loader kept the slice loaded in the import space (its code on
    sys.path, its module claimed, `loader.loaded` set), but the runtime had no entry for it, so the
    undeploy's `unload` released nothing, ever. The next version of the slice (the same module)
    then conflicted with it and went to a worker process. Now the abandoned load is undone when its
    import ends, and the next version loads here normally."""
    release = tmp_path / "release"
    blocks, newer = Artifact.parse("org.t:blocks:1.0.0"), Artifact.parse("org.t:blocks:2.0.0")
    with isolated_imports():
        rt = _runtime_with_a_blocking_import(tmp_path, release, blocks)
        source = BLOCKS_ON_IMPORT.format(release=str(release))
        wheel = build_slice_wheel(tmp_path / "w", str(newer), source, "Blocks", module="blocks_slice")
        rt.repository.deploy(wheel)
        space = rt.loader.space
        try:
            with pytest.raises(TimeoutError):  # (the load step's deadline)
                await asyncio.wait_for(rt.load(blocks), 0.3)
            await bounded(rt.unload(blocks), "unloading (the undeploy)", 1.0)
            assert rt.artifacts() == {}
            release.touch()  # the import ends now
            await _import_threads_end()
            deadline = time.monotonic() + 2
            while (space.code or rt.loader.loaded(blocks)) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert space.code == {} and space.modules == {}, "the abandoned load was undone"
            assert rt.loader.loaded(blocks) is None
            assert not [p for p in sys.path if p.startswith(str(tmp_path))], "its code left sys.path"
            assert rt.artifacts() == {}
            await asyncio.wait_for(rt.load(newer), 5)
            assert rt.workers() == {} and rt.isolation(newer) == "thread", "loaded here, no conflict"
            await rt.activate(newer, [0])
            assert await asyncio.wait_for(rt.call(newer, "ping", b""), 5) == b"\xa4pong"
        finally:
            release.touch()
            await rt.close(drain_timeout=0.1)
            await _import_threads_end()


async def test_a_load_retried_while_the_abandoned_one_still_imports_takes_it_over(tmp_path: Path) -> None:
    """The deployer retries the load of a slice whose first load it gave up on, the import still
    running: the retry waits for that import (no second one) and gets the slice loaded; it is not
    undone under it when the first, abandoned, load ends."""
    release = tmp_path / "release"
    blocks = Artifact.parse("org.t:blocks:1.0.0")
    with isolated_imports():
        rt = _runtime_with_a_blocking_import(tmp_path, release, blocks)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(rt.load(blocks), 0.3)
            retry = asyncio.ensure_future(rt.load(blocks))
            await asyncio.sleep(0.1)
            assert not retry.done()
            loads = [t for t in threading.enumerate() if t.name == f"aether-slice-load {blocks}"]
            assert len(loads) == 1, "one import of the slice"
            release.touch()
            await asyncio.wait_for(retry, 5)
            await _import_threads_end()
            await asyncio.sleep(0.1)  # (an undo would run now)
            assert rt.state(blocks) == "loaded" and rt.loader.loaded(blocks) is not None
            (code,) = rt.loader.space.code.values()
            assert code.users == {f"{blocks} on node-1"}
            await rt.activate(blocks, [0])
            assert await asyncio.wait_for(rt.call(blocks, "ping", b""), 5) == b"\xa4pong"
            await rt.unload(blocks)
            assert rt.loader.space.code == {}
        finally:
            release.touch()
            await rt.close(drain_timeout=0.1)
            await _import_threads_end()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")
async def test_a_load_given_up_while_its_worker_process_starts_stops_that_worker(tmp_path: Path) -> None:
    """isolation = "process": a load given up while its worker process imports the slice (its
    module's code blocks) stops that worker at once and releases what was held for it (the
    worker count, its library directories); a later load of the artifact works normally."""
    release = tmp_path / "release"
    blocks = Artifact.parse("org.t:blocks:1.0.0")
    with isolated_imports():
        rt = _runtime_with_a_blocking_import(tmp_path, release, blocks, mode="process")
        try:
            before = _worker_processes()
            loading = asyncio.ensure_future(rt.load(blocks))
            deadline = time.monotonic() + 10
            while not (_worker_processes() - before) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            spawned = _worker_processes() - before
            assert spawned and not loading.done()
            loading.cancel()  # (the load step's deadline)
            with pytest.raises(asyncio.CancelledError):
                await loading
            deadline = time.monotonic() + 3
            while spawned & _worker_processes() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not spawned & _worker_processes(), "its worker process was stopped"
            await asyncio.sleep(0.05)
            assert rt._workers_reserved == 0 and rt.loader.space.held == {} and rt.artifacts() == {}
            release.touch()
            await asyncio.wait_for(rt.load(blocks), 10)
            assert rt.worker_pid(blocks) is not None
            await rt.activate(blocks, [0])
            assert await asyncio.wait_for(rt.call(blocks, "ping", b""), 5) == b"\xa4pong"
        finally:
            release.touch()
            await rt.close(drain_timeout=0.1)
