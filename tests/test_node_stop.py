"""An in-process node stopping while calls are stuck in several of its slices (`Node.stop`, what
`aether node` runs on SIGTERM): the slices drain together, so the stop takes about one drain
(5 s), not one per slice, and ends well within what a supervisor waits (ops/: 60 s)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aether.api.server import ManagementServer
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
