"""Unit tests of aether.invoke with fakes: an in-memory network of Invoker + InvokeServer pairs.

`FakeNet` delivers messages with `loop.call_soon` (so ordering and concurrency look like the real
transport), can mark nodes down (publishing `PeerDown` on every other node's bus), make `send`
fail for a node while it still looks up, or black-hole a node (sends succeed, nothing arrives).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest

from aether.core.calls import RetryPolicy
from aether.core.errors import AetherError, BadRequest
from aether.invoke import (
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_DEADLINE,
    KIND_NO_INSTANCE,
    KIND_OVERLOADED,
    KIND_SHUTTING_DOWN,
    KIND_UNKNOWN_ENTRY,
    InvokeBadRequest,
    InvokeError,
    InvokeMessage,
    Invoker,
    InvokerClosed,
    InvokeRequest,
    InvokeResponse,
    InvokeServer,
    InvokeTimeout,
    SliceAppError,
    UnknownEntryError,
    classify,
)
from aether.invoke.errors import PoisonRequest, error_text
from aether.invoke.messages import KIND_INTERRUPTED, kind_status
from aether.slices.errors import Conflict, InstanceOverloaded, NotFound, SliceHttpError
from aether.transport import EventBus, PeerDown, message_types

pytestmark = pytest.mark.timeout(30)

ART = "org.demo:echo:1.0.0"
TARGET = "org.demo:echo"
OTHER = "org.demo:other:1.0.0"

VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar("test_request_id", default=None)


# ---------------------------------------------------------------------------------------------
# fakes


class NoLocalInstance(Exception):
    """A stand-in for the slices package's error: classified by the kind it declares."""

    wire_kind = "no_instance"


class Interrupted(Exception):
    """A stand-in for `WorkerLostMidCall`: the call was cut short where it ran."""

    wire_kind = "interrupted"


class UnknownEntry(Exception):
    """A stand-in for the slices package's error: classified by the kind it declares."""

    wire_kind = "unknown_entry"


class Ep(NamedTuple):
    artifact: str
    method: str
    instance: int
    node_id: str
    state: str = "ACTIVE"


def matches(target: str, artifact: str) -> bool:
    return artifact == target or artifact.startswith(target + ":")


class FakeRegistry:
    def __init__(self) -> None:
        self.eps: list[Ep] = []

    def add(self, node: str, method: str = "echo", artifact: str = ART, instance: int = 0) -> None:
        self.eps.append(Ep(artifact, method, instance, node))

    def instances(self, target: str, method: str) -> list[Ep]:
        return [e for e in self.eps if e.method == method and matches(target, e.artifact)]


Handler = Callable[[str, bytes], Awaitable[bytes]]


