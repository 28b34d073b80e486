"""Membership changes through the log, at the level of the sans-IO engine.

A change is a command committed in a slot s; it governs slots from s + delay on. Every replica
derives the member set of a slot from the log before it, so all use the same one; thresholds
(W, M, D) follow it; a removed node stops counting; a node being added takes part only once it
has applied everything before its first slot (it catches up by snapshot or entries as a learner).
"""

from __future__ import annotations

from collections import deque

import msgspec
import pytest

from aether.consensus.engine import (
    Completed,
    Engine,
    EngineConfig,
    Failed,
    MembersChanged,
    MembershipRefused,
    Persist,
    SaveSnapshot,
    Send,
)
from aether.consensus.messages import (
    ACTIVATION_DELAY,
    MEMBER_CHANGE_PREFIX,
    EngineSnapshot,
    JournalRecord,
    MemberChange,
    MemberResult,
    Proposal,
    SentRec,
)
from aether.kv.machine import KVStateMachine, Put, decode_result, encode_command

_enc = msgspec.msgpack.Encoder()
_jdec = msgspec.msgpack.Decoder(JournalRecord)
_rdec = msgspec.msgpack.Decoder(MemberResult)


class Net:
    """Engines exchanging messages FIFO; sends go to the group the engine names."""

    def __init__(self, members: list[str], learners: tuple[str, ...] = (),
                 config: EngineConfig | None = None) -> None:
        self.cfg = config or EngineConfig()
        self.sms: dict[str, KVStateMachine] = {}
        self.engines: dict[str, Engine] = {}
        self.queue: deque[tuple[str, str, object]] = deque()
        self.completed: dict[str, list[Completed]] = {}
        self.failed: dict[str, list[Failed]] = {}
        self.changed: dict[str, list[MembersChanged]] = {}
        self.journal: dict[str, list[bytes]] = {}
        self.snapshot: dict[str, bytes | None] = {}
        self.sent: dict[str, list[SentRec]] = {}  # every slot message journalled, across snapshots
        self.down: set[str] = set()
        self.now = 0.0
        for m in [*members, *learners]:
            self.add_engine(m, members, learner=m in learners)
        self.link_all()

    def add_engine(self, nid: str, members: list[str], *, learner: bool = False) -> Engine:
        self.sms[nid] = KVStateMachine()
        e = self.engines[nid] = Engine(nid, members, self.sms[nid], config=self.cfg, learner=learner)
        for d in (self.completed, self.failed, self.changed, self.journal):
            d.setdefault(nid, [])  # type: ignore[attr-defined]
        self.snapshot.setdefault(nid, None)
        return e

    def link_all(self) -> None:
        for a in self.engines:
            for b in self.engines:
                if a != b and a not in self.down and b not in self.down:
                    self.engines[a].peer_up(b, self.now)
                elif a != b:
                    self.engines[a].peer_down(b, self.now)
        for i in self.engines:
            self.collect(i)

    def collect(self, nid: str) -> None:
        for a in self.engines[nid].take_actions():
            if isinstance(a, Send):
                targets = [a.to] if a.to else list(a.group)
                for t in targets:
                    self.queue.append((nid, t, a.msg))
            elif isinstance(a, Completed):
                self.completed[nid].append(a)
            elif isinstance(a, Failed):
                self.failed[nid].append(a)
            elif isinstance(a, MembersChanged):
                self.changed[nid].append(a)
            elif isinstance(a, Persist):
                self.journal[nid].append(_enc.encode(a.record))
                if isinstance(a.record, SentRec):
                    self.sent.setdefault(nid, []).append(a.record)
            elif isinstance(a, SaveSnapshot):
                self.snapshot[nid] = a.data
                self.journal[nid] = [_enc.encode(r) for r in a.keep]

    def run(self, limit: int = 200_000) -> None:
        steps = 0
        while self.queue and steps < limit:
            src, dst, msg = self.queue.popleft()
            steps += 1
            if src in self.down or dst in self.down or dst not in self.engines:
                continue
            self.engines[dst].receive(src, msg, self.now)
            self.collect(dst)

    def settle(self, rounds: int = 20, dt: float = 0.25) -> None:
        for _ in range(rounds):
            self.run()
            self.now += dt
            for i, e in self.engines.items():
                if i not in self.down:
                    e.tick(self.now)
                    self.collect(i)
        self.run()

    def put(self, nid: str, key: str, value: bytes) -> int:
        tok = self.engines[nid].submit(encode_command(Put(key, value)), self.now)
        self.collect(nid)
        return tok

    def change(self, nid: str, op: str, node: str, address: str = "") -> int:
        tok = self.engines[nid].change_members(MemberChange(op, node, address), self.now)
        self.collect(nid)
        return tok

    def result(self, nid: str, tok: int) -> bytes | None:
        for c in self.completed[nid]:
            for t, r in zip(c.tokens, c.results, strict=True):
                if t == tok:
                    return r
        return None

    def member_result(self, nid: str, tok: int) -> MemberResult:
        r = self.result(nid, tok)
        assert r is not None, f"change {tok} on {nid} did not complete (failed: {self.failed[nid]})"
        return _rdec.decode(r)

    def failed_reason(self, nid: str, tok: int) -> str | None:
        for f in self.failed[nid]:
            if tok in f.tokens:
                return f.reason
        return None


