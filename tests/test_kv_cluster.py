"""Three real nodes in one event loop: typed KV API, prefix watches in commit order, leader."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from aether.client import AetherClient
from aether.cluster.leader import LeaderChanged
from aether.consensus.messages import Batch, BatchId, Submit
from aether.consensus.storage import JournalError
from aether.core.errors import BadRequest, CommitTimeout, SessionConflict, TooLarge
from aether.kv.keys import BlueprintKey, BlueprintSlice, BlueprintValue, SliceStateValue
from aether.kv.machine import Command, Get, Put, Result, WatchEvent, encode_command
from aether.kv.protocol import ClientRequest, ClientResponse, ServerMessage
from aether.node.node import Node
from aether.transport import PeerDown, open_client_connection
from aether.transport.framing import DEFAULT_MAX_FRAME
from conftest import node_configs, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    ns = [Node(c) for c in node_configs(tmp_path, repository=str(tmp_path / "repo"))]
    started: list[Node] = []
    try:
        for n in ns:
            await n.start(management=False)
            started.append(n)
        await wait_until(lambda: all(n.transport.has_quorum() and n.leader.leader == "node-1" for n in ns))
        yield ns
    finally:
        for n in started:
            if n.transport._started and not n.transport._stopped:
                await n.stop()


async def test_typed_put_get_cas_remove(nodes: list[Node]) -> None:
    a, b, _ = nodes
    key = BlueprintKey("demo:0.1.0")
    value = BlueprintValue([BlueprintSlice("org.demo:place-order:0.1.0", 3)])
    rev = await a.kv.put(key, value)
    assert rev >= 1
    assert await b.kv.get(key) == value
    assert b.kv.get_local(key) == value
    assert not await b.kv.compare_and_set(key, BlueprintValue([]), value)
    assert await b.kv.compare_and_set(key, value, BlueprintValue([], source="api"))
    assert (await a.kv.get(key)).source == "api"
    assert await a.kv.remove(key)
    assert await b.kv.get(key) is None
    with pytest.raises(BadRequest, match="must be BlueprintValue"):
        await a.kv.put(key, SliceStateValue("ACTIVE", 0.0))
    with pytest.raises(BadRequest, match="unknown key family"):
        await a.kv.put("nope/x", b"1")


async def test_watches_see_same_events_in_same_order_on_every_node(nodes: list[Node]) -> None:
    # user/ keys: the slices/ family is acted on by the deployment managers every node runs
    seen: dict[str, list[tuple[str, str, int]]] = {n.node_id: [] for n in nodes}
    for n in nodes:
        n.kv.watch("user/w/", lambda ev, nid=n.node_id: seen[nid].append((ev.kind, ev.key, ev.revision)))
    other: list[WatchEvent] = []
    nodes[0].kv.watch("blueprints/", other.append)

    async def writer(node: Node, k: int) -> None:
        for i in range(15):
            key = f"user/w/{node.node_id}/s{i % 4}"
            if i % 5 == 4:
                await node.kv.remove(key)
            else:
                await node.kv.put(key, f"v{i}".encode())

    await asyncio.gather(*(writer(n, k) for k, n in enumerate(nodes)))
    await wait_until(lambda: len({len(v) for v in seen.values()}) == 1 and len(seen["node-1"]) > 0)
    first = seen["node-1"]
    assert seen["node-2"] == first and seen["node-3"] == first
    revisions = [r for _, _, r in first]
    assert revisions == sorted(revisions)
    assert {k for _, k, _ in first} >= {f"user/w/node-{i}/s0" for i in (1, 2, 3)}
    assert other == []  # prefix filtering


async def test_leader_is_first_sorted_live_node_and_changes_on_loss(nodes: list[Node]) -> None:
    events: list[LeaderChanged] = []
    nodes[1].bus.subscribe(LeaderChanged, events.append)
    assert all(n.leader.leader == "node-1" for n in nodes)
    assert nodes[0].leader.is_leader and not nodes[1].leader.is_leader
    await nodes[0].stop()
    await wait_until(lambda: nodes[1].leader.leader == "node-2" and nodes[2].leader.leader == "node-2")
    assert events and events[-1].leader == "node-2" and events[-1].is_self
    # writes keep committing with 2 of 3
    await nodes[1].kv.put("user/after-leader-loss", b"1")
    assert await nodes[2].kv.get("user/after-leader-loss") == b"1"


def _addresses(nodes: list[Node]) -> list[str]:
    return [f"127.0.0.1:{n.config.cluster_port}" for n in nodes]


async def test_clients_with_the_same_client_id_have_their_own_sessions(nodes: list[Node]) -> None:
    # lanes were "{client_id}.{n}" with seqs from 1: a second client (a restarted process) with
    # the same explicit client_id got the first one's cached results for different commands
    async with AetherClient(_addresses(nodes), client_id="app", prefer=0) as first:
        assert await first.compare_and_set("user/k", None, b"1")
        await first.put("user/other", b"x")
    async with AetherClient(_addresses(nodes), client_id="app", prefer=1) as again:
        assert not await again.compare_and_set("user/k", None, b"2")  # really evaluated: k exists
        assert await again.compare_and_set("user/k", b"1", b"2")
        assert await again.remove("user/other")
        assert await again.get("user/k") == b"2"
    # (node-3's replica may apply the removal a moment after a quorum decided it)
    await wait_until(lambda: nodes[2].kv.get_local("user/other") is None, what="the removal on node-3")


async def test_a_client_whose_session_was_evicted_resubmits_on_a_new_one(nodes: list[Node]) -> None:
    # The nodes write too (the map table's compare-and-sets), each in a session of its own, and
    # a node whose session was evicted adds two (the refused write's one-off and its next one):
    # in a table of three those made the new lane's session go between its seq 1 and seq 2 (a
    # CI run). With eight, evicting a session takes more new ones than the nodes can add.
    for n in nodes:
        n.sm.max_sessions = _TABLE
    async with AetherClient(_addresses(nodes), prefer=0) as c:
        await c.put("user/a", b"1")
        (lane,) = c._lanes
        # the lane opened its session with a read (seq 1): the write went as seq 2, which a store
        # that forgot the session refuses rather than runs again (the put returned once a quorum
        # decided it: a node may apply it a moment later, which a clean-clone run saw)
        assert lane.seq == 2
        await wait_until(
            lambda: all(n.sm.sessions.get(lane.id, (0,))[0] == 2 for n in nodes),
            what="seq 2 applied on every node",
        )
        await _evict(nodes, lane.id)
        assert await c.put("user/a", b"2") >= 1  # refused as an unknown session, then resubmitted
        assert [x.id for x in c._lanes] != [lane.id]
        assert await c.get("user/a") == b"2"


_TABLE = 8


async def _evict(nodes: list[Node], session: str) -> None:
    async with AetherClient(_addresses(nodes), prefer=1) as other:
        for i in range(_TABLE):  # as many new sessions as the table holds
            await other._request(encode_command(Get("user/a"), f"evictor-{i}", 1))
    await wait_until(lambda: all(session not in n.sm.sessions for n in nodes))


async def test_a_client_refused_for_its_session_raises_session_conflict(nodes: list[Node]) -> None:
    async with AetherClient(_addresses(nodes), prefer=0) as c:
        await c.put("user/a", b"1")
        c._lanes[0].seq -= 1  # a broken client reusing its last sequence number for another command
        with pytest.raises(SessionConflict, match="already used for a different command"):
            await c.put("user/a", b"2")
        assert await c.get("user/a") == b"1"


_cmd_decoder = msgspec.msgpack.Decoder(Command)


async def test_an_unknown_session_after_a_resend_is_an_unknown_outcome() -> None:
    # the first send may have been applied before the store forgot the session: never resubmit
    c = AetherClient(["127.0.0.1:1"])

    async def answer(command: bytes, sends: list[int] | None = None) -> Result:
        if sends is None:  # the lane's opening read (seq 1)
            assert _cmd_decoder.decode(command).seq == 1
            return Result(True, None, 7)
        sends[0] += 2  # sent, connection lost, sent again elsewhere
        return Result(False, None, 7, "unknown session: client 'x' seq 2 does not continue a known session")

    c._request = answer  # type: ignore[method-assign]
    with pytest.raises(CommitTimeout, match="outcome unknown"):
        await c.put("user/a", b"1")
    assert c._lanes == []  # the lane is not reused


async def test_status_names_the_node_and_its_failed_journal(nodes: list[Node]) -> None:
    """`status()`: the store's view (members, quorum, applied slot) with the node's own figures, and
    the journal's error once it failed."""
    n = nodes[0]
    st = n.status()
    assert [m.id for m in st.nodes] == ["node-1", "node-2", "node-3"] and st.quorum
    assert (st.node_id, st.leader, st.store, st.journal_error) == ("node-1", "node-1", "rabia", None)
    assert n.runner is not None and st.applied_slot == n.runner.engine.applied
    assert (st.pid, st.cluster_port) == (os.getpid(), n.transport.port)
    assert n.store is not None
    n.store._failed = JournalError("append failed: disk full")
    try:
        assert n.status().journal_error == "append failed: disk full"
    finally:
        n.store._failed = None


