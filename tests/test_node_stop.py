"""An in-process node stopping while calls are stuck in several of its slices (`Node.stop`, what
`aether node` runs on SIGTERM): the slices drain together, so the stop takes about one drain
(5 s), not one per slice, and ends well within what a supervisor waits (ops/: 60 s)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aether.api.server import ManagementServer
from aether.core.artifact import Artifact
from aether.node.node import Node
from aether.slices.repository import Repository
from aether.slices.testing import build_slice_wheel, isolated_imports
from conftest import node_configs, wait_until

pytestmark = pytest.mark.timeout(90)

STUCK = """
import asyncio
from aether.slices import Slice, entry

class Stuck(Slice):
    @entry
    async def hang(self) -> str:
        await asyncio.sleep(3600)
        return "never"
"""

N = 4


async def test_node_stop_drains_stuck_slices_together(tmp_path: Path) -> None:
    """4 slices with a call stuck in each used to stop in 4 drains one after the other (20 s: with
    10 slices 50 s, with 12 past systemd's and Kubernetes' 60 s in ops/, then SIGKILL)."""
    repo = Repository(tmp_path / "repo")
    arts = [f"org.test:stuck{i}:1.0.0" for i in range(N)]
    for i, a in enumerate(arts):
        repo.deploy(build_slice_wheel(tmp_path / "wheels", a, STUCK, "Stuck", module=f"stuck{i}"))
    (config,) = node_configs(tmp_path, 1, repository=str(repo.root))
    node = Node(config, management_api=ManagementServer)
    with isolated_imports():
        await node.start()
        try:
            bp = 'id = "stuck:1"\n' + "".join(
                f'[slices.s{i}]\nartifact = "{a}"\ninstances = 1\n' for i, a in enumerate(arts)
            )
            await node.deployments.apply_blueprint(bp, "stuck.blueprint")
            await node.deployments.wait_converged("stuck:1", timeout=30)
            # (a timeout longer than the stop: the invoker's default 10 s would end them first)
            calls = [asyncio.create_task(node.invoker.invoke(a, "hang", b"", timeout=300)) for a in arts]
            await wait_until(
                lambda: sum(i.in_flight for i in node.slice_runtime.instance_loads()) == N, 10,
                "a call running in every slice",
            )
            t0 = time.monotonic()
            await node.stop()
            took = time.monotonic() - t0
        finally:
            if not node.transport._stopped:
                await node.stop()
    _done, pending = await asyncio.wait(calls, timeout=1.0)
    for c in pending:
        c.cancel()
    assert not pending, "a call stuck in a slice was not ended by the stop"
    assert 5.0 <= took < 8.0, f"stopping took {took:.1f} s for {N} slices draining 5 s each"
    assert node.slice_runtime.artifacts() == {}


SWALLOWS = """
import asyncio, os
from aether.slices import Slice, entry

RELEASE = {release!r}

class Swallows(Slice):
    async def stop(self):
        while not os.path.exists(RELEASE):
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass  # swallowed: the stop goes on

    @entry
    async def ping(self) -> str:
        return "pong"
"""


STOP_TIMEOUT = 1.0


@pytest.mark.parametrize("isolation", ["inline", "shared"])
async def test_a_stop_hook_that_swallows_its_cancellation_holds_neither_undeploy_nor_node_stop(
    tmp_path: Path, isolation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An inline slice whose `stop()` catches `CancelledError` and goes on: its undeploy never
    ended (the deactivate step's deadline cancelled it, and the cancelled step waited for the hook)
    and the node's stop hung for ever. Both end now: `stop()` gets `stop_timeout` (5 s; 1 s here),
    then it is abandoned, named in the log, and the node goes on."""
    art = "org.test:swallows:1.0.0"
    repo = Repository(tmp_path / "repo")
    release = tmp_path / "release"
    source = SWALLOWS.format(release=str(release))
    repo.deploy(build_slice_wheel(tmp_path / "wheels", art, source, "Swallows", module="swallows"))
    bp = f'id = "swallows:1"\n[slices.s]\nartifact = "{art}"\ninstances = 1\nisolation = "{isolation}"\n'
    (config,) = node_configs(tmp_path, 1, repository=str(repo.root))
    node = Node(config, management_api=ManagementServer)
    node.slice_runtime.stop_timeout = STOP_TIMEOUT  # (5 s by default: the same path, sooner)
    with isolated_imports():
        await node.start()
        try:
            await node.deployments.apply_blueprint(bp, "swallows.blueprint")
            await node.deployments.wait_converged("swallows:1", timeout=30)
            assert node.slice_runtime.isolation(Artifact.parse(art)) == isolation
            t0 = time.monotonic()
            await node.deployments.delete_blueprint("swallows:1")
            await wait_until(lambda: node.slice_runtime.artifacts() == {}, 20, "the slice undeployed")
            undeployed = time.monotonic() - t0
            await node.deployments.apply_blueprint(bp, "swallows.blueprint")
            await node.deployments.wait_converged("swallows:1", timeout=30)
            t0 = time.monotonic()
            stopping = asyncio.ensure_future(node.stop())
            done, _ = await asyncio.wait({stopping}, timeout=20)
            stopped = time.monotonic() - t0
            assert done, f"the node's stop did not end within {stopped:.0f} s"
            await stopping
        finally:
            release.touch()
            if not node.transport._stopped:
                await node.stop()
            await asyncio.sleep(0.2)  # (the abandoned hook ends)
    assert undeployed < 5.0, f"undeploying took {undeployed:.1f} s"  # 1 s stop + (inline) 2 s left
    assert stopped < 5.0, f"stopping took {stopped:.1f} s"
    assert node.slice_runtime.artifacts() == {}
    timed_out = f"stop() of {art} instance 0 did not finish within {STOP_TIMEOUT} s"
    assert caplog.text.count(timed_out) == 2, caplog.text
