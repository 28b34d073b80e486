"""`run_node`: run one node in this process until SIGINT/SIGTERM (what `aether node` calls).

A node started with ``AETHER_PARENT_PID`` in its environment (Aether Forge sets it to its own
pid) also stops, the same way, once that process is no longer its parent: Forge killed with
SIGKILL, or its terminal closed, leaves no node behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aether.consensus.storage import JournalCorrupt, JournalError
from aether.core.config import PARENT_PID_ENV, NodeConfig
from aether.core.errors import ConfigError
from aether.core.files import make_private_dirs, open_private
from aether.core.logs import configure_logging
from aether.node.node import ManagementFactory, Node, listen_problem


def _install_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


PARENT_POLL_S = 0.5
LEFT_TASKS_S = 1.0  # what the tasks still running when the node has stopped get after their cancellation
LEFT_THREADS_S = 1.0  # what the threads still running then get (`exit_leaving_threads`)


def _run(main: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run(main)`, except for the tasks still running once `main` returned: cancelled and
    given `LEFT_TASKS_S` s to end, then left (logged, naming them) as the process exits.
    `asyncio.run` waited for every one of them to end: the abandoned `stop()` of an inline slice that
    catches its cancellation and goes on (docs/slices.md) kept the stopped node's process alive
    for ever, until its supervisor killed it. The threads of the loop's default executor are left
    to `exit_leaving_threads`: `loop.shutdown_default_executor()` joined each of them, for ever for
    one that slice code blocks (`asyncio.to_thread`), even once its wait was cancelled."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
    loop.set_default_executor(executor)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            _cancel_left(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            executor.shutdown(wait=False)  # (its idle threads end; those at work end when it is done)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_left(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    done, left = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFT_TASKS_S))
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception in a task as the node's process exits",
                "exception": t.exception(), "task": t,
            })  # fmt: skip
    if left:
        for t in left:  # (they are left pending: not reported again when collected)
            t._log_destroy_pending = False  # type: ignore[attr-defined]
        logging.getLogger("aether.node").warning(
            "%d task(s) still running %.1f s after the node stopped and cancelled them (code that "
            "catches asyncio.CancelledError and goes on): %s; the process exits without them",
            len(left), LEFT_TASKS_S, ", ".join(sorted(t.get_name() for t in left)),
        )  # fmt: skip


def exit_leaving_threads(code: int) -> int:
    """`code`, once the node stopped (`_run` returned), if no thread would keep the process alive;
    else, after `LEFT_THREADS_S` s, the process exits with `code` here (logged, naming them).
    The interpreter waits for every thread that is not a daemon before it exits, and each thread
    of an executor: slice code blocked in one (`asyncio.to_thread`, a thread of its own) kept the
    stopped node's process alive until its supervisor killed it."""
    deadline = time.monotonic() + LEFT_THREADS_S
    me = threading.current_thread()
    left = [t for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]
    for t in left:
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in left if t.is_alive()]
    if not left:
        return code
    logging.getLogger("aether.node").warning(
        "%d thread(s) still running %.1f s after the node stopped (slice code blocked in a thread it "
        "started, or in asyncio.to_thread): %s; the process exits without them",
        len(left), LEFT_THREADS_S, ", ".join(sorted(t.name for t in left)),
    )  # fmt: skip
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def set_cpu_scheduling(policy: str) -> str | None:
    """Put every thread of this process (and so the threads it starts later, which inherit it) under
    the kernel's scheduling `policy`: "batch" (Linux ``SCHED_BATCH``) or "normal" (``SCHED_OTHER``).
    Returns None when done, else why not (not Linux, the kernel refused, or the process was started
    under another policy, e.g. ``chrt --idle``, which is then left as it is): the node runs on.

    Why batch: a node's threads and the nodes' processes wake each other all the time (a frame to a
    peer, a call handed to the slice loop). Under ``SCHED_OTHER`` the woken thread often takes the
    waker's core at once, while the waker holds the interpreter lock, which the woken thread then
    waits for: sending a frame to a peer took 45-65 us on average under the order demo's load on
    2 cores, 26-38 us under ``SCHED_BATCH``, and the orders' p99 was 0.82x at the same throughput
    (medians of 12 alternating pairs; bench/README.md, *Batch scheduling*). ``SCHED_BATCH`` needs
    no privilege and changes nothing else (same share of the CPU, same nice value)."""
    wanted = getattr(os, "SCHED_BATCH" if policy == "batch" else "SCHED_OTHER", None)
    if wanted is None or not hasattr(os, "sched_setscheduler"):
        return f"this system has no {policy} scheduling policy"
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]  # (0: this thread)
    ours = {os.SCHED_OTHER, getattr(os, "SCHED_BATCH", os.SCHED_OTHER)}
    param = os.sched_param(0)
    try:
        for tid in tids:
            try:
                if (now := os.sched_getscheduler(tid)) not in ours:  # chosen by whoever started us
                    names = {getattr(os, n, None): n for n in ("SCHED_FIFO", "SCHED_RR", "SCHED_IDLE")}
                    return f"it runs under {names.get(now, f'policy {now}')}, left as it is"
                os.sched_setscheduler(tid, wanted, param)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
    except OSError as e:
        return f"the kernel refused: {e}"
    return None


def parent_pid_from_env() -> int | None:
    """The pid in ``AETHER_PARENT_PID`` (None when unset); ValueError naming it when it is not one."""
    raw = os.environ.get(PARENT_PID_ENV)
    if raw is None or raw == "":
        return None
    try:
        pid = int(raw)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise ValueError(f"{PARENT_PID_ENV} must be the process id of the node's parent, got {raw!r}")
    return pid


