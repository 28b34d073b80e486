"""Scenarios: faults injected into a running Forge under load, judged by explicit criteria.

`aether forge scenario NAME [--json]` starts a Forge (nodes, blueprint, load), and for each
scenario: waits for a healthy baseline, injects the fault, watches the cluster (a sample of
Forge's view every 0.25 s) and the load (per node address and per target), heals, waits for the
cluster to recover, and judges the criteria. Every acknowledged order (a 2xx answer to
`POST /api/orders` carrying an `orderId`) is read back at the end: the run fails if any is lost.

The judging is pure (`Sample`, `LoadCounts` and the functions below take what was recorded and
return `Criterion`s, unit-tested without processes); `run_scenarios` is the adapter that drives the
Forge and records. Failed requests are counted per node address of the load generator: a request
that the killed node itself was holding is lost with the node (no runtime can hide that), so the
criteria that say "zero failed" count the requests sent through the *other* nodes, where the
runtime's retries and failover must hide the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from aether.core.artifact import Version
from aether.core.errors import BadRequest
from aether.forge.app import Forge, ForgeOptions, open_forge
from aether.forge.load import FailedRequest, SentRequest

__all__ = [
    "CI_SUBSET",
    "SCENARIOS",
    "Criterion",
    "LoadCounts",
    "Sample",
    "ScenarioReport",
    "run_scenarios",
]


# -- what is recorded --------------------------------------------------------------------------------


class Sample(msgspec.Struct, frozen=True):
    """The cluster as Forge saw it at `t` (monotonic seconds since the scenario started)."""

    t: float
    leader: str | None
    quorum: bool
    up: frozenset[str]
    members: frozenset[str]
    ready: frozenset[str] = frozenset()


class LoadCounts(msgspec.Struct, frozen=True):
    """Requests answered so far, per node address of the load generator: ok, failed, and the
    failures by cause (`"503"`, `"error:connect"`...)."""

    ok: dict[str, int]
    failed: dict[str, int]
    errors: dict[str, dict[str, int]] = {}

    def minus(self, before: LoadCounts) -> LoadCounts:
        errors = {}
        for node, causes in self.errors.items():
            old = before.errors.get(node, {})
            diff = {c: n - old.get(c, 0) for c, n in causes.items() if n - old.get(c, 0) > 0}
            if diff:
                errors[node] = diff
        return LoadCounts(
            {k: v - before.ok.get(k, 0) for k, v in self.ok.items()},
            {k: v - before.failed.get(k, 0) for k, v in self.failed.items()},
            errors,
        )

    def causes(self, exclude: Iterable[str] = ()) -> str:
        """The failures by cause, e.g. `503: 3, error:connect: 1` (nodes in `exclude` left out)."""
        ex = set(exclude)
        out: dict[str, int] = {}
        for node, causes in self.errors.items():
            if node not in ex:
                for c, n in causes.items():
                    out[c] = out.get(c, 0) + n
        return ", ".join(f"{c}: {n}" for c, n in sorted(out.items()))

    def total(self, exclude: Iterable[str] = ()) -> tuple[int, int]:
        ex = set(exclude)
        ok = sum(v for k, v in self.ok.items() if k not in ex)
        failed = sum(v for k, v in self.failed.items() if k not in ex)
        return ok, failed


class Criterion(msgspec.Struct, frozen=True):
    """One judged criterion: what was expected, what was observed, and whether it passed."""

    name: str
    expected: str
    observed: str
    passed: bool


class ScenarioReport(msgspec.Struct):
    """The report of one scenario (`--json` prints a list of these)."""

    scenario: str
    description: str
    passed: bool
    seconds: float
    criteria: list[Criterion]
    requests_ok: int = 0
    requests_failed: int = 0
    timeline: list[str] = msgspec.field(default_factory=list)
    measures: dict[str, float] = msgspec.field(default_factory=dict)
    """Figures the scenario measured, by name (update: `rollout_seconds`, `requests_per_second`,
    `orders_per_second`)."""
    failures: list[str] = msgspec.field(default_factory=list)
    """Examples of the requests that failed during the scenario (through the nodes its fault did
    not hit), one per cause and message, at most `FAILURE_EXAMPLES`: what they were told, to tell
    where a failure came from."""


FAILURE_EXAMPLES: Final = 8


def failure_examples(
    failures: Iterable[FailedRequest],
    exclude: Iterable[str] = (),
    limit: int = FAILURE_EXAMPLES,
    origin: float = 0.0,
) -> list[str]:
    """One line per distinct failure (cause and message, ids and numbers masked to compare) of the
    requests through nodes not in `exclude`, in order, at most `limit`, each with how often it
    occurred and when the first one failed, in seconds after `origin` (the scenario's start on the
    load generator's clock, so it reads as the scenario's timeline does):
    ``503 x12 place-order via 127.0.0.1:4001 at 31.2s: map 'orders' ...``."""
    ex = set(exclude)
    seen: dict[tuple[str, str, str], list[Any]] = {}
    for f in failures:
        if f.node in ex:
            continue
        key = (f.cause, f.target, _MASK.sub("#", f.detail))
        if key in seen:
            seen[key][1] += 1
        elif len(seen) < limit:
            seen[key] = [f, 1]
    return [
        f"{f.cause} x{n} {f.target} via {f.node or '-'} at {f.t - origin:.1f}s: "
        f"{f.detail or '(no message)'}"
        for f, n in seen.values()
    ]


_MASK: Final = re.compile(r"[0-9a-fA-F]{6,}|\d+")


# -- judging (pure) ----------------------------------------------------------------------------------


def quorum_gap(samples: Sequence[Sample], start: float, end: float) -> float:
    """The longest stretch without quorum between `start` and `end`, in seconds."""
    longest, since = 0.0, None
    for s in samples:
        if s.t < start or s.t > end:
            continue
        if not s.quorum and since is None:
            since = s.t
        elif s.quorum and since is not None:
            longest, since = max(longest, s.t - since), None
    if since is not None:
        longest = max(longest, end - since)
    return longest


def within(name: str, seconds: float | None, limit: float) -> Criterion:
    observed = "never" if seconds is None else f"{seconds:.1f} s"
    return Criterion(name, f"<= {limit:g} s", observed, seconds is not None and seconds <= limit)


def at_most(name: str, value: float, limit: float, unit: str = "") -> Criterion:
    return Criterion(name, f"<= {limit:g}{unit}", f"{value:g}{unit}", value <= limit)


def at_least(name: str, value: float, limit: float, unit: str = "") -> Criterion:
    return Criterion(name, f">= {limit:g}{unit}", f"{value:g}{unit}", value >= limit)


def failed_at_most(name: str, counts: LoadCounts, limit: int, exclude: Iterable[str] = ()) -> Criterion:
    """At most `limit` failed requests (through the nodes not in `exclude`), the causes shown."""
    exclude = set(exclude)
    failed = counts.total(exclude)[1]
    causes = counts.causes(exclude)
    observed = f"{failed}" + (f" ({causes})" if causes else "")
    return Criterion(name, f"<= {limit}", observed, failed <= limit)


def success_rate(counts: LoadCounts, exclude: Iterable[str] = ()) -> float:
    ok, failed = counts.total(exclude)
    return 100.0 if ok + failed == 0 else 100.0 * ok / (ok + failed)


def other_version(running: str, available: Iterable[str]) -> str | None:
    """The version to update to: the highest available one other than `running` (None if none)."""
    others = sorted((Version.parse(v) for v in set(available) if v != running), reverse=True)
    return str(others[0]) if others else None


def ordered_quantities(book: OrderBook, ids: Iterable[str]) -> dict[str, int]:
    """The units per product of the acknowledged orders `ids` (as their requests asked)."""
    out: dict[str, int] = {}
    for order_id in ids:
        for product, qty in book.quantities.get(order_id, {}).items():
            out[product] = out.get(product, 0) + qty
    return out


def stock_taken_matches(
    before: Mapping[str, int], after: Mapping[str, int], ordered: Mapping[str, int]
) -> Criterion:
    """Each product's stock went down by exactly the units its acknowledged orders asked for
    (`before`/`after`: units available, read with no request in flight). More taken than ordered:
    an order reserved twice (or stock taken for an order that was not acknowledged); less: an
    acknowledged order that reserved nothing."""
    parts: list[str] = []
    passed = True
    for product in sorted(set(ordered) | set(before) | set(after)):
        want = ordered.get(product, 0)
        if product not in before or product not in after:
            parts.append(f"{product}: stock not read")
            passed = False
            continue
        taken = before[product] - after[product]
        if taken == want:
            parts.append(f"{product}: {taken} taken = {want} ordered")
        else:
            passed = False
            diff = taken - want
            parts.append(f"{product}: {taken} taken, {want} ordered ({diff:+d}"
                         f"{', an order reserved twice?' if diff > 0 else ''})")
    return Criterion("stock taken equals the acknowledged orders' units", "taken = ordered",
                     "; ".join(parts) or "no order placed", passed and bool(ordered))


# -- driving (the adapter) ---------------------------------------------------------------------------


class ScenarioFailed(Exception):
    """A step could not be carried out (the scenario stops and is reported failed)."""


@dataclass
class Run:
    """What a scenario sees and records while it runs."""

    forge: Forge
    rng: random.Random
    start: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    criteria: list[Criterion] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    """Node addresses whose failed requests the fault itself causes (the node killed, cut off...)."""
    book: OrderBook = field(default_factory=lambda: OrderBook())
    """The acknowledged orders (the whole run's: `run_scenarios` passes its book)."""
    measures: dict[str, float] = field(default_factory=dict)
    """Figures measured (the report's `measures`)."""

    def now(self) -> float:
        return time.monotonic() - self.start

    def note(self, text: str) -> None:
        self.timeline.append(f"{self.now():6.1f}s {text}")

    def check(self, c: Criterion) -> None:
        self.criteria.append(c)
        self.note(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.observed} (expected {c.expected})")

    def sample(self) -> Sample:
        v = self.forge.cluster.view()
        up = frozenset(n.id for n in v.nodes if n.state == "up")
        ready = frozenset(n.id for n in v.nodes if n.state == "up" and n.ready)
        s = Sample(self.now(), v.leader, v.quorum, up, frozenset(v.members), ready)
        self.samples.append(s)
        return s

    def leader(self) -> str:
        s = self.sample()
        if s.leader is None:
            raise ScenarioFailed("no leader")
        return s.leader

    def followers(self) -> list[str]:
        s = self.sample()
        return sorted(n for n in s.up & s.members if n != s.leader)

    def address(self, node: str) -> str:
        for n in self.forge.cluster.view().nodes:
            if n.id == node:
                return n.http_address
        raise ScenarioFailed(f"unknown node {node}")

    async def wait(self, what: str, pred: Callable[[Sample], bool], timeout: float) -> float | None:
        """Seconds until `pred` holds of a fresh sample (None after `timeout`)."""
        t0 = self.now()
        while self.now() - t0 <= timeout:
            if pred(self.sample()):
                return self.now() - t0
            await asyncio.sleep(0.25)
        self.note(f"timed out after {timeout:g} s waiting for {what}")
        return None

    async def hold(self, seconds: float) -> None:
        end = self.now() + seconds
        while self.now() < end:
            self.sample()
            await asyncio.sleep(0.25)

    def load_counts(self) -> LoadCounts:
        load = self.forge.load
        if load is None:
            return LoadCounts({}, {})
        nodes = load.snapshot().nodes
        return LoadCounts(
            {n.name: n.ok for n in nodes}, {n.name: n.failed for n in nodes},
            {n.name: dict(n.errors) for n in nodes},
        )


Step = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: Step
    min_nodes: int = 3


async def _recovered(run: Run, nodes: int, timeout: float = 60.0) -> None:
    """Heal everything and check that every node is up, ready, a member, with quorum again
    (timed from the start of the healing: restarts included)."""
    t0 = run.now()
    with contextlib.suppress(Exception):
        await run.forge.cluster.heal()
    for n in run.forge.cluster.view().nodes:
        if n.state in ("down", "frozen", "stopped"):
            await run.forge.cluster.restart(n.id)
    took = await run.wait(
        "full recovery",
        lambda s: s.quorum and s.leader is not None and len(s.ready & s.members) >= nodes,
        timeout,
    )
    run.check(within(f"all {nodes} members up and ready again", None if took is None else run.now() - t0,
                     timeout))
    # the maps' partitions moved back (a node rejoined the partition table): the next scenario
    # starts once every partition has its primary serving again, not during the takeover
    settled = None
    while took is not None and run.now() - t0 <= timeout:
        state = await _maps_state(run)
        if state is not None and all(m >= nodes and syncing == 0 for m, syncing in state.values()):
            settled = run.now() - t0
            break
        await asyncio.sleep(0.25)
    if took is not None and settled is None:
        run.note(f"maps not settled after {timeout:g} s: {await _maps_state(run)}")
    run.check(within("every map partition served again", settled, timeout))


async def _maps_state(run: Run) -> dict[str, tuple[int, int]] | None:
    """Per map: how many nodes are in its partition table and answered, and how many partitions
    their primaries are still taking over (`GET /api/v1/maps/{name}`); None when a call failed."""
    out: dict[str, tuple[int, int]] = {}
    try:
        listing = await run.forge.cluster.api("GET", "/api/v1/maps", timeout=5)
        for m in listing.get("maps") or []:
            name = str(m["name"])
            detail = await run.forge.cluster.api("GET", f"/api/v1/maps/{quote(name, safe='')}", timeout=5)
            nodes = detail.get("nodes") or []
            members = set(detail.get("members") or []) & {str(n.get("node")) for n in nodes}
            out[name] = (len(members), sum(int(n.get("syncing_partitions") or 0) for n in nodes))
    except Exception:
        return None
    return out


def _members(run: Run) -> int:
    return len(run.sample().members)


async def kill_follower(run: Run) -> None:
    nodes = _members(run)
    leader = run.leader()
    victim = run.rng.choice(run.followers())
    run.excluded.add(run.address(victim))
    before = run.load_counts()
    t = run.now()
    await run.forge.cluster.kill(victim)
    run.note(f"killed {victim} (SIGKILL)")
    shown = await run.wait(f"{victim} shown down", lambda s: victim not in s.up, 5)
    run.check(within(f"{victim} shown down", shown, 2.0))
    await run.hold(5)
    run.check(Criterion("leader unchanged", leader, str(run.sample().leader), run.sample().leader == leader))
    run.check(at_most("longest time without quorum", quorum_gap(run.samples, t, run.now()), 0, " s"))
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests through the other nodes", delta, 0, run.excluded))
    await _recovered(run, nodes)


async def kill_leader(run: Run) -> None:
    nodes = _members(run)
    leader = run.leader()
    run.excluded.add(run.address(leader))
    before = run.load_counts()
    t = run.now()
    await run.forge.cluster.kill(leader)
    run.note(f"killed the leader {leader} (SIGKILL)")
    took = await run.wait("a new leader", lambda s: s.leader not in (None, leader) and s.quorum, 15)
    run.check(within("new leader elected", took, 10.0))
    await run.hold(4)
    run.check(at_most("longest time without quorum", quorum_gap(run.samples, t, run.now()), 5, " s"))
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests through the other nodes", delta, 0, run.excluded))
    await _recovered(run, nodes)


async def rolling_restart(run: Run) -> None:
    nodes = _members(run)
    before = run.load_counts()
    t = run.now()
    await run.forge.cluster.rolling_restart()
    run.note("rolling restart started")
    limit = 45.0 * nodes
    done = asyncio.ensure_future(run.forge.cluster.wait_rolling_restart())
    while not done.done() and run.now() - t < limit:
        run.sample()
        await asyncio.sleep(0.25)
    ended = done.result() if done.done() else None
    if not done.done():
        done.cancel()
    run.note(f"rolling restart ended: {ended}")
    finished = done.done() and ended is not None and not ended.startswith(("failed", "cancelled"))
    run.check(within("rolling restart finished", run.now() - t if finished else None, limit))
    run.check(at_most("longest time without quorum", quorum_gap(run.samples, t, run.now()), 0, " s"))
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests", delta, 0))
    await _recovered(run, nodes)


async def partition_minority(run: Run) -> None:
    """The leader cut off alone: every map partition keeps a quorum of its owners on the majority
    side (it loses at most one), so the majority must hide the cut completely."""
    nodes = _members(run)
    leader = run.leader()
    majority = sorted(run.sample().members - {leader})
    run.excluded.add(run.address(leader))
    before = run.load_counts()
    t = run.now()
    await run.forge.cluster.partition([[leader], majority])
    run.note(f"cut the leader {leader} off from {majority}")
    took = await run.wait("a leader on the majority side", lambda s: s.leader in majority and s.quorum, 20)
    run.check(within("majority elects a leader", took, 10.0))
    await run.hold(max(0.0, 6 - (run.now() - t)))
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests through the majority", delta, 0, run.excluded))
    await run.forge.cluster.heal()
    run.note("healed the partition")
    back = await run.wait("the old leader back", lambda s: len(s.ready & s.members) >= nodes, 30)
    run.check(within("the cut-off node rejoins after healing", back, 20.0))
    await _recovered(run, nodes)


PARTITION_TWO_HOLD: Final = 22.0
"""How long partition-two keeps the cut: the map's takeover of partitions whose owners are mostly
on the minority side waits `force_after` (10 s, docs/maps.md) before going on without them."""
MAJORITY_SERVES_AGAIN: Final = 16.0


async def partition_two(run: Run) -> None:
    """The leader and a follower cut off from the three others: map partitions with two of their
    three owners on the cut-off side wait before the majority takes them over (a write acknowledged
    by those two only must not be lost), then the majority serves everything."""
    nodes = _members(run)
    leader = run.leader()
    minority = [leader, run.followers()[0]]
    majority = sorted(run.sample().members - set(minority))
    for n in minority:
        run.excluded.add(run.address(n))
    t = run.now()
    await run.forge.cluster.partition([sorted(minority), majority])
    run.note(f"partitioned {sorted(minority)} from {majority}")
    took = await run.wait("a leader on the majority side", lambda s: s.leader in majority and s.quorum, 20)
    run.check(within("majority elects a leader", took, 10.0))
    last_failure: float | None = None
    failures = 0
    prev = run.load_counts()
    while run.now() - t < PARTITION_TWO_HOLD:
        await run.hold(1)
        cur = run.load_counts()
        failed = cur.minus(prev).total(run.excluded)[1]
        prev = cur
        if failed:
            failures += failed
            last_failure = run.now() - t
    run.note(f"{failures} requests failed through the majority, the last {last_failure or 0:.0f} s "
             "after the cut")
    serves = 0.0 if last_failure is None else last_failure
    clean = PARTITION_TWO_HOLD - serves
    run.check(Criterion(
        "requests through the majority succeed again", f"<= {MAJORITY_SERVES_AGAIN:g} s after the cut",
        f"{serves:.0f} s ({clean:.0f} s without a failure at the end)",
        serves <= MAJORITY_SERVES_AGAIN and clean >= 5,
    ))
    await run.forge.cluster.heal()
    run.note("healed the partition")
    back = await run.wait("the minority back", lambda s: len(s.ready & s.members) >= nodes, 30)
    run.check(within("minority rejoins after healing", back, 20.0))
    await _recovered(run, nodes)


async def add_node(run: Run) -> None:
    nodes = _members(run)
    before = run.load_counts()
    t0 = run.now()
    result = await run.forge.cluster.add_node()
    run.note(result.message)
    took = await run.wait("the new member", lambda s: len(s.members) > nodes and len(s.ready) > nodes, 60)
    run.check(within("new node is a ready member", None if took is None else run.now() - t0, 45.0))
    await run.hold(4)
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests", delta, 0))
    await _recovered(run, nodes + 1)


async def remove_node(run: Run) -> None:
    nodes = _members(run)
    victim = sorted(run.followers())[-1]
    run.excluded.add(run.address(victim))
    before = run.load_counts()
    await run.forge.cluster.remove_node(victim)
    run.note(f"removed {victim}")
    took = await run.wait(f"{victim} out of the members", lambda s: victim not in s.members, 30)
    run.check(within(f"{victim} removed from the members", took, 20.0))
    await run.hold(4)
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests through the remaining nodes", delta, 0, run.excluded))
    await _recovered(run, nodes - 1)


async def load_spike(run: Run) -> None:
    nodes = _members(run)
    load = run.forge.load
    if load is None:
        raise ScenarioFailed("load-spike needs load targets (forge-config [[load.targets]])")
    base = load.snapshot().rate
    before = run.load_counts()
    since = time.time()
    load.ramp(base * 4, 2.0)
    run.note(f"load ramped from {base:g} to {base * 4:g} requests/s")
    autoscaled = ".scaling]" in (run.forge.blueprint_text or "")
    scaled: float | None = None
    t0 = run.now()
    while run.now() - t0 < 25:
        await run.hold(1)
        ups = [d for d in run.forge.cluster.view().decisions
               if d.get("kind") == "scale_up" and float(d.get("time") or 0) >= since]
        if ups and scaled is None:
            scaled = run.now() - t0
            run.note(f"controller: {ups[0].get('reason')}")
    delta = run.load_counts().minus(before)
    run.check(at_least("success rate during the spike", round(success_rate(delta), 2), 99.0, " %"))
    if autoscaled:
        run.check(within("the controller scales up", scaled, 20.0))
    load.set_rate(base)
    await _recovered(run, nodes)


async def latency(run: Run) -> None:
    nodes = _members(run)
    victim = run.rng.choice(run.followers())
    before = run.load_counts()
    t = run.now()
    for peer in sorted(run.sample().members - {victim}):
        await run.forge.cluster.set_link(victim, peer, delay_ms=200, jitter_ms=20, loss=0, both_ways=True)
    run.note(f"200 ms (+-20) latency on every link of {victim}")
    await run.hold(12)
    run.check(at_most("longest time without quorum", quorum_gap(run.samples, t, run.now()), 0, " s"))
    delta = run.load_counts().minus(before)
    run.check(at_least("success rate", round(success_rate(delta), 2), 99.0, " %"))
    await _recovered(run, nodes)


async def crash_slice(run: Run) -> None:
    nodes = _members(run)
    placement = run.forge.cluster.view().placement
    candidates = sorted({p.artifact for p in placement if "place-order" in p.artifact} or
                        {p.artifact for p in placement})
    if not candidates:
        raise ScenarioFailed("no slice is deployed")
    artifact = candidates[0]
    await run.forge.cluster.fail_slice(artifact, None, error_rate=1.0, delay_ms=0, unhealthy=True)
    run.note(f"made an instance of {artifact} fail (every call errors, health checks fail)")
    t0 = run.now()
    quiet_since: float | None = None
    last = run.load_counts()
    recovered: float | None = None
    while run.now() - t0 < 60:
        await run.hold(1)
        cur = run.load_counts()
        failed = cur.minus(last).total()[1]
        last = cur
        if failed == 0:
            quiet_since = run.now() if quiet_since is None else quiet_since
            if run.now() - quiet_since >= 5:
                recovered = quiet_since - t0
                break
        else:
            quiet_since = None
    run.check(within("errors stop (instance replaced or avoided)", recovered, 45.0))
    with contextlib.suppress(Exception):
        await run.forge.cluster.heal_slice(artifact)
    await _recovered(run, nodes)


CHAOS_STEPS: Final = ("kill-follower", "kill-leader", "partition-minority", "latency", "crash-slice")
"""The faults the chaos run draws from (each with its own criteria)."""


async def chaos(run: Run) -> None:
    """A shortened "chaos hour": a seeded sequence of the other scenarios' faults, back to back."""
    nodes = _members(run)
    before = run.load_counts()
    steps = [run.rng.choice(CHAOS_STEPS) for _ in range(4)]
    run.note(f"chaos sequence: {', '.join(steps)}")
    for name in steps:
        sub = Run(run.forge, run.rng, start=run.start, samples=run.samples, timeline=run.timeline,
                  book=run.book)
        await SCENARIOS[name].run(sub)
        run.criteria += [msgspec.structs.replace(c, name=f"{name}: {c.name}") for c in sub.criteria]
    delta = run.load_counts().minus(before)
    ok, failed = delta.total()
    run.note(f"over the chaos run: {ok} requests ok, {failed} failed ({delta.causes() or 'none'})")
    await _recovered(run, nodes)


UPDATED_SLICE: Final = "org.demo:place-order"
"""The slice the update scenario rolls to another version (the order demo's; `make demo-wheels`
builds 0.1.0 and 0.1.1)."""
STOCK_MAP: Final = "stock"
"""The order demo's map of stock levels (product id -> `{"available", "reserved"}`)."""
ROLLOUT_TIMEOUT: Final = 120.0


def _running_version(run: Run, artifact: str) -> str:
    """The version of `artifact` with the most instances in Forge's view of the placement."""
    counts: dict[str, int] = {}
    for p in run.forge.cluster.view().placement:
        name, _, version = p.artifact.rpartition(":")
        if name == artifact:
            counts[version] = counts.get(version, 0) + p.instances
    if not counts:
        raise ScenarioFailed(f"{artifact} does not run (no instance in the placement)")
    return max(sorted(counts), key=lambda v: counts[v])


def _available_versions(run: Run, artifact: str) -> list[str]:
    """The versions of `artifact` in the repository Forge deployed its wheels into."""
    from aether.slices.repository import Repository

    root = run.forge.cluster.repository
    return [] if root is None else [str(v) for v in Repository(root).versions(artifact)]


async def _quiet(run: Run, timeout: float = 15.0) -> None:
    """Pause the load and wait until no request of it is in flight (answers counted)."""
    load = run.forge.load
    assert load is not None
    load.pause()
    t0 = run.now()
    while load.snapshot().in_flight and run.now() - t0 < timeout:
        await asyncio.sleep(0.05)
    if load.snapshot().in_flight:
        raise ScenarioFailed(f"requests still in flight {timeout:g} s after pausing the load")


SHARD_SEPARATOR: Final = "~"
"""A product with a lot of stock keeps it under its id and escrow shards `PRODUCT-ID~K`."""


def stock_keys(product: str, keys: Iterable[str]) -> list[str]:
    """The keys of the `stock` map holding `product`'s stock, among `keys` (a prefix listing)."""
    return sorted(k for k in keys if k == product or k.startswith(product + SHARD_SEPARATOR))


async def _stock(run: Run, products: Iterable[str]) -> dict[str, int]:
    """Units available per product: its keys in the demo's `stock` map (each linearizable) read
    and summed, while no request of the load is in flight."""
    out: dict[str, int] = {}
    for product in sorted(products):
        listing = await run.forge.cluster.api("GET", f"/api/v1/maps/{STOCK_MAP}/keys?prefix={quote(product)}")
        found = listing.get("keys") if isinstance(listing, dict) else None
        for key in stock_keys(product, found if isinstance(found, list) else []):
            level = await run.forge.cluster.api("GET", f"/api/v1/maps/{STOCK_MAP}/entries/{quote(key)}")
            if isinstance(level, dict) and isinstance(level.get("available"), int):
                out[product] = out.get(product, 0) + level["available"]
    return out


async def _follow_rollout(run: Run, artifact: str, timeout: float) -> dict[str, Any]:
    """Poll the rollout until it is no longer active (or `timeout`); its last state, noting each
    new line of its history."""
    seen = 0
    rollout: dict[str, Any] = {}
    t0 = run.now()
    while run.now() - t0 < timeout:
        run.sample()
        with contextlib.suppress(Exception):  # a leader change: ask again
            rollout = await run.forge.cluster.api("GET", f"/api/v1/rollouts/{artifact}", timeout=5)
        history = rollout.get("history") or []
        for line in history[seen:]:
            run.note(f"rollout: {line}")
        seen = max(seen, len(history))
        if rollout.get("state") in ("succeeded", "rolled-back", "aborted"):
            break
        await asyncio.sleep(0.25)
    return rollout


async def update(run: Run) -> None:
    """Roll the order demo's place-order to its other version under load: the rollout succeeds,
    no request fails, and no order is lost or placed twice (the stock taken equals the units of
    the acknowledged orders)."""
    nodes = _members(run)
    load = run.forge.load
    if load is None:
        raise ScenarioFailed("update needs load targets (forge-config [[load.targets]])")
    artifact = UPDATED_SLICE
    running = _running_version(run, artifact)
    available = _available_versions(run, artifact)
    target = other_version(running, available)
    if target is None:
        raise ScenarioFailed(
            f"only {artifact}:{running} is deployed; build another version first (`make demo-wheels` "
            "builds 0.1.1)"
        )
    before = run.load_counts()
    try:
        await _quiet(run)
        products = {p for units in run.book.quantities.values() for p in units}
        if not products:
            raise ScenarioFailed("no order was acknowledged before the update (is place-order loaded?)")
        stock_before = await _stock(run, products)
        ids_before, acks_before = set(run.book.ids), run.book.acknowledged
        load.resume()
        await run.hold(1)
        sent_before = load.snapshot().total.sent
        t0 = run.now()
        started = await run.forge.cluster.update(artifact, target)  # the dashboard's Update control
        run.note(started.message)
        acks_at_start = run.book.acknowledged
        rollout = await _follow_rollout(run, artifact, ROLLOUT_TIMEOUT)
        took = max(run.now() - t0, 1e-9)
        rate = (load.snapshot().total.sent - sent_before) / took
        orders = (run.book.acknowledged - acks_at_start) / took
        run.measures.update(rollout_seconds=round(took, 2), requests_per_second=round(rate, 1),
                            orders_per_second=round(orders, 1))
        state = str(rollout.get("state") or "unknown")
        why = "" if state == "succeeded" else f": {rollout.get('reason') or ''}"
        run.check(Criterion(
            f"rollout {running} -> {target}", "succeeded",
            f"{state} in {took:.1f} s under {rate:.0f} requests/s ({orders:.0f} orders/s acknowledged)"
            f"{why}",
            state == "succeeded" and rollout.get("new_version") == target,
        ))
        await run.hold(1)
        await _quiet(run)
        stock_after = await _stock(run, products)
        new_ids = run.book.ids - ids_before
    finally:
        if load.snapshot().paused:
            load.resume()
    delta = run.load_counts().minus(before)
    run.check(failed_at_most("failed requests (every node)", delta, 0))
    run.check(stock_taken_matches(stock_before, stock_after, ordered_quantities(run.book, new_ids)))
    twice = (run.book.acknowledged - acks_before) - len(new_ids)
    run.check(at_most("order ids acknowledged more than once", twice, 0))
    await _recovered(run, nodes)


CANARY: Final[dict[str, Any]] = {
    "strategy": "canary", "steps": [2, 50, 100], "interval": 60, "max_error_rate": 0.1, "min_calls": 6,
}
"""The canary-rollback scenario's rollout settings: 2 % of the calls to one new instance, rolled
back once 6 of its calls were seen and more than 10 % of them failed."""
CANARY_ERROR_RATE: Final = 0.5
CANARY_MAX_FAILED: Final = 1.0
"""% of the requests during the canary that may fail (its share of the calls x its error rate)."""


def failed_share(name: str, counts: LoadCounts, limit_percent: float) -> Criterion:
    """The failed requests as a share of all requests answered, at most `limit_percent`."""
    ok, failed = counts.total()
    share = 0.0 if ok + failed == 0 else 100.0 * failed / (ok + failed)
    causes = counts.causes()
    return Criterion(
        name, f"<= {limit_percent:g} %",
        f"{share:.2f} % ({failed} of {ok + failed}{'; ' + causes if causes else ''})",
        share <= limit_percent and ok + failed > 0,
    )


async def canary_rollback(run: Run) -> None:
    """A canary of place-order's other version whose instance fails half its calls (Forge's slice
    fault, injected as soon as it is ready): the rollout's error gate rolls it back by itself, few
    requests fail meanwhile, none after, and the old version keeps serving."""
    nodes = _members(run)
    artifact = UPDATED_SLICE
    running = _running_version(run, artifact)
    target = other_version(running, _available_versions(run, artifact))
    if target is None:
        raise ScenarioFailed(f"only {artifact}:{running} is deployed; build another version first "
                             "(`make demo-wheels` builds 0.1.1)")
    coords = f"{artifact}:{target}"
    before = run.load_counts()
    t0 = run.now()
    body = {"artifact": artifact, "version": target, **CANARY}
    await run.forge.cluster.api("POST", "/api/v1/rollouts", body)
    run.note(f"canary of {coords}: {CANARY}")
    seen, faulted = 0, False
    rollout: dict[str, Any] = {}
    try:
        while run.now() - t0 < 90:
            run.sample()
            with contextlib.suppress(Exception):
                rollout = await run.forge.cluster.api("GET", f"/api/v1/rollouts/{artifact}", timeout=5)
            history = rollout.get("history") or []
            for line in history[seen:]:
                run.note(f"rollout: {line}")
            seen = max(seen, len(history))
            if rollout.get("state") in ("succeeded", "rolled-back", "aborted"):
                break
            ready = [p for p in run.forge.cluster.view().placement
                     if p.artifact == coords and p.instances and p.state.upper() == "ACTIVE"]
            if ready and not faulted:
                await run.forge.cluster.fail_slice(coords, ready[0].node, error_rate=CANARY_ERROR_RATE)
                faulted = True
                run.note(f"the canary instance on {ready[0].node} fails {CANARY_ERROR_RATE:.0%} of its calls")
            await asyncio.sleep(0.25)
        took = run.now() - t0
        during = run.load_counts().minus(before)
        state, reason = str(rollout.get("state") or "unknown"), str(rollout.get("reason") or "")
        run.check(Criterion(
            "the canary is rolled back by its error gate", "rolled-back (max_error_rate)",
            f"{state} after {took:.1f} s: {reason}",
            faulted and state == "rolled-back" and "max_error_rate" in reason,
        ))
        run.check(failed_share("failed requests during the canary", during, CANARY_MAX_FAILED))
        after = run.load_counts()
        await run.hold(3)
        run.check(failed_at_most("failed requests after the rollback", run.load_counts().minus(after), 0))
        now_running = _running_version(run, artifact)
        run.check(Criterion("the old version serves", running, now_running, now_running == running))
    finally:
        if faulted:
            with contextlib.suppress(Exception):
                await run.forge.cluster.heal_slice(coords)
    await _recovered(run, nodes)


SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario("kill-follower", "SIGKILL a follower under load, then restart it", kill_follower),
        Scenario("kill-leader", "SIGKILL the leader under load; a new one is elected", kill_leader),
        Scenario("rolling-restart", "Restart every node, one at a time, under load", rolling_restart),
        Scenario("partition-minority", "Cut the leader off from the others, then heal", partition_minority),
        Scenario("partition-two", "Cut the leader and a follower off from three others, then heal",
                 partition_two, min_nodes=5),
        Scenario("add-node", "Add a node under load", add_node),
        Scenario("remove-node", "Remove a follower under load", remove_node, min_nodes=4),
        Scenario("load-spike", "Quadruple the load in 2 s and hold it 25 s", load_spike),
        Scenario("latency", "200 ms latency on every link of one follower", latency),
        Scenario("crash-slice", "Make one slice instance fail until it is replaced", crash_slice),
        Scenario("chaos", "A seeded sequence of faults (the chaos hour, shortened)", chaos),
        Scenario("update", "Roll place-order to its other version under load (a rolling update)", update),
        Scenario("canary-rollback", "A canary of place-order that fails half its calls is rolled back",
                 canary_rollback),
    )
}