class FakeSlices:
    """Slices of one node: `active` artifacts; handlers per method get (node_id, payload)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.active: set[str] = set()
        self.handlers: dict[str, Handler] = {"echo": self._echo}
        self.calls: list[tuple[str, str, bytes, str | None]] = []  # (artifact, method, payload, request id)
        self.bad_local_instances = False  # claim an instance but raise NoLocalInstance on call
        self.room = True  # what has_room answers: False = every local instance is at its limit

    async def _echo(self, node: str, payload: bytes) -> bytes:
        await asyncio.sleep(0)
        return node.encode() + b":" + payload

    def has_room(self, target: str, method: str) -> bool:
        return self.room and bool(self.local_instances(target))

    def local_instances(self, target: str) -> list[int]:
        if self.bad_local_instances:
            return [0]
        return [0] if any(matches(target, a) for a in self.active) else []

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        self.calls.append((artifact, method, payload, VAR.get()))
        if not any(matches(artifact, a) for a in self.active):
            raise NoLocalInstance(f"no ACTIVE instance of {artifact} on {self.node_id}")
        handler = self.handlers.get(method)
        if handler is None:
            raise UnknownEntry(f"{artifact} has no entry {method!r}")
        return await handler(self.node_id, payload)


class FakeLink:
    def __init__(self, net: FakeNet, node_id: str) -> None:
        self.net = net
        self.node_id = node_id

    @property
    def up_peers(self) -> frozenset[str]:
        return frozenset(n for n in self.net.nodes if n != self.node_id and n not in self.net.down)

    def send(self, peer: str, msg: object) -> bool:
        assert type(msg) in (InvokeRequest, InvokeResponse)
        net = self.net
        if peer in net.down or peer in net.send_fails or self.node_id in net.down or peer not in net.nodes:
            return False
        net.sent.append((self.node_id, peer, msg))
        if peer in net.blackhole:
            return True
        asyncio.get_running_loop().call_soon(net.deliver, self.node_id, peer, msg)
        return True


@dataclass
class FakeNode:
    id: str
    slices: FakeSlices
    link: FakeLink
    bus: EventBus
    invoker: Invoker
    server: InvokeServer


@dataclass
class FakeNet:
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    send_fails: set[str] = field(default_factory=set)
    blackhole: set[str] = field(default_factory=set)
    sent: list[tuple[str, str, object]] = field(default_factory=list)

    def add(self, node_id: str, **invoker_kw: Any) -> FakeNode:
        slices = FakeSlices(node_id)
        link = FakeLink(self, node_id)
        bus = EventBus()
        kw: dict[str, Any] = {"request_id_var": VAR, "rng": random.Random(1), **invoker_kw}
        invoker = Invoker(node_id, slices, self.registry, link, bus=bus, **kw)
        server = InvokeServer(node_id, slices, link, invoker=invoker, request_id_var=VAR)
        node = FakeNode(node_id, slices, link, bus, invoker, server)
        self.nodes[node_id] = node
        return node

    def deliver(self, sender: str, peer: str, msg: object) -> None:
        if peer in self.down or sender in self.down:
            return  # lost with the link
        self.nodes[peer].server.dispatch(sender, msg)

    def kill(self, node_id: str) -> None:
        self.down.add(node_id)
        for other in self.nodes.values():
            if other.id != node_id:
                other.bus.publish(PeerDown(node_id, "test kill"))

    def requests_to(self, peer: str) -> list[InvokeRequest]:
        return [m for _, p, m in self.sent if p == peer and isinstance(m, InvokeRequest)]


def served_by(result: bytes) -> str:
    return result.split(b":", 1)[0].decode()


def make_net(*ids: str, active_on: tuple[str, ...] = (), **invoker_kw: Any) -> FakeNet:
    net = FakeNet()
    for i in ids:
        net.add(i, **invoker_kw)
    for i in active_on:
        net.nodes[i].slices.active.add(ART)
        net.registry.add(i)
    return net


# ---------------------------------------------------------------------------------------------
# messages and helpers


def test_messages_fit_the_transport_union() -> None:
    assert message_types(InvokeMessage) == (InvokeRequest, InvokeResponse)
    import msgspec

    req = InvokeRequest(7, ART, "echo", b"\x00x", "rid", 1500)
    raw = msgspec.msgpack.encode(req)
    assert msgspec.msgpack.decode(raw, type=InvokeMessage) == req
    resp = InvokeResponse(7, None, "boom", KIND_APP_ERROR)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(resp), type=InvokeMessage) == resp
    assert 40 <= InvokeRequest.__struct_config__.tag < 50  # type: ignore[operator]
    assert 40 <= InvokeResponse.__struct_config__.tag < 50  # type: ignore[operator]


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(3)
    for r, base in [(0, 0.005), (1, 0.010), (2, 0.020), (3, 0.040), (6, 0.2), (50, 0.2)]:
        for _ in range(50):
            d = RetryPolicy(backoff_min=0.005, backoff_max=0.2).backoff(r, rng)
            assert base / 2 <= d <= base + 1e-12


def test_classify_by_declared_kind() -> None:
    assert classify(NoLocalInstance("x")) == KIND_NO_INSTANCE
    assert classify(UnknownEntry("x")) == KIND_UNKNOWN_ENTRY
    assert classify(BadRequest("x")) == KIND_BAD_REQUEST
    assert classify(ValueError("x")) == KIND_APP_ERROR
    # a nested call's failure escaping an entry is that entry's own failure
    assert classify(InvokeBadRequest("x", kind=KIND_BAD_REQUEST)) == KIND_APP_ERROR
    assert classify(InvokerClosed("x")) == KIND_INTERRUPTED  # the entry ran: it may have partly run
    assert classify(NotFound("no order ORD-1")) == "status:404"
    assert classify(Conflict("not enough stock")) == "status:409"
    assert classify(SliceHttpError("gone", status=410)) == "status:410"
    # a nested call that answered with a status keeps it when it escapes the calling entry
    nested = SliceAppError("x answered 409: not enough stock", kind="status:409")
    nested.status, nested.detail = 409, "not enough stock"
    assert classify(nested) == "status:409"
    assert error_text(nested, "status:409") == "not enough stock"
    assert kind_status("status:404") == 404 and kind_status("status:99") is None
    assert kind_status("app_error") is None and kind_status("status:x") is None
    with pytest.raises(ValueError, match="400-599"):
        SliceHttpError("x", status=200)
    assert issubclass(InvokeTimeout, AetherError)
    assert issubclass(InvokeBadRequest, BadRequest)


# ---------------------------------------------------------------------------------------------
# choosing instances


async def test_local_instance_first() -> None:
    net = make_net("A", "B", "C", active_on=("A", "B", "C"))
    a = net.nodes["A"]
    for i in range(10):
        assert await a.invoker.invoke(TARGET, "echo", b"%d" % i) == b"A:%d" % i
    assert net.sent == []
    assert a.invoker.stats.local_attempts == 10 and a.invoker.stats.remote_attempts == 0
    assert not net.nodes["B"].slices.calls and not net.nodes["C"].slices.calls


async def test_a_local_instance_at_its_limit_sends_calls_elsewhere_first() -> None:
    net = make_net("A", "B", "C", active_on=("A", "B", "C"))
    a = net.nodes["A"]
    a.slices.room = False  # every slot of A's instance is busy: a call would queue there
    served = [served_by(await a.invoker.invoke(TARGET, "echo", b"x")) for _ in range(4)]
    assert served == ["B", "C", "B", "C"] and not a.slices.calls
    # every other node fails (overloaded): the local queue is the last resort
    for n in ("B", "C"):
        net.nodes[n].slices.handlers["echo"] = _raise_overloaded
    assert served_by(await a.invoker.invoke(TARGET, "echo", b"x")) == "A"


async def test_round_robin_across_three_remote_instances() -> None:
    net = make_net("A", "B", "C", "D", active_on=("B", "C", "D"))
    a = net.nodes["A"]
    served = [served_by(await a.invoker.invoke(TARGET, "echo", b"x")) for _ in range(12)]
    assert sorted(set(served)) == ["B", "C", "D"]
    for k in range(0, 12, 3):  # every window of three is one full rotation
        assert sorted(served[k : k + 3]) == ["B", "C", "D"]
    assert served[:3] == served[3:6]
    assert a.invoker.stats.retries == 0
    # remote requests carry the full coordinates from the registry
    assert {r.target for r in net.requests_to("B")} == {ART}


async def test_round_robin_is_per_target_and_method() -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"))
    for n in ("B", "C"):
        net.registry.add(n, method="echo2")
        net.nodes[n].slices.handlers["echo2"] = net.nodes[n].slices._echo
    a = net.nodes["A"]
    first = served_by(await a.invoker.invoke(TARGET, "echo", b""))
    assert served_by(await a.invoker.invoke(TARGET, "echo2", b"")) == first  # own rotation
    assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) != first


async def test_registry_entry_on_self_that_is_not_local_is_skipped() -> None:
    net = make_net("A", "B", active_on=("B",))
    net.registry.add("A")  # stale: A is listed but has no ACTIVE local instance
    a = net.nodes["A"]
    for _ in range(5):
        assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "B"
    assert a.invoker.stats.local_attempts == 0 and a.invoker.stats.retries == 0


async def test_down_nodes_are_skipped() -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"))
    net.down.add("B")
    a = net.nodes["A"]
    for _ in range(6):
        assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "C"
    assert net.requests_to("B") == []
    assert a.invoker.stats.retries == 0


# ---------------------------------------------------------------------------------------------
# retries and failover


async def test_failover_when_a_node_answers_no_instance() -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"))
    net.nodes["B"].slices.active.clear()  # registry still lists B (being deactivated)
    a = net.nodes["A"]
    for _ in range(6):
        assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "C"
    assert net.requests_to("B")  # it was tried ...
    assert a.invoker.stats.failed == 0 and a.invoker.stats.retries >= 1  # ... and failed over


async def test_failover_when_send_fails() -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"))
    net.send_fails.add("B")  # looks up, but the send is dropped
    a = net.nodes["A"]
    for _ in range(6):
        assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "C"
    assert a.invoker.stats.retries >= 1


@pytest.mark.parametrize("kind", [KIND_OVERLOADED, KIND_SHUTTING_DOWN])
async def test_retryable_kinds_fail_over(kind: str) -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"))
    if kind == KIND_SHUTTING_DOWN:
        await net.nodes["B"].server.stop()
    else:
        net.nodes["B"].server._max_in_flight = 1

        async def slow(node: str, payload: bytes) -> bytes:
            await asyncio.sleep(0.3)
            return b"B:slow"

        net.nodes["B"].slices.handlers["echo"] = slow
        net.nodes["B"].server.on_request("C", InvokeRequest(999, ART, "echo", b"", "busy", 5000))
    a = net.nodes["A"]
    for _ in range(4):
        assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "C"
    assert net.requests_to("B")
    assert net.nodes["B"].server.rejected >= 1


async def _raise_overloaded(node: str, payload: bytes) -> bytes:
    raise InstanceOverloaded(f"instance on {node} is at its limit")


async def test_every_candidate_overloaded_fails_fast_with_503_and_retry_after() -> None:
    """Issue 15: a full queue everywhere answers 503 + Retry-After at once, not after the deadline."""
    from aether.core.problem import problem_for, problem_headers
    from aether.invoke import InvokeOverloaded

    net = make_net("A", "B", "C", active_on=("A", "B", "C"))
    for n in net.nodes.values():
        n.slices.handlers["echo"] = _raise_overloaded
    a = net.nodes["A"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(InvokeOverloaded) as info:
        await a.invoker.invoke(TARGET, "echo", b"", request_id="rid-9", timeout=5.0)
    assert loop.time() - t0 < 1.0
    err = info.value
    assert err.attempts == 3 and err.kind == KIND_OVERLOADED and "every instance" in str(err)
    assert problem_for(err).status == 503 and problem_headers(err) == {"Retry-After": "1"}
    assert classify(err) == "status:503"  # escaping an entry: its caller gets 503, not a retry
    # one instance with room: the call fails over to it
    net.nodes["C"].slices.handlers["echo"] = net.nodes["C"].slices._echo
    assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "C"


async def test_local_no_instance_race_falls_back_to_remote() -> None:
    net = make_net("A", "B", active_on=("B",))
    net.nodes["A"].slices.bad_local_instances = True  # says ACTIVE, but the call finds none
    a = net.nodes["A"]
    assert served_by(await a.invoker.invoke(TARGET, "echo", b"")) == "B"
    assert a.invoker.stats.local_attempts == 1 and a.invoker.stats.remote_attempts == 1


async def test_keeps_retrying_while_no_instance_exists_then_succeeds() -> None:
    net = make_net("A", "B")
    a = net.nodes["A"]
    loop = asyncio.get_running_loop()

    def place() -> None:  # re-placed after 150 ms
        net.nodes["B"].slices.active.add(ART)
        net.registry.add("B")

    loop.call_later(0.15, place)
    t0 = loop.time()
    assert served_by(await a.invoker.invoke(TARGET, "echo", b"", timeout=3.0)) == "B"
    assert loop.time() - t0 >= 0.14
    assert a.invoker.stats.attempts == 1  # no attempts while nothing existed, only backoff


async def test_no_response_within_attempt_timeout_fails_over() -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"), attempt_timeout=0.1)
    net.blackhole.add("B")
    a = net.nodes["A"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = [served_by(await a.invoker.invoke(TARGET, "echo", b"")) for _ in range(3)]
    assert results == ["C", "C", "C"]
    assert loop.time() - t0 < 2.0
    assert a.invoker.pending_count == 0


async def test_pending_calls_on_a_node_that_goes_down_fail_over_at_once() -> None:
    # attempt_timeout is long: only the PeerDown handling can make this fast
    net = make_net("A", "B", "C", active_on=("B", "C"), attempt_timeout=5.0)
    net.blackhole.add("B")
    a = net.nodes["A"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    calls = [asyncio.create_task(a.invoker.invoke(TARGET, "echo", b"%d" % i)) for i in range(6)]
    await asyncio.sleep(0.05)
    assert a.invoker.pending_count >= 3  # half of them went to B and hang there
    net.kill("B")
    results = await asyncio.wait_for(asyncio.gather(*calls), 1.0)
    assert {served_by(r) for r in results} == {"C"}
    assert loop.time() - t0 < 1.0
    assert a.invoker.pending_count == 0


async def test_a_call_during_which_two_nodes_went_down_is_not_tried_on_a_third() -> None:
    """Poison-request protection: a call that (perhaps) brings down each node it runs on used to be
    replayed on every node in turn (a SystemExit in slice code took two nodes down, then quorum).
    After `max_nodes_lost` (2) nodes went down while running it, it fails instead."""
    net = make_net("A", "B", "C", "D", active_on=("B", "C", "D"), attempt_timeout=5.0)
    net.blackhole.update({"B", "C", "D"})  # whichever node runs it hangs ...
    a = net.nodes["A"]
    call = asyncio.create_task(a.invoker.invoke(TARGET, "echo", b"poison"))
    lost: list[str] = []
    for _ in range(2):  # ... and then goes down
        await wait_for(lambda: set(a.invoker._calls.peers()) - set(lost) != set())
        (node,) = set(a.invoker._calls.peers()) - set(lost)
        lost.append(node)
        net.kill(node)
    with pytest.raises(PoisonRequest, match="went down while running it") as err:
        await asyncio.wait_for(call, 2.0)
    assert all(n in str(err.value) for n in lost) and err.value.status == 502
    third = ({"B", "C", "D"} - set(lost)).pop()
    assert [m for _, peer, m in net.sent if peer == third] == []  # never sent to a third node


async def test_one_node_whose_heartbeat_flaps_is_not_two_nodes_lost() -> None:
    """`max_nodes_lost` counts distinct nodes: B, the only node with an instance, was reported down
    twice while the call ran there (a flapping heartbeat, not a call that brings nodes down). The
    call used to be poison after that one node (PoisonRequest, 502); it is tried on B again once B
    is back, and answers."""
    net = make_net("A", "B", active_on=("B",), attempt_timeout=5.0)
    net.blackhole.add("B")  # the attempts on B hang until B is reported down
    a = net.nodes["A"]
    call = asyncio.create_task(a.invoker.invoke(TARGET, "echo", b"x", timeout=10.0))
    for _ in range(2):
        await wait_for(lambda: "B" in a.invoker._calls.peers())
        net.kill("B")
        await wait_for(lambda: "B" not in a.invoker._calls.peers())
        net.down.discard("B")  # B is back (its heartbeat flapped)
    await wait_for(lambda: len(net.requests_to("B")) == 3)  # a third attempt, on B again
    assert not call.done()
    net.blackhole.discard("B")
    net.nodes["B"].server.dispatch("A", net.requests_to("B")[-1])  # B answers it
    assert served_by(await asyncio.wait_for(call, 2.0)) == "B"


async def test_two_interrupted_attempts_on_one_node_are_poison() -> None:
    """An attempt answered `interrupted` (the worker process running it died; the node is up) counts
    each time, also on the same node: a restarted worker is a new process, and a call that kills each
    worker it reaches stops after two (not retried until its deadline, killing the worker on every
    restart until the node's restart policy gives up on the slice)."""
    net = make_net("A", "B", active_on=("B",))
    killed: list[str] = []

    async def dies(node: str, payload: bytes) -> bytes:
        killed.append(node)
        raise Interrupted("the worker process running it died")

    net.nodes["B"].slices.handlers["echo"] = dies
    with pytest.raises(PoisonRequest, match="cut short 2 times") as err:
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"x")
    assert killed == ["B", "B"] and "B, B" in str(err.value)


