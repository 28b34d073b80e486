"""Slice worker processes: the protocol and supervisor decisions (sans-IO), and a runtime that runs
conflicting slices in workers (two versions of one slice, two pins of one library), restarts a
killed worker, forwards slice-to-slice calls, map operations and logs, and leaves no process behind."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.errors import (
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_INTERRUPTED,
    KIND_NO_INSTANCE,
    wire_kind_of,
)
from aether.core.tracing import current_trace, parse_traceparent
from aether.slices import SliceLoadError, SliceStartError
from aether.slices.errors import Conflict, NotFound
from aether.slices.isolation import InlineInvoker
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime, is_client_error
from aether.slices.testing import (
    LocalMaps,
    StoreInvoker,
    build_library_wheel,
    build_slice_wheel,
    isolated_imports,
)
from aether.slices.workerproto import (
    BEGUN,
    Call,
    ErrorInfo,
    FrameDecoder,
    FrameTooLarge,
    GiveUp,
    Log,
    Reply,
    Restart,
    RestartPolicy,
    begun_upto,
    encode_frame,
    error_info,
    rebuild_error,
)
from aether.slices.workers import WorkerLost, WorkerLostMidCall
from local_cluster_cli import running

enc = msgspec.msgpack.encode
dec = msgspec.msgpack.decode

# --- sans-IO: framing, errors, restart policy -----------------------------------------------------------


def test_frames_split_anywhere_decode_whole() -> None:
    msgs = [Call(1, "call", 3, 7, "m", b"\x01" * 100, "rid"), Reply(1, b"ok"), Log(20, "x", "hello", 3)]
    data = b"".join(encode_frame(m) for m in msgs)
    for cut in (1, 3, 5, 17, len(data) - 1):
        d = FrameDecoder()
        got = d.feed(data[:cut]) + d.feed(data[cut:])
        assert got == msgs
        assert d.buffered == 0


def test_begun_record_is_trusted_only_when_the_worker_keeps_it() -> None:
    assert begun_upto(BEGUN.pack(1, 7)) == 7
    assert begun_upto(BEGUN.pack(1, 0)) == 0  # kept, nothing begun yet
    assert begun_upto(bytes(BEGUN.size)) is None  # a worker that does not know it: nothing known
    assert begun_upto(b"") is None


def test_frame_bounds_both_ways() -> None:
    with pytest.raises(FrameTooLarge, match="exceeds 64 bytes"):
        encode_frame(Reply(1, b"x" * 100), max_frame=64)
    big = encode_frame(Reply(1, b"x" * 100))
    d = FrameDecoder(max_frame=64)
    with pytest.raises(FrameTooLarge, match="limit is 64 bytes"):
        d.feed(big[:4])  # refused on the announced length, before the body arrives


def test_errors_keep_kind_status_and_text_across() -> None:
    cases: list[tuple[BaseException, str, int | None]] = [
        (NotFound("no order 7"), "status:404", 404),
        (Conflict("out of stock"), "status:409", 409),
        (ValueError("boom"), KIND_APP_ERROR, None),
        (WorkerLost("gone"), KIND_NO_INSTANCE, 503),
    ]
    from aether.core.errors import BadRequest

    cases.append((BadRequest("qty must be > 0"), KIND_BAD_REQUEST, 400))
    for exc, kind, status in cases:
        info = msgspec.msgpack.decode(msgspec.msgpack.encode(error_info(exc)), type=ErrorInfo)
        back = rebuild_error(info)
        assert wire_kind_of(back) == kind == wire_kind_of(exc)
        assert getattr(back, "status", None) == status
        assert type(back).__name__ == type(exc).__name__
        assert str(back) == str(exc)
        assert is_client_error(back) == is_client_error(exc)


def test_restart_policy_backs_off_resets_and_gives_up() -> None:
    p = RestartPolicy(base=0.1, max_delay=0.5, stable=10.0, max_restarts=4)
    p.started(0.0)
    delays = []
    for t in (1.0, 2.0, 3.0, 4.0):
        d = p.died(t, "killed")
        assert isinstance(d, Restart)
        delays.append(d.delay)
        p.started(t)
    assert delays == [0.1, 0.2, 0.4, 0.5]  # doubling, capped
    assert isinstance(p.died(5.0, "killed"), GiveUp)
    q = RestartPolicy(base=0.1, max_delay=5.0, stable=10.0, max_restarts=4)
    q.started(0.0)
    assert q.died(1.0, "x") == Restart(0.1, 1)
    q.started(1.0)
    assert q.died(20.0, "x") == Restart(0.1, 1)  # it ran 19 s: the count starts afresh


# --- a runtime with workers ------------------------------------------------------------------------------

VERSIONED = """
import os
from aether.slices import Slice, entry