CI_SUBSET: Final = ("kill-follower", "kill-leader", "partition-minority")
"""What `aether forge scenario ci` runs (the test suite runs it too)."""


def resolve_names(names: Sequence[str]) -> list[str]:
    """Scenario names, `all` (every one) and `ci` (the CI subset) expanded; unknown names refused."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out += list(SCENARIOS)
        elif name == "ci":
            out += list(CI_SUBSET)
        elif name in SCENARIOS:
            out.append(name)
        else:
            known = ", ".join([*SCENARIOS, "all", "ci"])
            raise BadRequest(f"unknown scenario {name!r}; known: {known}")
    return out


# -- orders -------------------------------------------------------------------------------------------


class OrderBook:
    """The acknowledged orders: ids of 2xx answers to `POST /api/orders` (the load generator's
    `on_response` hook), with the units per product their requests asked for, and how many
    acknowledgements there were (an id acknowledged twice counts twice there, once in `ids`)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.quantities: dict[str, dict[str, int]] = {}
        self.acknowledged = 0

    def on_response(self, target: str, status: int, body: bytes | None, request: SentRequest) -> None:
        path = urlsplit(request.url).path
        if request.method != "POST" or path != "/api/orders" or not 200 <= status < 300 or not body:
            return
        try:
            order_id = msgspec.json.decode(body).get("orderId")
        except (msgspec.DecodeError, AttributeError):
            return
        if isinstance(order_id, str):
            self.ids.add(order_id)
            self.acknowledged += 1
            self.quantities[order_id] = _units(request.body)


