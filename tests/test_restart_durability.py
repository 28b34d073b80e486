"""Restarts of REAL node processes lose nothing acknowledged (issue 10, item 9).

- `aether cluster stop` + `aether cluster start` on the same directory, 10 times, with map,
  blueprint and KV writes between restarts (and KV writes in flight while the nodes stop): every
  acknowledged write is there afterwards on every node, the nodes' stores are identical, no
  command fails (no "400 stale request sequence"), every slice is ACTIVE again *in the new run*.
- kill -9 of a node (the leader, or not) during 300 writes/s with the default fsync, then a
  restart of it while the writes go on: every acknowledged write is on every node (identical
  stores), readable through the restarted node while it is part of every quorum.
- A rolling restart (SIGTERM, start again) of all three nodes, one at a time, under 300 writes/s
  through failing-over clients: zero failed writes.
- `aether cluster demo`, Ctrl-C, `aether cluster demo` (twice on one directory):
  the orders placed over HTTP in the first run are there in the second, stock levels included.
- A node killed with kill -9 and restarted with its own command line hosts slices again within
  seconds (right away, and after the leader had moved its instances away).

Clusters come from the shared fixtures in tests/conftest.py (free ports, PIDs cleaned up, node
logs attached to failures). Waits are deadlines for a condition; write loads are paced, bounded
(a fixed number of puts, each with the client's deadline) and stop by themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from aether.client import AetherClient
from aether.core.errors import AetherError
from conftest import HOST, LocalCluster, ProcessCluster, deploy_hello_examples, http_json

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
HELLO = "org.example:hello:0.1.0"
GREETER = "org.example:greeter:0.1.0"
DEMO_BLUEPRINT = ROOT / "examples" / "order_demo" / "demo-order.blueprint"
DEMO_BLUEPRINT_ID = "demo-order:0.1.0"

RATE = 300.0  # writes per second in the load phases
CLIENT_DEADLINE = 10.0  # seconds an AetherClient keeps retrying / failing over one write


# --------------------------------------------------------------------------------------------------
# helpers


def wait_for(
    check: Callable[[], tuple[bool, Any]], timeout: float, what: str, interval: float = 0.1
) -> float:
    """Poll `check()` -> (done, detail) until done; returns the seconds it took.

    Fails the test after `timeout` seconds with the last detail. Connection errors count as
    "not yet" (a node may still be starting).
    """
    t0 = time.monotonic()
    detail: Any = None
    while True:
        try:
            done, detail = check()
        except (OSError, ValueError, KeyError, urllib.error.URLError) as e:
            done, detail = False, repr(e)
        if done:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}; last: {detail}")
        time.sleep(interval)


def _ok(answer: tuple[int, Any]) -> Any:
    """The body of a 200 answer; ValueError otherwise (`wait_for` treats it as "not yet")."""
    status, body = answer
    if status != 200:
        raise ValueError(f"HTTP {status}: {body}")
    return body


def slices_problems(statuses: list[dict[str, Any]], desired: dict[str, int]) -> list[str]:
    """What keeps `/api/v1/slices` (or `aether slices --json`) from showing exactly `desired`
    with every instance ACTIVE; [] when converged."""
    by = {s["artifact"]: s for s in statuses}
    problems = [f"unexpected artifact {a}" for a in by if a not in desired]
    for art, n in desired.items():
        s = by.get(art)
        if s is None:
            problems.append(f"{art}: not listed")
            continue
        states = [(i["node"], i["state"], i.get("reason")) for i in s["instances"]]
        if s["desired"] != n or s["active"] != n or any(st != "ACTIVE" for _, st, _ in states):
            problems.append(f"{art}: desired {s['desired']}, {s['active']}/{n} ACTIVE, {states}")
    return problems


def fresh_active_problems(
    slice_keys: dict[str, Any], since: float, nodes: Sequence[str] | None = None
) -> list[str]:
    """Every `slices/{node}/{artifact}` key (of `nodes`, default all) must be ACTIVE and written
    at or after wall time `since`: keys left ACTIVE by a previous run do not count, since a
    restarted node loads its slices again and writes LOADED, then ACTIVE."""
    problems = []
    for key, v in sorted(slice_keys.items()):
        node = key.split("/")[1]
        if nodes is not None and node not in nodes:
            continue
        if v["state"] != "ACTIVE":
            problems.append(f"{key}: {v['state']} {v.get('reason') or ''}".strip())
        elif v["timestamp"] < since:
            problems.append(f"{key}: ACTIVE since {since - v['timestamp']:.1f} s before the (re)start")
    return problems


def assert_listing_has(listing: dict[str, Any], expected: dict[str, bytes], node: str) -> None:
    missing = [k for k in expected if k not in listing]
    wrong = [k for k, v in expected.items() if k in listing and listing[k] != v.decode()]
    assert not missing and not wrong, (
        f"{node}: {len(missing)} of {len(expected)} acknowledged keys missing (e.g. {missing[:5]}), "
        f"{len(wrong)} with a wrong value (e.g. {[(k, listing[k]) for k in wrong[:5]]})"
    )


def assert_every_node_has(c: ProcessCluster, prefix: str, acked: dict[str, bytes]) -> None:
    """After the stores converged: every node's applied state holds every acknowledged write,
    and the three stores are identical under `prefix` (no divergence, acknowledged or not)."""
    c.wait_applied_equal(30)
    listings = [c.kv(i, prefix) for i in range(c.n)]
    for i, listing in enumerate(listings):
        assert_listing_has(listing, acked, c.ids[i])
    for i in range(1, c.n):
        if listings[i] != listings[0]:
            only0 = sorted(set(listings[0]) - set(listings[i]))[:5]
            onlyi = sorted(set(listings[i]) - set(listings[0]))[:5]
            diff = [k for k in set(listings[0]) & set(listings[i]) if listings[0][k] != listings[i][k]][:5]
            pytest.fail(
                f"stores diverged under {prefix}: only on {c.ids[0]}: {only0}, only on {c.ids[i]}: "
                f"{onlyi}, different values: {diff}"
            )


def wait_caught_up(c: ProcessCluster, i: int, timeout: float = 30) -> float:
    """Wait until node i has applied at least what the other running nodes had applied when the
    wait began (it is a full member again, not a lagging one)."""
    target = max(c.status(j)["applied_slot"] for j in c.running() if j != i)

    def check() -> tuple[bool, Any]:
        c.check_alive()
        slot = c.status(i)["applied_slot"]
        return slot >= target, f"{c.ids[i]} applied slot {slot}, target {target}"

    return wait_for(check, timeout, f"{c.ids[i]} to catch up", interval=0.05)


class PacedWrites:
    """`rate` puts per second, open loop, round-robin over `clients`: put k writes the new key
    `{prefix}/{k:06d}` with a value of its own. Stops after `max_seconds` worth of puts or on
    `stop()`; every put has its client's deadline, so `run()` ends by itself."""

    def __init__(self, clients: Sequence[AetherClient], prefix: str, rate: float, max_seconds: float) -> None:
        self.clients = list(clients)
        self.prefix = prefix
        self.rate = rate
        self.max_count = int(rate * max_seconds)
        self.acked: dict[str, bytes] = {}
        self.ack_times: list[float] = []
        self.latencies: list[float] = []
        self.failed: list[tuple[str, str]] = []
        self.issued = 0
        self.t0 = 0.0
        self.t_end = 0.0
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def acks_between(self, t1: float, t2: float = float("inf")) -> int:
        return sum(1 for t in self.ack_times if t1 <= t < t2)

    async def _one(self, k: int) -> None:
        key, value = f"{self.prefix}/{k:06d}", f"{self.prefix}:{k}".encode()
        t = time.monotonic()
        try:
            await self.clients[k % len(self.clients)].put(key, value)
        except (AetherError, ConnectionError, OSError) as e:
            self.failed.append((key, repr(e)))
            return
        now = time.monotonic()
        self.acked[key] = value
        self.ack_times.append(now)
        self.latencies.append(now - t)

    async def run(self) -> None:
        self.t0 = time.monotonic()
        tasks = []
        for k in range(self.max_count):
            if self._stopped:
                break
            delay = self.t0 + k / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._one(k)))
            self.issued += 1
        await asyncio.gather(*tasks)
        self.t_end = time.monotonic()

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        return (
            f"{self.issued} puts in {self.t_end - self.t0:.1f} s, {len(self.acked)} acknowledged, "
            f"{len(self.failed)} failed; latency p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
            f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms"
        )


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until_async(pred: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------------------
# 1. `aether cluster stop` + `aether cluster start`, 10 times, with writes in between

_wait_for = wait_for
VERIFY_POLL = 0.02  # seconds between the checks of one condition in the stop-and-start test

ROUNDS = 10
KV_PER_ROUND = 20
STOP_RATE = 1000.0  # writes per second while `aether cluster stop` runs: slots in flight when it stops


def _check_ok(out: subprocess.CompletedProcess[str], what: str) -> str:
    assert out.returncode == 0, f"{what}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _engine(name: str) -> str:
    """The engine of map `name` in the stop-and-start test: the round maps of odd rounds use the
    log engine, the others sqlite (both persistent)."""
    return "log" if name[1:].isdigit() and int(name[1:]) % 2 else "sqlite"


def _verify_local_cluster(
    lc: LocalCluster,
    *,
    maps: dict[str, dict[str, Any]],
    blueprints: dict[str, dict[str, int]],
    kv: dict[str, bytes],
    desired: dict[str, int],
    since: float,
    label: str,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    """Every write so far is visible through every node, and every slice is ACTIVE, written in
    this run of the cluster (at or after wall time `since`). Polls every `VERIFY_POLL` s: each
    check is a request to a local node, and most are true at once or within a few polls."""
    wait_for = functools.partial(_wait_for, interval=VERIFY_POLL)
    cli_view: concurrent.futures.Future[subprocess.CompletedProcess[str]] | None = None
    # the replicas agree (no slot decided differently on different nodes)
    wait_for(lambda: _same_everywhere(lc, "user/restart/", kv), 15, f"{label}: identical stores")
    for i in range(lc.nodes):
        node = lc.ids[i]

        def map_defs(i: int = i) -> tuple[bool, Any]:
            status, doc = lc.api(i, "GET", "/api/v1/maps")
            got = {m["name"]: m["engine"] for m in doc["maps"]} if status == 200 else doc
            return status == 200 and all(got.get(n) == _engine(n) for n in maps), got

        wait_for(map_defs, 10, f"{label}: {node} lists maps {sorted(maps)}")
        for name, entries in maps.items():
            for key, value in entries.items():
                path = f"/api/v1/maps/{name}/entries/{urllib.parse.quote(key, safe='')}"

                def entry(i: int = i, path: str = path, value: Any = value) -> tuple[bool, Any]:
                    status, body = lc.api(i, "GET", path)
                    return (status, body) == (200, value), (status, body)

                wait_for(entry, 15, f"{label}: map {name}[{key!r}] == {value!r} read through {node}")

        def bps(i: int = i) -> tuple[bool, Any]:
            doc = _ok(lc.api(i, "GET", "/api/v1/blueprints"))
            got = {b["id"]: {s["artifact"]: s["instances"] for s in b["slices"]} for b in doc}
            return all(got.get(b) == want for b, want in blueprints.items()), got

        wait_for(bps, 10, f"{label}: {node} lists blueprints {blueprints}")

        def user_kv(i: int = i) -> tuple[bool, Any]:
            listing = lc.kv(i, "user/restart/")
            missing = [k for k, v in kv.items() if listing.get(k) != v.decode()]
            return not missing, f"{len(missing)} of {len(kv)} missing or wrong, e.g. {missing[:3]}"

        wait_for(user_kv, 10, f"{label}: {node} holds every acknowledged KV write")

        def slices(i: int = i) -> tuple[bool, Any]:
            status, statuses = lc.api(i, "GET", "/api/v1/slices")
            problems = slices_problems(statuses, desired) if status == 200 else [f"{status} {statuses}"]
            problems += fresh_active_problems(lc.kv(i, "slices/"), since)
            return not problems, problems

        wait_for(slices, 45, f"{label}: every slice ACTIVE (in this run) as seen by {node}")
        if i == 0:  # node 0 has converged: its CLI view (a process of its own) while the others are checked
            cli_view = pool.submit(lc.on, 0, "slices", "--json")

    # the CLI view, and the slices actually serve: greeter calls hello, through every node
    assert cli_view is not None
    out = _check_ok(cli_view.result(), f"{label}: aether slices --json")
    assert slices_problems(json.loads(out), desired) == [], out
    for i in range(lc.nodes):
        status, body = lc.api(i, "POST", "/api/v1/invoke/org.example:greeter/welcome", {"name": label})
        assert (status, body and body.get("text")) == (200, f"Welcome! Hello, {label}!"), (lc.ids[i], body)
        status, body = http_json(lc.http_port(i), "GET", f"/hello/{urllib.parse.quote(label)}")
        assert status == 200 and body["message"] == f"Hello, {label}!", (lc.ids[i], status, body)


class WritesDuringStop:
    """KV writes at RATE/s in a thread of their own (own event loop, one client per node), from
    before `aether cluster stop` until it returned: writes are in flight while the nodes shut
    down. Those acknowledged must be there after the next start; the others may or may not be."""

    def __init__(self, lc: LocalCluster, prefix: str) -> None:
        self.lc = lc
        self.prefix = prefix
        self.writes: PacedWrites | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        addrs = [f"{HOST}:{7000 + self.lc.port_offset + i}" for i in range(self.lc.nodes)]
        clients = [
            AetherClient(addrs, prefer=i, timeout=CLIENT_DEADLINE, secret=self.lc.secret)
            for i in range(self.lc.nodes)
        ]
        try:
            self.writes = PacedWrites(clients, self.prefix, STOP_RATE, max_seconds=30.0)
            self._ready.set()
            await self.writes.run()
        finally:
            self._ready.set()
            for cl in clients:
                await cl.close()

    def __enter__(self) -> PacedWrites:
        self._thread.start()
        assert self._ready.wait(10)
        w = self.writes
        assert w is not None
        wait_for(
            lambda: (len(w.acked) >= STOP_RATE / 4, w.summary()), 10, "writes before the stop", VERIFY_POLL
        )
        return w

    def __exit__(self, *exc: object) -> None:
        if self.writes is not None:
            self.writes.stop()
        self._thread.join(CLIENT_DEADLINE + 20)
        assert not self._thread.is_alive(), "the writer did not finish"


def _same_everywhere(lc: LocalCluster, prefix: str, acked: dict[str, bytes]) -> tuple[bool, Any]:
    """Every node holds the same keys and values under `prefix`; the detail names the keys that
    differ, their value on each node, and whether a client had the write acknowledged."""
    listings = [lc.kv(i, prefix) for i in range(lc.nodes)]
    keys = sorted({k for listing in listings for k in listing})
    diff = {
        k: {"acknowledged": k in acked, **{lc.ids[i]: listing.get(k) for i, listing in enumerate(listings)}}
        for k in keys
        if len({json.dumps(listing.get(k)) for listing in listings}) > 1
    }
    return not diff, f"{len(diff)} keys differ, e.g. {dict(list(diff.items())[:5])}"


async def _put_kv(lc: LocalCluster, items: dict[str, bytes], prefer: int) -> None:
    addrs = [f"{HOST}:{7000 + lc.port_offset + i}" for i in range(lc.nodes)]
    async with AetherClient(addrs, prefer=prefer, timeout=CLIENT_DEADLINE, secret=lc.secret) as cl:
        for k, v in items.items():
            await cl.put(k, v)


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for what the stop-and-start test runs side by side (CLI processes, mostly)."""
    with concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="restart-test") as p:
        yield p


@pytest.mark.timeout(300)
def test_cluster_stop_and_start_10_times_keeps_every_write(
    make_local_cluster: Callable[..., LocalCluster],
    tmp_path: Path,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    lc = make_local_cluster(3)
    deploy_hello_examples(lc.repository, tmp_path / "wheels")
    maps: dict[str, dict[str, Any]] = {}
    blueprints: dict[str, dict[str, int]] = {}
    kv: dict[str, bytes] = {}
    desired: dict[str, int] = {}
    t_round0 = time.monotonic()
    for r in range(ROUNDS):
        label = f"round {r}"
        since = time.time()
        out = lc.start()
        assert out.returncode == 0, f"{label}: aether cluster start: {out.stdout}\n{out.stderr}"
        assert "Quorum: yes" in out.stdout and "3/3 nodes up" in out.stdout, out.stdout
        if r > 0:  # everything written before the stop is back
            _verify_local_cluster(
                lc, maps=maps, blueprints=blueprints, kv=kv, desired=desired, since=since, label=label,
                pool=pool,
            )

        # writes of this round, each through another node (each node writes with its own session):
        # maps, blueprints and KV keys are independent, so their three sequences run side by side
        # (each a chain of CLI processes; one after the other they cost a round ~1 s more)
        via = r % lc.nodes

        def map_writes(r: int = r, label: str = label, via: int = via) -> None:
            names = [f"m{r}", *(["shared"] if r == 0 else [])]
            for name in names:
                out = _check_ok(
                    lc.on(via, "map", "create", name, "--engine", _engine(name)),
                    f"{label}: map create {name}",
                )
                assert f"Created map '{name}'" in out, out
                maps[name] = {}
            for name, key, value in ((f"m{r}", "k", {"round": r}), ("shared", f"r{r}", r)):
                _check_ok(
                    lc.on(via, "map", "put", name, key, json.dumps(value)), f"{label}: map put {name} {key}"
                )
                maps[name][key] = value

        # one blueprint re-applied with another instance count each round (hello 2, 3, 2, ...),
        # so every round also deploys; and a new blueprint each round
        hello_n = 2 + r % 2

        def blueprint_writes(r: int = r, label: str = label, via: int = via, hello_n: int = hello_n) -> None:
            main_bp = tmp_path / "main.blueprint"
            main_bp.write_text(
                f'id = "restart-main:1"\n\n[slices.hello]\nartifact = "{HELLO}"\ninstances = {hello_n}\n\n'
                f'[slices.greeter]\nartifact = "{GREETER}"\ninstances = 1\n'
            )
            _check_ok(
                lc.on(via, "blueprint", "apply", str(main_bp), "--wait", "--wait-timeout", "60"),
                f"{label}: blueprint apply (hello x{hello_n}) --wait",
            )
            blueprints["restart-main:1"] = {HELLO: hello_n, GREETER: 1}
            round_bp = tmp_path / f"r{r}.blueprint"
            round_bp.write_text(
                f'id = "restart-r{r}:1"\n\n[slices.greeter]\nartifact = "{GREETER}"\ninstances = 1\n'
            )
            _check_ok(
                lc.on(via, "blueprint", "apply", str(round_bp)), f"{label}: blueprint apply restart-r{r}:1"
            )
            # greeter depends on hello: its expansion lists hello with 1 instance
            blueprints[f"restart-r{r}:1"] = {HELLO: 1, GREETER: 1}

        items = {f"user/restart/r{r:02d}/{j:02d}": f"r{r}-{j}".encode() for j in range(KV_PER_ROUND)}
        chains = [
            pool.submit(map_writes),
            pool.submit(blueprint_writes),
            pool.submit(lambda items=items, via=via: asyncio.run(_put_kv(lc, items, prefer=via))),
        ]
        for chain in chains:
            chain.result()  # (its AssertionError, if any)
        desired = {HELLO: hello_n, GREETER: 1}
        kv |= items
        # read your writes (a create answered "Created" must have created the map)
        _verify_local_cluster(
            lc, maps=maps, blueprints=blueprints, kv=kv, desired=desired, since=since, label=label, pool=pool
        )

        pids = lc.pids()
        with WritesDuringStop(lc, f"user/restart/s{r:02d}") as inflight:
            stop = lc.stop()
        print(f"{label}: writes while stopping: {inflight.summary()}")
        kv |= inflight.acked
        out = _check_ok(stop, f"{label}: aether cluster stop")
        for k, pid in enumerate(pids, 1):
            assert f"Stopped node-{k} (pid {pid})." in out, f"{label}: not a clean stop: {out}"
        assert not [pid for pid in pids if _alive(pid)], f"{label}: node processes left running"
        print(f"{label} done after {time.monotonic() - t_round0:.1f} s")

    for i in range(lc.nodes):
        stale = [ln for ln in lc.log_text(i).splitlines() if "stale request sequence" in ln]
        assert not stale, f"{lc.ids[i]} logged refused writes: {stale[:3]}"


# --------------------------------------------------------------------------------------------------
# 2. kill -9 during 300 writes/s (default fsync), then restart


@pytest.mark.timeout(150)
@pytest.mark.parametrize("victim", [0, 2], ids=["leader-node-1", "node-3"])
async def test_kill9_during_300_writes_per_second_then_restart_loses_nothing_acknowledged(
    make_process_cluster: Callable[..., ProcessCluster], victim: int
) -> None:
    c = make_process_cluster(3)  # default fsync: no --fsync flag
    assert c.leader_index() == 0
    clients = [c.client(prefer=i, timeout=CLIENT_DEADLINE) for i in range(3)]
    for cl in clients:
        await cl.__aenter__()
    try:
        writes = PacedWrites(clients, "user/k9", RATE, max_seconds=8.0)
        task = asyncio.create_task(writes.run())
        await until_async(lambda: len(writes.acked) >= 2 * RATE, 10, "2 s worth of acknowledged writes")
        c.kill9(victim)
        t_kill = time.monotonic()
        # writes go on without the victim for 2 s, then it restarts (same command line and data)
        await until_async(
            lambda: writes.acks_between(t_kill) >= 2 * RATE, 15, "2 s of writes without the victim"
        )
        c.start(victim)
        t_restart = time.monotonic()
        await task
        print(f"kill -9 of {c.ids[victim]}: {writes.summary()}")
        assert writes.acks_between(t_restart) > 0, "no write acknowledged after the restart"
        await c.await_quorum(30)
        await asyncio.to_thread(assert_every_node_has, c, "user/k9/", writes.acked)
        # the restarted node's own writes (through its node-internal session) are accepted too:
        # a map defined through it exists everywhere
        status, body = await asyncio.to_thread(
            http_json, c.management_ports[victim], "POST", "/api/v1/maps", {"name": "after-restart"}
        )
        assert (status, body and body.get("created")) == (201, True), (status, body)
        for i in range(c.n):
            status, body = await asyncio.to_thread(http_json, c.management_ports[i], "GET", "/api/v1/maps")
            assert "after-restart" in [m["name"] for m in body["maps"]], (c.ids[i], body)

        # the restarted node is now in every quorum: every acknowledged write reads back through it
        other = 1
        c.kill9(other)
        async with c.client(prefer=victim, only=[victim], timeout=CLIENT_DEADLINE) as own:
            sem = asyncio.Semaphore(64)
            wrong: list[tuple[str, bytes | None]] = []

            async def read(k: str, v: bytes) -> None:
                async with sem:
                    got = await own.get(k)
                if got != v:
                    wrong.append((k, got))

            await asyncio.gather(*(read(k, v) for k, v in writes.acked.items()))
        assert not wrong, (
            f"{len(wrong)} acknowledged writes read back wrong through {c.ids[victim]}: {wrong[:5]}"
        )
        # and with failover, not a single write failed
        assert not writes.failed, f"{len(writes.failed)} writes failed, e.g. {writes.failed[:5]}"
    finally:
        for cl in clients:
            await cl.close()


# --------------------------------------------------------------------------------------------------
# 3. rolling restart under 300 writes/s


@pytest.mark.timeout(150)
async def test_rolling_restart_under_300_writes_per_second_fails_no_write(
    process_cluster: ProcessCluster,
) -> None:
    c = process_cluster
    clients = [c.client(prefer=i, timeout=CLIENT_DEADLINE) for i in range(3)]
    for cl in clients:
        await cl.__aenter__()
    try:
        writes = PacedWrites(clients, "user/roll", RATE, max_seconds=60.0)
        task = asyncio.create_task(writes.run())
        await until_async(lambda: len(writes.acked) >= RATE, 10, "1 s worth of acknowledged writes")
        timings = []
        for i in range(c.n):
            t0 = time.monotonic()
            rc = await asyncio.to_thread(c.stop, i)  # SIGTERM: a clean stop
            assert rc == 0, f"{c.ids[i]} exited with {rc} on SIGTERM"
            t_down = time.monotonic()
            await until_async(
                lambda t=t_down: writes.acks_between(t) >= RATE / 2, 15, f"writes while {c.ids[i]} is down"
            )
            c.start(i)
            await c.await_quorum(30)
            await asyncio.to_thread(wait_caught_up, c, i)
            t_back = time.monotonic()
            await until_async(
                lambda t=t_back: writes.acks_between(t) >= RATE / 2, 15, f"writes after {c.ids[i]} rejoined"
            )
            timings.append(f"{c.ids[i]} down {t_back - t_down:.1f} s (cycle {time.monotonic() - t0:.1f} s)")
        writes.stop()
        await task
        print(f"rolling restart ({', '.join(timings)}): {writes.summary()}")
        assert writes.issued < writes.max_count, "the write phase ended before the rolling restart did"
        assert not writes.failed, (
            f"{len(writes.failed)} of {writes.issued} writes failed, e.g. {writes.failed[:5]}"
        )
        assert len(writes.acked) == writes.issued
        # every client lost its node once (it prefers a different node each) and failed over
        assert [cl.failovers >= 1 for cl in clients] == [True] * 3, [cl.failovers for cl in clients]
        await asyncio.to_thread(assert_every_node_has, c, "user/roll/", writes.acked)
    finally:
        for cl in clients:
            await cl.close()


# --------------------------------------------------------------------------------------------------
# 4. `aether cluster demo`, Ctrl-C, `aether cluster demo`


class LineReader:
    """Reads a process's stdout in a thread; `until(marker, timeout)` waits for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def until(self, marker: str, timeout: float, stderr: Path) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line with {marker!r} within {timeout:g} s:\n{''.join(self.lines)}")
            try:
                line = self._q.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(
                    f"exited with {self.proc.wait(10)} before printing {marker!r}:\n{''.join(self.lines)}\n"
                    f"stderr:\n{stderr.read_text(errors='replace')[-4000:]}"
                )
            self.lines.append(line)
            if marker in line:
                return "".join(self.lines)

    def rest(self) -> str:
        self._t.join(30)
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


def _run_demo(lc: LocalCluster, wheels: Path, run: int) -> tuple[subprocess.Popen[str], LineReader, Path]:
    env = {k: v for k, v in lc.env.items() if k != "AETHER_REPOSITORY"}  # --wheels sets it
    stderr = lc.dir.parent / f"demo-run{run}.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "aether.cli.main", "cluster", "demo", "--nodes", "3",
                "--dir", str(lc.dir), "--base-port-offset", str(lc.port_offset),
                "--wheels", str(wheels), "--blueprint", str(DEMO_BLUEPRINT), "--wait-timeout", "60",
            ],
            env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            cwd=lc.dir.parent,
        )  # fmt: skip
    return proc, LineReader(proc), stderr


