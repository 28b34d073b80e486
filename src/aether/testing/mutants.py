"""Deliberately broken engines, stores, runners and session tables: the simulation must catch each.

Every invariant the node simulation checks has at least one mutant here that breaks it; the
tests run each mutant over a bounded number of seeds and require a failure. From the command
line: `python -m aether.testing.sim --seeds 0:50 --profile disk --mutant forget-journal`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from aether.consensus import engine as engine_mod
from aether.consensus.runner import ConsensusRunner
from aether.consensus.storage import DiskStore, JournalError
from aether.kv.machine import Command, KVStateMachine
from aether.kv.store import KVStore


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # what it breaks, and which check should notice
    profile: str  # the node-simulation profile that exposes it
    patch: Callable[[], contextlib.AbstractContextManager[None]]
    setup: Callable[[Any], None] | None = None  # adjusts a nodesim.World before it runs


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = obj.__dict__[name]
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _d1() -> contextlib.AbstractContextManager[None]:
    orig = engine_mod.Engine.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        self.D = 1

    return _patched(engine_mod.Engine, "__init__", init)


def _forget_journal() -> contextlib.AbstractContextManager[None]:
    orig = engine_mod.Engine.recover

    def recover(self: Any, snapshot: bytes | None, records: Any) -> None:
        orig(self, snapshot, [])

    return _patched(engine_mod.Engine, "recover", recover)


def _drop_kept() -> contextlib.AbstractContextManager[None]:
    orig = DiskStore.save_snapshot

    def save_snapshot(self: Any, data: bytes, keep: list[bytes] | None = None) -> None:
        orig(self, data, [])

    return _patched(DiskStore, "save_snapshot", save_snapshot)


def _no_fsync_wait() -> contextlib.AbstractContextManager[None]:
    def when_durable(self: Any, callback: Any, *, start: bool = True) -> bool:
        callback(self.failed)
        return True

    return _patched(DiskStore, "when_durable", when_durable)


def _ignore_write_errors() -> contextlib.AbstractContextManager[None]:
    """The store swallows a failed append and carries on (no fail-stop)."""
    orig = DiskStore.append

    def append(self: Any, payloads: list[bytes]) -> None:
        try:
            orig(self, payloads)
        except JournalError:
            self._failed = None

    return _patched(DiskStore, "append", append)


def _load_unsynced() -> contextlib.AbstractContextManager[None]:
    """The store bug fixed in this branch: load() acts on a journal that may be in the page cache
    only (after a kill), so a later power cut takes back decisions the replica already sent."""
    orig = DiskStore.load

    def load(self: Any) -> Any:
        policy, self.fsync = self.fsync, "snapshot"
        try:
            return orig(self)
        finally:
            self.fsync = policy

    return _patched(DiskStore, "load", load)


def _release_all() -> contextlib.AbstractContextManager[None]:
    """The runner bug fixed in this branch: any fsync released every held effect."""

    def durable(self: Any, err: BaseException | None, seg: Any) -> None:
        if err is not None:
            self._fatal(err)
            return
        held = list(self._held)
        self._held.clear()
        for s in held:
            self._perform(s.effects)

    return _patched(ConsensusRunner, "_durable", durable)


def _substitute() -> contextlib.AbstractContextManager[None]:
    """Having decided 1, commit the replica's own proposal instead of the candidate."""
    orig = engine_mod.Engine._find_cand_batch

    def find(self: Any) -> Any:
        cur = self._cur
        if cur.decided and cur.decided_bit == 1 and cur.my_proposal is not None:
            return cur.my_proposal
        return orig(self)

    return _patched(engine_mod.Engine, "_find_cand_batch", find)


_cmd = msgspec.msgpack.Decoder(Command)


def _session_next() -> contextlib.AbstractContextManager[None]:
    """The session table answers some new commands with the client's previous (cached) result."""
    orig = KVStateMachine.apply

    def apply(self: Any, command: bytes) -> bytes:
        try:
            cmd = _cmd.decode(command)
        except msgspec.DecodeError:
            return orig(self, command)
        prev = self.sessions.get(cmd.client) if cmd.client else None
        if prev is not None and cmd.seq == prev[0] + 1 and cmd.seq % 5 == 0:
            self.sessions[cmd.client] = (cmd.seq, prev[1])
            return prev[1]
        return orig(self, command)

    return _patched(KVStateMachine, "apply", apply)