async def _exit_with_parent(parent: int, stop: asyncio.Event, log: logging.Logger) -> None:
    """Set `stop` once `parent` is no longer this process's parent (it died: we were re-parented)."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("the process that started this node (pid %d) is gone: stopping the node", parent)
            stop.set()
            return
        await asyncio.sleep(PARENT_POLL_S)


async def serve(
    config: NodeConfig,
    *,
    management_api: ManagementFactory | None = None,
    parent: int | None = None,
) -> None:
    """Run the node until SIGINT/SIGTERM, or until process `parent` is gone (when given)."""
    stop = asyncio.Event()
    watch = None
    if parent is not None:
        watch = asyncio.ensure_future(_exit_with_parent(parent, stop, logging.getLogger("aether.node")))
    try:
        await _serve(config, stop, management_api)
    finally:
        if watch is not None:
            watch.cancel()


async def _serve(config: NodeConfig, stop: asyncio.Event, management_api: ManagementFactory | None) -> None:
    if config.join is not None:
        from aether.node.join import joined_config

        config = await joined_config(config, logging.getLogger("aether.node"))
    node = Node(config, management_api=management_api, own_process=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # the journal could not be written: the node stops (fail-stop) and the process exits non-zero
    if node.runner is not None:  # (none with the etcd store: no journal)
        node.runner.on_fatal.append(lambda exc: stop.set())
    # the node's id already runs in the cluster as another process: this one stops, exit status 2
    node.on_fatal.append(stop.set)
    if not await _start_unless_stopped(node, stop):
        return
    # Everything built so far (modules, the node's components) lives as long as the process:
    # keep it out of the cyclic collector's full scans, and collect young objects less often,
    # so collections do not show up as latency spikes under load. (What the node loaded before
    # its links came up, its maps' records, it froze then: this walks only what came since.)
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    try:
        await stop.wait()
    finally:
        await node.stop()
    if node.duplicate is not None:
        raise DuplicateNodeId(node.duplicate)
    if node.runner is not None and node.runner.failed is not None:
        raise NodeFailed(str(node.runner.failed))


async def _start_unless_stopped(node: Node, stop: asyncio.Event) -> bool:
    """Start the node; False when it was stopped while still waiting for etcd to answer (then
    nothing else had started: the store is closed and the process can exit)."""
    starting = asyncio.ensure_future(node.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done() and node.waiting_for_store:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await node.abandon_start()
            return False
        await starting
        return True
    finally:
        stopping.cancel()


LOCK_FILE = "node.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Lock `data_dir` for this process (an exclusive `flock` on its ``node.lock``, which then
    holds our pid) and return the lock's file descriptor: the lock lasts until it is closed or the
    process ends, however it ends. OSError naming the directory and the holder's pid when another
    process holds it: two nodes on one data directory would append to the same journal and replace
    each other's snapshot."""
    make_private_dirs(data_dir)
    path = data_dir / LOCK_FILE
    fd = open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise OSError(
            f"data directory {data_dir} is in use by another process (pid {holder} holds the lock on "
            f"{path}): stop that node first, or give this one its own --data-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class NodeFailed(Exception):
    """The node stopped itself because its local state could not be written."""


class DuplicateNodeId(Exception):
    """The node stopped itself: its id already runs in the cluster as another process."""


def run_node(config: NodeConfig, *, management_api: ManagementFactory | None = None) -> int:
    """Run a node until interrupted; returns the process exit code. `management_api` builds the
    management API server (`aether.api.server.ManagementServer`; the `aether node` command passes
    it); without it the node runs no management API. ConfigError, before the data directory is
    created or locked, when the configuration opens a port beyond loopback with nothing to prove."""
    # Belt and braces: the node creates its files 0600 / directories 0700 explicitly; the umask
    # covers what else this process writes (pip installing a library, slice code).
    os.umask(0o077)
    configure_logging(config.node_id, logging.INFO, config.log_format, sys.stderr)  # unless set up
    _install_loop_policy()
    log = logging.getLogger("aether.node")
    why_not = set_cpu_scheduling(config.cpu_scheduling)
    if why_not is not None:
        log.warning("cpu scheduling %s not set: %s (the node runs as it is)", config.cpu_scheduling, why_not)
    try:
        parent = parent_pid_from_env()
    except ValueError as e:
        log.error("cannot start node %s: %s", config.node_id, e)
        return 2
    # refused before the data directory is created or locked: a start that cannot go on writes nothing
    problem = listen_problem(config, management=management_api is not None)
    if problem is not None:
        raise ConfigError(problem)
    try:
        lock = lock_data_dir(config.data_path)
    except OSError as e:
        log.error("cannot start node %s: %s", config.node_id, e)
        return 1
    try:
        _run(serve(config, management_api=management_api, parent=parent))
    except (OSError, JournalCorrupt, JournalError) as e:  # JournalError: e.g. a full disk at start
        log.error("cannot start node %s: %s", config.node_id, e)
        code = 1
    except NodeFailed as e:
        log.error("node %s stopped: %s", config.node_id, e)
        code = 1
    except DuplicateNodeId as e:
        log.error("node %s stopped: %s", config.node_id, e)
        code = 2
    else:
        code = 0
    finally:
        os.close(lock)
    return exit_leaving_threads(code)