def _units(body: str | None) -> dict[str, int]:
    """The units per product an order's request body asks for (`{"items": [{"productId",
    "quantity"}]}`); what does not fit is left out."""
    out: dict[str, int] = {}
    try:
        items = msgspec.json.decode(body or "").get("items")
    except (msgspec.DecodeError, AttributeError):
        return out
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            product, qty = item.get("productId"), item.get("quantity")
            if isinstance(product, str) and isinstance(qty, int) and not isinstance(qty, bool):
                out[product] = out.get(product, 0) + qty
    return out


async def lost_orders(
    book: OrderBook, addresses: Callable[[], list[str]], timeout: float = 120.0
) -> list[str]:
    """The acknowledged orders that `GET /api/orders/{id}` does not find (404) on any node."""
    ids = sorted(book.ids)
    lost: list[str] = []
    sem = asyncio.Semaphore(16)
    deadline = time.monotonic() + timeout

    async def check(session: aiohttp.ClientSession, i: int, order_id: str) -> None:
        async with sem:
            while time.monotonic() < deadline:
                addrs = addresses()
                if not addrs:
                    await asyncio.sleep(0.5)
                    continue
                url = f"http://{addrs[i % len(addrs)]}/api/orders/{order_id}"
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        if resp.status == 200:
                            return
                        if resp.status == 404:
                            lost.append(order_id)
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                i += 1
                await asyncio.sleep(0.2)
            lost.append(order_id)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(check(session, i, o) for i, o in enumerate(ids)))
    return sorted(lost)


