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
    Result,
    _Snapshot,
    decode_result,
    encode_command,
    session_error_kind,
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


def test_a_repeated_sequence_with_a_different_command_is_refused_not_answered_from_the_cache() -> None:
    # issue 10 bug 2: a restarted writer reused (client, seq) for a new command and got the
    # old command's result back: an acknowledged write that was never applied
    sm = KVStateMachine()
    assert run(sm, Cas("user/m1", None, b"1"), "kv-n1", 1).ok
    rev = sm.revision
    r = run(sm, Cas("user/m2", None, b"1"), "kv-n1", 1)
    assert not r.ok and session_error_kind(r.error) == "session conflict"
    assert "already used for a different command" in (r.error or "")
    assert sm.get("user/m2") is None and sm.revision == rev  # not applied
    # same key, different value is a different command too
    r = run(sm, Cas("user/m1", None, b"2"), "kv-n1", 1)
    assert session_error_kind(r.error) == "session conflict"
    # the genuine retry still gets its recorded result, and the session goes on
    assert run(sm, Cas("user/m1", None, b"1"), "kv-n1", 1).ok
    assert run(sm, Put("user/m3", b"x"), "kv-n1", 2).ok
    assert sm.get("user/m3") == b"x"


def test_a_lower_sequence_stays_refused_as_stale() -> None:
    sm = KVStateMachine()
    run(sm, Put("user/a", b"1"), "c", 1)
    run(sm, Put("user/a", b"5"), "c", 5)  # gaps are allowed
    r = run(sm, Put("user/a", b"3"), "c", 3)
    assert not r.ok and session_error_kind(r.error) == "stale request sequence"
    assert sm.get("user/a") == b"5"


@pytest.mark.parametrize("seq", [2, 7, 0, -1])
def test_an_unknown_session_must_start_at_seq_1(seq: int) -> None:
    sm = KVStateMachine()
    r = run(sm, Put("user/a", b"1"), "never-seen", seq)
    assert not r.ok and session_error_kind(r.error) == "unknown session"
    assert sm.get("user/a") is None and sm.revision == 0 and "never-seen" not in sm.sessions
    assert run(sm, Put("user/a", b"1"), "never-seen", 1).ok
    assert run(sm, Put("user/a", b"2"), "never-seen", seq if seq > 1 else 2).ok


def test_an_evicted_session_cannot_rerun_a_retried_command() -> None:
    sm = KVStateMachine(max_sessions=2)
    assert run(sm, Put("user/a", b"1"), "old", 1).ok
    assert run(sm, Put("user/a", b"2"), "old", 2).ok
    for c in ("x", "y"):  # evict "old" from the LRU
        run(sm, Get("user/a"), c, 1)
    assert "old" not in sm.sessions
    run(sm, Put("user/a", b"3"), "x", 2)
    # a retry of seq 2 must not run a second time (it would overwrite the 3)
    r = run(sm, Put("user/a", b"2"), "old", 2)
    assert session_error_kind(r.error) == "unknown session"
    assert sm.get("user/a") == b"3"


def test_session_errors_are_classified() -> None:
    assert session_error_kind(None) is None
    assert session_error_kind("key longer than 1024 bytes") is None
    assert session_error_kind("stale request sequence") == "stale request sequence"  # the old text too


def test_refused_commands_leave_identical_state_on_every_replica() -> None:
    cmds = [
        encode_command(Put("user/a", b"1"), "c", 1),
        encode_command(Put("user/b", b"1"), "c", 1),
        encode_command(Put("user/a", b"1"), "c", 1),
        encode_command(Put("user/a", b"2"), "d", 3),
        encode_command(Put("user/a", b"2"), "c", 4),
        encode_command(Put("user/a", b"0"), "c", 2),
    ]
    a, b = KVStateMachine(), KVStateMachine()
    assert [a.apply(c) for c in cmds] == [b.apply(c) for c in cmds]
    assert a.snapshot() == b.snapshot()


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
    # and so do the digests: a different command with the same seq is still refused
    r = decode_result(sm2.apply(encode_command(Put("user/k9", b"other"), "c", 10)))
    assert session_error_kind(r.error) == "session conflict"


class _OldSnapshot(msgspec.Struct, array_like=True):
    """The snapshot layout before sessions recorded command digests."""

    revision: int
    items: list[tuple[str, bytes]]
    sessions: list[tuple[str, int, bytes]]


