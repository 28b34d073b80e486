"""Entry policies, indeterminate outcomes, idempotency keys and the circuit breaker (issue 17).

Sans-IO parts (`EntryPolicy`, `CircuitBreaker`, key derivation, `@entry` keywords, the blueprint's
``entries`` tables, policy resolution) are tested directly; the invoker's behaviour on the in-memory
network of tests/test_invoke.py (`FakeNet`: Invoker + InvokeServer pairs, nodes killed with
`PeerDown`), with endpoints that carry the policy their node publishes.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import msgspec
import pytest

from aether.core.context import (
    check_idempotency_key,
    child_idempotency_key,
    current_idempotency_key,
    derive_idempotency_key,
    enter_call,
    exit_call,
    idempotency_key_given,
)
from aether.core.policy import DEFAULT_POLICY, EntryPolicy
from aether.core.problem import problem_for
from aether.deploy.blueprint import any_artifact, expand, no_dependencies, parse_blueprint
from aether.deploy.errors import BlueprintError
from aether.deploy.node_manager import UnknownEntryPolicy, effective_policies
from aether.invoke import (
    KIND_INDETERMINATE,
    CircuitBreaker,
    IndeterminateOutcome,
    InvokeBadRequest,
    InvokerClosed,
    InvokeRequest,
    InvokeTimeout,
)
from aether.invoke.breaker import CLOSED, HALF_OPEN, OPEN
from aether.kv.keys import EndpointValue
from aether.slices import Slice, SliceDefinitionError, describe_slice, entry, route
from test_invoke import ART, OTHER, TARGET, FakeNet, served_by

pytestmark = pytest.mark.timeout(30)


# --- EntryPolicy ----------------------------------------------------------------------------------


def test_policy_layers_and_defaults() -> None:
    code = EntryPolicy(timeout=2.0, idempotent=False)
    override = EntryPolicy(retries=3, idempotent=True)
    assert override.over(code) == EntryPolicy(2.0, 3, True, None)
    assert DEFAULT_POLICY.over(code) == code
    assert DEFAULT_POLICY.is_idempotent and EntryPolicy(idempotent=True).is_idempotent
    assert not code.is_idempotent
    assert EntryPolicy(timeout=0, retries=-1, backoff=True).problems() == [  # type: ignore[arg-type]
        "timeout must be a number of seconds > 0, got 0",
        "retries must be an integer >= 0, got -1",
        "backoff must be a number of seconds > 0, got True",
    ]
    assert code.describe() == "not idempotent, timeout 2s" and DEFAULT_POLICY.describe() == "defaults"


def test_endpoint_values_without_a_policy_still_decode() -> None:
    class OldEndpointValue(msgspec.Struct, frozen=True):  # what nodes before issue 17 wrote
        node_id: str
        state: str

    old = msgspec.msgpack.encode(OldEndpointValue("node-1", "ACTIVE"))
    assert msgspec.msgpack.decode(old, type=EndpointValue) == EndpointValue("node-1", "ACTIVE", None)
    new = EndpointValue("node-1", "ACTIVE", EntryPolicy(idempotent=False))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=EndpointValue) == new
    # and an old node decodes a new value (unknown fields are ignored)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=OldEndpointValue).node_id == "node-1"


def test_invoke_requests_of_older_senders_decode_with_an_empty_key() -> None:
    class OldRequest(msgspec.Struct, array_like=True, frozen=True, tag=40):
        id: int
        target: str
        method: str
        payload: bytes
        request_id: str
        timeout_ms: int

    raw = msgspec.msgpack.encode(OldRequest(1, ART, "echo", b"", "r", 100))
    assert msgspec.msgpack.decode(raw, type=InvokeRequest).idempotency_key == ""


# --- policies declared in code -----------------------------------------------------------------------


class Shop(Slice):
    @entry
    async def bare(self) -> str:
        return "x"

    @entry(idempotent=False, timeout=2.5, retries=1, backoff=0.01)
    async def charge(self, amount: int) -> str:
        return "charged"

    @route("POST", "/pay", idempotent=False)
    async def pay(self) -> str:
        return "paid"

    @route("GET", "/a", timeout=1.0)
    @route("GET", "/b", retries=2)
    async def both(self) -> str:
        return "both"


def test_entry_and_route_keywords_are_the_entry_policy() -> None:
    info = describe_slice(Shop)
    assert info.entries["bare"].policy == DEFAULT_POLICY
    assert info.entries["charge"].policy == EntryPolicy(2.5, 1, False, 0.01)
    assert info.entries["pay"].policy == EntryPolicy(idempotent=False)
    assert info.entries["both"].policy == EntryPolicy(timeout=1.0, retries=2)


def test_bad_policy_keywords_fail_the_definition() -> None:
    with pytest.raises(SliceDefinitionError, match=r"@entry: retries must be an integer >= 0, got -2"):
        entry(retries=-2)
    with pytest.raises(SliceDefinitionError, match=r"@route\('GET', '/x'\): timeout must be a number"):
        route("GET", "/x", timeout=0)
    with pytest.raises(SliceDefinitionError, match="idempotent is declared twice"):

        class Twice(Slice):
            @route("GET", "/x", idempotent=True)
            @entry(idempotent=False)
            async def f(self) -> str:
                return ""


# --- overridden in the blueprint ---------------------------------------------------------------------

BP = """id = "shop:1"
[slices.shop]
artifact = "org.shop:shop:1.0.0"
[slices.shop.entries.charge]
idempotent = true
retries = 5
[slices.shop.entries.bare]
timeout = 0.5
"""


def test_blueprint_entries_override_the_code() -> None:
    bp = parse_blueprint(BP, "bp.toml")
    stored = expand(bp, no_dependencies, any_artifact).slices[0]
    assert stored.entries == {"charge": EntryPolicy(retries=5, idempotent=True), "bare": EntryPolicy(0.5)}
    eff = effective_policies("org.shop:shop:1.0.0", describe_slice(Shop), stored.entries)
    assert eff["charge"] == EntryPolicy(2.5, 5, True, 0.01)  # blueprint fields win, the rest is code's
    assert eff["bare"] == EntryPolicy(timeout=0.5)
    assert eff["pay"] == EntryPolicy(idempotent=False)
    with pytest.raises(
        UnknownEntryPolicy,
        match=r"'refund' \(\[slices.NAME.entries.refund\]\), which is "
        r"not an entry of org.shop:shop:1.0.0; its entries: bare, both, charge, pay",
    ):
        effective_policies("org.shop:shop:1.0.0", describe_slice(Shop), {"refund": EntryPolicy(retries=1)})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            "[slices.shop.entries.charge]\nretry = 1\n",
            r"^bp.toml:5: unknown key 'retry' in \[slices.shop.entries.charge\]; allowed keys: timeout, "
            r"retries, idempotent, backoff$",
        ),
        (
            '[slices.shop.entries.charge]\ntimeout = "2s"\n',
            r"^bp.toml:5: timeout in \[slices.shop.entries.charge\] must be a number of seconds > 0",
        ),
        (
            "[slices.shop.entries.charge]\nidempotent = 1\n",
            r"^bp.toml:5: idempotent in \[slices.shop.entries.charge\] must be true or false, got 1$",
        ),
        (
            "[slices.shop.entries._x]\nretries = 1\n",
            r"^bp.toml:4: \[slices.shop.entries._x\]: '_x' is not an entry name",
        ),
        ("[slices.shop]\nentries = 3\n", r"entries in \[slices.shop\] must be tables"),
    ],
)
def test_bad_entries_tables_name_file_line_and_key(table: str, message: str) -> None:
    text = 'id = "shop:1"\n[slices.shop]\nartifact = "org.shop:shop:1.0.0"\n' + table
    if table.startswith("[slices.shop]\n"):
        slice_table = '[slices.shop]\nartifact = "a.b:c:1.0.0"\n'
        text = 'id = "shop:1"\n' + table.replace("[slices.shop]\n", slice_table)
    with pytest.raises(BlueprintError, match=message):
        parse_blueprint(text, "bp.toml")


# --- the circuit breaker (sans-IO) ------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_a_success_resets() -> None:
    b = CircuitBreaker(threshold=3, cool_down=10.0)
    k = ("B", ART)
    b.failure(k, 0.0)
    b.failure(k, 0.1)
    b.success(k, 0.2)  # resets the count
    b.failure(k, 0.3)
    b.failure(k, 0.4)
    assert b.state(k, 0.4) == CLOSED and b.allows(k, 0.4)
    b.failure(k, 0.5)
    assert b.state(k, 0.5) == OPEN and not b.allows(k, 0.5) and not b.allows(k, 10.4)
    assert b.opened == 1 and b.open_keys() == [k]
    assert b.allows(("C", ART), 0.5)  # per key


def test_breaker_half_opens_after_the_cool_down_with_one_probe() -> None:
    b = CircuitBreaker(threshold=1, cool_down=10.0)
    k = ("B", ART)
    b.failure(k, 0.0)
    assert b.allows(k, 10.0)  # cooled down: a probe may go
    b.started(k, 10.0)
    assert b.state(k, 10.0) == HALF_OPEN and not b.allows(k, 10.5)  # only one probe
    b.failure(k, 11.0)  # the probe failed: open again, for another cool-down
    assert b.state(k, 11.0) == OPEN and not b.allows(k, 20.9) and b.allows(k, 21.0)
    b.started(k, 21.0)
    b.success(k, 21.5)  # the probe succeeded: closed
    assert b.state(k, 21.5) == CLOSED and b.allows(k, 21.5) and b.open_keys() == []
    # a probe whose answer never came is given up after a cool-down: another may go
    b.failure(k, 30.0)
    b.started(k, 40.0)
    assert not b.allows(k, 49.9) and b.allows(k, 50.0)


def test_breaker_is_bounded() -> None:
    b = CircuitBreaker(threshold=2, cool_down=1.0, max_keys=10)
    b.failure("open", 0.0)
    b.failure("open", 0.0)
    for i in range(50):
        b.failure(i, 0.0)
    assert len(b._circuits) <= 10 and b.state("open", 0.0) == OPEN  # closed ones go first
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)


# --- idempotency keys ----------------------------------------------------------------------------------


def test_child_keys_are_derived_from_the_parent_key_and_position() -> None:
    assert child_idempotency_key(TARGET, "echo") is None  # not serving a call: the invoker makes one

    def children() -> list[str | None]:
        tokens = enter_call("rid", "parent-key")
        try:
            return [
                child_idempotency_key(TARGET, "echo"),
                child_idempotency_key(TARGET, "other"),
                child_idempotency_key(TARGET, "echo"),
            ]
        finally:
            exit_call(tokens)

    first = children()
    assert first == [
        derive_idempotency_key("parent-key", TARGET, "echo", 0),
        derive_idempotency_key("parent-key", TARGET, "other", 0),
        derive_idempotency_key("parent-key", TARGET, "echo", 1),
    ]
    assert len(set(first)) == 3 and all(k is not None and len(k) == 32 for k in first)
    assert children() == first  # a retried parent (same key) makes the same child keys
    assert derive_idempotency_key("other-parent", TARGET, "echo", 0) != first[0]
    assert current_idempotency_key.get() is None  # exit_call restored the context


async def test_concurrent_children_started_in_order_get_positions_in_that_order() -> None:
    async def child() -> str | None:
        return child_idempotency_key(TARGET, "echo")

    async def parent() -> list[str | None]:
        enter_call(None, "p")
        return list(await asyncio.gather(child(), child(), child()))

    keys = await asyncio.create_task(parent())
    assert keys == [derive_idempotency_key("p", TARGET, "echo", n) for n in range(3)]


def test_key_validation() -> None:
    assert check_idempotency_key("2f1c0e6a-9b7d-4d6e-8f3a-1b2c3d4e5f60") is None
    assert check_idempotency_key("x" * 128) is None
    for bad in ("", "x" * 129, "has space", "new\nline", "é"):
        assert "must be 1-128 characters" in (check_idempotency_key(bad) or "")


# --- the invoker: policies from the registry ----------------------------------------------------------


class PEp(NamedTuple):
    artifact: str
    method: str
    instance: int
    node_id: str
    state: str = "ACTIVE"
    policy: EntryPolicy | None = None


class PolicyRegistry:
    """Endpoints with the policy their node published (like `EndpointInfo.policy`)."""

    def __init__(self) -> None:
        self.eps: list[PEp] = []

    def add(
        self,
        node: str,
        method: str = "echo",
        artifact: str = ART,
        instance: int = 0,
        policy: EntryPolicy | None = None,
    ) -> None:
        self.eps.append(PEp(artifact, method, instance, node, policy=policy))

    def instances(self, target: str, method: str) -> list[PEp]:
        return [
            e
            for e in self.eps
            if e.method == method and (e.artifact == target or e.artifact.startswith(target + ":"))
        ]


class Runs:
    """A handler that counts executions per node and records the idempotency key each one saw;
    on `hold` nodes it blocks until released (the node can be killed meanwhile)."""

    def __init__(self, hold: tuple[str, ...] = ()) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.hold = set(hold)
        self.release = asyncio.Event()

    async def __call__(self, node: str, payload: bytes) -> bytes:
        self.seen.append((node, current_idempotency_key.get()))
        if node in self.hold:
            await self.release.wait()
        return node.encode() + b":" + payload

    def on(self, node: str) -> int:
        return sum(1 for n, _ in self.seen if n == node)


def policy_net(
    policy: EntryPolicy | None, *, hold: tuple[str, ...] = ("B",), **kw: Any
) -> tuple[FakeNet, Runs]:
    """A (caller, no instance), B and C (instances of ART with `policy`); B's calls block."""
    net = FakeNet()
    net.registry = PolicyRegistry()  # type: ignore[assignment]
    runs = Runs(hold)
    for i in ("A", "B", "C"):
        node = net.add(i, **kw)
        node.slices.handlers["echo"] = runs
    for i in ("B", "C"):
        net.nodes[i].slices.active.add(ART)
        net.registry.add(i, policy=policy)
    return net, runs


