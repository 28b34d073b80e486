"""Traffic between the versions of a slice (issue 17): `aether.deploy.traffic.TrafficTable` (the cache
of the `rollouts/` weights) and the invoker's weighted version choice, with fakes (no network).

The node-manager side (routes across versions, draining order) is in tests/test_traffic_routes.py;
a run on real in-process nodes with two versions of one slice in tests/test_traffic_cluster.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import pytest

from aether.deploy.traffic import TrafficTable
from aether.invoke import Invoker, InvokeRequest, InvokeResponse, Traffic
from aether.kv.keys import RolloutValue
from aether.kv.machine import WatchEvent
from aether.kv.store import encode_value

pytestmark = pytest.mark.timeout(30)

NAME = "org.example:hello"
V1 = f"{NAME}:0.1.0"
V2 = f"{NAME}:0.2.0"


def rollout(weights: Mapping[str, int], artifact: str = NAME) -> RolloutValue:
    return RolloutValue(
        id="r1",
        artifact=artifact,
        old_version="0.1.0",
        new_version="0.2.0",
        strategy="canary",
        state="progressing",
        instances=2,
        old_instances=2,
        new_instances=1,
        weights=dict(weights),
    )


# --- TrafficTable -------------------------------------------------------------------------------------


class FakeKV:
    """The two reads a cache needs: `list_local` and `watch` (events delivered by `emit`)."""

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items
        self.watchers: list[tuple[str, Callable[[WatchEvent], None]]] = []

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, v) for k, v in self.items.items() if k.startswith(prefix))

    def watch(self, prefix: str, cb: Callable[[WatchEvent], None]) -> Callable[[], None]:
        entry = (prefix, cb)
        self.watchers.append(entry)
        return lambda: self.watchers.remove(entry)

    def emit(self, kind: str, key: str, value: Any = None) -> None:
        raw = None if value is None else (value if isinstance(value, bytes) else encode_value(key, value))
        for prefix, cb in list(self.watchers):
            if key.startswith(prefix) or kind == "reset":
                cb(WatchEvent(kind, key, raw, 1))


def test_traffic_table_follows_the_rollouts_keys() -> None:
    kv = FakeKV({f"rollouts/{NAME}": rollout({"0.1.0": 90, "0.2.0": 10})})
    table = TrafficTable(kv)  # type: ignore[arg-type]
    assert isinstance(table, Traffic)
    assert table.weights(NAME) == {}  # not started: nothing read yet
    table.start()
    table.start()  # idempotent: one watch
    assert len(kv.watchers) == 1
    assert table.weights(NAME) == {"0.1.0": 90, "0.2.0": 10}
    assert table.weights("org.example:other") == {} and table.weights(V1) == {}
    with pytest.raises(TypeError):
        table.weights(NAME)["0.1.0"] = 5  # type: ignore[index]  # read-only: callers cannot change it
    kv.emit("put", f"rollouts/{NAME}", rollout({"0.1.0": 50, "0.2.0": 50}))
    assert table.weights(NAME) == {"0.1.0": 50, "0.2.0": 50}
    kv.emit("put", "rollouts/org.example:other", rollout({}, "org.example:other"))  # no split
    assert table.weights("org.example:other") == {}
    kv.emit("put", "rollouts/org.example:bad", b"\x00not msgpack")  # bad value: ignored, no crash
    assert table.weights("org.example:bad") == {}
    kv.emit("remove", f"rollouts/{NAME}")
    assert table.weights(NAME) == {}
    kv.items = {f"rollouts/{NAME}": rollout({"0.2.0": 100})}
    kv.emit("reset", "")
    assert table.weights(NAME) == {"0.2.0": 100}
    assert table.split() == {NAME: {"0.2.0": 100}}
    table.close()
    assert kv.watchers == []
    kv.emit("remove", f"rollouts/{NAME}")  # no longer followed
    assert table.weights(NAME) == {"0.2.0": 100}


def test_traffic_table_ignores_negative_weights() -> None:
    kv = FakeKV({f"rollouts/{NAME}": rollout({"0.1.0": -5, "0.2.0": 10})})
    table = TrafficTable(kv)  # type: ignore[arg-type]
    table.start()
    assert table.weights(NAME) == {"0.2.0": 10}


# --- the invoker's weighted choice ----------------------------------------------------------------------


class Ep(NamedTuple):
    artifact: str
    method: str
    instance: int
    node_id: str
    state: str = "ACTIVE"


class Registry:
    def __init__(self, *eps: Ep) -> None:
        self.eps = list(eps)

    def instances(self, target: str, method: str) -> list[Ep]:
        return [
            e
            for e in self.eps
            if e.method == method and (e.artifact == target or e.artifact.startswith(target + ":"))
        ]


class Weights:
    def __init__(self, table: dict[str, dict[str, int]] | None = None) -> None:
        self.table = table or {}
        self.asked = 0

    def weights(self, group_artifact: str) -> Mapping[str, int]:
        self.asked += 1
        return self.table.get(group_artifact, {})


class NoLocal(Exception):
    wire_kind = "no_instance"


class Local:
    """This node's instances: coords -> accepting; `call` records the artifact it was given."""

    def __init__(self, *coords: str) -> None:
        self.active = dict.fromkeys(coords, True)
        self.calls: list[str] = []

    def _match(self, target: str) -> list[str]:
        return sorted(
            (c for c, ok in self.active.items() if ok and (c == target or c.startswith(target + ":"))),
            reverse=True,
        )

    def local_instances(self, target: str) -> list[int]:
        return [0] if self._match(target) else []

    def has_room(self, target: str, method: str) -> bool:
        return bool(self._match(target))

    async def call(self, artifact: str, method: str, payload: bytes, *, instance: int | None = None) -> bytes:
        self.calls.append(artifact)
        found = self._match(artifact)
        if not found:
            raise NoLocal(f"no instance of {artifact}")
        return found[0].encode()  # the version group:artifact resolves to here: the highest