# ---------------------------------------------------------------------------------------------
# non-retryable errors and deadlines


async def _raise_bad(node: str, payload: bytes) -> bytes:
    raise BadRequest("field 'qty' must be an int")


async def _raise_app(node: str, payload: bytes) -> bytes:
    raise ValueError("boom")


@pytest.mark.parametrize("where", ["remote", "local"])
@pytest.mark.parametrize(
    ("case", "exc_type", "kind", "text"),
    [
        ("bad", InvokeBadRequest, KIND_BAD_REQUEST, "field 'qty' must be an int"),
        ("unknown", UnknownEntryError, KIND_UNKNOWN_ENTRY, "no entry 'nope'"),
        ("app", SliceAppError, KIND_APP_ERROR, "ValueError: boom"),
    ],
)
async def test_non_retryable_errors_surface_immediately(
    where: str, case: str, exc_type: type[InvokeError], kind: str, text: str
) -> None:
    active = ("B", "C") if where == "remote" else ("A", "B", "C")
    net = make_net("A", "B", "C", active_on=active)
    for n in net.nodes.values():
        n.slices.handlers["bad"] = _raise_bad
        n.slices.handlers["app"] = _raise_app
        for m in ("bad", "app", "nope"):
            if n.id in active:
                net.registry.add(n.id, method=m)
    method = {"bad": "bad", "unknown": "nope", "app": "app"}[case]
    a = net.nodes["A"]
    with pytest.raises(exc_type) as info:
        await a.invoker.invoke(TARGET, method, b"", request_id="rid-1")
    err = info.value
    assert err.kind == kind
    assert text in str(err) and method in str(err) and "rid-1" in str(err)
    assert err.attempts == 1 and a.invoker.stats.retries == 0
    if where == "remote":
        assert err.node == "B" and len(net.requests_to("C")) == 0
    else:
        assert err.node == "A" and net.sent == []


