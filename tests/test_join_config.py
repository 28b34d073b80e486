"""`aether node --join`: the configuration a joining node starts with (`aether.node.join`).

The member's answer is replaced by a fixed one (`fetch_members`); the rest is the real code.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from aether.core.config import NodeConfig
from aether.core.types import Address, PeerSpec
from aether.kv.protocol import MembersInfo
from aether.node import join


def _joined(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str, port: int) -> NodeConfig:
    info = MembersInfo(1, [("node-1", "10.0.0.11:7000"), ("node-2", "10.0.0.12:7000"),
                           ("node-4", "10.0.0.14:7000")])

    async def fetch(config: NodeConfig, timeout: float = 5.0) -> MembersInfo:
        return info

    monkeypatch.setattr(join, "fetch_members", fetch)
    config = NodeConfig(node_id="node-4", peers=[], join="10.0.0.11:7000", host=host, cluster_port=port,
                        data_dir=str(tmp_path / "data"))
    return asyncio.run(join.joined_config(config, logging.getLogger("test.join")))


def test_a_node_on_every_interface_restarting_with_join_does_not_warn_about_its_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md starts a joining node with `--join ... --host 0.0.0.0`: once added, every
    restart logged `the member set has node-4 at 10.0.0.14:7000; this node listens on 0.0.0.0:7000`,
    a warning about nothing (it listens there too)."""
    with caplog.at_level(logging.WARNING, logger="test.join"):
        config = _joined(monkeypatch, tmp_path, "0.0.0.0", 7000)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert PeerSpec("node-4", Address("10.0.0.14", 7000)) in config.peers


@pytest.mark.parametrize(("host", "port"), [("10.0.0.99", 7000), ("0.0.0.0", 7100)])
def test_a_node_listening_elsewhere_than_the_member_set_says_is_warned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, port: int
) -> None:
    with caplog.at_level(logging.WARNING, logger="test.join"):
        _joined(monkeypatch, tmp_path, host, port)
    assert f"the member set has node-4 at 10.0.0.14:7000; this node listens on {host}:{port}" in caplog.text
