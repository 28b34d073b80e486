"""`KVStore` sessions and error reporting, on a state machine behind a fake consensus runner."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from aether.core.errors import BadRequest, SessionConflict
from aether.kv.keys import BlueprintKey, BlueprintValue
from aether.kv.machine import Command, Get, KVStateMachine, Put, encode_command
from aether.kv.store import KVStore

_incarnations = itertools.count(1_000)


class FakeRunner:
    """Applies each command straight to the state machine (what consensus does, minus the log)."""

    def __init__(self, sm: KVStateMachine) -> None:
        self.sm = sm
        self.engine = SimpleNamespace(incarnation=next(_incarnations))
        self.after_apply: list[Any] = []
        self.on_installed: list[Any] = []
        self.sent: list[bytes] = []

    async def apply(self, commands: list[bytes], timeout: float = 5.0) -> list[bytes]:
        self.sent.extend(commands)
        out = [self.sm.apply(c) for c in commands]
        for cb in self.after_apply:
            cb()
        return out


def store(sm: KVStateMachine, *, session: str | None = None) -> KVStore:
    return KVStore(FakeRunner(sm), sm, "node-1", session=session)  # type: ignore[arg-type]


def test_the_session_is_unique_per_process_incarnation() -> None:
    sm = KVStateMachine()
    a, b = store(sm), store(sm)
    assert a._client != b._client
    assert a._client == f"kv-node-1-{a.runner.engine.incarnation}"
    assert store(sm, session="sim-1")._client == "sim-1"


async def test_a_restarted_writer_with_a_new_incarnation_writes_normally() -> None:
    # issue 10 bug 2: after a restart, the node's writes started again at seq 1 of the same session
    sm = KVStateMachine()
    before = store(sm)
    for i in range(5):
        await before.put(f"user/k{i}", b"v")
    after = store(sm)  # the restarted process
    assert await after.compare_and_set("user/new", None, b"1")
    assert sm.get("user/new") == b"1"
    assert await after.get("user/k1") == b"v"
    assert await after.remove("user/k2") is True
    assert sm.get("user/k2") is None
    assert await after.put("user/k4", b"w") >= 1
    assert sm.get("user/k4") == b"w"


async def test_a_reused_session_raises_on_every_operation_never_silently() -> None:
    # what the old fixed session id did after a restart, made explicit
    sm = KVStateMachine()
    first = store(sm, session="kv-node-1")
    for i in range(3):
        await first.put(f"user/k{i}", b"v")
    await first.compare_and_set("user/map-m1", None, b"1")  # seq 4
    again = store(sm, session="kv-node-1")
    with pytest.raises(SessionConflict, match="stale request sequence"):
        await again.put("user/x", b"1")  # seq 1
    with pytest.raises(SessionConflict, match="stale request sequence"):
        await again.get("user/k0")  # seq 2: was None before
    with pytest.raises(SessionConflict, match="stale request sequence"):
        await again.remove("user/k1")  # seq 3: was a silent False before
    with pytest.raises(SessionConflict, match="already used for a different command"):
        await again.compare_and_set("user/map-m3", None, b"1")  # seq 4: was a cached True before
    assert sm.get("user/map-m3") is None and sm.get("user/k1") == b"v"
    # session errors are not input errors (the API must not answer them with a 400)
    assert not issubclass(SessionConflict, BadRequest)


async def test_validation_errors_stay_bad_request() -> None:
    sm = KVStateMachine()
    s = store(sm)
    with pytest.raises(BadRequest, match="unknown key family"):
        await s.remove("nope/x")
    # a value that passes the local type check but not the state machine's validation
    with pytest.raises(BadRequest, match="limit"):
        await s.put("user/big", b"x" * (1024 * 1024 + 1))
    assert isinstance(await s.put(BlueprintKey("bp"), BlueprintValue([])), int)


async def test_an_evicted_session_is_renewed_and_the_command_resubmitted_once() -> None:
    sm = KVStateMachine(max_sessions=2)
    s = store(sm)
    await s.put("user/a", b"1")
    await s.put("user/a", b"2")
    for c in ("x", "y"):  # other writers evict our session from the LRU
        sm.apply(encode_command(Get("user/a"), c, 1))
    assert s._client not in sm.sessions
    old = s._client
    sent = s.runner.sent  # type: ignore[attr-defined]
    n = len(sent)
    assert await s.put("user/a", b"3") >= 1
    assert sm.get("user/a") == b"3"
    attempts = [msgspec.msgpack.decode(c, type=Command) for c in sent[n:]]
    assert [(c.client, c.seq) for c in attempts] == [(old, 3), (f"{old}.2", 1)]  # refused, then resubmitted
    assert s._client == f"{old}.1"
    # later writes go on in the new session
    assert await s.compare_and_set("user/a", b"3", b"4")
    assert await s.get("user/a") == b"4"


async def test_a_session_whose_first_command_never_committed_recovers() -> None:
    # seq 1 failed before it was proposed (no quorum): seq 2 continues an unknown session
    sm = KVStateMachine()
    s = store(sm)
    next(s._seq)  # seq 1 consumed by a command that never reached the log
    assert await s.put("user/a", b"1") >= 1
    assert await s.put("user/a", b"2") >= 1
    assert sm.get("user/a") == b"2"


async def test_an_unknown_session_twice_raises() -> None:
    sm = KVStateMachine()
    s = store(sm)
    runner = s.runner

    async def refuse_always(commands: list[bytes], timeout: float = 5.0) -> list[bytes]:
        return [sm.apply(encode_command(Put("user/z", b"z"), "ghost", 9)) for _ in commands]

    runner.apply = refuse_always  # type: ignore[method-assign]
    with pytest.raises(SessionConflict, match="unknown session"):
        await s.put("user/a", b"1")