def _ctrl_c(proc: subprocess.Popen[str], reader: LineReader, pids: list[int | None], label: str) -> None:
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    out = reader.rest()
    assert rc == 0, f"{label}: demo exited {rc} after Ctrl-C:\n{out}"
    for k, pid in enumerate(pids, 1):
        assert f"Stopped node-{k} (pid {pid})." in out, f"{label}: node-{k} not stopped cleanly:\n{out}"


def _order(customer: str, *items: tuple[str, int]) -> dict[str, Any]:
    return {"customerId": customer, "items": [{"productId": p, "quantity": q} for p, q in items]}


@pytest.mark.timeout(300)
def test_make_demo_then_ctrl_c_then_make_demo_keeps_the_orders(
    make_local_cluster: Callable[..., LocalCluster], demo_wheels: Path
) -> None:
    lc = make_local_cluster(3)
    procs: list[subprocess.Popen[str]] = []
    try:
        # first `make demo`: place orders over HTTP through every node, cancel one
        proc, reader, stderr = _run_demo(lc, demo_wheels, 1)
        procs.append(proc)
        out = reader.until("Ctrl-C", 180, stderr)
        assert f"Blueprint '{DEMO_BLUEPRINT_ID}' is running" in out, out
        orders: dict[str, dict[str, Any]] = {}
        products = ["PROD-ABC123", "PROD-XYZ789"]
        for k in range(6):
            status, placed = http_json(
                lc.http_port(k % 3),
                "POST",
                "/api/orders",
                _order(f"CUST-{100 + k}", (products[k % 2], 1 + k)),
            )
            assert status == 200, (k, status, placed)
            orders[placed["orderId"]] = placed
        cancel = next(iter(orders))
        status, cancelled = http_json(lc.http_port(1), "DELETE", f"/api/orders/{cancel}")
        assert status == 200 and cancelled["status"] == "CANCELLED", cancelled
        orders[cancel] = cancelled
        stock = {}
        for p in products:
            status, stock[p] = http_json(lc.http_port(2), "GET", f"/api/inventory/{p}")
            assert status == 200, stock[p]
        _ctrl_c(proc, reader, lc.pids(), "first run")

        # second `make demo` on the same directory: every order and stock level is back
        proc, reader, stderr = _run_demo(lc, demo_wheels, 2)
        procs.append(proc)
        out = reader.until("Ctrl-C", 180, stderr)
        assert f"Blueprint '{DEMO_BLUEPRINT_ID}' is running" in out, out
        lost = []
        for i in range(3):
            for oid, want in orders.items():
                status, got = http_json(lc.http_port(i), "GET", f"/api/orders/{oid}")
                if (status, got) != (200, want):
                    lost.append(f"{oid} via node-{i + 1}: {status} {got}")
        assert not lost, f"{len(lost)} order reads after the restart differ: {lost[:4]}"
        for p in products:
            assert http_json(lc.http_port(0), "GET", f"/api/inventory/{p}") == (200, stock[p])
        # and the demo works on: a new order is placed and readable everywhere
        new_order = _order("CUST-999", ("PROD-ABC123", 1))
        status, placed = http_json(lc.http_port(2), "POST", "/api/orders", new_order)
        assert status == 200, placed
        for i in range(3):
            assert http_json(lc.http_port(i), "GET", f"/api/orders/{placed['orderId']}") == (200, placed)
        _ctrl_c(proc, reader, lc.pids(), "second run")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