def _same_state(net: Net, ids: list[str]) -> None:
    applied = {net.engines[i].applied for i in ids}
    assert len(applied) == 1, {i: net.engines[i].applied for i in ids}
    snaps = {net.sms[i].snapshot() for i in ids}
    assert len(snaps) == 1


def test_adding_a_member_takes_effect_at_a_later_slot_on_every_replica() -> None:
    net = Net(["n1", "n2", "n3"], learners=("n4",))
    assert not net.engines["n4"].is_member
    net.put("n1", "user/a", b"1")
    net.settle()
    tok = net.change("n1", "add", "n4", "127.0.0.1:9")
    net.settle()
    res = net.member_result("n1", tok)
    assert res.ok and res.members == ["n1", "n2", "n3", "n4"] and res.epoch == 1
    # committed in slot s, in effect from s + delay, and the slots between ran although idle
    commit_slot = next(c.slot for c in net.completed["n1"] if tok in c.tokens)
    assert res.from_slot == commit_slot + ACTIVATION_DELAY
    for i in ("n1", "n2", "n3", "n4"):
        e = net.engines[i]
        assert e.members == ("n1", "n2", "n3", "n4"), i
        assert e.is_member and (e.n, e.W, e.M, e.D) == (4, 3, 3, 2)
        assert e.applied >= res.from_slot - 1
        assert net.changed[i][-1].members == ("n1", "n2", "n3", "n4")
        assert net.changed[i][-1].addresses == {"n4": "127.0.0.1:9"}
    # the new member caught up (it was a learner until then) and now takes part: a write
    # through it commits, and so do writes with one of the others down (3 of 4 left)
    t4 = net.put("n4", "user/b", b"2")
    net.settle()
    assert net.result("n4", t4) is not None
    net.down = {"n2"}
    net.link_all()
    t1 = net.put("n1", "user/c", b"3")
    net.settle()
    assert decode_result(net.result("n1", t1) or b"").ok
    _same_state(net, ["n1", "n3", "n4"])


def test_quorum_follows_the_committed_member_set() -> None:
    net = Net(["n1", "n2", "n3"], learners=("n4",))
    net.settle()
    net.change("n1", "add", "n4")
    net.settle()
    # 4 members: two up of four is no majority, although it was one of three before
    net.down = {"n3", "n4"}
    net.link_all()
    assert not net.engines["n1"].has_quorum
    tok = net.put("n1", "user/x", b"1")
    assert net.failed_reason("n1", tok) == "quorum"
    net.down = set()
    net.link_all()
    assert net.engines["n1"].has_quorum


def test_a_removed_member_stops_counting_and_refuses_writes() -> None:
    net = Net(["n1", "n2", "n3"])
    net.settle()
    tok = net.change("n1", "remove", "n3")
    net.settle()
    assert net.member_result("n1", tok).ok
    e3 = net.engines["n3"]
    assert not e3.is_member and net.engines["n1"].members == ("n1", "n2")
    # its writes are refused definitely (it is not a member)
    t = net.put("n3", "user/a", b"1")
    assert net.failed_reason("n3", t) == "member"
    # a proposal from it (as if it still took part) is not counted
    e1 = net.engines["n1"]
    e1.receive("n3", Proposal(e1.slot, None), net.now)
    assert "n3" not in e1._cur.proposals
    # two members: both are needed (n = 2, W = 2); n3 down changes nothing
    net.down = {"n3"}
    net.link_all()
    t1 = net.put("n1", "user/b", b"2")
    net.settle()
    assert decode_result(net.result("n1", t1) or b"").ok
    # the removed node still learns the log (as a learner) once it is back
    net.down = set()
    net.link_all()
    net.settle()
    _same_state(net, ["n1", "n2", "n3"])