async def _raise_conflict(node: str, payload: bytes) -> bytes:
    raise Conflict("only 1 of PROD-1 left")


@pytest.mark.parametrize("where", ["remote", "local"])
async def test_status_errors_surface_with_status_and_bare_message(where: str) -> None:
    active = ("B",) if where == "remote" else ("A",)
    net = make_net("A", "B", active_on=active)
    for n in net.nodes.values():
        n.slices.handlers["reserve"] = _raise_conflict
        if n.id in active:
            net.registry.add(n.id, method="reserve")
    with pytest.raises(SliceAppError) as info:
        await net.nodes["A"].invoker.invoke(TARGET, "reserve", b"")
    err = info.value
    assert err.status == 409 and err.kind == "status:409"
    assert err.detail == "only 1 of PROD-1 left"
    assert err.attempts == 1


async def test_server_deadline_is_not_retried() -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"), attempt_timeout=None)

    async def slow(node: str, payload: bytes) -> bytes:
        await asyncio.sleep(5)
        return b""

    for n in ("B", "C"):
        net.nodes[n].slices.handlers["echo"] = slow
    with pytest.raises(InvokeTimeout) as info:
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"", timeout=0.2)
    assert info.value.attempts == 1
    assert TARGET in str(info.value) or ART in str(info.value)
    assert len(net.requests_to("C")) == 0


async def test_deadline_raises_invoke_timeout_naming_the_call() -> None:
    net = make_net("A", "B")  # nothing ACTIVE anywhere
    a = net.nodes["A"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(InvokeTimeout) as info:
        await a.invoker.invoke(TARGET, "echo", b"", timeout=0.25, request_id="r-42")
    elapsed = loop.time() - t0
    assert 0.24 <= elapsed < 1.0
    msg = str(info.value)
    assert TARGET in msg and "echo" in msg and "0 attempt" in msg and "r-42" in msg
    assert "no ACTIVE instance" in msg
    assert isinstance(info.value, AetherError)
    # typed, not found in the text: the HTTP router and the management API answer 503
    assert info.value.kind == KIND_NO_INSTANCE and info.value.status == 503


async def test_deadline_after_no_instance_replies_is_a_503_by_kind() -> None:
    net = make_net("A", "B", active_on=("B",))
    net.nodes["A"].slices.bad_local_instances = True  # says ACTIVE, but the call finds none
    net.nodes["B"].slices.bad_local_instances = True
    net.nodes["B"].slices.active.clear()  # B claims it too, and answers no_instance
    with pytest.raises(InvokeTimeout) as info:
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"", timeout=0.3)
    assert info.value.attempts >= 1
    assert info.value.kind == KIND_NO_INSTANCE and info.value.status == 503