class Versioned(Slice):
    @entry
    async def version(self) -> str:
        return "{v}"

    @entry
    async def pid(self) -> int:
        return os.getpid()
"""

USES_TINYLIB = """
import os
import time
import tinylib
from aether.slices import Slice, entry, NotFound, Conflict

class Uses(Slice):
    async def start(self):
        self.logger.info("started with %s", self.context.config.get("greeting"))

    @entry
    async def version(self) -> str:
        return tinylib.__version__

    @entry
    async def pid(self) -> int:
        return os.getpid()

    @entry
    async def fail(self, how: str) -> str:
        if how == "404":
            raise NotFound("no such thing")
        if how == "409":
            raise Conflict("taken")
        if how == "exit":
            os._exit(7)
        if how == "block-exit":  # holds the worker's loop (nothing more is read), then dies
            time.sleep(1.0)
            os._exit(7)
        raise ValueError("boom")

    @entry
    async def wrong(self) -> int:
        return "not an int"

    @entry
    async def relay(self, name: str) -> str:
        got = await self.call("org.example:hello", "greet", name, str)
        return got + " / rid=" + str(self.context.request_id)

    @entry
    async def traced(self) -> list:
        # the trace context the node sent with the call, and the one a nested call arrived with
        from aether.core.tracing import current_trace
        here = current_trace.get()
        return [here and here.traceparent, await self.call("org.example:hello", "traceparent", None, str)]

    @entry
    async def remember(self, value: str) -> list:
        m = self.map("notes", str)
        await m.put("k", value)
        return [await m.get("k"), await m.keys()]
"""

HELLO = """
from aether.slices import Slice, entry, current_request_id

class Hello(Slice):
    @entry
    async def greet(self, name: str) -> str:
        return "Hello, " + name

    @entry
    async def traceparent(self) -> str:
        from aether.core.tracing import current_trace
        here = current_trace.get()
        return here.traceparent if here else "none"
"""

HOOKS = """
import signal, time
import msgspec
from aether.slices import Slice, entry

class Conf(msgspec.Struct):
    mode: str = "ok"
    healthy: bool = True

class Hooks(Slice):
    config_type = Conf

    async def start(self):
        if self.context.config.mode == "fail":
            raise RuntimeError("no database")
        if self.context.config.mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def stop(self):
        if self.context.config.mode == "stubborn":
            time.sleep(30)  # blocks the worker: it cannot even read the Shutdown

    async def health(self):
        return self.context.config.healthy

    async def reconfigure(self, config):
        pass

    @entry
    async def conf(self) -> dict:
        return msgspec.to_builtins(self.context.config)