# --------------------------------------------------------------------------------------------------
# 5. kill -9 and restart with its own command line: hosts slices again within seconds

HOSTS_AGAIN_WITHIN = 15.0  # seconds from the restart until the node's slices are ACTIVE again


def _apply(c: ProcessCluster, toml: str) -> None:
    status, body = http_json(
        c.management_ports[0], "POST", "/api/v1/blueprints", {"toml": toml, "filename": "t.blueprint"}
    )
    assert status in (200, 201), (status, body)


def _hosting(c: ProcessCluster, victim: int, since: float, via: Sequence[int]) -> tuple[bool, Any]:
    """The victim runs an ACTIVE instance of both artifacts, written since its restart, with its
    endpoints published, and the cluster (as every node in `via` sees it) is converged."""
    c.check_alive()
    vid = c.ids[victim]
    problems = []
    for i in via:
        statuses = _ok(http_json(c.management_ports[i], "GET", "/api/v1/slices"))
        problems += [f"{c.ids[i]} sees {p}" for p in slices_problems(statuses, {HELLO: 3, GREETER: 3})]
    keys = c.kv(victim, f"slices/{vid}/")
    for art in (HELLO, GREETER):
        if f"slices/{vid}/{art}" not in keys:
            problems.append(f"{vid} has no instance of {art}")
    problems += fresh_active_problems(keys, since)
    endpoints = c.kv(victim, "endpoints/")
    for art in (HELLO, GREETER):
        if not any(k.startswith(f"endpoints/{art}/") and v["node_id"] == vid for k, v in endpoints.items()):
            problems.append(f"no endpoint of {art} on {vid}")
    return not problems, problems