async def test_deadline_names_attempts_and_last_error() -> None:
    net = make_net("A", "B", active_on=("B",), attempt_timeout=0.05)
    net.blackhole.add("B")
    with pytest.raises(InvokeTimeout) as info:
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"", timeout=0.3)
    msg = str(info.value)
    assert info.value.attempts >= 2 and f"{info.value.attempts} attempt" in msg
    assert "no response within" in msg and "B" in msg
    assert net.nodes["A"].invoker.pending_count == 0
    assert info.value.kind != KIND_NO_INSTANCE and info.value.status == 504


async def test_local_call_deadline() -> None:
    net = make_net("A", active_on=("A",))

    async def slow(node: str, payload: bytes) -> bytes:
        await asyncio.sleep(5)
        return b""

    net.nodes["A"].slices.handlers["echo"] = slow
    with pytest.raises(InvokeTimeout):
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"", timeout=0.1)


async def test_a_far_local_deadline_is_kept_by_the_sweep() -> None:
    """A local attempt with a limit >= 1 s away has no timer of its own: the sweep cancels it once
    its limit passed (InvokeTimeout, at most a sweep period late), a caller that goes away still
    cancels it (CancelledError, not a timeout), and the sweep stops once nothing is watched."""
    net = make_net("A", active_on=("A",))
    inv = net.nodes["A"].invoker
    started: list[float] = []

    async def slow(node: str, payload: bytes) -> bytes:
        started.append(asyncio.get_running_loop().time())
        await asyncio.sleep(30)
        return b""

    net.nodes["A"].slices.handlers["echo"] = slow
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(InvokeTimeout, match="timed out running on this node"):
        await inv.invoke(TARGET, "echo", b"", timeout=1.2)
    assert 1.2 <= loop.time() - t0 < 1.6
    assert len(inv._deadlines) == 0
    # the caller goes away: its cancellation is not taken for the deadline
    call = asyncio.ensure_future(inv.invoke(TARGET, "echo", b"", timeout=5))
    await asyncio.sleep(0.05)
    assert len(inv._deadlines) == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert len(inv._deadlines) == 0
    await asyncio.sleep(0.05)
    assert inv._deadlines._handle is None  # not armed while no local attempt runs
    # a fast call with a far deadline answers as before
    net.nodes["A"].slices.handlers["echo"] = net.nodes["A"].slices._echo
    assert await inv.invoke(TARGET, "echo", b"x", timeout=5) == b"A:x"


async def test_timeout_error_raised_by_the_slice_is_an_app_error() -> None:
    net = make_net("A", "B", active_on=("A", "B"))

    async def own_timeout(node: str, payload: bytes) -> bytes:
        raise TimeoutError("backend did not answer")

    for n in ("A", "B"):
        net.nodes[n].slices.handlers["echo"] = own_timeout
    with pytest.raises(SliceAppError, match="TimeoutError: backend did not answer"):
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"")
    net.nodes["A"].slices.active.clear()
    with pytest.raises(SliceAppError, match="TimeoutError: backend did not answer"):
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"")


# ---------------------------------------------------------------------------------------------
# request ids


@pytest.mark.parametrize("where", ["remote", "local"])
async def test_request_id_propagates_into_the_contextvar(where: str) -> None:
    net = make_net("A", "B", active_on=("B",) if where == "remote" else ("A",))
    a = net.nodes["A"]
    calls = (net.nodes["B"] if where == "remote" else a).slices.calls
    # explicit
    await a.invoker.invoke(TARGET, "echo", b"", request_id="explicit-1")
    assert calls[-1][3] == "explicit-1"
    # from the caller's context
    token = VAR.set("from-context")
    try:
        await a.invoker.invoke(TARGET, "echo", b"")
    finally:
        VAR.reset(token)
    assert calls[-1][3] == "from-context"
    # generated
    await a.invoker.invoke(TARGET, "echo", b"")
    rid = calls[-1][3]
    assert isinstance(rid, str) and len(rid) == 16 and int(rid, 16) >= 0
    if where == "remote":
        assert [r.request_id for r in net.requests_to("B")] == ["explicit-1", "from-context", rid]
    assert VAR.get() is None  # the caller's context is left as it was


async def test_default_request_id_var_is_the_one_in_core() -> None:
    from aether.core.context import current_request_id as var

    seen: list[str | None] = []

    class Slices(FakeSlices):
        async def call(
            self, artifact: str, method: str, payload: bytes, *, instance: int | None = None
        ) -> bytes:
            seen.append(var.get())
            return b"ok"

    reg = FakeRegistry()
    reg.add("B")
    net = FakeNet(registry=reg)
    link_a, link_b = FakeLink(net, "A"), FakeLink(net, "B")
    inv_a = Invoker("A", FakeSlices("A"), reg, link_a)  # no request_id_var: aether.core's
    srv_a = InvokeServer("A", FakeSlices("A"), link_a, invoker=inv_a)
    srv_b = InvokeServer("B", Slices("B"), link_b)
    assert inv_a._request_id_var() is var and srv_b._request_id_var() is var
    for nid, srv in (("A", srv_a), ("B", srv_b)):
        net.nodes[nid] = FakeNode(nid, FakeSlices(nid), FakeLink(net, nid), EventBus(), inv_a, srv)
    token = var.set("ctx-rid")
    try:
        assert await inv_a.invoke(TARGET, "echo", b"") == b"ok"
    finally:
        var.reset(token)
    assert seen == ["ctx-rid"]


