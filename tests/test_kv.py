"""KV state machine and structured keys: commands, sessions, validation, snapshots."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aether.core.errors import BadRequest
from aether.kv.keys import (
    BlueprintKey,
    BlueprintSlice,
    BlueprintValue,
    EndpointKey,
    RouteKey,
    SliceKey,
    UserKey,
    parse_key,
)
from aether.kv.machine import (
    Cas,
    Get,
    KVStateMachine,
    Put,
    Remove,
    decode_result,
    encode_command,
)


def run(sm: KVStateMachine, op: object, client: str = "", seq: int = 0):  # type: ignore[no-untyped-def]
    return decode_result(sm.apply(encode_command(op, client, seq)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    [
        BlueprintKey("demo-order:0.1.0"),
        SliceKey("node-1", "org.demo:place-order:0.1.0"),
        EndpointKey("org.demo:place-order:0.1.0", "place", 2),
        RouteKey("GET", "/api/orders/{id}"),
        UserKey("anything/goes here"),
    ],
)
def test_keys_round_trip(key: object) -> None:
    assert parse_key(str(key)) == key


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("nofamily", "expected FAMILY"),
        ("bogus/x", "unknown key family"),
        ("slices/node-1", "expected slices/NODE/ARTIFACT"),
        ("slices/bad node/a", "invalid node id"),
        ("endpoints/a/m:x", "METHOD:INSTANCE"),
        ("routes/FETCH:/x", "METHOD one of"),
        ("routes/GET:no-slash", "invalid route path"),
    ],
)
def test_bad_keys_are_named(text: str, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        parse_key(text)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_:", min_size=1, max_size=40))
def test_slice_keys_parse_back(name: str) -> None:
    k = SliceKey("node-1", name)
    assert parse_key(str(k)) == k


def test_put_get_remove_cas_and_revisions() -> None:
    sm = KVStateMachine()
    assert run(sm, Get("user/a")).value is None
    r = run(sm, Put("user/a", b"1"))
    assert r.ok and r.revision == 1 and r.value is None
    assert run(sm, Get("user/a")).value == b"1"
    assert not run(sm, Cas("user/a", b"0", b"2")).ok
    assert run(sm, Cas("user/a", b"1", b"2")).ok
    assert sm.get("user/a") == b"2"
    assert run(sm, Cas("user/b", None, b"x")).ok  # create if absent
    assert not run(sm, Cas("user/b", None, b"y")).ok
    assert run(sm, Remove("user/a")).value == b"2"
    assert sm.get("user/a") is None
    assert run(sm, Cas("user/b", b"x", None)).ok  # CAS to None removes
    assert sm.get("user/b") is None
    kinds = [(e.kind, e.key) for e in sm.drain_events()]
    assert kinds == [
        ("put", "user/a"),
        ("put", "user/a"),
        ("put", "user/b"),
        ("remove", "user/a"),
        ("remove", "user/b"),
    ]


def test_typed_family_values_are_validated() -> None:
    sm = KVStateMachine()
    good = msgspec.msgpack.encode(BlueprintValue([BlueprintSlice("g:a:1.0.0", 2)]))
    assert run(sm, Put("blueprints/x", good)).ok
    bad = run(sm, Put("blueprints/y", b"\x01garbage"))
    assert not bad.ok and "not a valid BlueprintValue" in (bad.error or "")
    assert sm.get("blueprints/y") is None
    r = run(sm, Put("nonsense/y", b"v"))
    assert not r.ok and "unknown key family" in (r.error or "")


def test_oversized_values_and_malformed_commands_are_rejected_not_applied() -> None:
    sm = KVStateMachine()
    r = run(sm, Put("user/big", b"x" * (1024 * 1024 + 1)))
    assert not r.ok and "limit" in (r.error or "")
    res = decode_result(sm.apply(b"\xc1\xc1not msgpack"))
    assert not res.ok and "malformed command" in (res.error or "")
    assert sm.revision == 0


def test_session_dedup_makes_retries_exactly_once() -> None:
    sm = KVStateMachine()
    first = sm.apply(encode_command(Cas("user/c", None, b"1"), "cl", 1))
    again = sm.apply(encode_command(Cas("user/c", None, b"1"), "cl", 1))
    assert first == again and decode_result(first).ok
    assert sm.revision == 1
    stale = run(sm, Put("user/c", b"old"), "cl", 0)
    assert not stale.ok and "stale" in (stale.error or "")
    assert run(sm, Put("user/c", b"2"), "cl", 2).ok


def test_sessions_are_bounded() -> None:
    sm = KVStateMachine(max_sessions=3)
    for i in range(10):
        run(sm, Put("user/a", b"x"), f"c{i}", 1)
    assert len(sm.sessions) == 3


def test_snapshot_restore_round_trip() -> None:
    sm = KVStateMachine()
    for i in range(10):
        run(sm, Put(f"user/k{i}", str(i).encode()), "c", i + 1)
    snap = sm.snapshot()
    sm2 = KVStateMachine()
    sm2.restore(snap)
    assert sm2.snapshot() == snap
    assert sm2.items("user/k1") == [("user/k1", b"1")]
    assert sm2.revision == 10
    # sessions survive: a retry after restore is still deduplicated
    assert sm2.apply(encode_command(Put("user/k9", b"9"), "c", 10)) == sm.apply(
        encode_command(Put("user/k9", b"9"), "c", 10)
    )