class Link:
    """Remote nodes answer at once with the coordinates they were asked for, or with `fail[node]`."""

    def __init__(self, up: set[str]) -> None:
        self.up = up
        self.fail: dict[str, str] = {}  # node -> kind it answers
        self.sent: list[tuple[str, str]] = []  # (node, target)
        self.invoker: Invoker | None = None

    @property
    def up_peers(self) -> frozenset[str]:
        return frozenset(self.up)

    def send(self, peer: str, msg: object) -> bool:
        assert isinstance(msg, InvokeRequest)
        if peer not in self.up:
            return False
        self.sent.append((peer, msg.target))
        kind = self.fail.get(peer)
        answer = (
            InvokeResponse(msg.id, None, f"{peer} says {kind}", kind)
            if kind
            else InvokeResponse(msg.id, msg.target.encode(), None, None)
        )
        asyncio.get_running_loop().call_soon(self._deliver, peer, answer)
        return True

    def _deliver(self, peer: str, answer: InvokeResponse) -> None:
        assert self.invoker is not None
        self.invoker.on_response(peer, answer)


@dataclass
class Rig:
    invoker: Invoker
    link: Link
    local: Local
    weights: Weights

    async def calls(self, n: int, target: str = NAME) -> Counter[str]:
        got: Counter[str] = Counter()
        for _ in range(n):
            got[(await self.invoker.invoke(target, "greet", b"", timeout=2)).decode()] += 1
        return got


def rig(
    registry: Registry,
    local: Local | None = None,
    weights: dict[str, dict[str, int]] | None = None,
    up: set[str] | None = None,
    *,
    traffic: bool = True,
) -> Rig:
    link = Link(up if up is not None else {"B", "C", "D"})
    local = local or Local()
    w = Weights(weights)
    inv = Invoker(
        "A", local, registry, link, traffic=w if traffic else None, backoff_min=0.001, backoff_max=0.002,
        rng=random.Random(7),
    )
    link.invoker = inv
    return Rig(inv, link, local, w)


THREE = Registry(Ep(V1, "greet", 0, "B"), Ep(V1, "greet", 1, "C"), Ep(V2, "greet", 2, "D"))


async def test_weights_split_the_calls_exactly_and_evenly() -> None:
    r = rig(THREE, weights={NAME: {"0.1.0": 90, "0.2.0": 10}})
    got = await r.calls(1000)
    assert got == {V1: 900, V2: 100}  # exact, not "about 10 %"
    assert r.invoker.stats.failed == 0 and r.invoker.stats.retries == 0
    # spread evenly (no bursts): a deck of 9 + 1 cards, so every 10 calls have exactly one for the
    # new version, at a random place among them
    targets = [t for _, t in r.link.sent]
    assert all(targets[k : k + 10].count(V2) == 1 for k in range(0, 1000, 10))
    assert len({targets[k : k + 10].index(V2) for k in range(0, 1000, 10)}) == 10
    # within the old version, round robin over its instances as without weights
    nodes = Counter(node for node, t in r.link.sent if t == V1)
    assert nodes == {"B": 450, "C": 450}