async def until(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def test_a_non_idempotent_call_whose_node_goes_down_is_indeterminate_not_repeated() -> None:
    net, runs = policy_net(EntryPolicy(idempotent=False))
    a = net.nodes["A"].invoker
    call = asyncio.create_task(a.invoke(TARGET, "echo", b"pay", timeout=5.0))
    await until(lambda: runs.on("B") == 1)  # B runs it (and blocks)
    net.kill("B")
    with pytest.raises(IndeterminateOutcome) as e:
        await call
    assert runs.on("B") == 1 and runs.on("C") == 0  # not silently repeated elsewhere
    assert net.requests_to("C") == []
    err = e.value
    assert err.status == 502 and err.kind == KIND_INDETERMINATE and err.node == "B"
    problem = problem_for(err)
    assert problem.status == 502
    assert "may or may not have taken effect" in problem.detail and "Idempotency-Key" in problem.detail
    assert "went down while the call was pending" in problem.detail
    assert a.stats.indeterminate == 1 and a.stats.retries == 0


@pytest.mark.parametrize("key", [None, "order-7"])
async def test_an_indeterminate_outcome_advises_a_retry_only_with_a_key_the_client_can_send(
    key: str | None,
) -> None:
    """Found walking docs/slices.md: a client that sent no Idempotency-Key was told to "retry with
    the same Idempotency-Key header", while its call's key was made up by the runtime (`~...`),
    which no client can send: a retry is a new call."""
    net, _ = policy_net(EntryPolicy(idempotent=False))
    a = net.nodes["A"].invoker
    call = asyncio.create_task(a.invoke(TARGET, "echo", b"pay", timeout=5.0, idempotency_key=key))
    await until(lambda: bool(net.requests_to("B")) or bool(net.requests_to("C")))
    net.kill("B" if net.requests_to("B") else "C")
    with pytest.raises(IndeterminateOutcome) as e:
        await call
    detail = problem_for(e.value).detail
    if key is None:
        assert "this request carried no Idempotency-Key header, so a retry would be a new call" in detail
        assert "retry with the same Idempotency-Key header" not in detail
    else:
        assert "retry with the same Idempotency-Key header" in detail


async def test_the_same_call_to_an_idempotent_entry_is_retried_with_the_same_key() -> None:
    net, runs = policy_net(None)  # no policy published: the defaults (idempotent)
    a = net.nodes["A"].invoker
    call = asyncio.create_task(a.invoke(TARGET, "echo", b"pay", timeout=5.0))
    await until(lambda: runs.on("B") == 1)
    net.kill("B")
    assert served_by(await call) == "C"
    assert runs.on("B") == 1 and runs.on("C") == 1
    (b_key,), (c_key,) = ([k for n, k in runs.seen if n == node] for node in ("B", "C"))
    assert b_key is not None and b_key == c_key  # the slice sees one key on both attempts
    sent = [m for _, _, m in net.sent if isinstance(m, InvokeRequest)]
    assert [r.idempotency_key for r in sent] == [b_key, b_key]


async def test_an_explicit_key_reaches_the_slice_and_a_bad_one_is_refused() -> None:
    net, runs = policy_net(None, hold=())
    a = net.nodes["A"].invoker
    await a.invoke(TARGET, "echo", b"x", idempotency_key="order-42")
    assert runs.seen[-1][1] == "order-42"
    await a.invoke(TARGET, "echo", b"x")
    await a.invoke(TARGET, "echo", b"x")
    generated = [k for _, k in runs.seen[1:]]
    assert len(set(generated)) == 2  # one per call, made up by the invoker (and marked so)
    assert all(k and len(k) == 33 and not idempotency_key_given(k) for k in generated)
    with pytest.raises(InvokeBadRequest, match="idempotency key 'bad key' must be 1-128 characters"):
        await a.invoke(TARGET, "echo", b"x", idempotency_key="bad key")


async def test_a_local_call_sees_the_key_too() -> None:
    net, runs = policy_net(None, hold=())
    net.nodes["A"].slices.active.add(ART)
    net.registry.add("A")
    await net.nodes["A"].invoker.invoke(TARGET, "echo", b"x", idempotency_key="k-local")
    assert runs.seen == [("A", "k-local")]


async def test_a_nested_call_derives_its_key_from_the_call_being_served() -> None:
    net, runs = policy_net(None, hold=())
    b = net.nodes["B"]
    seen_child: list[str | None] = []

    async def parent(node: str, payload: bytes) -> bytes:
        # runs in the invoke server's task on B: the parent's key is set there
        seen_child.append(current_idempotency_key.get())
        return await b.invoker.invoke(TARGET, "echo", payload)

    for n in net.nodes.values():
        n.slices.handlers["parent"] = parent
    net.registry.add("B", method="parent")
    await net.nodes["A"].invoker.invoke(TARGET, "parent", b"x", idempotency_key="root")
    assert seen_child == ["root"]
    child_key = derive_idempotency_key("root", TARGET, "echo", 0)
    assert [k for _, k in runs.seen] == [child_key]


async def test_a_non_idempotent_attempt_timeout_is_indeterminate() -> None:
    net, runs = policy_net(EntryPolicy(idempotent=False, timeout=0.05))
    a = net.nodes["A"].invoker
    with pytest.raises(IndeterminateOutcome, match=r"no response within 0\.05s"):
        await a.invoke(TARGET, "echo", b"x", timeout=5.0)
    assert runs.on("C") == 0
    runs.release.set()


async def test_without_a_timeout_a_non_idempotent_attempt_waits_the_whole_deadline() -> None:
    # the invoker's per-attempt wait (50 ms here) is not applied: giving up early would only make
    # the outcome indeterminate
    net, runs = policy_net(EntryPolicy(idempotent=False), attempt_timeout=0.05)
    a = net.nodes["A"].invoker
    call = asyncio.create_task(a.invoke(TARGET, "echo", b"x", timeout=5.0))
    await until(lambda: runs.on("B") == 1)
    await asyncio.sleep(0.2)
    assert not call.done()
    runs.release.set()
    assert served_by(await call) == "B"


async def test_failures_that_did_not_reach_the_target_still_fail_over() -> None:
    net, runs = policy_net(EntryPolicy(idempotent=False), hold=())
    a = net.nodes["A"].invoker
    net.send_fails.add("B")  # refused before send
    assert {served_by(await a.invoke(TARGET, "echo", b"x")) for _ in range(4)} == {"C"}
    net.send_fails.clear()
    net.nodes["B"].slices.active.discard(ART)  # B answers no_instance: it did not run it
    assert {served_by(await a.invoke(TARGET, "echo", b"x")) for _ in range(4)} == {"C"}
    assert runs.on("B") == 0 and a.stats.indeterminate == 0


async def test_a_server_stopped_mid_call_is_indeterminate_for_a_non_idempotent_entry() -> None:
    net, runs = policy_net(EntryPolicy(idempotent=False))
    a = net.nodes["A"].invoker
    call = asyncio.create_task(a.invoke(TARGET, "echo", b"x", timeout=5.0))
    await until(lambda: runs.on("B") == 1)
    await net.nodes["B"].server.stop(grace=0.01)
    with pytest.raises(IndeterminateOutcome, match="stopped before the call finished"):
        await call
    assert runs.on("C") == 0


async def test_retries_are_bounded_by_the_policy() -> None:
    net, runs = policy_net(EntryPolicy(retries=0, timeout=0.05))
    gave_up = r"gave up after 1 attempt\(s\): the entry's policy allows 0 retries"
    with pytest.raises(InvokeTimeout, match=gave_up):
        await net.nodes["A"].invoker.invoke(TARGET, "echo", b"x", timeout=5.0)
    assert runs.on("C") == 0
    runs.release.set()
    net2, runs2 = policy_net(EntryPolicy(retries=1, timeout=0.05), hold=("B", "C"))
    with pytest.raises(InvokeTimeout, match=r"gave up after 2 attempt\(s\)"):
        await net2.nodes["A"].invoker.invoke(TARGET, "echo", b"x", timeout=5.0)
    assert runs2.on("B") == 1 and runs2.on("C") == 1
    runs2.release.set()


async def test_an_open_circuit_is_skipped_while_another_instance_exists() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cool_down=10.0)
    net, runs = policy_net(None, hold=(), breaker=breaker, clock=lambda: now[0])
    a = net.nodes["A"].invoker
    net.send_fails.add("B")
    for _ in range(4):  # B fails twice: its circuit opens
        assert served_by(await a.invoke(TARGET, "echo", b"x")) == "C"
    assert breaker.state(("B", ART), now[0]) == OPEN
    net.send_fails.clear()  # B is fine again, but its circuit is open: round robin skips it
    assert {served_by(await a.invoke(TARGET, "echo", b"x")) for _ in range(6)} == {"C"}
    assert runs.on("B") == 0 and a.stats.skipped_open > 0
    now[0] = 10.0  # cooled down: one probe goes to B, succeeds, and closes the circuit
    served = [served_by(await a.invoke(TARGET, "echo", b"x")) for _ in range(6)]
    assert "B" in served and breaker.state(("B", ART), now[0]) == CLOSED
    assert served.count("B") >= 2  # round robin again


