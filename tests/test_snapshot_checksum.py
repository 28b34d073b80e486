"""The consensus snapshot carries a checksum (`EngineSnapshot.check`, messages.seal_snapshot).

Found by an audit: the journal's records have checksums, the snapshot had none, so a byte flipped
inside a value of ``snapshot.bin`` (a disk, a copy, a hand edit) loaded silently and the replica
served the changed value. Now every byte of a sealed snapshot is covered: changed, the snapshot
either cannot be decoded or does not match its checksum, and the node refuses to start naming the
file (tests/test_data_dir_process.py does it with a real node). A snapshot of the previous format
(no checksum) still loads, and the previous version reads a sealed one (a downgraded node keeps
its data directory).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from aether.consensus.engine import Engine
from aether.consensus.messages import (
    BatchId,
    CatchupReply,
    EngineSnapshot,
    MemberConfig,
    SnapshotDamaged,
    seal_snapshot,
)
from aether.consensus.runner import ConsensusRunner
from aether.consensus.storage import DiskStore, JournalCorrupt
from aether.kv.machine import KVStateMachine, Put, encode_command

VALUE = b"the value that must not change"


class PreviousEngineSnapshot(msgspec.Struct, array_like=True, gc=False):
    """`EngineSnapshot` as the previous release has it (no `check`): what it writes and reads."""

    slot: int
    members: list[str]
    state: bytes
    decided_ids: list[tuple[BatchId, int]]
    configs: list[MemberConfig] = []


def _engine(sm: KVStateMachine | None = None) -> Engine:
    return Engine("n1", ["n1", "n2", "n3"], sm if sm is not None else KVStateMachine())


def _snapshot(keys: int = 3) -> bytes:
    sm = KVStateMachine()
    for i in range(keys):
        sm.apply(encode_command(Put(f"user/k{i}", VALUE + b"%d" % i)))
    return _engine(sm).snapshot_now().data


def _recovered(data: bytes) -> KVStateMachine:
    sm = KVStateMachine()
    _engine(sm).recover(data, [])
    return sm


def test_a_byte_flipped_inside_a_value_is_refused() -> None:
    data = _snapshot()
    assert _recovered(data).data["user/k1"] == VALUE + b"1"
    at = data.index(VALUE + b"1") + 4
    damaged = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]  # 'v' -> 'V': still decodes
    assert msgspec.msgpack.decode(damaged, type=EngineSnapshot)  # (so only the checksum sees it)
    with pytest.raises(SnapshotDamaged, match="do not match their checksum"):
        _recovered(damaged)


def test_no_single_byte_change_anywhere_loads_silently() -> None:
    data = _snapshot(keys=2)
    for at in range(len(data)):
        for flip in (0x01, 0x80):
            damaged = data[:at] + bytes([data[at] ^ flip]) + data[at + 1:]
            with pytest.raises((SnapshotDamaged, msgspec.DecodeError)):
                _recovered(damaged)


def test_a_snapshot_of_the_previous_format_still_loads() -> None:
    sealed = msgspec.msgpack.decode(_snapshot(), type=EngineSnapshot)
    assert len(sealed.check) == 4
    old = msgspec.msgpack.encode(PreviousEngineSnapshot(
        sealed.slot, sealed.members, sealed.state, sealed.decided_ids, sealed.configs))
    assert msgspec.msgpack.decode(old, type=EngineSnapshot).check == b""
    sm = _recovered(old)
    assert [sm.data[f"user/k{i}"] for i in range(3)] == [VALUE + b"%d" % i for i in range(3)]


def test_the_previous_version_reads_a_sealed_snapshot() -> None:
    """`check` is a trailing field: a node downgraded to the previous release still loads it."""
    data = _snapshot()
    old = msgspec.msgpack.decode(data, type=PreviousEngineSnapshot)
    sm = KVStateMachine()
    sm.restore(old.state)
    assert sm.data["user/k2"] == VALUE + b"2"


def test_the_runner_refuses_a_damaged_snapshot_file_naming_it(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "consensus", fsync="none")
    store.save_snapshot(_snapshot())
    path = store.snapshot_path
    data = path.read_bytes()
    at = data.index(VALUE + b"0")
    path.write_bytes(data[:at] + b"T" + data[at + 1:])
    runner = ConsensusRunner("n1", ["n1", "n2", "n3"], KVStateMachine(),
                             DiskStore(tmp_path / "consensus", fsync="none"), seed=b"test")
    with pytest.raises(JournalCorrupt) as ei:
        runner.recover()
    assert str(ei.value).startswith(f"snapshot {path} is damaged: its contents do not match their checksum")
    assert "remove it so the node rejoins from its peers" in str(ei.value)


def test_the_runner_logs_a_refused_catchup_snapshot_naming_the_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot a peer sends in catch-up is checked too (tests/test_engine.py drives the engine);
    the runner logs the refusal with the peer's id and installs nothing."""
    data = _snapshot()
    slot = msgspec.msgpack.decode(data, type=EngineSnapshot).slot + 7
    sealed = msgspec.msgpack.decode(data, type=EngineSnapshot)
    sealed.slot = slot
    good = seal_snapshot(sealed)
    at = good.index(VALUE + b"1")
    damaged = good[:at] + b"T" + good[at + 1:]
    sm = KVStateMachine()
    runner = ConsensusRunner("n1", ["n1", "n2", "n3"], sm, DiskStore(tmp_path / "consensus", fsync="none"),
                             seed=b"test")
    runner.recover()

    async def receive() -> None:
        runner.on_message("n2", CatchupReply(slot, [], slot, damaged))
        assert runner.engine.applied == 0 and sm.get("user/k1") is None
        runner.on_message("n3", CatchupReply(slot, [], slot, good))
        assert runner.engine.applied == slot and sm.get("user/k1") == VALUE + b"1"

    with caplog.at_level("WARNING", logger=runner.log.name):
        asyncio.run(receive())
    assert (f"refused the snapshot of slot {slot} that n2 sent in catch-up: the snapshot is damaged: "
            "its contents do not match their checksum") in caplog.text
    assert "n3 sent" not in caplog.text