def _peer_downs(nodes: list[Node]) -> list[PeerDown]:
    downs: list[PeerDown] = []
    for n in nodes:
        n.bus.subscribe(PeerDown, downs.append)
    return downs


async def test_a_client_value_over_the_store_limit_is_refused_before_it_is_sent(nodes: list[Node]) -> None:
    # Before: a 17 MiB put went out as a frame over the node's max_frame; every node closed the
    # client's connection in turn and the put ended in a timeout after the client's deadline.
    downs = _peer_downs(nodes)
    async with AetherClient(_addresses(nodes), timeout=5.0) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for op in (
            client.put("user/big", b"x" * (17 << 20)),
            client.compare_and_set("user/big", None, b"x" * (2 << 20)),
        ):
            with pytest.raises(
                TooLarge, match=r"is .* bytes; the store's limit is 1048576 bytes per value"
            ) as err:
                await op
            assert err.value.status == 413
        assert loop.time() - started < 1.0
        assert await client.put("user/small", b"ok") >= 1
    assert not downs


async def test_a_command_too_large_for_a_message_between_nodes_is_refused_by_the_node(
    nodes: list[Node],
) -> None:
    # A command that fits the client's frame but not a Submit between nodes (a client not using
    # AetherClient's check). Before: the node queued it; its Submit and Proposal exceeded max_frame,
    # so the peers closed the links (or the transport dropped them), the request timed out and the
    # batch stayed at the head of the node's queue.
    downs = _peer_downs(nodes)
    probe = len(encode_command(Put("user/big", b"x" * 70_000))) - 70_000
    command = encode_command(Put("user/big", b"x" * (DEFAULT_MAX_FRAME - 16 - probe)))
    assert len(msgspec.msgpack.encode(ClientRequest(1, command))) <= DEFAULT_MAX_FRAME
    submit = Submit(Batch(BatchId("node-1", 1, 1), 1, [command]))
    assert len(msgspec.msgpack.encode(submit)) > DEFAULT_MAX_FRAME
    answers: list[ClientResponse] = []
    link = await open_client_connection(
        nodes[0].transport.members["node-1"], cluster_name="aether", client_id="raw",
        message_type=ServerMessage, on_message=answers.append, on_close=lambda *_: None,
    )  # fmt: skip
    try:
        link.send(ClientRequest(1, command))
        await wait_until(lambda: bool(answers), timeout=10.0, what="the answer")
    finally:
        link.close()
    assert answers[0].kind == "bad_request", answers
    assert "larger than 4194304 bytes" in (answers[0].error or "")
    assert "max_batch_bytes" in (answers[0].error or "")
    async with AetherClient(_addresses(nodes), timeout=5.0) as client:
        assert await client.put("user/after", b"ok") >= 1
    assert not downs
    assert all(n.transport.oversized_refused == 0 for n in nodes)