def test_changes_that_would_stall_or_race_are_refused_with_a_reason() -> None:
    net = Net(["n1", "n2", "n3"], learners=("n4",))
    net.settle()
    with pytest.raises(MembershipRefused, match="already a member"):
        net.change("n1", "add", "n2")
    with pytest.raises(MembershipRefused, match="not a member"):
        net.change("n1", "remove", "n9")
    with pytest.raises(MembershipRefused, match="cannot be reached"):
        net.change("n1", "add", "n5")
    with pytest.raises(MembershipRefused, match="not a member; send the change to a member"):
        net.change("n4", "add", "n5")
    # n3 is down: removing n2 would leave {n1, n3}, which needs both
    net.down = {"n3"}
    net.link_all()
    with pytest.raises(MembershipRefused, match="needs 2 live members"):
        net.change("n1", "remove", "n2")
    # removing the down one is fine
    tok = net.change("n1", "remove", "n3")
    # while it is pending (committed, not in effect), a second change is refused
    net.run()
    assert net.engines["n1"].pending_config is not None or net.engines["n1"].epoch == 1
    net.settle()
    assert net.member_result("n1", tok).ok


def test_a_change_checked_against_an_older_member_set_commits_as_refused() -> None:
    net = Net(["n1", "n2", "n3"], learners=("n4", "n5"))
    net.settle()
    # two members validate concurrently (both against epoch 0); only the first to commit applies
    t1 = net.change("n1", "add", "n4")
    t2 = net.change("n2", "add", "n5")
    net.settle()
    r1, r2 = net.member_result("n1", t1), net.member_result("n2", t2)
    assert [r1.ok, r2.ok].count(True) == 1
    loser = r2 if r1.ok else r1
    assert loser.error and ("pending" in loser.error or "member set changed" in loser.error)
    members = {net.engines[i].members for i in ("n1", "n2", "n3", "n4", "n5")}
    assert len(members) == 1 and len(next(iter(members))) == 4


def test_a_pending_change_refuses_another_one_at_submission() -> None:
    net = Net(["n1", "n2", "n3"], learners=("n4",))
    net.settle()
    e1 = net.engines["n1"]
    # drive only until the change is applied on n1, not until it takes effect
    net.change("n1", "add", "n4")
    while e1.pending_config is None and net.queue:
        src, dst, msg = net.queue.popleft()
        net.engines[dst].receive(src, msg, net.now)
        net.collect(dst)
    assert e1.pending_config is not None and e1.pending_config.from_slot > e1.slot - 1
    with pytest.raises(MembershipRefused, match="another member change is pending"):
        net.change("n1", "remove", "n3")
    net.settle()
    assert e1.pending_config is None and e1.epoch == 1


def test_malformed_member_change_is_refused_not_fatal() -> None:
    net = Net(["n1", "n2", "n3"])
    net.settle()
    tok = net.engines["n1"].submit(MEMBER_CHANGE_PREFIX + b"\xff\x00garbage", net.now)
    net.collect("n1")
    net.settle()
    res = net.member_result("n1", tok)
    assert not res.ok and res.error and "malformed member change" in res.error
    bad_op = net.engines["n1"].submit(
        MEMBER_CHANGE_PREFIX + _enc.encode(MemberChange("rename", "n2")), net.now)
    net.collect("n1")
    net.settle()
    assert "unknown member change" in (net.member_result("n1", bad_op).error or "")
    assert net.engines["n2"].members == ("n1", "n2", "n3")


def test_member_set_survives_a_restart_from_snapshot_and_from_journal() -> None:
    cfg = EngineConfig(snapshot_every=5)
    net = Net(["n1", "n2", "n3"], learners=("n4",), config=cfg)
    net.settle()
    net.change("n1", "add", "n4", "h:1")
    net.settle()
    for i in range(12):
        net.put("n1", f"user/k{i}", b"v")
        net.settle(2)
    snap = net.snapshot["n2"]
    assert snap is not None
    assert msgspec.msgpack.decode(snap, type=EngineSnapshot).configs
    # restart n2 with the original (3-member) configuration: the log's member set wins
    e = Engine("n2", ["n1", "n2", "n3"], KVStateMachine(), config=cfg)
    e.recover(snap, [_jdec.decode(r) for r in net.journal["n2"]])
    assert e.members == ("n1", "n2", "n3", "n4") and e.member_addresses() == {"n4": "h:1"}
    assert e.applied == net.engines["n2"].applied
    # from the journal alone (no snapshot yet): the change is replayed
    net2 = Net(["n1", "n2", "n3"], learners=("n4",))
    net2.settle()
    net2.change("n1", "add", "n4")
    net2.settle()
    assert net2.snapshot["n3"] is None
    e3 = Engine("n3", ["n1", "n2", "n3"], KVStateMachine())
    e3.recover(None, [_jdec.decode(r) for r in net2.journal["n3"]])
    assert e3.members == ("n1", "n2", "n3", "n4")