async def test_a_clients_own_pattern_does_not_line_up_with_the_version_choice() -> None:
    # A client alternating two kinds of requests (here: even and odd calls) during a 50/50 canary
    # step. A fixed rotation of the versions (the smooth weighted round robin used before) sent
    # every even call to the old version and every odd one to the new: a new version failing
    # only the odd kind showed 0 failures on its share of the calls, and passed the step.
    r = rig(THREE, weights={NAME: {"0.1.0": 50, "0.2.0": 50}})
    assert await r.calls(400) == {V1: 200, V2: 200}  # still exact over every deck of 2
    targets = [t for _, t in r.link.sent]
    even = Counter(targets[0::2])
    odd = Counter(targets[1::2])
    # each kind reaches both versions about equally (binomial(200, 1/2): below 70 has p < 1e-5)
    assert min(even[V1], even[V2], odd[V1], odd[V2]) >= 70, (even, odd)


async def test_weights_change_takes_effect_on_the_next_call() -> None:
    r = rig(THREE, weights={NAME: {"0.1.0": 50, "0.2.0": 50}})
    assert await r.calls(100) == {V1: 50, V2: 50}
    r.weights.table[NAME] = {"0.2.0": 100}  # the old version unlisted: weight 0
    assert await r.calls(100) == {V2: 100}
    r.weights.table.pop(NAME)  # rollout done: no split, round robin over every endpoint
    got = await r.calls(99)
    assert got == {V1: 66, V2: 33}


async def test_a_weighted_version_without_an_active_instance_gets_no_calls_and_none_fail() -> None:
    old_only = Registry(Ep(V1, "greet", 0, "B"), Ep(V1, "greet", 1, "C"))
    r = rig(old_only, weights={NAME: {"0.1.0": 10, "0.2.0": 90}})
    assert await r.calls(200) == {V1: 200}
    # only the new version weighted, and it has no instance: the calls go to the others
    r.weights.table[NAME] = {"0.2.0": 100}
    assert await r.calls(200) == {V1: 200}
    # the new version's only instance is on a node that is down: not a candidate either
    r2 = rig(THREE, weights={NAME: {"0.2.0": 100}}, up={"B", "C"})
    assert await r2.calls(50) == {V1: 50}
    assert r.invoker.stats.failed == r2.invoker.stats.failed == 0
    assert r.invoker.stats.retries == r2.invoker.stats.retries == 0


async def test_a_failed_attempt_may_fail_over_to_any_version() -> None:
    r = rig(THREE, weights={NAME: {"0.2.0": 100}})
    r.link.fail["D"] = "shutting_down"  # the new version's instance is stopping
    assert await r.calls(20) == {V1: 20}
    assert r.invoker.stats.failed == 0 and r.invoker.stats.retries == 20
    assert [t for n, t in r.link.sent[:2]] == [V2, V1]  # weights first, then any version


async def test_full_coordinates_ignore_the_weights() -> None:
    r = rig(THREE, weights={NAME: {"0.1.0": 100}})
    assert await r.calls(10, V2) == {V2: 10}


async def test_local_calls_run_the_chosen_version() -> None:
    both_here = Registry(Ep(V1, "greet", 0, "A"), Ep(V2, "greet", 1, "A"))
    r = rig(both_here, Local(V1, V2), weights={NAME: {"0.1.0": 75, "0.2.0": 25}})
    assert await r.calls(100) == {V1: 75, V2: 25}  # the fake answers with what it was asked for
    assert Counter(r.local.calls) == {V1: 75, V2: 25}  # full coordinates, not group:artifact
    assert r.link.sent == []
    # without weights a local call names group:artifact (the runtime picks the version), as before
    plain = rig(both_here, Local(V1, V2), traffic=False)
    await plain.calls(3)
    assert plain.local.calls == [NAME] * 3


async def test_a_local_version_that_is_draining_or_unpublished_is_not_chosen_by_weight() -> None:
    # v2 runs here, v1 elsewhere; v2's endpoint is already withdrawn (it is being deactivated)
    reg = Registry(Ep(V1, "greet", 0, "B"))
    r = rig(reg, Local(V2), weights={NAME: {"0.1.0": 50, "0.2.0": 50}})
    assert await r.calls(10) == {V1: 10}
    # published, but its instance stopped taking calls (the runtime drains it)
    reg.eps.append(Ep(V2, "greet", 1, "A"))
    r.local.active[V2] = False
    assert await r.calls(10) == {V1: 10}
    r.local.active[V2] = True
    assert await r.calls(10) == {V1: 5, V2: 5}


async def test_without_a_rollout_the_choice_is_as_before() -> None:
    r = rig(THREE)  # a traffic port without weights for the target
    got = await r.calls(30)
    assert got == {V1: 20, V2: 10}  # round robin over the three endpoints
    assert r.weights.asked == 30  # one lookup per call
    none = rig(THREE, traffic=False)
    assert await none.calls(30) == got


def test_the_rollout_value_round_trips() -> None:
    v = rollout({"0.1.0": 90, "0.2.0": 10})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(v), type=RolloutValue).weights == v.weights
