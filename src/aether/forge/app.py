"""One Forge run: the node processes, the blueprint, the load, the dashboard server, until stopped.

`Forge` ties the supervisor (`aether.forge.supervisor.ForgeCluster`) and the load generator
(`aether.forge.load.LoadGenerator`) to the REST API (`aether.forge.server`): it is the object the
server's handlers call. `run_forge` is what `aether forge` runs: prepare the directory, deploy the
wheels into the nodes' repository, start the nodes, apply the blueprint and wait for it, start the
load and the server, print the addresses, and wait for the stop event (Ctrl-C); then stop the load,
the server and every node process it started, in that order, whatever happened before.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from aether.core.files import write_private
from aether.deploy.blueprint import try_lines
from aether.forge.config import ForgeConfig, LoadConfig
from aether.forge.errors import ForgeConflict, ForgeSetupError, ForgeUnavailable
from aether.forge.load import FailedRequest, LoadGenerator, load_trace, parse_trace, trace_lines
from aether.forge.server import (
    ActionResult,
    ForgeServer,
    LinkBody,
    SliceFailBody,
    StateAnswer,
    UpdateBody,
)
from aether.forge.supervisor import ControlResult, ForgeCluster

__all__ = [
    "Forge",
    "ForgeOptions",
    "apply_blueprint",
    "open_forge",
    "prepare_workdir",
    "run_forge",
]

log = logging.getLogger(__name__)

MARKER = "forge.marker"
LOCK_FILE = "forge.lock"  # flock-ed by the Forge that uses the directory
TOKEN_FILE = "forge.token"
DEFAULT_MAX_RATE = 2000.0


@dataclass
class ForgeOptions:
    """What `aether forge` was asked for (flags over the config file's `[forge]` table)."""

    nodes: int = 5
    port: int = 8888
    host: str = "127.0.0.1"
    workdir: Path = Path(".aether/forge")
    blueprint: Path | None = None
    wheels: Path | None = None
    load: LoadConfig | None = None
    start_timeout: float = 90.0
    wait_timeout: float = 120.0
    seed: int | None = None
    extra_node_args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    replay: Path | None = None
    """A trace (`GET /api/load/trace`) to replay once the load starts."""
    replay_speed: float = 1.0
    on_response: Callable[..., Any] | None = None
    """Passed to the load generator (scenarios record acknowledged orders with it)."""


def prepare_workdir(workdir: Path) -> IO[str]:
    """Make `workdir` empty and ours: a directory Forge made before (it holds the marker file) is
    wiped, an empty or missing one is used, anything else is refused (never delete a user's files).

    A directory a running Forge uses is refused too: wiping it would pull the data, logs, secret
    and token from under that Forge's nodes. The answer is the open lock file (`forge.lock`, an
    exclusive `flock` holding our pid) that marks it in use: keep it open while Forge runs."""
    if workdir.exists():
        if not workdir.is_dir():
            raise ForgeSetupError(f"{workdir} exists and is not a directory; pass another --dir")
        entries = list(workdir.iterdir())
        if entries and not (workdir / MARKER).exists():
            raise ForgeSetupError(
                f"{workdir} is not empty and was not made by Forge; pass an empty or new --dir"
            )
    else:
        workdir.mkdir(parents=True, mode=0o700)
    lock = open(workdir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held while Forge runs)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ForgeSetupError(
            f"{workdir} is in use by another Forge (pid {holder}); stop it (Ctrl-C) or pass "
            "another --dir"
        ) from None
    try:
        for entry in workdir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        workdir.chmod(0o700)
        (workdir / MARKER).write_text("made by aether forge; wiped at its next start\n")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except BaseException:
        lock.close()
        raise
    return lock


def deploy_wheels(wheels: Path, repository: Path) -> list[str]:
    """Deploy every wheel in `wheels` into `repository` (as `aether cluster demo --wheels` does)."""
    from aether.slices.repository import Repository

    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise ForgeSetupError(
            f"no wheels (*.whl) in {wheels}; build them first, e.g. "
            f"`python examples/build.py --only order_demo --no-deploy --out {wheels}`"
        )
    repo = Repository(repository)
    return [str(repo.deploy_wheel(w)) for w in found]


async def apply_blueprint(cluster: ForgeCluster, path: Path, wait_timeout: float) -> tuple[str, int]:
    """Apply the blueprint at `path` through an up node and wait until every instance is ACTIVE;
    (blueprint id, instances)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeSetupError(f"cannot read blueprint {path}: {e}") from None
    applied = await cluster.api("POST", "/api/v1/blueprints", {"toml": text, "filename": str(path)})
    bp_id = str(applied["id"])
    statuses = await cluster.api(
        "POST", f"/api/v1/blueprints/{bp_id}/wait?timeout={wait_timeout:g}", timeout=wait_timeout + 10
    )
    return bp_id, sum(int(s.get("active", 0)) for s in statuses)


class Forge:
    """The object behind Forge's REST API: the cluster and (when configured) the load."""

    def __init__(self, cluster: ForgeCluster, load: LoadGenerator | None, *, max_rate: float) -> None:
        self.cluster = cluster
        self.load = load
        self.max_rate = max_rate
        self.blueprint_text: str | None = None
        """The blueprint Forge applied (its `# try:` lines are printed once it runs)."""

    # -- observe --

    def state(self) -> StateAnswer:
        load = self.load.snapshot() if self.load is not None else None
        return StateAnswer(self.cluster.view(), load, self.max_rate)

    def series(self, since: float) -> list[Any]:
        return self.load.series(since) if self.load is not None else []

    def events(self, since: int) -> tuple[list[Any], int]:
        return list(self.cluster.events(since)), self.cluster.event_count

    # -- cluster controls --

    async def node_action(self, node: str, action: str) -> ActionResult:
        do: Callable[[str], Awaitable[ControlResult]] = {
            "kill": self.cluster.kill,
            "crash": self.cluster.crash,
            "stop": self.cluster.stop,
            "restart": self.cluster.restart,
        }[action]
        return _result(await do(node), node)

    async def kill_leader(self) -> ActionResult:
        return _result(await self.cluster.kill_leader())

    async def add_node(self) -> ActionResult:
        return _result(await self.cluster.add_node())

    async def remove_node(self, node: str) -> ActionResult:
        return _result(await self.cluster.remove_node(node), node)

    async def rolling_restart(self) -> ActionResult:
        return _result(await self.cluster.rolling_restart())

    async def partition(self, groups: list[list[str]]) -> ActionResult:
        return _result(await self.cluster.partition(groups))

    async def isolate(self, node: str) -> ActionResult:
        return _result(await self.cluster.isolate(node), node)

    async def heal(self) -> ActionResult:
        return _result(await self.cluster.heal())

    async def set_link(self, src: str, dst: str, body: LinkBody) -> ActionResult:
        return _result(await self.cluster.set_link(
            src, dst, delay_ms=body.delay_ms, jitter_ms=body.jitter_ms, loss=body.loss,
            both_ways=body.both_ways,
        ))

    async def fail_slice(self, artifact: str, body: SliceFailBody) -> ActionResult:
        return _result(await self.cluster.fail_slice(
            artifact, body.node, error_rate=body.error_rate, delay_ms=body.delay_ms,
            unhealthy=body.unhealthy,
        ))

    async def heal_slice(self, artifact: str) -> ActionResult:
        return _result(await self.cluster.heal_slice(artifact))

    async def update(self, artifact: str, body: UpdateBody) -> ActionResult:
        return _result(await self.cluster.update(artifact, body.version, body.strategy))

    # -- load controls --

    def _load(self) -> LoadGenerator:
        if self.load is None:
            raise ForgeConflict("no load is configured: start Forge with --config naming [[load.targets]]")
        return self.load

    def set_rate(self, rate: float) -> ActionResult:
        self._load().set_rate(rate)
        return ActionResult(message=f"load rate {rate:g}/s")

    def ramp(self, to: float, seconds: float) -> ActionResult:
        self._load().ramp(to, seconds)
        return ActionResult(message=f"load ramping to {to:g}/s over {seconds:g} s")

    def pause(self) -> ActionResult:
        self._load().pause()
        return ActionResult(message="load paused")

    def resume(self) -> ActionResult:
        self._load().resume()
        return ActionResult(message="load resumed")

    def trace(self) -> bytes:
        return trace_lines(self._load().recorded())

    def failures(self, after: int) -> tuple[list[FailedRequest], int]:
        """The load generator's kept failed requests numbered above `after`, and the latest's number."""
        load = self._load()
        return load.failures(after), load.failure_count

    def replay(self, trace: bytes, speed: float) -> ActionResult:
        t = parse_trace(trace, "the request body")
        self._load().replay(t, speed)
        seconds = len(t.counts) * t.interval / speed
        return ActionResult(message=f"replaying {len(t.counts)} s of load over {seconds:g} s")


def _result(r: ControlResult, node: str | None = None) -> ActionResult:
    """The supervisor's answer as the API's `ActionResult`."""
    return ActionResult(message=r.message, node=r.node or node)


def bind_dashboard(host: str, port: int) -> socket.socket:
    """The dashboard's listening socket, bound before anything starts: a taken port fails at once
    (a ForgeSetupError saying what to do), not after the nodes and the blueprint."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ForgeSetupError(f"cannot serve the dashboard on {host}:{port}: {e.strerror or e}; "
                              "pass another --port (0 picks a free one)") from None
    return sock


async def start_site(app: web.Application, sock: socket.socket) -> web.AppRunner:
    """Serve `app` on the socket `bind_dashboard` made."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except OSError as e:
        await runner.cleanup()
        raise ForgeSetupError(f"cannot serve the dashboard: {e.strerror or e}") from None
    return runner


def site_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        for s in sockets:
            return int(s.getsockname()[1])
    raise ForgeUnavailable("the dashboard server has no socket")


@contextlib.asynccontextmanager
async def open_forge(
    opts: ForgeOptions, *, say: Callable[[str], None] = print
) -> AsyncIterator[tuple[Forge, str]]:
    """Start everything (see the module docstring) and yield the Forge and its dashboard URL; on
    exit stop the load, the server and every node process, whatever happened before."""
    if opts.blueprint is not None and not opts.blueprint.is_file():
        raise ForgeSetupError(f"blueprint {opts.blueprint} does not exist")
    workdir = opts.workdir
    sock = bind_dashboard(opts.host, opts.port)
    try:
        lock = prepare_workdir(workdir)
        with lock:  # released (closed) once every node process is stopped
            async with _open_forge(opts, workdir, sock, say) as answer:
                yield answer
    finally:
        sock.close()  # (closed already when the server ran)


@contextlib.asynccontextmanager
async def _open_forge(
    opts: ForgeOptions, workdir: Path, sock: socket.socket, say: Callable[[str], None]
) -> AsyncIterator[tuple[Forge, str]]:
    repository: Path | None = None
    if opts.wheels is not None:
        repository = workdir / "repository"
        deployed = deploy_wheels(opts.wheels, repository)
        say(f"Deployed {len(deployed)} wheel(s) into {repository}")
    token_file = workdir / TOKEN_FILE
    write_private(token_file, (opts.token + "\n").encode())
    cluster = ForgeCluster(
        workdir, nodes=opts.nodes, host=opts.host, env=opts.env, repository=repository,
        extra_node_args=opts.extra_node_args,
    )
    load: LoadGenerator | None = None
    runner: web.AppRunner | None = None
    try:
        say(f"Starting {opts.nodes} nodes (logs in {workdir}/node-K.log)…")
        t0 = time.monotonic()
        await cluster.start(timeout=opts.start_timeout)
        say(f"{opts.nodes} nodes up with quorum in {time.monotonic() - t0:.1f} s")
        if opts.blueprint is not None:
            say(f"Applying blueprint {opts.blueprint} and waiting for its instances…")
            bp_id, instances = await apply_blueprint(cluster, opts.blueprint, opts.wait_timeout)
            say(f"Blueprint {bp_id!r} is running: {instances} instance(s) ACTIVE")
        max_rate = DEFAULT_MAX_RATE
        if opts.load is not None and opts.load.targets:
            load = LoadGenerator(
                opts.load, cluster.http_addresses, seed=opts.seed, on_response=opts.on_response
            )
            max_rate = max(DEFAULT_MAX_RATE, 10.0 * opts.load.rate)
            await load.start()
            load.start_recording()
            if opts.replay is not None:
                load.replay(load_trace(opts.replay), opts.replay_speed)
        forge = Forge(cluster, load, max_rate=max_rate)
        if opts.blueprint is not None:
            forge.blueprint_text = opts.blueprint.read_text(encoding="utf-8")
        server = ForgeServer(forge, opts.token, token_file=str(token_file))
        runner = await start_site(server.app(), sock)
        port = site_port(runner)
        yield forge, f"http://{opts.host}:{port}/?token={opts.token}"
    finally:
        if load is not None:
            with contextlib.suppress(Exception):
                await load.stop()
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await cluster.close()


async def run_forge(
    opts: ForgeOptions,
    stop: asyncio.Event,
    *,
    say: Callable[[str], None] = print,
    ready: Callable[[Forge, str], Any] | None = None,
) -> None:
    """Run Forge until `stop` is set. `ready(forge, url)` is called once everything runs."""
    async with open_forge(opts, say=say) as (forge, url):
        base = url.split("/?", 1)[0]
        if forge.blueprint_text is not None:
            tries = try_lines(forge.blueprint_text, forge.cluster.http_addresses())
            if tries:
                say("")
                say("Try it (any node serves any route):")
                for t in tries:
                    say(f"  {t}")
        say("")
        say(f"Dashboard: {url}")
        say(f"REST API:  {base}/api (OpenAPI: {base}/api/openapi.json; "
            f"header `Authorization: Bearer {opts.token}`)")
        if forge.load is not None:
            say(f"Load: {forge.load.snapshot().rate:g} requests/s")
        say("Forge runs until you press Ctrl-C.")
        if ready is not None:
            r = ready(forge, url)
            if asyncio.iscoroutine(r):
                await r
        await stop.wait()
        say("\nStopping Forge…")


def options_from_config(config: ForgeConfig | None) -> ForgeOptions:
    """ForgeOptions with the `[forge]` table's values (its paths are already resolved against the
    config file's directory) and the `[load]`."""
    opts = ForgeOptions()
    if config is None:
        return opts
    f = config.forge
    if f.nodes is not None:
        opts.nodes = f.nodes
    if f.port is not None:
        opts.port = f.port
    if f.blueprint is not None:
        opts.blueprint = Path(f.blueprint)
    if f.wheels is not None:
        opts.wheels = Path(f.wheels)
    opts.load = config.load
    return opts