def test_breaker_is_idle_until_something_fails() -> None:
    b = CircuitBreaker(threshold=2, cool_down=1.0)
    assert b.idle
    b.failure(("B", ART), 0.0)
    assert not b.idle  # one failure is tracked (the circuit is still closed)
    b.success(("B", ART), 0.1)
    assert b.idle


async def test_remote_calls_do_not_read_the_clock_while_the_breaker_is_idle() -> None:
    # the breaker's bookkeeping is skipped on the remote path while nothing failed (a clock read
    # and two set comprehensions per call); once something failed it is back, as before
    reads = [0]

    def clock() -> float:
        reads[0] += 1
        return 0.0

    breaker = CircuitBreaker(threshold=2, cool_down=10.0)
    net, _ = policy_net(None, hold=(), breaker=breaker, clock=clock)
    a = net.nodes["A"].invoker
    for _ in range(4):
        await a.invoke(TARGET, "echo", b"x")
    assert reads[0] == 0 and breaker.idle
    net.send_fails.add("B")
    for _ in range(2):
        await a.invoke(TARGET, "echo", b"x")
    assert reads[0] > 0 and not breaker.idle


async def test_an_open_circuit_never_fails_a_call_on_its_own() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cool_down=10.0)
    net, _ = policy_net(None, hold=(), breaker=breaker, clock=lambda: now[0])
    breaker.failure(("B", ART), 0.0)
    breaker.failure(("C", ART), 0.0)
    assert served_by(await net.nodes["A"].invoker.invoke(TARGET, "echo", b"x")) in ("B", "C")


