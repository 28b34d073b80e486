"""`aether node --join`: the configuration a joining node starts with (`aether.node.join`).

The member's answer is replaced by a fixed one (`fetch_members`); the rest is the real code.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from aether.core.config import NodeConfig
from aether.core.errors import ConfigError
from aether.core.types import Address, PeerSpec
from aether.kv.protocol import MembersInfo
from aether.node import join


def _joined(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str, port: int, *,
            node_id: str = "node-4", state: bool = True) -> NodeConfig:
    """`node_id` joining through node-1; with `state`, its data directory holds a journal (a
    member restarting), without it is new."""
    info = MembersInfo(1, [("node-1", "10.0.0.11:7000"), ("node-2", "10.0.0.12:7000"),
                           ("node-4", "10.0.0.14:7000")])

    async def fetch(config: NodeConfig, timeout: float = 5.0) -> MembersInfo:
        return info

    monkeypatch.setattr(join, "fetch_members", fetch)
    if state:
        (tmp_path / "data" / "consensus").mkdir(parents=True)
        (tmp_path / "data" / "consensus" / "journal.bin").write_bytes(b"")
    config = NodeConfig(node_id=node_id, peers=[], join="10.0.0.11:7000", host=host, cluster_port=port,
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


@pytest.mark.parametrize(("host", "port"), [("10.0.0.99", 7000), ("0.0.0.0", 7100), ("10.0.0.14", 7001)])
def test_a_new_node_joining_with_a_members_id_at_another_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str, port: int
) -> None:
    """Found by hand on a Forge cluster: `aether node --id node-2 --join ...` with an empty data
    directory and another port only warned, then ran as member node-2 beside the real one: the
    members took its links for node-2's (the real node-2's links dropped and its leadership
    flapped) and it would have voted as node-2 without node-2's journal."""
    with pytest.raises(ConfigError) as ei:
        _joined(monkeypatch, tmp_path, host, port, state=False)
    text = str(ei.value)
    assert "node-4 is already a member of the cluster, at 10.0.0.14:7000" in text
    assert "give it an id that is not a member's (members: node-1, node-2, node-4)" in text


def test_a_new_node_joining_with_a_new_id_or_at_its_members_address_is_not_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _joined(monkeypatch, tmp_path / "a", "10.0.0.15", 7000, node_id="node-5", state=False)
    assert PeerSpec("node-5", Address("10.0.0.15", 7000)) in config.peers
    # a member whose data directory was removed, starting again where it was (docs/consensus.md)
    config = _joined(monkeypatch, tmp_path / "b", "10.0.0.14", 7000, state=False)
    assert PeerSpec("node-4", Address("10.0.0.14", 7000)) in config.peers