async def test_invoke_works_without_the_slices_contextvar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aether.slices.api", None)  # import fails
    net = FakeNet()
    net.registry.add("B")
    for nid in ("A", "B"):
        slices = FakeSlices(nid)
        link = FakeLink(net, nid)
        inv = Invoker(nid, slices, net.registry, link)
        srv = InvokeServer(nid, slices, link, invoker=inv)
        net.nodes[nid] = FakeNode(nid, slices, link, EventBus(), inv, srv)
    net.nodes["B"].slices.active.add(ART)
    assert await net.nodes["A"].invoker.invoke(TARGET, "echo", b"x") == b"B:x"
    assert len(net.requests_to("B")[0].request_id) == 16


async def test_retry_is_logged_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    net = make_net("A", "B", "C", active_on=("B", "C"))
    net.nodes["B"].slices.active.clear()
    a = net.nodes["A"]
    with caplog.at_level(logging.DEBUG, logger="aether.invoke"):
        for i in range(6):
            await a.invoker.invoke(TARGET, "echo", b"", request_id=f"trace-{i}")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
    assert len(warnings) == 1  # rate limited
    assert "trace-0" in warnings[0].getMessage() and "no_instance" in warnings[0].getMessage()
    attempts = [
        r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "attempt" in r.getMessage()
    ]
    assert any("trace-3" in m and TARGET in m and "echo" in m and " on C" in m for m in attempts)


# ---------------------------------------------------------------------------------------------
# invoker plumbing


async def test_close_fails_pending_calls_and_rejects_new_ones() -> None:
    net = make_net("A", "B", active_on=("B",))
    net.blackhole.add("B")
    a = net.nodes["A"]
    call = asyncio.create_task(a.invoker.invoke(TARGET, "echo", b""))
    await asyncio.sleep(0.02)
    a.invoker.close()
    with pytest.raises(InvokerClosed):
        await call
    with pytest.raises(InvokerClosed):
        await a.invoker.invoke(TARGET, "echo", b"")
    assert a.invoker.pending_count == 0
    net.kill("B")  # the bus subscription is gone: nothing happens


async def test_response_from_another_node_is_ignored() -> None:
    net = make_net("A", "B", "C", active_on=("B",), attempt_timeout=0.2)
    net.blackhole.add("B")
    a = net.nodes["A"]
    call = asyncio.create_task(a.invoker.invoke(TARGET, "echo", b"", timeout=0.5))
    await asyncio.sleep(0.02)
    (req,) = net.requests_to("B")
    a.server.dispatch("C", InvokeResponse(req.id, b"forged", None, None))
    a.server.dispatch("B", InvokeResponse(req.id + 1000, b"stray", None, None))
    await asyncio.sleep(0.02)
    assert not call.done()
    a.server.dispatch("B", InvokeResponse(req.id, b"real", None, None))
    assert await call == b"real"


async def test_cancelled_call_cleans_up() -> None:
    net = make_net("A", "B", active_on=("B",))
    net.blackhole.add("B")
    a = net.nodes["A"]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await a.invoker.invoke(TARGET, "echo", b"")
    assert a.invoker.pending_count == 0


async def test_invalid_settings_are_rejected() -> None:
    net = FakeNet()
    link = FakeLink(net, "A")
    with pytest.raises(ValueError):
        Invoker("A", FakeSlices("A"), net.registry, link, default_timeout=0)
    with pytest.raises(ValueError):
        Invoker("A", FakeSlices("A"), net.registry, link, attempt_timeout=0)
    with pytest.raises(ValueError):
        Invoker("A", FakeSlices("A"), net.registry, link, backoff_min=0.5, backoff_max=0.1)
    with pytest.raises(ValueError):
        InvokeServer("A", FakeSlices("A"), link, max_in_flight=0)


# ---------------------------------------------------------------------------------------------
# server


class Capture:
    def __init__(self) -> None:
        self.out: list[tuple[str, InvokeResponse]] = []
        self.up = True

    def send(self, peer: str, msg: object) -> bool:
        assert isinstance(msg, InvokeResponse)
        if not self.up:
            return False
        self.out.append((peer, msg))
        return True

    def by_id(self) -> dict[int, InvokeResponse]:
        return {m.id: m for _, m in self.out}


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


def blocking_slices(gate: asyncio.Event) -> FakeSlices:
    slices = FakeSlices("S")
    slices.active.add(ART)

    async def wait_gate(node: str, payload: bytes) -> bytes:
        await gate.wait()
        return b"done"

    slices.handlers["echo"] = wait_gate
    return slices


async def test_server_maps_outcomes_to_kinds(caplog: pytest.LogCaptureFixture) -> None:
    slices = FakeSlices("S")
    slices.active.add(ART)
    slices.handlers["bad"] = _raise_bad
    slices.handlers["app"] = _raise_app
    cap = Capture()
    srv = InvokeServer("S", slices, cap, request_id_var=VAR)
    with caplog.at_level(logging.ERROR, logger="aether.invoke"):
        srv.on_request("X", InvokeRequest(1, ART, "echo", b"hi", "r1", 1000))
        srv.on_request("X", InvokeRequest(2, ART, "bad", b"", "r2", 1000))
        srv.on_request("X", InvokeRequest(3, ART, "nope", b"", "r3", 1000))
        srv.on_request("X", InvokeRequest(4, ART, "app", b"", "r4", 1000))
        srv.on_request("X", InvokeRequest(5, OTHER, "echo", b"", "r5", 1000))
        srv.on_request("X", InvokeRequest(6, ART, "echo", b"", "r6", 0))
        await wait_for(lambda: len(cap.out) == 6)
    r = cap.by_id()
    assert r[1] == InvokeResponse(1, b"S:hi", None, None)
    assert (r[2].kind, r[2].error) == (KIND_BAD_REQUEST, "field 'qty' must be an int")
    assert r[3].kind == KIND_UNKNOWN_ENTRY
    assert (r[4].kind, r[4].error) == (KIND_APP_ERROR, "ValueError: boom")
    assert r[5].kind == KIND_NO_INSTANCE
    assert r[6].kind == KIND_DEADLINE
    assert all(peer == "X" for peer, _ in cap.out)
    (rec,) = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert "r4" in rec.getMessage() and rec.exc_info is not None and rec.exc_info[0] is ValueError
    assert [c[3] for c in slices.calls] == ["r1", "r2", "r3", "r4", "r5"]  # contextvar set per request