def test_a_snapshot_written_before_membership_changes_still_loads() -> None:
    net = Net(["n1", "n2", "n3"])
    net.put("n1", "user/a", b"1")
    net.settle()
    sm = net.sms["n1"]
    # the old layout: four fields, no member configs
    old = _enc.encode([net.engines["n1"].applied, ["n1", "n2", "n3"], sm.snapshot(), []])
    e = Engine("n1", ["n1", "n2", "n3"], KVStateMachine())
    e.recover(old, [])
    assert e.members == ("n1", "n2", "n3") and e.epoch == 0
    assert e.applied == net.engines["n1"].applied


def test_a_fresh_node_catches_up_by_snapshot_before_it_takes_part() -> None:
    cfg = EngineConfig(retain_slots=8, snapshot_every=10, dedup_slots=2048)
    net = Net(["n1", "n2", "n3"], config=cfg)
    for i in range(40):
        net.put("n1", f"user/k{i}", b"v")
        net.settle(1)
    # a fresh node joins: it knows the current member set and nothing else
    net.add_engine("n4", ["n1", "n2", "n3"], learner=True)
    net.link_all()
    net.settle(5)
    e4 = net.engines["n4"]
    assert e4.stats["snapshots_installed"] >= 1 and not e4.is_member
    assert e4.applied == net.engines["n1"].applied
    net.change("n2", "add", "n4")
    net.settle()
    assert e4.is_member
    _same_state(net, ["n1", "n2", "n3", "n4"])
    # it takes part from its first slot on, and never sent anything for a slot before it
    first = e4._configs[0].from_slot
    t = net.put("n4", "user/new", b"1")
    net.settle()
    assert net.result("n4", t) is not None
    sent = net.sent.get("n4", [])
    assert sent and all(r.msg.slot >= first for r in sent)


def test_a_joining_node_starts_from_a_snapshot_never_from_a_replay_on_a_foreign_member_set() -> None:
    # every entry is still held, so a joiner asking from slot 1 would get entries: replaying
    # "remove n3" and "add n4" on the set it was told ({n1, n2}, as if epoch 0) would refuse the
    # add (epoch mismatch) and leave it believing it is not a member
    net = Net(["n1", "n2", "n3"])
    net.settle()
    net.change("n1", "remove", "n3")
    net.settle()
    net.add_engine("n4", ["n1", "n2"], learner=True)
    net.link_all()
    net.settle(3)
    assert net.engines["n4"].stats["snapshots_installed"] == 1
    tok = net.change("n1", "add", "n4")
    net.settle()
    assert net.member_result("n1", tok).ok
    assert net.engines["n4"].members == ("n1", "n2", "n4") and net.engines["n4"].is_member
    _same_state(net, ["n1", "n2", "n4"])


def test_the_leader_and_its_managers_count_members_only() -> None:
    """`LeaderManager` follows the committed set: an up peer that is not a member (a node being
    added, or one removed) neither leads nor counts, nor gets work (`up`), until it is a member."""
    from aether.cluster.leader import LeaderManager

    lm = LeaderManager("n2", ["n2", "n3", "n4"])
    lm.peer_up("n1")  # up, but not a member
    lm.peer_up("n3")
    assert lm.leader == "n2" and lm.up == {"n3"}
    lm.set_members(["n1", "n2", "n3", "n4"])
    assert lm.leader == "n1" and lm.up == {"n1", "n3"}
    lm.set_members(["n1", "n3", "n4"])  # n2 (this node) removed: no leader here
    assert lm.leader is None and not lm.is_leader


def test_a_learner_asks_one_member_at_a_time() -> None:
    """A joiner far behind gets a snapshot per request: it asks one member per interval, in turn,
    not every member at once."""
    from aether.consensus.messages import CatchupReq

    e = Engine("n4", ["n1", "n2", "n3"], KVStateMachine(), learner=True)
    for p in ("n1", "n2", "n3"):
        e.peer_up(p, 0.0)
    e.take_actions()
    asked = []
    for k in range(1, 7):
        e.tick(k * 0.25)
        asked += [a.to for a in e.take_actions() if isinstance(a, Send) and isinstance(a.msg, CatchupReq)]
    assert len(asked) == 6 and set(asked) == {"n1", "n2", "n3"}


def test_only_members_answers_count_towards_a_restarted_replica_being_synced() -> None:
    from aether.consensus.messages import CatchupReply

    e = Engine("n1", ["n1", "n2", "n3"], KVStateMachine())
    assert not e.synced
    e.receive("n9", CatchupReply(0, []), 0.0)  # a learner or a removed node: not a member
    assert not e.synced
    e.receive("n2", CatchupReply(0, []), 0.0)
    assert e.synced