@pytest.mark.timeout(150)
@pytest.mark.parametrize("victim", [2, 0], ids=["node-3", "leader-node-1"])
def test_node_killed_and_restarted_hosts_its_slices_again_within_seconds(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path, victim: int
) -> None:
    c = make_process_cluster(3, start=False)
    deploy_hello_examples(c.repository, tmp_path / "wheels")
    c.start_all()
    c.wait_quorum(30)
    _apply(
        c,
        f'id = "everywhere:1"\n\n[slices.hello]\nartifact = "{HELLO}"\ninstances = 3\n\n'
        f'[slices.greeter]\nartifact = "{GREETER}"\ninstances = 3\n',
    )
    all_nodes = range(3)
    wait_for(lambda: _hosting(c, victim, 0.0, all_nodes), 60, "3 instances of each slice, one per node")
    vid = c.ids[victim]
    survivors = [i for i in all_nodes if i != victim]

    # (a) restarted right away: its slices/ keys are still there; it loads them again
    c.kill9(victim)
    since = time.time()
    c.start(victim)
    took_a = wait_for(lambda: _hosting(c, victim, since, all_nodes), 45, f"{vid} to host its slices again")

    # (b) restarted after the leader gave its instances to the others (3 on 2 nodes: 2 + 1); the
    # spread rule (no node more than one instance above another) gives one of each back to it
    c.kill9(victim)

    def moved() -> tuple[bool, Any]:
        problems = []
        for i in survivors:
            statuses = _ok(http_json(c.management_ports[i], "GET", "/api/v1/slices"))
            problems += slices_problems(statuses, {HELLO: 3, GREETER: 3})
            problems += [f"{k} left" for k in c.kv(i, f"slices/{vid}/")]
        return not problems, problems

    wait_for(moved, 45, f"the instances of {vid} to move to the survivors")
    since = time.time()
    c.start(victim)
    took_b = wait_for(lambda: _hosting(c, victim, since, all_nodes), 45, f"{vid} to host slices again")
    print(
        f"{vid} hosted its slices again {took_a:.1f} s after an immediate restart, "
        f"{took_b:.1f} s after a late one"
    )
    assert took_a <= HOSTS_AGAIN_WITHIN and took_b <= HOSTS_AGAIN_WITHIN, (took_a, took_b)
    # it serves them: a route through its own HTTP port, greeter -> hello through its invoker
    status, body = http_json(c.http_ports[victim], "GET", "/hello/back")
    assert status == 200 and body["message"] == "Hello, back!", body
    status, body = http_json(
        c.management_ports[victim], "POST", "/api/v1/invoke/org.example:greeter/welcome", {"name": "Bo"}
    )
    assert status == 200 and body["text"] == "Welcome! Hello, Bo!", body
    refused = [ln for ln in c.log_text(victim).splitlines() if "rejected" in ln and "writing" in ln]
    assert not refused, f"{vid} had its own writes refused: {refused[:3]}"
