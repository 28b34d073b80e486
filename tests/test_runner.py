"""`ConsensusRunner` on a real disk: a clean stop keeps the slot in progress, sends wait for the
journal (group commit), and a journal that cannot be written stops the replica (fail-stop)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aether.consensus.messages import Batch, BatchId, Proposal, StateMsg, Submit, VoteMsg, slot_msg_key
from aether.consensus.runner import ConsensusRunner
from aether.consensus.storage import DiskStore, JournalError
from aether.kv.machine import KVStateMachine, Put, encode_command
from aether.testing.simfs import SimFileSystem

IDS = ["n1", "n2", "n3"]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str | None, Any]] = []

    def send(self, peer: str, msg: Any) -> bool:
        self.sent.append((peer, msg))
        return True

    def broadcast(self, msg: Any, to: Any = None) -> None:
        self.sent.append((None, msg))

    def slot_msgs(self, slot: int) -> dict[tuple[str, int], Any]:
        return {
            slot_msg_key(m): m
            for to, m in self.sent
            if to is None and isinstance(m, (Proposal, StateMsg, VoteMsg)) and m.slot == slot
        }


async def until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def make(store: DiskStore) -> ConsensusRunner:
    r = ConsensusRunner("n1", IDS, KVStateMachine(), store, seed=b"t", tick_interval=3600)
    r.recover()
    return r


def started(store: DiskStore) -> tuple[ConsensusRunner, Recorder]:
    """n1 of IDS on `store`, started, with its two peers up; what it sends lands in the Recorder."""
    r = make(store)
    tr = Recorder()
    r.start(tr)
    r.peer_up("n2")
    r.peer_up("n3")
    return r, tr


def gated_fs() -> tuple[SimFileSystem, list[Callable[[], None]]]:
    """A simulated file system whose fsyncs wait in the returned list until one is called."""
    gate: list[Callable[[], None]] = []
    return SimFileSystem(schedule=lambda _d, fn: gate.append(fn)), gate


@pytest.mark.timeout(30)
async def test_clean_stop_then_restart_repeats_what_was_sent_in_the_slot(tmp_path: Path) -> None:
    r, tr = started(DiskStore(tmp_path))
    fut = r.submit([encode_command(Put("user/a", b"1"))])[0]
    await until(lambda: ("p", 0) in tr.slot_msgs(1))
    x = tr.slot_msgs(1)[("p", 0)].batch
    assert x is not None
    r.on_message("n2", Proposal(1, x))
    r.on_message("n2", StateMsg(1, 0, 1, x.id))
    await until(lambda: ("v", 0) in tr.slot_msgs(1))
    before = tr.slot_msgs(1)
    assert before[("v", 0)] == VoteMsg(1, 0, 1, x.id)
    await r.stop()  # clean stop: snapshot + journal with the slot in progress
    with pytest.raises(Exception, match="shutting down"):
        fut.result()
    r.on_message("n2", StateMsg(1, 1, 0, None))  # ignored after stop, nothing written
    assert r.store._fd is None

    r2 = make(DiskStore(tmp_path))
    assert r2.engine.incarnation > r.engine.incarnation
    tr2 = Recorder()
    r2.start(tr2)
    y = Batch(BatchId("n3", 7, 1), 0, [encode_command(Put("user/b", b"2"))])
    r2.on_message("n3", Submit(y))
    r2.peer_up("n3")
    r2.on_message("n3", Proposal(1, y))
    r2.on_message("n3", StateMsg(1, 0, 0, None))
    await until(lambda: ("v", 0) in tr2.slot_msgs(1))
    assert tr2.slot_msgs(1) == before
    await r2.stop()


@pytest.mark.timeout(30)
async def test_messages_wait_for_the_fsync_of_their_records() -> None:
    fs, gate = gated_fs()
    r, tr = started(DiskStore(Path("/sim/n1"), fs=fs))
    tr.sent.clear()
    r.submit([encode_command(Put("user/a", b"1"))])
    await asyncio.sleep(0)
    # the new batch goes out at once (it promises nothing); the proposal waits for its record
    assert [type(m).__name__ for _, m in tr.sent] == ["Submit"] and len(gate) == 1
    journal = fs.files[Path("/sim/n1/journal.bin")]
    assert len(journal.data) > 0 and journal.durable == b""
    gate.pop()()
    assert [type(m).__name__ for _, m in tr.sent] == ["Submit", "Proposal"]
    assert journal.durable == bytes(journal.data)
    await r.stop()


@pytest.mark.timeout(30)
async def test_a_journal_that_cannot_be_written_stops_the_replica() -> None:
    fs = SimFileSystem()
    r, tr = started(DiskStore(Path("/sim/n1"), fs=fs))
    fatal: list[BaseException] = []
    r.on_fatal.append(fatal.append)
    tr.sent.clear()
    fs.fail_writes = errno.ENOSPC
    fut = r.submit([encode_command(Put("user/a", b"1"))])[0]
    await asyncio.sleep(0)
    assert tr.sent == []  # nothing unjournalled went out
    assert len(fatal) == 1 and isinstance(fatal[0], JournalError)
    assert "simulated write failure" in str(fatal[0])
    assert isinstance(fut.exception(), JournalError)
    fs.fail_writes = None
    r.on_message("n2", Proposal(1, None))
    later = r.submit([encode_command(Put("user/b", b"1"))])[0]
    assert isinstance(later.exception(), JournalError)
    assert tr.sent == []
    await r.stop()


@pytest.mark.timeout(30)
async def test_messages_queued_during_an_fsync_wait_for_the_next_one() -> None:
    """Group commit: an fsync covers only the records written before it started. Messages whose
    records were written while it ran must wait for the next fsync (found by the node simulation:
    a STATE went out before its journal record was on disk)."""
    fs, gate = gated_fs()
    r, tr = started(DiskStore(Path("/sim/n1"), fs=fs))
    tr.sent.clear()
    r.submit([encode_command(Put("user/a", b"1"))])
    await asyncio.sleep(0)  # the fsync starts once the loop has run what it had input for
    assert [type(m).__name__ for _, m in tr.sent] == ["Submit"] and len(gate) == 1  # proposal's fsync runs
    journal = fs.files[Path("/sim/n1/journal.bin")]
    x = r.engine._cur.my_proposal
    assert x is not None
    r.on_message("n2", Proposal(1, x))  # exchange complete: the STATE record is written now
    assert len(journal.data) > len(journal.durable)
    gate.pop()()  # the first fsync completes: it does not cover the STATE record
    assert [type(m).__name__ for _, m in tr.sent] == ["Submit", "Proposal"]
    assert len(gate) == 1  # a second fsync covers the STATE record
    gate.pop()()
    assert [type(m).__name__ for _, m in tr.sent] == ["Submit", "Proposal", "StateMsg"]
    assert journal.durable == bytes(journal.data)
    await r.stop()


@pytest.mark.timeout(30)
async def test_an_answer_waits_for_the_vote_that_decided_it_not_for_later_records() -> None:
    """The client's answer depends on the votes that decided its slot (journalled before they
    were sent), not on the slot's own record or the next proposal written in the same step:
    it goes out while their fsync is still running (it used to wait for it)."""
    fs, gate = gated_fs()
    r, tr = started(DiskStore(Path("/sim/n1"), fs=fs))
    fut = r.submit([encode_command(Put("user/a", b"1"))])[0]
    await asyncio.sleep(0)
    gate.pop()()  # the proposal is durable and sent
    x = tr.slot_msgs(1)[("p", 0)].batch
    r.on_message("n2", Proposal(1, x))
    await asyncio.sleep(0)
    gate.pop()()  # STATE
    r.on_message("n2", StateMsg(1, 0, 1, x.id))
    await asyncio.sleep(0)
    gate.pop()()  # VOTE: our vote is on disk and sent
    assert ("v", 0) in tr.slot_msgs(1)
    r.submit([encode_command(Put("user/b", b"2"))])  # waits in the open batch for slot 2
    r.on_message("n2", VoteMsg(1, 0, 1, x.id))  # decided: the answer, the slot's record, ...
    await asyncio.sleep(0)
    assert fut.done() and fut.exception() is None  # ... and the answer did not wait for them
    assert len(gate) == 1 and ("p", 0) not in tr.slot_msgs(2)  # the next proposal does
    gate.pop()()
    assert ("p", 0) in tr.slot_msgs(2)
    await r.stop()


@pytest.mark.timeout(30)
async def test_a_vote_that_decides_the_slot_is_durable_before_the_answer() -> None:
    """With one replica its own vote decides the slot in the same step: the answer waits for it."""
    fs, gate = gated_fs()
    r = ConsensusRunner("n1", ["n1"], KVStateMachine(), DiskStore(Path("/sim/n1"), fs=fs), seed=b"t",
                        tick_interval=3600)
    r.recover()
    r.start(Recorder())
    fut = r.submit([encode_command(Put("user/a", b"1"))])[0]
    await asyncio.sleep(0)
    assert r.engine.applied == 1 and not fut.done()  # decided, but the vote is not on disk yet
    gate.pop()()
    assert fut.done() and fut.exception() is None
    await r.stop()


@pytest.mark.timeout(30)
async def test_member_callbacks_run_after_the_step_is_written(tmp_path: Path) -> None:
    """A member-set callback reconfigures the transport, whose PeerDown feeds the engine again:
    it runs once the step's records are written, so the nested step cannot overtake them."""
    from aether.consensus.messages import MemberChange
    from aether.consensus.storage import DiskStore as Store

    store = Store(tmp_path)
    r = ConsensusRunner("n1", ["n1"], KVStateMachine(), store, seed=b"t", tick_interval=3600)
    r.recover()
    tr = Recorder()
    r.start(tr)
    r.peer_up("n2")  # reachable, not a member yet
    seen: list[tuple[tuple[str, ...], int]] = []

    def decided_changes() -> int:
        import msgspec

        from aether.consensus.messages import MEMBER_CHANGE_PREFIX, DecidedRec, JournalRecord

        dec = msgspec.msgpack.Decoder(JournalRecord)
        recs = [dec.decode(p) for _, p in store.load()[1]]
        return sum(1 for x in recs if isinstance(x, DecidedRec) and x.batch is not None
                   for b in x.batch.members() for c in b.commands if c[:1] == MEMBER_CHANGE_PREFIX)

    def on_members(ev: Any) -> None:
        seen.append((ev.members, decided_changes()))
        r.peer_down("n9")  # a nested step, as a dropped link would cause

    r.on_members.append(on_members)
    res = await r.change_members(MemberChange("add", "n2", "h:1"))
    assert res.ok and res.members == ["n1", "n2"]
    # the record of the slot that committed the change was on the journal already
    assert seen and all(n == 1 for _, n in seen), seen
    await r.stop()
