"""Asyncio adapter around the sans-IO `Engine`: time, timers, transport, disk and futures.

It feeds the engine messages from the transport, peer up/down events and a periodic tick,
and carries out the engine's actions in order: journal records are written before any send
that follows them, snapshots replace the journal, and client futures are resolved when
their commands commit (or fail with `QuorumLost` / `CommitTimeout`).
"""

from __future__ import annotations

import asyncio
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
    Persist,
    SaveSnapshot,
    Send,
    StateMachine,
)
from aether.consensus.messages import JournalRecord
from aether.consensus.storage import DiskStore
from aether.core.errors import CommitTimeout, QuorumLost


class PeerSender(Protocol):
    def send(self, peer: str, msg: Any) -> bool: ...

    def broadcast(self, msg: Any) -> None: ...


_jenc = msgspec.msgpack.Encoder()
_jdec = msgspec.msgpack.Decoder(JournalRecord)


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
    ) -> None:
        self.node_id = node_id
        self.log = logger or logging.getLogger(f"aether.consensus.{node_id}")
        self.store = store
        self.engine = Engine(
            node_id, members, state_machine, seed=seed, incarnation=time.time_ns(), config=config,
            clock_offset=time.time() - time.monotonic(),
        )
        self.transport: PeerSender | None = None
        self.tick_interval = tick_interval
        self._futures: dict[int, asyncio.Future[bytes]] = {}
        self._tick_task: asyncio.Task[None] | None = None
        self.after_apply: list[Callable[[], None]] = []  # run after every engine step that applied
        self.on_installed: list[Callable[[int], None]] = []
        self._last_applied = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def recover(self) -> None:
        snap, payloads = self.store.load()
        records = []
        for p in payloads:
            try:
                records.append(_jdec.decode(p))
            except msgspec.DecodeError:
                self.log.warning("journal record undecodable; ignoring the rest of the journal")
                break
        self.engine.recover(snap, records)
        self._last_applied = self.engine.applied
        self.log.info("recovered at slot %d (%d journal records)", self.engine.applied, len(records))

    def start(self, transport: PeerSender) -> None:
        self.transport = transport
        self._tick_task = asyncio.get_running_loop().create_task(self._ticker())

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
            self._tick_task = None
        # a clean shutdown leaves a snapshot, so a restart does not replay the journal
        try:
            snap = self.engine.snapshot_now()
            self.store.save_snapshot(snap.data)
        except OSError as e:
            self.log.warning("could not write the final snapshot: %s", e)
        self.store.close()
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(QuorumLost("node is shutting down; outcome unknown"))
        self._futures.clear()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.engine.tick(time.monotonic())
                self._flush()
            except Exception:
                self.log.exception("consensus tick failed")

    # --- inputs ---------------------------------------------------------------------------------

    def on_message(self, sender: str, msg: Any) -> None:
        self.engine.receive(sender, msg, time.monotonic())
        self._flush()

    def peer_up(self, peer: str) -> None:
        self.engine.peer_up(peer, time.monotonic())
        self._flush()

    def peer_down(self, peer: str) -> None:
        self.engine.peer_down(peer, time.monotonic())
        self._flush()

    def submit(self, commands: Sequence[bytes]) -> list[asyncio.Future[bytes]]:
        """Queue commands; each future resolves to its encoded result."""
        loop = asyncio.get_running_loop()
        tokens = self.engine.submit_many(commands, time.monotonic())
        futs = []
        for t in tokens:
            f: asyncio.Future[bytes] = loop.create_future()
            self._futures[t] = f
            futs.append(f)
        self._flush()
        return futs

    async def apply(self, commands: Sequence[bytes], timeout: float = 5.0) -> list[bytes]:
        """Commit `commands` and return their results (QuorumLost / CommitTimeout otherwise)."""
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
        return [f.result() for f in futs]

    # --- actions --------------------------------------------------------------------------------

    def _flush(self) -> None:
        actions = self.engine.take_actions()
        if not actions:
            return
        pending: list[bytes] = []
        tr = self.transport
        store = self.store
        installed = False
        for a in actions:
            if isinstance(a, Send):
                if pending:
                    store.append(pending)
                    pending = []
                if tr is None:
                    continue
                if a.to is None:
                    tr.broadcast(a.msg)
                else:
                    tr.send(a.to, a.msg)
            elif isinstance(a, Persist):
                pending.append(_jenc.encode(a.record))
            elif isinstance(a, Completed):
                futs = self._futures
                for tok, res in zip(a.tokens, a.results, strict=True):
                    f = futs.pop(tok, None)
                    if f is not None and not f.done():
                        f.set_result(res)
            elif isinstance(a, Failed):
                if a.reason == "timeout":
                    exc: Exception = CommitTimeout("not committed in time (outcome unknown)")
                elif a.definite:
                    exc = QuorumLost("no quorum: this node cannot reach a majority of the cluster; "
                                     "the write was not applied")
                else:
                    exc = QuorumLost("quorum lost while the write was pending (outcome unknown)")
                for tok in a.tokens:
                    f = self._futures.pop(tok, None)
                    if f is not None and not f.done():
                        f.set_exception(exc)
            elif isinstance(a, SaveSnapshot):
                if pending:
                    store.append(pending)
                    pending = []
                store.save_snapshot(a.data)
            elif isinstance(a, Installed):
                installed = True
                for on_inst in self.on_installed:
                    on_inst(a.slot)
        if pending:
            store.append(pending)
        if self.engine.applied != self._last_applied or installed:
            self._last_applied = self.engine.applied
            for cb in self.after_apply:
                cb()