def test_a_snapshot_from_before_digests_still_loads() -> None:
    old_result = msgspec.msgpack.encode(Result(True, None, 3))
    data = msgspec.msgpack.encode(
        _OldSnapshot(3, [("user/a", b"1"), ("user/b", b"2")], [("c1", 4, old_result), ("c2", 1, old_result)])
    )
    sm = KVStateMachine()
    sm.restore(data)
    assert sm.revision == 3 and sm.items("user/") == [("user/a", b"1"), ("user/b", b"2")]
    assert list(sm.sessions) == ["c1", "c2"]
    # the sessions are known: their next sequence runs, a lower one is stale
    assert run(sm, Put("user/c", b"3"), "c2", 2).ok
    assert session_error_kind(run(sm, Put("user/c", b"x"), "c1", 3).error) == "stale request sequence"
    # the last seq's command is unknown: refused loudly, never answered from the cache
    r = run(sm, Put("user/zzz", b"x"), "c1", 4)
    assert not r.ok and session_error_kind(r.error) == "session conflict"
    assert sm.get("user/zzz") is None
    # and the new snapshot carries digests (restores to the same bytes)
    snap = sm.snapshot()
    assert len(msgspec.msgpack.decode(snap, type=_Snapshot).session_digests) == 2
    sm2 = KVStateMachine()
    sm2.restore(snap)
    assert sm2.snapshot() == snap


class _SnapshotBeforeCreated(msgspec.Struct, array_like=True):
    """The snapshot layout before it kept the keys' creation revisions (what a replica of an
    earlier version decodes)."""

    revision: int
    items: list[tuple[str, bytes]]
    sessions: list[tuple[str, int, bytes]]
    session_digests: list[bytes] = []


def test_a_key_s_creation_revision_is_kept_by_overwrites_renewed_by_removal_and_snapshotted() -> None:
    sm = KVStateMachine()
    assert sm.created_revision("user/a") == 0
    run(sm, Put("user/a", b"1"), "c", 1)  # revision 1
    run(sm, Put("user/b", b"1"), "c", 2)  # 2
    run(sm, Put("user/a", b"2"), "c", 3)  # 3: an overwrite
    run(sm, Cas("user/b", b"1", b"3"), "c", 4)  # 4: an overwrite
    assert (sm.created_revision("user/a"), sm.created_revision("user/b")) == (1, 2)
    run(sm, Remove("user/a"), "c", 5)  # 5
    assert sm.created_revision("user/a") == 0
    run(sm, Cas("user/a", None, b"2"), "c", 6)  # 6: the same value as before, written again
    assert sm.get("user/a") == b"2" and sm.created_revision("user/a") == 6
    run(sm, Cas("user/b", b"3", None), "c", 7)  # removed by compare-and-set
    run(sm, Cas("user/b", b"nope", b"x"), "c", 8)  # refused: changes nothing
    assert sm.created_revision("user/b") == 0 and sm.revision == 7
    snap = sm.snapshot()
    sm2 = KVStateMachine()
    sm2.restore(snap)
    assert sm2.created_revision("user/a") == 6 and sm2.snapshot() == snap
    # a replica of the earlier version decodes the new snapshot (the field is ignored) ...
    old = msgspec.msgpack.decode(snap, type=_SnapshotBeforeCreated)
    assert old.revision == 7 and old.items == [("user/a", b"2")]
    # ... and its snapshots load here: creation unknown (0) until a key is created again
    sm3 = KVStateMachine()
    sm3.restore(msgspec.msgpack.encode(old))
    assert sm3.get("user/a") == b"2" and sm3.created_revision("user/a") == 0
    run(sm3, Put("user/c", b"1"), "c", 9)
    assert sm3.created_revision("user/c") == 8
    sm4 = KVStateMachine()
    sm4.restore(sm3.snapshot())
    assert (sm4.created_revision("user/a"), sm4.created_revision("user/c")) == (0, 8)


def test_secrets_are_a_key_family_external_clients_cannot_touch() -> None:
    from aether.kv.keys import SecretKey, SecretValue, parse_key, value_type_for
    from aether.kv.protocol import client_key_refusal

    assert parse_key("secrets/db-password") == SecretKey("db-password")
    assert value_type_for("secrets/db-password") is SecretValue
    with pytest.raises(BadRequest, match="invalid secret name"):
        parse_key("secrets/bad name")
    refused = client_key_refusal("secrets/db-password")
    assert refused is not None and "only user/ keys" in refused
    # a key without a family was called one "the cluster" owns: "'' belongs to the cluster"
    for key in ("", "greeting"):
        refused = client_key_refusal(key)
        assert refused is not None and "has no key family" in refused and "belongs" not in refused
    # 'user/' was told "expected FAMILY/..." although the family was there: the name is missing
    # (refused before the command is proposed; the state machine's own text stays as it was)
    assert client_key_refusal("user/") == "invalid key 'user/': nothing after 'user/'; expected user/NAME"
    assert client_key_refusal("user/a") is None