"""

HOOKS_A = Artifact.parse("org.example:hooks:1.0.0")
V1 = Artifact.parse("org.example:versioned:1.0.0")
V2 = Artifact.parse("org.example:versioned:2.0.0")
A = Artifact.parse("org.example:a:1.0.0")
B = Artifact.parse("org.example:b:1.0.0")


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo")
    for v in ("1.0", "2.0"):
        r.deploy_library(build_library_wheel(tmp_path / "lib" / v, "tinylib", v))
    for a in (V1, V2):
        src = VERSIONED.replace("{v}", str(a.version))
        r.deploy(build_slice_wheel(tmp_path / str(a.version), a, src, "Versioned", module="versioned_slice"))
    for a, pin in ((A, "tinylib==1.0"), (B, "tinylib>=2")):
        r.deploy(
            build_slice_wheel(
                tmp_path / a.artifact, a, USES_TINYLIB, "Uses", None, [pin], module=f"{a.artifact}_slice"
            )
        )
    r.deploy(build_slice_wheel(tmp_path / "h", "org.example:hello:0.1.0", HELLO, "Hello"))
    r.deploy(build_slice_wheel(tmp_path / "hooks", HOOKS_A, HOOKS, "Hooks"))
    return r


def make_runtime(repo: Repository, tmp_path: Path, **kw: object) -> tuple[SliceRuntime, LocalMaps]:
    inv = StoreInvoker()
    maps = LocalMaps(["notes"])
    kw.setdefault("worker_policy", lambda: RestartPolicy(base=0.05, max_delay=0.2, max_restarts=3))
    rt = SliceRuntime(
        "node-1", repo, tmp_path / "data", inv, space=ImportSpace(), maps=maps,
        config_for=lambda a: {"greeting": "hi"}, stop_timeout=2.0, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    inv.add(rt)
    return rt, maps


async def wait_for(pred: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.timeout(60)
async def test_two_versions_of_one_slice_side_by_side(repo: Repository, tmp_path: Path) -> None:
    rt, _ = make_runtime(repo, tmp_path)
    try:
        await rt.load(V1)
        await rt.load(V2)  # its module is already imported from v1's wheel: a worker of its own
        assert rt.isolation(V1) == "thread" and rt.isolation(V2) == "process"
        pid = rt.worker_pid(V2)
        assert pid is not None and running(pid)
        await rt.activate(V1, [1])
        await rt.activate(V2, [1, 2])
        assert dec(await rt.call(V1, "version", enc(None))) == "1.0.0"
        for _ in range(2):
            assert dec(await rt.call(V2, "version", enc(None))) == "2.0.0"
        assert dec(await rt.call(V2, "pid", enc(None))) == pid != os.getpid()
        assert rt.local_instances(V2) == [1, 2]
        loads = {(x.artifact, x.instance): x for x in rt.instance_loads()}
        assert loads[(str(V2), 1)].calls + loads[(str(V2), 2)].calls == 3  # counted on the node
    finally:
        await rt.close()
    assert not running(pid)


@pytest.mark.timeout(60)
async def test_conflicting_library_pins_each_get_their_version(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt, maps = make_runtime(repo, tmp_path)
    caplog.set_level(logging.INFO)
    try:
        await rt.load(Artifact.parse("org.example:hello:0.1.0"))
        await rt.activate(Artifact.parse("org.example:hello:0.1.0"), [1])
        await rt.load(A)
        await rt.load(B)  # tinylib>=2 conflicts with tinylib 1.0 loaded for A
        assert rt.isolation(A) == "thread" and rt.isolation(B) == "process"
        await rt.activate(A, [1])
        await rt.activate(B, [1])
        assert dec(await rt.call(A, "version", enc(None))) == "1.0"
        assert dec(await rt.call(B, "version", enc(None))) == "2.0"
        # the worker's log records reach the node's logger, naming the slice and instance (in the
        # text, and as the fields of the node's log buffer and JSON lines)
        await wait_for(lambda: any("started with hi" in r.getMessage() and f"{B} instance 1" in r.getMessage()
                                   and getattr(r, "aether_slice", None) == str(B)
                                   and getattr(r, "aether_instance", None) == 1
                                   for r in caplog.records))  # fmt: skip
        # typed errors keep their kind and status; a client error is counted as one
        for how, kind in (("404", "status:404"), ("409", "status:409"), ("other", KIND_APP_ERROR)):
            with pytest.raises(Exception) as got:
                await rt.call(B, "fail", enc(how))
            assert wire_kind_of(got.value) == kind
        with pytest.raises(Exception) as bad:
            await rt.call(B, "fail", enc(12))
        assert wire_kind_of(bad.value) == KIND_BAD_REQUEST
        load = next(x for x in rt.instance_loads() if x.artifact == str(B))
        assert load.failures == 1  # only the ValueError; 404/409/400 are the caller's
        # a result that does not fit the annotation: 500, logged (by the worker, on the node's log)
        with pytest.raises(Exception) as wrong:
            await rt.call(B, "wrong", enc(None))
        assert type(wrong.value).__name__ == "ResponseTypeError" and wrong.value.status == 500  # type: ignore[attr-defined]
        await wait_for(lambda: any(r.levelno == logging.ERROR and "Uses.wrong" in r.getMessage()
                                   for r in caplog.records))  # fmt: skip
        # a slice-to-slice call from inside the worker, with the request id
        got = dec(await rt.call(B, "relay", enc("ann"), request_id="req-7"))
        assert got == "Hello, ann / rid=req-7"
        # the trace context reaches the worker (Call) and comes back with its nested call (Up)
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        token = current_trace.set(parse_traceparent(tp))
        try:
            assert dec(await rt.call(B, "traced", enc(None))) == [tp, tp]
            assert dec(await rt.call(A, "traced", enc(None))) == [tp, tp]  # on a slice thread
        finally:
            current_trace.reset(token)
        assert dec(await rt.call(B, "traced", enc(None))) == [None, "none"]
        # a map operation from inside the worker goes to the node's MapBackend
        assert dec(await rt.call(B, "remember", enc("v1"))) == ["v1", ["k"]]
        assert maps.data["notes"]["k"][0] == enc("v1")
    finally:
        await rt.close()


@pytest.mark.timeout(60)
async def test_killed_worker_is_restarted_and_serves_again(repo: Repository, tmp_path: Path) -> None:
    rt, _ = make_runtime(repo, tmp_path, isolation_for=lambda a: "process")
    pids: list[int] = []
    try:
        await rt.load(A)
        await rt.activate(A, [1])
        pid = rt.worker_pid(A)
        assert pid is not None
        pids.append(pid)
        assert dec(await rt.call(A, "pid", enc(None))) == pid
        # a call in flight when the worker dies may have partly run: kind interrupted (retried
        # elsewhere only for an idempotent entry), not no_instance ("did not run here")
        with pytest.raises(WorkerLostMidCall, match="may have partly run") as lost:
            await rt.call(A, "fail", enc("exit"))
        assert wire_kind_of(lost.value) == KIND_INTERRUPTED
        await wait_for(lambda: rt.worker_pid(A) not in (None, pid))
        pids.append(rt.worker_pid(A))  # type: ignore[arg-type]
        await wait_for(lambda: rt._entries[A].worker.ready)  # type: ignore[union-attr]
        assert dec(await rt.call(A, "version", enc(None))) == "1.0"
        os.kill(pids[-1], signal.SIGKILL)
        await wait_for(lambda: rt.worker_pid(A) not in (None, pids[-1]))
        pids.append(rt.worker_pid(A))  # type: ignore[arg-type]
        await wait_for(lambda: rt._entries[A].worker.ready)  # type: ignore[union-attr]
        assert dec(await rt.call(A, "pid", enc(None))) == pids[-1]
        assert rt.instance_loads()[0].calls >= 3  # the counters survived the restarts (node-side)
    finally:
        await rt.close()
    await wait_for(lambda: not any(running(p) for p in pids))


@pytest.mark.timeout(60)
async def test_calls_a_dying_worker_never_began_did_not_run(repo: Repository, tmp_path: Path) -> None:
    """Found by an audit: when a worker died, every call in flight failed with WorkerLostMidCall
    (kind interrupted: "may have partly run"), also the ones still queued in the socket that the
    worker never read. The invoker then gave an entry declared idempotent=False an
    IndeterminateOutcome (502) for a call that certainly did not run, and counted each towards
    poison. The worker now records the highest call it began (shared memory, before slice code can
    run); a call beyond it fails with WorkerLost (kind no_instance: retried, it did not run)."""
    rt, _ = make_runtime(repo, tmp_path, isolation_for=lambda a: "process")
    try:
        await rt.load(A)
        await rt.activate(A, [1])
        host = rt._entries[A].worker
        assert host is not None
        proc = host._proc
        assert proc is not None and proc.begun is not None

        def begun() -> int | None:
            assert proc.begun is not None
            return begun_upto(proc.begun[: BEGUN.size])

        before = begun()
        assert before is not None
        dying = asyncio.create_task(rt.call(A, "fail", enc("block-exit")))
        await wait_for(lambda: (begun() or 0) > before)  # the worker began it ...
        await asyncio.sleep(0.2)  # ... and is stuck in time.sleep: it reads nothing more
        queued = [asyncio.create_task(rt.call(A, "pid", enc(None))) for _ in range(5)]
        results = await asyncio.gather(dying, *queued, return_exceptions=True)
        assert isinstance(results[0], WorkerLostMidCall), results
        assert wire_kind_of(results[0]) == KIND_INTERRUPTED
        for r in results[1:]:
            assert isinstance(r, WorkerLost) and not isinstance(r, WorkerLostMidCall), results
            assert wire_kind_of(r) == KIND_NO_INSTANCE and "did not run" in str(r)
        await wait_for(lambda: host.ready)  # restarted: it serves again
        assert dec(await rt.call(A, "version", enc(None))) == "1.0"
    finally:
        await rt.close()


@pytest.mark.timeout(60)
async def test_worker_limit_and_failed_start(repo: Repository, tmp_path: Path) -> None:
    rt, _ = make_runtime(repo, tmp_path, max_workers=1)
    try:
        await rt.load(A)
        await rt.load(B)  # the one worker
        await rt.load(V1)  # in-process is fine...
        with pytest.raises(SliceLoadError, match=r"max_workers = 1.*--max-workers"):
            await rt.load(V2)  # ...but this one needs a second worker
    finally:
        await rt.close()
    rt2, _ = make_runtime(repo, tmp_path, isolation_for=lambda a: "process", start_timeout=5.0)
    rt2.config_for = lambda a: {"greeting": {"bad": object()}}  # cannot cross to the worker
    try:
        await rt2.load(A)
        with pytest.raises(SliceStartError, match="instance 1"):
            await rt2.activate(A, [1])
        assert rt2.state(A) == "loaded"
    finally:
        await rt2.close()


# --- node plumbing ---------------------------------------------------------------------------------------


def test_node_reads_isolation_from_blueprints_and_max_workers_from_config(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from aether.cli.main import build_node_config
    from aether.core.config import ConfigError, NodeConfig, load_toml
    from aether.kv.keys import BlueprintSlice, BlueprintValue
    from aether.node.node import Node

    bps = [("blueprints/x", BlueprintValue([BlueprintSlice(str(A), 1, isolation="process"),
                                            BlueprintSlice(str(B), 1)]))]  # fmt: skip
    fake = SimpleNamespace(kv=SimpleNamespace(list_local=lambda prefix: bps))
    assert Node._slice_isolation(fake, A) == "process"  # type: ignore[arg-type]
    assert Node._slice_isolation(fake, B) == "auto"  # type: ignore[arg-type]
    bps.append(("blueprints/y", BlueprintValue([BlueprintSlice(str(A), 1, isolation="inline"),
                                                BlueprintSlice(str(B), 1, isolation="inline")])))  # fmt: skip
    assert Node._slice_isolation(fake, A) == "process"  # the more contained wins
    assert Node._slice_isolation(fake, B) == "auto"  # type: ignore[arg-type]
    bps.pop(0)
    assert Node._slice_isolation(fake, B) == "inline"  # type: ignore[arg-type]
    bps.append(("blueprints/z", BlueprintValue([BlueprintSlice(str(B), 1, isolation="shared")])))
    assert Node._slice_isolation(fake, B) == "shared"  # type: ignore[arg-type]  # (over inline)
    bps.append(("blueprints/w", BlueprintValue([BlueprintSlice(str(B), 1)])))
    assert Node._slice_isolation(fake, B) == "auto"  # type: ignore[arg-type]  # (its own thread)
    # a rollout's old version, which no blueprint lists any more, keeps the artifact's isolation
    # (it used to get "auto": old instances started again by a rollback ran outside their worker)
    a2 = BlueprintSlice("org.example:a:2.0.0", 1, isolation="process")
    bps[:] = [("blueprints/x", BlueprintValue([a2]))]
    assert Node._slice_isolation(fake, A) == "process"  # type: ignore[arg-type]
    assert Node._slice_isolation(fake, B) == "auto"  # type: ignore[arg-type]  # another artifact
    p = tmp_path / "aether.toml"
    p.write_text('[node]\nnode_id = "node-1"\nmax_workers = 3\n')
    assert load_toml(p)["max_workers"] == 3
    assert build_node_config(str(p), {}).max_workers == 3
    assert build_node_config(str(p), {"max_workers": 5}).max_workers == 5  # the flag wins
    assert build_node_config(None, {"node_id": "node-1"}).max_workers == 8
    with pytest.raises(ConfigError, match="max_workers must be between 0 and 1024"):
        NodeConfig(node_id="node-1", peers=build_node_config(None, {}).peers, max_workers=-1).validate()


NODE_SCRIPT = """
import asyncio, sys
from pathlib import Path
from aether.core.artifact import Artifact
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import StoreInvoker

