"""How a node's deployment manager logs a lifecycle write it retries while it has no quorum.

Found walking docs/operations.md ("start the three within a minute or so"): a node started before
its peers, with a slice it ran before, logged `org.example:hello:0.1.0: writing LOADING failed (no
quorum: ...); retrying` at WARNING every second until a quorum formed, per slice.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from aether.core.errors import QuorumLost
from aether.deploy.lifecycle import SliceState, WriteState
from aether.deploy.node_manager import NodeDeploymentManager
from aether.kv.keys import SliceStateValue

ARTIFACT = "org.example:hello:0.1.0"
KEY = f"slices/node-1/{ARTIFACT}"


class NoQuorumFor:
    """A store whose compare-and-set fails with QuorumLost `fails` times, then succeeds."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.attempts = 0
        self.data: dict[str, Any] = {KEY: SliceStateValue("ACTIVE", 0.0, None, [0])}

    def get_local(self, key: str) -> Any:
        return self.data.get(key)

    async def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        self.attempts += 1
        if self.fails:
            self.fails -= 1
            raise QuorumLost("no quorum: this node cannot reach a majority of the cluster")
        self.data[key] = new
        return True


async def test_a_retried_lifecycle_write_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    kv = NoQuorumFor(fails=5)
    m = NodeDeploymentManager(kv, "node-1", SimpleNamespace(), logger=logging.getLogger("test.nm"))  # type: ignore[arg-type]
    m._running = True  # (started: only the write is exercised)
    machine = SimpleNamespace(epoch=1)
    action = WriteState(SliceState.LOADING, None, (0,), 1)
    with caplog.at_level(logging.DEBUG, logger="test.nm"):
        await m._write_state(ARTIFACT, machine, action)  # type: ignore[arg-type]
    assert kv.attempts == 6 and kv.data[KEY].state == "LOADING"
    failed = [r for r in caplog.records if "writing LOADING failed" in r.getMessage()]
    assert len(failed) == 5  # every attempt is logged ...
    assert [r.levelno for r in failed] == [logging.WARNING] + [logging.DEBUG] * 4  # ... a warning once
    assert f"{ARTIFACT}: wrote LOADING after 5 failed attempt(s)" in caplog.text