async def run_scenarios(
    names: Sequence[str],
    opts: ForgeOptions,
    *,
    say: Callable[[str], None] = print,
    seed: int | None = None,
    rates: Mapping[str, float] | None = None,
) -> list[ScenarioReport]:
    """Start a Forge with `opts`, run the scenarios one after the other on it, and report each;
    the last report also judges the acknowledged orders (none lost). `rates`: the load's total
    rate (requests/s) while the named scenarios run (from their baseline on; the configured rate
    before and after)."""
    names = resolve_names(names)
    for name in names:
        if opts.nodes < SCENARIOS[name].min_nodes:
            raise BadRequest(f"scenario {name} needs at least {SCENARIOS[name].min_nodes} nodes")
    rng = random.Random(seed)
    book = OrderBook()
    opts.on_response = book.on_response
    reports: list[ScenarioReport] = []
    async with open_forge(opts, say=say) as (forge, _url):
        for name in names:
            sc = SCENARIOS[name]
            say(f"Scenario {name}: {sc.description}")
            run = Run(forge, rng, book=book)
            rate = (rates or {}).get(name)
            configured = forge.load.snapshot().rate if forge.load is not None else None
            if rate is not None and forge.load is not None:
                forge.load.set_rate(rate)
                run.note(f"load at {rate:g} requests/s for this scenario")
            before = run.load_counts()
            seq0 = forge.load.failure_count if forge.load is not None else 0
            try:
                await run.hold(2)  # a baseline under load
                await sc.run(run)
            except ScenarioFailed as e:
                run.check(Criterion("steps carried out", "all", str(e), False))
            except Exception as e:  # a control refused: the scenario fails, the run goes on
                run.check(Criterion("steps carried out", "all", f"{type(e).__name__}: {e}", False))
            finally:
                if rate is not None and forge.load is not None and configured is not None:
                    forge.load.set_rate(configured)
            delta = run.load_counts().minus(before)
            ok, failed = delta.total()
            report = ScenarioReport(
                name, sc.description, all(c.passed for c in run.criteria), round(run.now(), 1),
                run.criteria, ok, failed, run.timeline, run.measures,
                [] if forge.load is None else failure_examples(
                    forge.load.failures(seq0), run.excluded, origin=time.time() - run.now()
                ),
            )
            reports.append(report)
            say(f"  {'PASSED' if report.passed else 'FAILED'} in {report.seconds:.0f} s "
                f"({ok} requests ok, {failed} failed)")
        if forge.load is not None:
            forge.load.pause()
            await asyncio.sleep(1.0)  # answers in flight are counted before the check
        lost = await lost_orders(book, forge.cluster.http_addresses)
        c = Criterion("acknowledged orders lost", "0", f"{len(lost)} of {len(book.ids)}", not lost)
        if reports:
            last = reports[-1]
            last.criteria.append(c)
            last.passed = last.passed and c.passed
    return reports