def _no_sessions() -> contextlib.AbstractContextManager[None]:
    """The session table never deduplicates: a retried command runs again."""
    orig = KVStateMachine.apply

    def apply(self: Any, command: bytes) -> bytes:
        out = orig(self, command)
        self.sessions.clear()
        return out

    return _patched(KVStateMachine, "apply", apply)


def _local_reads() -> contextlib.AbstractContextManager[None]:
    """KVStore.get answers from the local replica instead of through consensus (stale reads)."""

    async def get(self: Any, key: Any, timeout: float = 5.0) -> Any:
        return self.get_local(key)

    return _patched(KVStore, "get", get)


def _no_retransmit(world: Any) -> None:
    world.sc = replace(world.sc, engine=replace(world.sc.engine, retransmit_after=1e9, catchup_interval=1e9))


def _member_skew() -> contextlib.AbstractContextManager[None]:
    """One replica puts a committed change into effect a slot later than the others."""
    orig = engine_mod.Engine._apply_change

    def apply_change(self: Any, slot: int, command: bytes) -> bytes:
        out = orig(self, slot, command)
        pend = self.pending_config
        if self.node_id == "n1" and pend is not None and len(self._configs) == 2:
            self._configs[1] = msgspec.structs.replace(pend, from_slot=pend.from_slot + 1)
        return out

    return _patched(engine_mod.Engine, "_apply_change", apply_change)


def _quorum_from_config() -> contextlib.AbstractContextManager[None]:
    """Thresholds stay those of the configured member set: a change never takes effect."""

    def activate(self: Any, cfg: Any) -> None:
        self._configs = [msgspec.structs.replace(self._configs[0], epoch=cfg.epoch)]

    return _patched(engine_mod.Engine, "_activate", activate)


def _join_replays() -> contextlib.AbstractContextManager[None]:
    """A joining node replays the log from slot 1 on the member set it was told (no snapshot)."""
    orig = engine_mod.Engine.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        self._needs_snapshot = False

    return _patched(engine_mod.Engine, "__init__", init)


def _nothing() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _no_durable_check(world: Any) -> None:
    world.check_durable_sends = False


MUTANTS: dict[str, Mutant] = {m.name: m for m in [
    Mutant("d1", "decides on one vote (D = 1): two decisions for a slot / vote values", "ci", _d1),
    Mutant("forget-journal", "recovers without its journal: equivocates after a restart (wire check)",
           "disk", _forget_journal),
    Mutant("drop-kept", "a snapshot drops the records of the slot in progress: equivocates after a "
           "clean stop (wire check)", "disk", _drop_kept),
    Mutant("no-fsync-wait", "the store says records are durable before any fsync (durable-before-send)",
           "ci", _no_fsync_wait),
    Mutant("no-fsync-wait-wire", "the same, with the durable-before-send check off: a power cut makes "
           "the replica equivocate (wire check)", "disk", _no_fsync_wait, _no_durable_check),
    Mutant("ignore-write-errors", "the store ignores a failed append (ENOSPC/EIO) and goes on: records "
           "are missing from the disk (durable-before-send)", "disk", _ignore_write_errors),
    Mutant("load-unsynced", "a restarted replica acts on journal records that are not on disk yet "
           "(decisions on the wire that nobody has on disk)", "aggressive", _load_unsynced),
    Mutant("release-all", "the runner releases every held send when any fsync completes "
           "(durable-before-send)", "ci", _release_all),
    Mutant("substitute", "commits its own proposal when it decides 1 without the candidate "
           "(same batch at every slot)", "aggressive", _substitute),
    Mutant("session-next", "the session table answers a new command with the previous result "
           "(list-append: lost appends; registers: linearizability)", "ci", _session_next),
    Mutant("no-sessions", "the session table never deduplicates a retried command (list-append: "
           "duplicates; registers)", "sessions", _no_sessions),
    Mutant("local-reads", "KVStore.get reads the local replica (list-append: stale reads)", "ci",
           _local_reads),
    Mutant("member-skew", "one replica puts a member change into effect a slot late (the member "
           "set per slot)", "members", _member_skew),
    Mutant("quorum-from-config", "thresholds stay those of the configured set; a snapshot installs "
           "the committed one (the member set per slot / per epoch)", "members", _quorum_from_config),
    Mutant("join-replays", "a joining node replays the log on the member set it was told instead of "
           "starting from a snapshot (the member set per epoch / per slot)", "members", _join_replays),
    Mutant("no-retransmit", "never retransmits or asks for catch-up (liveness under drops)", "aggressive",
           _nothing, _no_retransmit),
]}