async def test_app_errors_and_overload_do_not_open_a_circuit() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cool_down=10.0)
    net, _ = policy_net(None, hold=(), breaker=breaker, clock=lambda: now[0])

    async def boom(node: str, payload: bytes) -> bytes:
        raise ValueError("boom")

    for n in net.nodes.values():
        n.slices.handlers["echo"] = boom
    for _ in range(3):
        with pytest.raises(Exception, match="boom"):
            await net.nodes["A"].invoker.invoke(TARGET, "echo", b"x")
    assert breaker.open_keys() == []


async def test_an_indeterminate_nested_call_escaping_an_idempotent_entry_is_not_retried() -> None:
    """B's `parent` (idempotent) calls D's non-idempotent `echo`; D goes down mid-call. Retrying
    `parent` on C would repeat that call: A gets `IndeterminateOutcome` and `parent` ran once."""
    net, runs = policy_net(None, hold=("D",))
    net.add("D").slices.handlers["echo"] = runs
    net.nodes["D"].slices.active.add(OTHER)  # echo of another artifact, only on D
    net.registry.add("D", artifact=OTHER, policy=EntryPolicy(idempotent=False))
    parents: list[str] = []

    def parent_on(node: str) -> Any:
        async def parent(_node: str, payload: bytes) -> bytes:
            parents.append(node)
            return await net.nodes[node].invoker.invoke("org.demo:other", "echo", payload, timeout=5.0)

        return parent

    for node in ("B", "C"):  # ...and `parent` (idempotent) on B and C
        net.nodes[node].slices.handlers["parent"] = parent_on(node)
        net.registry.add(node, method="parent")
    call = asyncio.create_task(net.nodes["A"].invoker.invoke(TARGET, "parent", b"x", timeout=5.0))
    await until(lambda: runs.on("D") == 1)
    net.kill("D")
    with pytest.raises(IndeterminateOutcome) as e:
        await call
    assert len(parents) == 1 and runs.on("D") == 1
    assert e.value.kind == KIND_INDETERMINATE and e.value.status == 502
    assert str(e.value).count("may or may not have taken effect") == 1  # explained once