async def test_server_enforces_timeout_ms() -> None:
    gate = asyncio.Event()
    cap = Capture()
    srv = InvokeServer("S", blocking_slices(gate), cap)
    srv.on_request("X", InvokeRequest(1, ART, "echo", b"", "r1", 50))
    await wait_for(lambda: len(cap.out) == 1)
    assert cap.out[0][1].kind == KIND_DEADLINE
    await wait_for(lambda: srv.in_flight == 0)  # the task ends just after it replied


async def test_server_deadline_cancels_only_the_late_request() -> None:
    # a short time limit expires while a long one keeps running: the late request is answered
    # "deadline", the other one normally, and nothing is left behind
    gate = asyncio.Event()
    cap = Capture()
    srv = InvokeServer("S", blocking_slices(gate), cap)
    srv.on_request("X", InvokeRequest(1, ART, "echo", b"", "r1", 5000))
    srv.on_request("X", InvokeRequest(2, ART, "echo", b"", "r2", 30))
    await wait_for(lambda: len(cap.out) == 1)
    assert cap.out[0][1].id == 2 and cap.out[0][1].kind == KIND_DEADLINE
    assert "did not finish within 0.03s on S" in (cap.out[0][1].error or "")
    gate.set()
    await wait_for(lambda: len(cap.out) == 2)
    assert cap.by_id()[1].payload == b"done"
    await wait_for(lambda: srv.in_flight == 0)
    assert not srv._expired


async def test_server_bounds_concurrency() -> None:
    gate = asyncio.Event()
    cap = Capture()
    srv = InvokeServer("S", blocking_slices(gate), cap, max_in_flight=3)
    for i in range(5):
        srv.on_request("X", InvokeRequest(i, ART, "echo", b"", f"r{i}", 5000))
    assert srv.in_flight == 3
    assert [(m.id, m.kind) for _, m in cap.out] == [(3, KIND_OVERLOADED), (4, KIND_OVERLOADED)]
    gate.set()
    await wait_for(lambda: len(cap.out) == 5)
    assert {m.id: m.payload for _, m in cap.out if m.kind is None} == {0: b"done", 1: b"done", 2: b"done"}


async def test_server_stop_waits_for_in_flight_and_rejects_new() -> None:
    gate = asyncio.Event()
    cap = Capture()
    srv = InvokeServer("S", blocking_slices(gate), cap)
    srv.on_request("X", InvokeRequest(1, ART, "echo", b"", "r1", 5000))
    stopping = asyncio.create_task(srv.stop(grace=5.0))
    await asyncio.sleep(0.02)
    assert not stopping.done()
    srv.on_request("X", InvokeRequest(2, ART, "echo", b"", "r2", 5000))
    assert cap.by_id()[2].kind == KIND_SHUTTING_DOWN
    gate.set()
    await asyncio.wait_for(stopping, 1.0)
    assert cap.by_id()[1].payload == b"done"


async def test_server_stop_grace_cancels_and_answers_interrupted() -> None:
    # the cancelled call may have partly run: kind interrupted (retried only if idempotent)
    cap = Capture()
    srv = InvokeServer("S", blocking_slices(asyncio.Event()), cap)
    srv.on_request("X", InvokeRequest(1, ART, "echo", b"", "r1", 5000))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(srv.stop(grace=0.05), 2.0)
    assert cap.by_id()[1].kind == KIND_INTERRUPTED
    await wait_for(lambda: srv.in_flight == 0)


async def test_server_non_bytes_result_is_an_app_error() -> None:
    slices = FakeSlices("S")
    slices.active.add(ART)

    async def wrong(node: str, payload: bytes) -> Any:
        return "not bytes"

    slices.handlers["echo"] = wrong
    cap = Capture()
    srv = InvokeServer("S", slices, cap)
    srv.on_request("X", InvokeRequest(1, ART, "echo", b"", "r1", 1000))
    await wait_for(lambda: len(cap.out) == 1)
    assert cap.out[0][1].kind == KIND_APP_ERROR


async def test_dispatch_routes_messages() -> None:
    net = make_net("A", "B", active_on=("B",))
    b = net.nodes["B"]
    cap = Capture()
    srv = InvokeServer("B", b.slices, cap)  # no invoker: responses are dropped quietly
    srv.dispatch("A", InvokeResponse(1, b"", None, None))
    srv.dispatch("A", "garbage")
    srv.dispatch("A", InvokeRequest(1, ART, "echo", b"q", "r", 1000))
    await wait_for(lambda: len(cap.out) == 1)
    assert cap.out[0] == ("A", InvokeResponse(1, b"B:q", None, None))


# ---------------------------------------------------------------------------------------------
# against the real slices package (skipped while it does not exist)


async def test_fits_the_real_slices_package() -> None:
    api = pytest.importorskip("aether.slices.api")
    errors = pytest.importorskip("aether.slices.errors")
    net = make_net("A", "B", active_on=("B",))
    inv = Invoker("A", net.nodes["A"].slices, net.registry, net.nodes["A"].link)
    assert isinstance(inv, api.SliceCaller)
    assert inv._request_id_var() is api.current_request_id
    assert classify(errors.NoLocalInstance("x")) == KIND_NO_INSTANCE
    assert classify(errors.UnknownEntry("x")) == KIND_UNKNOWN_ENTRY
    assert classify(errors.EntryBadRequest("x", entry="E.f")) == KIND_BAD_REQUEST
    assert classify(errors.ResponseEncodeError("x")) == KIND_APP_ERROR
    # the real contextvar is set on the server side and flows from the caller's context
    seen: list[str | None] = []

    async def record(node: str, payload: bytes) -> bytes:
        seen.append(api.current_request_id.get())
        return b"ok"

    b_slices = net.nodes["B"].slices
    b_slices.handlers["echo"] = record
    net.nodes["B"].server = InvokeServer("B", b_slices, net.nodes["B"].link)
    net.nodes["A"].server = InvokeServer("A", net.nodes["A"].slices, net.nodes["A"].link, invoker=inv)
    token = api.current_request_id.set("outer-rid")
    try:
        assert await inv.invoke(TARGET, "echo", b"") == b"ok"
    finally:
        api.current_request_id.reset(token)
    assert seen == ["outer-rid"]