async def main():
    rt = SliceRuntime("node-x", Repository(Path(sys.argv[1])), Path(sys.argv[2]), StoreInvoker(),
                      isolation_for=lambda a: "process")
    a = Artifact.parse(sys.argv[3])
    await rt.load(a)
    await rt.activate(a, [1])
    print(rt.worker_pid(a), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.timeout(30)
async def test_worker_exits_when_the_node_process_dies(repo: Repository, tmp_path: Path) -> None:
    import sys

    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    node = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(repo.root), str(tmp_path / "node-data"), str(A),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    worker = 0
    try:
        assert node.stdout is not None
        line = await asyncio.wait_for(node.stdout.readline(), 20)
        worker = int(line)
        assert running(worker)
    finally:
        node.kill()  # SIGKILL: the node cannot clean up
        await node.wait()
    await wait_for(lambda: not running(worker), timeout=5.0)


@pytest.mark.timeout(60)
async def test_hooks_config_and_failed_start_in_a_worker(repo: Repository, tmp_path: Path) -> None:
    config: dict[str, object] = {"mode": "fail"}
    rt, _ = make_runtime(repo, tmp_path, isolation_for=lambda a: "process")
    rt.config_for = lambda a: dict(config)
    try:
        await rt.load(HOOKS_A)
        with pytest.raises(SliceStartError) as failed:
            await rt.activate(HOOKS_A, [1])
        assert (
            str(failed.value)
            == "start() of org.example:hooks:1.0.0 instance 1 raised RuntimeError: no database"
        )
        config["mode"] = 3  # does not fit Conf: the reason names the type and the field
        with pytest.raises(SliceStartError, match=r"does not fit Conf.*\$\.mode"):
            await rt.activate(HOOKS_A, [1])
        config.update(mode="ok", healthy=False)
        await rt.activate(HOOKS_A, [1])
        assert dec(await rt.call(HOOKS_A, "conf", enc(None))) == {"mode": "ok", "healthy": False}
        assert rt.check_health() == 1
        await wait_for(lambda: rt.instance_loads()[0].healthy is False)
        assert rt.instance_loads()[0].health_reason == "health() returned False"
        config["healthy"] = True
        assert await rt.reconfigure(HOOKS_A, 1) == "reloaded"  # its hook, in the worker
        assert dec(await rt.call(HOOKS_A, "conf", enc(None))) == {"mode": "ok", "healthy": True}
        rt.check_health()
        await wait_for(lambda: rt.instance_loads()[0].healthy is True)
    finally:
        await rt.close()


@pytest.mark.timeout(30)
async def test_a_worker_that_ignores_shutdown_and_sigterm_is_killed(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt, _ = make_runtime(repo, tmp_path, isolation_for=lambda a: "process")
    rt.config_for = lambda a: {"mode": "stubborn"}
    rt.stop_timeout = 0.3
    await rt.load(HOOKS_A)
    rt._entries[HOOKS_A].worker.stop_timeout = 0.3  # type: ignore[union-attr]
    await rt.activate(HOOKS_A, [1])
    pid = rt.worker_pid(HOOKS_A)
    assert pid is not None
    t0 = time.monotonic()
    await rt.close()
    assert not running(pid)
    assert time.monotonic() - t0 < 5
    assert any("ignored SIGTERM; killing it" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
async def test_a_worker_that_keeps_dying_is_given_up(repo: Repository, tmp_path: Path) -> None:
    policy = lambda: RestartPolicy(base=0.05, max_delay=0.05, max_restarts=1)  # noqa: E731
    rt, _ = make_runtime(repo, tmp_path, isolation_for=lambda a: "process", worker_policy=policy)
    try:
        await rt.load(A)
        await rt.activate(A, [1])
        for _ in range(2):
            await wait_for(lambda: rt._entries[A].worker.ready)  # type: ignore[union-attr]
            with pytest.raises(WorkerLost):
                await rt.call(A, "fail", enc("exit"))
        await wait_for(lambda: rt.instance_loads()[0].healthy is False)
        reason = rt.instance_loads()[0].health_reason or ""
        assert "died 2 times in a row" in reason and "exit status 7" in reason
        assert rt.worker_pid(A) is None
        with pytest.raises(WorkerLost, match=r"not running: .*died 2 times"):
            await rt.call(A, "version", enc(None))
    finally:
        await rt.close()


@pytest.mark.timeout(60)
async def test_an_inline_slice_runs_on_the_node_loop_and_reaches_the_node_directly(
    repo: Repository, tmp_path: Path
) -> None:
    """isolation = "inline": the slice's code runs on the node's own loop and thread (no hop), its
    calls go to the node's invoker (after trying a direct call to another inline slice, which the
    threaded hello is not) and its map operations to the node's maps as they are; exits are still
    contained."""
    hello = Artifact.parse("org.example:hello:0.1.0")
    rt, maps = make_runtime(repo, tmp_path, isolation_for=lambda a: "inline" if a == A else "auto")
    try:
        for a in (hello, A):
            await rt.load(a)
            await rt.activate(a, [1])
        assert rt.isolation(A) == "inline" and rt.isolation(hello) == "thread"
        assert dec(await rt.call(A, "version", enc(None))) == "1.0"
        entry = rt._entries[A]
        assert entry.thread is not None and not hasattr(entry.thread, "thread")  # no thread of its own
        obj = entry.instances[1].obj
        assert obj is not None and obj.context.maps is maps
        assert isinstance(obj.context.invoker, InlineInvoker) and obj.context.invoker._inner is rt.invoker
        got = dec(await rt.call(A, "relay", enc("ann"), request_id="req-8"))
        assert got == "Hello, ann / rid=req-8"  # a call from inline code to a threaded slice
        assert dec(await rt.call(A, "remember", enc("v2"))) == ["v2", ["k"]]
        with pytest.raises(Exception) as failed:
            await rt.call(A, "fail", enc("other"))
        assert wire_kind_of(failed.value) == KIND_APP_ERROR
        await rt.deactivate(A)
        assert rt.isolation(A) == "thread"  # loaded, not active: no loop chosen yet
    finally:
        await rt.close()