# A slice running in a worker process (isolation = "process") whose worker dies while it runs the
# call: the call may have partly run (`WorkerHost` fails it with `WorkerLostMidCall`, kind
# interrupted), so it is repeated only for an idempotent entry. Seen before: the worker's death was
# answered no_instance ("did not run here") and a non-idempotent call was run again elsewhere.


def _dies_mid_call(runs: Runs, on: str) -> Any:
    async def handler(node: str, payload: bytes) -> bytes:
        if node == on:
            runs.seen.append((node, current_idempotency_key.get()))
            raise _mid_call_error()
        return await runs(node, payload)

    return handler


def _mid_call_error() -> Exception:
    from aether.slices.workers import WorkerLostMidCall

    return WorkerLostMidCall("the worker process 4242 of org.example:art:1.0.0 on B exited before it "
                             "answered; the call may have partly run")


async def test_a_non_idempotent_call_whose_worker_dies_remotely_is_not_repeated() -> None:
    net, runs = policy_net(EntryPolicy(idempotent=False), hold=())
    for n in net.nodes.values():
        n.slices.handlers["echo"] = _dies_mid_call(runs, "B")
    a = net.nodes["A"].invoker
    calls = [asyncio.create_task(a.invoke(TARGET, "echo", b"pay", timeout=5.0)) for _ in range(4)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    on_b = [r for r in results if isinstance(r, IndeterminateOutcome)]
    assert on_b and all(r.node == "B" for r in on_b)  # B's calls end indeterminate
    assert runs.on("B") == len(on_b) and runs.on("C") == len(results) - len(on_b)  # none run twice


async def test_a_non_idempotent_local_call_whose_worker_dies_is_not_repeated() -> None:
    net, runs = policy_net(EntryPolicy(idempotent=False), hold=())
    net.nodes["A"].slices.active.add(ART)
    net.registry.eps = [e for e in net.registry.eps if e.node_id == "C"]
    net.registry.add("A", policy=EntryPolicy(idempotent=False))
    net.registry.add("C", instance=1, policy=EntryPolicy(idempotent=False))
    for n in net.nodes.values():
        n.slices.handlers["echo"] = _dies_mid_call(runs, "A")
    a = net.nodes["A"].invoker
    with pytest.raises(IndeterminateOutcome, match="may have partly run"):
        await a.invoke(TARGET, "echo", b"pay", timeout=5.0)
    assert runs.on("A") == 1 and runs.on("C") == 0


async def test_a_non_idempotent_local_call_its_dying_worker_never_began_is_retried() -> None:
    """The other half: a call still queued for the worker when it died (the worker never began it,
    docs/slices.md *Supervision*) fails with `WorkerLost`, kind no_instance: it did not run, so it
    goes to another instance also for an entry declared idempotent=False."""
    from aether.slices.workers import WorkerLost

    net, runs = policy_net(EntryPolicy(idempotent=False), hold=())
    net.nodes["A"].slices.active.add(ART)
    net.registry.eps = [e for e in net.registry.eps if e.node_id == "C"]
    net.registry.add("A", policy=EntryPolicy(idempotent=False))
    net.registry.add("C", instance=1, policy=EntryPolicy(idempotent=False))

    async def never_began(node: str, payload: bytes) -> bytes:
        if node == "A":
            raise WorkerLost("the worker process 4242 of org.example:art:1.0.0 on A exited before it "
                             "began the call; the call did not run")  # fmt: skip
        return await runs(node, payload)

    for n in net.nodes.values():
        n.slices.handlers["echo"] = never_began
    a = net.nodes["A"].invoker
    assert served_by(await a.invoke(TARGET, "echo", b"pay", timeout=5.0)) == "C"
    assert runs.on("C") == 1 and a.stats.indeterminate == 0


async def test_an_idempotent_local_call_whose_worker_dies_is_retried() -> None:
    net, runs = policy_net(None, hold=())
    net.nodes["A"].slices.active.add(ART)
    net.registry.add("A")
    for n in net.nodes.values():
        n.slices.handlers["echo"] = _dies_mid_call(runs, "A")
    a = net.nodes["A"].invoker
    assert served_by(await a.invoke(TARGET, "echo", b"x", timeout=5.0)) in ("B", "C")


async def test_a_non_idempotent_entry_whose_nested_call_finds_its_node_stopping_is_not_repeated() -> None:
    """An entry that ran, and whose nested call then raised `InvokerClosed` (its node is stopping),
    was answered shutting_down, a kind that says the entry was never reached: the caller ran it
    again elsewhere although it is not idempotent. It may have partly run, so it is now answered
    interrupted: retried only if the entry is idempotent."""

    def stopping_on_b(runs: Runs) -> Any:
        async def handler(node: str, payload: bytes) -> bytes:
            await runs(node, payload)  # the entry's first effects
            if node == "B":
                raise InvokerClosed("invoker of node B closed", kind=None)  # its nested call
            return node.encode() + b":" + payload

        return handler

    for policy, retried in ((EntryPolicy(idempotent=False), False), (None, True)):
        net, runs = policy_net(policy, hold=())
        for n in net.nodes.values():
            n.slices.handlers["echo"] = stopping_on_b(runs)
        a = net.nodes["A"].invoker
        results = await asyncio.gather(
            *(a.invoke(TARGET, "echo", b"pay", timeout=5.0) for _ in range(4)), return_exceptions=True
        )
        if retried:  # idempotent: B's calls fail over to C
            assert all(r == b"C:pay" for r in results), results
        else:
            on_b = [r for r in results if isinstance(r, IndeterminateOutcome)]
            assert on_b and all(r.node == "B" for r in on_b), results
            assert runs.on("C") == len(results) - len(on_b), "an entry that ran on B ran again on C"