async def test_a_restarted_caller_never_takes_an_answer_meant_for_its_previous_process() -> None:
    """B holds the answer to a call of A's previous process (A died while B ran it, so B's link to
    A was down) and sends it once its link to the restarted A is up. Seen before: call ids started
    at 1 in every process, so the restarted A's call with the same id took that answer: the result
    of another call (another payload, maybe another entry), while its own answer was dropped."""
    net = make_net("A", "B", active_on=("B",))
    release = {b"old": asyncio.Event(), b"new": asyncio.Event()}

    async def held(node: str, payload: bytes) -> bytes:
        await release[payload].wait()
        return node.encode() + b":" + payload

    net.nodes["B"].slices.handlers["echo"] = held
    old = asyncio.create_task(net.nodes["A"].invoker.invoke(TARGET, "echo", b"old", timeout=5.0))
    await wait_for(lambda: net.nodes["B"].server.in_flight == 1)
    net.kill("A")  # A's process dies while B runs its call
    old.cancel()
    await asyncio.gather(old, return_exceptions=True)
    release[b"old"].set()
    await wait_for(lambda: net.nodes["B"].server.in_flight == 0)  # answered, held: no link to A

    # A starts again (a new process: a new invoker), and reaches B before B's link to it is up
    net.down.discard("A")
    net.send_fails.add("A")
    a = net.add("A")
    new = asyncio.create_task(a.invoker.invoke(TARGET, "echo", b"new", timeout=5.0))
    await wait_for(lambda: net.nodes["B"].server.in_flight == 1)
    net.send_fails.discard("A")
    net.nodes["B"].server.peer_up("A")  # B's link to A is up: the held answer goes out
    await asyncio.sleep(0.01)
    assert not new.done(), f"the new call took the old call's answer: {new.result()!r}"
    release[b"new"].set()
    assert await new == b"B:new"


async def test_a_response_whose_link_is_not_up_yet_is_sent_when_it_comes_up() -> None:
    """Links are one per direction: a peer that restarted reaches us (its link) before our link to
    it is up again. Its request ran, and the response used to be dropped, so the caller waited its
    whole deadline (a 504 seen right after `aether cluster restart`). Now it is held and sent on
    `peer_up`, for `hold_for` seconds."""
    slices = FakeSlices("S")
    slices.active.add(ART)
    cap = Capture()
    cap.up = False
    now = [0.0]
    srv = InvokeServer("S", slices, cap, hold_for=10.0, max_held=2, clock=lambda: now[0])
    srv.on_request("X", InvokeRequest(1, ART, "echo", b"a", "r1", 1000))
    srv.on_request("X", InvokeRequest(2, ART, "echo", b"b", "r2", 1000))
    srv.on_request("Y", InvokeRequest(3, ART, "echo", b"c", "r3", 1000))
    await wait_for(lambda: srv.served == 3)
    assert cap.out == []
    cap.up = True
    srv.peer_up("X")
    assert [(p, m.id, m.payload) for p, m in cap.out] == [("X", 1, b"S:a"), ("X", 2, b"S:b")]
    srv.peer_up("X")  # sent once
    assert len(cap.out) == 2
    now[0] = 11.0  # Y's response waited longer than hold_for: the caller gave up on it
    srv.peer_up("Y")
    assert len(cap.out) == 2 and srv.held_dropped == 1
    cap.up = False  # at most max_held per peer, the oldest go first
    for i in range(4, 7):
        srv.on_request("Z", InvokeRequest(i, ART, "echo", b"", f"r{i}", 1000))
    await wait_for(lambda: srv.served == 6)
    cap.up = True
    srv.peer_up("Z")
    assert [m.id for p, m in cap.out if p == "Z"] == [5, 6] and srv.held_dropped == 2


def test_oversized_says_exactly_whether_a_message_exceeds_the_frame_limit() -> None:
    """The invoker and the invoke server refuse a message the peer's transport would close the link
    on (`max_frame`); the check must agree with the frame the transport writes, byte for byte."""
    from aether.invoke.messages import oversized
    from aether.transport.messages import WireCodec

    codec = WireCodec(message_types(InvokeMessage))
    limit = 4096
    for n in range(limit - 300, limit + 2):
        msgs: list[InvokeRequest | InvokeResponse] = [
            InvokeRequest(2**47 + n, ART, "echo", b"p" * n, "r" * 16, 1000, "~" + "k" * 32, "t" * 55, "é"),
            InvokeResponse(2**47 + n, b"p" * n, None, None),
            InvokeResponse(n, None, "é" * (n // 2), KIND_APP_ERROR),
        ]
        for msg in msgs:
            size = len(codec.frame(msg)) - 4
            assert oversized(msg, limit) == (size if size > limit else None), (n, type(msg).__name__)


async def test_held_responses_of_a_peer_that_never_comes_back_are_dropped_after_hold_for() -> None:
    """Held responses were only looked at when their peer's link came up again: for a caller that
    never comes back (it crashed, or was replaced by a node of another id) up to `max_held`
    responses, payloads and all, stayed in memory for good, although a response is held for
    `hold_for` seconds at most (docs/invocation.md, *Server behaviour*)."""
    slices = FakeSlices("S")
    slices.active.add(ART)
    cap = Capture()
    cap.up = False
    srv = InvokeServer("S", slices, cap, hold_for=0.05)
    for i in range(3):
        srv.on_request("gone", InvokeRequest(i, ART, "echo", b"x" * 1000, f"r{i}", 1000))
    await wait_for(lambda: srv.served == 3)
    assert sum(len(q) for q in srv._held.values()) == 3
    await wait_for(lambda: not srv._held, timeout=2.0)
    assert srv.held_dropped == 3
    srv.on_request("back", InvokeRequest(9, ART, "echo", b"", "r9", 1000))  # holding starts again
    await wait_for(lambda: srv.served == 4)
    cap.up = True
    srv.peer_up("back")
    assert [m.id for _, m in cap.out] == [9]
    await srv.stop()
