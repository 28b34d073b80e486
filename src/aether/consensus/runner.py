"""Asyncio adapter around the sans-IO `Engine`: time, timers, transport, disk and futures.

It feeds the engine messages from the transport, peer up/down events and a periodic tick,
and carries out the engine's actions in order. Journal records are written at once; each
message or client answer waits until the records the engine wrote *before* it are durable
(group commit: with `fsync="always"` one fsync covers every record written before it
started, however many engine steps produced them). New batches (`Submit`) promise nothing
about a slot and go out at once. Snapshots replace the journal but keep the
records of the slot in progress. If the journal cannot be written the runner *fails*: it sends
nothing more, fails every pending request and calls `on_fatal` (the node then stops).

Time comes from `clock` (monotonic seconds) and `wall` (seconds since the epoch), both
injectable so the simulation can run this adapter on a virtual clock with per-node skew.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from aether.consensus.engine import (
    Completed,
    Engine,
    EngineConfig,
    Failed,
    Installed,
    MembersChanged,
    Persist,
    SaveSnapshot,
    Send,
    SnapshotRefused,
    StateMachine,
)
from aether.consensus.messages import JournalRecord, MemberChange, MemberResult, SnapshotDamaged, Submit
from aether.consensus.storage import DiskStore, JournalCorrupt, JournalError
from aether.core.errors import CommitTimeout, QuorumLost, TooLarge
from aether.core.histogram import Histogram


class PeerSender(Protocol):
    def send(self, peer: str, msg: Any) -> bool: ...

    def broadcast(self, msg: Any, to: Sequence[str] | None = None) -> None:
        """Send `msg` to every peer in `to` (every up peer when None)."""
        ...


_jenc = msgspec.msgpack.Encoder()
_jdec = msgspec.msgpack.Decoder(JournalRecord)
_mres_dec = msgspec.msgpack.Decoder(MemberResult)


class _Segment:
    """The effects of one engine step, waiting for the records written up to that step."""

    __slots__ = ("durable", "effects")

    def __init__(self, effects: list[Send | Completed | Failed]) -> None:
        self.effects = effects
        self.durable = False


class ConsensusRunner:
    """Runs one replica's engine on the current event loop."""

    def __init__(
        self,
        node_id: str,
        members: Sequence[str],
        state_machine: StateMachine,
        store: DiskStore,
        *,
        seed: bytes,
        config: EngineConfig | None = None,
        tick_interval: float = 0.01,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        learner: bool = False,
    ) -> None:
        self.node_id = node_id
        self.log = logger or logging.getLogger(f"aether.consensus.{node_id}")
        self.store = store
        self.clock = clock
        # unique per start of this replica (persisted), so batch ids and sessions are never reused
        incarnation = store.next_incarnation(int(wall() * 1_000_000_000))
        self.engine = Engine(
            node_id, members, state_machine, seed=seed, incarnation=incarnation, config=config,
            clock_offset=wall() - clock(), learner=learner,
        )
        self.transport: PeerSender | None = None
        self.tick_interval = tick_interval
        self._futures: dict[int, asyncio.Future[bytes]] = {}
        self._tick_task: asyncio.Task[None] | None = None
        self.after_apply: list[Callable[[], None]] = []  # run after every engine step that applied
        self.on_installed: list[Callable[[int], None]] = []
        self.on_fatal: list[Callable[[BaseException], None]] = []  # the journal failed: stop the node
        # the member set in effect or a pending one changed (see Engine.MembersChanged)
        self.on_members: list[Callable[[MembersChanged], None]] = []
        self._last_applied = 0
        # sends and client answers waiting for their journal records to be durable: one segment
        # per engine step, each released (in order) once what was written before it is durable
        self._held: collections.deque[_Segment] = collections.deque()
        self._sync_soon = False  # an fsync is scheduled for the end of this loop iteration
        self._stopped = False
        self.failed: BaseException | None = None
        # seconds from `apply` to its results, of every `apply` that committed (docs/metrics.md)
        self.commit_latency = Histogram()

    # --- lifecycle ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Load the snapshot and journal; raises `JournalCorrupt` for damage that is not a torn tail."""
        snap, payloads = self.store.load()
        records = []
        for off, p in payloads:
            try:
                records.append(_jdec.decode(p))
            except msgspec.DecodeError as e:
                raise JournalCorrupt(
                    f"journal {self.store.journal_path}: record at offset {off} has a valid checksum "
                    f"but cannot be decoded ({e}); was it written by another version?"
                ) from None
        try:
            self.engine.recover(snap, records)
        except SnapshotDamaged as e:
            raise JournalCorrupt(
                f"snapshot {self.store.snapshot_path} is damaged: {e}; restore the node's data "
                "directory from a backup or remove it so the node rejoins from its peers"
            ) from None
        except msgspec.DecodeError as e:
            # decided batches are decoded with their record (above) and applied by the state
            # machine, which answers a malformed command rather than raising: what cannot be
            # decoded here is the snapshot (the engine's or the state machine's part of it)
            if snap is None:
                raise
            raise JournalCorrupt(
                f"snapshot {self.store.snapshot_path} cannot be decoded ({e}): it is damaged, or was "
                "written by another version; restore the node's data directory from a backup or "
                "remove it so the node rejoins from its peers"
            ) from None
        self._last_applied = self.engine.applied
        self.log.info(
            "recovered at slot %d (%d journal records, incarnation %d)",
            self.engine.applied, len(records), self.engine.incarnation,
        )

    def start(self, transport: PeerSender) -> None:
        self.transport = transport
        self._tick_task = asyncio.get_running_loop().create_task(self._ticker())

    async def stop(self) -> None:
        """Stop ticking and taking input; leave a snapshot that keeps the slot in progress."""
        self._stopped = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
            self._tick_task = None
        if self.failed is None:
            # a clean shutdown leaves a snapshot, so a restart does not replay the journal; it
            # carries what we sent in the slot in progress (never equivocate after a restart)
            try:
                snap = self.engine.snapshot_now()
                self.store.save_snapshot(snap.data, [_jenc.encode(r) for r in snap.keep])
            except JournalError as e:
                self.log.warning("could not write the final snapshot: %s", e)
        self.store.close()
        self.log.debug("consensus stats %s, storage stats %s", self.engine.stats, self.store.stats)
        self._held.clear()
        self._fail_futures(QuorumLost("node is shutting down; outcome unknown"))

    def _fail_futures(self, exc: BaseException) -> None:
        futs = list(self._futures.values())
        self._futures.clear()
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)

    def _fatal(self, exc: BaseException) -> None:
        """The journal cannot be written: send nothing more, fail every request, tell the node."""
        if self.failed is not None:
            return
        self.failed = exc
        self._stopped = True
        self._held.clear()
        self.log.critical("consensus stops: %s", exc)
        if self._tick_task is not None:
            self._tick_task.cancel()
        self._fail_futures(exc)
        for cb in self.on_fatal:
            try:
                cb(exc)
            except Exception:
                self.log.exception("on_fatal callback failed")

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.engine.tick(self.clock())
                self._flush()
            except Exception:
                self.log.exception("consensus tick failed")

    # --- inputs ---------------------------------------------------------------------------------

    def on_message(self, sender: str, msg: Any) -> None:
        if self._stopped:
            return
        self.engine.receive(sender, msg, self.clock())
        self._flush()

    def peer_up(self, peer: str) -> None:
        if self._stopped:
            return
        self.engine.peer_up(peer, self.clock())
        self._flush()

    def peer_down(self, peer: str) -> None:
        if self._stopped:
            return
        self.engine.peer_down(peer, self.clock())
        self._flush()

    def submit(self, commands: Sequence[bytes]) -> list[asyncio.Future[bytes]]:
        """Queue commands; each future resolves to its encoded result."""
        loop = asyncio.get_running_loop()
        if self._stopped:
            exc: BaseException = self.failed or QuorumLost("node is shutting down; the write was not applied")
            futs = []
            for _ in commands:
                f: asyncio.Future[bytes] = loop.create_future()
                f.set_exception(exc)
                futs.append(f)
            return futs
        tokens = self.engine.submit_many(commands, self.clock())
        futs = []
        for t in tokens:
            f = loop.create_future()
            self._futures[t] = f
            futs.append(f)
        self._flush()
        return futs

    async def change_members(self, change: MemberChange, timeout: float = 5.0) -> MemberResult:
        """Commit a membership change; raises `MembershipRefused` (with the reason) if this replica
        refuses it before submitting, QuorumLost / CommitTimeout like `apply`. A change the log
        refuses comes back as a MemberResult with `ok` False and the reason."""
        if self._stopped:
            raise QuorumLost("node is shutting down; the change was not applied")
        tok = self.engine.change_members(change, self.clock())
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures[tok] = fut
        self._flush()
        try:
            data = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CommitTimeout(
                f"member change not committed within {timeout:.1f}s (outcome unknown)") from None
        return _mres_dec.decode(data)

    async def apply(self, commands: Sequence[bytes], timeout: float = 5.0) -> list[bytes]:
        """Commit `commands` and return their results (QuorumLost / CommitTimeout otherwise)."""
        started = self.clock()
        futs = self.submit(commands)
        try:
            _, pending = await asyncio.wait(futs, timeout=timeout)
        except asyncio.CancelledError:
            for f in futs:
                f.cancel()
            raise
        if pending:
            for f in futs:
                f.cancel()
            raise CommitTimeout(f"not committed within {timeout:.1f}s (outcome unknown)")
        errors = [e for e in (f.exception() for f in futs) if e is not None]  # retrieve every one
        if errors:
            raise errors[0]
        self.commit_latency.observe(self.clock() - started)
        return [f.result() for f in futs]

    # --- actions --------------------------------------------------------------------------------

    def _flush(self) -> None:
        actions = self.engine.take_actions()
        if not actions:
            return
        records: list[bytes] = []
        effects: list[Send | Completed | Failed] = []
        batches: list[Send | Completed | Failed] = []
        store = self.store
        installed = False
        changed: list[MembersChanged] = []
        try:
            for a in actions:
                if isinstance(a, Persist):
                    if effects:
                        self._hold(effects)
                        effects = []
                    records.append(_jenc.encode(a.record))
                elif isinstance(a, Send) and isinstance(a.msg, Submit):
                    # a new batch promises nothing about any slot: it does not wait for an fsync
                    # (only for the step's records to be written, so a failing disk sends nothing)
                    batches.append(a)
                elif isinstance(a, (Send, Completed, Failed)):
                    if records:
                        store.append(records)
                        records = []
                    effects.append(a)
                elif isinstance(a, SaveSnapshot):
                    if records:
                        store.append(records)
                        records = []
                    store.save_snapshot(a.data, [_jenc.encode(r) for r in a.keep])
                elif isinstance(a, Installed):
                    installed = True
                    for on_inst in self.on_installed:
                        on_inst(a.slot)
                elif isinstance(a, MembersChanged):
                    changed.append(a)  # after the step: the callbacks reconfigure the transport
                elif isinstance(a, SnapshotRefused):
                    self.log.warning(
                        "refused the snapshot of slot %d that %s sent in catch-up: %s; not installed, "
                        "asking for it again (from another peer if one is up)", a.slot, a.sender, a.reason)
            if records:
                store.append(records)
            if batches:
                self._perform(batches)
            if effects:
                self._hold(effects)
        except JournalError as e:
            self._fatal(e)
            return
        if self._held and not self._sync_soon:
            # one fsync for every step this loop iteration runs (group commit)
            self._sync_soon = True
            asyncio.get_running_loop().call_soon(self._start_sync)
        if self.engine.applied != self._last_applied or installed:
            self._last_applied = self.engine.applied
            for cb in self.after_apply:
                cb()
        # Last, once this step's records are written and its effects held: a callback may drop
        # links, whose PeerDown feeds the engine again (a nested step of its own).
        for ev in changed:
            for on_m in self.on_members:
                try:
                    on_m(ev)
                except Exception:
                    self.log.exception("member change callback failed")

    def _start_sync(self) -> None:
        self._sync_soon = False
        try:
            self.store.start_sync()
        except JournalError as e:
            self._fatal(e)

    def _hold(self, effects: list[Send | Completed | Failed]) -> None:
        """Perform `effects` once every record written so far is durable, after older ones.

        Each effect waits only for the records the engine asked for before it (a client's answer
        waits for the vote that decided its slot, not for the next slot's proposal); the fsync
        starts at the end of the step, so one covers all of the step's records.
        """
        seg = _Segment(effects)
        self._held.append(seg)
        self.store.when_durable(functools.partial(self._durable, seg=seg), start=False)

    def _durable(self, err: BaseException | None, seg: _Segment) -> None:
        """What was written before `seg` is durable: release it and any ready segments after it."""
        if err is not None:
            self._fatal(err)
            return
        seg.durable = True
        held = self._held
        while held and held[0].durable:
            self._perform(held.popleft().effects)

    def _perform(self, effects: list[Send | Completed | Failed]) -> None:
        if self.failed is not None:
            return  # fail-stop: nothing more leaves this node
        tr = self.transport
        futs = self._futures
        for a in effects:
            if isinstance(a, Send):
                if tr is None:
                    continue
                if a.to is None:
                    tr.broadcast(a.msg, a.group)
                else:
                    tr.send(a.to, a.msg)
            elif isinstance(a, Completed):
                for tok, res in zip(a.tokens, a.results, strict=True):
                    f = futs.pop(tok, None)
                    if f is not None and not f.done():
                        f.set_result(res)
            else:
                if a.reason == "too_large":
                    exc: Exception = TooLarge(
                        f"a command larger than {self.engine.cfg.max_batch_bytes} bytes (the largest "
                        "command consensus carries, max_batch_bytes); not applied"
                    )
                elif a.reason == "timeout":
                    exc = CommitTimeout("not committed in time (outcome unknown)")
                elif a.reason == "member":
                    exc = QuorumLost(
                        f"node {self.node_id} is not a member of the cluster's member set (it was "
                        "removed, or its addition has not taken effect yet); "
                        + ("the write was not applied" if a.definite else "outcome unknown"))
                elif a.definite:
                    exc = QuorumLost("no quorum: this node cannot reach a majority of the cluster; "
                                     "the write was not applied")
                else:
                    exc = QuorumLost("quorum lost while the write was pending (outcome unknown)")
                for tok in a.tokens:
                    f = futs.pop(tok, None)
                    if f is not None and not f.done():
                        f.set_exception(exc)
